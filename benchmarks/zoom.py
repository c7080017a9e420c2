"""Zoom-out-zoom-in: does a gland's region, encoded again so that the gland fills the encoder's input, draw it finer?

A 512² slice reaches LiteMedSAM at 256² and its decoder draws at 256²: one output pixel is ~1.6 mm, where an
adrenal limb is 2-6 mm thick. Here each gland's region (its in-plane extent over all its slices, grown by
``--margin`` mm, square; its slices and 4 beyond each end) is resampled to ``--size`` pixels and encoded as a
case of its own, and a decoder is fine-tuned on those regions. Then, per gland of the held-out cases:

- ``box3d``: the whole-slice decoder walks the 3-D box, as ``score`` does;
- ``whole``: each slice that walk kept, decoded again with the box of its mask grown by ``--grow`` mm;
- ``zoom``: the same slices and boxes decoded in the gland's region by the zoom decoder, mapped back;
- ``average``: the mean of the two decoders' logits on the slice grid, thresholded at 0.

Each is scored (3-D Dice and NSD per gland) on the slice grid against the original labels. ``roundtrip``
checks the geometry: each gland's zoomed label mapped back onto its slices must equal the original (1.0).

    python benchmarks/zoom.py regions BED --split split.json --out ZOOM --margin 25
    embedcache encode ZOOM --out zoom.h5
    embedcache finetune zoom.h5 --split ZOOM/split.json --out runs/zoom
    python benchmarks/zoom.py study bed.h5 --decoder runs/whole/decoder.safetensors --zoom-cache zoom.h5 \\
        --zoom-decoder runs/zoom/decoder.safetensors --regions ZOOM/regions.json --split split.json --name N

``--second-style CACHE --second-zoom-cache ZCACHE --second-regions JSON`` scores the test cases painted
another way too (``phantom --anatomy --style arterial``, their regions made by ``regions`` alike). Val
chooses, test reports.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from embedcache.cache.regions import GlandRegion, box_to_region, gland_region, zoom_in, zoom_out
from embedcache.cache.store import open_cache
from embedcache.config import ProtocolSettings
from embedcache.evaluation import protocols
from embedcache.evaluation.metrics import gland_metrics
from embedcache.io.datasets import discover_cases
from embedcache.io.geometry import Geometry
from embedcache.io.labels import find_dataset_json, preset, read_label_map, write_dataset_json
from embedcache.io.nifti import write_nifti
from embedcache.io.volumes import read_image, read_label
from embedcache.model.decoder import logits_to_slice
from embedcache.model.prompts import box_from_mask, grow_box

from common import RESULTS, decoded_cases, machine, write_result

VIEWS = ("box3d", "whole", "zoom", "average")


def region_case(name: str, label: int) -> str:
    return f"{name}_g{label}"


def write_regions(bed: Path, split: dict, out: Path, *, margin_mm: float, size: int) -> dict:
    """Each adrenal of each split case in ``bed`` as a zoomed case of ``out`` (train and val cases under
    imagesTr/, test under imagesTs/), with ``out/regions.json`` (where each came from) and ``out/split.json``."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: not empty; give a new folder")
    known = {c.name: c for c in discover_cases(bed)}
    found = find_dataset_json(bed)
    label_map = read_label_map(found) if found else preset("flare22")
    regions, zsplit = {}, {key: [] for key in split}
    for key, names in split.items():
        subset = "Ts" if key == "test" else "Tr"
        for name in names:
            source = known[name]
            image, labels = read_image(source.image), read_label(source.label).array
            syx = image.geometry.spacing_mm[1:]
            for label in label_map.adrenals():
                gland = labels == label
                if not gland.any():
                    continue
                where = gland_region(gland, syx, margin_mm=margin_mm, size=size)
                zs = slice(where.z0, where.z1 + 1)
                ct = zoom_in(image.array[zs], where.region, syx)
                mask = zoom_in(gland[zs], where.region, syx, mask=True).astype(np.uint8) * label
                step = where.region.pixel_mm
                dz = image.geometry.spacing_mm[0]
                geometry = Geometry((size, size, ct.shape[0]), np.diag([-step, -step, dz, 1.0]))
                case = region_case(name, label)
                for kind in ("images", "labels"):
                    (out / f"{kind}{subset}").mkdir(parents=True, exist_ok=True)
                write_nifti(ct, geometry, out / f"images{subset}" / f"{case}_0000.nii.gz")
                write_nifti(mask, geometry, out / f"labels{subset}" / f"{case}.nii.gz")
                regions[case] = {**where.to_dict(), "source": name, "label": int(label),
                                 "spacing_mm": [float(v) for v in image.geometry.spacing_mm]}
                zsplit[key].append(case)
                print(f"{case}: {where.region.side_mm:.1f} mm, {ct.shape[0]} slices", flush=True)
    write_dataset_json(out, training=sum(len(v) for k, v in zsplit.items() if k != "test"), name="zoomed regions",
                       label_map=label_map)
    (out / "regions.json").write_text(json.dumps({"margin_mm": margin_mm, "size": size, "regions": regions}, indent=1))
    (out / "split.json").write_text(json.dumps(zsplit, indent=1))
    return regions


