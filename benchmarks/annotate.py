"""Is interactive annotation fast enough? Latency of a person's box and clicks, per engine and encoder precision.

The target (the interactive-annotation issue): with LiteMedSAM, a corrective click gives the updated 3-D mask in
at most 0.3 s once the box's slices are encoded, and the first box of a new volume its 3-D mask in at most 15 s.
Everything runs through :class:`~embedcache.segment.annotate.Annotation`, as a viewer drives it, on one
realistic-anatomy case: CT painted around a real label map (the first of ``--labels`` holding both adrenal glands,
or ``--case``; ``embedcache phantom --anatomy`` paints the same), else (no such folder, or ``--phantom``) a phantom
case, which the output says. Per gland the box is the 3-D box a person draws (the gland's extent, 3 mm and one
slice of margin: ``box3d``'s), and each click is the clicks protocol's next corrective click (the most interior
voxel of the largest 3-D error). Per engine spec (``ENGINE`` or ``ENGINE:PRECISION``; default: every engine
installed at every precision it offers on this CPU, those missing recorded as skipped):

* **warm-up**: one ``Annotation.open`` and first box (``--quick``: the open alone) in a fresh engine cache folder: the graph exports (and the
  streams measurement) a first run ever pays, timed, with the files it wrote.
* **cold**: a new ``Annotation.open`` (exports cached, in the same process: a viewer opening the next volume, not
  a fresh process's imports) to the first box's 3-D mask, with the slices it had to encode; then the second gland's
  box.
* **warm clicks**: every slice of each box encoded, then up to ``--clicks`` clicks per gland, each timed from
  ``Annotation.click`` to the new label volume (``Annotation.labels()``): median and max.
* **where the time goes**, per step, from wrappers around the annotation's segmenter and slice encoder (no library
  code changed): decodes, seconds decoding, seconds the walk waited for embeddings (encoding, as a person feels
  it; the encoder's busy seconds over all streams too), and the rest (propagation, masks, the label volume); on a
  graph engine, the seconds loading the eager decoder that clicks need (the graph decodes boxes only).

``os.getloadavg()`` is recorded before and after each spec; with the 1-minute load above ``--max-load`` the run
waits (up to ``--wait`` tries of 30 s) before starting a spec. One JSON and a markdown table under
benchmarks/results/.

    python benchmarks/annotate.py                        # LiteMedSAM, every engine, the FLARE22 label maps
    python benchmarks/annotate.py --engines torch,openvino:bf16 --clicks 3
    python benchmarks/annotate.py --quick                # a smoke run: a small phantom, one click per gland
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from embedcache.config import PRECISIONS, PhantomConfig, PredictConfig, ProtocolSettings
from embedcache.errors import UsageError
from embedcache.evaluation.metrics import dice
from embedcache.evaluation.protocols import box3d_from_label
from embedcache.io.nifti import is_nifti, nifti_stem, write_nifti
from embedcache.io.volumes import read_label
from embedcache.model.clicks import corrective_click
from embedcache.model.engines import ENGINES, cache_folder, check_engine, installed_engines
from embedcache.segment.annotate import Annotation
from embedcache.synth.anatomy import paint_ct
from embedcache.synth.phantom import write_phantom

from common import RESULTS, machine, own_engine_cache, phantom_config, write_result

#: Where the benchmarks find real label maps to paint CT around (never copied into the repository).
LABELS = Path("/work/shared/data/flare22-labels")
#: The targets of the interactive-annotation issue, in seconds.
CLICK_TARGET_S, FIRST_BOX_TARGET_S = 0.3, 15.0
#: The glands the vanilla decoder segments (FLARE22's right and left adrenal).
ADRENALS = (7, 8)


def specs_offered() -> tuple[list[str], dict[str, str]]:
    """Every ``ENGINE:PRECISION`` this CPU runs (torch first), and why each other one is skipped."""
    offered, skipped = [], {}
    for engine in [e for e in ENGINES if e != "auto"]:
        for precision in PRECISIONS:
            spec = engine if precision == "fp32" else f"{engine}:{precision}"
            try:
                check_engine(engine, "cpu", precision)
            except UsageError as exc:
                if engine == "openvino" or precision == "fp32":  # bf16 is openvino's alone: not a skip elsewhere
                    skipped[spec] = str(exc)
                continue
            if precision == "bf16" and not _cpu_bf16():
                skipped[spec] = "this CPU has no bf16 instructions OpenVINO uses"
                continue
            offered.append(spec)
    return offered, skipped


def _cpu_bf16() -> bool:
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def parse_spec(spec: str) -> tuple[str, str]:
    """``openvino:bf16`` → ``("openvino", "bf16")``."""
    engine, _, precision = spec.partition(":")
    return engine, precision or "fp32"


def make_case(folder: Path, labels: Path | None, case: str | None, phantom: PhantomConfig) -> dict:
    """The CT to annotate, written under ``folder``: painted around a real label map of ``labels`` (``case``, else
    the first holding both adrenal glands), else a phantom case. Returns its image path, truth and description."""
    maps = sorted(p for p in labels.iterdir() if is_nifti(p)) if labels is not None and labels.is_dir() else []
    if case is not None:
        maps = [p for p in maps if nifti_stem(p) == case]
        if not maps:
            sys.exit(f"--case {case}: no such label map in {labels}")
    for path in maps:
        volume = read_label(path)
        if all((volume.array == label).any() for label in ADRENALS):
            image = folder / f"{nifti_stem(path)}_0000.nii.gz"
            write_nifti(paint_ct(volume.array, volume.spacing_mm, seed=0), volume.geometry, image)
            return {"image": image, "truth": volume.array, "spacing_mm": volume.spacing_mm,
                    "source": f"CT painted around the label map {path.name} (embedcache.synth.anatomy, seed 0)",
                    "name": nifti_stem(path), "realistic": True}
    why = "--phantom" if labels is None else f"no label map with both adrenal glands under {labels}"
    write_phantom(folder / "phantom", cases=1, seed=0, config=phantom)
    volume = read_label(folder / "phantom" / "labelsTr" / "PHANTOM_0001.nii.gz")
    print(f"{why}: annotating a phantom case instead (its glands are smoother than real ones)", file=sys.stderr)
    return {"image": folder / "phantom" / "imagesTr" / "PHANTOM_0001_0000.nii.gz", "truth": volume.array,
            "spacing_mm": volume.spacing_mm, "source": f"embedcache phantom at {phantom.size} px ({why})",
            "name": "PHANTOM_0001", "realistic": False}


class Meter:
    """Counts what an :class:`Annotation` spends, by wrapping its segmenter and its volume's slice encoder (attributes
    of this one annotation; nothing in the library changes): decodes and their seconds, seconds the walk waited for
    embeddings, the encoder's slices and busy seconds (over all its streams), the eager decoder's loading."""

    def __init__(self, annotation: Annotation):
        self.lock = threading.Lock()
        self.counts = dict.fromkeys(("decodes", "calls", "segment_s", "wait_s", "encodes", "encode_busy_s",
                                     "heads_s"), 0)
        volume, segment = annotation.volume, annotation.segment
        encode, embeddings = volume._encode, volume.embeddings

        def timed_encode(z):  # in the walk's thread (torch) or an encoder stream's (graph engines, ahead)
            started = time.perf_counter()
            out = encode(z)
            self._add(encodes=1, encode_busy_s=time.perf_counter() - started)
            return out

        def timed_embeddings(zs):  # only ever inside a segmenter call: the time it waited for embeddings
            started = time.perf_counter()
            out = embeddings(zs)
            self._add(wait_s=time.perf_counter() - started)
            return out

        volume._encode, volume.embeddings = timed_encode, timed_embeddings
        annotation.segment = _CountedSegment(segment, self)
        graph = segment.decoder.decode
        if graph is not None:  # a graph engine decodes clicks with the eager modules, loaded on the first click
            load = graph.load_heads

            def timed_load():
                started = time.perf_counter()
                out = load()
                self._add(heads_s=time.perf_counter() - started)
                return out

            graph.load_heads = timed_load

    def _add(self, **amounts) -> None:
        with self.lock:
            for key, value in amounts.items():
                self.counts[key] += value

    def snapshot(self) -> dict:
        with self.lock:
            return dict(self.counts)


class _CountedSegment:
    """The annotation's segmenter, each call timed and its decodes (prompts) counted."""

    def __init__(self, segment, meter: Meter):
        self.segment, self.meter = segment, meter

    def __getattr__(self, name):  # feeds_back, ahead, decoder, slices: the segmenter's own
        return getattr(self.segment, name)

    def __call__(self, zs, boxes, **kwargs):
        started = time.perf_counter()
        out = self.segment(zs, boxes, **kwargs)
        self.meter._add(calls=1, decodes=len(zs), segment_s=time.perf_counter() - started)
        return out


