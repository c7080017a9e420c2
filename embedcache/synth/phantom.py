"""Synthetic abdominal CT at the level of the adrenal glands, in FLARE22 layout and label ids.

Not anatomy for diagnosis: a test bed with the properties that make adrenal segmentation hard.
The glands are thin (limbs 2–6 mm thick), irregular (one body with a medial and a lateral limb
that turn and thin along z), and lie in fat beside the upper kidney poles, behind the IVC on the
right and beside the aorta on the left. Intensities are in HU, rendered at 2× in-plane resolution
and averaged down (partial volume at every edge), with Gaussian noise. Same seed, same files.

World coordinates inside this module are patient mm, ``x`` toward the left, ``y`` toward
posterior, ``z`` toward superior, which is also the canonical array order of :mod:`volumes`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embedcache.config import PhantomConfig
from embedcache.errors import EmbedcacheError
from embedcache.io.geometry import Geometry
from embedcache.io.labels import (
    ADRENALS,
    AORTA,
    DATASET_JSON,
    IVC,
    LEFT_ADRENAL,
    LEFT_KIDNEY,
    LIVER,
    RIGHT_ADRENAL,
    RIGHT_KIDNEY,
    SPLEEN,
    write_dataset_json,
)
from embedcache.io.nifti import write_nifti
from embedcache.io.volumes import read_label

#: Fill values of the phantom's tissues, in HU.
AIR_HU, FAT_HU, MUSCLE_HU = -1000.0, -95.0, 50.0


class _Canvas:
    """One slice being painted: HU and labels on the grid ``xs × ys`` (1-D sorted world mm).

    Shapes are evaluated only inside their bounding box, which keeps a 1024² slice cheap.
    """

    def __init__(self, xs: np.ndarray, ys: np.ndarray, hu: np.ndarray, label: np.ndarray):
        self.xs, self.ys, self.hu, self.label = xs, ys, hu, label

    def _window(self, cx, cy, reach):
        i0, i1 = np.searchsorted(self.xs, [cx - reach, cx + reach])
        j0, j1 = np.searchsorted(self.ys, [cy - reach, cy + reach])
        return (slice(j0, j1), slice(i0, i1)), self.xs[i0:i1][None, :], self.ys[j0:j1][:, None]

    def ellipse(self, cx, cy, ax, ay, value, ident=None, angle=0.0):
        win, x, y = self._window(cx, cy, max(ax, ay))
        c, s = np.cos(angle), np.sin(angle)
        u = ((x - cx) * c + (y - cy) * s) / ax
        v = (-(x - cx) * s + (y - cy) * c) / ay
        self._fill(win, u * u + v * v <= 1.0, value, ident)

    def capsule(self, p0, p1, radius, value, ident=None):
        """Points within ``radius`` of the segment p0–p1."""
        centre, half = (np.add(p0, p1)) / 2, np.linalg.norm(np.subtract(p1, p0)) / 2
        win, x, y = self._window(centre[0], centre[1], half + radius)
        d = np.subtract(p1, p0)
        t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1]) / max(float(d @ d), 1e-9), 0.0, 1.0)
        self._fill(win, (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 <= radius**2, value, ident)

    def _fill(self, win, mask, value, ident):
        self.hu[win][mask] = value
        if ident is not None:
            self.label[win][mask] = ident


class _Anatomy:
    """Per-case random anatomy; ``paint(x, y, z)`` gives HU and labels at world points on one slice."""

    def __init__(self, rng: np.random.Generator):
        u = rng.uniform
        self.body = (u(140, 165), u(100, 120))
        self.shift = (u(-6, 6), u(-4, 4))
        self.kidney_z = {RIGHT_KIDNEY: u(-30, -20), LEFT_KIDNEY: u(-22, -12)}
        self.kidney_hu = u(140, 180)
        self.liver_hu, self.spleen_hu = u(55, 70), u(45, 60)
        self.vessel_hu = u(150, 200)
        self.adrenal_hu = u(25, 45)
        # Each gland: centre (x, y), z range, limb angles and lengths, limb radius; all jittered.
        self.glands = {}
        for label, side in ((RIGHT_ADRENAL, -1.0), (LEFT_ADRENAL, 1.0)):
            top = self.kidney_z[RIGHT_KIDNEY if side < 0 else LEFT_KIDNEY] + 55 + u(5, 15)
            self.glands[label] = dict(
                cx=side * u(30, 38), cy=u(22, 32), z0=top - u(30, 42), z1=top,
                medial=np.deg2rad(u(60, 100)), lateral=np.deg2rad(u(20, 50)),
                length=u(14, 22), radius=u(1.2, 2.4), twist=np.deg2rad(u(-25, 25)), side=side,
            )

    def paint(self, xs: np.ndarray, ys: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
        """HU and labels of the axial slice at height ``z`` on the grid ``xs × ys`` (mm)."""
        hu = np.full((ys.size, xs.size), AIR_HU, dtype=np.float32)
        label = np.zeros((ys.size, xs.size), dtype=np.uint8)
        c = _Canvas(xs - self.shift[0], ys - self.shift[1], hu, label)
        a, b = self.body
        c.ellipse(0, 0, a, b, FAT_HU)  # subcutaneous fat
        c.ellipse(0, 0, a - 12, b - 12, MUSCLE_HU)  # abdominal wall
        c.ellipse(0, 0, a - 20, b - 20, FAT_HU)  # visceral fat
        c.ellipse(0, 52, 23, 21, 700.0)  # cortical bone
        c.ellipse(0, 52, 20, 18, 300.0)  # cancellous bone
        for sx in (-1, 1):
            c.ellipse(sx * 38, 78, 22, 14, MUSCLE_HU)  # paraspinal muscles
            c.ellipse(sx * 14, 38, 6, 16, MUSCLE_HU, angle=sx * 0.3)  # diaphragmatic crura
        taper = np.clip((z + 10) / 70, 0.3, 1.0)  # liver and spleen grow toward the dome
        c.ellipse(-68, -5, 62 * taper + 8, 72 * taper + 6, self.liver_hu, LIVER, angle=0.3)
        c.ellipse(88, 38, 26 * taper + 6, 40 * taper + 6, self.spleen_hu, SPLEEN, angle=-0.5)
        for ident, sx in ((RIGHT_KIDNEY, -1), (LEFT_KIDNEY, 1)):
            dz = (z - self.kidney_z[ident]) / 55.0
            if abs(dz) < 1:
                r = np.sqrt(1 - dz**2)
                c.ellipse(sx * 62, 48, 24 * r + 1, 30 * r + 1, self.kidney_hu, ident, angle=sx * 0.5)
        c.ellipse(12, 22, 10, 10, self.vessel_hu, AORTA)
        c.ellipse(-24, 10, 13, 9, self.vessel_hu - 20, IVC, angle=0.4)
        for ident, g in self.glands.items():
            if not g["z0"] <= z <= g["z1"]:
                continue
            t = (z - g["z0"]) / (g["z1"] - g["z0"])  # 0 at the bottom, 1 at the top of the gland
            centre = np.array([g["cx"], g["cy"]])
            turn = g["twist"] * (t - 0.5)
            thin = 0.6 + 0.8 * np.sin(np.pi * t)  # thickest mid-gland, thin at both ends
            limbs = [(g["medial"], 1.0)] + ([(g["lateral"], 0.8)] if t > 0.35 else [])  # inverted Y above
            for angle, scale in limbs:
                direction = np.array([np.cos(angle + turn) * -g["side"], np.sin(angle + turn)])
                tip = centre + direction * g["length"] * scale * (0.6 + 0.4 * np.sin(np.pi * t))
                c.capsule(centre, tip, g["radius"] * thin, self.adrenal_hu, ident)
        return hu, label


def make_case(seed: int, config: PhantomConfig = PhantomConfig()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic case: HU ``(z, y, x)`` int16, labels ``(z, y, x)`` uint8, and the canonical affine.

    The affine maps canonical ``(x, y, z)`` indices to RAS+ mm (x toward left, y toward posterior).
    """
    rng = np.random.default_rng(seed)
    anatomy = _Anatomy(rng)
    n_z = int(round(config.extent_mm / config.slice_mm))
    half = config.size * config.pixel_mm / 2
    fine = (np.arange(2 * config.size) + 0.5) * config.pixel_mm / 2 - half  # 2× supersampled centres
    coarse = (np.arange(config.size) + 0.5) * config.pixel_mm - half
    z_mm = (np.arange(n_z) - (n_z - 1) / 2) * config.slice_mm + 10.0
    hu = np.empty((n_z, config.size, config.size), dtype=np.float32)
    labels = np.empty((n_z, config.size, config.size), dtype=np.uint8)
    for k, z in enumerate(z_mm):
        fine_hu, _ = anatomy.paint(fine, fine, z)
        hu[k] = fine_hu.reshape(config.size, 2, config.size, 2).mean(axis=(1, 3))  # partial volume
        labels[k] = anatomy.paint(coarse, coarse, z)[1]
    hu += rng.normal(0.0, config.noise_hu, size=hu.shape).astype(np.float32)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    # Canonical (x, y, z) index → RAS+: x toward left is -R, y toward posterior is -A.
    affine = np.diag([-config.pixel_mm, -config.pixel_mm, config.slice_mm, 1.0])
    affine[:3, 3] = [half - config.pixel_mm / 2, half - config.pixel_mm / 2, z_mm[0]]
    return hu, labels, affine


