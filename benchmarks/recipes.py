"""Which training recipe and which box3d walk serve a person who gives one 3-D box per gland?

The study of realistic anatomy: a cache encoded from CT painted around real FLARE22 label maps
(``embedcache phantom DATA --anatomy MAPS --cases 30 --test-cases 10``, then ``encode``), a fixed
split (the cache's 30 training cases: 24 train and 6 val, seeded; its 10 ``imagesTs/`` cases: test),
every recipe fine-tuned for the same epochs, every (recipe, walk) scored on **val** to choose, and
the chosen ones and the baselines reported on **test**. Accuracy, not speed: 3-D Dice and NSD per
gland, one JSON and one markdown table under benchmarks/results/.

    python benchmarks/recipes.py BED/cache.h5 --epochs 2 --work /tmp/recipes

``--second-style CACHE`` also scores every recipe on the same test cases painted another way
(``phantom --anatomy --style arterial``, encoded alone): a recipe chosen on one painting style is
checked on another. ``--train-cases N`` trains on N of the split's training cases (seeded), to see what
fewer cases cost. ``--train-cache CACHE`` trains on another cache of the same training cases (the same
anatomy painted ``phantom --style varied``, say), scored on CACHE's as always. Where ``box3d`` loses
voxels against ``oracle`` is counted per slice position of the gland (its end slices, the next ones in,
its middle, and slices beyond it that the 3-D box takes in).

``--work`` keeps every run and score, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from embedcache.cache.store import open_cache
from embedcache.config import WALKS, FinetuneConfig, ProtocolSettings
from embedcache.evaluation import protocols
from embedcache.evaluation.metrics import gland_metrics
from embedcache.runtime.devices import pick_device
from embedcache.train.finetune import finetune

from common import RESULTS, decoded_cases, machine, write_result

#: name → the FinetuneConfig fields of the recipe; "vanilla" is the released decoder, not trained.
RECIPES = {
    "vanilla": None,
    "jitter": {"train_prompts": "jitter"},  # the default before this study: tight boxes, each edge ±10 %
    "medsam": {"train_prompts": "medsam"},  # MedSAM's own: edges outward by 0-20 px at 1024 px
    "loose": {"train_prompts": "loose"},
    "propagated": {"train_prompts": "propagated", "stop_prompts": True},
    "mix": {"train_prompts": "jitter:1,loose:1,propagated:1", "stop_prompts": True},
    "mix-iou": {"train_prompts": "jitter:1,loose:1,propagated:1", "stop_prompts": True, "iou_head": True},
    # the same on --augmented-cache: the cache with flipped copies of the training cases (encode --augment flip)
    "mix-iou-adapter": {"train_prompts": "jitter:1,loose:1,propagated:1", "stop_prompts": True, "iou_head": True,
                        "adapter": True},
    "mix-iou-flip": {"train_prompts": "jitter:1,loose:1,propagated:1", "stop_prompts": True, "iou_head": True,
                     "augmented": True},
}


def make_split(cache_path: Path, out: Path, *, val: int, seed: int, train: int | None = None) -> dict:
    """The cache's training cases, ``val`` of them (seeded) held out for choosing, ``train`` of the rest (seeded;
    None: all) trained on; its test cases for reporting."""
    with open_cache(cache_path) as cache:
        whole = [c for c in cache.cases if c.region is None]  # a cache of both views: its glands follow their case
        trainable = sorted(c.name for c in whole if c.subset != "test")
        test = sorted(c.name for c in whole if c.subset == "test")
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(trainable, size=val, replace=False).tolist())
    rest = [n for n in trainable if n not in chosen]
    if train is not None:
        rest = sorted(rng.choice(rest, size=min(train, len(rest)), replace=False).tolist())
    split = {"train": rest, "val": sorted(chosen), "test": test}
    out.write_text(json.dumps(split, indent=1) + "\n")
    return split


def measure(cache_path: Path, names: list[str], decoder: Path | None, settings: dict[str, ProtocolSettings],
            protocol_of: dict[str, str], device: torch.device) -> dict:
    """``{setting: {case: {label: metrics}}}`` of one decoder (None: vanilla) on ``names``; under ``WHERE``,
    ``{setting: {label: {position: voxel counts}}}`` of the settings in :data:`WHERE_OF` (:func:`where_lost`)."""
    results: dict = {key: {} for key in settings}
    where: dict = {}
    for cache, case, truth, segment in decoded_cases(cache_path, names, decoder, device):
        segment = remembered(segment)
        for label in cache.labels:
            gt = truth == label
            for key, setting in settings.items():
                prediction = protocols.run(protocol_of[key], segment, truth=gt, spacing_mm=case.spacing_mm,
                                           settings=setting, case=case.name, label=label)
                results[key].setdefault(case.name, {})[str(label)] = gland_metrics(
                    prediction.mask, gt, spacing_mm=case.spacing_mm, label=label, label_map=cache.signature.label_map)
                if key in WHERE_OF:
                    add_counts(where.setdefault(key, {}).setdefault(str(label), {}), where_lost(prediction.mask, gt))
    if where:
        results[WHERE] = where
    return results


#: The settings whose lost and extra voxels are counted per slice position, and the key they are kept under.
WHERE_OF, WHERE = ("oracle", "box3d-grow"), "where"
#: Slice positions of a gland: its first and last slice, the next ones in, the rest, and slices without it.
POSITIONS = ("end", "next to end", "middle", "beyond")


def where_lost(mask: np.ndarray, truth: np.ndarray) -> dict:
    """Per slice position (:data:`POSITIONS`): the gland's voxels there, those the prediction missed (``missed``)
    and those it drew outside the gland (``extra``), and the gland's slices it left empty (``empty``)."""
    zs = np.flatnonzero(truth.any(axis=(1, 2)))
    counts = {p: {"slices": 0, "voxels": 0, "missed": 0, "extra": 0, "empty": 0} for p in POSITIONS}
    for z in np.flatnonzero(truth.any(axis=(1, 2)) | mask.any(axis=(1, 2))):
        k = int(np.searchsorted(zs, z))
        held = k < zs.size and zs[k] == z
        position = "beyond" if not held else "end" if k in (0, zs.size - 1) else \
            "next to end" if k in (1, zs.size - 2) else "middle"
        c = counts[position]
        c["slices"] += 1
        c["voxels"] += int(truth[z].sum())
        c["missed"] += int((truth[z] & ~mask[z]).sum())
        c["extra"] += int((mask[z] & ~truth[z]).sum())
        c["empty"] += int(held and not mask[z].any())
    return counts


