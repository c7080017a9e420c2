"""Do clicks correct? Dice and NSD after 0..N corrective clicks per gland, for each decoder and click rule.

Each recipe is fine-tuned on the same cache and split for the same epochs (``--prompts box`` is the
default recipe; ``box+points`` adds clicks drawn from the box-only mask's error; ``interactive`` runs SAM's
rounds, each fed the round before's logits as the mask prompt, with the loss on every round, and
``interactive-last`` on the last round alone). Every decoder (and the released one, ``vanilla``) segments
each gland with ``box3d``, then takes up to ``--clicks`` corrective clicks (each on the most interior voxel
of the largest 3-D error), applied under each ``--rules`` (``local``: the click's slice and at most
``--reach`` slices each way, connected, in the 3-D box; ``walk``: the rule before, the change walked until
it stops), from the same ``box3d`` start. The two ``interactive`` variants are compared on the split's
**val** cases (Dice after the last click, both glands, ``local``); the one chosen and the others are
reported on its **test** cases. Also recorded: each recipe's seconds and prompts per second per epoch, and
per click the decodes and seconds it cost. One JSON and one markdown table under benchmarks/results/.

    python benchmarks/clicks.py BED/cache.h5 --split SPLIT.json --work /tmp/clicks --epochs 1 --name bed

``--work`` keeps every run (WORK/RECIPE) and score (WORK/RECIPE-SET-RULE.json): an interrupted study resumes,
and a finished run or score is read, not redone.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from embedcache.cache.store import open_cache
from embedcache.config import REFINES, FinetuneConfig, ProtocolSettings
from embedcache.evaluation import protocols
from embedcache.evaluation.metrics import gland_metrics
from embedcache.runtime.devices import pick_device
from embedcache.train.finetune import finetune

from common import RESULTS, decoded_cases, machine, write_result

#: ``--reach``'s default, the clicks protocol's: score files of another reach carry it in their names.
REACH = ProtocolSettings().reach

#: name → the ``finetune`` fields of the recipe (``--rounds`` joins the interactive ones); vanilla: not trained.
RECIPES = {
    "vanilla": None,
    "box": {"prompts": "box"},
    "box+points": {"prompts": "box+points"},
    "interactive": {"prompts": "interactive", "round_loss": "every"},
    "interactive-last": {"prompts": "interactive", "round_loss": "last"},
}
#: The recipes val chooses between (the loss on every round or on the last).
CANDIDATES = ("interactive", "interactive-last")
#: The click counts the table shows (the JSON has every one).
SHOWN = (0, 1, 3, 5)


def train(cache: Path, split: Path, run: Path, fields: dict, *, epochs: int, seed: int, rounds: int) -> dict:
    """Fine-tune one recipe (or read the finished run): its epochs' seconds and prompts per second."""
    done = run / "done.json"
    if not done.is_file():
        extra = {"rounds": rounds} if fields.get("prompts") == "interactive" else {}
        config = FinetuneConfig(cache=str(cache.resolve()), epochs=epochs, seed=seed, split=str(split.resolve()),
                                patience=epochs, **fields, **extra)
        started = time.perf_counter()
        result = finetune(config, run, resume=(run / "last.safetensors").is_file(), progress=None)
        done.write_text(json.dumps({
            **fields, **extra, "epochs": epochs, "best_epoch": result.best_epoch,
            "val_dice_2d": round(result.best_val_dice, 4), "train_seconds": round(time.perf_counter() - started, 1),
            "seconds_per_epoch": [round(h.seconds, 1) for h in result.history],
            "prompts_per_s": [round(h.prompts_per_s, 2) for h in result.history]}) + "\n")
    return json.loads(done.read_text())


class Counted:
    """``segment`` that counts its decodes and the seconds they take (the clicks' cost)."""

    def __init__(self, segment):
        self.segment, self.decodes, self.seconds = segment, 0, 0.0

    @property
    def feeds_back(self) -> bool:
        return getattr(self.segment, "feeds_back", False)

    def __call__(self, zs, boxes, **kwargs):
        started = time.perf_counter()
        out = self.segment(zs, boxes, **kwargs)
        self.seconds += time.perf_counter() - started
        self.decodes += len(zs)
        return out


