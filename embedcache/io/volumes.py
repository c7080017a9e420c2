"""Reading CT and label volumes (NIfTI files, DICOM series folders): the one entry point of the readers.

Every reader returns a :class:`~embedcache.io.geometry.Volume` in the canonical orientation that
:mod:`embedcache.io.geometry` fixes; every error names the file and the fix.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from embedcache.errors import EmbedcacheError
from embedcache.io.dicom import dicom_files, dicom_geometry, read_dicom
from embedcache.io.geometry import Geometry, Volume
from embedcache.io.nifti import AIR_THRESHOLD_HU, check_finite, check_finite_nifti, is_nifti, nifti_geometry, read_nifti

logger = logging.getLogger(__name__)

#: CT in HU lies in the 16-bit range scanners store it in, padding outside the field of view (-3024,
#: -3995 in pydicom's JPEG 2000 sample) and the extended scale of metal included; a volume with more
#: than 1 % of its voxels outside is not CT in HU (HU times 1000 puts soft tissue past 32767).
HU_RANGE = (-32768.0, 32767.0)


#: Files beside the volumes of a folder of NIfTI files that are not inputs (nnU-Net's and FLARE's notes).
SIDECARS = (".json", ".txt", ".csv", ".md")


def expand_inputs(inputs) -> list[Path]:
    """The inputs a person gives, as volumes: a NIfTI file or DICOM series folder stays itself; a folder of NIfTI
    files (``imagesTs/``, as nnU-Net's predict takes one) becomes its ``.nii``/``.nii.gz`` files in name order. A
    folder holding NIfTI files beside other files is refused: it is neither a folder of volumes nor one series."""
    out = []
    for path in map(Path, inputs):
        if not path.is_dir():
            out.append(path)
            continue
        files = [f for f in sorted(path.iterdir()) if not f.name.startswith(".") and not f.is_dir()]
        volumes = [f for f in files if is_nifti(f)]
        if not volumes:
            out.append(path)  # a DICOM series folder (read_geometry says what is wrong with it otherwise)
            continue
        other = [f for f in files if not is_nifti(f) and f.suffix.lower() not in SIDECARS]
        if other:
            raise EmbedcacheError(f"{path}: holds {len(volumes)} NIfTI volume(s) beside other files ({other[0].name}); "
                                  "give the volumes themselves (FOLDER/*.nii.gz) or a folder of one DICOM series")
        out.extend(volumes)
    return out


def read_geometry(path: Path, *, series_uid: str | None = None) -> Geometry:
    """The geometry of a NIfTI file or DICOM series folder, read from headers only."""
    path = Path(path)
    if path.is_dir():
        return dicom_geometry(path, series_uid)
    _check_file(path)
    return nifti_geometry(path)


def read_image(path: Path, *, series_uid: str | None = None) -> Volume:
    """Read a CT volume in HU (float32, ``(z, y, x)``) from a NIfTI file or a DICOM series folder.

    DICOM pixel values become HU through RescaleSlope and RescaleIntercept; slices are ordered by
    their position along the slice normal. A NIfTI volume is taken to hold HU already and is
    refused when it holds no air (a sign of MR, a PNG stack or a pre-normalized volume), unless its
    values are those of CT cropped inside the body (:func:`looks_like_cropped_ct`), which is read with a note.
    """
    path = Path(path)
    if path.is_dir():
        data, geometry = read_dicom(path, series_uid)
        check_finite(data, path)
    else:
        _check_file(path)
        data, geometry = read_nifti(path, label=False)
        check_finite(data, path)
        low = float(data.min()) if data.size else 0.0
        if low > AIR_THRESHOLD_HU:
            if not looks_like_cropped_ct(data):
                raise EmbedcacheError(
                    f"{path}: lowest value is {low:.0f}, but CT in HU holds air near -1000, and these values are not "
                    "those of CT cropped inside the body either (fat near -100 HU, soft tissue near 40 HU); this does "
                    "not look like CT in Hounsfield units"
                )
            logger.warning(f"{path}: holds no air (lowest value {low:.0f} HU); read as CT cropped inside the body, "
                           "its fat and soft tissue in HU")
    check_plausible_hu(data, path)
    return Volume(array=geometry.canonical(data), geometry=geometry, path=path)


def looks_like_cropped_ct(hu: np.ndarray) -> bool:
    """Whether values with no air are still CT in HU: a region cropped inside the body (around the kidneys and
    glands, as some data sets store them) holds fat (-150..-50 HU) and soft tissue (0..100 HU), some of each, and
    values beyond both. An MR volume, a PNG stack (0..255) or a normalized one (0..1, z-scores) holds no fat band
    below zero, and HU scaled ×1000 fails :func:`check_plausible_hu`."""
    sample = np.asarray(hu).ravel()[:: max(1, hu.size // 2_000_000)]  # a couple of million voxels decide
    fat = float(np.mean((sample >= -150) & (sample <= -50)))
    soft = float(np.mean((sample >= 0) & (sample <= 100)))
    return fat >= 0.01 and soft >= 0.05 and float(sample.max()) >= 100


def check_plausible_hu(hu: np.ndarray, path: Path) -> None:
    """Refuse voxels that cannot be a CT of a body in HU: values scaled out of the HU range (more than
    1 % of the voxels outside :data:`HU_RANGE`: HU times 1000, say) or a blank volume (no tissue: not
    one voxel in 10,000 above -500 HU). Either would window to one grey and train on nothing."""
    if not hu.size:
        return
    outside = float(np.mean((hu < HU_RANGE[0]) | (hu > HU_RANGE[1])))
    if outside > 0.01:
        raise EmbedcacheError(f"{path}: {100 * outside:.0f} % of the voxels lie outside {HU_RANGE[0]:g}..{HU_RANGE[1]:g} "
                              f"HU (from {float(hu.min()):g} to {float(hu.max()):g}); this is not CT in Hounsfield "
                              "units: undo its scaling")
    if float(np.mean(hu > AIR_THRESHOLD_HU)) < 1e-4:
        raise EmbedcacheError(f"{path}: no tissue: fewer than 1 in 10,000 voxels lie above {AIR_THRESHOLD_HU:g} HU "
                              f"(the volume spans {float(hu.min()):g} to {float(hu.max()):g}); is it blank?")


def read_label(path: Path) -> Volume:
    """Read a label volume (integer ids, ``(z, y, x)``) from a NIfTI file."""
    path = Path(path)
    if path.is_dir():
        raise EmbedcacheError(f"{path}: labels are read from NIfTI files, not folders; convert the labels to NIfTI")
    _check_file(path)
    data, geometry = read_nifti(path, label=True)
    return Volume(array=geometry.canonical(data), geometry=geometry, path=path)


def check_sources(image: Path, label: Path, *, series_uid: str | None = None) -> None:
    """The checks of an image/label pair that need no voxel data (but a float NIfTI's): both files
    exist and parse, the image holds no NaN or infinite voxels, the label lies on the image's grid.
    Run on every case before any heavy work, so a mistake is reported in a second."""
    image, label = Path(image), Path(label)
    image_geometry = read_geometry(image, series_uid=series_uid)
    if not image.is_dir():
        check_finite_nifti(image)
    if label.is_dir():
        raise EmbedcacheError(f"{label}: labels are read from NIfTI files, not folders; convert the labels to NIfTI")
    check_same_grid(image_geometry, read_geometry(label), image_path=image, label_path=label)


def check_same_grid(image: Geometry, label: Geometry, *, image_path: Path, label_path: Path) -> None:
    """Refuse a label volume that does not lie on the image's voxels in world coordinates."""
    if image.shape_zyx != label.shape_zyx:
        raise EmbedcacheError(
            f"{label_path}: label volume shape {label.source_shape} does not match image {image.source_shape} "
            f"of {image_path}; pair each image with its own label"
        )
    if not image.same_grid(label):
        offset = np.abs(image.canonical_affine - label.canonical_affine).max()
        raise EmbedcacheError(
            f"{label_path}: label geometry differs from {image_path} by up to {offset:.3f} mm in the affine; "
            "resample the label onto the image grid"
        )


def _check_file(path: Path) -> None:
    if not path.exists():
        if path.is_symlink():
            raise EmbedcacheError(f"{path}: a symbolic link that leads nowhere (broken or a loop); point it at the file")
        raise EmbedcacheError(f"{path}: no such file; check the path")
    if not is_nifti(path):
        raise EmbedcacheError(f"{path}: not a .nii or .nii.gz file nor a DICOM folder; convert it to NIfTI")


def source_digest(*paths: Path) -> str:
    """sha256 over the bytes of the given files and DICOM folders (files in sorted order)."""
    digest = hashlib.sha256()
    for path in paths:
        files = dicom_files(path) if Path(path).is_dir() else [Path(path)]
        for file in files:
            digest.update(file.name.encode())
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()
