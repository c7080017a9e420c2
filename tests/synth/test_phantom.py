from __future__ import annotations

import numpy as np

from embedcache.io.datasets import discover_cases
from embedcache.io.volumes import read_image, read_label
from embedcache.synth.phantom import PhantomConfig, make_case, write_phantom

from conftest import SMALL_PHANTOM


def test_same_seed_same_files(tmp_path):
    write_phantom(tmp_path / "a", cases=2, seed=5, config=SMALL_PHANTOM)
    write_phantom(tmp_path / "b", cases=2, seed=5, config=SMALL_PHANTOM)
    write_phantom(tmp_path / "c", cases=1, seed=6, config=SMALL_PHANTOM)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.nii.gz"))
    assert len(files) == 4
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    first = "imagesTr/PHANTOM_0001_0000.nii.gz"
    assert (tmp_path / "a" / first).read_bytes() != (tmp_path / "c" / first).read_bytes()


def test_adrenals_are_small_thin_and_on_the_right_sides():
    config = PhantomConfig(size=256, pixel_mm=1.6)
    hu, labels, affine = make_case(11, config)
    assert set(np.unique(labels)) >= {0, 1, 2, 3, 5, 6, 7, 8, 13}
    voxel_ml = config.pixel_mm**2 * config.slice_mm / 1000
    for gland in (7, 8):
        mask = labels == gland
        assert 0.5 < mask.sum() * voxel_ml < 10  # adult adrenal: a few mL
        slices = np.flatnonzero(mask.any(axis=(1, 2)))
        assert 6 <= slices.size <= 25
        # fat around the gland, soft tissue inside it, blurred edges (partial volume)
        assert -50 < np.median(hu[mask]) < 100
    x_right = np.argwhere(labels == 7)[:, 2].mean()
    x_left = np.argwhere(labels == 8)[:, 2].mean()
    assert x_right < x_left  # canonical x grows toward the patient's left
    assert (hu[labels == 0] < -900).any()  # air around the body


def test_written_cases_read_back_canonical(phantom_dir):
    cases = discover_cases(phantom_dir)
    assert [c.name for c in cases] == ["PHANTOM_0001", "PHANTOM_0002", "PHANTOM_0003"]
    image, label = read_image(cases[0].image), read_label(cases[0].label)
    hu, labels, affine = make_case(7 * 1_000_003, SMALL_PHANTOM)
    np.testing.assert_array_equal(image.array, hu)
    np.testing.assert_array_equal(label.array, labels)
    np.testing.assert_allclose(image.geometry.canonical_affine, affine, atol=1e-5)