def _logits_on(low: np.ndarray, decoder, shape_yx) -> np.ndarray:
    """A decoder's low-resolution logits ``(k, 256, 256)`` → ``(k, *shape_yx)`` on its slice grid, as the masks are
    made (:func:`embedcache.model.decoder.masks_on_grid`) but before the threshold."""
    t = logits_to_slice(torch.as_tensor(low)[:, None], input_size=decoder.input_size, slice_size=decoder.slice_size)
    return F.interpolate(t, size=tuple(shape_yx), mode="bilinear", align_corners=False)[:, 0].numpy()


def _back(logits: np.ndarray, where: GlandRegion, spacing_yx, shape_yx) -> np.ndarray:
    """Logits on the region's grid → the slice's, bilinearly; far below zero outside the region."""
    height, width = shape_yx
    us, vs = where.region.to_region(np.arange(width) + 0.5, np.arange(height) + 0.5, spacing_yx)
    vv, uu = np.meshgrid(vs - 0.5, us - 0.5, indexing="ij")
    return np.stack([ndimage.map_coordinates(z, [vv, uu], order=1, mode="constant", cval=-20.0) for z in logits])


def study_set(cache: Path, decoder: Path | None, zoom_cache: Path, zoom_decoder: Path | None, regions: dict,
              names: list[str], grow_mm: float, device) -> dict:
    """Per gland (``CASE_gLABEL``) of ``names``: each view's Dice and NSD, the slices re-decoded and the round trip."""
    wanted = [c for c, r in regions.items() if r["source"] in names]
    zoomed = {case.name: (seg, truth, case.n_rows)
              for _, case, truth, seg in decoded_cases(zoom_cache, wanted, zoom_decoder, device)}
    out = {}
    for c, case, truth, seg in decoded_cases(cache, names, decoder, device):
        for label in c.signature.label_map.adrenals():
            key = region_case(case.name, label)
            if key not in zoomed:
                continue
            gland, syx = truth == label, case.spacing_mm[1:]
            where = GlandRegion.from_dict(regions[key])
            zseg, ztruth, zrows = zoomed[key]
            back = zoom_out(ztruth == label, where.region, syx, gland.shape[1:])
            roundtrip = float(np.array_equal(back, gland[where.z0 : where.z1 + 1])
                              and not gland[: where.z0].any() and not gland[where.z1 + 1 :].any())
            base = protocols.run("box3d", seg, truth=gland, spacing_mm=case.spacing_mm, settings=ProtocolSettings(),
                                 case=case.name, label=label).mask
            views = {view: base.copy() for view in VIEWS}
            zs = [z for z in range(gland.shape[0]) if base[z].any() and where.z0 <= z <= where.z1]
            if zs:
                boxes = np.array([grow_box(box_from_mask(base[z]), (grow_mm / syx[1], grow_mm / syx[0]),
                                           within=(0, 0, gland.shape[2], gland.shape[1])) for z in zs], np.float32)
                _, _, wlow = seg(np.array(zs), boxes, low_res=True)
                zboxes = np.array([box_to_region(b, where.region, syx) for b in boxes], np.float32)
                _, _, zlow = zseg(np.array(zs) - where.z0, zboxes, low_res=True)
                whole = _logits_on(wlow, seg.decoder, gland.shape[1:])
                size = where.region.size
                zoom = _back(_logits_on(zlow, zseg.decoder, (size, size)), where, syx, gland.shape[1:])
                for i, z in enumerate(zs):
                    views["whole"][z] = whole[i] > 0
                    views["zoom"][z] = zoom[i] > 0
                    views["average"][z] = whole[i] + zoom[i] > 0
            row = {"roundtrip": roundtrip, "slices": len(zs), "encoded": {"case": case.n_rows, "region": zrows}}
            for view, mask in views.items():
                m = gland_metrics(mask, gland, spacing_mm=case.spacing_mm, label=label, label_map=c.signature.label_map)
                row[view] = {"dice": float(m["dice"]), "nsd": float(m["nsd"])}
            out[key] = row
            print(key, {v: round(row[v]["dice"], 3) for v in VIEWS}, flush=True)
    return out


def means(rows: dict, label: int) -> dict:
    """Each view's mean Dice and NSD over the glands of ``label``."""
    mine = [r for k, r in rows.items() if k.endswith(f"_g{label}")]
    return {view: {m: float(np.mean([r[view][m] for r in mine])) for m in ("dice", "nsd")} for view in VIEWS} \
        if mine else {}


def encoded(rows: dict) -> dict:
    """Slices encoded: the whole-slice cache's (each case once) and the regions' (each gland's own)."""
    cases = {key.rsplit("_g", 1)[0]: row["encoded"]["case"] for key, row in rows.items()}
    return {"whole": int(sum(cases.values())), "regions": int(sum(r["encoded"]["region"] for r in rows.values()))}


