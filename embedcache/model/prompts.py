"""Box prompts from masks, in ``(x0, y0, x1, y1)`` pixel order.

Boxes use pixel-edge coordinates: a mask whose foreground spans columns ``c0..c1`` (inclusive)
gets ``x0 = c0`` and ``x1 = c1 + 1``, so a box's width equals the number of pixels it covers.

Several connected components of one label on one slice get **one** box around all of them: a
gland cut obliquely by the axial plane shows as fragments of the same organ, the training target
is the whole label on that slice, and a box per fragment would ask the decoder for part of it.
"""

from __future__ import annotations

import numpy as np


def box_present(boxes: np.ndarray) -> np.ndarray:
    """``(..., 4)`` boxes → ``(...)`` bool: True where a box is given (absent boxes are stored as NaN)."""
    return ~np.isnan(boxes).any(axis=-1)


def box_from_mask(mask: np.ndarray) -> np.ndarray | None:
    """The ``(x0, y0, x1, y1)`` box around the nonzero pixels of a ``(y, x)`` mask, or None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def grow_box(box, grow_xy: tuple[float, float] = (0.0, 0.0), *, within) -> tuple[float, float, float, float]:
    """``box`` ``(x0, y0, x1, y1)`` grown by ``grow_xy`` = ``(x, y)`` pixels on every side and kept inside
    the box ``within``: the one rule for the 3-D box, its walk and the stop prompts."""
    x0, y0, x1, y1 = box
    gx, gy = grow_xy
    return (max(x0 - gx, within[0]), max(y0 - gy, within[1]), min(x1 + gx, within[2]), min(y1 + gy, within[3]))


def boxes_for_labels(label_slice: np.ndarray, labels: tuple[int, ...]) -> np.ndarray:
    """One box per target label for a ``(y, x)`` label slice: ``(len(labels), 4)``, NaN rows where absent."""
    out = np.full((len(labels), 4), np.nan, dtype=np.float32)
    for i, label in enumerate(labels):
        box = box_from_mask(label_slice == label)
        if box is not None:
            out[i] = box
    return out


def jitter_boxes(
    boxes: np.ndarray, *, fraction: float, rng: np.random.Generator, limit: float | None = None
) -> np.ndarray:
    """Move each edge of ``(..., 4)`` xyxy boxes by up to ``fraction`` of the box's width/height.

    Edges stay inside ``[0, limit]`` when ``limit`` is given, and x1 > x0, y1 > y0 always hold.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    size = np.concatenate([boxes[..., 2:] - boxes[..., :2]] * 2, axis=-1)
    out = boxes + rng.uniform(-fraction, fraction, size=boxes.shape).astype(np.float32) * size
    if limit is not None:
        out = np.clip(out, 0.0, limit)
    out[..., 2:] = np.maximum(out[..., 2:], out[..., :2] + 1.0)
    return out


def outward_boxes(boxes: np.ndarray, *, max_px: float, rng: np.random.Generator, limit: float | None = None) -> np.ndarray:
    """MedSAM's training boxes: each edge of ``(..., 4)`` xyxy boxes moved *outward* by a uniform
    0..``max_px`` pixels (MedSAM: 0–20 px at 1024 px), kept inside ``[0, limit]``."""
    boxes = np.asarray(boxes, dtype=np.float32)
    shift = rng.uniform(0.0, max_px, size=boxes.shape).astype(np.float32)
    out = boxes + shift * np.array([-1, -1, 1, 1], np.float32)
    return out if limit is None else np.clip(out, 0.0, limit)


def union_box(boxes: np.ndarray) -> np.ndarray:
    """The box around all given ``(k, 4)`` boxes (NaN rows ignored): a gland's in-plane extent over its slices."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    boxes = boxes[box_present(boxes)]
    if len(boxes) == 0:
        return np.full(4, np.nan, np.float32)
    return np.concatenate([boxes[:, :2].min(axis=0), boxes[:, 2:].max(axis=0)]).astype(np.float32)