def measure(cache_path: Path, names: list[str], decoder: Path | None, rules: list[str], *, clicks: int, reach: int,
            device) -> dict:
    """``{rule: {"cases": {case: {label: {"dice": [...], "nsd": [...]}}}, "decodes", "seconds", "clicks"}}`` of one
    decoder (None: vanilla) on ``names``: Dice and NSD after 0..``clicks`` clicks from one ``box3d`` start."""
    out = {rule: {"cases": {}, "decodes": 0, "seconds": 0.0, "clicks": 0} for rule in rules}
    for cache, case, truth, segment in decoded_cases(cache_path, names, decoder, device):
        for label in cache.labels:
            gt = truth == label
            base = ProtocolSettings(clicks=clicks, reach=reach)
            start = protocols.run("box3d", segment, truth=gt, spacing_mm=case.spacing_mm, settings=base,
                                  case=case.name, label=label)
            for rule in rules:
                curve: dict[int, dict] = {}
                counted = Counted(segment)

                def observe(k, mask, curve=curve):
                    curve[k] = gland_metrics(mask, gt, spacing_mm=case.spacing_mm, label=label,
                                             label_map=cache.signature.label_map)

                settings = ProtocolSettings(clicks=clicks, reach=reach, refine=rule)
                done = protocols.run("clicks", counted, truth=gt, spacing_mm=case.spacing_mm, settings=settings,
                                     case=case.name, label=label, start=start, observe=observe)
                entry = out[rule]
                entry["cases"].setdefault(case.name, {})[str(label)] = {
                    m: [round(float(curve[k][m]), 5) for k in range(clicks + 1)] for m in ("dice", "nsd")}
                entry["decodes"] += counted.decodes
                entry["seconds"] += counted.seconds
                entry["clicks"] += len(done.clicks)
    return out


def digest(scored: dict, labels: dict[str, str]) -> dict:
    """Per gland: mean (and sd) Dice and NSD after each click over the cases, the area under Dice per click,
    whether every click raised the mean; and what one click cost."""
    glands = {}
    for label, name in labels.items():
        dice = np.array([c[label]["dice"] for c in scored["cases"].values() if label in c])
        nsd = np.array([c[label]["nsd"] for c in scored["cases"].values() if label in c])
        mean = dice.mean(axis=0)
        glands[name] = {"dice_after": [round(float(v), 4) for v in mean],
                        "nsd_after": [round(float(v), 4) for v in nsd.mean(axis=0)],
                        "dice_after_sd": [round(float(v), 4) for v in dice.std(axis=0)],
                        "dice_auc": round(float(((mean[1:] + mean[:-1]) / 2).mean()) if len(mean) > 1 else float(mean[0]), 4),
                        "every_click_raises": bool(np.all(np.diff(mean) > 0)), "cases": int(len(dice))}
    clicks = max(scored["clicks"], 1)
    return {"glands": glands, "clicks_given": scored["clicks"],
            "decodes_per_click": round(scored["decodes"] / clicks, 2),
            "seconds_per_click": round(scored["seconds"] / clicks, 3)}


def scored(work: Path, recipe: str, case_set: str, rules: list[str], compute, *, reach: int = REACH) -> dict:
    """The scores of ``recipe`` on ``case_set`` under each rule (and ``reach``), read from WORK where they were made,
    else computed."""
    name = lambda rule: work / f"{recipe}-{case_set}-{rule}{'' if reach == REACH else f'-reach{reach}'}.json"  # noqa: E731
    found = {rule: json.loads(name(rule).read_text()) for rule in rules if name(rule).is_file()}
    missing = [r for r in rules if r not in found]
    if missing:
        for rule, value in compute(missing).items():
            name(rule).write_text(json.dumps(value) + "\n")
            found[rule] = value
    return found


