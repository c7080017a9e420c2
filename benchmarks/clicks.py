"""Does training with clicks pay, and does it cost box3d anything? Box-only against click-trained decoders.

Each recipe is fine-tuned on the same cache and split for the same epochs (``--prompts box`` is the
default recipe; ``box+points`` and ``mixed`` add clicks), then scored by ``embedcache score`` on the
split's **test** cases under ``oracle``, ``box3d`` and ``clicks`` (box3d and up to ``--clicks``
corrective clicks per gland, each on the most interior voxel of the largest 3-D error). Reported
per gland: vanilla and fine-tuned Dice after 0, 1, 3 and 5 clicks, the area under Dice per click,
and box3d's Dice and NSD. One JSON and one markdown table under benchmarks/results/.

    python benchmarks/clicks.py BED/cache.h5 --split SPLIT.json --work /tmp/clicks --epochs 2 --name bed

``--work`` keeps every run (WORK/RECIPE) and report (WORK/score-RECIPE): an interrupted study resumes,
and a finished run or report is read, not redone.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from embedcache.config import FinetuneConfig, ProtocolSettings, ScoreConfig, load_config
from embedcache.evaluation.score import score
from embedcache.runtime.devices import pick_device
from embedcache.train.finetune import finetune
from embedcache.train.runs import LOG

from common import RESULTS, machine

#: name → ``finetune --prompts``
RECIPES = {"box": "box", "box+points": "box+points", "mixed": "mixed"}
#: The click counts the table shows (the JSON has every one).
SHOWN = (0, 1, 3, 5)


def trained(run: Path, epochs: int) -> bool:
    """The run in ``run`` has finished ``epochs`` epochs (or stopped early): its log says so."""
    log = run / LOG
    if not (run / "decoder.safetensors").is_file() or not log.is_file():
        return False
    rows = log.read_text().splitlines()[1:]
    return len(rows) - 1 >= epochs


def train(cache: Path, split: Path, run: Path, prompts: str, *, epochs: int, seed: int) -> float:
    """Fine-tune (or resume) one recipe; the seconds it took (0 when it was already there)."""
    if trained(run, epochs):
        return 0.0
    config = FinetuneConfig(cache=str(cache.resolve()), epochs=epochs, seed=seed, split=str(split.resolve()),
                            patience=epochs, prompts=prompts)
    started = time.perf_counter()
    finetune(config, run, resume=(run / "last.safetensors").is_file(), progress=None)
    return time.perf_counter() - started


def scored(cache: Path, run: Path, out: Path, *, clicks: int) -> dict:
    """``embedcache score --protocols oracle,box3d,clicks`` of ``run`` on the test cases, or the report
    already in ``out`` when it was made with the same settings."""
    config = ScoreConfig(cache=str(cache), run=str(run), cases="test", prompts=("oracle", "box3d", "clicks"),
                         protocol=ProtocolSettings(clicks=clicks))
    if (out / "report.json").is_file() and (out / "config.json").is_file():
        held = load_config(ScoreConfig, out / "config.json")
        report = json.loads((out / "report.json").read_text())
        if (held.prompts, held.protocol, report["case_set"]) == (config.prompts, config.protocol, "test") \
                and Path(held.cache).resolve() == cache.resolve() and Path(held.run).resolve() == run.resolve():
            return report
    score(config, out, progress=None)
    return json.loads((out / "report.json").read_text())


def digest(report: dict, clicks: int) -> dict:
    """Per model and gland: oracle Dice, box3d Dice and NSD, Dice and NSD after each click, and the AUC (means)."""
    out: dict = {}
    for label, by_model in report["summary"]["clicks"].items():
        for model, values in by_model.items():
            oracle = report["summary"]["oracle"][label][model]
            box3d = report["summary"]["box3d"][label][model]
            out.setdefault(model, {})[report["labels"][label]] = {
                "oracle_dice": oracle["dice"]["mean"], "box3d_dice": box3d["dice"]["mean"],
                "box3d_nsd": box3d["nsd"]["mean"],
                "dice_after": [values[f"dice@{k}"]["mean"] for k in range(clicks + 1)],
                "nsd_after": [values[f"nsd@{k}"]["mean"] for k in range(clicks + 1)],
                "dice_after_sd": [values[f"dice@{k}"]["sd"] for k in range(clicks + 1)],
                "dice_auc": values["dice_auc"]["mean"], "cases": values["dice"]["n"],
            }
    return out


def table(results: dict) -> str:
    """Markdown: per recipe and model, Dice (right / left) after 0, 1, 3, 5 clicks, the AUC and box3d's NSD."""
    shown = [k for k in SHOWN if k <= results["clicks"]]
    head = " | ".join(f"{k} click{'s' if k != 1 else ''}" for k in shown)
    lines = [f"| decoder | {head} | AUC | `box3d` NSD |", "| --- |" + " --- |" * (len(shown) + 2)]
    rows = {}
    for recipe, entry in results["recipes"].items():
        for model, glands in entry["glands"].items():
            name = "vanilla" if model == "vanilla" else f"`--prompts {recipe}`"
            if name in rows:
                continue
            right, left = glands["right adrenal"], glands["left adrenal"]
            cells = [f"{right['dice_after'][k]:.3f} / {left['dice_after'][k]:.3f}" for k in shown]
            rows[name] = (f"| {name} | {' | '.join(cells)} | {right['dice_auc']:.3f} / {left['dice_auc']:.3f} | "
                          f"{right['box3d_nsd']:.3f} / {left['box3d_nsd']:.3f} |")
    return "\n".join(lines + list(rows.values())) + "\n"


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # embedcache's notes
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path)
    parser.add_argument("--split", type=Path, required=True, help="split file with train, val and test cases")
    parser.add_argument("--work", type=Path, required=True, help="runs and reports, kept to resume")
    parser.add_argument("--recipes", default="box,box+points", help=f"comma-separated, from {', '.join(RECIPES)}")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="bed", help="what the cache holds, for the result's file name")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and the table")
    args = parser.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not recipes or any(r not in RECIPES for r in recipes):
        sys.exit(f"--recipes {args.recipes}: choose from {', '.join(RECIPES)}")
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"benchmark": "clicks", "cache": str(args.cache), "split": str(args.split), "epochs": args.epochs,
               "clicks": args.clicks, "seed": args.seed, "machine": machine(pick_device("auto")),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cases": "test", "recipes": {}}
    for recipe in recipes:
        run = args.work / recipe
        seconds = train(args.cache, args.split, run, RECIPES[recipe], epochs=args.epochs, seed=args.seed)
        started = time.perf_counter()
        report = scored(args.cache, run, args.work / f"score-{recipe}", clicks=args.clicks)
        results["recipes"][recipe] = {
            "finetune": {"prompts": RECIPES[recipe], "epochs": args.epochs, "seconds_this_call": round(seconds, 1)},
            "checkpoint": report["made_by"], "case_names": report["case_names"],
            "score_seconds_this_call": round(time.perf_counter() - started, 1),
            "glands": digest(report, args.clicks),
        }
        print(f"{recipe}: done")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    out = args.out / f"clicks-{args.name}-cpu-{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    (out.with_suffix(".md")).write_text(table(results))
    print(table(results))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
