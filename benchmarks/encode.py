"""How close does `embedcache encode` come to the bare image encoder?

On the same slices, in one process:
  bare      the encoder's forward alone, on preprocessed slices already on the device, same
            batches, the device synchronised once at the end;
  pipeline  `encode()` end to end: hashing and reading the volumes, geometry checks, windowing and
            resampling, loading the weights, encoding, writing shards and merging the cache file.
Runs alternate, bare · pipeline · bare · pipeline · bare (--repeats pipelines), and each pipeline
is set against the mean of the bare runs either side of it, so drift of a shared machine hits
both sides; the figure is the median of those ratios. Prints one JSON object and saves it under
benchmarks/results/.

    python benchmarks/encode.py --backbone litemedsam --slices 24
    python benchmarks/encode.py --backbone vit_b --slices 8      # random weights unless --checkpoint

``--engines torch,onnxruntime,openvino`` sets the engines side by side instead: ``encode()`` end to end
with each on the CPU, on the same cases, alternating (benchmarks/engines.py times the bare encoders,
their memory and their Dice).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import torch

from embedcache import __version__
from embedcache.cache.encode import encode, load_encoder
from embedcache.cache.pipeline import prepare_case, workers_for
from embedcache.cache.plan import plan_case
from embedcache.config import EncodeConfig
from embedcache.io.datasets import discover_cases
from embedcache.io.volumes import source_digest
from embedcache.model.backbones import get_backbone
from embedcache.model.encoder import ImageEncoder
from embedcache.runtime.devices import pick_device
from embedcache.synth.phantom import make_case, write_phantom

from common import machine, own_engine_cache, phantom_config, save, weights_for


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


def bare_rate(encoder: ImageEncoder, batches: list, slices: int) -> float:
    started = time.perf_counter()
    for batch in batches:
        encoder(batch)
    if encoder.device.type == "cuda":
        torch.cuda.synchronize(encoder.device)
    return slices / (time.perf_counter() - started)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="litemedsam")
    parser.add_argument("--slices", type=int, default=24, help="at least this many target slices")
    parser.add_argument("--checkpoint", type=Path, default=None, help="weights (random weights if not given and not bundled)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--engine", default="torch",
                        help="ENGINE or ENGINE:bf16 (model.engines) for both the bare and the pipeline runs; "
                             "benchmarks/engines.py sets the engines side by side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phantom-size", type=int, default=512, help="axial pixels of the synthetic CT")
    parser.add_argument("--repeats", type=int, default=2, help="pipeline runs, each between two bare runs")
    parser.add_argument("--engines", default=None,
                        help="comma list (ENGINE or ENGINE:bf16): encode() end to end with each, alternating, on a CPU")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    backbone = get_backbone(args.backbone)
    device = pick_device(args.device)
    if args.engines:
        return engines_side_by_side(args, backbone)
    with tempfile.TemporaryDirectory(prefix="embedcache-bench-") as tmp:
        tmp = Path(tmp)
        checkpoint = weights_for(backbone, tmp, args.checkpoint)
        engine, _, precision = args.engine.partition(":")
        config = EncodeConfig(
            backbone=backbone.name, checkpoint=str(checkpoint) if checkpoint else None,
            device=str(device), batch_size=args.batch_size, engine=engine, precision=precision or "fp32",
            zoom_mm=0.0,  # the whole slices' pace
        )
        cases = discover_cases(phantom_with_slices(tmp / "data", args.slices, args.seed, args.phantom_size))
        encoder = load_encoder(config, device=device)
        config = replace(config, batch_size=encoder.batch_size)  # the pipeline's batches as the bare run's
        images = np.concatenate([
            prepare_case(plan_case(c, config, source_digest(c.image, c.label)), config).images for c in cases
        ])
        n, batch = len(images), encoder.batch_size
        batches = [images[i : i + batch] for i in range(0, n, batch)]
        if device.type == "cuda":
            batches = [torch.from_numpy(b).to(device) for b in batches]
        encoder(batches[0])  # warm-up: first-call allocations, cuDNN autotune
        bare, pipeline = [bare_rate(encoder, batches, n)], []
        for run in range(args.repeats):
            out = tmp / f"cache-{run}.h5"
            started = time.perf_counter()
            summary = encode(cases, out, config, progress=None)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - started
            pipeline.append(n / elapsed)
            stages = {"encode_loop": summary.encode_seconds, "input_wait": summary.input_wait_s,
                      "encoder_wait": summary.encoder_wait_s, "writing": summary.writing_s,
                      "merge": summary.merge_s, "pipeline": elapsed}
            assert summary.slices_encoded == n, (summary.slices_encoded, n)
            bytes_per_slice = out.stat().st_size / summary.slices_encoded
            bare.append(bare_rate(encoder, batches, n))

    ratios = [p / ((bare[i] + bare[i + 1]) / 2) for i, p in enumerate(pipeline)]
    result = {
        "benchmark": "encode",
        "backbone": backbone.name,
        "engine": args.engine,
        "weights": "given" if args.checkpoint else ("bundled" if backbone.bundled_checkpoint else "random"),
        "slices": n,
        "cases": len(cases),
        "batch_size": batch,
        "workers": workers_for(config, device),
        "pipeline_slices_per_s": round(statistics.median(pipeline), 4),
        "bare_slices_per_s": round(statistics.median(bare), 4),
        "pipeline_runs_slices_per_s": [round(p, 4) for p in pipeline],
        "bare_runs_slices_per_s": [round(b, 4) for b in bare],
        "pipeline_over_bare_runs": [round(r, 4) for r in ratios],
        "pipeline_over_bare": round(statistics.median(ratios), 4),
        # seconds of the last pipeline run: the encode loop (input_wait: the main thread waiting for
        # prepared slices; encoder_wait and writing: the writer thread waiting for embeddings, and
        # writing shards), then the merge into one file
        "stages_s": {k: round(v, 3) for k, v in stages.items()},
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


def engines_side_by_side(args, backbone) -> dict:
    """``encode()`` end to end on the same cases with each engine of ``--engines``, on the CPU, alternating engine by
    engine over ``--repeats`` rounds after one uncounted round (exports, first compilation): slices per second per
    engine, its ratio to eager torch's, and its float32 embeddings' largest difference from torch's."""
    from engines import parse_spec, spec_streams

    from embedcache.model.engines import check_engine

    specs = [e.strip() for e in args.engines.split(",") if e.strip()]
    specs = ["torch"] + [s for s in specs if s != "torch"]  # the reference first
    for spec in specs:
        engine, precision = parse_spec(spec)
        check_engine(engine, "cpu", precision)
    with tempfile.TemporaryDirectory(prefix="embedcache-bench-") as tmp, own_engine_cache(tmp):  # its own exports
        tmp = Path(tmp)
        checkpoint = weights_for(backbone, tmp, args.checkpoint)
        cases = discover_cases(phantom_with_slices(tmp / "data", args.slices, args.seed, args.phantom_size))
        rates, slices = {s: [] for s in specs}, 0
        for round_ in range(args.repeats + 1):
            for spec in specs:
                engine, precision = parse_spec(spec)
                config = EncodeConfig(backbone=backbone.name, checkpoint=str(checkpoint) if checkpoint else None,
                                      device="cpu", engine=engine, precision=precision,
                                      streams=spec_streams(spec), embedding_dtype="float32", zoom_mm=0.0)
                out = tmp / f"{spec.replace(':', '-').replace('@', '-')}-{round_}.h5"
                started = time.perf_counter()
                summary = encode(cases, out, config, progress=None)
                elapsed = time.perf_counter() - started
                slices = summary.slices_encoded
                if round_:
                    rates[spec].append(slices / elapsed)
        embeddings = {}
        for spec in specs:
            with h5py.File(tmp / f"{spec.replace(':', '-').replace('@', '-')}-{args.repeats}.h5") as f:
                embeddings[spec] = f["embeddings"][:]
    rate = {s: statistics.median(v) for s, v in rates.items()}
    result = {
        "benchmark": "encode-engines", "backbone": backbone.name,
        "weights": "given" if args.checkpoint else ("bundled" if backbone.bundled_checkpoint else "random"),
        "slices": slices, "cases": len(cases), "rounds": args.repeats,
        "engines": {s: {"pipeline_slices_per_s": round(rate[s], 4), "runs_slices_per_s": [round(r, 4) for r in rates[s]],
                        "speedup_over_torch": round(rate[s] / rate["torch"], 3),
                        "max_abs_difference_from_torch": float(np.abs(embeddings[s] - embeddings["torch"]).max())}
                    for s in specs},
        "machine": machine(torch.device("cpu")), "embedcache": __version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    print(json.dumps(result, indent=2))
    if not args.no_save:
        save(result, f"encode-engines-{backbone.name}-cpu-{result['date'][:10]}")
    return result


if __name__ == "__main__":
    main()
