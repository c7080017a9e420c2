"""Predictions back into DICOM, beside the series they were made from: a DICOM Segmentation
(through highdicom) and an RT Structure Set (through rt-utils), both referencing the source series
and its instances, with new UIDs for everything created and the patient and study copied from the
source. Both libraries are optional (``pip install embedcache[dicom]``); a missing one is one line
saying which extra to install.
"""

from __future__ import annotations

import contextlib
import importlib
import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.sr.coding import Code
from pydicom.valuerep import format_number_as_ds

from embedcache import __version__
from embedcache.errors import EmbedcacheError, UsageError
from embedcache.io.dicom import series_layout
from embedcache.io.labels import ANATOMICAL_STRUCTURE, SCT, LabelMap

#: The segmented property category of every segment: (code, scheme, meaning).
ANATOMY = (ANATOMICAL_STRUCTURE[0], SCT, ANATOMICAL_STRUCTURE[1])


def _require(module: str, extra: str = "dicom"):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{module} is not installed; DICOM output needs it: pip install 'embedcache[{extra}]'") from None


def check_labels(label_ids, label_map: LabelMap) -> None:
    """Every label to write is an organ ``label_map`` can code (SNOMED CT, with its side): a DICOM object
    for a structure it cannot name is refused, never written with another organ's code."""
    for label in label_ids:
        if label_map.code(label) is None:
            entry = label_map.get(label)
            what = f"is named {entry.name!r}, which" if entry else "has no name in it, so it"
            raise UsageError(f"label {int(label)} {what} embedcache cannot code as anatomy ({label_map.source}); "
                             "DICOM output names every segment by its SNOMED CT code: give a --label-map naming it "
                             "as an organ (e.g. adrenal_gland_right), or --output-type nifti")


def source_frames(labels_ijk: np.ndarray) -> np.ndarray:
    """The file's-order label array ``(i=column, j=row, k=slice along the normal)`` of a DICOM series
    → ``(k, rows, columns)`` frames, one per source instance in :func:`series_layout`'s order."""
    return np.ascontiguousarray(np.asarray(labels_ijk).transpose(2, 1, 0))


def _sources(folder: Path, series_uid: str | None):
    """The series' files and headers in the file-order array's slice order; one frame of reference."""
    paths, _ = series_layout(folder, series_uid)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    frames = sorted({str(ds.get("FrameOfReferenceUID", "")) for ds in headers})
    if len(frames) > 1 or not frames[0]:
        raise EmbedcacheError(f"{folder}: its slices have {len(frames) if frames[0] else 'no'} frame(s) of reference; "
                              "a DICOM object placed on the series needs one: export the series again")
    return paths, headers


def check_source_series(folder: Path, series_uid: str | None) -> None:
    """What a DICOM object placed on the series in ``folder`` needs of it, checked before anything is written: one
    frame of reference, and a SOP class for every slice (its own, or its file meta's)."""
    paths, headers = _sources(folder, series_uid)
    _fill_classes(paths, headers)


#: The note an object made from a series with emptied SOP classes carries (its content or structure set description).
CLASS_NOTE = "source SOPClassUID empty: class read from its file meta"


def _fill_classes(paths: list[Path], headers) -> bool:
    """Anonymizers empty SOPClassUID and keep the file meta's MediaStorageSOPClassUID: each header handed to
    highdicom or rt-utils gets that class back, in memory (the user's files stay as they are). True if any did."""
    filled = False
    for path, ds in zip(paths, headers):
        if not str(ds.get("SOPClassUID", "")).strip():
            meta = str(ds.get("file_meta", {}).get("MediaStorageSOPClassUID", "")).strip()
            if not meta:
                raise EmbedcacheError(f"{path}: its SOPClassUID is empty and its file meta names no class either, so "
                                      "no DICOM object can reference it; export the series again with its SOP classes")
            ds.SOPClassUID, filled = meta, True
    return filled


