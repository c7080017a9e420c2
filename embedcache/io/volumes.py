"""Reading CT and label volumes (NIfTI, DICOM series) and writing masks back.

This is the only module that knows file formats. Every reader returns a :class:`Volume` in one
canonical orientation:

* the array is an axial stack indexed ``(z, y, x)``;
* ``x`` grows toward the patient's **left**, ``y`` toward **posterior**, ``z`` toward **superior**
  (``LPS`` axis codes for ``(x, y, z)``). An axial slice ``array[z]`` is therefore shown the
  radiological way: patient right on the image's left, anterior at the top;
* world coordinates are nibabel's RAS+ millimetres, also for DICOM (whose LPS is converted).

The file's own array order and affine are kept in :class:`Geometry`, so a mask predicted in
canonical space goes back into the file's voxel grid exactly (:meth:`Volume.to_source`).
"""

from __future__ import annotations

import hashlib
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedcache.errors import EmbedcacheError, reason as _reason
from embedcache.io.files import atomic_path

CANONICAL_AXCODES = ("L", "P", "S")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: A CT volume of the body always holds air: some voxel below this many HU.
AIR_THRESHOLD_HU = -500.0


@dataclass(frozen=True)
class Geometry:
    """Where a volume's voxels lie: the file's array shape ``(i, j, k)`` and its voxel→RAS affine."""

    source_shape: tuple[int, int, int]
    source_affine: np.ndarray

    def _to_canonical(self):
        from nibabel import orientations as nio

        ornt = nio.io_orientation(self.source_affine)
        return nio.ornt_transform(ornt, nio.axcodes2ornt(CANONICAL_AXCODES))

    @property
    def canonical_affine(self) -> np.ndarray:
        """4×4 map from canonical ``(x, y, z)`` voxel indices to RAS+ mm."""
        from nibabel import orientations as nio

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
        from nibabel import orientations as nio

        return np.ascontiguousarray(nio.apply_orientation(data_ijk, self._to_canonical()).transpose(2, 1, 0))

    def to_source(self, array_zyx: np.ndarray) -> np.ndarray:
        """Canonical ``(z, y, x)`` → the file's array order ``(i, j, k)``; exact inverse of :meth:`canonical`."""
        from nibabel import orientations as nio

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


#: The sets a case can belong to: ``train`` and ``val`` (which chooses the checkpoint) are drawn from
#: the training cases; ``test`` cases (``imagesTs/``, or a split file's) are never seen in training.
SUBSETS = ("train", "val", "test")


@dataclass(frozen=True)
class CaseSource:
    """One case: a CT image (NIfTI file or DICOM series folder) and its label volume.

    ``subset`` is ``test`` for cases of a test folder (``imagesTs/``), else ``train`` (training or
    validation, as the fine-tune's split decides)."""

    name: str
    image: Path
    label: Path
    series_uid: str | None = None
    subset: str = "train"


# --------------------------------------------------------------------------------------------- NIfTI


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def case_name(path: Path) -> str:
    """FLARE22 case name of an image file or DICOM folder: ``CASE_0000.nii.gz`` and ``CASE_0000/`` → ``CASE``."""
    path = Path(path)
    stem = path.name if path.is_dir() else nifti_stem(path)
    return stem[: -len("_0000")] if stem.endswith("_0000") else stem


