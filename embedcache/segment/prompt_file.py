"""The prompts a person gives ``predict`` in a JSON file: a 3-D box per gland or a box on one slice,
mapped from each input (by its file or folder name, or its case name without ``_0000`` and suffix)::

    {"CASE": [{"label": 7, "box3d": [i0, j0, k0, i1, j1, k1]},
              {"label": 8, "box3d": [x0, y0, z0, x1, y1, z1], "space": "world"},
              {"label": 7, "slice": 41, "box": [i0, j0, i1, j1]},
              {"label": 7, "box3d": [...], "points": [[i, j, k, 1], [i, j, k, 0]]},
              {"label": 8, "slice": 41, "points": [[i, j, 41, 1]]}]}

Coordinates are the input file's own voxel indices ``(i, j, k)`` as 3D Slicer and ITK-SNAP show
them, and a box's two corners are its first and last voxel, both inside the box. ``"space":
"world"`` takes RAS+ millimetres instead (3D Slicer's), ``"space": "lps"`` LPS millimetres
(DICOM's and ITK's); a corner then stands for the voxel whose centre is nearest. Every entry is
checked against its volume and the decoder's labels, and refused with its place in the file.

``"points"`` are clicks, in the entry's ``space``: ``[i, j, k, 1]`` on the gland, ``[i, j, k, 0]``
off it. Beside a ``box3d`` (or a ``box``) each lies on one of its slices (a positive one inside the
box; a negative one may follow a mask that spilled out of it) and is applied in the file's order
as a corrective click of the ``clicks`` protocol (:func:`embedcache.evaluation.protocols.refine`):
its slice is decoded again with its box and its clicks so far and the change propagates. With a
``slice`` and no ``box``, the points alone prompt that slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedcache.config import MAX_CLICKS
from embedcache.errors import EmbedcacheError, UsageError
from embedcache.evaluation.protocols import Box3D
from embedcache.io.datasets import case_name
from embedcache.io.files import read_json
from embedcache.io.geometry import Geometry
from embedcache.model.clicks import Click

SPACES = ("voxel", "world", "lps")


@dataclass(frozen=True)
class Request:
    """One gland to segment: a 3-D box (propagated) or, with ``single_slice``, a box on one slice."""

    label: int
    box: Box3D  # canonical slices and pixel edges (points alone: the whole slice)
    single_slice: bool = False
    clicks: tuple[Click, ...] = ()  # canonical voxels, in the file's order
    points_only: bool = False  # a slice prompted by its clicks alone, no box


def _number_list(value, n: int, what: str) -> list[float]:
    if not isinstance(value, list) or len(value) != n:
        raise TypeError(f"{what} needs {n} numbers")
    numbers = [float(v) for v in value]  # a string or None raises here
    if not np.isfinite(numbers).all():
        raise ValueError(f"{what} has a NaN or infinite value")
    return numbers


def read_boxes_file(boxes_file: Path) -> dict:
    """The JSON boxes table: an object mapping case names to lists of prompts."""
    table = read_json(boxes_file, fix="see the boxes schema in docs/commands.md", unique_keys=True)
    if not isinstance(table, dict) or not all(isinstance(v, list) for v in table.values()):
        raise EmbedcacheError(f"{boxes_file}: expected an object {{\"CASE\": [prompts, ...]}}; see the boxes schema in docs/commands.md")
    return table


def requests_from_json(table: dict, boxes_file: Path, image: Path, geometry: Geometry, labels) -> tuple[Request, ...]:
    """The prompts of ``image`` in ``table``, in canonical coordinates, checked against the volume and ``labels``."""
    key = image.name if image.name in table else case_name(image)
    if key not in table:
        raise EmbedcacheError(f"{boxes_file}: no boxes for {image.name} (key '{case_name(image)}'); add them")
    requests = []
    clicks_of: dict[int, int] = {}  # clicks per gland, over all its entries
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
            points = _points(entry["points"]) if "points" in entry else None
            points_only = "box3d" not in entry and "box" not in entry and points is not None
            if "box3d" in entry:
                corners = np.array(_number_list(entry["box3d"], 6, "box3d")).reshape(2, 3)
                single = False
            elif points_only:
                corners = None
                single = True
                k = float(entry["slice"])
            else:
                i0, j0, i1, j1 = _number_list(entry["box"], 4, "box")
                k = float(entry["slice"])
                corners = np.array([[i0, j0, k], [i1, j1, k]])
                single = True
        except (KeyError, TypeError, ValueError) as exc:
            raise EmbedcacheError(
                f"{where}: {exc if not isinstance(exc, KeyError) else f'missing {exc}'}; a prompt is "
                '{"label": 7, "box3d": [i0, j0, k0, i1, j1, k1]} or {"label": 7, "slice": k, "box": [i0, j0, i1, j1]}, '
                'either with "points": [[i, j, k, 1], ...] if wanted, or {"label": 7, "slice": k, "points": [...]}'
            ) from None
        if labels is not None and label not in labels:
            raise UsageError(f"{where}: label {label} is not one the decoder was trained for ({', '.join(map(str, labels))})")
        if not 0 < label < 256:
            raise UsageError(f"{where}: label {label} must lie in 1..255")
        clicks_of[label] = clicks_of.get(label, 0) + (len(points) if points is not None else 0)
        if clicks_of[label] > MAX_CLICKS:
            raise UsageError(f"{where}: label {label} has {clicks_of[label]} clicks in this file; at most {MAX_CLICKS} "
                             "corrective clicks a gland are taken (as --clicks): keep the ones that matter")
        try:
            clicks = _canonical_clicks(points, geometry, space) if points is not None else ()
            if points_only:
                box = _slice_of_points(clicks, points, entry["slice"], geometry, space)
            else:
                box = _canonical_box(corners, geometry, space)
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None
        if single and box.z0 != box.z1:
            raise UsageError(f"{where}: slice {entry['slice']} of this file is not an axial slice; give a box3d instead")
        box.check(geometry.shape_zyx, where)
        box = box.clipped(geometry.shape_zyx)
        for n_point, click in enumerate(clicks):  # a mask may spill out of its box: a negative click may follow it
            x0, y0, x1, y1 = box.box
            if not box.z0 <= click.z <= box.z1 or (click.positive and not (x0 <= click.x < x1 and y0 <= click.y < y1)):
                raise UsageError(f"{where}: point {n_point} {entry['points'][n_point]} lies outside the entry's "
                                 f"{'slice' if single else 'box'}; a click on the gland goes inside its box, and any "
                                 "click on one of its slices")
        requests.append(Request(label=label, box=box, single_slice=single, clicks=clicks, points_only=points_only))
    return tuple(requests)


def _points(value) -> np.ndarray:
    """``[[i, j, k, label], ...]`` → ``(n, 4)`` floats; labels 1 (on the gland) or 0 (off it)."""
    if not isinstance(value, list) or not value:
        raise TypeError("points must be a list of [i, j, k, label]")
    rows = []
    for n, point in enumerate(value):
        row = _number_list(point, 4, f"point {n}")
        if point[3] not in (0, 1) or isinstance(point[3], bool):
            raise ValueError(f"point {n}'s label must be 1 (on the gland) or 0 (off it), got {point[3]!r}")
        rows.append(row)
    return np.array(rows)


def _canonical_clicks(points: np.ndarray, geometry: Geometry, space: str) -> tuple[Click, ...]:
    """``(n, 4)`` points in ``space`` → clicks on canonical voxels (the nearest voxel centre for mm)."""
    xyz = _inside_reach(geometry, points[:, :3], space, "a point")
    if space == "voxel" and np.any(np.abs(xyz - np.rint(xyz)) > 1e-3):
        raise UsageError(f"voxel points {points[:, :3].tolist()} must be whole voxel indices")
    xyz = np.rint(xyz).astype(int)
    depth, height, width = geometry.shape_zyx
    clicks = []
    for n, ((x, y, z), label) in enumerate(zip(xyz, points[:, 3])):
        if not (0 <= x < width and 0 <= y < height and 0 <= z < depth):
            raise UsageError(f"point {n} {points[n].tolist()} lies outside the volume of {width}×{height}×{depth} voxels")
        clicks.append(Click(int(z), int(y), int(x), positive=bool(label)))
    return tuple(clicks)


def _slice_of_points(clicks: tuple[Click, ...], points: np.ndarray, slice_value, geometry: Geometry,
                     space: str) -> Box3D:
    """The whole canonical slice the points of a points-alone entry lie on (all on ``slice``)."""
    zs = {c.z for c in clicks}
    named = int(np.rint(geometry.canonical_index([[points[0, 0], points[0, 1], float(slice_value)]], space=space)[0, 2]))
    if zs != {named} or not any(c.positive for c in clicks):
        raise UsageError(f"points alone prompt one slice: every point on slice {slice_value}, one of them on the gland "
                         "(label 1)")
    depth, height, width = geometry.shape_zyx
    z = zs.pop()
    return Box3D(z, z, (0.0, 0.0, float(width), float(height)))


def _inside_reach(geometry: Geometry, xyz, space: str, what: str) -> np.ndarray:
    """``xyz`` in ``space`` as canonical indices; coordinates that overflow, or lie more than a volume's size away
    from it, are refused as outside the volume (not as an inverted box, nor with numpy's overflow warnings)."""
    with np.errstate(all="ignore"):
        index = geometry.canonical_index(np.asarray(xyz, float), space=space)
    depth, height, width = geometry.shape_zyx
    reach = 2 * np.array([width, height, depth])
    if not np.isfinite(index).all() or np.any(np.abs(index) > reach + 1):
        raise UsageError(f"{what} {np.asarray(xyz).tolist()} lies outside the volume of {width}×{height}×{depth} "
                         f"voxels; give {space} coordinates of this image")
    return index


def _canonical_box(corners: np.ndarray, geometry: Geometry, space: str) -> Box3D:
    """Two inclusive corner voxels (or points) → canonical slices and in-plane pixel edges."""
    if np.any(corners[1] < corners[0]):
        raise UsageError(f"box is inverted: {corners[1].tolist()} lies before {corners[0].tolist()} on some axis; "
                         "give the first corner, then the last")
    xyz = _inside_reach(geometry, corners, space, "the box")
    if space == "voxel" and np.any(np.abs(xyz - np.rint(xyz)) > 1e-3):
        raise UsageError(f"voxel corners {corners.tolist()} must be whole voxel indices")
    low, high = np.rint(xyz.min(axis=0)).astype(int), np.rint(xyz.max(axis=0)).astype(int)
    return Box3D(int(low[2]), int(high[2]), (float(low[0]), float(low[1]), float(high[0] + 1), float(high[1] + 1)))
