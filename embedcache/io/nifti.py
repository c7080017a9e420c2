"""NIfTI files: headers, voxels (HU or label ids) and writing a canonical array back on a file's grid."""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from embedcache.errors import EmbedcacheError
from embedcache.errors import reason as _reason
from embedcache.io.files import atomic_path
from embedcache.io.geometry import Geometry

#: A CT volume of the body always holds air: some voxel below this many HU.
AIR_THRESHOLD_HU = -500.0

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)



def nifti_stem(path: Path) -> str:
    """A NIfTI file's name without ``.nii`` or ``.nii.gz``."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def load_nifti(path: Path):
    if not path.exists():
        raise EmbedcacheError(f"{path}: no such file; check the path")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for a bad header
        raise EmbedcacheError(f"{path}: not a readable NIfTI file ({_reason(exc)}); re-export or replace it") from None
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise EmbedcacheError(
            f"{path}: volume has shape {tuple(img.shape)}; expected a 3-D CT volume (split 4-D series first)"
        )
    shape = tuple(int(s) for s in shape)
    check_declared_size(path, shape)
    return img, shape


#: The largest volume read (checked from the header, before a voxel is): slices of at most 4096 px a side, and
#: 2^30 voxels in all (a 1024³ volume; a 512² CT of 4096 slices). Past it a header is a mistake or a bomb.
MAX_SIDE_PX, MAX_VOXELS = 4096, 2**30


def check_declared_size(path: Path, shape) -> None:
    """Refuse a header whose declared grid is larger than any CT (:data:`MAX_SIDE_PX`, :data:`MAX_VOXELS`) or than
    this machine's free memory can hold as float32 twice over, before any voxel is read or inflated."""
    if min(shape) < 0:
        raise EmbedcacheError(f"{path}: its header declares a {'×'.join(map(str, shape))} grid, with a negative size; "
                              "the header is damaged: re-export or replace the file")
    voxels = int(np.prod(shape, dtype=np.int64))
    if sorted(shape)[1] > MAX_SIDE_PX or voxels > MAX_VOXELS:
        raise EmbedcacheError(f"{path}: its header declares a {'×'.join(map(str, shape))} grid, beyond the largest "
                              f"volume embedcache reads ({MAX_SIDE_PX} px a side in-plane, {MAX_VOXELS:,} voxels); "
                              "the header is damaged or the file is not a CT volume")
    free = _available_memory()
    if free is not None and voxels * 4 * 2 > free:
        raise EmbedcacheError(f"{path}: its {'×'.join(map(str, shape))} voxels need about {voxels * 8 / 2**30:.1f} GiB "
                              f"of memory to read, but {free / 2**30:.1f} GiB are free; free memory or crop the volume")


def _available_memory() -> int | None:
    """Bytes of memory free for a new allocation (Linux's MemAvailable), or None where the system does not say."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def nifti_geometry(path: Path) -> Geometry:
    img, shape = load_nifti(path)
    return Geometry(source_shape=shape, source_affine=np.asarray(img.affine, dtype=np.float64))


def check_finite_nifti(path: Path) -> None:
    """Refuse NaN or infinite voxels, and unsigned voxels that no scaling takes below air's HU (raw
    scanner values, say). Integer voxels with a finite scaling cannot hold NaN, so only float
    volumes (or a NaN scaling) are read here: the header settles the rest."""
    img, shape = load_nifti(path)
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    slope, inter = (1.0 if slope is None else float(slope)), (0.0 if inter is None else float(inter))
    if img.get_data_dtype().kind == "u" and slope >= 0 and inter > AIR_THRESHOLD_HU:
        raise EmbedcacheError(f"{path}: voxels are unsigned ({img.get_data_dtype()}) with intercept {inter:g}, so no voxel "
                              "can be air (near -1000 HU); this is not CT in Hounsfield units: rescale it to HU")
    if img.get_data_dtype().kind in "iu" and np.isfinite([slope, inter]).all():
        return
    try:
        data = np.asanyarray(img.dataobj).reshape(shape)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise EmbedcacheError(f"{path}: NIfTI data is truncated or corrupt ({_reason(exc)}); re-copy the file") from None
    check_finite(data, path)


def check_finite(data: np.ndarray, path: Path) -> None:
    bad = ~np.isfinite(data)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise EmbedcacheError(
            f"{path}: {int(bad.sum())} voxels are NaN or infinite (the first at array index {first}); "
            "replace them (e.g. with -1024 HU) and rerun"
        )


def read_nifti(path: Path, *, label: bool) -> tuple[np.ndarray, Geometry]:
    img, shape = load_nifti(path)
    try:
        if label:
            data = np.asanyarray(img.dataobj)
        else:
            data = img.get_fdata(dtype=np.float32)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise EmbedcacheError(f"{path}: NIfTI data is truncated or corrupt ({_reason(exc)}); re-copy the file") from None
    data = data.reshape(shape)
    if label:
        if np.issubdtype(data.dtype, np.floating):
            rounded = np.rint(data)
            if not np.array_equal(rounded, data):
                raise EmbedcacheError(f"{path}: label volume holds non-integer values; expected label ids")
            data = rounded
        low, high = data.min(initial=0), data.max(initial=0)
        if low < 0 or high > np.iinfo(np.int32).max:
            raise EmbedcacheError(f"{path}: label volume holds {low if low < 0 else high:g}, which is no label id "
                                  "(0 and up); expected label ids")
        data = data.astype(np.uint8 if data.max(initial=0) < 256 and data.min(initial=0) >= 0 else np.int32)
    return data, Geometry(source_shape=shape, source_affine=np.asarray(img.affine, dtype=np.float64))


def write_nifti(array_zyx: np.ndarray, geometry: Geometry, path: Path, *, description: str = "") -> None:
    """Write a canonical ``(z, y, x)`` array into ``path`` on ``geometry``'s own grid and affine, with
    ``description`` (at most 79 ASCII characters) in the header's ``descrip`` field.

    Written to a temporary name first, so an interrupted write never leaves a half file behind.
    """
    data = geometry.to_source(array_zyx)
    img = nib.Nifti1Image(data, geometry.source_affine)
    if description:
        img.header["descrip"] = description.encode("ascii")[:79]
    img.set_qform(geometry.source_affine, code=1)
    img.set_sform(geometry.source_affine, code=1)
    with atomic_path(Path(path), keep_suffix=True) as tmp:  # nibabel picks the format by suffix
        nib.save(img, str(tmp))


def nifti_description(path: Path) -> str:
    """The header's ``descrip`` field of a NIfTI file ("" where it cannot be read as one)."""
    try:
        return nib.load(str(path)).header["descrip"].item().split(b"\0", 1)[0].decode("ascii", "replace")
    except (OSError, ValueError, EOFError, nib.filebasedimages.ImageFileError):  # not NIfTI, or damaged: no mark
        return ""