def add_counts(total: dict, counts: dict) -> None:
    for position, c in counts.items():
        for k, v in c.items():
            total.setdefault(position, {}).setdefault(k, 0)
            total[position][k] += v


def remembered(segment):
    """``segment`` that decodes each (slice, box) once: the walks share most of their slices."""
    seen: dict = {}

    def again(zs, boxes, multimask=False):
        keys = [(int(z), tuple(float(v) for v in box), multimask) for z, box in zip(zs, boxes)]
        new = [i for i, key in enumerate(keys) if key not in seen]
        if new:
            masks, iou = segment(np.asarray(zs)[new], np.asarray(boxes)[new], multimask=multimask)
            for i, mask, value in zip(new, masks, iou):
                seen[keys[i]] = (mask, value)
        return np.array([seen[k][0] for k in keys]), np.array([seen[k][1] for k in keys])

    return again


def summarise(per_case: dict) -> dict:
    """Per label: mean and sd of Dice and NSD over cases, and the worst case's Dice."""
    out = {}
    labels = sorted({label for case in per_case.values() for label in case})
    for label in labels:
        values = {m: np.array([per_case[c][label][m] for c in per_case if label in per_case[c]]) for m in ("dice", "nsd")}
        out[label] = {**{m: {"mean": round(float(v.mean()), 4), "sd": round(float(v.std()), 4)} for m, v in values.items()},
                      "min_dice": round(float(values["dice"].min()), 4), "n": int(len(values["dice"]))}
    return out


