"""Zoom-out-zoom-in: does a gland's region, encoded again so that the gland fills the encoder's input, draw it finer?

A 512² slice reaches LiteMedSAM at 256² and its decoder draws at 256²: one output pixel is ~1.6 mm, where an
adrenal limb is 2-6 mm thick. ``encode --zoom MM`` caches each gland's region instead (its in-plane extent over
all its slices grown by MM, square, resampled to the slice size), and a decoder is fine-tuned on those regions.
Then, per gland of the held-out cases (:func:`embedcache.evaluation.zoom.redraw`):

- ``box3d``: the whole-slice decoder walks the 3-D box, as ``score`` does;
- ``whole``: each slice that walk kept, decoded again by it with the box of its mask grown by ``--grow`` mm;
- ``zoom``: the same slices and boxes decoded in the gland's region by the zoom decoder alone, mapped back;
- ``average``: the mean of the two decoders' logits on the slice grid, thresholded at 0 (``score --zoom``).

With ``--clicks N``, two more: ``box3d+clicks`` (N corrective clicks from ``box3d`` through the whole-slice decoder,
``score``'s ``clicks``) and ``average+clicks`` (N clicks from ``average``, each decoded by both views:
:class:`embedcache.evaluation.zoom.BothViews`, ``score --zoom``'s ``clicks``).

Each is scored (3-D Dice and NSD per gland) on the slice grid against the original labels. ``roundtrip``
checks the geometry: each gland's cached region masks mapped back onto its slices must equal the original (1.0).

    embedcache encode BED --out zoom.h5 --zoom 25
    embedcache finetune zoom.h5 --split split.json --out runs/zoom   # the whole-slice run's split, by case
    python benchmarks/zoom.py bed.h5 --decoder runs/whole/decoder.safetensors --zoom-cache zoom.h5 \\
        --zoom-decoder runs/zoom/decoder.safetensors --split split.json --name N

``--second-style CACHE --second-zoom-cache ZCACHE`` scores the test cases painted another way too
(``phantom --anatomy --style arterial``, encoded both ways alike). Val chooses, test reports.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch

from embedcache.cache.plan import gland_name
from embedcache.cache.regions import GlandRegion, zoom_out
from embedcache.cache.store import open_cache
from embedcache.config import ProtocolSettings
from embedcache.evaluation import protocols
from embedcache.evaluation.metrics import gland_metrics
from embedcache.evaluation.zoom import BothViews, redraw, redraw_prediction

from common import RESULTS, decoded_cases, machine, write_result

VIEWS = ("box3d", "whole", "zoom", "average")
CLICK_VIEWS = ("box3d+clicks", "average+clicks")
ORACLE_VIEWS = ("oracle", "oracle average")  # --oracle: a tight box on every slice of the gland, then both views
WEIGHTS = {"whole": (1.0, 0.0), "zoom": (0.0, 1.0), "average": (1.0, 1.0)}


def study_set(cache: Path, decoder: Path | None, zoom_cache: Path, zoom_decoder: Path | None, names: list[str],
              grow_mm: float, device, clicks: int = 0, oracle: bool = False) -> dict:
    """Per gland (``CASE@LABEL``) of ``names``: each view's Dice and NSD, the slices drawn again, the slices each
    cache encodes, and the round trip."""
    with open_cache(zoom_cache) as zc:
        wanted = [c.name for c in zc.cases if c.region and c.region["source"] in names]
    zoomed = {}
    for zc, zcase, _, zseg in decoded_cases(zoom_cache, wanted, zoom_decoder, device, view="regions"):
        zoomed[zcase.name] = (zseg, zcase, zc.read("masks", zcase.rows) > 0)
    out = {}
    for c, case, truth, seg in decoded_cases(cache, names, decoder, device):
        for label in c.signature.label_map.adrenals():
            key = gland_name(case.name, label)
            if key not in zoomed:
                continue
            gland, syx = truth == label, case.spacing_mm[1:]
            zseg, zcase, masks = zoomed[key]
            where = GlandRegion.from_dict(zcase.region)
            back = zoom_out(masks, where.region, syx, gland.shape[1:])
            roundtrip = float(np.array_equal(back, gland[where.z0 : where.z1 + 1])
                              and not gland[: where.z0].any() and not gland[where.z1 + 1 :].any())
            settings = ProtocolSettings(clicks=clicks)
            first = protocols.run("box3d", seg, truth=gland, spacing_mm=case.spacing_mm, settings=settings,
                                  case=case.name, label=label)
            base = first.mask
            views = {"box3d": base, **{view: redraw(base, seg, zseg, where, syx, grow_mm=grow_mm, weights=w)
                                       for view, w in WEIGHTS.items()}}
            if oracle:
                tight = protocols.run("oracle", seg, truth=gland, spacing_mm=case.spacing_mm, settings=settings,
                                      case=case.name, label=label).mask
                views["oracle"] = tight
                views["oracle average"] = redraw(tight, seg, zseg, where, syx, grow_mm=grow_mm, weights=WEIGHTS["average"])
            if clicks:
                run = partial(protocols.run, "clicks", truth=gland, spacing_mm=case.spacing_mm, settings=settings,
                              case=case.name, label=label)
                views["box3d+clicks"] = run(seg, start=first).mask
                both = BothViews(seg, zseg, where, syx, gland.shape[1:])
                views["average+clicks"] = run(both, start=redraw_prediction(first, both, grow_mm=grow_mm)).mask
            kept = sum(1 for z in range(where.z0, where.z1 + 1) if base[z].any())
            row = {"roundtrip": roundtrip, "slices": kept, "encoded": {"case": case.n_rows, "region": zcase.n_rows}}
            for view, mask in views.items():
                m = gland_metrics(mask, gland, spacing_mm=case.spacing_mm, label=label, label_map=c.signature.label_map)
                row[view] = {"dice": float(m["dice"]), "nsd": float(m["nsd"])}
            out[key] = row
            print(key, {v: round(row[v]["dice"], 3) for v in views}, flush=True)
    return out


def views_of(rows: dict) -> tuple[str, ...]:
    """The views scored (with ``--oracle`` and ``--clicks``, those too)."""
    return VIEWS + tuple(v for extra in (ORACLE_VIEWS, CLICK_VIEWS) if any(extra[0] in r for r in rows.values())
                         for v in extra)


def means(rows: dict, label: int) -> dict:
    """Each view's mean Dice and NSD over the glands of ``label``."""
    mine = [r for k, r in rows.items() if k.endswith(f"@{label}")]
    return {view: {m: float(np.mean([r[view][m] for r in mine])) for m in ("dice", "nsd")}
            for view in views_of(rows)} if mine else {}


