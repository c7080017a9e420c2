"""Metrics against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from embedcache.evaluation.metrics import dice, nsd


def _cube(shape=(12, 14, 16), lo=(3, 4, 5), size=(5, 5, 5)):
    m = np.zeros(shape, bool)
    m[lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]] = True
    return m


def test_dice_by_hand():
    a = _cube()
    b = np.roll(a, 1, axis=2)  # shifted one voxel: 4 of 5 columns overlap
    assert dice(a, b) == pytest.approx(2 * 100 / 250)
    assert dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0  # both empty
    assert dice(np.zeros((3, 3)), np.ones((3, 3))) == 0.0
    one = np.zeros((5, 5, 5), bool)
    one[2, 2, 2] = True
    assert dice(one, one) == 1.0


def test_nsd_of_identical_and_empty_masks():
    a = _cube()
    assert nsd(a, a, spacing_mm=(2.5, 0.8, 0.8)) == pytest.approx(1.0)
    assert nsd(np.zeros_like(a), np.zeros_like(a), spacing_mm=(1, 1, 1)) == 1.0
    assert nsd(np.zeros_like(a), a, spacing_mm=(1, 1, 1)) == 0.0
    assert nsd(a, np.zeros_like(a), spacing_mm=(1, 1, 1)) == 0.0


def test_nsd_cube_shifted_one_voxel_under_anisotropic_spacing():
    a = _cube()
    spacing = (3.0, 0.8, 0.8)  # (z, y, x) mm
    # One voxel along x is 0.8 mm: every surface point stays within 2 mm.
    assert nsd(np.roll(a, 1, axis=2), a, spacing_mm=spacing) == pytest.approx(1.0)
    # One voxel along z is 3 mm: within a 3 mm tolerance all of it, within 2 mm only part (the
    # side faces slide along themselves; the end faces move 3 mm).
    shifted = np.roll(a, 1, axis=0)
    assert nsd(shifted, a, spacing_mm=spacing, tolerance_mm=3.0) == pytest.approx(1.0)
    assert 0.3 < nsd(shifted, a, spacing_mm=spacing) < 0.95


def test_nsd_single_voxel_by_hand():
    """A voxel's surface points sit on its corners, half a voxel either side of its centre. Moved by
    k voxels along an axis of spacing s, one corner plane lies (k - 1)·s from the other voxel's
    nearest corners and the other k·s: NSD is the share of those within tolerance (all 8 corners
    of a lone voxel carry equal area)."""
    a = np.zeros((9, 9, 9), bool)
    a[4, 4, 4] = True
    spacing = (3.0, 0.8, 0.8)
    assert nsd(a, a, spacing_mm=spacing) == pytest.approx(1.0)
    assert nsd(np.roll(a, 1, axis=0), a, spacing_mm=spacing) == pytest.approx(0.5)  # 0 and 3 mm
    assert nsd(np.roll(a, 1, axis=2), a, spacing_mm=spacing) == pytest.approx(1.0)  # 0 and 0.8 mm
    assert nsd(np.roll(a, 2, axis=1), a, spacing_mm=spacing) == pytest.approx(1.0)  # 0.8 and 1.6 mm
    assert nsd(np.roll(a, 3, axis=1), a, spacing_mm=spacing) == pytest.approx(0.5)  # 1.6 and 2.4 mm
    assert nsd(np.roll(a, 4, axis=1), a, spacing_mm=spacing) == pytest.approx(0.0)  # 2.4 and 3.2 mm


def test_nsd_on_the_glands_box_equals_monais_on_the_whole_volume():
    import torch
    from monai.metrics import compute_surface_dice

    generator = np.random.default_rng(3)
    shape = (20, 60, 70)
    for trial in range(4):
        truth = np.zeros(shape, bool)
        truth[5:12, 20:31, 25:40] = True
        pred = np.roll(truth, (int(generator.integers(-2, 3)), int(generator.integers(-4, 5))), axis=(0, 2))
        if trial == 1:
            pred[generator.random(shape) > 0.995] = True  # speckle far from the gland widens the box
        if trial == 3:
            truth[:, :3] = pred[:, :3] = True  # touching the volume's edge
        spacing = (2.5, 0.8, 0.7)

        def one_hot(mask):
            m = torch.from_numpy(mask)
            return torch.stack([~m, m])[None].float()

        whole = float(compute_surface_dice(one_hot(pred), one_hot(truth), class_thresholds=[2.0],
                                           include_background=False, spacing=list(spacing),
                                           use_subvoxels=True).reshape(-1)[0])
        assert nsd(pred, truth, spacing_mm=spacing, tolerance_mm=2.0) == pytest.approx(whole, abs=1e-6)
