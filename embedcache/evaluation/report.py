"""The report that ``score`` and ``evaluate`` write: one :class:`Report` record, its numbers as JSON
and CSV, and the page (:mod:`embedcache.evaluation.page`) that shows them.

    OUT/report.json        every number: per protocol, case, gland and model; means and sd; what made them
    OUT/cases.csv          one row per protocol, case, gland (its id and name) and model
    OUT/dice.png           Dice per gland and protocol, one point per case, the mean as a bar
    OUT/learning_curve.png the run's log.csv: training and validation loss, validation Dice (score --run)
    OUT/clicks.png         --protocols clicks: mean Dice per gland after 0..N corrective clicks, per model
    OUT/clicks.csv         --protocols clicks: one row per case, gland, model and click count
    OUT/overlay-*.png      best and worst slice of each gland, labelled with case, slice and Dice
    OUT/index.html         all of the above on one page
    OUT/config.json        score's settings (ScoreConfig)

The folder is built beside ``OUT`` and then replaces it whole; a folder that holds anything but an
earlier report is refused (:func:`check_report_folder`).

``cases`` is ``{protocol: {case: {label: {model: {metric: value}}}}}`` with labels as strings.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from embedcache.errors import EmbedcacheError
from embedcache.evaluation import page
from embedcache.evaluation.page import Overlay, click_counts
from embedcache.io.files import (
    atomic_path,
    atomic_write_text,
    check_writable_folder,
    make_output_folder,
    partial_folder,
    recover_folder,
    replace_folder,
    writer_lock,
)

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
    label_map: str = ""  # where the names came from: a dataset.json, a preset, FLARE22's ids
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
                  "label_map": self.label_map, "nsd_tolerance_mm": self.nsd_tolerance_mm, "cases": self.cases, "errors": self.errors,
                  "summary": self.summary, "figures": self.figures, "overlays": list(self.overlays)}
        return {k: v for k, v in values.items() if v is not None}


def report_labels(label_map, labels) -> dict:
    """A report's ``labels`` (id → the name every table shows), ``nsd_tolerance_mm`` (by organ) and
    ``label_map`` (where the names came from) for the ``labels`` scored, read from ``label_map``."""
    return {"labels": {str(k): label_map.name(k) for k in labels},
            "nsd_tolerance_mm": {str(k): label_map.tolerance_mm(k) for k in labels},
            "label_map": label_map.source}


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


#: What a report folder holds (besides ``overlay-*.png``); a folder with anything else is not one.
REPORT_FILES = ("report.json", "cases.csv", "dice.png", "learning_curve.png", "index.html", "config.json",
                "clicks.png", "clicks.csv")
REPORT_KINDS = ("score", "evaluate")


def holds_a_report(folder: Path) -> bool:
    """Whether ``folder`` holds a report of score or evaluate (its report.json says so)."""
    try:
        return json.loads((Path(folder) / "report.json").read_text()).get("kind") in REPORT_KINDS
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def check_report_folder(out_dir: Path) -> None:
    """Refuse a report folder that holds anything but an earlier report of score or evaluate (it is
    replaced whole): a report never mixes with other files, nor overwrites them."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EmbedcacheError(f"{out_dir}: is a file; --out names the report folder")
    make_output_folder(Path(os.path.abspath(out_dir)).parent, what="--out's parent folder")
    if out_dir.is_dir():
        check_writable_folder(out_dir)  # a folder made read-only is not ours to replace
    held = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    strangers = [p.name for p in held if not (p.is_file() and (p.name in REPORT_FILES or
                                                               fnmatch.fnmatch(p.name, "overlay-*.png")))]
    if strangers:
        raise EmbedcacheError(f"{out_dir}: holds {strangers[0]}, which a report does not; a report replaces its "
                              "folder whole: choose a new --out")
    if held:
        try:
            kind = json.loads((out_dir / "report.json").read_text()).get("kind")
        except (OSError, ValueError, AttributeError, RecursionError):
            kind = None
        if kind not in REPORT_KINDS:
            raise EmbedcacheError(f"{out_dir}: holds files but no report of embedcache (report.json); choose a new "
                                  "--out")


def write_report(out_dir: Path, report: Report, *, overlays: list[Overlay] = (), log_csv: Path | None = None,
                 extra: dict[str, str] | None = None) -> Report:
    """Write every file of the report (and the ``extra`` text files, by name) into a new folder of this run's own
    (marked and unique: :func:`~embedcache.io.files.partial_folder`) that then replaces ``out_dir`` whole: at every
    instant ``out_dir`` holds the old report or the new one. One writer at a time (a lock beside ``out_dir``);
    an old report a killed run left under its marked name is put back first, and nothing else beside ``out_dir``
    is touched. Returns ``report`` with its summary and file names."""
    final = Path(os.path.abspath(out_dir))
    with writer_lock(final):
        recover_folder(final, is_ours=holds_a_report)
        check_report_folder(final)
        building = partial_folder(final)
        try:
            report = _write_files(building, report, overlays=overlays, log_csv=log_csv, extra=extra or {})
            replace_folder(building, final)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    return report


def _write_files(out_dir: Path, report: Report, *, overlays, log_csv, extra: dict[str, str]) -> Report:
    report = replace(report, summary=summarize(report.cases))
    figures = {"dice": page.dice_plot(report, out_dir / "dice.png")}
    if log_csv is not None and Path(log_csv).is_file():
        figures["learning_curve"] = page.learning_curve(Path(log_csv), out_dir / "learning_curve.png")
    if click_counts(report.summary):
        figures["clicks"] = page.clicks_plot(report, out_dir / "clicks.png")
        _write_clicks_csv(report, out_dir / "clicks.csv")
    pictures = [page.overlay_png(o, out_dir) for o in overlays]
    report = replace(report, figures={k: v.name for k, v in figures.items() if v is not None},
                     overlays=tuple(p.name for p in pictures))
    atomic_write_text(out_dir / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")
    _write_csv(report, out_dir / "cases.csv")
    atomic_write_text(out_dir / "index.html", page.page(report, overlays, pictures))
    for name, text in extra.items():
        atomic_write_text(out_dir / name, text)
    return report


def _write_clicks_csv(report: Report, path: Path) -> None:
    counts = click_counts(report.summary)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "label", "gland", "model", "clicks", "dice", "nsd"])
        for case, by_label in report.cases["clicks"].items():
            for label, by_model in by_label.items():
                for model, values in by_model.items():
                    for k in counts:
                        writer.writerow([case, label, report.labels[label], model, k, f"{values[f'dice@{k}']:.4f}", f"{values[f'nsd@{k}']:.4f}"])


def _write_csv(report: Report, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["protocol", "case", "label", "gland", "model", *METRICS])
        for protocol, by_case in report.cases.items():
            for case, by_label in by_case.items():
                for label, by_model in by_label.items():
                    for model, values in by_model.items():
                        writer.writerow([protocol, case, label, report.labels[label], model, *[f"{values[m]:.4f}" for m in METRICS]])
