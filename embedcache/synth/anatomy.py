"""Synthetic CT painted around real label maps: the test bed for accuracy on realistic anatomy.

The phantom's glands change smoothly from slice to slice; real adrenal glands are thin Y-, V- and
λ-shaped bodies that split into limbs, wander between slices and sit against the diaphragm's
crura, the IVC and the kidney's upper pole, at nearly the crus's HU. Given a real label map (the
FLARE22 label maps carry that geometry), this paints a CT around it: organ HU with smooth texture,
retroperitoneal fat, a body wall and back muscles, a vertebral body behind the aorta, the crura
from the spine round the aorta (where the glands lie against them), partial volume and noise.

Not a CT for anyone to read: intensities are plausible means, and every structure not in the
label map (spine, crura, muscle, fat) is drawn from the labelled ones. Painting styles
(``phantom --style``): ``portal`` (portal-venous phase, the bed the recipes are chosen on),
``arterial`` (another contrast phase, coarser texture, more noise, softer edges, thicker crura),
kept for testing only, and ``varied`` (each case its own style, drawn around portal's, arterial's
settings outside the ranges: for training a decoder that must carry over). Same label map,
style and seed, same volume. Arrays are canonical ``(z, y, x)``: ``x`` toward the patient's
left, ``y`` toward posterior (:mod:`embedcache.io.geometry`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedcache.config import PAINT_STYLES
from embedcache.errors import EmbedcacheError
from embedcache.io import labels as flare
from embedcache.io.labels import DATASET_JSON, write_dataset_json
from embedcache.io.nifti import is_nifti, nifti_stem, write_nifti
from embedcache.io.volumes import read_label

#: Mean HU of each labelled organ, portal-venous phase, and of the structures drawn around them.
ORGAN_HU = {
    flare.LIVER: 100.0, flare.RIGHT_KIDNEY: 160.0, flare.SPLEEN: 110.0, flare.PANCREAS: 90.0, flare.AORTA: 160.0,
    flare.IVC: 130.0, flare.RIGHT_ADRENAL: 55.0, flare.LEFT_ADRENAL: 55.0, flare.GALLBLADDER: 10.0,
    flare.ESOPHAGUS: 45.0, flare.STOMACH: 35.0, flare.DUODENUM: 45.0, flare.LEFT_KIDNEY: 160.0,
}
AIR_HU, FAT_HU, MUSCLE_HU, BONE_HU, CORTEX_HU = -1000.0, -100.0, 50.0, 300.0, 700.0


@dataclass(frozen=True)
class PaintStyle:
    """How a CT is painted: HU per organ and tissue, texture, blur and noise."""

    organ_hu: dict = field(default_factory=lambda: dict(ORGAN_HU))
    fat_hu: float = FAT_HU
    muscle_hu: float = MUSCLE_HU
    crus_mm: float = 3.5  # the crus's radius
    texture_hu: float = 10.0  # the smooth per-tissue variation's standard deviation...
    texture_mm: float = 3.0  # ...and its size
    blur_px: float = 0.6  # partial volume: Gaussian sigma in pixels in-plane...
    blur_slices: float = 0.35  # ...and across slices
    noise_hu: float = 12.0


#: The fixed styles of ``phantom --style`` (:data:`embedcache.config.PAINT_STYLES`; ``varied`` is
#: :func:`varied_style`): the portal-venous bed the recipes are chosen on, and another contrast phase with other
#: texture, noise and blur (late arterial: bright aorta and renal cortex, an IVC not yet filled, darker liver,
#: glands a little brighter than the thicker crura) for testing only.
STYLES = {
    "portal": PaintStyle(),
    "arterial": PaintStyle(
        organ_hu={**ORGAN_HU, flare.LIVER: 70.0, flare.RIGHT_KIDNEY: 190.0, flare.LEFT_KIDNEY: 190.0,
                  flare.SPLEEN: 125.0, flare.PANCREAS: 110.0, flare.AORTA: 290.0, flare.IVC: 75.0,
                  flare.RIGHT_ADRENAL: 70.0, flare.LEFT_ADRENAL: 70.0, flare.GALLBLADDER: 5.0,
                  flare.STOMACH: 30.0, flare.DUODENUM: 40.0, flare.ESOPHAGUS: 40.0},
        fat_hu=-85.0, muscle_hu=60.0, crus_mm=5.0, texture_hu=16.0, texture_mm=6.0, blur_px=0.9,
        blur_slices=0.5, noise_hu=20.0),
}


def varied_style(rng: np.random.Generator) -> PaintStyle:
    """A style drawn around ``portal``'s: every organ's HU ±25, fat, muscle, the crus, texture, blur and noise each
    from its own range, all kept clear of ``arterial``'s settings (its aorta, IVC, texture size, blur, noise and
    crus lie outside these ranges), so that style stays unseen by a decoder trained on these."""
    return PaintStyle(organ_hu={label: value + float(rng.uniform(-25.0, 25.0)) for label, value in ORGAN_HU.items()},
                      fat_hu=float(rng.uniform(-115.0, -85.0)), muscle_hu=float(rng.uniform(40.0, 60.0)),
                      crus_mm=float(rng.uniform(3.0, 4.5)), texture_hu=float(rng.uniform(6.0, 14.0)),
                      texture_mm=float(rng.uniform(2.0, 4.5)), blur_px=float(rng.uniform(0.4, 0.8)),
                      blur_slices=float(rng.uniform(0.25, 0.45)), noise_hu=float(rng.uniform(8.0, 16.0)))


def paint_ct(labels_zyx: np.ndarray, spacing_mm, *, seed: int, style: PaintStyle = STYLES["portal"]) -> np.ndarray:
    """A ``(z, y, x)`` float32 HU volume around the label map ``labels_zyx`` (FLARE22 ids) with voxel
    size ``spacing_mm`` = ``(z, y, x)`` mm, painted in ``style``."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    dz, dy, dx = (float(s) for s in spacing_mm)
    depth, height, width = labels_zyx.shape
    ys, xs = np.mgrid[0:height, 0:width]
    xs, ys = xs * dx, ys * dy  # mm
    hu = np.full(labels_zyx.shape, AIR_HU, np.float32)
    aorta = _track(labels_zyx == flare.AORTA, dx, dy)
    ivc = _track(labels_zyx == flare.IVC, dx, dy)
    organs = labels_zyx > 0
    body = _body(organs, dx, dy)
    for z in range(depth):
        ax, ay, ar = aorta[z]
        mid = (ax + ivc[z][0]) / 2  # the spine sits behind, between aorta and IVC
        spine_y = ay + ar + 16.0
        inside = body[z]
        s = hu[z]
        s[inside] = style.fat_hu
        wall = inside & ~ndimage.binary_erosion(inside, iterations=max(1, int(round(9.0 / dx))))
        s[wall] = style.muscle_hu
        for side in (-1, 1):  # side -1: the patient's right
            s[_ellipse(xs, ys, mid + side * 38.0, spine_y + 22.0, 26.0, 20.0) & inside] = style.muscle_hu  # back
            # the crus: from the front of the vertebral body round the aorta's side, where the glands lie
            path = [(mid + side * 10.0, spine_y - 14.0), (ax + side * (ar + 4.0), ay + 2.0),
                    (ax + side * 0.5 * ar, ay - ar - 5.0)]
            for (x0, y0), (x1, y1) in zip(path, path[1:]):
                for f in np.linspace(0.0, 1.0, 8):
                    s[_ellipse(xs, ys, x0 + f * (x1 - x0), y0 + f * (y1 - y0), style.crus_mm, style.crus_mm)
                      & inside] = style.muscle_hu
        vertebra = _ellipse(xs, ys, mid, spine_y + 4.0, 20.0, 16.0)
        s[vertebra] = CORTEX_HU
        s[_ellipse(xs, ys, mid, spine_y + 4.0, 17.0, 13.0)] = BONE_HU
    for label, value in style.organ_hu.items():
        where = labels_zyx == label
        if where.any():
            hu[where] = value
    # texture: smooth per-tissue variation (a few mm across), then partial volume, then scanner noise
    size = style.texture_mm
    smooth = ndimage.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), (0.5, size / dy, size / dx))
    hu += np.where(hu > -500, style.texture_hu * smooth / max(float(smooth.std()), 1e-6), 0.0).astype(np.float32)
    hu = ndimage.gaussian_filter(hu, (style.blur_slices, style.blur_px, style.blur_px))
    hu += rng.normal(0.0, style.noise_hu, hu.shape).astype(np.float32)
    return hu.astype(np.float32)


