"""What is left for a click to fix? How much of a decoder's error is a thin rim on the gland's boundary.

A corrective click goes to the largest 3-D error component and changes its own slice and at most
``--reach`` slices each way. If the error after ``box3d`` is mostly a rim one pixel wide along the
boundary of every slice, split into many small components, five clicks cannot fix much of it, however
well the decoder heeds them. Per gland, after ``box3d`` and after ``--clicks`` clicks (``--refine local``):
the error voxels (missed and extra) in % of the gland's voxels, the share of them within one pixel
(in-plane, 8-neighbour) of the gland's boundary, and the largest 3-D error component's share of the
error (mean over cases). One JSON and one markdown table under benchmarks/results/.

    python benchmarks/error_rim.py BED/cache.h5 --split SPLIT.json --decoder RUN/decoder.safetensors --name bed
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from embedcache.config import ProtocolSettings
from embedcache.evaluation import protocols
from embedcache.runtime.devices import pick_device

from common import RESULTS, decoded_cases, machine, write_result


def rim(truth: np.ndarray) -> np.ndarray:
    """Voxels within one pixel (in-plane, 8-neighbour) of ``truth``'s boundary on each slice, on either side."""
    from scipy import ndimage

    square = np.ones((1, 3, 3), bool)
    return ndimage.binary_dilation(truth, square) & ~ndimage.binary_erosion(truth, square)


def error_shape(mask: np.ndarray, truth: np.ndarray) -> dict:
    """The error of ``mask`` against ``truth``: its voxels, those on the rim (:func:`rim`), its largest 3-D
    component (26-connected, as :func:`embedcache.model.clicks.corrective_click` aims) and the gland's voxels."""
    from scipy import ndimage

    error = mask ^ truth
    components, count = ndimage.label(error, np.ones((3, 3, 3), bool))
    largest = int(np.bincount(components.ravel())[1:].max()) if count else 0
    return {"error": int(error.sum()), "on_rim": int((error & rim(truth)).sum()), "largest": largest,
            "components": int(count), "gland": int(truth.sum())}


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path)
    parser.add_argument("--split", type=Path, required=True, help="split file; its test cases are measured")
    parser.add_argument("--decoder", type=Path, default=None, help="a trained decoder (default: vanilla)")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="", help="a word for the result's file name")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    names = json.loads(args.split.read_text())["test"]
    settings = {0: ProtocolSettings(), args.clicks: ProtocolSettings(clicks=args.clicks)}
    per_case: dict = {}
    labels: dict = {}
    for cache, case, truth, segment in decoded_cases(args.cache, names, args.decoder, device):
        for label in cache.labels:
            labels[str(label)] = cache.signature.label_map.name(label)
            gt = truth == label
            for clicks, setting in settings.items():
                protocol = "clicks" if clicks else "box3d"
                mask = protocols.run(protocol, segment, truth=gt, spacing_mm=case.spacing_mm, settings=setting,
                                     case=case.name, label=label).mask
                per_case.setdefault(str(clicks), {}).setdefault(str(label), {})[case.name] = error_shape(mask, gt)
    summary = {}
    for clicks, by_label in per_case.items():
        for label, cases in by_label.items():
            rows = list(cases.values())
            summary.setdefault(clicks, {})[label] = {
                "error_pct_of_gland": round(100 * sum(r["error"] for r in rows) / sum(r["gland"] for r in rows), 1),
                "on_rim_pct": round(100 * sum(r["on_rim"] for r in rows) / max(1, sum(r["error"] for r in rows)), 1),
                "largest_component_pct": round(100 * float(np.mean([r["largest"] / max(1, r["error"])
                                                                    for r in rows])), 1),
                "components": round(float(np.mean([r["components"] for r in rows])), 1), "cases": len(rows)}
    date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = {"benchmark": "error_rim", "cache": str(args.cache), "decoder": str(args.decoder or "vanilla"),
              "split": str(args.split), "test_cases": names, "clicks": args.clicks, "labels": labels,
              "machine": machine(device), "date": date, "summary": summary, "cases": per_case}
    lines = [f"Decoder {result['decoder']}, {len(names)} test cases of {args.cache.name}: the error after `box3d` and "
             f"after {args.clicks} clicks (`--refine local`).", "",
             "| gland | clicks | error, % of the gland | on the rim (±1 px), % of the error | largest 3-D component, "
             "% of the error | error components |", "| --- | --- | --- | --- | --- | --- |"]
    for label, name in labels.items():
        for clicks in summary:
            s = summary[clicks][label]
            lines.append(f"| {name} | {clicks} | {s['error_pct_of_gland']} | {s['on_rim_pct']} | "
                         f"{s['largest_component_pct']} | {s['components']} |")
    stem = "-".join(p for p in ("error-rim", args.name, device.type, date[:10]) if p)
    write_result(result, args.out, stem, "\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
