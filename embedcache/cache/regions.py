"""Zoomed regions: a gland's neighbourhood resampled so that the gland fills the encoder's input.

A whole 512² slice reaches LiteMedSAM at 256² and its decoder draws at 256²: one output pixel is
about 1.6 mm, where an adrenal limb is 2-6 mm thick. A :class:`Region` is a square of the slice
around a 3-D box (grown by a margin in mm), resampled to ``size × size`` pixels, so the same
decoder draws the gland several times finer (SegVol's zoom-out-zoom-in; nnInteractive and most
interactive CT tools crop around the prompt).

Coordinates follow :mod:`embedcache.cache.preprocess`: pixel ``i`` of a slice covers ``[i, i + 1)``
and its centre is ``i + 0.5``; boxes are pixel edges ``(x0, y0, x1, y1)``. Images are sampled
bilinearly, masks by their nearest pixel, so a mask zoomed in and back out returns unchanged
wherever the region is finer than the slice and covers it (:func:`zoom_out`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedcache.model.prompts import box_from_mask


@dataclass(frozen=True)
class Region:
    """A square of a slice: centre ``(cx, cy)`` in the slice's pixel-edge coordinates, side ``side_mm``,
    resampled to ``size × size`` pixels of ``side_mm / size`` mm."""

    cx: float
    cy: float
    side_mm: float
    size: int

    @property
    def pixel_mm(self) -> float:
        return self.side_mm / self.size

    def to_region(self, x, y, spacing_yx):
        """Slice pixel-edge coordinates → the region's, for in-plane pixel size ``spacing_yx`` = ``(dy, dx)`` mm."""
        dy, dx = spacing_yx
        return ((np.asarray(x, np.float64) - self.cx) * dx / self.pixel_mm + self.size / 2,
                (np.asarray(y, np.float64) - self.cy) * dy / self.pixel_mm + self.size / 2)

    def to_slice(self, u, v, spacing_yx):
        """The region's pixel-edge coordinates → the slice's; the inverse of :meth:`to_region`."""
        dy, dx = spacing_yx
        return ((np.asarray(u, np.float64) - self.size / 2) * self.pixel_mm / dx + self.cx,
                (np.asarray(v, np.float64) - self.size / 2) * self.pixel_mm / dy + self.cy)


def region_around(box, spacing_yx, *, margin_mm: float, size: int) -> Region:
    """The square region around the in-plane ``box`` (slice pixel edges) grown by ``margin_mm`` on every side:
    its longer side in mm plus twice the margin, centred on the box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    dy, dx = spacing_yx
    side = max((x1 - x0) * dx, (y1 - y0) * dy) + 2.0 * margin_mm
    if not side > 0:
        raise ValueError(f"region of an empty box {box} with no margin")  # a caller's bug
    return Region((x0 + x1) / 2.0, (y0 + y1) / 2.0, side, int(size))


def box_to_region(box, region: Region, spacing_yx) -> tuple[float, float, float, float]:
    """An in-plane box in slice pixel edges → the region's pixel edges."""
    u0, v0 = region.to_region(box[0], box[1], spacing_yx)
    u1, v1 = region.to_region(box[2], box[3], spacing_yx)
    return float(u0), float(v0), float(u1), float(v1)


def box_to_slice(box, region: Region, spacing_yx) -> tuple[float, float, float, float]:
    """An in-plane box in the region's pixel edges → the slice's; the inverse of :func:`box_to_region`."""
    x0, y0 = region.to_slice(box[0], box[1], spacing_yx)
    x1, y1 = region.to_slice(box[2], box[3], spacing_yx)
    return float(x0), float(y0), float(x1), float(y1)


def _centres(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64) + 0.5


def zoom_in(slices: np.ndarray, region: Region, spacing_yx, *, mask: bool = False, fill: float = 0.0) -> np.ndarray:
    """``(n, y, x)`` or ``(y, x)`` slices sampled at the region's pixel centres → ``(n, size, size)`` (or
    ``(size, size)``): images bilinearly (beyond the slice: its edge pixel), masks (``mask``) by nearest pixel
    (beyond the slice: ``fill``)."""
    from scipy import ndimage

    array = np.asarray(slices)
    single = array.ndim == 2
    batch = array[None] if single else array
    xs, ys = region.to_slice(_centres(region.size), _centres(region.size), spacing_yx)
    yy, xx = np.meshgrid(ys - 0.5, xs - 0.5, indexing="ij")  # pixel centres → array indices
    out = np.stack([ndimage.map_coordinates(s.astype(np.float32) if not mask else s.astype(np.uint8), [yy, xx],
                                            order=0 if mask else 1, mode="constant" if mask else "nearest",
                                            cval=fill) for s in batch])
    out = out.astype(bool) if mask and array.dtype == bool else out.astype(array.dtype if mask else np.float32)
    return out[0] if single else out