def nifti_stem(path: Path) -> str:
    """A NIfTI file's name without ``.nii`` or ``.nii.gz``."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _load_nifti(path: Path):
    import nibabel as nib

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
    return img, tuple(int(s) for s in shape)


def _nifti_geometry(path: Path) -> Geometry:
    img, shape = _load_nifti(path)
    return Geometry(source_shape=shape, source_affine=np.asarray(img.affine, dtype=np.float64))


def _check_finite_nifti(path: Path) -> None:
    """Refuse NaN or infinite voxels. Integer voxels with a finite scaling cannot hold any, so only
    float volumes (or a NaN scaling) are read here."""
    img, shape = _load_nifti(path)
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    if img.get_data_dtype().kind in "iu" and np.isfinite([slope, inter]).all():
        return
    try:
        data = np.asanyarray(img.dataobj).reshape(shape)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise EmbedcacheError(f"{path}: NIfTI data is truncated or corrupt ({_reason(exc)}); re-copy the file") from None
    _check_finite(data, path)


def _check_finite(data: np.ndarray, path: Path) -> None:
    bad = ~np.isfinite(data)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise EmbedcacheError(
            f"{path}: {int(bad.sum())} voxels are NaN or infinite (the first at array index {first}); "
            "replace them (e.g. with -1024 HU) and rerun"
        )


def _read_nifti(path: Path, *, label: bool) -> tuple[np.ndarray, Geometry]:
    img, shape = _load_nifti(path)
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
        data = data.astype(np.uint8 if data.max(initial=0) < 256 and data.min(initial=0) >= 0 else np.int32)
    return data, Geometry(source_shape=shape, source_affine=np.asarray(img.affine, dtype=np.float64))


def write_nifti(array_zyx: np.ndarray, geometry: Geometry, path: Path) -> None:
    """Write a canonical ``(z, y, x)`` array into ``path`` on ``geometry``'s own grid and affine.

    Written to a temporary name first, so an interrupted write never leaves a half file behind.
    """
    import nibabel as nib

    data = geometry.to_source(array_zyx)
    img = nib.Nifti1Image(data, geometry.source_affine)
    img.set_qform(geometry.source_affine, code=1)
    img.set_sform(geometry.source_affine, code=1)
    with atomic_path(Path(path), keep_suffix=True) as tmp:  # nibabel picks the format by suffix
        nib.save(img, str(tmp))


# --------------------------------------------------------------------------------------------- DICOM


def _dicom_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.name.upper() != "DICOMDIR")
    except OSError as exc:
        raise EmbedcacheError(f"{folder}: cannot list the folder ({exc.strerror}); check its permissions") from None


def _dicom_headers(folder: Path, series_uid: str | None):
    """The headers of one CT series in ``folder``, checked for one series, CT, and one slice geometry."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers = []
    for path in _dicom_files(folder):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            continue  # not DICOM: a README, a thumbnail
        except Exception as exc:
            raise EmbedcacheError(f"{path}: unreadable DICOM file ({_reason(exc)}); remove or replace it") from None
        if "PixelData" not in ds and "ImagePositionPatient" not in ds:
            continue  # DICOMDIR-like or non-image object
        headers.append((path, ds))
    if not headers:
        raise EmbedcacheError(f"{folder}: no DICOM image files found; point at a folder holding one CT series")
    by_series: dict[str, list] = {}
    for path, ds in headers:
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if series_uid is not None:
        if series_uid not in by_series:
            raise EmbedcacheError(f"{folder}: no series {series_uid}; it holds {_list_series(by_series)}")
        headers = by_series[series_uid]
    elif len(by_series) > 1:
        raise EmbedcacheError(
            f"{folder}: holds {len(by_series)} DICOM series ({_list_series(by_series)}); "
            "keep one series per folder or choose one with --series UID"
        )
    first = headers[0][1]
    modality = str(first.get("Modality", ""))
    if modality != "CT":
        raise EmbedcacheError(f"{folder}: DICOM modality is {modality or 'missing'}, not CT; embedcache reads CT only")
    for path, ds in headers:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise EmbedcacheError(f"{path}: multi-frame DICOM is not supported; convert the series to NIfTI first")
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                raise EmbedcacheError(f"{path}: DICOM file lacks {tag}; it cannot be placed in 3-D")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns) or not np.allclose(
            [float(v) for v in ds.ImageOrientationPatient], [float(v) for v in first.ImageOrientationPatient], atol=1e-4
        ) or not np.allclose([float(v) for v in ds.PixelSpacing], [float(v) for v in first.PixelSpacing], atol=1e-4):
            raise EmbedcacheError(
                f"{path}: slice size, orientation or pixel spacing differs from {headers[0][0].name} in the same "
                "series; the series is not one volume"
            )
    return headers


def _list_series(by_series: dict) -> str:
    parts = []
    for uid, items in by_series.items():
        desc = str(items[0][1].get("SeriesDescription", "")).strip()
        parts.append(f"{uid}" + (f" '{desc}'" if desc else "") + f": {len(items)} files")
    return "; ".join(parts)


def _dicom_layout(folder: Path, headers) -> tuple[list[Path], Geometry]:
    """Order slices along the slice normal (never by InstanceNumber or file name) and build the affine."""
    first = headers[0][1]
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]  # row_dir: along a row (column index grows); col_dir: down a column
    normal = np.cross(row_dir, col_dir)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in headers])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    paths = [headers[i][0] for i in order]
    if len(along) > 1:
        steps = np.diff(along)
        if np.any(steps < 1e-3):
            dup = paths[int(np.argmin(steps)) + 1]
            raise EmbedcacheError(f"{dup}: two slices at the same position in {folder}; remove the duplicate")
        if np.ptp(steps) > max(0.01, 0.01 * np.median(steps)):
            raise EmbedcacheError(
                f"{folder}: slice spacing is not uniform (steps from {steps.min():.3f} to {steps.max():.3f} mm); "
                "missing slices or a mixed series; export a complete series"
            )
        slice_mm = float(np.mean(steps))
    else:
        slice_mm = float(first.get("SpacingBetweenSlices", 0) or first.get("SliceThickness", 0) or 1.0)
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)  # (between rows, between columns)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_mm  # i: column index
    lps[:3, 1] = col_dir * row_mm  # j: row index
    lps[:3, 2] = normal * slice_mm  # k: slice index, sorted along the normal
    lps[:3, 3] = positions[order[0]]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    shape = (int(first.Columns), int(first.Rows), len(paths))
    return paths, Geometry(source_shape=shape, source_affine=ras)


