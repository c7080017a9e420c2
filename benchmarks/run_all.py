"""Every figure the README quotes, in one command: encode and epoch benchmarks per backbone, the
Dice cost of a float16 cache against float32, and peak memory; one JSON plus a markdown table,
with the machine (and GPU) named.

    python benchmarks/run_all.py --device cuda --out benchmarks/results        # a GPU, < 8 minutes on an H100
    python benchmarks/run_all.py --device cpu --out benchmarks/results --quick # a CPU, fewer slices

Needs only what a CUDA machine with PyTorch has plus embedcache's own dependencies: no network,
LiteMedSAM's bundled weights and random weights for ViT-B (timing does not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import encode as encode_bench
import engines as engines_bench
import epoch as epoch_bench
import torch

from embedcache.cache.encode import encode
from embedcache.config import EncodeConfig, ScoreConfig
from embedcache.evaluation.score import score
from embedcache.io.datasets import discover_cases
from embedcache.model.backbones import get_backbone
from embedcache.runtime.devices import pick_device
from embedcache.synth.phantom import limit_target_slices, write_phantom

from common import RESULTS, machine, own_engine_cache, phantom_config, weights_for

#: (encode slices, epoch cases, epoch slices per case) per device kind: sized to finish in minutes.
SIZES = {"cuda": (256, 8, 24), "cpu": (24, 3, 4), "quick": (8, 2, 2)}


def dtype_cost(backbone: str, *, device: torch.device, tmp: Path, cases: int, per_case: int, size: int) -> dict:
    """Mean 3-D Dice (oracle boxes, vanilla decoder) from a float16 cache and from a float32 one."""
    folder = tmp / f"dtype-{backbone}"
    write_phantom(folder, cases=cases, seed=5, config=phantom_config(size))
    limit_target_slices(folder, per_case=per_case)
    checkpoint = weights_for(get_backbone(backbone), tmp)
    dice = {}
    for dtype in ("float16", "float32"):
        config = EncodeConfig(backbone=backbone, checkpoint=str(checkpoint) if checkpoint else None, device=str(device),
                              embedding_dtype=dtype, engine="torch", zoom_mm=0.0)
        cache = tmp / f"{backbone}-{dtype}.h5"
        encode(discover_cases(folder), cache, config, progress=None)
        report = score(ScoreConfig(cache=str(cache), prompts=("oracle",), cases="all", device=str(device),
                                   checkpoint=str(checkpoint) if checkpoint else None), tmp / f"report-{backbone}-{dtype}")
        dice[dtype] = {label: by_model["vanilla"]["dice"]["mean"] for label, by_model in report.summary["oracle"].items()}
    worst = max(abs(dice["float16"][k] - dice["float32"][k]) for k in dice["float16"])
    return {"dice_float16": dice["float16"], "dice_float32": dice["float32"], "max_abs_difference": round(worst, 6)}


def _compiled(size: str, figures: dict) -> str:
    if "error" in figures:
        return f"--compile (batch {size}) failed: {figures['error'][:80]}"
    return (f"--compile {figures['compiled_over_eager']:.2f}× eager's epoch (batch {size}; "
            f"compiling {figures['compile_s']:.0f} s)")


def table(result: dict) -> str:
    """The README's markdown rows for one run_all result."""
    m = result["machine"]
    where = m.get("gpu") or f"CPU, {m['cpu']}, {m['cpu_cores']} cores"
    rows = [f"Machine: {where}; torch {m['torch']}; {result['date']}.", "",
            "| backbone | encode: pipeline / bare encoder | epoch: cached / bound | epoch: uncached / cached "
            "| prompts/s (cached) | fp16 − fp32 Dice | peak memory | encoder × eager torch |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, figures in result["backbones"].items():
        enc, ep, dt = figures["encode"], figures["epoch"], figures["dtype"]
        memory = f"RSS {max(enc['peak_rss_mib'], ep['peak_rss_mib']):.0f} MiB"
        prompts = "; ".join([f"{ep['prompts_per_s']:.1f} (batch {ep['batch_size']})"]
                            + [f"{b['prompts_per_s']:.0f} (batch {size})" for size, b in ep.get("finetune_at_batch_size", {}).items()]
                            + [_compiled(size, c) for size, c in ep.get("compile_at_batch_size", {}).items()])
        if "peak_gpu_mib" in ep:
            memory += f", GPU {max(enc.get('peak_gpu_mib', 0), ep['peak_gpu_mib']):.0f} MiB"
        rows.append(
            f"| {name} ({enc['weights']} weights) | {enc['pipeline_slices_per_s']:.2f} / {enc['bare_slices_per_s']:.2f} "
            f"slices/s = **{enc['pipeline_over_bare']:.2f}×** | {ep['cached_s']:.3g} / {ep['bound_s']:.3g} s = "
            f"**{ep['cached_over_bound']:.2f}** | {ep['uncached_s']:.3g} / {ep['cached_s']:.3g} s = "
            f"**{ep['uncached_over_cached']:.1f}×** | {prompts} | {dt['max_abs_difference']:.4f} | {memory} | "
            + (", ".join(f"{spec} {e['speedup_over_torch']:.2f}×" for spec, e in figures.get("engines", {}).items()
                         if spec != "torch") or "—") + " |"
        )
    return "\n".join(rows) + "\n"


def _write(result: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table(result))


def _three_sizes(text: str) -> tuple[int, int, int]:
    try:
        sizes = epoch_bench._sizes(text)
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give three positive integers, e.g. 8,3,2")
    return sizes


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbones", default="litemedsam,vit_b")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="the smallest sizes: a smoke test, not figures to quote")
    parser.add_argument("--sizes", type=_three_sizes, default=None, metavar="SLICES,CASES,PER_CASE",
                        help="encode target slices, epoch cases, epoch slices per case (default: by device, see SIZES)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    slices, cases, per_case = args.sizes or SIZES["quick" if args.quick else device.type]
    size = ["--phantom-size", "128" if args.quick else "512"]
    result = {"benchmark": "run_all", "machine": machine(device), "quick": args.quick,
              "sizes": {"encode_slices": slices, "epoch_cases": cases, "epoch_slices_per_case": per_case},
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "backbones": {}}
    stem = f"run_all-{device.type}{'-quick' if args.quick else ''}-{result['date'][:10]}"
    names = args.backbones.split(",")
    with tempfile.TemporaryDirectory(prefix="embedcache-run-all-") as tmp, own_engine_cache(tmp):
        for name in names:
            print(f"run_all: {name} on {device}", file=sys.stderr)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            figures = {
                "encode": encode_bench.main(["--backbone", name, "--slices", str(slices), "--device", str(device),
                                             "--repeats", "1" if args.quick else "2", "--no-save", *size]),
                "epoch": epoch_bench.main(["--backbones", name, "--cases", str(cases), "--slices-per-case",
                                           str(per_case), "--device", str(device), "--no-save", *size,
                                           *(["--extra-batch-sizes", "32,128"] if device.type == "cuda" else []),
                                           # the decoder is the same network for every backbone: one torch.compile
                                           # figure, last, so a slow compile costs no other figure
                                           *(["--compile-batch-sizes", "32"] if device.type == "cuda" and name == names[-1]
                                             else [])])[name],
                "dtype": dtype_cost(name, device=device, tmp=Path(tmp), cases=2, per_case=per_case, size=int(size[1])),
            }
            if device.type == "cpu":  # the encoder in every engine installed here, side by side
                specs = engines_bench.default_specs()
                if args.quick:  # one slice at a time: no measurement of how many at once runs best
                    specs = [s if s == "torch" else f"{s}@1" for s in specs]
                figures["engines"] = engines_bench.measure(name, specs, 2 if args.quick else 4, 2 if args.quick else 3,
                                                           Path(tmp))["engines"]
            figures["encode"].pop("machine", None)
            result["backbones"][name] = figures
            _write(result, args.out, stem)  # after each backbone: a run cut short keeps what it measured
    print(table(result))
    print(f"saved {args.out / stem}.json and .md", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
