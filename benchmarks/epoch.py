"""What does the cache buy? Seconds per training epoch over the same prompts, in one process:

  cached    (a) an epoch of `finetune` itself, reading the embedding cache;
  uncached  (b) the reference notebook's way: every step runs the frozen image encoder on the
                step's slices, then the same decoder step;
  bound     (c) the compute bound: the decoder's forward + backward + AdamW step on batches that
                already sit in memory, nothing else.
Each epoch of (a) is followed by one of (c) and one of (b), so drift of a shared machine hits all
three alike; each figure is the fastest epoch after the first.
(a)/(c) near 1 means finetune's data path costs nothing; (b)/(a) is the speed-up from the cache.
--extra-batch-sizes also times finetune's own epoch at larger batches (a GPU's prompts per second);
--compile-batch-sizes times it with --compile between two eager runs (does torch.compile pay here?).
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
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from embedcache.cache.encode import encode, load_encoder
from embedcache.cache.pipeline import prepare_case
from embedcache.cache.plan import plan_case
from embedcache.cache.store import open_cache
from embedcache.config import EncodeConfig, FinetuneConfig
from embedcache.io.datasets import discover_cases
from embedcache.io.volumes import source_digest
from embedcache.model.backbones import get_backbone
from embedcache.runtime.devices import pick_device
from embedcache.synth.phantom import limit_target_slices, write_phantom
from embedcache.train import finetune as train
from embedcache.train.cases import split_cases
from embedcache.train.data import Batch, case_sets
from embedcache.train.runs import SPLIT
from embedcache.train.trainer import build_trainer

from common import machine, phantom_config, save, weights_for


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_cost(config: FinetuneConfig, folder: Path, n_prompts: int) -> dict:
    """finetune eager, with --compile, then eager again (drift of the machine cancels): the fastest epoch
    after the first of each, and the compile's one-off cost (its first epoch less eager's first)."""
    epochs = {False: [], True: []}
    try:
        for i, compile_ in enumerate((False, True, False)):
            run = train.finetune(replace(config, compile=compile_), folder / f"run-{i}", progress=None)
            epochs[compile_].append([record.seconds for record in run.history])
    except Exception as error:  # a compile that fails on this machine is a finding; keep the other figures
        return {"error": f"{type(error).__name__}: {error}"[:400]}
    eager = min(min(seconds[1:]) for seconds in epochs[False])
    compiled = min(epochs[True][0][1:])
    first_eager = sum(seconds[0] for seconds in epochs[False]) / len(epochs[False])
    return {"eager_epoch_s": round(eager, 4), "compiled_epoch_s": round(compiled, 4),
            "compiled_over_eager": round(compiled / eager, 4), "compile_s": round(epochs[True][0][0] - first_eager, 2),
            "compiled_prompts_per_s": round(n_prompts / compiled, 1),
            "all_epoch_s": {"eager": epochs[False], "compiled": epochs[True]}}


def bench_backbone(name: str, *, cases: int, per_case: int, batch_size: int, device: torch.device, tmp: Path,
                   seed: int, epochs: int, phantom_size: int = 512, extra_batch_sizes: tuple[int, ...] = (),
                   compile_batch_sizes: tuple[int, ...] = ()) -> dict:
    backbone = get_backbone(name)
    checkpoint = weights_for(backbone, tmp)
    # No margin slices: they hold no prompt, and the uncached way below encodes exactly the prompted slices.
    enc_config = EncodeConfig(backbone=name, checkpoint=str(checkpoint) if checkpoint else None, device=str(device),
                              margin_slices=0, engine="torch", zoom_mm=0.0)  # the epoch is timed, not the encoder

    data_dir = tmp / f"data-{name}"
    write_phantom(data_dir, cases=cases, seed=seed, config=phantom_config(phantom_size))
    limit_target_slices(data_dir, per_case=per_case)
    sources = discover_cases(data_dir)
    cache_path = tmp / f"{name}.h5"
    encode(sources, cache_path, enc_config, progress=None)
    config = FinetuneConfig(
        cache=str(cache_path), epochs=epochs, batch_size=batch_size, device=str(device),
        checkpoint=str(checkpoint) if checkpoint else None, val_fraction=0.25, seed=seed,
    )

    with open_cache(cache_path) as cache:
        train_names, _ = split_cases([c.name for c in cache.cases], val_fraction=config.val_fraction, seed=seed)
        slice_size = cache.signature.slice_size
        train_set = case_sets(cache, {"train": train_names}, box_scale=backbone.box_scale(slice_size), device=device,
                              resident="device")["train"]
        order = np.random.default_rng(0).permutation(len(train_set))
        batches = [np.sort(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
        built = [train_set.batch(b) for b in batches]
    n_prompts = sum(len(b.boxes) for b in built)
    images = np.concatenate([
        prepare_case(plan_case(c, enc_config, source_digest(c.image, c.label)), enc_config).images
        for c in sources if c.name in train_names
    ])
    assert len(images) == len(train_set)

    # (b) and (c) share one trainer (the factory finetune uses), stepped on the batches built above.
    trainer = build_trainer(backbone, checkpoint, config, device=device, total_steps=len(batches) * epochs)
    trainer.model.train()
    step = trainer.step
    encoder = load_encoder(enc_config, device=device)
    encoder(images[: encoder.batch_size])  # warm-up; on CUDA the batch-size probe runs first (and resets peak memory)
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
            emb = torch.cat([encoder(images[slices_][i : i + chunk]) for i in range(0, len(slices_), chunk)])
            _, local = train_set.prompts.of_slices(slices_)
            step(Batch(emb[torch.from_numpy(local).to(device)], b.boxes, b.targets, b.masks), len(b.boxes))

    def after_finetune_epoch(record):  # interleaved, so drift of a shared machine hits all three alike
        timed("bound", bound_epoch)
        timed("uncached", uncached_epoch)

    # (a) finetune's own epochs; each minimum skips the first epoch, whose first-call costs differ.
    result = train.finetune(config, tmp / f"run-{name}", progress=None,
                            on_epoch=after_finetune_epoch)
    assert json.loads((tmp / f"run-{name}" / SPLIT).read_text())["train"] == train_names
    cached_s = min(record.seconds for record in result.history[1:])
    bound_s, uncached_s = min(times["bound"][1:]), min(times["uncached"][1:])
    # finetune alone at larger batches: what a GPU makes of fewer, larger steps
    at_batch = {}
    for size in extra_batch_sizes:
        run = train.finetune(replace(config, batch_size=size, epochs=max(epochs, 4)), tmp / f"run-{name}-b{size}",
                             progress=None)
        seconds = min(record.seconds for record in run.history[1:])
        at_batch[str(size)] = {"epoch_s": round(seconds, 4), "prompts_per_s": round(n_prompts / seconds, 1)}
    compiled = {str(size): compile_cost(replace(config, batch_size=size, epochs=max(epochs, 2)),
                                        tmp / f"compile-{name}-b{size}", n_prompts) for size in compile_batch_sizes}
    return {
        "slices": int(len(train_set)),
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
        "finetune_at_batch_size": at_batch,
        "compile_at_batch_size": compiled,
        "weights": "random" if checkpoint else "bundled",
        "all_epoch_s": {"cached": [round(r.seconds, 3) for r in result.history],
                        "bound": [round(t, 3) for t in times["bound"]],
                        "uncached": [round(t, 3) for t in times["uncached"]]},
    }


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(b) for b in text.split(",") if b)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="litemedsam,vit_b")
    parser.add_argument("--cases", type=int, default=4, help="phantom cases (one in four is held out)")
    parser.add_argument("--slices-per-case", type=int, default=6, help="target slices kept per case")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each kind; the first is not timed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--extra-batch-sizes", default="",
                        help="comma-separated: also time finetune's epoch alone at these batch sizes (slices per step)")
    parser.add_argument("--compile-batch-sizes", default="",
                        help="comma-separated: time finetune with --compile against eager at these batch sizes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phantom-size", type=int, default=512, help="axial pixels of the synthetic CT")
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
                                       epochs=args.epochs, phantom_size=args.phantom_size,
                                       extra_batch_sizes=_sizes(args.extra_batch_sizes),
                                       compile_batch_sizes=_sizes(args.compile_batch_sizes))
            if device.type == "cuda":
                out[name]["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            out[name]["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            print(json.dumps({name: out[name]}), file=sys.stderr)
    print(json.dumps(out, indent=2))
    if not args.no_save:
        save(out, f"epoch-{'-'.join(args.backbones.split(','))}-{device.type}-{out['date'][:10]}")
    return out


if __name__ == "__main__":
    main()
