"""Zoom-out-zoom-in: a gland's slices drawn again in its region, the two views' logits averaged on the slice grid."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from embedcache.cache.regions import box_to_region, gland_region, zoom_in
from embedcache.evaluation import protocols
from embedcache.evaluation.protocols import Prediction
from embedcache.evaluation.zoom import BothViews, redraw, redraw_prediction
from embedcache.model.clicks import Click
from embedcache.model.prompts import box_from_mask, grow_box


class FakeView:
    """A view whose 256² logits are ``+value`` on ``masks[z]`` and ``-value`` elsewhere (a 256² slice and an encoder
    input of 256: the logits reach the grid unchanged); it keeps the boxes it was given."""

    def __init__(self, masks, value):
        self.masks, self.value, self.boxes = masks, value, {}
        self.decoder = SimpleNamespace(input_size=256, slice_size=256)

    def __call__(self, zs, boxes, *, low_res=False, multimask=False, points=None, previous=None, grid_logits=False):
        self.boxes.update({int(z): b for z, b in zip(zs, boxes)})
        self.points, self.previous = points, previous
        low = np.stack([np.where(self.masks[int(z)], self.value, -self.value) for z in zs]).astype(np.float32)
        return low if grid_logits else low > 0, np.full(len(zs), self.value / 4, np.float32), low


def _gland() -> np.ndarray:
    yy, xx = np.mgrid[0:256, 0:256]
    gland = np.zeros((10, 256, 256), bool)
    for z in range(3, 7):
        gland[z] = ((yy - 120) ** 2 / 30.0 + (xx - 130 - 2 * z) ** 2 / 6.0) <= 4.0  # thin, a few pixels wide
    return gland


def test_the_average_keeps_what_both_views_draw_and_the_finer_view_removes_the_rest():
    gland, spacing = _gland(), (1.0, 1.0)
    where = gland_region(gland, spacing, margin_mm=5.0, size=256, zpad=1)
    first = np.zeros_like(gland)
    first[3:7] = [ndimage.binary_dilation(g, iterations=2) for g in gland[3:7]]  # the coarse pass: too thick
    first[9, 10:20, 10:20] = True  # beyond the region's slices: left as it was
    whole = FakeView(first, 1.0)
    zoomed = FakeView({z: zoom_in(gland[z], where.region, spacing, mask=True) for z in range(10)}, 3.0)
    out = redraw(first, whole, zoomed, where, spacing, grow_mm=2.0)
    assert np.array_equal(out[3:7], gland[3:7])  # the zoomed view outvotes the coarse one on the rim
    assert np.array_equal(out[9], first[9]) and not out[:3].any() and not out[7:9].any()
    assert sorted(whole.boxes) == sorted(zoomed.boxes) == [3, 4, 5, 6]  # only the first pass's slices
    for z, box in whole.boxes.items():
        grown = grow_box(box_from_mask(first[z]), (2.0, 2.0), within=(0, 0, 256, 256))
        assert np.allclose(box, grown) and np.allclose(zoomed.boxes[z], box_to_region(grown, where.region, spacing))


def test_where_the_zoomed_view_is_unsure_the_whole_slice_decides():
    gland, spacing = _gland(), (1.0, 1.0)
    where = gland_region(gland, spacing, margin_mm=5.0, size=256, zpad=1)
    first = gland.copy()
    whole = FakeView(gland, 1.0)
    zoomed = FakeView({z: np.zeros((256, 256), bool) for z in range(10)}, 0.0)  # logits of 0: no opinion
    assert np.array_equal(redraw(first, whole, zoomed, where, spacing), gland)


def test_a_view_weighed_zero_is_not_decoded():
    gland, spacing = _gland(), (1.0, 1.0)
    where = gland_region(gland, spacing, margin_mm=5.0, size=256, zpad=1)
    first = np.stack([ndimage.binary_dilation(g, iterations=2) for g in gland])
    whole = FakeView(first, 1.0)
    zoomed = FakeView({z: zoom_in(gland[z], where.region, spacing, mask=True) for z in range(10)}, 3.0)
    assert np.array_equal(redraw(first, whole, zoomed, where, spacing, weights=(1.0, 0.0)), first)
    assert not zoomed.boxes and np.array_equal(redraw(first, whole, zoomed, where, spacing, weights=(0.0, 1.0)), gland)


def test_both_views_take_a_click_into_the_region_and_leave_slices_beyond_it_to_the_whole_slice():
    """What a click refines through under ``score --zoom`` (clicks) and ``predict --zoom`` with clicks."""
    gland, spacing = _gland(), (1.0, 1.0)
    where = gland_region(gland, spacing, margin_mm=5.0, size=256, zpad=1)
    coarse = np.stack([ndimage.binary_dilation(g, iterations=2) for g in gland])
    coarse[9, 10:20, 10:20] = True
    whole = FakeView(coarse, 1.0)
    zoomed = FakeView({z: zoom_in(gland[z], where.region, spacing, mask=True) for z in range(10)}, 3.0)
    both = BothViews(whole, zoomed, where, spacing, gland.shape[1:])
    box = grow_box(box_from_mask(coarse[4]), (2.0, 2.0), within=(0, 0, 256, 256))
    click = np.array([[131.0, 120.0, 1.0]], np.float32)
    masks, iou = both(np.array([4, 9]), np.array([box, (5, 5, 25, 25)], np.float32), points=[click, None])
    assert np.array_equal(masks[0], gland[4]) and np.array_equal(masks[1], coarse[9])
    assert sorted(whole.boxes) == [4, 9] and sorted(zoomed.boxes) == [4]  # slice 9 lies beyond the region's slices
    assert whole.points[0] is click and whole.points[1] is None
    u, v = where.region.to_region(131.0, 120.0, spacing)
    assert len(zoomed.points) == 1 and np.allclose(zoomed.points[0], [[u, v, 1.0]])
    assert np.allclose(iou, [(0.25 + 0.75) / 2, 0.25])  # the views' mean; the whole slice's alone beyond the region
    assert not both.feeds_back


def test_a_prediction_drawn_again_records_the_box_each_slice_was_drawn_from():
    """A click on a slice drawn again is decoded from the prompt that drew it, not the walk's."""
    gland, spacing = _gland(), (1.0, 1.0)
    where = gland_region(gland, spacing, margin_mm=5.0, size=256, zpad=1)
    first = Prediction(np.stack([ndimage.binary_dilation(g, iterations=2) for g in gland]),
                       boxes={z: (0.0, 0.0, 256.0, 256.0) for z in range(10)}, iou={z: 0.5 for z in range(10)},
                       logits={3: np.zeros((256, 256), np.float16)})
    whole = FakeView(first.mask, 1.0)
    zoomed = FakeView({z: zoom_in(gland[z], where.region, spacing, mask=True) for z in range(10)}, 3.0)
    out = redraw_prediction(first, BothViews(whole, zoomed, where, spacing, gland.shape[1:]))
    assert np.array_equal(out.mask[3:7], gland[3:7]) and out.mask is not first.mask
    for z in range(3, 7):
        grown = grow_box(box_from_mask(first.mask[z]), (2.0, 2.0), within=(0, 0, 256, 256))
        assert np.allclose(out.boxes[z], grown) and out.iou[z] == (0.25 + 0.75) / 2
    assert out.boxes[0] == (0.0, 0.0, 256.0, 256.0) and out.iou[0] == 0.5  # not drawn again: the walk's
    assert not out.logits and first.logits  # neither view's logits carry over to both