def write_phantom(out: Path, *, cases: int, seed: int, config: PhantomConfig = PhantomConfig(), progress=None,
                  test_cases: int = 0) -> list[str]:
    """Write ``cases`` volumes as ``out/imagesTr/PHANTOM_NNNN_0000.nii.gz`` + ``out/labelsTr/PHANTOM_NNNN.nii.gz``,
    and ``test_cases`` more into ``imagesTs/`` + ``labelsTs/`` (held out, as nnU-Net lays them out).

    Files are stored in RAS+ array order (not the canonical one), so every read exercises the
    reorientation. Returns the case names.
    """
    out = Path(out)
    folders = [("imagesTr", "labelsTr")] * cases + [("imagesTs", "labelsTs")] * test_cases
    names = [f"PHANTOM_{i + 1:04d}" for i in range(len(folders))]
    paths = [(out / images / f"{name}_0000.nii.gz", out / labels / f"{name}.nii.gz")
             for name, (images, labels) in zip(names, folders)]
    taken = [path for pair in paths for path in (*pair, out / DATASET_JSON) if path.exists()]
    if taken:  # checked before any write: a dataset is never half replaced
        raise EmbedcacheError(f"{taken[0]}: exists; phantom writes a new dataset: choose an empty OUT folder")
    for images, labels in set(folders):
        (out / images).mkdir(parents=True, exist_ok=True)
        (out / labels).mkdir(parents=True, exist_ok=True)
    task = progress.add_task("phantom", total=len(folders)) if progress else None
    for i, (image_path, label_path) in enumerate(paths):
        hu, labels, canonical_affine = make_case(seed * 1_000_003 + i, config)
        # Store flipped to RAS+ order: index i toward the right... then x, y flip back on reading.
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[0, 3], flip[1, 3] = hu.shape[2] - 1, hu.shape[1] - 1
        source_affine = canonical_affine @ flip
        geometry = Geometry(source_shape=(hu.shape[2], hu.shape[1], hu.shape[0]), source_affine=source_affine)
        write_nifti(hu, geometry, image_path)
        write_nifti(labels, geometry, label_path)
        if progress:
            progress.advance(task)
    write_dataset_json(out, training=cases, name="embedcache phantom")
    return names


def limit_target_slices(data: Path, *, per_case: int, labels: tuple[int, ...] = ADRENALS) -> None:
    """Keep ``labels`` on only ``per_case`` slices (the middle ones) of each label file under ``data``.

    For tests and benchmarks that want a given number of target slices: encoding and an epoch
    then cost a known amount, whatever the glands' extent.
    """
    for path in sorted((Path(data) / "labelsTr").glob("*.nii.gz")) + sorted((Path(data) / "labelsTs").glob("*.nii.gz")):
        label = read_label(path)
        array = label.array.copy()
        z = np.flatnonzero(np.isin(array, labels).any(axis=(1, 2)))
        keep = z[max(0, len(z) // 2 - per_case // 2) :][:per_case]  # mid-gland: both glands usually present
        drop = np.setdiff1d(np.arange(len(array)), keep)
        array[drop] = np.where(np.isin(array[drop], labels), 0, array[drop])
        write_nifti(array, label.geometry, path)