def series_uid_of(folder: Path, series_uid: str | None) -> str:
    paths, _ = series_layout(folder, series_uid)
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def referenced_series(path: Path) -> set[str]:
    """The series a SEG or an RT Structure Set refers to (empty for any other file)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001  (not DICOM, unreadable: not an object for any series)
        return set()
    found = {str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", [])}
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            found |= {str(item.SeriesInstanceUID) for item in study.get("RTReferencedSeriesSequence", [])}
    return found


def check_no_other_object(out_dir: Path, folder: Path, *, series_uid: str | None, owned: set[str]) -> None:
    """Refuse an output folder that holds a DICOM object for the same series that predict did not write."""
    if not Path(out_dir).is_dir():
        return
    uid = series_uid_of(folder, series_uid)
    for path in sorted(p for p in Path(out_dir).iterdir() if p.is_file()):  # by content: PLAN.DCM, no suffix
        if path.name not in owned and uid in referenced_series(path):
            raise EmbedcacheError(f"{path}: already holds a DICOM object for series {uid}, which predict did not "
                                  "write; choose another --out so the two are not mistaken for each other")


def check_only_series(folder: Path, series_uid: str | None) -> None:
    """rt-utils reads every image under a folder: the folder must hold just this series' files."""
    paths, _ = series_layout(folder, series_uid)
    _only_series(folder, paths)


def write_seg(out: Path, folder: Path, labels_ijk: np.ndarray, *, series_uid: str | None, label_ids,
              label_map: LabelMap, decoder: str, semiautomatic: bool) -> Path:
    """A binary DICOM Segmentation of the label array (the source's own voxel order) of the DICOM series in
    ``folder``: one segment per label present, empty frames omitted, named and coded from ``label_map``.
    ``decoder``: what made it (the checkpoint's digest), in the algorithm identification."""
    hd = _require("highdicom")

    check_labels(label_ids, label_map)
    paths, sources = _sources(folder, series_uid)
    filled = _fill_classes(paths, sources)
    frames = source_frames(labels_ijk)
    if frames.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise EmbedcacheError(f"{folder}: the mask {frames.shape} does not cover the series' {len(sources)} slices of "
                              f"{sources[0].Rows}×{sources[0].Columns}; predict on the series itself")
    present = [int(k) for k in label_ids if (frames == int(k)).any()]
    if not present:
        raise EmbedcacheError(f"{folder}: the prediction is empty; there is no segment to write as DICOM SEG")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="embedcache", version=f"{__version__} (decoder {decoder})",
        family=Code("123109", "DCM", "Artificial Intelligence"))
    descriptions = []
    for number, label in enumerate(present, start=1):
        code, meaning, side = label_map.code(label)
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=label_map.name(label),
            segmented_property_category=Code(*ANATOMY),
            segmented_property_type=Code(code, SCT, meaning),
            algorithm_type="SEMIAUTOMATIC" if semiautomatic else "AUTOMATIC", algorithm_identification=algorithm)
        if side is not None:
            # laterality qualifies the property type: the modifier lives inside its code item
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(side[0], SCT, side[1])]
        descriptions.append(description)
    stack = np.stack([frames == label for label in present], axis=-1)  # (frames, rows, columns, segments)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=stack, segmentation_type="BINARY", segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="embedcache",
        manufacturer_model_name="embedcache", software_versions=__version__, device_serial_number="0",
        series_description=f"embedcache {', '.join(label_map.name(k) for k in present)}"[:64],
        content_description=CLASS_NOTE if filled else None, omit_empty_frames=True)
    seg.save_as(out)
    return out



