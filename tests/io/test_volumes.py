from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from embedcache.errors import EmbedcacheError
from embedcache.io.datasets import discover_cases
from embedcache.io.geometry import Geometry
from embedcache.io.nifti import write_nifti
from embedcache.io.volumes import check_same_grid, read_geometry, read_image, read_label

from conftest import pydicom_dir, single_file_dir


def _world(affine, ijk):
    return (affine @ np.append(np.asarray(ijk, float), 1.0))[:3]


# ------------------------------------------------------------------------------------------------ DICOM


def test_ct_small_is_read_in_hu(tmp_path):
    folder = single_file_dir(tmp_path, "CT_small.dcm")
    ds = pydicom.dcmread(folder / "CT_small.dcm")
    volume = read_image(folder)
    assert volume.array.shape == (1, 128, 128)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    # Axial LPS-aligned DICOM is already canonical: rows run anterior→posterior, columns right→left.
    np.testing.assert_array_equal(volume.array[0], expected)
    assert volume.array.min() < -500  # air, so HU and not raw stored values
    dz, dy, dx = volume.spacing_mm
    assert (dy, dx) == pytest.approx([float(v) for v in ds.PixelSpacing])
    # The first voxel lies at ImagePositionPatient (LPS) = RAS with x, y negated.
    lps = np.array([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(_world(volume.geometry.canonical_affine, (0, 0, 0)), lps * [-1, -1, 1], atol=1e-4)


def test_series_is_ordered_by_position_not_instance_number(series_dir):
    files = sorted(series_dir.iterdir())
    headers = [pydicom.dcmread(f) for f in files]
    instance = [int(h.InstanceNumber) for h in headers]
    z = [float(h.ImagePositionPatient[2]) for h in headers]
    assert np.corrcoef(instance, z)[0, 1] < 0  # the fixture's point: instance numbers run against z

    volume = read_image(series_dir)
    by_z = sorted(headers, key=lambda h: float(h.ImagePositionPatient[2]))  # canonical z grows superior
    for k, header in enumerate(by_z):
        expected = header.pixel_array.astype(np.float32) + float(header.RescaleIntercept)
        np.testing.assert_array_equal(volume.array[k], expected)
    assert volume.spacing_mm[0] == pytest.approx(2.5)
    top = _world(volume.geometry.canonical_affine, (0, 0, len(by_z) - 1))
    assert top[2] == pytest.approx(float(by_z[-1].ImagePositionPatient[2]))


def test_compressed_dicom_is_decoded(tmp_path):
    folder = single_file_dir(tmp_path, "693_J2KI.dcm")  # JPEG 2000, needs pylibjpeg-openjpeg
    ds = pydicom.dcmread(folder / "693_J2KI.dcm")
    volume = read_image(folder)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume.array[0], expected)


def test_mixed_series_are_listed_and_one_can_be_chosen(tmp_path, series_dir):
    mixed = tmp_path / "mixed"
    shutil.copytree(series_dir, mixed)
    for f in pydicom_dir("dicomdirtests/98892001/CT2N").iterdir():
        shutil.copy(f, mixed / f"other_{f.name}")
    with pytest.raises(EmbedcacheError, match=r"holds 2 DICOM series.*--series"):
        read_image(mixed)
    uid = str(pydicom.dcmread(next(series_dir.iterdir())).SeriesInstanceUID)
    assert read_image(mixed, series_uid=uid).array.shape == (5, 16, 16)


def test_gaps_in_a_series_are_refused():
    with pytest.raises(EmbedcacheError, match="not uniform"):
        read_image(pydicom_dir("dicomdirtests/77654033/CT2"))


def test_non_ct_dicom_is_refused(tmp_path):
    with pytest.raises(EmbedcacheError, match="modality is MR, not CT"):
        read_image(single_file_dir(tmp_path, "MR_small.dcm"))


def test_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(EmbedcacheError, match="no DICOM image files"):
        read_image(tmp_path)


# ------------------------------------------------------------------------------------------------ NIfTI


def _oblique_affine(rng):
    """A permuted, flipped, slightly rotated, anisotropic affine."""
    perm = np.eye(3)[:, rng.permutation(3)] * rng.choice([-1, 1], size=3)
    angle = 0.1
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ perm @ np.diag([0.7, 0.9, 2.5])
    affine[:3, 3] = rng.uniform(-100, 100, 3)
    return affine


@pytest.mark.parametrize("seed", range(6))
def test_nifti_round_trip_with_non_identity_affines(tmp_path, seed):
    rng = np.random.default_rng(seed)
    source_shape = (7, 9, 5)
    geometry = Geometry(source_shape=source_shape, source_affine=_oblique_affine(rng))
    labels = rng.integers(0, 9, size=geometry.shape_zyx).astype(np.uint8)
    path = tmp_path / "label.nii.gz"
    write_nifti(labels, geometry, path)

    back = read_label(path)
    np.testing.assert_array_equal(back.array, labels)
    np.testing.assert_allclose(nib.load(path).affine, geometry.source_affine, atol=1e-5)
    assert nib.load(path).shape == source_shape
    # Every canonical voxel and its file voxel are the same world point.
    raw = np.asarray(nib.load(path).dataobj)
    z, y, x = 3, 4, 2
    world = _world(back.geometry.canonical_affine, (x, y, z))
    ijk = np.rint(np.linalg.solve(geometry.source_affine, np.append(world, 1))[:3]).astype(int)
    assert raw[tuple(ijk)] == labels[z, y, x]
    # Canonical axes point left, posterior, superior.
    directions = back.geometry.canonical_affine[:3, :3]
    assert directions[0, 0] < 0 and directions[1, 1] < 0 and directions[2, 2] > 0
    assert not list(tmp_path.glob("*partial*"))


def test_dicom_image_and_nifti_label_align_in_world_coordinates(tmp_path, series_dir):
    image = read_image(series_dir)
    marker = np.zeros(image.array.shape, np.uint8)
    marker[1, 3, 12] = 7  # inferior-ish, anterior, patient left
    marker[3, 10, 2] = 8
    # Store the label in another array order: (k, i, j) with k flipped, as some converters do.
    g = image.geometry
    perm = np.zeros((4, 4))
    perm[3, 3] = 1
    i, j, k = g.source_shape
    # file index (a, b, c) = (k', i, j) with k' = k-1-k_index
    perm[2, 0], perm[2, 3] = -1, k - 1
    perm[0, 1] = 1
    perm[1, 2] = 1
    label_geometry = Geometry(source_shape=(k, i, j), source_affine=g.source_affine @ perm)
    write_nifti(marker, label_geometry, tmp_path / "label.nii.gz")
    assert nib.load(tmp_path / "label.nii.gz").shape == (k, i, j)

    label = read_label(tmp_path / "label.nii.gz")
    check_same_grid(image.geometry, label.geometry, image_path=series_dir, label_path=tmp_path / "label.nii.gz")
    np.testing.assert_array_equal(label.array, marker)

    moved = label_geometry.source_affine.copy()
    moved[:3, 3] += 3.0  # same array, 3 mm off in world space
    shifted = Geometry(source_shape=(k, i, j), source_affine=moved)
    with pytest.raises(EmbedcacheError, match="label geometry differs"):
        check_same_grid(image.geometry, shifted, image_path=series_dir, label_path=tmp_path / "label.nii.gz")


def _save(array, path, affine=None):
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def test_truncated_nifti_names_the_file(tmp_path):
    path = _save(np.full((32, 32, 8), -1000, np.int16), tmp_path / "ct.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EmbedcacheError, match=r"ct\.nii\.gz: .*(truncated|corrupt|readable)"):
        read_image(path)


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(EmbedcacheError, match="bad.nii.gz: not a readable NIfTI"):
        read_image(bad)
    with pytest.raises(EmbedcacheError, match="no such file"):
        read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(EmbedcacheError, match="not a .nii"):
        read_image(tmp_path / "scan.png")


def test_4d_and_non_ct_volumes_are_refused(tmp_path):
    with pytest.raises(EmbedcacheError, match="expected a 3-D CT volume"):
        read_image(_save(np.zeros((8, 8, 4, 3), np.int16), tmp_path / "4d.nii.gz"))
    with pytest.raises(EmbedcacheError, match="does not look like CT"):
        read_image(_save(np.random.default_rng(0).random((8, 8, 4)).astype(np.float32), tmp_path / "mr.nii.gz"))


def test_label_shape_mismatch_is_refused(tmp_path):
    image = _save(np.full((16, 16, 9), -1000, np.int16), tmp_path / "ct.nii.gz")
    label = _save(np.zeros((16, 16, 7), np.uint8), tmp_path / "seg.nii.gz")
    with pytest.raises(EmbedcacheError, match=r"seg\.nii\.gz: label volume shape \(16, 16, 7\) does not match"):
        check_same_grid(read_geometry(image), read_geometry(label), image_path=image, label_path=label)


# --------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("images, labels", [("imagesTr", "labelsTr"), ("images", "labels")])
def test_flare_layouts_are_discovered(tmp_path, images, labels, series_dir, notes):
    (tmp_path / images).mkdir()
    (tmp_path / labels).mkdir()
    for case in ("FLARE22_Tr_0001", "FLARE22_Tr_0002"):
        _save(np.zeros((4, 4, 2), np.int16), tmp_path / images / f"{case}_0000.nii.gz")
        _save(np.zeros((4, 4, 2), np.uint8), tmp_path / labels / f"{case}.nii.gz")
    shutil.copytree(series_dir, tmp_path / images / "DICOMCASE_0000")
    _save(np.zeros((16, 16, 5), np.uint8), tmp_path / labels / "DICOMCASE.nii.gz")
    _save(np.zeros((4, 4, 2), np.int16), tmp_path / images / "UNLABELLED_0000.nii.gz")
    cases = discover_cases(tmp_path)
    assert any("UNLABELLED_0000.nii.gz: no label" in n for n in notes), notes
    assert [c.name for c in cases] == ["DICOMCASE", "FLARE22_Tr_0001", "FLARE22_Tr_0002"]
    assert cases[0].image.is_dir() and cases[0].label.name == "DICOMCASE.nii.gz"
    assert cases[1].image.name == "FLARE22_Tr_0001_0000.nii.gz"


def test_folder_without_layout_is_refused(tmp_path):
    with pytest.raises(EmbedcacheError, match="no images/ \\+ labels/"):
        discover_cases(tmp_path)
