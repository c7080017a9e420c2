"""Is int8 worth offering? LiteMedSAM's encoder quantized by NNCF, against fp32 and bf16, on this CPU.

``embedcache`` does not offer int8: this script is the measurement behind that, kept so that the next
CPU, NNCF release or recipe can be tried in one command. It needs NNCF, which no extra installs
(``pip install nncf``), and OpenVINO.

* **Quantize**: the encoder graph ``predict`` and ``encode`` run (exported into a temporary cache
  folder) through ``nncf.quantize`` (``--model-type``, ``--preset``, ``--ignore``: NNCF's ignored
  scope, as regular expressions of node names), calibrated on the windowed slices holding the target
  glands of DATA's training cases (``imagesTr/``; every ``--every``-th such slice, at most
  ``--calibration``): never the test cases it is then scored on. What NNCF leaves in floating point
  runs in bf16 where the CPU has it.
* **Speed**: seconds per slice of fp32, bf16 (where the CPU has it) and int8 on the test cases' gland
  slices, in one process, model by model in turn over ``--rounds``; the ratio to fp32, and each
  model's embeddings' largest and mean absolute difference from fp32's.
* **Dice**: DATA's test cases (``imagesTs/``), both glands, under ``box3d`` from their label maps (the
  walk ``predict`` runs), decoded by RUN's fine-tuned decoder from each model's embeddings: the Dice per
  gland, its mean difference from fp32's and the worst case's. The gate ``embedcache`` holds reduced
  precision to is a mean Dice cost of at most 0.005 per gland.

    python benchmarks/int8.py --data BED --run BED_RUN --name cpu-zen4-bed
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, machine, own_engine_cache

#: The mean box3d Dice cost per gland reduced precision may have (the issue's gate, as for bf16).
GATE = 0.005


def gland_slices(cases, labels, *, every: int, limit: int | None = None) -> list[np.ndarray]:
    """Windowed 512² slices holding any of ``labels``, every ``every``-th of each case, at most ``limit``."""
    from embedcache.cache.preprocess import slice_to_model
    from embedcache.io.volumes import read_image, read_label

    out = []
    for case in cases:
        hu, label = read_image(case.image).array, read_label(case.label).array
        for z in np.flatnonzero(np.isin(label, labels).any(axis=(1, 2)))[::every]:
            out.append(slice_to_model(hu[z], width_hu=350.0, level_hu=50.0, slice_size=512))
            if limit and len(out) >= limit:
                return out
    return out


class Encoder:
    """One OpenVINO model (a path or an ``ov.Model``) at one inference precision, as ``OnTheFly`` calls an encoder:
    ``(n, S, S)`` slices in, float16 embeddings out (the cache's dtype), one slice at a time when asked."""

    streams = 0  # as eager torch: nothing encoded ahead of the walk

    def __init__(self, core, model, precision: str, backbone):
        settings = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                    "PERFORMANCE_HINT": "LATENCY"}
        self.request = core.compile_model(model, "CPU", settings).create_infer_request()
        self.backbone = backbone

    def prepared(self, slices) -> np.ndarray:
        with torch.inference_mode():
            return self.backbone.prepare(torch.from_numpy(np.ascontiguousarray(slices, np.float32))).numpy()

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([self.request.infer([x[i : i + 1]])[0].copy() for i in range(len(x))])

    def __call__(self, slices):
        return torch.from_numpy(self.run(self.prepared(slices))).half()


