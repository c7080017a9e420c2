"""Which training makes the decoder best at what the 3-D box protocol feeds it?

Fine-tunes the decoder on one cache with each training box jitter, with and without stop prompts
(the slices just beyond each gland, prompted with the neighbour's box, target empty), then scores
every run on the cache's held-out test cases under the oracle and box3d protocols. Accuracy, not
speed: the figures are Dice and NSD, saved as JSON under benchmarks/results/ with the settings.

    python benchmarks/prompts.py demo/cache.h5 --epochs 5 --jitters 0,0.1,0.2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from embedcache.config import FinetuneConfig, ScoreConfig
from embedcache.evaluation.score import score
from embedcache.train.finetune import finetune

from common import machine, save


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--jitters", default="0,0.1,0.2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    out = {"benchmark": "prompts", "cache": str(args.cache), "epochs": args.epochs, "seed": args.seed,
           "machine": machine(torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")),
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "runs": []}
    with tempfile.TemporaryDirectory(prefix="embedcache-prompts-") as tmp:
        for jitter in (float(j) for j in args.jitters.split(",")):
            for stop in (False, True):
                name = f"jitter{jitter:g}" + ("-stop" if stop else "")
                config = FinetuneConfig(cache=str(args.cache), epochs=args.epochs, seed=args.seed, device=args.device,
                                        box_jitter=jitter, stop_prompts=stop)
                result = finetune(config, Path(tmp) / name, progress=None)
                report = score(ScoreConfig(cache=str(args.cache), run=str(Path(tmp) / name),
                                           prompts=("oracle", "box3d"), device=args.device), Path(tmp) / f"{name}-report")
                row = {"run": name, "box_jitter": jitter, "stop_prompts": stop, "best_epoch": result.best_epoch,
                       "val_dice_2d": round(result.best_val_dice, 4), "case_set": report.case_set,
                       "cases": list(report.case_names), "summary": report.summary}
                out["runs"].append(row)
                print(json.dumps({k: row[k] for k in ("run", "best_epoch", "val_dice_2d")}), file=sys.stderr)
    print(json.dumps(out, indent=2))
    if not args.no_save:
        save(out, f"prompts-{out['machine']['device'].split(':')[0]}-{out['date'][:10]}")
    return out


if __name__ == "__main__":
    main()