def glands_mean(summary: dict) -> float:
    return float(np.mean([summary[label]["dice"]["mean"] for label in summary]))


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # embedcache's notes
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path)
    parser.add_argument("--work", type=Path, required=True, help="Folder for runs and scores (resumable).")
    parser.add_argument("--augmented-cache", type=Path, default=None,
                        help="CACHE with augmented copies (encode --augment), for the recipes marked augmented.")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--walks", default=",".join(WALKS))
    parser.add_argument("--min-ious", default="0,0.5,0.7", help="box3d: predicted-IoU thresholds to try (0: off).")
    parser.add_argument("--middles", default="single", help="box3d: single and/or multimask for the 3-D box's own prompt.")
    parser.add_argument("--val-cases", type=int, default=6)
    parser.add_argument("--train-cases", type=int, default=None, help="Train on this many of the rest (seeded).")
    parser.add_argument("--train-cache", type=Path, default=None,
                        help="Train on this cache of the same training cases (e.g. painted --style varied) instead.")
    parser.add_argument("--second-style", type=Path, default=None,
                        help="A cache of the same test cases painted another way (phantom --style arterial), for "
                             "testing only.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--name", default=None, help="Result file name (default: recipes-DEVICE-DATE).")
    parser.add_argument("--what", default="", help="How the cache was made, saved with the figures.")
    parser.add_argument("--out", type=Path, default=RESULTS, help="Folder for the JSON and table.")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    split_file = args.work / "split.json"
    split = json.loads(split_file.read_text()) if split_file.exists() else \
        make_split(args.cache, split_file, val=args.val_cases, seed=args.seed, train=args.train_cases)
    trained_split = split_file
    if args.train_cache:  # another cache of the training cases: its split names no test case it lacks
        trained_split = args.work / "train-split.json"
        trained_split.write_text(json.dumps({"train": split["train"], "val": split["val"]}, indent=1) + "\n")
    walks = [w for w in args.walks.split(",") if w]
    ious = [float(v) for v in args.min_ious.split(",") if v]
    middles = [m for m in args.middles.split(",") if m]
    settings = {"oracle": ProtocolSettings(),
                **{f"box3d-{w}" + (f"-iou{t:g}" if t else "") + ("-multimask" if m == "multimask" else ""):
                   ProtocolSettings(walk=w, min_iou=t, middle=m) for w in walks for t in ious for m in middles}}
    protocol_of = {key: key.split("-")[0] for key in settings}
    with open_cache(args.cache) as cache:
        names = {str(k): cache.signature.label_map.name(k) for k in cache.labels}
    out = {"benchmark": "recipes", "what": args.what, "cache": str(args.cache), "epochs": args.epochs, "labels": names,
           "second_style": str(args.second_style) if args.second_style else None,
           "train_cache": str(args.train_cache) if args.train_cache else None,
           "seed": args.seed, "split": split, "machine": machine(device),
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "recipes": {}, "protocols": {k: asdict(v) for k, v in settings.items()}}
    for name in args.recipes.split(","):
        recipe = RECIPES[name]
        decoder = None
        row = {"recipe": recipe}
        if recipe is not None:
            run = args.work / name
            fields = {k: v for k, v in recipe.items() if k != "augmented"}
            cache = args.augmented_cache if recipe.get("augmented") else args.train_cache or args.cache
            if cache is None:
                print(f"{name}: needs --augmented-cache; skipped", file=sys.stderr)
                continue
            if not (run / "done.json").exists():
                config = FinetuneConfig(cache=str(cache.resolve()), epochs=args.epochs, seed=args.seed,
                                        device=args.device, split=str(trained_split.resolve()), patience=args.epochs,
                                        **fields)
                resume = (run / "last.safetensors").exists()
                started = time.perf_counter()
                result = finetune(config, run, resume=resume, progress=None)
                (run / "done.json").write_text(json.dumps({
                    "best_epoch": result.best_epoch, "val_dice_2d": result.best_val_dice, "cache": str(cache),
                    "train_seconds": round(time.perf_counter() - started, 1),
                    "seconds_per_epoch": [round(h.seconds, 1) for h in result.history]}) + "\n")
            row = {"recipe": recipe, **json.loads((run / "done.json").read_text())}
            decoder = run / "decoder.safetensors"
        for case_set, source in (("val", args.cache), ("test", args.cache), ("test2", args.second_style)):
            if source is None:
                continue
            scored = args.work / f"{name}-{case_set}.json"
            per_case = json.loads(scored.read_text()) if scored.exists() else {}
            missing = {k: v for k, v in settings.items() if k not in per_case}  # a study widened later adds only these
            if missing:
                found = measure(source, split["test" if case_set == "test2" else case_set], decoder, missing,
                                protocol_of, device)
                for key, counts in found.pop(WHERE, {}).items():
                    per_case.setdefault(WHERE, {})[key] = counts
                per_case.update(found)
                scored.write_text(json.dumps(per_case) + "\n")
            row[case_set] = {key: {"summary": summarise(per_case[key]), "cases": per_case[key]} for key in settings}
            row[f"{case_set}_where"] = per_case.get(WHERE, {})
        out["recipes"][name] = row
        val = row["val"]
        print(json.dumps({"recipe": name, **{k: round(glands_mean(v["summary"]), 4) for k, v in val.items()}}),
              file=sys.stderr)
    out["chosen_on_val"] = choose(out["recipes"], [k for k in settings if k.startswith("box3d")])
    write_result(out, args.out, args.name or f"recipes-{device.type}-{out['date'][:10]}", table(out) + "\n")
    return out