def encoded(rows: dict) -> dict:
    """Slices encoded: the whole-slice cache's (each case once) and the regions' (each gland's own)."""
    cases = {key.rsplit("@", 1)[0]: row["encoded"]["case"] for key, row in rows.items()}
    return {"whole": int(sum(cases.values())), "regions": int(sum(r["encoded"]["region"] for r in rows.values()))}


def table(result: dict) -> str:
    views = views_of(next(iter(result["sets"].values()), {}))
    clicks = f"; {result['clicks']} corrective clicks" if result.get("clicks") else ""
    lines = [f"# Zoom-out-zoom-in: {result['name']}", "",
             f"Regions grown {result['margin_mm']:g} mm, resampled to {result['size']}²; boxes grown "
             f"{result['grow_mm']:g} mm{clicks}. Dice / NSD per gland (mean over glands).", "",
             "| set | gland | " + " | ".join(views) + " | round trip |", "|---|---|" + "---|" * (len(views) + 1)]
    for name, rows in result["sets"].items():
        for label in result["labels"]:
            m = means(rows, label)
            if not m:
                continue
            trip = min(r["roundtrip"] for k, r in rows.items() if k.endswith(f"@{label}"))
            cells = " | ".join(f"{m[v]['dice']:.3f} / {m[v]['nsd']:.3f}" for v in views)
            lines.append(f"| {name} | {label} | {cells} | {trip:g} |")
    lines += ["", "Slices encoded: " + "; ".join(f"{name}: {n['whole']} whole, {n['regions']} in regions"
                                                for name, n in result["encoded"].items()) + "."]
    return "\n".join(lines) + "\n"