def _slice_centres_in(region: Region, spacing_yx, shape_yx) -> tuple[np.ndarray, np.ndarray]:
    """Where the centre of each pixel of a ``shape_yx`` slice lies in the region, as array indices ``(v, u)``."""
    height, width = shape_yx
    us, vs = region.to_region(_centres(width), _centres(height), spacing_yx)
    vv, uu = np.meshgrid(vs - 0.5, us - 0.5, indexing="ij")
    return vv, uu


def zoom_out(masks: np.ndarray, region: Region, spacing_yx, shape_yx) -> np.ndarray:
    """``(n, size, size)`` or ``(size, size)`` bool masks of the region → the slice's ``shape_yx`` grid, each slice
    pixel taking the region pixel under its centre (none outside the region). The exact inverse of
    :func:`zoom_in` for masks that lie inside the region, whenever the region's pixels are no larger than the
    slice's (every slice pixel's centre then falls in a region pixel that was sampled from that very pixel)."""
    from scipy import ndimage

    array = np.asarray(masks, bool)
    single = array.ndim == 2
    batch = array[None] if single else array
    vv, uu = _slice_centres_in(region, spacing_yx, shape_yx)
    out = np.stack([ndimage.map_coordinates(m.astype(np.uint8), [vv, uu], order=0, mode="constant", cval=0) > 0
                    for m in batch])
    return out[0] if single else out


def zoom_out_values(values: np.ndarray, region: Region, spacing_yx, shape_yx, *, fill: float) -> np.ndarray:
    """``(n, size, size)`` float values of the region (a decoder's logits) → the slice's ``shape_yx`` grid,
    bilinearly at each slice pixel's centre; ``fill`` outside the region."""
    from scipy import ndimage

    vv, uu = _slice_centres_in(region, spacing_yx, shape_yx)
    return np.stack([ndimage.map_coordinates(np.asarray(v, np.float32), [vv, uu], order=1, mode="constant", cval=fill)
                     for v in values]) if len(values) else np.zeros((0, *shape_yx), np.float32)


class ZoomedSlices:
    """A volume's slices ``(z, y, x)`` seen through a region: ``[z]`` is slice ``z`` resampled into it
    (:func:`zoom_in`), made when asked for; what predict encodes on the fly for ``--zoom``."""

    def __init__(self, volume: np.ndarray, region: Region, spacing_yx):
        self.volume, self.region, self.spacing_yx = volume, region, spacing_yx

    def __len__(self) -> int:
        return len(self.volume)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.volume), self.region.size, self.region.size)

    def __getitem__(self, z: int) -> np.ndarray:
        return zoom_in(self.volume[z], self.region, self.spacing_yx)


@dataclass(frozen=True)
class GlandRegion:
    """One gland's zoomed region of a volume: the in-plane :class:`Region` on slices ``z0 … z1``
    (inclusive), the gland's own slices and ``zpad`` beyond each end."""

    region: Region
    z0: int
    z1: int

    def to_dict(self) -> dict:
        r = self.region
        return {"cx": r.cx, "cy": r.cy, "side_mm": r.side_mm, "size": r.size, "z0": self.z0, "z1": self.z1}

    @classmethod
    def from_dict(cls, values: dict) -> "GlandRegion":
        return cls(Region(float(values["cx"]), float(values["cy"]), float(values["side_mm"]), int(values["size"])),
                   int(values["z0"]), int(values["z1"]))


def gland_region(gland_zyx: np.ndarray, spacing_yx, *, margin_mm: float, size: int, zpad: int = 4) -> GlandRegion:
    """The region of a gland (a 3-D bool mask, not empty): its in-plane extent over all its slices grown by
    ``margin_mm`` (:func:`region_around`), on its slices and ``zpad`` beyond each end, within the volume."""
    gland = np.asarray(gland_zyx, bool)
    zs = np.flatnonzero(gland.any(axis=(1, 2)))
    if not zs.size:
        raise ValueError("region of an empty gland")  # a caller's bug: glands come from their label
    region = region_around(box_from_mask(gland.any(axis=0)), spacing_yx, margin_mm=margin_mm, size=size)
    return GlandRegion(region, max(0, int(zs[0]) - zpad), min(gland.shape[0] - 1, int(zs[-1]) + zpad))
