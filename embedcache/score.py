"""Scoring: vanilla against fine-tuned decoder on the same cached boxes, judged on 3-D volumes.

Read top to bottom: choose the cases (by default the run's validation cases), decode every cached
(slice, gland) box with both decoders, take the logits back to each slice's original pixel grid,
stack them into 3-D masks on the label volume's voxels, and compare with the label volume: Dice and
NSD at 2 mm (FLARE22) per case and gland, plus the mean 2-D Dice of the slices holding the gland.
Then write report.json, cases.csv, overlays of the best and worst slices, and index.html.
"""

from __future__ import annotations

import copy
import csv
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embedcache import labels as flare
from embedcache.backbones import get_backbone, load_backbone, require_weights
from embedcache.cache import Cache, CaseRecord, open_cache
from embedcache.decoder import decode_boxes, masks_on_grid
from embedcache.devices import pick_device
from embedcache.errors import EmbedcacheError
from embedcache.files import atomic_path, atomic_write_text
from embedcache.metrics import dice, nsd
from embedcache.preprocess import window_hu
from embedcache.runs import RunFolder, load_trained_decoder
from embedcache.volumes import read_image, read_label

METRICS = ("dice", "nsd", "dice_2d")


@dataclass(frozen=True)
class SlicePrediction:
    case: str
    label: int
    z: int
    box: tuple[float, float, float, float]  # slice pixels (x0, y0, x1, y1)
    dice_2d: dict  # model → 2-D Dice on the original grid


def _predict_case(parts, decoders: dict, cache: Cache, case: CaseRecord, *, device, input_size, slice_size,
                  batch: int = 16):
    """Per model and label: the 3-D canonical prediction of one case (bool, ``(z, y, x)``)."""
    labels = cache.labels
    shape = tuple(case.shape_zyx)
    preds = {m: {label: np.zeros(shape, bool) for label in labels} for m in decoders}
    rows = case.row_index
    boxes_all = cache.read("boxes", case.rows)
    slice_z = cache.read("slice_index", case.rows)
    pairs = list(zip(*np.nonzero(cache.present(case.rows))))  # (row within the case, label slot)
    scale = input_size / slice_size
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        row_idx = sorted({i for i, _ in chunk})
        emb = torch.from_numpy(cache.read("embeddings", slice(rows[row_idx[0]], rows[row_idx[-1]] + 1))).float().to(device)
        local = torch.tensor([i - row_idx[0] for i, _ in chunk], device=device)
        boxes = torch.from_numpy(np.stack([boxes_all[i, j] for i, j in chunk]) * scale).to(device)
        for name, decoder in decoders.items():
            with torch.no_grad():
                low, _ = decode_boxes(parts.prompt_encoder, decoder, emb[local], boxes)
                native = masks_on_grid(low, input_size=input_size, slice_size=slice_size, shape_yx=shape[1:])
            native = native.cpu().numpy()
            for (i, j), mask in zip(chunk, native):
                preds[name][labels[j]][int(slice_z[i])] |= mask
    return preds