def _ellipse(xs, ys, cx, cy, ax, ay) -> np.ndarray:
    return ((xs - cx) / ax) ** 2 + ((ys - cy) / ay) ** 2 <= 1.0


def _track(mask: np.ndarray, dx: float, dy: float) -> list[tuple[float, float, float]]:
    """Per slice, ``(x, y, radius)`` in mm of a vessel, carried from the nearest slice that holds it."""
    found = {}
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        yy, xx = np.nonzero(mask[z])
        found[int(z)] = (float(xx.mean() * dx), float(yy.mean() * dy), float(np.sqrt(len(xx) * dx * dy / np.pi)))
    if not found:
        height, width = mask.shape[1:]
        found = {0: (width * dx / 2, height * dy / 2, 10.0)}
    known = np.array(sorted(found))
    return [found[int(known[np.argmin(np.abs(known - z))])] for z in range(mask.shape[0])]


def _body(organs: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """The body's cross-section per slice: an ellipse around the organs, 25 mm wider at the sides and
    front and 60 mm deeper behind (the spine and back muscles), carried to slices without organs."""
    depth, height, width = organs.shape
    ys, xs = np.mgrid[0:height, 0:width]
    xs, ys = xs * dx, ys * dy
    slices = np.flatnonzero(organs.any(axis=(1, 2)))
    if slices.size == 0:
        raise EmbedcacheError("label map holds no organ to paint a body around")
    body = np.zeros(organs.shape, bool)
    for z in range(depth):
        near = slices[np.argmin(np.abs(slices - z))]
        yy, xx = np.nonzero(organs[near])
        x0, x1, y0, y1 = xx.min() * dx - 25.0, xx.max() * dx + 25.0, yy.min() * dy - 25.0, yy.max() * dy + 60.0
        body[z] = _ellipse(xs, ys, (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2)
    return body


def write_anatomy(labels_dir: Path, out: Path, *, cases: int | None, test_cases: int, seed: int,
                  style: str = "portal", progress=None) -> list[str]:
    """A FLARE22-layout dataset in ``out`` from the label maps of ``labels_dir`` (sorted by name): the
    first ``cases`` (None: all but the test cases) into ``imagesTr/`` + ``labelsTr/``, the next
    ``test_cases`` into ``imagesTs/`` + ``labelsTs/``; each CT painted on its label map's own grid and
    affine in ``style`` (:data:`STYLES`), the label map copied as it is. Returns the case names."""
    labels_dir, out = Path(labels_dir), Path(out)
    if style not in PAINT_STYLES:
        *first, last = PAINT_STYLES
        raise EmbedcacheError(f"--style {style}: choose {', '.join(first)} or {last}")
    if not labels_dir.is_dir():
        raise EmbedcacheError(f"{labels_dir}: no such folder; --anatomy takes a folder of label NIfTIs")
    maps = sorted(p for p in labels_dir.iterdir() if is_nifti(p))
    cases = len(maps) - test_cases if cases is None else cases
    if cases < 1 or cases + test_cases > len(maps):
        raise EmbedcacheError(f"{labels_dir}: holds {len(maps)} label maps; --cases {cases} and --test-cases "
                              f"{test_cases} need {max(cases, 1) + test_cases}")
    chosen = [(p, ("imagesTr", "labelsTr")) for p in maps[:cases]] + \
             [(p, ("imagesTs", "labelsTs")) for p in maps[cases:cases + test_cases]]
    targets = [(out / images / f"{nifti_stem(p)}_0000.nii.gz", out / labels / f"{nifti_stem(p)}.nii.gz", p)
               for p, (images, labels) in chosen]
    taken = [path for image, label, _ in targets for path in (image, label, out / DATASET_JSON) if path.exists()]
    if taken:  # checked before any write: a dataset is never half replaced
        raise EmbedcacheError(f"{taken[0]}: exists; phantom writes a new dataset: choose an empty OUT folder")
    task = progress.add_task("anatomy", total=len(targets)) if progress else None
    for i, (image, label_out, source) in enumerate(targets):
        volume = read_label(source)
        for folder in (image.parent, label_out.parent):
            folder.mkdir(parents=True, exist_ok=True)
        painted = varied_style(np.random.default_rng([seed, i])) if style == "varied" else STYLES[style]
        write_nifti(paint_ct(volume.array, volume.spacing_mm, seed=seed * 1_000_003 + i, style=painted),
                    volume.geometry, image)
        shutil.copyfile(source, label_out)
        if progress:
            progress.advance(task)
    write_dataset_json(out, training=cases, name=f"embedcache anatomy from {labels_dir.name}, {style} style")
    return [nifti_stem(p) for p, _ in chosen]
