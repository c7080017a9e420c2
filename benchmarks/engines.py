"""Which engine runs the image encoder fastest on this CPU, and what does each cost in embeddings and Dice?

Engines (``--engines``; ``ENGINE:bf16`` for reduced precision, ``ENGINE@N`` for N slices at once,
else as many as the engine's own measurement chose): ``torch`` (eager PyTorch, the reference),
``onnxruntime``, ``openvino``, ``openvino:bf16``, ``openvino@1``. All in one run, on the same input:

* **encoder**: the same preprocessed slices (windowed phantom CT) through each engine's encoder, in
  one process, alternating engine by engine (torch · onnxruntime · openvino · torch ...), so drift of
  a shared machine hits every engine alike, each fed as many slices a call as it encodes at once
  (its streams, recorded). Per engine: seconds per slice (median over rounds), the
  ratio of eager torch's time to its own (> 1: faster than torch), the largest absolute difference
  of its embeddings from torch's, the resident memory building and running it added, and the
  export-and-build seconds (once per backbone and weights, in a temporary cache folder here).
* **--dice DATA --run RUN**: DATA's test cases (``imagesTs/``) encoded by each engine, then scored
  under box3d with RUN's fine-tuned decoder and the vanilla one: Dice per gland, and its difference
  from torch fp32's. The accuracy cost of reduced precision, measured.
* **--predict DATA --run RUN**: ``embedcache predict`` of DATA's first test case (both glands, box3d
  from its label map) end to end, a fresh process per run, alternating engines over ``--rounds``:
  wall seconds per case (process start to exit: imports, loading, reading, encoding, writing), the
  ratio to torch's, and the Dice per gland of what each wrote (a graph engine runs the mask decoder
  as a graph too) with the voxels where it differs from torch's.

One JSON object under benchmarks/results/ (``--out``) and a markdown table beside it.

    python benchmarks/engines.py --backbones litemedsam,vit_b --slices 4 --rounds 3
    python benchmarks/engines.py --dice BED --run BED_RUN --predict BED --skip-encoder
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from embedcache.cache.preprocess import slice_to_model
from embedcache.io.files import file_sha256
from embedcache.model.backbones import get_backbone, load_backbone, resolve_checkpoint
from embedcache.model.engines import build_encoder, check_engine, installed_engines
from embedcache.synth.phantom import make_case

from common import RESULTS, machine, own_engine_cache, weights_for

#: How --predict starts the command line, in a fresh process each run.
EMBEDCACHE = [sys.executable, "-m", "embedcache"]


def default_specs() -> list[str]:
    """Every engine installed here, and bf16 through OpenVINO where this CPU has bf16 instructions."""
    specs = installed_engines()
    if "openvino" in specs:
        import openvino

        if "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            specs.append("openvino:bf16")
    return specs


def parse_spec(spec: str) -> tuple[str, str]:
    """``openvino:bf16@2`` → ``("openvino", "bf16")``."""
    engine, _, precision = spec.partition("@")[0].partition(":")
    return engine, precision or "fp32"


def spec_streams(spec: str) -> int:
    """``openvino@2`` → 2; 0 (the engine's measured choice) where the spec names none."""
    _, _, streams = spec.partition("@")
    return int(streams) if streams else 0


def slices(n: int, size: int = 512) -> np.ndarray:
    """``n`` windowed axial slices of a phantom case through its glands, as encode feeds them."""
    hu, label, _ = make_case(5)
    zs = np.flatnonzero(np.isin(label, (7, 8)).any(axis=(1, 2)))
    zs = np.resize(zs, n)
    return np.stack([slice_to_model(hu[z], width_hu=350.0, level_hu=50.0, slice_size=size) for z in zs])


def resident_mib() -> float:
    """This process's resident memory now (Linux), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def measure(backbone_name: str, specs: list[str], n: int, rounds: int, folder: Path) -> dict:
    backbone = get_backbone(backbone_name)
    weights = resolve_checkpoint(backbone, weights_for(backbone, folder))
    sha = file_sha256(weights)
    batch = slices(n)
    encoders, build_s, memory = {}, {}, {}
    for spec in specs:
        engine, precision = parse_spec(spec)
        parts, _ = load_backbone(backbone, weights)
        before = resident_mib()
        started = time.perf_counter()
        encoders[spec] = build_encoder(engine, backbone, parts.image_encoder, sha, device=torch.device("cpu"),
                                       batch_size=1, out_dtype=torch.float32, precision=precision,
                                       streams=spec_streams(spec))
        build_s[spec] = round(time.perf_counter() - started, 2)
        encoders[spec](batch[: encoders[spec].batch_size])  # warm-up (every stream): first-call allocations, kernels
        memory[spec] = round(resident_mib() - before, 1)
    def run(encoder):  # as encode feeds it: its batch_size slices a call (a graph engine's streams)
        k = encoder.batch_size
        return torch.cat([encoder(batch[i : i + k]) for i in range(0, n, k)]).numpy()

    reference = run(encoders[specs[0]])
    seconds = {s: [] for s in specs}
    difference = {}
    for _ in range(rounds):
        for spec, encoder in encoders.items():
            started = time.perf_counter()
            out = run(encoder)
            seconds[spec].append((time.perf_counter() - started) / n)
            difference[spec] = float(np.abs(out - reference).max())
    per_slice = {s: statistics.median(v) for s, v in seconds.items()}
    return {
        "checkpoint": str(weights), "slices": n, "rounds": rounds, "threads": torch.get_num_threads(),
        "engines": {s: {"seconds_per_slice": round(per_slice[s], 4), "all_rounds": [round(v, 4) for v in seconds[s]],
                        "speedup_over_torch": round(per_slice["torch"] / per_slice[s], 3),
                        "max_abs_difference_from_torch": difference[s], "build_seconds": build_s[s],
                        # slices at once: eager torch's streams are 0, and it runs one slice a call here
                        "resident_mib_added": memory[s], "streams": encoders[s].streams or 1}
                    for s in specs},
    }


def _summary(report: Path) -> dict:
    summary = json.loads((report / "report.json").read_text())["summary"]
    box3d = summary["box3d"]
    return {label: {model: round(v[model]["dice"]["mean"], 4) for model in ("vanilla", "finetuned") if model in v}
            for label, v in box3d.items()}


def dice_cost(data: Path, run: Path, specs: list[str], tmp: Path) -> dict:
    """Box3d Dice per gland of the test cases of ``data`` encoded by each engine, vanilla and fine-tuned by ``run``."""
    from embedcache.cache.encode import encode
    from embedcache.config import EncodeConfig, ScoreConfig
    from embedcache.evaluation.score import score
    from embedcache.io.datasets import discover_cases
    from embedcache.train.checkpoint import checkpoint_file
    from embedcache.train.decoders import load_trained_decoder

    trained = load_trained_decoder(checkpoint_file(run))
    signature = trained.signature
    cases = [c for c in discover_cases(data) if c.subset == "test"]
    base = EncodeConfig(backbone=signature.backbone, preprocess=signature.preprocess, labels=signature.labels,
                        embedding_dtype=signature.embedding_dtype, device="cpu",
                        zoom_mm=0.0)  # whole slices: what each engine encodes is timed
    out = {"data": str(data), "run": str(run), "cases": [c.name for c in cases], "protocol": "box3d", "engines": {}}
    for spec in specs:
        engine, precision = parse_spec(spec)
        name = spec.replace(":", "-").replace("@", "-")
        cache = tmp / f"dice-{name}.h5"
        started = time.perf_counter()
        encode(cases, cache, replace(base, engine=engine, precision=precision, streams=spec_streams(spec)))
        encode_s = time.perf_counter() - started
        report = tmp / f"report-{name}"
        # the decoder alone, not the run: the cases scored are this cache's imagesTs/ ones, whatever the run's split
        score(ScoreConfig(cache=str(cache), decoder=str(checkpoint_file(run)), prompts=("box3d",), device="cpu"), report)
        out["engines"][spec] = {"dice": _summary(report), "encode_seconds": round(encode_s, 1)}
        print(spec, json.dumps(out["engines"][spec]), flush=True)
    reference = out["engines"][specs[0]]["dice"]
    for spec, figures in out["engines"].items():
        figures["dice_difference_from_torch"] = {
            label: {model: round(value - reference[label][model], 4) for model, value in by.items()}
            for label, by in figures["dice"].items()}
    return out


def predict_pace(data: Path, run: Path, specs: list[str], rounds: int, tmp: Path, *, warmup: int = 1) -> dict:
    """Wall seconds of ``embedcache predict`` of one test case (both glands, box3d) per engine, a fresh process each,
    and the Dice per gland of what each wrote (the encoder and, on a graph engine, the decoder as graphs)."""
    from embedcache.evaluation.metrics import dice
    from embedcache.io.datasets import discover_cases
    from embedcache.io.volumes import read_label

    case = next(c for c in discover_cases(data) if c.subset == "test")
    seconds = {s: [] for s in specs}
    lines, labels = {}, {}
    for number in range(rounds + warmup):  # the warm-up rounds (exports, first compilation) are not counted
        for spec in specs:
            engine, precision = parse_spec(spec)
            out = tmp / f"predict-{spec.replace(':', '-').replace('@', '-')}-{number}"
            command = [*EMBEDCACHE, "predict", str(case.image), "--from-labels", str(case.label),
                       "--run", str(run), "--out", str(out), "--device", "cpu", "--engine", engine, "--encoder-precision",
                       precision, "--streams", str(spec_streams(spec)), "--no-progress"]
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
            elapsed = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"predict with {spec} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
            if number >= warmup:
                seconds[spec].append(elapsed)
            lines[spec] = done.stdout.strip().splitlines()[-1]
            if number == rounds + warmup - 1:  # what the last round wrote is scored
                labels[spec] = read_label(out / f"{case.name}.nii.gz").array
    per_case = {s: statistics.median(v) for s, v in seconds.items()}
    truth = read_label(case.label).array
    glands = [label for label in (7, 8) if (truth == label).any()]
    return {"case": case.name, "rounds": rounds, "labels": glands, "engines": {
        s: {"seconds_per_case": round(per_case[s], 2), "all_rounds": [round(v, 2) for v in seconds[s]],
            "speedup_over_torch": round(per_case[specs[0]] / per_case[s], 3), "last_line": lines[s],
            "dice": [round(dice(labels[s] == g, truth == g), 4) for g in glands],
            "voxels_differing_from_torch": int((labels[s] != labels[specs[0]]).sum())}
        for s in specs}}


def table(result: dict) -> str:
    rows = [f"Engines on {result['machine']['cpu']} ({result['machine']['cpu_cores']} cores), "
            f"{result['date'][:10]}; ratios measured in one run. Δ: per gland (labels in order), Dice of the "
            "engine's cache minus eager torch's.", ""]
    for name, figures in result.get("backbones", {}).items():
        rows += [f"**{name} encoder** ({figures['slices']} slices, {figures['rounds']} rounds, median):", "",
                 "| engine | at once | s/slice | × torch | max abs diff | memory added MiB | export+build s |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        rows += [f"| {s} | {v.get('streams', 1)} | {v['seconds_per_slice']:.3f} | {v['speedup_over_torch']:.2f} | "
                 f"{v['max_abs_difference_from_torch']:.1e} | {v['resident_mib_added']:.0f} | {v['build_seconds']:.1f} |"
                 for s, v in figures["engines"].items()]
        rows.append("")
    if "dice" in result:
        dice = result["dice"]
        rows += [f"**Box3d Dice, {len(dice['cases'])} test cases of {dice['data']}**, decoder {dice['run']} "
                 "(fine-tuned / vanilla):", "", "| engine | " + " | ".join(
                     f"label {label}" for label in next(iter(dice["engines"].values()))["dice"])
                 + " | Δ fine-tuned vs torch | Δ vanilla vs torch |",
                 "| --- |" + " --- |" * (2 + len(next(iter(dice["engines"].values()))["dice"]))]
        for spec, v in dice["engines"].items():
            cells = [f"{by.get('finetuned', float('nan')):.4f} / {by['vanilla']:.4f}" for by in v["dice"].values()]
            deltas = [" / ".join(f"{by[model]:+.4f}" for by in v["dice_difference_from_torch"].values() if model in by)
                      for model in ("finetuned", "vanilla")]
            rows.append(f"| {spec} | " + " | ".join(cells + deltas) + " |")
        rows.append("")
    if "predict" in result:
        pace = result["predict"]
        rows += [f"**predict, one case end to end** ({pace['case']}, both glands, box3d, fresh process, "
                 f"median of {pace['rounds']}):", "", "| engine | s/case | × torch | Dice " +
                 " / ".join(f"label {g}" for g in pace.get("labels", [])) + " | voxels ≠ torch's |",
                 "| --- | --- | --- | --- | --- |"]
        rows += [f"| {s} | {v['seconds_per_case']:.1f} | {v['speedup_over_torch']:.2f} | "
                 f"{' / '.join(f'{d:.4f}' for d in v.get('dice', []))} | {v.get('voxels_differing_from_torch', '')} |"
                 for s, v in pace["engines"].items()]
        rows.append("")
    return "\n".join(rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="litemedsam")
    parser.add_argument("--engines", default=None, help="comma list; default: every engine installed, and openvino:bf16")
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-encoder", action="store_true", help="only --dice and --predict")
    parser.add_argument("--dice", type=Path, default=None, help="a dataset folder whose imagesTs/ cases are scored")
    parser.add_argument("--predict", type=Path, default=None, help="a dataset folder whose first test case is predicted")
    parser.add_argument("--run", type=Path, default=None, help="the fine-tuned run --dice and --predict use")
    parser.add_argument("--warmup", type=int, default=1, help="--predict rounds run first and not counted")
    parser.add_argument("--name", default="cpu", help="results file: engines-NAME-DATE.json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    specs = [e.strip() for e in args.engines.split(",") if e.strip()] if args.engines else default_specs()
    specs = ["torch"] + [s for s in specs if s != "torch"]  # the reference first
    for spec in specs:
        engine, precision = parse_spec(spec)
        check_engine(engine, "cpu", precision)
    if (args.dice or args.predict) and not args.run:
        parser.error("--dice and --predict need --run")
    result = {"benchmark": "engines", "machine": machine(torch.device("cpu")),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "specs": specs}
    with tempfile.TemporaryDirectory() as tmp, own_engine_cache(tmp):  # fresh exports, timed
        tmp = Path(tmp)
        if not args.skip_encoder:
            result["backbones"] = {}
            for name in [b.strip() for b in args.backbones.split(",") if b.strip()]:
                result["backbones"][name] = measure(name, specs, args.slices, args.rounds, tmp)
                print(name, json.dumps(result["backbones"][name]["engines"]), flush=True)
        if args.dice:
            result["dice"] = dice_cost(args.dice, args.run, specs, tmp)
        if args.predict:
            result["predict"] = predict_pace(args.predict, args.run, specs, args.rounds, tmp, warmup=args.warmup)
            print(json.dumps(result["predict"]), flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"engines-{args.name}-{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(result) + "\n")
    print(table(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
