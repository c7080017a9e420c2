from __future__ import annotations

import numpy as np
import pytest

from embedcache.cache.preprocess import resize_image, resize_mask, slice_to_model, window_hu


def test_mediastinal_window_maps_level_to_half_and_clips():
    hu = np.array([-1000.0, -125.0, 50.0, 225.0, 3000.0])
    np.testing.assert_allclose(window_hu(hu), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(window_hu(np.array([0.0]), width_hu=400, level_hu=40), [0.4])
    assert window_hu(hu).dtype == np.float32
    with pytest.raises(ValueError):
        window_hu(hu, width_hu=0)


@pytest.mark.parametrize("side", [16, 96, 128, 333, 511, 512])
def test_mask_round_trip_is_exact_up_to_slice_size(side):
    rng = np.random.default_rng(side)
    mask = (rng.random((side, max(side - 5, 8))) > 0.7).astype(np.uint8) * rng.choice([7, 8], size=(side, max(side - 5, 8))).astype(np.uint8)
    up = resize_mask(mask, (512, 512))
    assert up.dtype == mask.dtype and set(np.unique(up)) <= {0, 7, 8}
    np.testing.assert_array_equal(resize_mask(up, mask.shape), mask)  # nearest sampling: exactly invertible


def test_mask_resize_keeps_batches_and_thin_structures():
    mask = np.zeros((3, 128, 128), np.uint8)
    mask[1, 40, 10:90] = 7  # one pixel thick
    up = resize_mask(mask, (512, 512))
    assert up.shape == (3, 512, 512)
    assert (up[1] == 7).sum() == 80 * 4 * 4 and not up[0].any()


def test_slice_to_model_resamples_to_square_unit_range():
    hu = np.linspace(-300, 400, 64 * 80, dtype=np.float32).reshape(64, 80)
    out = slice_to_model(hu, width_hu=350, level_hu=50, slice_size=512)
    assert out.shape == (512, 512) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    flat = np.full((40, 40), 50.0, np.float32)
    np.testing.assert_allclose(resize_image(window_hu(flat), (512, 512)), 0.5, atol=1e-6)