def score(
    cache_path: Path, out_dir: Path, *, run_dir: Path | None = None, decoder_file: Path | None = None,
    cases: str = "val", checkpoint: Path | None = None, device: str = "auto", progress=None, log=print,
) -> dict:
    """Score the vanilla decoder (and the fine-tuned one when given) on ``cases``; write the report to ``out_dir``."""
    out_dir = Path(out_dir)
    if cases not in ("train", "val", "all"):
        raise EmbedcacheError(f"--cases {cases}: choose train, val or all")
    dev = pick_device(device)
    with open_cache(cache_path) as cache:
        backbone = get_backbone(cache.signature["backbone"])
        trained = None
        if run_dir or decoder_file:
            trained = load_trained_decoder(run_dir or decoder_file, expect=cache.signature, expect_path=Path(cache_path))
        names = [c.name for c in cache.cases if c.n_rows > 0]
        if cases != "all":
            if run_dir is None:
                raise EmbedcacheError(f"--cases {cases} needs --run RUN_DIR (its split.json); or use --cases all")
            split = RunFolder(run_dir).split()
            names = [n for n in names if n in split[cases]]
        if not names:
            raise EmbedcacheError(f"{cache_path}: no {cases} cases to score")
        if checkpoint is None and trained is not None:
            checkpoint = trained.checkpoint
        parts, sha = load_backbone(backbone, checkpoint)
        require_weights(sha, cache.signature["checkpoint_sha256"], path=checkpoint, made=f"the cache {cache_path}")
        parts = parts.to(dev).eval()
        decoders = {"vanilla": parts.mask_decoder}
        if trained is not None:
            tuned = copy.deepcopy(parts.mask_decoder)  # the decoder alone: no second image encoder to build
            tuned.load_state_dict(trained.state)
            decoders["finetuned"] = tuned.eval()
        slice_size = cache.signature["preprocess"]["slice_size"]
        results, slices, kept = {}, [], {}
        task = progress.add_task("scoring", total=len(names)) if progress else None
        for case in [c for c in cache.cases if c.name in names]:
            truth = read_label(Path(case.label))
            if tuple(truth.array.shape) != tuple(case.shape_zyx):
                raise EmbedcacheError(f"{case.label}: label volume changed since encoding; encode again")
            preds = _predict_case(parts, decoders, cache, case, device=dev, input_size=backbone.input_size,
                                  slice_size=slice_size)
            results[case.name] = {}
            present = cache.present(case.rows)
            boxes, slice_z = cache.read("boxes", case.rows), cache.read("slice_index", case.rows)
            for j, label in enumerate(cache.labels):
                gt = truth.array == label
                entry = {}
                for model, pred in preds.items():
                    zs = np.flatnonzero(gt.any(axis=(1, 2)))
                    entry[model] = {
                        "dice": dice(pred[label], gt),
                        "nsd": nsd(pred[label], gt, spacing_mm=case.spacing_mm, tolerance_mm=flare.tolerance_mm(label)),
                        "dice_2d": float(np.mean([dice(pred[label][z], gt[z]) for z in zs])) if zs.size else 1.0,
                    }
                results[case.name][str(label)] = entry
                for i in range(case.n_rows):
                    box, z = boxes[i, j], int(slice_z[i])
                    if not present[i, j] or not gt[z].any():
                        continue
                    slices.append(SlicePrediction(case.name, label, z, tuple(float(v) for v in box),
                                                  {m: dice(preds[m][label][z], gt[z]) for m in preds}))
            if progress:
                progress.advance(task)
            for sp in slices:  # the overlays need these; best and worst are known only at the end
                if sp.case == case.name:
                    kept[(sp.case, sp.label, sp.z)] = {m: preds[m][sp.label][sp.z] for m in preds}
        report = _report(results, cache.labels, list(decoders), cache_path, run_dir, decoder_file, cases)
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(report, out_dir / "report.json")
        _write_csv(results, list(decoders), out_dir / "cases.csv")
        pictures = _overlays(cache, slices, kept, list(decoders), out_dir)
        _write_html(report, pictures, out_dir / "index.html")
        report["pictures"] = [str(p) for p in pictures]
        return report


def _report(results, labels, models, cache_path, run_dir, decoder_file, cases) -> dict:
    mean = {}
    for label in labels:
        mean[str(label)] = {
            model: {metric: float(np.mean([results[c][str(label)][model][metric] for c in results])) for metric in METRICS}
            for model in models
        }
    return {
        "cache": str(cache_path), "run": str(run_dir) if run_dir else None,
        "decoder": str(decoder_file) if decoder_file else None, "cases_scored": cases,
        "nsd_tolerance_mm": {str(k): flare.tolerance_mm(k) for k in labels},
        "labels": {str(k): flare.name(k) for k in labels},
        "models": models, "mean": mean, "cases": results,
    }


def _write_json(report: dict, path: Path) -> None:
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def _write_csv(results: dict, models: list[str], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "label", "model", *METRICS])
        for case, by_label in results.items():
            for label, by_model in by_label.items():
                for model in models:
                    writer.writerow([case, label, model, *[f"{by_model[model][m]:.4f}" for m in METRICS]])