#: A default changes only for a gain on val larger than this (mean 3-D Dice of both glands): with 6 val
#: cases the standard error of a mean is about 0.02, so smaller gains are not told from noise.
MARGIN = 0.01
#: The walk of the defaults (ProtocolSettings()): the one a new walk must beat by MARGIN.
DEFAULT_WALK = "box3d-grow"


#: Recipes that cost more than a decoder-only epoch: the adapter's convolutions, augmentation's extra
#: encode and its doubled epoch. They replace a cheaper recipe only for a gain beyond MARGIN.
COSTLY = ("mix-iou-adapter", "mix-iou-flip")


def choose(recipes: dict, walks: list[str]) -> dict:
    """The recipe and walk the defaults take, by a rule fixed before the last recipes' figures were read:
    among the recipes that cost no more than a decoder-only epoch, the best val box3d Dice under the default
    walk, if it beats the former default (jitter) by more than :data:`MARGIN`; a costly recipe only if it
    beats that by more than MARGIN; then another walk only if it beats the default walk by more than MARGIN."""
    def val(name, walk):
        return glands_mean(recipes[name]["val"][walk]["summary"])

    trained = [n for n in recipes if recipes[n].get("recipe")]
    cheap = [n for n in trained if n not in COSTLY]
    baseline = "jitter" if "jitter" in trained else cheap[0]
    best = max(cheap, key=lambda n: val(n, DEFAULT_WALK))
    recipe = best if val(best, DEFAULT_WALK) > val(baseline, DEFAULT_WALK) + MARGIN else baseline
    costly = [n for n in trained if n in COSTLY]
    if costly:
        dearer = max(costly, key=lambda n: val(n, DEFAULT_WALK))
        if val(dearer, DEFAULT_WALK) > val(recipe, DEFAULT_WALK) + MARGIN:
            recipe = dearer
    walk = max(walks, key=lambda w: val(recipe, w))
    walk = walk if val(recipe, walk) > val(recipe, DEFAULT_WALK) + MARGIN else DEFAULT_WALK
    return {"recipe": recipe, "walk": walk, "val_box3d_dice": round(val(recipe, walk), 4), "margin": MARGIN,
            "rule": f"among recipes costing a decoder-only epoch, the best under {DEFAULT_WALK} on val if it beats "
                    f"{baseline} by more than {MARGIN}; {', '.join(COSTLY)} only by more than {MARGIN} over that; "
                    f"another walk only by more than {MARGIN} over {DEFAULT_WALK}"}