def step(meter: Meter, action) -> tuple[object, dict]:
    """Run ``action()``; its result and where its wall seconds went: ``decode_s`` (in the segmenter, not waiting for
    embeddings), ``encode_s`` (waiting for them), ``other_s`` (the rest) add up to ``seconds``."""
    before, started = meter.snapshot(), time.perf_counter()
    result = action()
    wall = time.perf_counter() - started
    d = {k: v - before[k] for k, v in meter.snapshot().items()}
    return result, {"seconds": wall, "decodes": d["decodes"], "decode_s": d["segment_s"] - d["wait_s"],
                    "encode_s": d["wait_s"], "other_s": wall - d["segment_s"], "encodes": d["encodes"],
                    "encode_busy_s": d["encode_busy_s"], "heads_s": d["heads_s"]}


def rounded(figures: dict, digits: int = 4) -> dict:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in figures.items()}


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def wait_for_quiet(max_load: float, tries: int) -> list[list[float]]:
    """The load averages seen, waiting 30 s at a time (at most ``tries`` times) while the 1-minute one is above
    ``max_load``: another user's tests would slow every figure (and the spec before's own load takes a while to
    leave the 1-minute average)."""
    seen = [load_average()]
    while seen[-1][0] > max_load and len(seen) <= tries:
        print(f"load average {seen[-1]} above {max_load}: waiting 30 s", file=sys.stderr, flush=True)
        time.sleep(30)
        seen.append(load_average())
    return seen