def read_seg(path: Path, geometry, *, label_map: LabelMap) -> np.ndarray:
    """A DICOM Segmentation written by :func:`write_seg` (or any binary one of structures ``label_map`` names)
    → a label volume of ``label_map``'s ids on ``geometry``'s canonical ``(z, y, x)`` grid, each segment placed by
    its frames' positions and given the id whose organ and side its code says."""
    hd = _require("highdicom")

    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # noqa: BLE001  (pydicom and highdicom raise many kinds)
        raise EmbedcacheError(f"{path}: not a readable DICOM Segmentation ({type(exc).__name__}); "
                              "give the SEG predict wrote") from None
    by_code = {}
    for label in label_map.ids:
        coded = label_map.code(label)
        if coded is not None:
            by_code.setdefault((coded[0], coded[2]), label)
    labels = {}  # segment number → label id
    for description in seg.SegmentSequence:
        item = description.SegmentedPropertyTypeCodeSequence[0]
        code = str(item.CodeValue)
        modifiers = item.get("SegmentedPropertyTypeModifierCodeSequence") or []
        side = next(((str(m.CodeValue), str(m.CodeMeaning)) for m in modifiers), None)
        label = by_code.get((code, side)) or by_code.get((code, None))
        if label is None:
            raise EmbedcacheError(f"{path}: segment {description.SegmentNumber} ({code} {item.CodeMeaning}"
                                  f"{', ' + side[1] if side else ''}) is no label of {label_map.source}; give the "
                                  "--label-map of the ground truth")
        labels[int(description.SegmentNumber)] = label
    out = np.zeros(geometry.shape_zyx, np.uint8)
    owner = np.zeros(geometry.shape_zyx, np.uint16)  # the segment that painted each voxel
    pixels = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(_group(seg, frame, "SegmentIdentificationSequence", path).ReferencedSegmentNumber)
        if number not in labels:
            raise EmbedcacheError(f"{path}: frame {index + 1} belongs to segment {number}, which its SegmentSequence "
                                  f"does not describe (it has {sorted(labels)}); the SEG is damaged: write it again")
        at = _voxels(pixels[index] > 0, seg, frame, geometry, path)
        clash = (owner[at] != 0) & (out[at] != labels[number])
        if clash.any():
            other = int(owner[at][clash][0])
            raise EmbedcacheError(f"{path}: segments {other} ({label_map.name(labels[other])}) and {number} "
                                  f"({label_map.name(labels[number])}) overlap; a label volume holds one organ per "
                                  "voxel, so the SEG cannot be scored: give one whose segments do not overlap")
        out[at], owner[at] = labels[number], number
    return out


def _group(seg, frame, keyword: str, path):
    """A functional group of one frame: its own, else the one all frames share (DICOM allows either)."""
    for groups in (frame, *seg.get("SharedFunctionalGroupsSequence", [])):
        if keyword in groups and len(groups[keyword].value):
            return groups[keyword].value[0]
    raise EmbedcacheError(f"{path}: a frame has no {keyword}, of its own or shared; the SEG is incomplete: write "
                          "it again")


def _voxels(mask_rc, seg, frame, geometry, path) -> tuple:
    """The ``(z, y, x)`` indices on the canonical grid of one frame's ``(rows, columns)`` mask, placed by the
    frame's own position, orientation and pixel spacing."""
    position = np.array([float(v) for v in _group(seg, frame, "PlanePositionSequence", path).ImagePositionPatient])
    iop = [float(v) for v in _group(seg, frame, "PlaneOrientationSequence", path).ImageOrientationPatient]
    spacing = [float(v) for v in _group(seg, frame, "PixelMeasuresSequence", path).PixelSpacing]
    rows, cols = np.nonzero(mask_rc)
    row_dir, col_dir = np.array(iop[:3]), np.array(iop[3:])
    points = position + np.outer(cols * spacing[1], row_dir) + np.outer(rows * spacing[0], col_dir)
    exact = geometry.canonical_index(points, space="lps")
    xyz = np.rint(exact).astype(int)
    if len(exact) and np.abs(exact - xyz).max() > 0.05:
        raise EmbedcacheError(f"{path}: its frames do not lie on the label volume's voxels; the SEG was made on "
                              "another grid")
    shape = geometry.shape_zyx
    inside = ((xyz >= 0) & (xyz < np.array([shape[2], shape[1], shape[0]]))).all(axis=1)
    if not inside.all():
        raise EmbedcacheError(f"{path}: a frame lies outside the label volume's grid; the SEG belongs to another series")
    return xyz[:, 2], xyz[:, 1], xyz[:, 0]


