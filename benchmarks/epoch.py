"""What does the cache buy? Seconds per training epoch over the same prompts, in one process:

  cached    (a) an epoch of `finetune` itself, reading the embedding cache (fastest of epochs 2–3);
  uncached  (b) the reference notebook's way: every step runs the frozen image encoder on the
                step's slices, then the same decoder step;
  bound     (c) the compute bound: the decoder's forward + backward + AdamW step on batches that
                already sit in memory, nothing else (fastest of two warm epochs).
(a)/(c) near 1 means finetune's data path costs nothing; (b)/(a) is the speed-up from the cache.
Prints one JSON object keyed by backbone and saves it under benchmarks/results/.

    python benchmarks/encode.py ...   # the other benchmark
    python benchmarks/epoch.py --backbones litemedsam,vit_b --slices 16
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encode import machine, phantom_with_slices  # noqa: E402  (the sibling benchmark's helpers)

from embedcache import cache as store  # noqa: E402
from embedcache import train  # noqa: E402
from embedcache.backbones import get_backbone, load_backbone  # noqa: E402
from embedcache.config import EncodeConfig  # noqa: E402
from embedcache.devices import pick_device
from embedcache.encode import Encoder, encode, plan_case, prepare_case  # noqa: E402
from embedcache.volumes import discover_cases, source_digest  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_backbone(name: str, *, slices: int, batch_size: int, device: torch.device, tmp: Path, seed: int) -> dict:
    backbone = get_backbone(name)
    checkpoint = None
    if backbone.bundled_checkpoint is None:
        torch.manual_seed(0)  # timing only: random weights cost what real ones do
        checkpoint = tmp / f"{name}-random.pth"
        torch.save(backbone.build().state_dict(), checkpoint)
    enc_config = EncodeConfig(backbone=name, checkpoint=str(checkpoint) if checkpoint else None, device=str(device))
    cases = discover_cases(phantom_with_slices(tmp / f"data-{name}", slices, seed, min_cases=3))
    cache_path = tmp / f"{name}.h5"
    encode(cases, cache_path, enc_config, progress=None, log=lambda m: None)

    # (a) finetune's own epochs; the fastest after the first, so first-call allocations are not counted.
    config = train.FinetuneConfig(
        cache=str(cache_path), epochs=3, batch_size=batch_size, device=str(device),
        checkpoint=str(checkpoint) if checkpoint else None, val_fraction=0.34, seed=seed,
    )
    result = train.finetune(config, tmp / f"run-{name}", progress=None, log=lambda m: None)
    cached_s = min(record.seconds for record in result.history[1:])
    split = json.loads((tmp / f"run-{name}" / train.SPLIT).read_text())

    with store.open_cache(cache_path) as cache:
        train_rows = np.concatenate([
            np.arange(c.first_row, c.first_row + c.n_rows) for c in cache.cases if c.name in split["train"]
        ])
        prompts = train.Prompts.from_cache(cache, train_rows)
        data = train.SliceStore(cache, train_rows, device=device, resident=True)
        slice_size = cache.signature["preprocess"]["slice_size"]
        order = np.random.default_rng(0).permutation(len(train_rows))
        batches = [np.sort(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
        built = [
            train.make_batch(data, prompts, b, labels=cache.labels, box_scale=backbone.box_scale(slice_size),
                             slice_size=slice_size)
            for b in batches
        ]
    n_prompts = sum(len(b.boxes) for b in built)

    parts, _ = load_backbone(backbone, checkpoint)
    model = train.BoxDecoder(parts.prompt_encoder, parts.mask_decoder).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    autocast, scaler = train.autocast_for(device, "auto")
    step = train.TrainStep(model, optimizer, scheduler, params, autocast=autocast, scaler=scaler, grad_clip=1.0)

    def bound_epoch() -> float:
        _sync(device)
        started = time.perf_counter()
        for b in built:
            step(b, len(b.boxes))
        step.end_epoch()
        _sync(device)
        return time.perf_counter() - started

    bound_epoch()  # warm-up, as for (a)
    bound_s = min(bound_epoch(), bound_epoch())

    # (b) uncached: the frozen encoder runs on every step's slices, then the same decoder step.
    images = np.concatenate([
        prepare_case(plan_case(c, enc_config, source_digest(c.image, c.label)), enc_config).images
        for c in cases if c.name in split["train"]
    ])
    assert len(images) == len(train_rows)
    encoder = Encoder(enc_config, device=device)
    encoder(images[:1])  # warm-up
    _sync(device)
    started = time.perf_counter()
    for slices_, b in zip(batches, built):
        chunk = encoder.batch_size  # the encoder's best batch on this device (1 on CPU)
        emb = np.concatenate([encoder(images[slices_][i : i + chunk]) for i in range(0, len(slices_), chunk)])
        emb = torch.from_numpy(emb).to(device)
        _, local = prompts.of_slices(slices_)
        step(train.Batch(emb[torch.from_numpy(local).to(device)], b.boxes, b.targets, b.masks), len(b.boxes))
    step.end_epoch()
    _sync(device)
    uncached_s = time.perf_counter() - started

    return {
        "slices": int(len(train_rows)),
        "prompts": int(n_prompts),
        "batch_size": batch_size,
        "cached_s": round(cached_s, 4),
        "uncached_s": round(uncached_s, 4),
        "bound_s": round(bound_s, 4),
        "cached_over_bound": round(cached_s / bound_s, 4),
        "uncached_over_cached": round(uncached_s / cached_s, 4),
        "prompts_per_s": round(n_prompts / cached_s, 3),
        "resident": True,
        "weights": "random" if checkpoint else "bundled",
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="litemedsam,vit_b")
    parser.add_argument("--slices", type=int, default=16, help="at least this many target slices (train + val)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    out = {"benchmark": "epoch", "machine": machine(device),
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    with tempfile.TemporaryDirectory(prefix="embedcache-epoch-") as tmp:
        for name in args.backbones.split(","):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            out[name] = bench_backbone(name, slices=args.slices, batch_size=args.batch_size, device=device,
                                       tmp=Path(tmp), seed=args.seed)
            if device.type == "cuda":
                out[name]["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            out[name]["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            print(json.dumps({name: out[name]}), file=sys.stderr)
    print(json.dumps(out, indent=2))
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"epoch-{'-'.join(args.backbones.split(','))}-{device.type}-{out['date'][:10]}.json"
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"saved {path}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
