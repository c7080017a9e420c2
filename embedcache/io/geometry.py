"""Where a volume's voxels lie, and the one canonical orientation every reader returns.

* the array is an axial stack indexed ``(z, y, x)``;
* ``x`` grows toward the patient's **left**, ``y`` toward **posterior**, ``z`` toward **superior**
  (``LPS`` axis codes for ``(x, y, z)``). An axial slice ``array[z]`` is therefore shown the
  radiological way: patient right on the image's left, anterior at the top;
* world coordinates are nibabel's RAS+ millimetres, also for DICOM (whose LPS is converted).

The file's own array order and affine are kept in :class:`Geometry`, so a mask predicted in
canonical space goes back into the file's voxel grid exactly (:meth:`Geometry.to_source`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel import orientations as nio

CANONICAL_AXCODES = ("L", "P", "S")


@dataclass(frozen=True)
class Geometry:
    """Where a volume's voxels lie: the file's array shape ``(i, j, k)`` and its voxel→RAS affine."""

    source_shape: tuple[int, int, int]
    source_affine: np.ndarray

    def _to_canonical(self):
        ornt = nio.io_orientation(self.source_affine)
        return nio.ornt_transform(ornt, nio.axcodes2ornt(CANONICAL_AXCODES))

    @property
    def canonical_affine(self) -> np.ndarray:
        """4×4 map from canonical ``(x, y, z)`` voxel indices to RAS+ mm."""
        return self.source_affine @ nio.inv_ornt_aff(self._to_canonical(), self.source_shape)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        xform = self._to_canonical()
        xyz = [0, 0, 0]
        for src_axis, (dst_axis, _) in enumerate(xform):
            xyz[int(dst_axis)] = self.source_shape[src_axis]
        return (xyz[2], xyz[1], xyz[0])

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along ``(z, y, x)`` in mm."""
        sx, sy, sz = np.linalg.norm(self.canonical_affine[:3, :3], axis=0)
        return (float(sz), float(sy), float(sx))

    def canonical(self, data_ijk: np.ndarray) -> np.ndarray:
        """The file's array ``(i, j, k)`` → canonical ``(z, y, x)``."""
        return np.ascontiguousarray(nio.apply_orientation(data_ijk, self._to_canonical()).transpose(2, 1, 0))

    def to_source(self, array_zyx: np.ndarray) -> np.ndarray:
        """Canonical ``(z, y, x)`` → the file's array order ``(i, j, k)``; exact inverse of :meth:`canonical`."""
        back = nio.ornt_transform(nio.axcodes2ornt(CANONICAL_AXCODES), nio.io_orientation(self.source_affine))
        return np.ascontiguousarray(nio.apply_orientation(array_zyx.transpose(2, 1, 0), back))

    def canonical_index(self, points, *, space: str = "voxel") -> np.ndarray:
        """``(n, 3)`` points → ``(n, 3)`` canonical ``(x, y, z)`` voxel indices (floats).

        ``space``: ``voxel`` for the file's own ``(i, j, k)`` indices (what 3D Slicer and ITK-SNAP
        show), ``world`` for RAS+ mm (nibabel's and 3D Slicer's), ``lps`` for LPS mm (DICOM's and ITK's).
        """
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        if space == "voxel":
            points = points @ self.source_affine[:3, :3].T + self.source_affine[:3, 3]
        elif space == "lps":
            points = points * np.array([-1.0, -1.0, 1.0])
        elif space != "world":
            raise ValueError(f"unknown space {space}")
        inverse = np.linalg.inv(self.canonical_affine)
        return points @ inverse[:3, :3].T + inverse[:3, 3]

    def source_index(self, xyz) -> np.ndarray:
        """``(n, 3)`` canonical ``(x, y, z)`` voxel indices → the file's own ``(i, j, k)`` (the inverse of
        :meth:`canonical_index` in voxel space), rounded to whole voxels."""
        xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
        world = xyz @ self.canonical_affine[:3, :3].T + self.canonical_affine[:3, 3]
        inverse = np.linalg.inv(self.source_affine)
        return np.rint(world @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)

    def source_slice(self, z: int) -> tuple[int, int]:
        """Canonical axial slice ``z`` as ``(axis, index)`` of the file's own array: the slice a viewer
        that shows the file's voxel indices (3D Slicer, ITK-SNAP) names."""
        for axis, (dst, flip) in enumerate(nio.io_orientation(self.source_affine)):
            if int(dst) == 2:
                return axis, int(z) if flip > 0 else self.source_shape[axis] - 1 - int(z)
        raise ValueError("no axis of the affine points along S")

    def same_grid(self, other: "Geometry", *, tol_mm: float = 1e-3) -> bool:
        """True when both sample the same world points (array order may differ)."""
        return self.shape_zyx == other.shape_zyx and bool(
            np.allclose(self.canonical_affine, other.canonical_affine, atol=tol_mm, rtol=0)
        )


@dataclass(frozen=True)
class Volume:
    """A 3-D volume in canonical orientation: ``array`` is ``(z, y, x)``; HU for CT, label ids for labels."""

    array: np.ndarray
    geometry: Geometry
    path: Path

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return self.geometry.spacing_mm
