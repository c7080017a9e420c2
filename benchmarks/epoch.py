"""What does the cache buy? Seconds per training epoch over the same prompts, in one process:

  cached    (a) an epoch of `finetune` itself, reading the embedding cache;
  uncached  (b) the reference notebook's way: every step runs the frozen image encoder on the
                step's slices, then the same decoder step;
  bound     (c) the compute bound: the decoder's forward + backward + AdamW step on batches that
                already sit in memory, nothing else.
Each epoch of (a) is followed by one of (c) and one of (b), so drift of a shared machine hits all
three alike; each figure is the fastest epoch after the first.
(a)/(c) near 1 means finetune's data path costs nothing; (b)/(a) is the speed-up from the cache.
Prints one JSON object keyed by backbone and saves it under benchmarks/results/.

    python benchmarks/epoch.py --backbones litemedsam --cases 4 --slices-per-case 6
    python benchmarks/epoch.py --backbones vit_b --cases 3 --slices-per-case 3   # random weights
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
from encode import machine  # noqa: E402  (the sibling benchmark's helper)

from embedcache import cache as store  # noqa: E402
from embedcache import train  # noqa: E402
from embedcache.backbones import get_backbone, load_backbone  # noqa: E402
from embedcache.config import EncodeConfig  # noqa: E402
from embedcache.devices import pick_device
from embedcache.encode import Encoder, encode, plan_case, prepare_case  # noqa: E402
from embedcache.phantom import PhantomConfig, limit_target_slices, write_phantom  # noqa: E402
from embedcache.volumes import discover_cases, source_digest  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_backbone(name: str, *, cases: int, per_case: int, batch_size: int, device: torch.device, tmp: Path,
                   seed: int, epochs: int) -> dict:
    backbone = get_backbone(name)
    checkpoint = None
    if backbone.bundled_checkpoint is None:
        torch.manual_seed(0)  # timing only: random weights cost what real ones do
        checkpoint = tmp / f"{name}-random.pth"
        torch.save(backbone.build().state_dict(), checkpoint)
    enc_config = EncodeConfig(backbone=name, checkpoint=str(checkpoint) if checkpoint else None, device=str(device))
    data_dir = tmp / f"data-{name}"
    write_phantom(data_dir, cases=cases, seed=seed, config=PhantomConfig())
    limit_target_slices(data_dir, per_case=per_case)
    sources = discover_cases(data_dir)
    cache_path = tmp / f"{name}.h5"
    encode(sources, cache_path, enc_config, progress=None, log=lambda m: None)

    with store.open_cache(cache_path) as cache:
        train_names, _ = train.split_cases([c.name for c in cache.cases], val_fraction=0.25, seed=seed)
        train_rows = np.concatenate([
            np.arange(c.first_row, c.first_row + c.n_rows) for c in cache.cases if c.name in train_names
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
    images = np.concatenate([
        prepare_case(plan_case(c, enc_config, source_digest(c.image, c.label)), enc_config).images
        for c in sources if c.name in train_names
    ])
    assert len(images) == len(train_rows)

    # (b) and (c) share one decoder and optimizer, stepped on the batches built above.
    parts, _ = load_backbone(backbone, checkpoint)
    model = train.BoxDecoder(parts.prompt_encoder, parts.mask_decoder).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    autocast, scaler = train.autocast_for(device, "auto")
    config = train.FinetuneConfig(
        cache=str(cache_path), epochs=epochs, batch_size=batch_size, device=str(device),
        checkpoint=str(checkpoint) if checkpoint else None, val_fraction=0.25, seed=seed,
    )
    step = train.TrainStep(model, optimizer, scheduler, params, autocast=autocast, scaler=scaler, grad_clip=1.0,
                           micro_batch=train.micro_batch_for(config, device))
    encoder = Encoder(enc_config, device=device)
    encoder(images[:1])  # warm-up
    times = {"bound": [], "uncached": []}

    def timed(kind, run):
        _sync(device)
        started = time.perf_counter()
        run()
        step.end_epoch()
        _sync(device)
        times[kind].append(time.perf_counter() - started)

    def bound_epoch():
        for b in built:
            step(b, len(b.boxes))

    def uncached_epoch():  # the reference notebook's way: the frozen encoder inside every step
        chunk = encoder.batch_size  # the encoder's best batch on this device (1 on CPU)
        for slices_, b in zip(batches, built):
            emb = np.concatenate([encoder(images[slices_][i : i + chunk]) for i in range(0, len(slices_), chunk)])
            emb = torch.from_numpy(emb).to(device)
            _, local = prompts.of_slices(slices_)
            step(train.Batch(emb[torch.from_numpy(local).to(device)], b.boxes, b.targets, b.masks), len(b.boxes))

    def after_finetune_epoch(record):  # interleaved, so drift of a shared machine hits all three alike
        timed("bound", bound_epoch)
        timed("uncached", uncached_epoch)

    # (a) finetune's own epochs; each minimum skips the first epoch, whose first-call costs differ.
    result = train.finetune(config, tmp / f"run-{name}", progress=None, log=lambda m: None,
                            on_epoch=after_finetune_epoch)
    assert json.loads((tmp / f"run-{name}" / train.SPLIT).read_text())["train"] == train_names
    cached_s = min(record.seconds for record in result.history[1:])
    bound_s, uncached_s = min(times["bound"][1:]), min(times["uncached"][1:])
    return {
        "slices": int(len(train_rows)),
        "prompts": int(n_prompts),
        "batch_size": batch_size,
        "epochs_timed": epochs - 1,
        "cached_s": round(cached_s, 4),
        "uncached_s": round(uncached_s, 4),
        "bound_s": round(bound_s, 4),
        "cached_over_bound": round(cached_s / bound_s, 4),
        "uncached_over_cached": round(uncached_s / cached_s, 4),
        "prompts_per_s": round(n_prompts / cached_s, 3),
        "resident": True,
        "weights": "random" if checkpoint else "bundled",
        "all_epoch_s": {"cached": [round(r.seconds, 3) for r in result.history],
                        "bound": [round(t, 3) for t in times["bound"]],
                        "uncached": [round(t, 3) for t in times["uncached"]]},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="litemedsam,vit_b")
    parser.add_argument("--cases", type=int, default=4, help="phantom cases (one in four is held out)")
    parser.add_argument("--slices-per-case", type=int, default=6, help="target slices kept per case")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each kind; the first is not timed")
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
            out[name] = bench_backbone(name, cases=args.cases, per_case=args.slices_per_case,
                                       batch_size=args.batch_size, device=device, tmp=Path(tmp), seed=args.seed,
                                       epochs=args.epochs)
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