def table(result: dict) -> str:
    lines = [f"# Zoom-out-zoom-in: {result['name']}", "",
             f"Regions grown {result['margin_mm']:g} mm, resampled to {result['size']}²; boxes grown "
             f"{result['grow_mm']:g} mm. Dice / NSD per gland (mean over glands).", "",
             "| set | gland | " + " | ".join(VIEWS) + " | round trip |", "|---|---|" + "---|" * (len(VIEWS) + 1)]
    for name, rows in result["sets"].items():
        for label in result["labels"]:
            m = means(rows, label)
            if not m:
                continue
            trip = min(r["roundtrip"] for k, r in rows.items() if k.endswith(f"_g{label}"))
            cells = " | ".join(f"{m[v]['dice']:.3f} / {m[v]['nsd']:.3f}" for v in VIEWS)
            lines.append(f"| {name} | {label} | {cells} | {trip:g} |")
    lines += ["", "Slices encoded: " + "; ".join(f"{name}: {n['whole']} whole, {n['regions']} in regions"
                                                for name, n in result["encoded"].items()) + "."]
    return "\n".join(lines) + "\n"


def study(args) -> dict:
    split = json.loads(Path(args.split).read_text())
    device = torch.device(args.device)
    decoder = None if args.decoder == "vanilla" else Path(args.decoder)
    zdecoder = None if args.zoom_decoder == "vanilla" else Path(args.zoom_decoder)
    loaded = json.loads(Path(args.regions).read_text())
    sets = {"val": (Path(args.cache), Path(args.zoom_cache), loaded, split["val"]),
            "test": (Path(args.cache), Path(args.zoom_cache), loaded, split["test"])}
    if args.second_style:
        second = json.loads(Path(args.second_regions).read_text())
        sets["test, 2nd style"] = (Path(args.second_style), Path(args.second_zoom_cache), second, split["test"])
    with open_cache(Path(args.cache)) as cache:
        labels = [int(v) for v in cache.signature.label_map.adrenals()]
    what = (f"{len(split['val'])} val and {len(split['test'])} test cases of {args.cache}"
            + (f" (test also painted another way: {args.second_style})" if args.second_style else "")
            + f"; whole-slice decoder {args.decoder}, zoom decoder {args.zoom_decoder}; each gland's region grown "
            f"{loaded['margin_mm']:g} mm, resampled to {loaded['size']}²; the box3d walk's slices decoded again with "
            f"boxes grown {args.grow:g} mm")
    result = {"benchmark": "zoom", "what": what, "name": args.name,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(device), "cache": args.cache, "decoder": args.decoder, "zoom_cache": args.zoom_cache,
              "zoom_decoder": args.zoom_decoder, "margin_mm": loaded["margin_mm"], "size": loaded["size"],
              "grow_mm": args.grow, "labels": labels, "seconds": {}, "sets": {}}
    for name, (cache, zcache, regions, names) in sets.items():
        start = time.perf_counter()
        result["sets"][name] = study_set(cache, decoder, zcache, zdecoder, regions["regions"], names, args.grow, device)
        result["seconds"][name] = round(time.perf_counter() - start, 1)
    result["encoded"] = {name: encoded(rows) for name, rows in result["sets"].items()}
    result["means"] = {name: {str(label): means(rows, label) for label in labels}
                       for name, rows in result["sets"].items()}
    write_result(result, Path(args.out), args.name, table(result))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    regions = commands.add_parser("regions", help="write each gland's zoomed region as a case of a new dataset")
    regions.add_argument("bed", help="the dataset folder (imagesTr/, labelsTr/, imagesTs/, labelsTs/)")
    regions.add_argument("--split", required=True, help='{"train": [...], "val": [...], "test": [...]} of its cases')
    regions.add_argument("--out", required=True, help="a new folder")
    regions.add_argument("--margin", type=float, default=25.0, help="mm added around the gland's extent")
    regions.add_argument("--size", type=int, default=512, help="the region's side in pixels")
    run = commands.add_parser("study", help="score box3d, whole, zoom and their average per gland")
    run.add_argument("cache", help="the whole-slice cache")
    run.add_argument("--decoder", required=True, help="whole-slice decoder (.safetensors) or vanilla")
    run.add_argument("--zoom-cache", required=True)
    run.add_argument("--zoom-decoder", required=True, help="zoom decoder (.safetensors) or vanilla")
    run.add_argument("--regions", required=True, help="regions.json that `regions` wrote")
    run.add_argument("--split", required=True)
    run.add_argument("--grow", type=float, default=2.0, help="mm each kept slice's box is grown before decoding")
    run.add_argument("--second-style")
    run.add_argument("--second-zoom-cache")
    run.add_argument("--second-regions")
    run.add_argument("--name", default="zoom")
    run.add_argument("--out", default=str(RESULTS))
    run.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.command == "regions":
        return write_regions(Path(args.bed), json.loads(Path(args.split).read_text()), Path(args.out),
                             margin_mm=args.margin, size=args.size)
    if args.second_style and not (args.second_zoom_cache and args.second_regions):
        parser.error("--second-style needs --second-zoom-cache and --second-regions")
    return study(args)


if __name__ == "__main__":
    sys.exit(main() and 0)