def _read_dicom(folder: Path, series_uid: str | None) -> tuple[np.ndarray, Geometry]:
    import pydicom

    paths, geometry = _dicom_layout(folder, _dicom_headers(folder, series_uid))
    slices = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception as exc:
            raise EmbedcacheError(
                f"{path}: cannot decode DICOM pixel data ({_reason(exc)}); install pylibjpeg for compressed files "
                "or replace the file"
            ) from None
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        slices.append(pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    kji = np.stack(slices)  # (slice k, row j, column i)
    _check_finite(kji, folder)
    return np.ascontiguousarray(kji.transpose(2, 1, 0)), geometry


# ------------------------------------------------------------------------------------------ entry points


def read_geometry(path: Path, *, series_uid: str | None = None) -> Geometry:
    """The geometry of a NIfTI file or DICOM series folder, read from headers only."""
    path = Path(path)
    if path.is_dir():
        return _dicom_layout(path, _dicom_headers(path, series_uid))[1]
    _check_file(path)
    return _nifti_geometry(path)


def read_image(path: Path, *, series_uid: str | None = None) -> Volume:
    """Read a CT volume in HU (float32, ``(z, y, x)``) from a NIfTI file or a DICOM series folder.

    DICOM pixel values become HU through RescaleSlope and RescaleIntercept; slices are ordered by
    their position along the slice normal. A NIfTI volume is taken to hold HU already and is
    refused when it holds no air (a sign of MR, a PNG stack or a pre-normalized volume).
    """
    path = Path(path)
    if path.is_dir():
        data, geometry = _read_dicom(path, series_uid)
    else:
        _check_file(path)
        data, geometry = _read_nifti(path, label=False)
        _check_finite(data, path)
        low = float(data.min(initial=0.0)) if data.size else 0.0
        if low > AIR_THRESHOLD_HU:
            raise EmbedcacheError(
                f"{path}: lowest value is {low:.0f}, but CT in HU holds air near -1000; "
                "this does not look like CT in Hounsfield units"
            )
    return Volume(array=geometry.canonical(data), geometry=geometry, path=path)


def read_label(path: Path) -> Volume:
    """Read a label volume (integer ids, ``(z, y, x)``) from a NIfTI file."""
    path = Path(path)
    if path.is_dir():
        raise EmbedcacheError(f"{path}: labels are read from NIfTI files, not folders; convert the labels to NIfTI")
    _check_file(path)
    data, geometry = _read_nifti(path, label=True)
    return Volume(array=geometry.canonical(data), geometry=geometry, path=path)


def check_sources(image: Path, label: Path, *, series_uid: str | None = None) -> None:
    """The checks of an image/label pair that need no voxel data (but a float NIfTI's): both files
    exist and parse, the image holds no NaN or infinite voxels, the label lies on the image's grid.
    Run on every case before any heavy work, so a mistake is reported in a second."""
    image, label = Path(image), Path(label)
    image_geometry = read_geometry(image, series_uid=series_uid)
    if not image.is_dir():
        _check_finite_nifti(image)
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
        files = _dicom_files(path) if Path(path).is_dir() else [Path(path)]
        for file in files:
            digest.update(file.name.encode())
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------- dataset layouts

_LAYOUTS = (("imagesTr", "labelsTr", "train"), ("images", "labels", "train"), ("imagesTs", "labelsTs", "test"))


def discover_cases(root: Path) -> list[CaseSource]:
    """Find (image, label) pairs in a FLARE22-style folder.

    Layouts: ``images/`` + ``labels/``, ``imagesTr/`` + ``labelsTr/`` (training and validation
    cases) and ``imagesTs/`` + ``labelsTs/`` (test cases, as nnU-Net lays them out). An image
    ``CASE_0000.nii.gz`` (or a DICOM series folder ``CASE_0000/`` or ``CASE/``) pairs with the label
    ``CASE.nii.gz``. Images without a label are skipped with a warning.
    """
    root = Path(root)
    if not root.is_dir():
        raise EmbedcacheError(f"{root}: no such folder; give a dataset folder or --image/--label pairs")
    cases: list[CaseSource] = []
    found_layout = False
    for images_name, labels_name, subset in _LAYOUTS:
        images, labels = root / images_name, root / labels_name
        if not (images.is_dir() and labels.is_dir()):
            continue
        found_layout = True
        label_by_case = {nifti_stem(p): p for p in labels.iterdir() if is_nifti(p)}
        for image in sorted(images.iterdir()):
            if not (image.is_dir() or is_nifti(image)):
                continue
            case = case_name(image)
            label = label_by_case.get(case)
            if label is None:
                warnings.warn(f"{image}: no label {case}.nii.gz in {labels}; case skipped", stacklevel=2)
                continue
            cases.append(CaseSource(name=case, image=image, label=label, subset=subset))
    if not found_layout:
        if root.name in {name for layout in _LAYOUTS for name in layout[:2]}:
            raise EmbedcacheError(f"{root}: an images or labels folder itself; give the folder that holds it "
                                  f"({root.resolve().parent})")
        raise EmbedcacheError(
            f"{root}: no images/ + labels/ (or imagesTr/ + labelsTr/) folders; lay the data out as FLARE22 does"
        )
    if not cases:
        raise EmbedcacheError(f"{root}: no image has a matching label; expected CASE_0000.nii.gz ↔ CASE.nii.gz")
    names = [c.name for c in cases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EmbedcacheError(f"{root}: case {dupes[0]} appears in more than one images folder; keep one copy")
    return cases