def measure(spec: str, case: dict, glands: dict, *, model: str, clicks: int, streams: int,
            warmup_box: bool = True) -> dict:
    """One spec's warm-up, cold first box, second box and warm clicks on ``case``."""
    engine, precision = parse_spec(spec)
    config = PredictConfig(model=model, device="cpu", engine=engine, precision=precision,
                           streams=streams if engine != "torch" else 0)
    spacing, truth = case["spacing_mm"], case["truth"]
    first, *rest = glands
    out: dict = {"engine": engine, "precision": precision}

    # warm-up: the first run ever on this machine (fresh engine cache folder): exports, streams measured
    before_files = {p.name for p in cache_folder().rglob("*") if p.is_file()} if cache_folder().is_dir() else set()
    started = time.perf_counter()
    annotation = Annotation.open(case["image"], config)
    opened = time.perf_counter() - started
    out["warmup"] = {"open_s": round(opened, 3)}
    if warmup_box:  # the first box ever: a graph session's first runs, the encoder's first allocations
        _, figures = step(Meter(annotation), lambda: annotation.box(first, *glands[first]["z"], glands[first]["xyxy"]))
        out["warmup"]["first_box_s"] = round(figures["seconds"], 3)
    annotation.close()
    written = sorted({p.name for p in cache_folder().rglob("*") if p.is_file()} - before_files)
    out["warmup"].update(files_written=written, exported=any(n.endswith((".onnx", ".xml")) for n in written))
    del annotation
    gc.collect()

    # cold: a new volume, exports cached
    started = time.perf_counter()
    annotation = Annotation.open(case["image"], config)
    opened = time.perf_counter() - started
    meter = Meter(annotation)
    out["streams"] = annotation.volume.encoder.streams or 1
    prediction, figures = step(meter, lambda: annotation.box(first, *glands[first]["z"], glands[first]["xyxy"]))
    out["cold_first_box"] = rounded({"open_s": opened, "box_s": figures["seconds"],
                                     "seconds": opened + figures["seconds"], **{k: v for k, v in figures.items()
                                                                               if k != "seconds"}})
    out["boxes"] = {str(first): rounded({**figures, "dice": dice(prediction.mask, truth == first)})}
    for label in rest:
        prediction, figures = step(meter, lambda label=label: annotation.box(label, *glands[label]["z"],
                                                                             glands[label]["xyxy"]))
        out["boxes"][str(label)] = rounded({**figures, "dice": dice(prediction.mask, truth == label)})

    # warm: every slice of each box encoded, then corrective clicks
    for label, gland in glands.items():
        for z in range(gland["z"][0], gland["z"][1] + 1):
            annotation.volume.embedding(z)
    out["slices_encoded"] = len(annotation.volume.encoded)
    done = []
    for label in glands:
        prediction = annotation.predictions[label]
        for _ in range(clicks):
            click = corrective_click(prediction.mask, truth == label, spacing)
            if click is None:
                break
            prediction, figures = step(meter, lambda label=label, c=click: (
                annotation.click(label, c.z, c.y, c.x, positive=c.positive), annotation.labels())[0])
            done.append(rounded({"label": label, "z": click.z, "positive": click.positive, **figures,
                                 "dice": dice(prediction.mask, truth == label)}))
    annotation.close()
    out["clicks"] = done
    out["click_summary"] = summarize(done)
    return out


