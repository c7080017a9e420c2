"""The prompts a person gives ``predict`` in a JSON file: a 3-D box per gland or a box on one slice,
mapped from each input (by its file or folder name, or its case name without ``_0000`` and suffix)::

    {"CASE": [{"label": 7, "box3d": [i0, j0, k0, i1, j1, k1]},
              {"label": 8, "box3d": [x0, y0, z0, x1, y1, z1], "space": "world"},
              {"label": 7, "slice": 41, "box": [i0, j0, i1, j1]}]}

Coordinates are the input file's own voxel indices ``(i, j, k)`` as 3D Slicer and ITK-SNAP show
them, and a box's two corners are its first and last voxel, both inside the box. ``"space":
"world"`` takes RAS+ millimetres instead (3D Slicer's), ``"space": "lps"`` LPS millimetres
(DICOM's and ITK's); a corner then stands for the voxel whose centre is nearest. Every entry is
checked against its volume and the decoder's labels, and refused with its place in the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedcache.errors import EmbedcacheError, UsageError
from embedcache.evaluation.protocols import Box3D
from embedcache.io.datasets import case_name
from embedcache.io.files import read_json
from embedcache.io.geometry import Geometry

SPACES = ("voxel", "world", "lps")


@dataclass(frozen=True)
class Request:
    """One gland to segment: a 3-D box (propagated) or, with ``single_slice``, a box on one slice."""

    label: int
    box: Box3D  # canonical slices and pixel edges
    single_slice: bool = False


def _number_list(value, n: int, what: str) -> list[float]:
    if not isinstance(value, list) or len(value) != n:
        raise TypeError(f"{what} needs {n} numbers")
    numbers = [float(v) for v in value]  # a string or None raises here
    if not np.isfinite(numbers).all():
        raise ValueError(f"{what} has a NaN or infinite value")
    return numbers


def read_boxes_file(boxes_file: Path) -> dict:
    """The JSON boxes table: an object mapping case names to lists of prompts."""
    table = read_json(boxes_file, fix="see the boxes schema in the README")
    if not isinstance(table, dict) or not all(isinstance(v, list) for v in table.values()):
        raise EmbedcacheError(f"{boxes_file}: expected an object {{\"CASE\": [prompts, ...]}}; see the boxes schema in the README")
    return table


def requests_from_json(table: dict, boxes_file: Path, image: Path, geometry: Geometry, labels) -> tuple[Request, ...]:
    """The prompts of ``image`` in ``table``, in canonical coordinates, checked against the volume and ``labels``."""
    key = image.name if image.name in table else case_name(image)
    if key not in table:
        raise EmbedcacheError(f"{boxes_file}: no boxes for {image.name} (key '{case_name(image)}'); add them")
    requests = []
    for n, entry in enumerate(table[key]):
        where = f"{boxes_file} [{key}][{n}]"
        try:
            if not isinstance(entry, dict):
                raise TypeError("a prompt is an object")
            label = entry["label"]
            if isinstance(label, bool) or not isinstance(label, int):
                raise TypeError("label must be an integer")
            space = entry.get("space", "voxel")
            if space not in SPACES:
                raise ValueError(f"space must be one of {', '.join(SPACES)}")
            if "box3d" in entry:
                corners = np.array(_number_list(entry["box3d"], 6, "box3d")).reshape(2, 3)
                single = False
            else:
                i0, j0, i1, j1 = _number_list(entry["box"], 4, "box")
                k = float(entry["slice"])
                corners = np.array([[i0, j0, k], [i1, j1, k]])
                single = True
        except (KeyError, TypeError, ValueError) as exc:
            raise EmbedcacheError(
                f"{where}: {exc if not isinstance(exc, KeyError) else f'missing {exc}'}; a prompt is "
                '{"label": 7, "box3d": [i0, j0, k0, i1, j1, k1]} or {"label": 7, "slice": k, "box": [i0, j0, i1, j1]}'
            ) from None
        if labels is not None and label not in labels:
            raise UsageError(f"{where}: label {label} is not one the decoder was trained for ({', '.join(map(str, labels))})")
        if not 0 < label < 256:
            raise UsageError(f"{where}: label {label} must lie in 1..255")
        try:
            box = _canonical_box(corners, geometry, space)
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None
        if single and box.z0 != box.z1:
            raise UsageError(f"{where}: slice {entry['slice']} of this file is not an axial slice; give a box3d instead")
        box.check(geometry.shape_zyx, where)
        requests.append(Request(label=label, box=box.clipped(geometry.shape_zyx), single_slice=single))
    return tuple(requests)


def _canonical_box(corners: np.ndarray, geometry: Geometry, space: str) -> Box3D:
    """Two inclusive corner voxels (or points) → canonical slices and in-plane pixel edges."""
    if np.any(corners[1] < corners[0]):
        raise UsageError(f"box is inverted: {corners[1].tolist()} lies before {corners[0].tolist()} on some axis; "
                         "give the first corner, then the last")
    xyz = geometry.canonical_index(corners, space=space)
    if space == "voxel" and np.any(np.abs(xyz - np.rint(xyz)) > 1e-3):
        raise UsageError(f"voxel corners {corners.tolist()} must be whole voxel indices")
    low, high = np.rint(xyz.min(axis=0)).astype(int), np.rint(xyz.max(axis=0)).astype(int)
    return Box3D(int(low[2]), int(high[2]), (float(low[0]), float(low[1]), float(high[0] + 1), float(high[1] + 1)))
