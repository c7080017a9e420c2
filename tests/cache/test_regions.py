"""Zoomed regions: a mask and a box taken into a region and back land on the slice's own pixels."""

from __future__ import annotations

import numpy as np
import pytest

from embedcache.cache.regions import Region, box_to_region, box_to_slice, region_around, zoom_in, zoom_out
from embedcache.model.prompts import box_from_mask


def _gland(shape, seed: int) -> np.ndarray:
    """A thin, bent, irregular blob of a few pixels' width, like an adrenal limb on a slice."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    mask = np.zeros(shape, bool)
    for t in np.linspace(0, 1, 40):
        cy, cx = 200 + 30 * t + rng.normal(0, 0.5), 260 + 12 * np.sin(3 * t) + rng.normal(0, 0.5)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(1.0, 6.0)
    return mask


@pytest.mark.parametrize("spacing_yx", [(0.78, 0.78), (0.9, 0.7), (1.5, 1.5)])
@pytest.mark.parametrize("margin_mm", [5.0, 25.0])
def test_a_mask_zoomed_in_and_out_returns_to_its_own_pixels(spacing_yx, margin_mm):
    gland = np.stack([_gland((512, 512), seed) for seed in range(3)])
    region = region_around(box_from_mask(gland.any(axis=0)), spacing_yx, margin_mm=margin_mm, size=512)
    assert region.pixel_mm < min(spacing_yx)  # finer than the slice: the inverse is exact
    zoomed = zoom_in(gland, region, spacing_yx, mask=True)
    assert zoomed.shape == (3, 512, 512) and zoomed.dtype == bool
    scale = (spacing_yx[0] / region.pixel_mm) * (spacing_yx[1] / region.pixel_mm)
    assert zoomed.sum() == pytest.approx(gland.sum() * scale, rel=0.1)  # the same area, in finer pixels
    assert np.array_equal(zoom_out(zoomed, region, spacing_yx, gland.shape[1:]), gland)
    # a mask drawn in the region maps onto the slice pixels under it, nothing outside the region
    edge = np.zeros((512, 512), bool)
    edge[:, :40] = True
    columns = np.flatnonzero(zoom_out(edge, region, spacing_yx, (512, 512)).any(axis=0))
    x0, x1 = region.to_slice(np.array([0.0, 40.0]), 0.0, spacing_yx)[0]
    assert columns.size and x0 - 0.5 <= columns.min() and columns.max() + 0.5 <= x1


@pytest.mark.parametrize("spacing_yx", [(0.78, 0.78), (0.7, 0.9)])
def test_a_region_barely_finer_than_the_slice_still_maps_a_mask_back_exactly(spacing_yx):
    gland = _gland((512, 512), 3)
    x0, y0, x1, y1 = box_from_mask(gland)
    side = 0.97 * 80 * min(spacing_yx)  # 80 region pixels, each 3 % smaller than the slice's finer side
    region = Region((x0 + x1) / 2 + 0.3, (y0 + y1) / 2 - 0.2, side, 80)
    assert np.array_equal(zoom_out(zoom_in(gland, region, spacing_yx, mask=True), region, spacing_yx, (512, 512)), gland)


@pytest.mark.parametrize("spacing_yx", [(0.78, 0.78), (0.9, 0.7)])
def test_a_box_in_the_region_maps_back_to_the_slice_and_the_zoomed_mask_fills_it(spacing_yx):
    gland = _gland((512, 512), 7)
    box = box_from_mask(gland)
    region = region_around(box, spacing_yx, margin_mm=10.0, size=256)
    inside = box_to_region(box, region, spacing_yx)
    assert np.allclose(box_to_slice(inside, region, spacing_yx), box)
    assert all(0 < v < 256 for v in inside)  # the margin keeps the box off the region's edges
    longer = max(inside[2] - inside[0], inside[3] - inside[1])
    assert longer == pytest.approx(256 - 2 * 10.0 / region.pixel_mm)  # the box's longer side fills it, less margins
    zoomed_box = box_from_mask(zoom_in(gland, region, spacing_yx, mask=True))
    assert np.allclose(zoomed_box, inside, atol=region.size / region.side_mm * max(spacing_yx) / 2 + 1)


def test_a_zoomed_image_is_the_slice_sampled_bilinearly_with_its_edge_beyond():
    ramp = np.tile(np.arange(64, dtype=np.float32), (64, 1))  # value = x index
    region = region_around((50, 20, 70, 40), (1.0, 1.0), margin_mm=0.0, size=40)  # half-pixel steps, past x = 64
    zoomed = zoom_in(ramp, region, (1.0, 1.0))
    xs = region.to_slice(np.arange(40) + 0.5, 0.0, (1.0, 1.0))[0] - 0.5  # each region column's centre as an index
    assert np.allclose(zoomed[0], np.clip(xs, 0, 63), atol=1e-4)


def test_encode_zoom_caches_whole_slices_and_each_glands_region_whose_masks_map_back(tiny_model, phantom_copy,
                                                                                      tmp_path):
    from embedcache.cache import store
    from embedcache.cache.encode import encode, signature_for
    from embedcache.cache.preprocess import slice_to_model
    from embedcache.cache.regions import GlandRegion
    from embedcache.config import EncodeConfig
    from embedcache.errors import CacheMismatchError
    from embedcache.io.datasets import discover_cases
    from embedcache.io.volumes import read_image, read_label
    from embedcache.model.prompts import boxes_for_labels
    from embedcache.synth.phantom import limit_target_slices

    def spacing_yx_of(name):
        return read_label(next(c.label for c in cases if c.name == name)).spacing_mm[1:]

    limit_target_slices(phantom_copy, per_case=3)
    cases = discover_cases(phantom_copy)[:2]
    config = EncodeConfig(backbone="tiny", device="cpu", zoom_mm=5.0)
    out = tmp_path / "zoom.h5"
    encode(cases, out, config, progress=None)
    with store.open_cache(out, expect=signature_for(config)) as cache:
        assert cache.signature.zoom_mm == 5.0 and cache.signature.views == ("whole", "regions")
        assert [c.name for c in cache.cases] == [n for c in cases for n in (c.name, f"{c.name}@7", f"{c.name}@8")]
        for case in cache.cases:
            if case.region is None:  # the whole slices, as encode without --zoom caches them
                assert case.shape_zyx == read_label(next(c.label for c in cases if c.name == case.name)).array.shape
                continue
            source = case.region["source"]
            gland = read_label(next(c.label for c in cases if c.name == source)).array == case.region["label"]
            where = GlandRegion.from_dict(case.region)
            z = cache.slice_index[case.rows]
            held = np.flatnonzero(gland.any(axis=(1, 2)))
            np.testing.assert_array_equal(z, np.arange(max(0, held[0] - 2), min(len(gland), held[-1] + 3)))
            assert (where.z0, where.z1) == (z[0], z[-1]) and case.shape_zyx[1:] == (512, 512)
            assert case.spacing_mm[1:] == pytest.approx((where.region.pixel_mm,) * 2)
            masks = cache.masks[case.rows]
            image = read_image(next(c.image for c in cases if c.name == source)).array
            seen = [slice_to_model(zoom_in(image[k], where.region, spacing_yx_of(source)), width_hu=350.0, level_hu=50.0,
                                   slice_size=512) for k in z]
            np.testing.assert_array_equal(cache.pixels[case.rows], np.rint(np.stack(seen) * 255).astype(np.uint8))
            assert set(np.unique(masks)) == {0, case.region["label"]}  # the one gland, at the region's pixels
            spacing_yx = read_label(next(c.label for c in cases if c.name == source)).spacing_mm[1:]
            assert np.array_equal(zoom_out(masks > 0, where.region, spacing_yx, gland.shape[1:]), gland[z])
            for row, k in zip(range(case.first_row, case.first_row + case.n_rows), z):
                np.testing.assert_array_equal(cache.boxes[row], boxes_for_labels(cache.masks[row], (7, 8)))
                assert np.isnan(cache.boxes[row]).all() == (k not in held)
    assert encode(cases, out, config, progress=None).cases_resumed == 6  # a second run finds every case done
    with pytest.raises(CacheMismatchError, match="zoom_mm"):  # a cache of both views is not one of whole slices
        encode(cases, out, EncodeConfig(backbone="tiny", device="cpu"), progress=None)
