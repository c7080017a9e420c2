"""The report that ``score`` and ``evaluate`` write: one :class:`Report` record, its numbers as JSON
and CSV, and the page (:mod:`embedcache.evaluation.page`) that shows them.

    OUT/report.json        every number: per protocol, case, gland and model; means and sd; what made them
    OUT/cases.csv          one row per protocol, case, gland and model
    OUT/dice.png           Dice per gland and protocol, one point per case, the mean as a bar
    OUT/learning_curve.png the run's log.csv: training and validation loss, validation Dice (score --run)
    OUT/overlay-*.png      best and worst slice of each gland, labelled with case, slice and Dice
    OUT/index.html         all of the above on one page

``cases`` is ``{protocol: {case: {label: {model: {metric: value}}}}}`` with labels as strings.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from embedcache.evaluation import page
from embedcache.evaluation.page import Overlay
from embedcache.io.files import atomic_path, atomic_write_text

METRICS = ("dice", "nsd", "dice_2d")


@dataclass(frozen=True)
class Report:
    """Every number of a ``score`` or ``evaluate`` run and the facts that say what made it: which cases
    (``case_set``, with ``case_set_note`` on what they are worth), which prompts, which checkpoint
    (``made_by``). ``summary``, ``figures`` and ``overlays`` are filled in by :func:`write_report`."""

    kind: str  # score | evaluate
    case_set: str
    case_set_note: str
    case_names: tuple[str, ...]
    made_by: dict
    prompts: dict[str, str]  # protocol → what the decoder was given
    models: tuple[str, ...]
    labels: dict[str, str]  # label id (as a string) → name
    nsd_tolerance_mm: dict[str, float]
    cases: dict
    protocol_settings: dict | None = None  # score's ProtocolSettings
    errors: dict[str, str] | None = None  # evaluate: case → why it was not scored
    summary: dict = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)
    overlays: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """``report.json``'s object; ``protocol_settings`` and ``errors`` only where they apply."""
        values = {"kind": self.kind, "case_set": self.case_set, "case_set_note": self.case_set_note,
                  "case_names": list(self.case_names), "made_by": self.made_by, "prompts": self.prompts,
                  "protocol_settings": self.protocol_settings, "models": list(self.models), "labels": self.labels,
                  "nsd_tolerance_mm": self.nsd_tolerance_mm, "cases": self.cases, "errors": self.errors,
                  "summary": self.summary, "figures": self.figures, "overlays": list(self.overlays)}
        return {k: v for k, v in values.items() if v is not None}


def summarize(results: dict) -> dict:
    """``{protocol: {label: {model: {metric: {"mean", "sd", "n"}}}}}`` over the cases of ``results``."""
    summary: dict = {}
    for protocol, by_case in results.items():
        for by_label in by_case.values():
            for label, by_model in by_label.items():
                for model, values in by_model.items():
                    for metric, value in values.items():
                        summary.setdefault(protocol, {}).setdefault(label, {}).setdefault(model, {}).setdefault(
                            metric, []).append(value)
    for by_label in summary.values():
        for by_model in by_label.values():
            for model, by_metric in by_model.items():
                for metric, values in by_metric.items():
                    by_metric[metric] = {"mean": float(np.mean(values)), "sd": float(np.std(values)), "n": len(values)}
    return summary


def write_report(out_dir: Path, report: Report, *, overlays: list[Overlay] = (),
                 log_csv: Path | None = None) -> Report:
    """Write every file of the report into ``out_dir``; returns ``report`` with its summary and file names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = replace(report, summary=summarize(report.cases))
    figures = {"dice": page.dice_plot(report, out_dir / "dice.png")}
    if log_csv is not None and Path(log_csv).is_file():
        figures["learning_curve"] = page.learning_curve(Path(log_csv), out_dir / "learning_curve.png")
    pictures = [page.overlay_png(o, out_dir) for o in overlays]
    report = replace(report, figures={k: v.name for k, v in figures.items() if v is not None},
                     overlays=tuple(p.name for p in pictures))
    atomic_write_text(out_dir / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")
    _write_csv(report, out_dir / "cases.csv")
    atomic_write_text(out_dir / "index.html", page.page(report, overlays, pictures))
    return report


def _write_csv(report: Report, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["protocol", "case", "label", "model", *METRICS])
        for protocol, by_case in report.cases.items():
            for case, by_label in by_case.items():
                for label, by_model in by_label.items():
                    for model, values in by_model.items():
                        writer.writerow([protocol, case, label, model, *[f"{values[m]:.4f}" for m in METRICS]])
