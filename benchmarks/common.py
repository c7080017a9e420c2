"""What every benchmark shares: the machine description saved with each figure, and weights for
backbones that ship none (random weights cost what real ones do)."""

from __future__ import annotations

import json
import os
import platform
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from embedcache.cache.store import open_cache
from embedcache.evaluation.score import CachedCase, case_sources
from embedcache.io.volumes import read_label
from embedcache.model.backbones import Backbone
from embedcache.model.engines import cpu_identity, cpu_name
from embedcache.synth.phantom import PhantomConfig
from embedcache.train.decoders import load_model, load_trained_decoder

RESULTS = Path(__file__).resolve().parent / "results"


def decoded_cases(cache_path: Path, names, decoder: Path | None, device, *, view: str = "whole"):
    """Each case of ``names`` in the cache at ``cache_path`` with one decoder (None: vanilla), as score decodes it:
    yields ``(cache, case, truth, segment)``, ``truth`` the case's label volume and ``segment`` its
    :class:`~embedcache.evaluation.segmenter.Segmenter` over the cached embeddings. ``view``: which of the cache's
    views the cases are (``whole`` slices, or the glands' ``regions``), which the decoder must have been trained on."""
    with open_cache(cache_path) as cache:
        trained = load_trained_decoder(decoder, expect=cache.signature, expect_path=cache_path,
                                       view=view) if decoder else None
        model = load_model(cache.signature.backbone, trained=trained, checkpoint=None, device=device,
                           expect_sha256=cache.signature.checkpoint_sha256, made=str(cache_path), vanilla=trained is None)
        (_, mask_decoder), = model.decoders.items()
        size = {"input_size": model.backbone.input_size, "slice_size": cache.signature.slice_size}
        records = [c for c in cache.cases if c.name in names]
        sources = case_sources(records, None)
        for case in records:
            truth = read_label(sources[case.name][1]).array
            yield cache, case, truth, CachedCase(cache, case, device=device).segment_with(model.parts.prompt_encoder,
                                                                                          mask_decoder, **size)


@contextmanager
def own_engine_cache(tmp):
    """EMBEDCACHE_CACHE at ``tmp/engine-cache`` while the block runs (a run's own graph exports and measurements,
    never the user's), and as it was afterwards: the tests call the benchmarks' main() in their own process."""
    previous = os.environ.get("EMBEDCACHE_CACHE")
    os.environ["EMBEDCACHE_CACHE"] = str(Path(tmp) / "engine-cache")
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("EMBEDCACHE_CACHE", None)
        else:
            os.environ["EMBEDCACHE_CACHE"] = previous


def machine(device: torch.device) -> dict:
    info = {
        "cpu": cpu_name(),
        "cpu_identity": cpu_identity(),  # two CPUs named "AMD EPYC" here were an AVX2 one and a Zen 4 with bf16
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def weights_for(backbone: Backbone, folder: Path, given: Path | None = None) -> Path | None:
    """``given``, else None for a backbone with bundled weights, else a seeded random-weight file in ``folder``."""
    if given is not None or backbone.bundled_checkpoint is not None:
        return given
    torch.manual_seed(0)
    path = Path(folder) / f"{backbone.name}-random.pth"
    torch.save(backbone.build().state_dict(), path)
    return path


def phantom_config(size: int) -> PhantomConfig:
    """The phantom at ``size``² pixels over the same field of view (512: the real size; smaller for smoke tests)."""
    return PhantomConfig(size=size, pixel_mm=0.8 * 512 / size)


def write_result(result: dict, folder: Path, stem: str, table: str) -> Path:
    """Write ``result`` as ``folder/STEM.json`` and its markdown ``table`` beside it as ``STEM.md``, print the table
    and where they went; returns the JSON's path."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{stem}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out}")
    return out


def save(result: dict, name: str) -> Path:
    """Write ``result`` as ``benchmarks/results/NAME.json`` and say where."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path}", file=sys.stderr)
    return path