def box3d_dice(cases, encoder, decoder, parts, labels) -> dict:
    """Dice per gland per case under box3d, decoded by ``decoder`` from ``encoder``'s embeddings."""
    from embedcache.config import PreprocessConfig, ProtocolSettings
    from embedcache.evaluation import protocols
    from embedcache.evaluation.metrics import dice
    from embedcache.io.volumes import read_image, read_label
    from embedcache.segment.predict import OnTheFly

    out = {label: {} for label in labels}
    for case in cases:
        image, label_map = read_image(case.image), read_label(case.label).array
        volume = OnTheFly(image.array, encoder, PreprocessConfig())
        segment = volume.segment_with(parts.prompt_encoder, decoder, input_size=encoder.backbone.input_size)
        for label in labels:
            truth = label_map == label
            if truth.any():
                prediction = protocols.run("box3d", segment, truth=truth, spacing_mm=image.spacing_mm,
                                           settings=ProtocolSettings(), case=case.name, label=label)
                out[label][case.name] = round(dice(prediction.mask, truth), 4)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a dataset with imagesTr/ (calibration) and imagesTs/")
    parser.add_argument("--run", type=Path, required=True, help="the fine-tuned run whose decoder scores each model")
    parser.add_argument("--calibration", type=int, default=64, help="calibration slices at most")
    parser.add_argument("--every", type=int, default=4, help="every N-th gland slice of a training case calibrates")
    parser.add_argument("--model-type", choices=["transformer", "none"], default="transformer")
    parser.add_argument("--preset", choices=["performance", "mixed"], default="performance")
    parser.add_argument("--ignore", default="", help="comma-separated regular expressions of node names kept unquantized")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default="cpu", help="results file: int8-NAME-DATE.json")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results (benchmarks/results/)")
    args = parser.parse_args(argv)

    import nncf
    import openvino as ov

    from embedcache.io.datasets import discover_cases
    from embedcache.io.files import file_sha256
    from embedcache.model.backbones import get_backbone, load_backbone, resolve_checkpoint
    from embedcache.model.engines import exported_encoder
    from embedcache.train.checkpoint import checkpoint_file
    from embedcache.train.decoders import load_trained_decoder

    trained = load_trained_decoder(checkpoint_file(args.run))
    backbone = get_backbone(trained.signature.backbone)
    labels = tuple(trained.signature.labels)
    cases = discover_cases(args.data)
    train = [c for c in cases if c.subset != "test"]
    test = [c for c in cases if c.subset == "test"]
    if not train or not test:
        raise SystemExit(f"{args.data}: needs training (imagesTr/) and test (imagesTs/) cases")
    weights = resolve_checkpoint(backbone, trained.checkpoint)
    parts, _ = load_backbone(backbone, weights)
    decoder = parts.mask_decoder
    decoder.load_state_dict(trained.state)
    core = ov.Core()
    bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    floating = "bf16" if bf16 else "f32"

    with tempfile.TemporaryDirectory() as tmp, own_engine_cache(tmp):
        graph = exported_encoder(backbone, parts.image_encoder, file_sha256(weights), engine="openvino")
        calibration_slices = gland_slices(train, labels, every=args.every, limit=args.calibration)
        probe = Encoder(core, str(graph), "f32", backbone)
        calibration = [probe.prepared(s[None]) for s in calibration_slices]
        options = {"subset_size": len(calibration), "preset": getattr(nncf.QuantizationPreset, args.preset.upper())}
        if args.model_type == "transformer":
            options["model_type"] = nncf.ModelType.TRANSFORMER
        if args.ignore:
            options["ignored_scope"] = nncf.IgnoredScope(patterns=args.ignore.split(","), validate=False)
        started = time.perf_counter()
        quantized = nncf.quantize(core.read_model(str(graph)), nncf.Dataset(calibration), **options)
        quantize_s = time.perf_counter() - started
        models = {"fp32": Encoder(core, str(graph), "f32", backbone)}
        if bf16:
            models["bf16"] = Encoder(core, str(graph), "bf16", backbone)
        models["int8"] = Encoder(core, quantized, floating, backbone)

        probe_x = probe.prepared(np.stack(gland_slices(test, labels, every=3)))
        reference = models["fp32"].run(probe_x)
        seconds = {k: [] for k in models}
        for k, m in models.items():
            m.run(probe_x[:1])  # warm-up
        for _ in range(args.rounds):
            for k, m in models.items():
                t = time.perf_counter()
                m.run(probe_x)
                seconds[k].append((time.perf_counter() - t) / len(probe_x))
        per_slice = {k: statistics.median(v) for k, v in seconds.items()}
        result = {"date": datetime.now(timezone.utc).isoformat(), "machine": machine(torch.device("cpu")),
                  "data": str(args.data), "run": str(args.run), "backbone": backbone.name, "nncf": nncf.__version__,
                  "openvino": ov.__version__, "recipe": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "calibration_slices": len(calibration), "calibration_cases": [c.name for c in train],
                  "quantize_seconds": round(quantize_s, 1), "int8_rest_in": floating,
                  "speed_slices": len(probe_x), "test_cases": [c.name for c in test], "models": {}}
        for k, m in models.items():
            difference = np.abs(m.run(probe_x) - reference)
            result["models"][k] = {"seconds_per_slice": round(per_slice[k], 4),
                                   "all_rounds": [round(v, 4) for v in seconds[k]],
                                   "speedup_over_fp32": round(per_slice["fp32"] / per_slice[k], 3),
                                   "max_abs_difference": round(float(difference.max()), 4),
                                   "mean_abs_difference": round(float(difference.mean()), 5)}
            print(k, result["models"][k], flush=True)
        for k, m in models.items():
            dice = box3d_dice(test, m, decoder, parts, labels)
            result["models"][k]["box3d_dice"] = dice
            result["models"][k]["box3d_mean"] = {str(g): round(float(np.mean(list(v.values()))), 4) for g, v in dice.items()}
            print(k, "box3d", result["models"][k]["box3d_mean"], flush=True)
    add_costs(result["models"])
    result["gate"] = GATE
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", args.name)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"int8-{name}-{result['date'][:10]}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(table(result))
    print(f"saved {path}", file=sys.stderr)
    print(table(result))
    return result


