"""How long does a corrected case take to make a better decoder? The annotate loop, timed, on realistic anatomy.

A cache of CT painted around real FLARE22 label maps (``embedcache phantom --anatomy``: ``--train`` training cases,
``--test`` held-out ones) and a decoder fine-tuned on it (run0, ``--epochs``). One more CT, painted around a label
map neither set holds, is annotated through :class:`~embedcache.segment.annotate.Annotation` as a viewer drives
it, with run0: the 3-D box a person draws per gland (``box3d``'s: the gland's extent, 3 mm and a slice of margin),
then ``--clicks`` corrective clicks per gland (the clicks protocol's: the most interior voxel of the largest error)
and ``--accept`` slices painted by hand (the worst ones, taken as the truth: "accept slice").
"add to training" appends it to a copy of the cache; ``finetune --from run0 --epochs E`` trains on the grown cache
(run1). The loop's machine time is each of those steps (a person's own time is not measured).

"See the better decoder": box3d Dice and NSD per gland on the held-out test cases for run0, run1 and a control,
run1 without the new case (``--from run0``, the same epochs and split on the original cache), so the gain of the
case is told apart from the gain of two more epochs. The split is fixed (a file): run0 and the control train on the
same cases, run1 on those and the new one; the same validation cases choose each best checkpoint. One JSON and a
markdown table under benchmarks/results/. ``--work`` keeps the data, caches and runs: a second run reuses them
(the loop itself is always timed anew).

    python benchmarks/annotate_loop.py --work /tmp/loop                 # 8 + 2 cases, 2 epochs, 3 clicks
    python benchmarks/annotate_loop.py --work /tmp/loop --train 12 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from embedcache.cache.encode import encode
from embedcache.cache.store import open_cache
from embedcache.config import EncodeConfig, FinetuneConfig, PredictConfig, ProtocolSettings
from embedcache.evaluation import protocols
from embedcache.evaluation.metrics import dice, gland_metrics
from embedcache.evaluation.protocols import box3d_from_label
from embedcache.io.datasets import discover_cases
from embedcache.io.nifti import is_nifti, nifti_stem, write_nifti
from embedcache.io.volumes import read_label
from embedcache.model.clicks import corrective_click
from embedcache.runtime.devices import pick_device
from embedcache.segment.annotate import Annotation
from embedcache.synth.anatomy import paint_ct, write_anatomy
from embedcache.train.finetune import finetune

from common import RESULTS, decoded_cases, machine, write_result

LABELS = Path("/work/shared/data/flare22-labels")
ADRENALS = (7, 8)


def timed(action):
    started = time.perf_counter()
    result = action()
    return result, round(time.perf_counter() - started, 2)


def bed(labels: Path, work: Path, *, train: int, test: int, model: str) -> tuple[Path, Path, dict]:
    """The dataset, its cache (encoded once, reused), and the new CT to annotate with its truth."""
    data, cache = work / "data", work / "cache.h5"
    if not data.exists():
        write_anatomy(labels, data, cases=train, test_cases=test, seed=0)
    if not cache.exists():
        encode(discover_cases(data), cache, EncodeConfig(backbone=model, device="cpu", zoom_mm=0.0), progress=None)
    maps = sorted(p for p in labels.iterdir() if is_nifti(p))[train + test:]
    for path in maps:  # the first later label map holding both glands
        volume = read_label(path)
        if all((volume.array == label).any() for label in ADRENALS):
            image = work / "new" / f"{nifti_stem(path)}_0000.nii.gz"
            if not image.exists():
                image.parent.mkdir(exist_ok=True)
                write_nifti(paint_ct(volume.array, volume.spacing_mm, seed=99), volume.geometry, image)
            return data, cache, {"image": image, "truth": volume, "name": nifti_stem(path)}
    sys.exit(f"{labels}: no label map beyond the first {train + test} holds both adrenal glands")


def worst_slices(mask: np.ndarray, truth: np.ndarray, count: int) -> list[int]:
    """The ``count`` slices of the gland whose 2-D Dice is lowest: those a person paints by hand."""
    zs = np.flatnonzero(truth.any(axis=(1, 2)))
    return sorted(zs, key=lambda z: dice(mask[z], truth[z]))[:count] if count else []


def split_file(cache: Path, work: Path, *, val: int, seed: int) -> tuple[dict, Path]:
    with open_cache(cache) as held:
        trainable = sorted(c.name for c in held.cases if c.subset == "train")
        test = sorted(c.name for c in held.cases if c.subset == "test")
    chosen = sorted(np.random.default_rng(seed).choice(trainable, size=val, replace=False).tolist())
    split = {"train": [n for n in trainable if n not in chosen], "val": chosen, "test": test}
    path = work / "split.json"
    path.write_text(json.dumps(split, indent=1) + "\n")
    return split, path


def score_test(cache: Path, names, decoder: Path, device) -> dict:
    """box3d Dice and NSD per gland (mean over ``names``) of one decoder on the cached test cases."""
    settings = ProtocolSettings()
    per = {str(label): [] for label in ADRENALS}
    for held, case, truth, segment in decoded_cases(cache, names, decoder, device):
        for label in held.labels:
            gt = truth == label
            prediction = protocols.run("box3d", segment, truth=gt, spacing_mm=case.spacing_mm, settings=settings,
                                       case=case.name, label=label)
            per[str(label)].append(gland_metrics(prediction.mask, gt, spacing_mm=case.spacing_mm, label=label,
                                                 label_map=held.signature.label_map))
    return {label: {key: round(float(np.mean([m[key] for m in rows])), 4) for key in ("dice", "nsd")}
            for label, rows in per.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels", type=Path, default=LABELS, help="A folder of FLARE22 label maps.")
    parser.add_argument("--work", type=Path, required=True, help="Data, caches and runs (kept: a rerun reuses them).")
    parser.add_argument("--train", type=int, default=8)
    parser.add_argument("--test", type=int, default=2)
    parser.add_argument("--val", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--clicks", type=int, default=3)
    parser.add_argument("--accept", type=int, default=0,
                        help="Slices per gland a person then paints by hand (the worst ones; accept slice).")
    parser.add_argument("--model", default="litemedsam", help="The backbone (the tests: tiny).")
    parser.add_argument("--name", default=f"annotate-loop-cpu-{datetime.now(timezone.utc):%Y-%m-%d}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="Where the JSON and the table go.")
    args = parser.parse_args(argv)
    device = pick_device("cpu")
    args.work.mkdir(parents=True, exist_ok=True)
    data, cache, new = bed(args.labels, args.work, train=args.train, test=args.test, model=args.model)
    split, split_path = split_file(cache, args.work, val=args.val, seed=0)
    base = FinetuneConfig(cache=str(cache), epochs=args.epochs, split=str(split_path), device="cpu")
    run0 = args.work / "run0"
    if not (run0 / "decoder.safetensors").exists():
        finetune(base, run0)

    # the loop: annotate with run0, add to training, fine-tune from run0 on the grown cache
    grown = args.work / "grown.h5"
    for leftover in (grown, args.work / "run1", args.work / "new" / f"{new['name']}.annotated.nii.gz"):
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    shutil.copy(cache, grown)
    truth, steps, quality = new["truth"], {}, {}
    config = PredictConfig(run=str(run0), device="cpu")
    annotation, steps["open_s"] = timed(lambda: Annotation.open(new["image"], config, cache=grown))
    try:
        boxes_s = clicks_s = 0.0
        for label in ADRENALS:
            gland = truth.array == label
            box = box3d_from_label(gland, truth.spacing_mm, margin_mm=3.0, margin_slices=1)
            prediction, seconds = timed(lambda: annotation.box(label, box.z0, box.z1, box.box))
            boxes_s += seconds
            after = [round(float(dice(prediction.mask, gland)), 4)]
            for _ in range(args.clicks):
                click = corrective_click(annotation.predictions[label].mask, gland, truth.spacing_mm)
                if click is None:
                    break
                prediction, seconds = timed(lambda: annotation.click(label, click.z, click.y, click.x,
                                                                     positive=click.positive))
                clicks_s += seconds
                after.append(round(float(dice(prediction.mask, gland)), 4))
            for z in worst_slices(annotation.predictions[label].mask, gland, args.accept):  # painted by hand
                prediction = annotation.accept(label, z, gland[z])
                after.append(round(float(dice(prediction.mask, gland)), 4))
            quality[str(label)] = after
        steps["boxes_s"], steps["clicks_s"] = round(boxes_s, 2), round(clicks_s, 2)
        added, steps["add_s"] = timed(annotation.add_to_training)
    finally:
        annotation.close()
    grown_split = args.work / "split-grown.json"
    grown_split.write_text(json.dumps({**split, "train": [*split["train"], added.case]}, indent=1) + "\n")
    run1 = args.work / "run1"
    _, steps["finetune_s"] = timed(lambda: finetune(replace(base, cache=str(grown), split=str(grown_split),
                                                            start_from=str(run0)), run1))
    steps["loop_s"] = round(sum(steps.values()), 2)
    control = args.work / "control"
    if not (control / "decoder.safetensors").exists():
        finetune(replace(base, start_from=str(run0)), control)

    scores = {name: score_test(cache, split["test"], run / "decoder.safetensors", device)
              for name, run in (("run0", run0), ("run1 (with the new case)", run1), ("control (without it)", control))}
    with open_cache(grown) as held:
        rows = {c.name: c.n_rows for c in held.cases}
    result = {
        "benchmark": "annotate-loop",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device),
        "bed": {"labels": str(args.labels.name), "train": len(split["train"]), "val": len(split["val"]),
                "test": len(split["test"]), "new_case": new["name"], "new_case_rows": rows.get(new["name"]),
                "cache_rows": sum(rows.values())},
        "settings": {"epochs": args.epochs, "clicks": args.clicks, "accepted_slices": args.accept,
                     "backbone": args.model, "engine": "auto"},
        "loop_s": steps,
        "new_case_dice_after_box_then_each_click": quality,
        "test_box3d": scores,
        "torch_threads": torch.get_num_threads(),
    }
    write_result(result, args.out, args.name, table(result))
    return result


def table(result: dict) -> str:
    s, bed_ = result["loop_s"], result["bed"]
    lines = [f"# The annotate loop on realistic anatomy ({result['date'][:10]}, {result['machine'].get('cpu', 'CPU')})",
             "",
             f"Cache: {bed_['train']} training, {bed_['val']} validation and {bed_['test']} test cases of CT painted "
             f"around FLARE22 label maps ({bed_['cache_rows']} rows after the add); {result['settings']['backbone']}; "
             f"{result['settings']['epochs']} epochs per fine-tune; the new case {bed_['new_case']} "
             f"({bed_['new_case_rows']} rows), annotated with run0: a box, {result['settings']['clicks']} clicks "
             f"and {result['settings']['accepted_slices']} slices painted by hand per gland.", "",
             "| step | seconds |", "| --- | --- |"]
    names = {"open_s": "open the CT and the decoder", "boxes_s": "a box per gland (encodes included)",
             "clicks_s": "the clicks", "add_s": "add to training", "finetune_s": "finetune --from run0",
             "loop_s": "**the loop**"}
    lines += [f"| {names[k]} | {v} |" for k, v in s.items()]
    steps_of = result["new_case_dice_after_box_then_each_click"].values()
    lines += ["", "New case, Dice after the box and each click or painted slice (right; left): "
              + "; ".join(" → ".join(str(d) for d in v) for v in steps_of),
              "", "| decoder | right Dice | left Dice | right NSD | left NSD |", "| --- | --- | --- | --- | --- |"]
    for name, score in result["test_box3d"].items():
        lines.append(f"| {name} | {score['7']['dice']} | {score['8']['dice']} | {score['7']['nsd']} | "
                     f"{score['8']['nsd']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