def summarize(done: list[dict]) -> dict:
    """Median and max seconds per click (and without the first, which loads a graph engine's eager decoder), and the
    mean of decodes and of each share per click."""
    if not done:
        return {"clicks": 0}
    seconds = [c["seconds"] for c in done]
    mean = {k: round(statistics.fmean(c[k] for c in done), 4) for k in ("decodes", "decode_s", "encode_s", "other_s",
                                                                        "heads_s")}
    later = seconds[1:] or seconds
    return {"clicks": len(done), "median_s": round(statistics.median(seconds), 4), "max_s": round(max(seconds), 4),
            "max_after_first_s": round(max(later), 4), **{f"mean_{k}": v for k, v in mean.items()}}


def verdict(figures: dict) -> str:
    """Whether the spec meets the issue's targets: the first box ≤ 15 s, a click ≤ 0.3 s (median, and every one)."""
    cold = figures["cold_first_box"]["seconds"] <= FIRST_BOX_TARGET_S
    clicks = figures["click_summary"]
    if not clicks.get("clicks"):
        return f"first box {'yes' if cold else 'no'}; no click given"
    median, every = clicks["median_s"] <= CLICK_TARGET_S, clicks["max_s"] <= CLICK_TARGET_S
    return (f"first box {'yes' if cold else 'no'}; click median {'yes' if median else 'no'}, "
            f"every click {'yes' if every else 'no'}")


def first_run(files: list[str]) -> str:
    """What a first open did, from the files it wrote in the engine cache folder: "export, streams measured"."""
    did = [what for what, found in (("export", any(n.endswith((".onnx", ".xml")) for n in files)),
                                    ("OpenVINO compile", any(n.endswith(".blob") for n in files)),
                                    ("streams measured", any(n.startswith("streams-") for n in files))) if found]
    return ", ".join(did) or "load only"