def add_costs(models: dict) -> None:
    """Each model's Dice cost against fp32's, per gland: the mean over the cases and the worst case (fp32 − model,
    so a positive cost is Dice lost), and whether the mean is within the gate for every gland."""
    fp32 = models["fp32"]["box3d_dice"]
    for figures in models.values():
        by_gland = figures["box3d_dice"]
        costs = {g: [fp32[g][case] - v for case, v in by_gland[g].items()] for g in by_gland}
        figures["dice_cost_mean"] = {str(g): round(float(np.mean(c)), 4) for g, c in costs.items()}
        figures["dice_cost_worst_case"] = {str(g): round(float(max(c)), 4) for g, c in costs.items()}
        figures["within_gate"] = all(v <= GATE for v in figures["dice_cost_mean"].values())


def table(result: dict) -> str:
    recipe = result["recipe"]
    rows = [f"int8 (NNCF {result['nncf']}, OpenVINO {result['openvino']}) on {result['machine']['cpu']} "
            f"({result['machine'].get('cpu_identity', '')}), {result['date'][:10]}: {result['backbone']}'s encoder, "
            f"model type {recipe['model_type']}, preset {recipe['preset']}, ignored {recipe['ignore'] or 'nothing'}, "
            f"{result['calibration_slices']} calibration slices of the training cases; the rest of int8's graph in "
            f"{result['int8_rest_in']}. Speed on {result['speed_slices']} test-case gland slices; box3d Dice over "
            f"{len(result['test_cases'])} held-out test cases with {result['run']}'s decoder; cost = fp32 − model.", "",
            "| model | s/slice | × fp32 | max / mean abs diff | box3d Dice per gland | mean cost | worst case cost | ≤ gate |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k, m in result["models"].items():
        rows.append(f"| {k} | {m['seconds_per_slice']:.3f} | {m['speedup_over_fp32']:.2f} | "
                    f"{m['max_abs_difference']:.4f} / {m['mean_abs_difference']:.5f} | "
                    f"{' / '.join(f'{v:.4f}' for v in m['box3d_mean'].values())} | "
                    f"{' / '.join(f'{v:+.4f}' for v in m['dice_cost_mean'].values())} | "
                    f"{' / '.join(f'{v:+.4f}' for v in m['dice_cost_worst_case'].values())} | "
                    f"{'yes' if m['within_gate'] else 'no'} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
