"""``embedcache evaluate``: FLARE22's Dice and NSD of any folder of label NIfTIs against ground truth.

Predictions and labels are matched by case name (``PRED/CASE.nii.gz`` ↔ ``LABELS/CASE.nii.gz``) and
compared on the label's voxels, so embedcache's ``predict`` output can stand beside nnU-Net's or
TotalSegmentator's. A prediction may also be a DICOM Segmentation ``PRED/CASE.seg.dcm`` (where no
``CASE.nii.gz`` is), placed on the label's voxels by its frames' positions. The report is the one ``score`` writes (:mod:`embedcache.evaluation.report`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from embedcache.config import check_label_ids
from embedcache.errors import EmbedcacheError, UsageError
from embedcache.evaluation.metrics import gland_metrics
from embedcache.evaluation.report import Report, check_report_folder, report_labels, write_report
from embedcache.io.dicom_out import read_seg
from embedcache.io.files import same_file
from embedcache.io.labels import FLARE22, LabelMap
from embedcache.io.nifti import is_nifti, nifti_stem
from embedcache.io.volumes import check_same_grid, read_label

logger = logging.getLogger(__name__)

PROTOCOL = "given"
#: A DICOM Segmentation prediction: ``CASE`` + this (what ``predict --output-type dicom-seg`` writes).
SEG = ".seg.dcm"



def _by_case(folder: Path, *, seg: bool = False) -> dict[str, Path]:
    """``CASE`` → ``CASE.nii.gz`` in ``folder``; with ``seg`` also ``CASE.seg.dcm`` where no NIfTI is."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EmbedcacheError(f"{folder}: no such folder; give a folder of CASE.nii.gz label volumes")
    found = {nifti_stem(path): path for path in sorted(folder.iterdir()) if is_nifti(path)}
    if seg:
        for path in sorted(folder.glob("*" + SEG)):
            found.setdefault(path.name[: -len(SEG)], path)
    return found


def _read_prediction(path: Path, geometry, truth_path: Path, label_map: LabelMap):
    """A prediction's label array on the ground truth's grid (``geometry``, of ``truth_path``): a NIfTI on
    the same grid, or a DICOM SEG placed by its frames' positions."""
    if path.name.endswith(SEG):
        return read_seg(path, geometry, label_map=label_map)
    pred = read_label(path)
    check_same_grid(geometry, pred.geometry, image_path=truth_path, label_path=path)
    return pred.array


def evaluate(pred_dir: Path, labels_dir: Path, out_dir: Path, *, labels=None, label_map: LabelMap = FLARE22,
             name: str = "prediction", progress=None) -> Report:
    """Score every prediction in ``pred_dir`` against its label in ``labels_dir``; write the report to
    ``out_dir``. A case without a prediction, or on another grid, is reported and the rest scored.
    ``label_map`` says what the ids mean (names, NSD tolerances, a SEG's codes); ``labels`` None: its
    adrenal glands."""
    labels = tuple(labels) if labels else label_map.adrenals()
    if not labels:
        raise UsageError(f"{label_map.source} names no adrenal gland; give --labels with the ids to score")
    check_label_ids(labels)
    truths, predictions = _by_case(labels_dir), _by_case(pred_dir, seg=True)
    if not truths:
        raise EmbedcacheError(f"{labels_dir}: holds no .nii or .nii.gz label volumes")
    if same_file(pred_dir, labels_dir):
        raise EmbedcacheError(f"{pred_dir}: the predictions and the ground truth are the same folder; give the "
                              "folder of predictions, then the folder of labels")
    check_report_folder(out_dir)
    results, errors = {}, {}
    task = progress.add_task("evaluating", total=len(truths)) if progress else None
    for case, truth_path in truths.items():
        try:
            if case not in predictions:
                raise EmbedcacheError(f"{Path(pred_dir) / (case + '.nii.gz')}: no prediction for this case")
            if same_file(predictions[case], truth_path):
                raise EmbedcacheError(f"{predictions[case]}: is the ground truth itself ({truth_path}); give the "
                                      "predictions' folder")
            truth = read_label(truth_path)
            pred = _read_prediction(predictions[case], truth.geometry, truth_path, label_map)
            results[case] = {
                str(label): {name: gland_metrics(pred == label, truth.array == label,
                                                 spacing_mm=truth.spacing_mm, label=label, label_map=label_map)}
                for label in labels
            }
        except EmbedcacheError as exc:
            errors[case] = str(exc)
            logger.error(str(exc))
        if progress:
            progress.advance(task)
    if not results:
        raise EmbedcacheError(f"{pred_dir}: no case could be scored ({next(iter(errors.values()))})")
    report = Report(
        kind="evaluate", case_set="given", case_names=tuple(results),
        case_set_note=f"every case of {labels_dir} with a prediction in {pred_dir}",
        made_by={"predictions": str(pred_dir), "labels": str(labels_dir)},
        prompts={PROTOCOL: f"the masks in {pred_dir}, however they were made"},
        models=(name,), **report_labels(label_map, labels),
        cases={PROTOCOL: results}, errors=errors,
    )
    return write_report(out_dir, report)