def table(result: dict) -> str:
    case = result["case"]
    rows = [f"Interactive annotation latency, {result['model']}, on {result['machine']['cpu']} "
            f"({result['machine']['cpu_cores']} cores, {result['machine']['torch_threads']} torch threads), "
            f"{result['date'][:10]}. Case: {case['source']}, {' × '.join(map(str, case['shape']))} voxels; boxes: "
            + "; ".join(f"label {k} slices {v['z'][0]}..{v['z'][1]}" for k, v in case["glands"].items())
            + f". Targets: first box ≤ {FIRST_BOX_TARGET_S:g} s, click ≤ {CLICK_TARGET_S:g} s. Cold: a new "
            "`Annotation.open` (exports cached) to the first box's 3-D mask; click: `Annotation.click` to the new "
            "label volume, every slice of the box encoded; the seconds per click split into decoding / waiting for "
            "encodes / the rest (walk, masks, label volume); a graph engine's first click also loads the eager decoder "
            "that decodes clicks (the graph decodes boxes alone), hence the max after the first.", ""]
    rows += ["| engine | precision | at once | cold first box s (open + box; encodes) | first-run open s (what it did) | "
             "click → 3-D mask median / max s | decodes per click | decode / encode / other s per click | targets met |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for spec, v in result["engines"].items():
        if "error" in v:
            rows.append(f"| {spec} | | | failed: {v['error']} | | | | | |")
            continue
        cold, clicks, warm = v["cold_first_box"], v["click_summary"], v["warmup"]
        export = f"{warm['open_s']:.1f} ({first_run(warm['files_written'])})"
        if clicks.get("clicks"):
            click = f"{clicks['median_s']:.3f} / {clicks['max_s']:.3f}"
            if clicks["mean_heads_s"] > 0:
                click += f" (max after the first: {clicks['max_after_first_s']:.3f})"
            split = f"{clicks['mean_decode_s']:.3f} / {clicks['mean_encode_s']:.3f} / {clicks['mean_other_s']:.3f}"
            decodes = f"{clicks['mean_decodes']:.1f}"
        else:
            click = split = decodes = "no click"
        rows.append(f"| {v['engine']} | {v['precision']} | {v['streams']} | {cold['seconds']:.2f} "
                    f"({cold['open_s']:.2f} + {cold['box_s']:.2f}; {cold['encodes']}) | {export} | {click} | "
                    f"{decodes} | {split} | {verdict(v)} |")
    for spec, why in result.get("skipped", {}).items():
        rows.append(f"| {spec} | | | skipped: {why} | | | | | |")
    rows.append("")
    rows.append("Load average (1, 5, 15 min) before / after each: " + "; ".join(
        f"{spec} {v['load_before'][-1]} / {v.get('load_after', '—')}" for spec, v in result["engines"].items()) + ".")
    rows.append("")
    return "\n".join(rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=None, help="comma list of ENGINE or ENGINE:PRECISION; default: every "
                                                        "engine installed at every precision this CPU runs")
    parser.add_argument("--model", default="litemedsam", help="the backbone (vanilla decoder)")
    parser.add_argument("--labels", type=Path, default=LABELS, help="a folder of FLARE22 label maps to paint CT around")
    parser.add_argument("--case", default=None, help="the label map to use (its name without .nii.gz); default: the "
                                                     "first holding both adrenal glands")
    parser.add_argument("--phantom", action="store_true", help="annotate a phantom case, not a painted one")
    parser.add_argument("--phantom-size", type=int, default=512, help="the phantom's slice size (px)")
    parser.add_argument("--clicks", type=int, default=5, help="corrective clicks per gland")
    parser.add_argument("--streams", type=int, default=0, help="a graph engine's slices at once (0: measured)")
    parser.add_argument("--max-load", type=float, default=1.5, help="wait while the 1-minute load average is above")
    parser.add_argument("--wait", type=int, default=10, help="tries of 30 s each waiting for the load to fall")
    parser.add_argument("--quick", action="store_true", help="smoke run: a small phantom (128 px, 8 slices), one click per gland, no "
                                                               "warm-up box, no waiting")
    parser.add_argument("--name", default="latency", help="results file: annotate-NAME-cpu-DATE.json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.phantom, args.phantom_size, args.clicks, args.wait = True, 128, min(args.clicks, 1), 0
        args.name = f"{args.name}-quick"
    offered, skipped = specs_offered()
    if args.engines:
        wanted = [s.strip() for s in args.engines.split(",") if s.strip()]
        for spec in wanted:
            if spec not in offered and spec not in skipped:
                engine, precision = parse_spec(spec)
                check_engine(engine, "cpu", precision)  # names what is wrong with it
        skipped = {s: why for s, why in skipped.items() if s in wanted}
        offered = [s for s in wanted if s in offered]
    for spec, why in skipped.items():
        print(f"{spec}: skipped ({why})", file=sys.stderr)
    result = {"benchmark": "annotate", "model": args.model, "machine": machine(torch.device("cpu")),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "targets": {"click_s": CLICK_TARGET_S, "first_box_s": FIRST_BOX_TARGET_S},
              "clicks_per_gland": args.clicks, "installed": installed_engines(), "skipped": skipped, "engines": {}}
    with tempfile.TemporaryDirectory() as tmp, own_engine_cache(tmp):  # exports of this run's own, timed
        tmp = Path(tmp)
        phantom = phantom_config(args.phantom_size)
        if args.quick:  # 8 slices, the glands on about 5: each box a few encodes and decodes
            phantom = replace(phantom, slice_mm=7.5, extent_mm=60.0)
        case = make_case(tmp, None if args.phantom else args.labels, args.case, phantom)
        truth, settings = case["truth"], ProtocolSettings()
        glands = {}
        for label in ADRENALS:
            box = box3d_from_label(truth == label, case["spacing_mm"], margin_mm=settings.margin_mm,
                                   margin_slices=settings.margin_slices)
            if box is not None:
                glands[label] = {"z": [box.z0, box.z1], "xyxy": [round(float(v), 2) for v in box.box]}
        result["case"] = {"name": case["name"], "source": case["source"], "realistic": case["realistic"],
                          "shape": list(truth.shape), "spacing_mm": [round(float(v), 4) for v in case["spacing_mm"]],
                          "glands": {str(k): v for k, v in glands.items()},
                          "box": f"box3d's: the gland's extent, {settings.margin_mm:g} mm in-plane and "
                                 f"{settings.margin_slices} slice(s) of margin"}
        for spec in offered:
            seen = wait_for_quiet(args.max_load, args.wait)
            try:
                figures = measure(spec, case, glands, model=args.model, clicks=args.clicks, streams=args.streams,
                                  warmup_box=not args.quick)
            except Exception as exc:  # one engine failing leaves the others' figures
                figures = {"error": f"{type(exc).__name__}: {exc}"}
            figures["load_before"], figures["load_after"] = seen, load_average()
            result["engines"][spec] = figures
            print(spec, json.dumps({k: figures.get(k) for k in ("cold_first_box", "click_summary", "load_after",
                                                                "error") if k in figures}), flush=True)
            gc.collect()
    write_result(result, args.out, f"annotate-{args.name}-cpu-{datetime.now(timezone.utc):%Y-%m-%d}",
                 table(result))
    return result


if __name__ == "__main__":
    main()