def table(results: dict, case_set: str = "test") -> str:
    """Markdown: per decoder and rule, Dice (right / left) after 0, 1, 3, 5 clicks, the AUC, NSD after the last click."""
    shown = [k for k in SHOWN if k <= results["clicks"]]
    head = " | ".join(f"{k} click{'s' if k != 1 else ''}" for k in shown)
    lines = [f"| decoder | rule | {head} | AUC | NSD after {results['clicks']} | s / click |",
             "| --- | --- |" + " --- |" * (len(shown) + 3)]
    for recipe, entry in results["decoders"].items():
        name = "vanilla" if recipe == "vanilla" else f"`{recipe}`"
        for rule, value in entry.get(case_set, {}).items():
            right, left = value["glands"]["right adrenal"], value["glands"]["left adrenal"]
            cells = [f"{right['dice_after'][k]:.3f} / {left['dice_after'][k]:.3f}" for k in shown]
            lines.append(f"| {name} | {rule} | {' | '.join(cells)} | {right['dice_auc']:.3f} / {left['dice_auc']:.3f} | "
                         f"{right['nsd_after'][-1]:.3f} / {left['nsd_after'][-1]:.3f} | {value['seconds_per_click']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # embedcache's notes
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path)
    parser.add_argument("--split", type=Path, required=True, help="split file with train, val and test cases")
    parser.add_argument("--work", type=Path, required=True, help="runs and scores, kept to resume")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {', '.join(RECIPES)}")
    parser.add_argument("--rules", default="local,walk", help=f"click rules, from {', '.join(REFINES)}")
    parser.add_argument("--test-rules", default=None, help="rules scored on test for all but the chosen decoder "
                                                            "(default: --rules)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8, help="finetune --rounds of the interactive recipes")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--reach", type=int, default=REACH)
    parser.add_argument("--reaches", default=None, help="--reach values the chosen decoder tries on val (the first "
                                                        "rule); the best is used on test (default: --reach alone)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--name", default="bed", help="what the cache holds, for the result's file name")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and the table")
    args = parser.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    test_rules = rules if args.test_rules is None else [r.strip() for r in args.test_rules.split(",") if r.strip()]
    if not recipes or any(r not in RECIPES for r in recipes):
        sys.exit(f"--recipes {args.recipes}: choose from {', '.join(RECIPES)}")
    if not rules or any(r not in REFINES for r in rules + test_rules):
        sys.exit(f"--rules {args.rules}: choose from {', '.join(REFINES)}")
    device = pick_device(args.device)
    split = json.loads(args.split.read_text())
    args.work.mkdir(parents=True, exist_ok=True)
    with open_cache(args.cache) as cache:
        labels = {str(k): cache.signature.label_map.name(k) for k in cache.labels}
    results = {"benchmark": "clicks", "cache": str(args.cache), "split": str(args.split), "epochs": args.epochs,
               "rounds": args.rounds, "clicks": args.clicks, "reach": args.reach, "seed": args.seed,
               "machine": machine(device), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "cases": {"val": split["val"], "test": split["test"]}, "decoders": {}}

    def score_of(recipe, case_set, chosen_rules, reach=args.reach):
        decoder = None if RECIPES[recipe] is None else args.work / recipe / "decoder.safetensors"
        found = scored(args.work, recipe, case_set, chosen_rules,
                       lambda missing: measure(args.cache, split[case_set], decoder, missing, clicks=args.clicks,
                                               reach=reach, device=device), reach=reach)
        return {rule: digest(found[rule], labels) for rule in chosen_rules}

    for recipe in recipes:
        entry = results["decoders"].setdefault(recipe, {})
        if RECIPES[recipe] is not None:
            entry["finetune"] = train(args.cache, args.split, args.work / recipe, RECIPES[recipe], epochs=args.epochs,
                                      seed=args.seed, rounds=args.rounds)
        if recipe in CANDIDATES:
            entry["val"] = score_of(recipe, "val", rules[:1])
        print(f"{recipe}: trained", file=sys.stderr)
    candidates = [r for r in recipes if r in CANDIDATES]
    chosen = None
    if candidates:
        def on_val(recipe):
            glands = results["decoders"][recipe]["val"][rules[0]]["glands"].values()
            return float(np.mean([g["dice_after"][-1] for g in glands]))
        chosen = max(candidates, key=on_val)
        results["chosen_on_val"] = {"recipe": chosen, "rule": rules[0], "by": f"mean Dice of both glands after "
                                    f"{args.clicks} clicks on the val cases",
                                    "val": {r: round(on_val(r), 4) for r in candidates}}
    reaches = [args.reach] if args.reaches is None else [int(r) for r in args.reaches.split(",") if r.strip()]
    reach = args.reach
    if chosen is not None and len(reaches) > 1:  # the chosen decoder's reach, on val too
        def after_last(value):
            return round(float(np.mean([g["dice_after"][-1] for g in value["glands"].values()])), 4)

        tried = {r: after_last(score_of(chosen, "val", rules[:1], reach=r)[rules[0]]) for r in reaches}
        reach = max(reaches, key=lambda r: (tried[r], -abs(r - args.reach)))
        results["chosen_reach_on_val"] = {"reach": reach, "decoder": chosen, "rule": rules[0], "val": tried,
                                          "by": f"mean Dice of both glands after {args.clicks} clicks"}
        results["reach"] = reach
    for recipe in recipes:
        if recipe in CANDIDATES and recipe != chosen:
            continue
        results["decoders"][recipe]["test"] = score_of(recipe, "test", rules if recipe == chosen else test_rules,
                                                       reach=reach)
        print(f"{recipe}: scored on test", file=sys.stderr)
    write_result(results, args.out, f"clicks-{args.name}-{device.type}-{datetime.now(timezone.utc):%Y-%m-%d}",
                 table(results))
    return results


if __name__ == "__main__":
    main()