def write_rtstruct(out: Path, folder: Path, labels_ijk: np.ndarray, *, series_uid: str | None, label_ids,
                   label_map: LabelMap) -> Path:
    """An RT Structure Set, one ROI per label present named from ``label_map``, contours per slice from the
    mask (holes kept), through rt-utils, referencing the DICOM series in ``folder``."""
    rt_utils = _require("rt_utils")

    check_labels(label_ids, label_map)
    paths, sources = _sources(folder, series_uid)
    filled = _fill_classes(paths, sources)
    frames = source_frames(labels_ijk)
    structure = rt_utils.RTStructBuilder.create_new(dicom_series_path=str(_only_series(folder, paths)))
    order = [str(ds.SOPInstanceUID) for ds in structure.series_data]
    ours = {str(ds.SOPInstanceUID): k for k, ds in enumerate(sources)}
    present = [int(k) for k in label_ids if (frames == int(k)).any()]
    if not present:
        raise EmbedcacheError(f"{folder}: the prediction is empty; there is no structure to write")
    for label in present:
        mask = np.stack([frames[ours[uid]] == label for uid in order], axis=-1)  # rt-utils: (rows, columns, slices)
        structure.add_roi(mask=mask, name=label_map.name(label), use_pin_hole=True, approximate_contours=False)
    _complete(structure.ds, sources[0], [label_map.name(k) for k in present])
    if filled:  # rt-utils read the files itself: its references carry the emptied classes
        _fill_references(structure.ds, {str(ds.SOPInstanceUID): ds.SOPClassUID for ds in sources})
        structure.ds.StructureSetDescription = CLASS_NOTE
    with contextlib.redirect_stdout(io.StringIO()):  # rt-utils prints where it writes
        structure.save(str(out))
    return out


def _complete(ds, source, names) -> None:
    """What rt-utils leaves out or writes too long, for a Structure Set that passes dciodvfy: contour
    coordinates as DS of at most 16 characters, the study's and the frame of reference's type 1 and 2
    attributes from the source, and embedcache named as the maker."""
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            contour.ContourData = [format_number_as_ds(float(v)) for v in contour.ContourData]
    for keyword in ("ReferringPhysicianName", "AccessionNumber", "PositionReferenceIndicator"):
        setattr(ds, keyword, source.get(keyword, ""))
    ds.FrameOfReferenceUID = source.FrameOfReferenceUID
    ds.OperatorsName = ""
    ds.SeriesDescription = f"embedcache {', '.join(names)}"[:64]
    ds.Manufacturer = "embedcache"
    ds.SoftwareVersions = __version__


def _fill_references(ds, classes: dict) -> None:
    """Every empty ReferencedSOPClassUID under ``ds`` that refers to an instance of ``classes`` gets its class."""
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                uid = str(item.get("ReferencedSOPInstanceUID", ""))
                if uid in classes and not str(item.get("ReferencedSOPClassUID", "")).strip():
                    item.ReferencedSOPClassUID = classes[uid]
                _fill_references(item, classes)


def _only_series(folder: Path, paths: list[Path]) -> Path:
    """rt-utils reads every image under a folder: a folder holding just this series' files."""
    if len(paths) == sum(1 for p in folder.iterdir() if p.is_file()):
        return folder
    raise UsageError(f"{folder}: holds files beyond the one series; RT Structure Set output needs a folder of one "
                     "series (rt-utils reads them all)")
