"""The prompt protocols on a synthetic volume, with a stand-in decoder whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from embedcache.errors import UsageError
from embedcache.evaluation.protocols import (
    Box3D,
    ProtocolSettings,
    box3d_from_label,
    parse_protocols,
    propagate,
    run,
    tight_boxes,
)

SHAPE = (10, 40, 50)


def _gland() -> np.ndarray:
    truth = np.zeros(SHAPE, bool)
    truth[3:7, 10:20, 15:30] = True  # slices 3..6
    truth[5, 12:22, 17:33] = True  # it moves a little
    return truth


def _stand_in(truth: np.ndarray, calls: list):
    """The ground truth inside the box where the slice holds it; elsewhere the whole box (a false positive)."""

    def segment(zs, boxes, **_):
        masks = []
        for z, (x0, y0, x1, y1) in zip(zs, boxes):
            calls.append(int(z))
            inside = np.zeros(SHAPE[1:], bool)
            inside[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = True
            masks.append(truth[z] & inside if (truth[z] & inside).any() else inside)
        masks = np.array(masks)
        # the predicted IoU: 0.9 on the gland, 0.2 for the false positive beyond it
        return masks, np.array([0.9 if (m & truth[z]).any() else 0.2 for z, m in zip(zs, masks)])

    return segment


def test_oracle_gets_the_tight_box_of_every_slice_and_nothing_else():
    truth, calls = _gland(), []
    prediction = run("oracle", _stand_in(truth, calls), truth=truth, spacing_mm=(2.5, 1, 1),
                     settings=ProtocolSettings(), case="c", label=7)
    np.testing.assert_array_equal(prediction.mask, truth)
    assert calls == [3, 4, 5, 6]
    assert prediction.boxes[5] == (15.0, 10.0, 33.0, 22.0) and prediction.boxes[3] == (15.0, 10.0, 30.0, 20.0)


def test_box3d_counts_the_false_positive_on_the_slice_beyond_the_gland():
    truth, calls = _gland(), []
    settings = ProtocolSettings(margin_mm=0.0, margin_slices=1, grow_mm=5.0)  # enough to follow the gland
    prediction = run("box3d", _stand_in(truth, calls), truth=truth, spacing_mm=(2.5, 1, 1), settings=settings,
                     case="c", label=7)
    box = box3d_from_label(truth, (2.5, 1, 1), margin_mm=0.0, margin_slices=1)
    assert (box.z0, box.z1, box.box) == (2, 7, (15.0, 10.0, 33.0, 22.0))
    assert calls[0] == 4  # the middle slice of 2..7 first, then up, then down
    assert sorted(calls) == [2, 3, 4, 5, 6, 7]
    # slices 2 and 7 hold no gland: the stand-in draws a box there, which box3d must count
    for z in (2, 7):
        assert prediction.mask[z].any() and not truth[z].any()
    np.testing.assert_array_equal(prediction.mask[3:7], truth[3:7])
    false = prediction.mask[2].sum() + prediction.mask[7].sum()
    dice = 2 * truth.sum() / (2 * truth.sum() + false)
    from embedcache.evaluation.metrics import dice as dice_of

    assert dice_of(prediction.mask, truth) == pytest.approx(dice) and dice < 0.9


def test_box3d_stops_where_the_mask_vanishes_and_keeps_boxes_inside_the_3d_box():
    truth, calls = _gland(), []

    def vanishes_above_5(zs, boxes, **_):
        masks, iou = _stand_in(truth, calls)(zs, boxes)
        masks[np.asarray(zs) > 5] = False
        return masks, iou

    box = Box3D(1, 8, (14.0, 9.0, 34.0, 23.0))
    prediction = propagate(box, vanishes_above_5, SHAPE, grow_px=(50.0, 50.0))
    assert sorted(calls) == [1, 2, 3, 4, 5, 6]  # 6 came back empty: 7 and 8 are never asked
    assert not prediction.mask[6:].any()
    for given in prediction.boxes.values():  # grown by 50 px, yet never beyond the 3-D box
        assert given[0] >= 14 and given[1] >= 9 and given[2] <= 34 and given[3] <= 23


def test_the_walk_tells_a_segment_that_encodes_as_it_goes_which_slices_come_next():
    truth, calls, told = _gland(), [], []

    def vanishes_above_5(zs, boxes, **_):
        masks, iou = _stand_in(truth, calls)(zs, boxes)
        masks[np.asarray(zs) > 5] = False
        return masks, iou

    vanishes_above_5.ahead = lambda zs: told.append(list(zs))
    propagate(Box3D(1, 8, (14.0, 9.0, 34.0, 23.0)), vanishes_above_5, SHAPE, grow_px=(50.0, 50.0))
    # every slice of the box, the middle first, then up, then down; on turning, what is left; at the end, nothing
    assert told == [[4, 5, 6, 7, 8, 3, 2, 1], [3, 2, 1], []]
    assert calls == [4, 5, 6, 3, 2, 1]  # what the walk asked for, in the order it was told
    told.clear()
    propagate(Box3D(2, 4, (14.0, 9.0, 34.0, 23.0)), vanishes_above_5, SHAPE, grow_px=(1.0, 1.0), walk="extent")
    assert told == [[2, 3, 4]]


def test_the_fallback_walk_prompts_the_3d_box_where_the_mask_vanishes_and_goes_on():
    truth, calls = _gland(), []

    def vanishes_on_6(zs, boxes, **_):
        masks, iou = _stand_in(truth, calls)(zs, boxes)
        masks[np.asarray(zs) == 6] = False
        return masks, iou

    box = Box3D(1, 8, (14.0, 9.0, 34.0, 23.0))
    prediction = propagate(box, vanishes_on_6, SHAPE, grow_px=(1.0, 1.0), walk="fallback")
    assert sorted(calls) == list(range(1, 9))  # 7 and 8 are asked after 6 came back empty
    assert prediction.boxes[7] == box.box and prediction.boxes[6] != box.box
    assert prediction.mask[7].any()


def test_the_extent_walk_prompts_every_slice_of_the_3d_box_with_its_own_extent():
    truth, calls = _gland(), []
    box = Box3D(2, 7, (14.0, 9.0, 34.0, 23.0))
    prediction = propagate(box, _stand_in(truth, calls), SHAPE, grow_px=(1.0, 1.0), walk="extent")
    assert sorted(calls) == list(range(2, 8))
    assert set(prediction.boxes) == set(range(2, 8)) and set(prediction.boxes.values()) == {box.box}
    settings = ProtocolSettings(margin_mm=1.0, walk="extent")
    again = run("box3d", _stand_in(truth, []), truth=truth, spacing_mm=(2.5, 1, 1), settings=settings, case="c", label=7)
    assert len(set(again.boxes.values())) == 1


def test_a_low_predicted_iou_drops_the_mask_and_ends_the_walk_as_a_vanished_one():
    truth = _gland()
    box = Box3D(1, 8, (14.0, 9.0, 34.0, 23.0))
    trusting = propagate(box, _stand_in(truth, []), SHAPE, grow_px=(5.0, 5.0))
    assert trusting.mask[2].any() and trusting.mask[7].any()  # the false positives beyond the gland
    calls = []
    doubting = propagate(box, _stand_in(truth, calls), SHAPE, grow_px=(5.0, 5.0), min_iou=0.5)
    np.testing.assert_array_equal(doubting.mask, truth)  # dropped where the IoU said 0.2 ...
    assert sorted(calls) == [2, 3, 4, 5, 6, 7]  # ... and 1 and 8 never asked
    assert doubting.iou[7] == pytest.approx(0.2) and doubting.iou[4] == pytest.approx(0.9)
    extent = propagate(box, _stand_in(truth, []), SHAPE, grow_px=(5.0, 5.0), walk="extent", min_iou=0.5)
    assert not extent.mask[[1, 2, 7, 8]].any() and extent.mask[3:7].any()


def test_multimask_decodes_only_the_slices_prompted_with_the_3d_box_itself():
    truth = _gland()
    asked = []

    def recording(zs, boxes, multimask=False):
        asked.extend((int(z), multimask) for z in zs)
        return _stand_in(truth, [])(zs, boxes)

    box = Box3D(1, 8, (14.0, 9.0, 34.0, 23.0))
    propagate(box, recording, SHAPE, grow_px=(5.0, 5.0), multimask=True)
    assert [z for z, multi in asked if multi] == [4]  # the middle slice, whose prompt is the 3-D box's extent
    asked.clear()
    propagate(box, recording, SHAPE, grow_px=(5.0, 5.0), walk="extent", multimask=True)
    assert all(multi for _, multi in asked) and len(asked) == 8
    asked.clear()
    run("box3d", recording, truth=truth, spacing_mm=(2.5, 1, 1), settings=ProtocolSettings(middle="multimask"),
        case="c", label=7)
    assert sum(multi for _, multi in asked) == 1


def test_with_the_check_off_no_predicted_iou_drops_a_mask_not_even_a_negative_one():
    truth = _gland()

    def unsure(zs, boxes, **_):
        masks, _ = _stand_in(truth, [])(zs, boxes)
        return masks, np.full(len(masks), -0.3)  # an untrained IoU head may say anything

    box = Box3D(1, 8, (14.0, 9.0, 34.0, 23.0))
    for walk in ("grow", "extent"):
        assert propagate(box, unsure, SHAPE, grow_px=(5.0, 5.0), walk=walk).mask[3:7].any()
        assert not propagate(box, unsure, SHAPE, grow_px=(5.0, 5.0), walk=walk, min_iou=0.1).mask.any()


def test_the_bounded_walk_keeps_a_spilling_mask_from_pulling_the_box_and_scales_the_grow_by_the_spacing():
    from embedcache.evaluation.protocols import grow_px

    def spills(zs, boxes, **_):  # the middle slice's mask is the gland; past it, every mask spills 4 px right
        masks = np.zeros((len(zs), *SHAPE[1:]), bool)
        for z, m, (x0, y0, x1, y1) in zip(zs, masks, boxes):
            if z == 5:
                m[15:25, 20:26] = True
            else:
                m[int(y0) : int(y1), int(x0) : min(int(x1) + 4, SHAPE[2])] = True
        return masks, np.ones(len(zs))

    box = Box3D(1, 9, (18.0, 13.0, 50.0, 27.0))  # room to run away in
    free = propagate(box, spills, SHAPE, grow_px=(1.0, 1.0))
    bounded = propagate(box, spills, SHAPE, grow_px=(1.0, 1.0), walk="bounded")
    assert free.boxes[9][2] - free.boxes[5][2] > bounded.boxes[9][2] - bounded.boxes[5][2]
    for z in range(6, 10):  # each box within the one before, grown by the bound
        assert bounded.boxes[z][2] <= bounded.boxes[z - 1][2] + 1.0 + 1e-6
    assert grow_px(ProtocolSettings(grow_mm=3.0, walk="bounded"), (5.0, 1.0, 1.0)) == (6.0, 6.0)
    assert grow_px(ProtocolSettings(grow_mm=3.0), (5.0, 1.0, 1.0)) == (3.0, 3.0)


def test_an_unknown_walk_is_one_line_naming_the_choices():
    with pytest.raises(UsageError, match="--walk spiral: choose from grow, fallback, extent, bounded"):
        ProtocolSettings(walk="spiral")


def test_jitter_moves_every_edge_the_same_way_for_the_same_seed():
    truth = _gland()
    boxes = {}
    for seed in (0, 0, 1):
        prediction = run("jitter", _stand_in(truth, []), truth=truth, spacing_mm=(2.5, 1, 1),
                         settings=ProtocolSettings(jitter=0.2, seed=seed), case="c", label=7)
        boxes.setdefault(seed, []).append(prediction.boxes)
    assert boxes[0][0] == boxes[0][1] and boxes[0][0] != boxes[1][0]
    _, tight = tight_boxes(truth)
    moved = np.array(list(boxes[0][0].values())) - tight
    size = np.concatenate([tight[:, 2:] - tight[:, :2]] * 2, axis=1)
    assert (np.abs(moved) <= 0.2 * size + 1e-4).all() and np.abs(moved).max() > 0


def test_protocol_names_and_settings_are_checked():
    assert parse_protocols("box3d,oracle") == ("box3d", "oracle")
    with pytest.raises(UsageError, match="choose from oracle, jitter, box3d"):
        parse_protocols("tight")
    with pytest.raises(UsageError, match="--jitter"):
        ProtocolSettings(jitter=1.5)
    with pytest.raises(UsageError, match="inverted"):
        Box3D(5, 3, (1, 1, 4, 4)).check(SHAPE, "boxes.json")
    with pytest.raises(UsageError, match="outside the volume"):
        Box3D(0, 3, (60, 1, 70, 4)).check(SHAPE, "boxes.json")
