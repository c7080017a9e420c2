from __future__ import annotations

import numpy as np

from embedcache.model.prompts import box_from_mask, boxes_for_labels, jitter_boxes


def test_box_uses_pixel_edges_in_xyxy_order():
    mask = np.zeros((20, 30), bool)
    mask[5:8, 10:25] = True  # rows 5..7, columns 10..24
    np.testing.assert_array_equal(box_from_mask(mask), [10, 5, 25, 8])
    assert box_from_mask(np.zeros((4, 4), bool)) is None


def test_one_box_covers_all_components_of_a_label():
    label = np.zeros((50, 50), np.uint8)
    label[10:12, 5:9] = 7
    label[30:33, 20:22] = 7  # a second fragment of the same gland
    label[40:45, 40:48] = 8
    boxes = boxes_for_labels(label, (7, 8, 9))
    np.testing.assert_array_equal(boxes[0], [5, 10, 22, 33])
    np.testing.assert_array_equal(boxes[1], [40, 40, 48, 45])
    assert np.isnan(boxes[2]).all()


def test_jitter_is_proportional_to_box_size_and_stays_valid():
    rng = np.random.default_rng(0)
    boxes = np.tile(np.array([[100, 100, 140, 110]], np.float32), (500, 1))
    out = jitter_boxes(boxes, fraction=0.1, rng=rng, limit=512)
    dx = np.abs(out[:, [0, 2]] - boxes[:, [0, 2]])
    dy = np.abs(out[:, [1, 3]] - boxes[:, [1, 3]])
    assert dx.max() <= 4.0 + 1e-4 and dy.max() <= 1.0 + 1e-4 and dx.max() > 3.0
    assert (out[:, 2] > out[:, 0]).all() and (out[:, 3] > out[:, 1]).all()
    edge = jitter_boxes(np.array([[0, 0, 512, 512]], np.float32), fraction=0.5, rng=rng, limit=512)
    assert edge.min() >= 0 and edge.max() <= 512
