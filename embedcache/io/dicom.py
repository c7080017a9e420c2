"""DICOM series: one CT series per folder (or one chosen by SeriesInstanceUID), HU through rescale
slope and intercept, slices ordered by their position along the slice normal."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from embedcache.errors import EmbedcacheError
from embedcache.errors import reason as _reason
from embedcache.io.geometry import Geometry


def dicom_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.name.upper() != "DICOMDIR")
    except OSError as exc:
        raise EmbedcacheError(f"{folder}: cannot list the folder ({exc.strerror}); check its permissions") from None


#: Suffixes of the notes and pictures that sit beside slices (exports' READMEs, reports, thumbnails): never a slice.
NOTES = {".txt", ".json", ".xml", ".md", ".pdf", ".csv", ".html", ".htm", ".log", ".ini", ".db", ".png", ".jpg",
         ".jpeg", ".gif", ".bmp"}
#: Suffixes of slice files (besides none, and the numeric tail of a UID as file name).
SLICE_SUFFIXES = {".dcm", ".dicom", ".dic", ".ima"}
#: The enhanced (one file, many frames) CT image classes: Enhanced CT, Legacy Converted Enhanced CT.
ENHANCED_CT = {"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}


def _meant_as_slice(path: Path) -> bool:
    """A file pydicom cannot read as DICOM that is a slice all the same: named like one, or holding DICOM
    tags without the Part 10 header (damaged, or written raw). Dropping it would shift every slice after it."""
    suffix = path.suffix.lower()
    if path.name.startswith(".") or suffix in NOTES:
        return False  # the system's own files (.DS_Store), notes and pictures
    if suffix in SLICE_SUFFIXES or not suffix or suffix[1:].isdigit():
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # forced reads of non-DICOM bytes warn about every odd tag
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        return any(tag in ds for tag in ("SOPInstanceUID", "SeriesInstanceUID", "ImagePositionPatient"))
    except Exception:  # noqa: BLE001  (garbage raises anything: not a slice)
        return False


def _multiframe_ct(ds) -> bool:
    """One file holding many CT frames (Enhanced or Legacy Converted Enhanced CT): its positions live in
    per-frame functional groups and its pixels (skipped by a header read) in one element, not one per slice."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return ds.get("Modality") == "CT" and (frames > 1 or "PerFrameFunctionalGroupsSequence" in ds
                                           or str(ds.get("SOPClassUID", "")) in ENHANCED_CT)


def _dicom_headers(folder: Path, series_uid: str | None):
    """The headers of one CT series in ``folder``, checked for one series, CT, and one slice geometry.
    A file that is no readable DICOM yet looks meant as a slice refuses the series; notes beside it do not."""
    headers = []
    for path in dicom_files(folder):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            if _meant_as_slice(path):
                raise EmbedcacheError(f"{path}: not a readable DICOM file (no Part 10 header: damaged or cut short), "
                                      "yet named or built like a slice of the series; replace it with an intact "
                                      "copy, or move it out of the folder if it is not a slice") from None
            continue  # not DICOM: a README, a thumbnail
        except Exception as exc:
            raise EmbedcacheError(f"{path}: unreadable DICOM file ({_reason(exc)}); remove or replace it") from None
        if "PixelData" not in ds and "ImagePositionPatient" not in ds and not _multiframe_ct(ds):
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
        if _multiframe_ct(ds):
            raise EmbedcacheError(f"{path}: an enhanced multi-frame CT ({ds.get('NumberOfFrames', '?')} frames); "
                                  "embedcache reads one file per slice: convert it to NIfTI (e.g. with dcm2niix) or "
                                  "to single-frame slices (e.g. with dcm4che's emf2sf), or export classic slices")
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


def read_dicom(folder: Path, series_uid: str | None) -> tuple[np.ndarray, Geometry]:
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
    return np.ascontiguousarray(kji.transpose(2, 1, 0)), geometry


def dicom_geometry(folder: Path, series_uid: str | None) -> Geometry:
    """The geometry of one series in ``folder``, from its headers only."""
    return _dicom_layout(folder, _dicom_headers(folder, series_uid))[1]


def series_layout(folder: Path, series_uid: str | None) -> tuple[list[Path], Geometry]:
    """The series' files in the order of the file-order array's k axis (along the slice normal), and its geometry."""
    return _dicom_layout(folder, _dicom_headers(folder, series_uid))
