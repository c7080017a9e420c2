"""DICOM faults: damaged slices, anonymized SOP classes, enhanced multi-frame CT, foreign objects in the output
folder and SEGs that cannot be scored. Each ends in one line naming the file and the fix, never a traceback, a
dropped slice or a silently different score; the user's files stay as they were."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import test_dicom_out as dicom_out_tests  # its series fixture and checks (tests/io/)

from embedcache.errors import EmbedcacheError
from embedcache.io.dicom_out import read_seg, write_rtstruct, write_seg
from embedcache.io.labels import FLARE22
from embedcache.io.volumes import read_geometry, read_image

from conftest import cli, one_line, pydicom_dir

hd = pytest.importorskip("highdicom", reason="DICOM output needs the dicom extra (pip install 'embedcache[dicom]')")
ct5n = dicom_out_tests.ct5n  # the fixture: pydicom's 5-slice CT series, and CT5N.nii.gz of two glands on its grid
_glands, dciodvfy = dicom_out_tests._glands, dicom_out_tests.dciodvfy


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _by_z(folder: Path) -> list[Path]:
    """The series' files, lowest slice first."""
    return sorted(folder.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))


def _seg(folder: Path, out: Path) -> pydicom.Dataset:
    """The SEG write_seg makes of the two glands on ``folder``, as a dataset to damage."""
    geometry = read_geometry(folder)
    write_seg(out, folder, geometry.to_source(_glands(geometry.shape_zyx)), series_uid=None, label_ids=(7, 8),
              label_map=FLARE22, decoder="t", semiautomatic=True)
    return pydicom.dcmread(out)


# ------------------------------------------------------------------------------ a slice that is not readable


@pytest.mark.parametrize("where", ["end", "middle"])
@pytest.mark.parametrize("name", ["keep", "slice.dcm", "IM0001.IMA", "1.2.840.5"])
def test_a_slice_whose_dicm_marker_is_damaged_refuses_the_series_and_notes_stay_tolerated(name, where, tmp_path):
    """Guards item 1: a slice whose Part 10 marker is overwritten was skipped as 'not DICOM', the series read from
    the rest (at an end: exit 0, every index shifted; in the middle: a spacing error that named no file). Notes,
    pictures and the system's dotfiles beside the slices are still no slices."""
    folder = tmp_path / "CT5N"
    shutil.copytree(pydicom_dir("dicomdirtests/98892001/CT5N"), folder)
    victim = _by_z(folder)[0 if where == "end" else 2]
    for note in ("README.txt", "info.json", "thumb.png", "report.pdf", ".DS_Store"):
        (folder / note).write_bytes(b"not a slice\n")
    data = bytearray(victim.read_bytes())
    assert data[128:132] == b"DICM"
    data[128:132] = b"\0\0\0\0"
    victim.unlink()
    damaged = folder / (victim.name if name == "keep" else name)
    damaged.write_bytes(bytes(data))
    before = _snapshot(folder)
    with pytest.raises(EmbedcacheError) as caught:
        read_image(folder)
    message = str(caught.value)
    assert message.startswith(f"{damaged}: not a readable DICOM file") and "\n" not in message
    assert "replace it with an intact copy" in message
    assert _snapshot(folder) == before
    damaged.unlink()  # the notes alone never refuse the series; a gap in it still does
    if where == "end":
        assert read_image(folder).array.shape == (4, 16, 16)
    else:
        with pytest.raises(EmbedcacheError, match="slice spacing is not uniform"):
            read_image(folder)


def test_a_slice_written_without_its_part10_header_is_refused_by_content(tmp_path):
    """Guards item 1: a slice with an unfamiliar suffix that holds DICOM tags but no preamble and file meta (written
    raw) was skipped as 'not DICOM'; its tags show it is one of the series. An unfamiliar file of other bytes is
    not."""
    folder = tmp_path / "CT5N"
    shutil.copytree(pydicom_dir("dicomdirtests/98892001/CT5N"), folder)
    victim = _by_z(folder)[-1]
    (folder / "scanner.cfg").write_text("[scanner]\nmodel = none\n")
    ds = pydicom.dcmread(victim)
    victim.unlink()
    raw = folder / "top.bak"
    ds.preamble = None
    del ds.file_meta
    ds.save_as(raw, enforce_file_format=False, implicit_vr=True, little_endian=True)
    with pytest.raises(EmbedcacheError, match=f"^{raw}: not a readable DICOM file"):
        read_image(folder)
    raw.unlink()
    assert read_image(folder).array.shape == (4, 16, 16)