def table(out: dict) -> str:
    """Markdown: per recipe, test Dice (NSD) per gland under oracle, today's box3d walk and the walk its
    val cases chose, the worst test gland; then every walk's val Dice per recipe (what chose)."""
    rows = out["recipes"]
    labels = sorted({label for row in rows.values() for label in row["test"]["oracle"]["summary"]})
    names = [out.get("labels", {}).get(str(label), f"label {label}") for label in labels]
    walks = [k for k in next(iter(rows.values()))["val"] if k.startswith("box3d")]
    chosen = out["chosen_on_val"]
    second = all("test2" in row for row in rows.values()) and bool(rows)

    def share(counts, total):  # missed / extra voxels in % of the gland's (where_lost counts every position)
        return f"{100 * counts['missed'] / total:.1f} / {100 * counts['extra'] / total:.1f}"

    def cell(summary):
        return " / ".join(f"{summary[l]['dice']['mean']:.3f} ({summary[l]['nsd']['mean']:.3f})" for l in labels)

    lines = [f"{out['what'] or out['cache']}: {len(out['split']['train'])} train, {len(out['split']['val'])} val, "
             f"{len(out['split']['test'])} test cases; {out['epochs']} epochs per recipe, seed {out['seed']}; "
             f"LiteMedSAM, best-validation checkpoint. Chosen on val: **{chosen['recipe']}** with "
             f"**{chosen['walk']}** (val box3d Dice {chosen['val_box3d_dice']:.3f}; rule: {chosen['rule']}).",
             "",
             f"Test cases, 3-D Dice (NSD) {' / '.join(names)}:",
             "",
             "| recipe | oracle | box3d-grow | its best walk on val | that walk on test | worst test gland |"
             + (" oracle, 2nd style | box3d-grow, 2nd style | that walk, 2nd style |" if second else ""),
             "| --- | --- | --- | --- | --- | --- |" + (" --- | --- | --- |" if second else "")]
    for name, row in rows.items():
        best = max(walks, key=lambda w: glands_mean(row["val"][w]["summary"]))
        worst = min(row["test"][best]["summary"][l]["min_dice"] for l in labels)
        lines.append(f"| {name} | {cell(row['test']['oracle']['summary'])} | {cell(row['test']['box3d-grow']['summary'])} "
                     f"| {best} | {cell(row['test'][best]['summary'])} | {worst:.2f} |"
                     + (f" {cell(row['test2']['oracle']['summary'])} | {cell(row['test2']['box3d-grow']['summary'])} | "
                        f"{cell(row['test2'][best]['summary'])} |" if second else ""))
    for case_set, title in (("test_where", "test cases"), ("test2_where", "test cases, 2nd style")):
        found = {n: r[case_set] for n, r in rows.items() if r.get(case_set)}
        if not found:
            continue
        lines += ["", f"Where voxels are lost, {title}: voxels missed / drawn outside the gland under oracle → "
                  "box3d-grow, in % of the gland's voxels, per slice position (end: a gland's first and last slice; "
                  "beyond: slices without it that the 3-D box takes in):", "",
                  "| recipe | gland | " + " | ".join(POSITIONS) + " |", "| --- | --- |" + " --- |" * len(POSITIONS)]
        for name, where in found.items():
            for label, name_of in zip(labels, names):
                o, b = where["oracle"][str(label)], where["box3d-grow"][str(label)]
                total = sum(c["voxels"] for c in o.values())
                lines.append(f"| {name} | {name_of} | "
                             + " | ".join(f"{share(o[p], total)} → {share(b[p], total)}" for p in POSITIONS) + " |")
    lines += ["", "Validation cases, box3d 3-D Dice (mean of both glands) per walk:", "",
              "| walk | " + " | ".join(rows) + " |", "| --- |" + " --- |" * len(rows)]
    for walk in walks:
        lines.append(f"| {walk} | " + " | ".join(f"{glands_mean(row['val'][walk]['summary']):.3f}" for row in rows.values())
                     + " |")
    costs = {n: r["seconds_per_epoch"] for n, r in rows.items() if r.get("seconds_per_epoch")}
    if costs:
        lines += ["", "Seconds per training epoch (this machine, noisy): "
                  + ", ".join(f"{n} {sum(v) / len(v):.0f}" for n, v in costs.items()) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