def test_decoders_that_take_their_logits_back_get_each_views_own_back():
    """Two interactive decoders (``--prompts interactive``) under zoom: each view's low-resolution logits come back
    packed and each view is given its own as the mask prompt; one decoder that does not take them: none."""
    gland, spacing = _gland(), (1.0, 1.0)
    where = gland_region(gland, spacing, margin_mm=5.0, size=256, zpad=1)
    first = np.stack([ndimage.binary_dilation(g, iterations=2) for g in gland])
    whole = FakeView(first, 1.0)
    zoomed = FakeView({z: zoom_in(gland[z], where.region, spacing, mask=True) for z in range(10)}, 3.0)
    both = BothViews(whole, zoomed, where, spacing, gland.shape[1:])
    assert not both.feeds_back
    with pytest.raises(ValueError):
        both(np.array([4]), np.array([(0, 0, 256, 256)], np.float32), low_res=True)
    whole.feeds_back = zoomed.feeds_back = True
    zs, boxes = np.array([4, 9]), np.array([(100, 100, 160, 140), (5, 5, 25, 25)], np.float32)
    masks, iou, packed = both(zs, boxes, low_res=True)
    assert packed.shape == (2, 2, 256, 256) and whole.previous is None and zoomed.previous is None
    assert np.array_equal(packed[:, 0], np.where(first[zs], 1.0, -1.0))
    assert np.array_equal(packed[0, 1], np.where(zoomed.masks[4], 3.0, -3.0)) and not packed[1, 1].any()
    both(zs, boxes, previous=packed, low_res=True)
    assert np.array_equal(whole.previous, packed[:, 0]) and np.array_equal(zoomed.previous, packed[[0], 1])
    start = redraw_prediction(Prediction(first), both)
    assert sorted(start.logits) == [3, 4, 5, 6] and start.logits[4].shape == (2, 256, 256)
    assert start.logits[4].dtype == np.float16
    refined = protocols.refine(start.copy(), protocols.Box3D(3, 6, (90.0, 90.0, 180.0, 160.0)),
                               Click(4, 120, 131, True), both, grow_px=(3.0, 3.0))
    assert zoomed.previous is not None and zoomed.previous.shape[1:] == (256, 256)  # its own logits, as the prompt
    assert refined.logits[4].shape == (2, 256, 256)