def _contour(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask)


def _overlays(cache, slices: list[SlicePrediction], kept: dict, models: list[str], out_dir: Path,
              zoom: int = 4) -> list[Path]:
    """PNGs of the best and worst slice of each gland: CT, ground truth (green), vanilla (red),
    fine-tuned (yellow) contours and the box (white), cropped around the box and enlarged."""
    from PIL import Image, ImageDraw

    key_model = "finetuned" if "finetuned" in models else "vanilla"
    pictures = []
    images = {}
    for label in cache.labels:
        mine = sorted((s for s in slices if s.label == label), key=lambda s: s.dice_2d[key_model])
        for tag, s in (("worst", mine[0]), ("best", mine[-1])) if mine else ():
            case = cache.case(s.case)
            if case.name not in images:
                images[case.name] = (read_image(Path(case.image)), read_label(Path(case.label)))
            image, truth = images[case.name]
            ct = window_hu(image.array[s.z])
            h, w = ct.shape
            # the box is in slice pixels; the slice was resampled from (h, w)
            size = cache.signature["preprocess"]["slice_size"]
            x0, y0, x1, y1 = s.box[0] * w / size, s.box[1] * h / size, s.box[2] * w / size, s.box[3] * h / size
            pad = max(x1 - x0, y1 - y0) * 0.75 + 4
            cx0, cy0 = int(max(0, x0 - pad)), int(max(0, y0 - pad))
            cx1, cy1 = int(min(w, x1 + pad)), int(min(h, y1 + pad))
            rgb = np.repeat((ct[cy0:cy1, cx0:cx1, None] * 255).astype(np.uint8), 3, axis=2)
            layers = [(truth.array[s.z] == label, (0, 220, 0))]
            masks = kept[(s.case, s.label, s.z)]
            layers.append((masks["vanilla"], (230, 40, 40)))
            if "finetuned" in masks:
                layers.append((masks["finetuned"], (250, 220, 0)))
            big = np.kron(rgb, np.ones((zoom, zoom, 1), np.uint8))
            for mask, colour in layers:
                edge = _contour(np.kron(mask[cy0:cy1, cx0:cx1], np.ones((zoom, zoom), bool)))
                big[edge] = colour
            picture = Image.fromarray(big)
            ImageDraw.Draw(picture).rectangle(
                [(x0 - cx0) * zoom, (y0 - cy0) * zoom, (x1 - cx0) * zoom - 1, (y1 - cy0) * zoom - 1], outline=(255, 255, 255)
            )
            path = out_dir / f"{tag}-label{label}-{s.case}-z{s.z}.png"
            picture.save(path)
            pictures.append(path)
    return pictures


def _write_html(report: dict, pictures: list[Path], path: Path) -> None:
    models = report["models"]
    rows = []
    for label, name in report["labels"].items():
        for metric in METRICS:
            values = [report["mean"][label][m][metric] for m in models]
            diff = f"{values[1] - values[0]:+.4f}" if len(values) == 2 else ""
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{metric}</td>"
                        + "".join(f"<td>{v:.4f}</td>" for v in values) + f"<td>{diff}</td></tr>")
    head = "".join(f"<th>{m}</th>" for m in models)
    figures = "".join(
        f'<figure><img src="{p.name}" alt="{html.escape(p.stem)}"><figcaption>{html.escape(p.stem)}</figcaption></figure>'
        for p in pictures
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>embedcache score</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
figure{{display:inline-block;margin:8px}}img{{max-width:420px}}</style></head><body>
<h1>embedcache score</h1><p>cache {html.escape(report["cache"])}; {report["cases_scored"]} cases: {len(report["cases"])};
NSD tolerance {", ".join(f"{v:g}" for v in report["nsd_tolerance_mm"].values())} mm. Contours: ground truth green, vanilla red, fine-tuned yellow; box white.</p>
<table><tr><th>gland</th><th>metric</th>{head}<th>difference</th></tr>{"".join(rows)}</table>
<h2>Best and worst slices</h2>{figures}</body></html>
"""
    atomic_write_text(path, page)