def test_a_damaged_slice_is_one_line_from_predict(ct5n, tiny_model, tmp_path):
    """Guards item 1 from the command line: predict on a series with a damaged slice stops before any work."""
    victim = _by_z(ct5n)[0]
    data = bytearray(victim.read_bytes())
    data[128:132] = b"XXXX"
    victim.write_bytes(bytes(data))
    result = cli("predict", ct5n, "--from-labels", tmp_path / "CT5N.nii.gz", "--model", "tiny", "--device", "cpu",
                 "--out", tmp_path / "pred", "--no-progress")
    errors = [line for line in result.output.splitlines() if line.lower().startswith("error: ")]
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith(f"error: {victim}: not a readable DICOM file") and "replace it" in errors[0]
    assert errors[1:] == ["Error: 1 input(s) failed; see the errors above"], result.output
    assert not (tmp_path / "pred" / "CT5N.nii.gz").exists()


# ------------------------------------------------------------------------------ anonymized SOP classes


def _blank_classes(folder: Path) -> None:
    """What anonymizers do: an empty SOPClassUID, the file meta's MediaStorageSOPClassUID kept."""
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ""
        ds.save_as(path)


def test_a_series_with_empty_sop_classes_gets_a_valid_seg_and_rtstruct_that_say_so(ct5n, tmp_path):
    """Guards item 2: highdicom crashed (KeyError '') on slices whose SOPClassUID is empty, and rt-utils wrote a
    Structure Set whose references had no class (dciodvfy errors). The class now comes from the file meta, in
    memory only; the outputs say so, pass dciodvfy, and the SEG reads back as the mask."""
    pytest.importorskip("rt_utils", reason="RT Structure Set output needs the dicom extra")
    _blank_classes(ct5n)
    before = _snapshot(ct5n)
    geometry = read_geometry(ct5n)
    labels = _glands(geometry.shape_zyx)
    seg = write_seg(tmp_path / "x.seg.dcm", ct5n, geometry.to_source(labels), series_uid=None, label_ids=(7, 8),
                    label_map=FLARE22, decoder="t", semiautomatic=True)
    rt = write_rtstruct(tmp_path / "x.rtstruct.dcm", ct5n, geometry.to_source(labels), series_uid=None,
                        label_ids=(7, 8), label_map=FLARE22)
    assert _snapshot(ct5n) == before
    ct = "1.2.840.10008.5.1.4.1.1.2"
    for path, note in ((seg, "ContentDescription"), (rt, "StructureSetDescription")):
        dciodvfy(path)
        ds = pydicom.dcmread(path)
        assert "class read from its file meta" in ds.get(note, "")
        referenced = {str(e.value) for e in ds.iterall() if e.keyword == "ReferencedSOPClassUID"}
        assert ct in referenced and "" not in referenced, path.name
    np.testing.assert_array_equal(read_seg(seg, geometry, label_map=FLARE22), labels)


def test_a_slice_with_no_sop_class_anywhere_is_one_line(ct5n, tmp_path):
    """Guards item 2: with neither the element nor the file meta naming the class, no object can reference the
    slice: one line naming it, nothing written."""
    _blank_classes(ct5n)
    victim = sorted(ct5n.iterdir())[0]
    ds = pydicom.dcmread(victim)
    del ds.file_meta.MediaStorageSOPClassUID
    ds.save_as(victim, enforce_file_format=False)
    geometry = read_geometry(ct5n)
    with pytest.raises(EmbedcacheError, match=f"^{victim}: its SOPClassUID is empty and its file meta names no class"):
        write_seg(tmp_path / "x.seg.dcm", ct5n, geometry.to_source(_glands(geometry.shape_zyx)), series_uid=None,
                  label_ids=(7, 8), label_map=FLARE22, decoder="t", semiautomatic=True)
    assert not (tmp_path / "x.seg.dcm").exists()


# ------------------------------------------------------------------------------ enhanced multi-frame CT


@pytest.mark.parametrize("sop_class", ["legacy converted", "enhanced"])
def test_an_enhanced_multiframe_ct_is_refused_saying_what_it_is(sop_class, tmp_path):
    """Guards item 3: one file of many CT frames was reported as 'no DICOM image files found' (its positions live
    in per-frame groups and a header read skips its pixels); it is now named for what it is, with the way out."""
    slices = [pydicom.dcmread(p) for p in sorted(pydicom_dir("dicomdirtests/98892001/CT5N").iterdir())]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(slices, hd.UID(), 1, hd.UID(), 1)
    if sop_class == "enhanced":
        enhanced.SOPClassUID = enhanced.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    (tmp_path / "ENH").mkdir()
    path = tmp_path / "ENH" / "enhanced.dcm"
    enhanced.save_as(path)
    with pytest.raises(EmbedcacheError) as caught:
        read_geometry(tmp_path / "ENH")
    message = str(caught.value)
    assert message.startswith(f"{path}: an enhanced multi-frame CT (5 frames); embedcache reads one file per slice")
    assert "dcm2niix" in message and "\n" not in message


