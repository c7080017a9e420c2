"""CT painted around label maps: a dataset on each map's grid, HU per organ, the crus beside the aorta."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from embedcache.config import PAINT_STYLES
from embedcache.errors import EmbedcacheError
from embedcache.io import labels as flare
from embedcache.io.volumes import check_sources, read_image, read_label
from embedcache.synth.anatomy import FAT_HU, MUSCLE_HU, ORGAN_HU, STYLES, write_anatomy

from conftest import cli, one_line


def _label_map(path, shift: int) -> None:
    """A small abdomen in RAS+ array order, 1.5 mm pixels: liver, kidneys, aorta, IVC and two glands."""
    labels = np.zeros((96, 96, 16), np.uint8)  # (i, j, k): i toward the left... stored as RAS+ (i toward right)
    i, j = np.mgrid[0:96, 0:96]

    def disc(ci, cj, r, value, k0=0, k1=16):
        labels[..., k0:k1][((i - ci) ** 2 + (j - cj) ** 2 <= r * r)] = value

    disc(30 + shift, 40, 16, flare.LIVER)
    disc(28, 62, 7, flare.RIGHT_KIDNEY)
    disc(70, 62, 7, flare.LEFT_KIDNEY)
    disc(54, 56, 4, flare.AORTA)
    disc(44, 54, 4, flare.IVC)
    disc(40, 64, 2, flare.RIGHT_ADRENAL, 5, 11)
    disc(62, 64, 2, flare.LEFT_ADRENAL, 4, 10)
    affine = np.diag([-1.5, -1.5, 2.5, 1.0])  # LPS-ish voxel order, as many scans store it
    nib.save(nib.Nifti1Image(labels, affine), str(path))


@pytest.fixture
def maps(tmp_path):
    folder = tmp_path / "maps"
    folder.mkdir()
    for n in range(3):
        _label_map(folder / f"CASE_{n:04d}.nii.gz", shift=n)
    return folder


def test_a_dataset_is_painted_on_each_label_maps_grid(maps, tmp_path):
    names = write_anatomy(maps, tmp_path / "data", cases=2, test_cases=1, seed=0)
    assert names == ["CASE_0000", "CASE_0001", "CASE_0002"]
    image, label = tmp_path / "data" / "imagesTs" / "CASE_0002_0000.nii.gz", tmp_path / "data" / "labelsTs" / "CASE_0002.nii.gz"
    assert label.read_bytes() == (maps / "CASE_0002.nii.gz").read_bytes()  # the label map as it is
    check_sources(image, label)  # the CT lies on the label's grid
    hu, truth = read_image(image).array, read_label(label).array
    for organ in (flare.LIVER, flare.AORTA, flare.RIGHT_ADRENAL, flare.LEFT_ADRENAL):
        inner = truth == organ
        assert abs(float(np.median(hu[inner])) - ORGAN_HU[organ]) < 40, organ
    assert (hu < -900).mean() > 0.05  # air around the body
    background = (truth == 0) & (hu > -900)
    assert abs(float(np.median(hu[background])) - FAT_HU) < 60  # retroperitoneal fat between the organs
    assert ((np.abs(hu - MUSCLE_HU) < 25) & background).any()  # the crura and the body wall
    again = tmp_path / "again"
    write_anatomy(maps, again, cases=2, test_cases=1, seed=0)
    assert (again / "imagesTs" / image.name).read_bytes() == image.read_bytes()  # same maps and seed, same CT


def test_an_anatomy_dataset_is_refused_over_existing_files_or_too_few_maps(maps, tmp_path):
    write_anatomy(maps, tmp_path / "data", cases=None, test_cases=1, seed=0)
    with pytest.raises(EmbedcacheError, match="CASE_0000_0000.nii.gz: exists; phantom writes a new dataset"):
        write_anatomy(maps, tmp_path / "data", cases=None, test_cases=1, seed=0)
    with pytest.raises(EmbedcacheError, match="holds 3 label maps; --cases 3 and --test-cases 1 need 4"):
        write_anatomy(maps, tmp_path / "other", cases=3, test_cases=1, seed=0)
    one_line(cli("phantom", tmp_path / "p", "--anatomy", maps, "--size", "128"), "--size shapes the synthetic phantom",
             code=2)
    result = cli("phantom", tmp_path / "p", "--anatomy", maps, "--test-cases", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "p" / "imagesTr").iterdir()) == ["CASE_0000_0000.nii.gz",
                                                                             "CASE_0001_0000.nii.gz"]


def test_the_arterial_style_paints_another_phase_and_texture_on_the_same_anatomy(maps, tmp_path):
    assert (*STYLES, "varied") == tuple(PAINT_STYLES)  # the CLI's choices are the painter's
    result = cli("phantom", tmp_path / "b", "--anatomy", maps, "--cases", "1", "--test-cases", "1", "--style",
                 "arterial", "--no-progress")
    assert result.exit_code == 0, result.output
    write_anatomy(maps, tmp_path / "a", cases=1, test_cases=1, seed=0)
    name = "CASE_0001_0000.nii.gz"
    portal, arterial = (read_image(tmp_path / f / "imagesTs" / name).array for f in ("a", "b"))
    truth = read_label(tmp_path / "b" / "labelsTs" / "CASE_0001.nii.gz").array
    style = STYLES["arterial"]
    for organ in (flare.AORTA, flare.IVC, flare.LIVER, flare.RIGHT_ADRENAL):
        assert abs(float(np.median(arterial[truth == organ])) - style.organ_hu[organ]) < 40, organ
    assert float(np.median(arterial[truth == flare.AORTA])) > float(np.median(portal[truth == flare.AORTA])) + 80
    assert float(np.median(arterial[truth == flare.IVC])) < float(np.median(portal[truth == flare.IVC])) - 30
    from scipy import ndimage

    liver = ndimage.binary_erosion(truth == flare.LIVER, iterations=2)  # away from its edges' partial volume
    assert np.std(arterial[liver]) > 1.3 * np.std(portal[liver])  # more noise and a coarser texture
    assert "arterial style" in (tmp_path / "b" / "dataset.json").read_text()
    one_line(cli("phantom", tmp_path / "p", "--style", "arterial"), "--style paints CT around --anatomy label maps",
             code=2)
    with pytest.raises(EmbedcacheError, match="--style sepia: choose portal, arterial or varied"):
        write_anatomy(maps, tmp_path / "c", cases=1, test_cases=1, seed=0, style="sepia")


def test_the_varied_style_paints_each_case_its_own_way_and_never_as_the_arterial_one(maps, tmp_path):
    from embedcache.synth.anatomy import varied_style

    write_anatomy(maps, tmp_path / "v", cases=2, test_cases=0, seed=0, style="varied")
    write_anatomy(maps, tmp_path / "p", cases=2, test_cases=0, seed=0)
    painted = {f: [read_image(tmp_path / f / "imagesTr" / f"CASE_000{i}_0000.nii.gz").array for i in (0, 1)]
               for f in ("v", "p")}
    truth = read_label(tmp_path / "v" / "labelsTr" / "CASE_0000.nii.gz").array
    liver = [float(np.median(v[truth == flare.LIVER])) for v in painted["v"]]
    assert abs(liver[0] - liver[1]) > 1 and not np.array_equal(painted["v"][0], painted["p"][0])
    arterial = STYLES["arterial"]
    for seed in range(200):  # arterial's settings stay outside every drawn style's ranges
        style = varied_style(np.random.default_rng(seed))
        assert abs(style.organ_hu[flare.AORTA] - arterial.organ_hu[flare.AORTA]) > 50
        assert abs(style.organ_hu[flare.IVC] - arterial.organ_hu[flare.IVC]) > 25
        assert style.noise_hu < arterial.noise_hu and style.texture_mm < arterial.texture_mm
        assert style.blur_px < arterial.blur_px and style.crus_mm < arterial.crus_mm
