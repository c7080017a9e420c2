"""Augmentation at encode time: extra training-only copies of a case, each an encode of its own.

The cache freezes the encoder's view of every slice, so the flips, rotations, scales and intensity
changes a 2-D trainer draws per step must be drawn here, once: ``encode --augment flip,rotate``
adds, for every training case (never an ``imagesTs/`` one), a case ``NAME~flip``, ``NAME~rotate``
... in set ``augment``, on the same slices as its source, transformed in-plane with parameters
seeded by its name. A fine-tune trains on the copies of its training cases only; validation, test
and ``score`` never see them (:mod:`embedcache.train.cases`). Each kind costs one more encode of
the training cases.
"""

from __future__ import annotations

import zlib
from dataclasses import replace

import numpy as np

from embedcache.config import AUGMENTS
from embedcache.errors import UsageError

__all__ = ["AUGMENTS", "augment_slices", "augmented_name", "source_of", "with_augmented"]
#: Separates a source case's name from the kind of its augmented copy.
MARK = "~"
#: The set of an augmented copy.
AUGMENT = "augment"


def with_augmented(cases: list, kinds: tuple[str, ...]) -> list:
    """``cases`` and, after them, a copy of every ``train`` case per kind (set ``augment``, same sources)."""
    if not kinds:
        return list(cases)
    marked = [c.name for c in cases if MARK in c.name]
    if marked:
        raise UsageError(f"case {marked[0]}: a name with {MARK!r} reads as an augmented copy; rename the case to "
                         f"encode with --augment")
    return list(cases) + [replace(c, name=augmented_name(c.name, kind), subset=AUGMENT)
                          for kind in kinds for c in cases if c.subset == "train"]


def augmented_name(name: str, kind: str) -> str:
    return f"{name}{MARK}{kind}"


def source_of(name: str) -> tuple[str, str]:
    """``CASE~flip`` → ``("CASE", "flip")``."""
    base, _, kind = name.rpartition(MARK)
    return base, kind


def parameters(name: str, kind: str) -> dict:
    """The seeded parameters of ``kind`` for the copy named ``name`` (the same name, the same copy)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if kind == "rotate":
        return {"degrees": float(rng.uniform(-15, 15))}
    if kind == "scale":
        return {"factor": float(rng.uniform(0.85, 1.15))}
    if kind == "intensity":
        return {"gain": float(rng.uniform(0.9, 1.1)), "offset_hu": float(rng.uniform(-30, 30))}
    return {}


def augment_slices(hu: np.ndarray, labels: np.ndarray, name: str, *, mirrored: dict[int, int] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The copy ``name`` (``CASE~KIND``) of ``(n, y, x)`` HU slices and label slices: every slice moved
    alike (linear for HU, nearest for labels, air outside the source). ``mirrored``: what each label id
    becomes in a flipped copy (:meth:`embedcache.io.labels.LabelMap.mirrored`); ids not in it keep theirs."""
    from scipy import ndimage

    _, kind = source_of(name)
    p = parameters(name, kind)
    hu, labels = np.asarray(hu, np.float32), np.asarray(labels)
    if kind == "flip":
        if mirrored is None:
            raise ValueError("a flipped copy needs the label map's left-right pairs (mirrored=)")
        flipped = labels[..., ::-1].copy()
        out = flipped.copy()
        for a, b in mirrored.items():
            out[flipped == a] = b
        return hu[..., ::-1].copy(), out
    if kind == "intensity":
        return hu * p["gain"] + p["offset_hu"], labels.copy()
    if kind == "rotate":
        matrix = _rotation(np.deg2rad(p["degrees"]))
    elif kind == "scale":
        matrix = np.eye(2) / p["factor"]
    else:
        raise ValueError(f"unknown augmentation {kind}")
    centre = (np.array(hu.shape[1:]) - 1) / 2.0
    offset = centre - matrix @ centre

    def move(image, order, fill):
        return np.stack([ndimage.affine_transform(s, matrix, offset=offset, order=order, cval=fill, mode="constant")
                         for s in image]) if len(image) else image.copy()

    return move(hu, 1, -1000.0).astype(np.float32), move(labels, 0, 0).astype(labels.dtype)


def _rotation(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])
