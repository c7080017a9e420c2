"""Volume metrics as the FLARE22 challenge computes them: Dice and normalized surface Dice (NSD).

NSD uses MONAI's implementation with sub-voxel surface elements (``use_subvoxels=True``), the
method of DeepMind's surface-distance package that the FLARE evaluation uses, with the voxel
spacing in mm. FLARE22's rules for empty masks: both empty → 1; one empty, the other not → 0.
"""

from __future__ import annotations

import warnings

import numpy as np

from embedcache.io.labels import DEFAULT_TOLERANCE_MM, LabelMap


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape (2-D or 3-D); 1 when both are empty."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def nsd(pred: np.ndarray, truth: np.ndarray, *, spacing_mm, tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> float:
    """Normalized surface Dice of two boolean ``(z, y, x)`` masks at ``tolerance_mm``.

    ``spacing_mm`` is the voxel size along the same axes. 1 when both are empty, 0 when only one is.
    """
    import torch
    from monai.metrics import compute_surface_dice

    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not pred.any() and not truth.any():
        return 1.0
    if not pred.any() or not truth.any():
        return 0.0
    pred, truth = _around(pred, truth)

    def one_hot(mask):
        m = torch.from_numpy(mask)
        return torch.stack([~m, m])[None].float()  # (1, 2, *spatial): background, foreground

    with warnings.catch_warnings():  # MONAI calls one of its own deprecated arguments internally
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        value = compute_surface_dice(
            one_hot(pred), one_hot(truth), class_thresholds=[float(tolerance_mm)], include_background=False,
            spacing=[float(s) for s in spacing_mm], use_subvoxels=True,
        )
    return float(value.reshape(-1)[0])


def _around(pred: np.ndarray, truth: np.ndarray, margin: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the box around their union, ``margin`` voxels wider on every side (clipped to the
    volume). Exact for NSD: every surface voxel of either mask lies inside, and the distance between two
    surface points does not depend on what lies beyond them; a gland's box is a thousandth of a CT."""
    where = np.nonzero(pred | truth)
    box = tuple(slice(max(int(w.min()) - margin, 0), int(w.max()) + margin + 1) for w in where)
    return pred[box], truth[box]


def gland_metrics(pred: np.ndarray, truth: np.ndarray, *, spacing_mm, label: int, label_map: LabelMap
                  ) -> dict[str, float]:
    """FLARE22's Dice and NSD of two bool ``(z, y, x)`` masks of one label, and the mean 2-D Dice of the
    slices that hold the ground truth. The organ ``label`` holds in ``label_map`` sets the NSD tolerance;
    as FLARE22's evaluation does, the aorta, IVC and oesophagus are scored on the slices their ground
    truth covers only (by organ, whatever their ids)."""
    zs = np.flatnonzero(truth.any(axis=(1, 2)))
    if label_map.labelled_slices_only(label) and zs.size:
        keep = slice(zs[0], zs[-1] + 1)
        pred, truth, zs = pred[keep], truth[keep], zs - zs[0]
    return {
        "dice": dice(pred, truth),
        "nsd": nsd(pred, truth, spacing_mm=spacing_mm, tolerance_mm=label_map.tolerance_mm(label)),
        "dice_2d": float(np.mean([dice(pred[z], truth[z]) for z in zs])) if zs.size else dice(pred, truth),
    }
