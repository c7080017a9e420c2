"""How close does `embedcache encode` come to the bare image encoder?

On the same slices, in one process:
  bare      the encoder's forward alone, on preprocessed slices already in memory, same batches;
  pipeline  `encode()` end to end: hashing and reading the volumes, geometry checks, windowing and
            resampling, encoding, writing shards and merging the cache file.
The bare run is measured before and after the pipeline and averaged, so drift of a shared
machine hits both sides. Prints one JSON object and saves it under benchmarks/results/.

    python benchmarks/encode.py --backbone litemedsam --slices 24
    python benchmarks/encode.py --backbone vit_b --slices 8      # random weights unless --checkpoint
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from common import machine, phantom_config, save, weights_for
from embedcache import __version__
from embedcache.backbones import get_backbone
from embedcache.config import EncodeConfig
from embedcache.devices import pick_device
from embedcache.encode import encode, load_encoder, plan_case, prepare_case
from embedcache.encoder import ImageEncoder
from embedcache.phantom import make_case, write_phantom
from embedcache.volumes import discover_cases, source_digest


def phantom_with_slices(folder: Path, slices: int, seed: int, size: int = 512) -> Path:
    """Write phantom cases until they hold at least ``slices`` target slices."""
    config = phantom_config(size)
    total, cases = 0, 0
    while total < slices:
        _, labels, _ = make_case(seed * 1_000_003 + cases, config)
        total += int(np.isin(labels, (7, 8)).any(axis=(1, 2)).sum())
        cases += 1
    write_phantom(folder, cases=cases, seed=seed, config=config)
    return folder


def bare_rate(encoder: ImageEncoder, images: np.ndarray, batch: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(images), batch):
        encoder(images[i : i + batch]).cpu()
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - started)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="litemedsam")
    parser.add_argument("--slices", type=int, default=24, help="at least this many target slices")
    parser.add_argument("--checkpoint", type=Path, default=None, help="weights (random weights if not given and not bundled)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phantom-size", type=int, default=512, help="axial pixels of the synthetic CT")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    backbone = get_backbone(args.backbone)
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory(prefix="embedcache-bench-") as tmp:
        tmp = Path(tmp)
        checkpoint = weights_for(backbone, tmp, args.checkpoint)
        config = EncodeConfig(
            backbone=backbone.name, checkpoint=str(checkpoint) if checkpoint else None,
            device=str(device), batch_size=args.batch_size,
        )
        cases = discover_cases(phantom_with_slices(tmp / "data", args.slices, args.seed, args.phantom_size))
        encoder = load_encoder(config, device=device)
        images = np.concatenate([
            prepare_case(plan_case(c, config, source_digest(c.image, c.label)), config).images for c in cases
        ])
        n = len(images)
        encoder(images[: encoder.batch_size])  # warm-up: first-call allocations, cuDNN autotune
        bare_before = bare_rate(encoder, images, encoder.batch_size)

        out = tmp / "cache.h5"
        started = time.perf_counter()
        summary = encode(cases, out, config, progress=None, log=lambda m: None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        pipeline_s = time.perf_counter() - started
        bytes_per_slice = out.stat().st_size / summary.slices_encoded
        bare_after = bare_rate(encoder, images, encoder.batch_size)

    assert summary.slices_encoded == n, (summary.slices_encoded, n)
    bare = (bare_before + bare_after) / 2
    pipeline = n / pipeline_s
    result = {
        "benchmark": "encode",
        "backbone": backbone.name,
        "weights": "given" if args.checkpoint else ("bundled" if backbone.bundled_checkpoint else "random"),
        "slices": n,
        "cases": len(cases),
        "batch_size": encoder.batch_size,
        "pipeline_slices_per_s": round(pipeline, 4),
        "bare_slices_per_s": round(bare, 4),
        "bare_slices_per_s_before_after": [round(bare_before, 4), round(bare_after, 4)],
        "pipeline_over_bare": round(pipeline / bare, 4),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "bytes_per_slice": int(bytes_per_slice),
        "machine": machine(device),
        "embedcache": __version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device.type == "cuda":
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print(json.dumps(result, indent=2))
    if not args.no_save:
        save(result, f"encode-{backbone.name}-{device.type}-{result['date'][:10]}")
    return result


if __name__ == "__main__":
    main()