def study(args) -> dict:
    split = json.loads(Path(args.split).read_text())
    device = torch.device(args.device)
    decoder = None if args.decoder == "vanilla" else Path(args.decoder)
    zdecoder = None if args.zoom_decoder == "vanilla" else Path(args.zoom_decoder)
    sets = {"val": (Path(args.cache), Path(args.zoom_cache), split["val"]),
            "test": (Path(args.cache), Path(args.zoom_cache), split["test"])}
    if args.second_style:
        sets["test, 2nd style"] = (Path(args.second_style), Path(args.second_zoom_cache), split["test"])
    with open_cache(Path(args.cache)) as cache:
        labels = [int(v) for v in cache.signature.label_map.adrenals()]
    with open_cache(Path(args.zoom_cache)) as zc:
        margin, size = zc.signature.zoom_mm, zc.signature.slice_size
    if not margin:
        raise SystemExit(f"{args.zoom_cache}: not a zoom cache; make one with embedcache encode --zoom MM")
    what = (f"{len(split['val'])} val and {len(split['test'])} test cases of {args.cache}"
            + (f" (test also painted another way: {args.second_style})" if args.second_style else "")
            + f"; whole-slice decoder {args.decoder}, zoom decoder {args.zoom_decoder}; each gland's region grown "
            f"{margin:g} mm, resampled to {size}²; the box3d walk's slices decoded again with boxes grown "
            f"{args.grow:g} mm")
    result = {"benchmark": "zoom", "what": what, "name": args.name,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(device), "cache": args.cache, "decoder": args.decoder, "zoom_cache": args.zoom_cache,
              "zoom_decoder": args.zoom_decoder, "margin_mm": margin, "size": size, "grow_mm": args.grow,
              "labels": labels, "clicks": args.clicks, "oracle": args.oracle, "seconds": {}, "sets": {}}
    for name, (cache, zcache, names) in sets.items():
        start = time.perf_counter()
        result["sets"][name] = study_set(cache, decoder, zcache, zdecoder, names, args.grow, device, args.clicks,
                                         args.oracle)
        result["seconds"][name] = round(time.perf_counter() - start, 1)
    result["encoded"] = {name: encoded(rows) for name, rows in result["sets"].items()}
    result["means"] = {name: {str(label): means(rows, label) for label in labels}
                       for name, rows in result["sets"].items()}
    write_result(result, Path(args.out), args.name, table(result))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", help="the whole-slice cache")
    parser.add_argument("--decoder", required=True, help="whole-slice decoder (.safetensors) or vanilla")
    parser.add_argument("--zoom-cache", required=True, help="the same cases encoded with encode --zoom")
    parser.add_argument("--zoom-decoder", required=True, help="a decoder fine-tuned on the zoom cache, or vanilla")
    parser.add_argument("--split", required=True, help='{"train": [...], "val": [...], "test": [...]} by case')
    parser.add_argument("--grow", type=float, default=2.0, help="mm each kept slice's box is grown before decoding")
    parser.add_argument("--clicks", type=int, default=0, help="also N corrective clicks from box3d and from average")
    parser.add_argument("--oracle", action="store_true", help="also oracle (a tight box on every slice of the gland), "
                                                              "alone and drawn again by both views")
    parser.add_argument("--second-style", help="the test cases painted another way, encoded on whole slices")
    parser.add_argument("--second-zoom-cache", help="and with encode --zoom")
    parser.add_argument("--name", default="zoom")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if bool(args.second_style) != bool(args.second_zoom_cache):
        parser.error("--second-style and --second-zoom-cache go together")
    return study(args)


if __name__ == "__main__":
    sys.exit(main() and 0)
