"""The demo's whole job on a GPU, as a user runs it, checked against the CPU: phantom (6 training,
2 test cases) → encode → finetune (5 epochs) → score, each command timed; and one case encoded on
the CPU in float32, so the GPU's fp16-autocast embeddings and its vanilla Dice can be compared.

    python benchmarks/gpu/check.py --out DIR            # on a CUDA machine (benchmarks/gpu/run.sh)
    python benchmarks/gpu/check.py --device cpu --quick # here: the script itself, smallest sizes

Prints and saves DIR/check.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from embedcache.cache.store import Cache


def run(*args, timings: dict, name: str) -> None:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "embedcache", *map(str, args)], capture_output=True, text=True)
    timings[name] = round(time.perf_counter() - started, 2)
    sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
    if done.returncode:
        raise SystemExit(f"embedcache {' '.join(map(str, args))}: exit {done.returncode}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--quick", action="store_true", help="2 + 1 small cases, 1 epoch: checks the script, not the GPU")
    args = parser.parse_args(argv)
    train, test, epochs = (2, 1, 1) if args.quick else (6, 2, 5)
    timings: dict = {}
    with tempfile.TemporaryDirectory(prefix="embedcache-gpu-check-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        run("phantom", data, "--cases", train, "--test-cases", test, "--seed", 0, "--no-progress",
            *(["--size", 128] if args.quick else []),
            timings=timings, name="phantom")
        dev = ["--device", args.device, "--no-progress"]
        run("encode", data, "--out", tmp / "cache.h5", *dev, timings=timings, name="encode")
        run("finetune", tmp / "cache.h5", "--out", tmp / "run", "--epochs", epochs, "--seed", 0, *dev,
            timings=timings, name="finetune")
        run("score", tmp / "cache.h5", "--run", tmp / "run", "--out", tmp / "report", *dev, timings=timings, name="score")
        report = json.loads((tmp / "report" / "report.json").read_text())
        first = sorted((data / "imagesTr").iterdir())[0]
        label = data / "labelsTr" / first.name.replace("_0000", "")
        run("encode", "--image", first, "--label", label, "--out", tmp / "cpu.h5", "--dtype", "float32",
            "--device", "cpu", "--no-progress", timings=timings, name="encode_one_case_cpu_fp32")
        with Cache(tmp / "cache.h5") as gpu, Cache(tmp / "cpu.h5") as cpu:
            record = gpu.case(cpu.cases[0].name)
            rows = slice(record.first_row, record.first_row + record.n_rows)
            a = gpu.embeddings[rows].astype(np.float32)
            b = cpu.embeddings[:].astype(np.float32)
            with open(tmp / "run" / "log.csv") as log:
                epochs_log = log.read()
        error = np.abs(a - b)
        result = {
            "device": args.device,
            "timings_s": timings,
            "embedding_vs_cpu_fp32": {
                "slices": int(len(a)),
                "max_abs": float(error.max()),
                "mean_abs": float(error.mean()),
                "relative_rms": float(np.sqrt((error**2).mean() / (b**2).mean())),
            },
            "case_set": report["case_set"],
            "made_by": report["made_by"],
            "summary": report["summary"],
            "log_csv": epochs_log,
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("summary", "log_csv", "made_by")}, indent=2))
    for protocol, by_label in result["summary"].items():
        print(protocol, "  ".join(f"label {label}: Dice {m['vanilla']['dice']['mean']:.3f} → {m['finetuned']['dice']['mean']:.3f}"
                                  for label, m in by_label.items()))
    return result


if __name__ == "__main__":
    main()