# ------------------------------------------------------------------------------ predict --out


@pytest.mark.parametrize("name", ["PLAN.DCM", "PLAN", "theirs.seg"])
def test_a_foreign_object_named_otherwise_than_dcm_is_found_by_its_content(name, ct5n, tiny_model, tmp_path):
    """Guards item 6: the output folder check looked only at '*.dcm' names; a SEG named PLAN.DCM, PLAN or
    theirs.seg for the same series was missed and predict wrote its own beside it."""
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "notes.txt").write_text("not DICOM\n")
    theirs = tmp_path / "pred" / name
    geometry = read_geometry(ct5n)
    write_seg(theirs, ct5n, geometry.to_source(_glands(geometry.shape_zyx)), series_uid=None, label_ids=(7, 8),
              label_map=FLARE22, decoder="someone", semiautomatic=False)
    before = _snapshot(tmp_path / "pred")
    result = cli("predict", ct5n, "--from-labels", tmp_path / "CT5N.nii.gz", "--model", "tiny", "--device", "cpu",
                 "--output-type", "dicom-seg", "--out", tmp_path / "pred", "--no-progress")
    one_line(result, f"{name}: already holds a DICOM object for series", "choose another --out")
    assert _snapshot(tmp_path / "pred") == before


# ------------------------------------------------------------------------------ SEGs evaluate reads


def test_a_seg_with_orientation_and_spacing_given_per_frame_reads_back(ct5n, tmp_path):
    """Guards item 17a: PlaneOrientationSequence and PixelMeasuresSequence in each frame's own group (legal DICOM)
    ended in a traceback, being read only from the shared group."""
    ds = _seg(ct5n, tmp_path / "x.seg.dcm")
    shared = ds.SharedFunctionalGroupsSequence[0]
    for frame in ds.PerFrameFunctionalGroupsSequence:
        frame.PlaneOrientationSequence = copy.deepcopy(shared.PlaneOrientationSequence)
        frame.PixelMeasuresSequence = copy.deepcopy(shared.PixelMeasuresSequence)
    del shared.PlaneOrientationSequence, shared.PixelMeasuresSequence
    ds.save_as(tmp_path / "per-frame.seg.dcm")
    geometry = read_geometry(ct5n)
    np.testing.assert_array_equal(read_seg(tmp_path / "per-frame.seg.dcm", geometry, label_map=FLARE22),
                                  _glands(geometry.shape_zyx))


def _evaluate(ct5n, tmp_path, ds) -> tuple:
    """evaluate on ``ds`` as the prediction of case CT5N; the result and the SEG's path."""
    for folder in ("pred", "truth"):
        (tmp_path / folder).mkdir()
    shutil.copy(tmp_path / "CT5N.nii.gz", tmp_path / "truth")
    path = tmp_path / "pred" / "CT5N.seg.dcm"
    ds.save_as(path)
    before = path.read_bytes()
    result = cli("evaluate", tmp_path / "pred", tmp_path / "truth", "--out", tmp_path / "r", "--no-progress")
    assert path.read_bytes() == before
    return result, path


def test_overlapping_segments_are_refused_naming_both(ct5n, tmp_path):
    """Guards item 17b: where two segments claimed a voxel the later one won, and the SEG was scored as if it
    were a label volume; a voxel that is two organs cannot be scored against one."""
    ds = _seg(ct5n, tmp_path / "x.seg.dcm")
    numbers = [int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
               for f in ds.PerFrameFunctionalGroupsSequence]
    frames = ds.pixel_array.copy()
    frames[numbers.index(2)] = 1  # segment 2's first frame covers its whole slice, segment 1's gland on it too
    ds.PixelData = pydicom.pixels.pack_bits(frames.ravel())
    result, path = _evaluate(ct5n, tmp_path, ds)
    one_line(result, "CT5N.seg.dcm", "segments 1 (right adrenal) and 2 (left adrenal) overlap",
             "one organ per voxel")


def test_a_frame_of_a_segment_the_seg_does_not_describe_is_refused(ct5n, tmp_path):
    """Guards item 17c: a frame whose ReferencedSegmentNumber is not in SegmentSequence was dropped without a
    word, and the prediction scored without it."""
    ds = _seg(ct5n, tmp_path / "x.seg.dcm")
    ds.PerFrameFunctionalGroupsSequence[0].SegmentIdentificationSequence[0].ReferencedSegmentNumber = 9
    result, path = _evaluate(ct5n, tmp_path, ds)
    one_line(result, "CT5N.seg.dcm", "frame 1 belongs to segment 9", "does not describe", "write it again")
