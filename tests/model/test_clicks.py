"""Where clicks go: training clicks from the decoder's error, and the corrective click of the clicks protocol."""

from __future__ import annotations

import numpy as np
import torch

from embedcache.model.clicks import corrective_click, training_clicks
from embedcache.model.decoder import LOW_RES


def _square(y0, y1, x0, x1):
    mask = torch.zeros(1, 1, LOW_RES, LOW_RES)
    mask[..., y0:y1, x0:x1] = 1.0
    return mask


def test_training_clicks_come_from_the_error_region_and_are_labelled_by_the_target():
    target = _square(100, 140, 100, 140)
    prediction = (_square(100, 140, 100, 120) * 20 - 10)  # the left half drawn: the right half is missed
    for seed in range(5):
        xy, labels = training_clicks(target, 4, torch.tensor([seed]), input_size=1024, prediction=prediction,
                                     boxes=torch.tensor([[400.0, 400, 560, 560]]))
        col, row = ((xy[0] - 1.5) / 4).T  # back to the 256² pixel (centre of a 4-px cell, less SAM's half pixel)
        assert torch.all((row >= 100) & (row < 140) & (col >= 120) & (col < 140)), (row, col)
        assert torch.all(labels == 1)
    over = _square(90, 150, 90, 150) * 20 - 10  # drawn too large: a ring of false positives
    xy, labels = training_clicks(target, 3, torch.tensor([7]), input_size=256, prediction=over, boxes=None)
    col, row = xy[0].T
    assert torch.all(labels == 0)
    assert not torch.any((row >= 100) & (row < 140) & (col >= 100) & (col < 140))
    # the same seed gives the same clicks; another seed others
    again = training_clicks(target, 3, torch.tensor([7]), input_size=256, prediction=over)[0]
    other = training_clicks(target, 3, torch.tensor([8]), input_size=256, prediction=over)[0]
    assert torch.equal(xy, again) and not torch.equal(xy, other)


def test_without_error_the_clicks_fall_in_the_box_and_points_alone_lie_on_the_target():
    target = _square(100, 110, 100, 110)
    perfect = target * 20 - 10
    xy, labels = training_clicks(target, 5, torch.tensor([1]), input_size=256, prediction=perfect,
                                 boxes=torch.tensor([[95.0, 95, 115, 115]]))
    col, row = xy[0].T
    assert torch.all((col >= 95) & (col < 115) & (row >= 95) & (row < 115))
    assert torch.equal(labels[0], target[0, 0, row.long(), col.long()].long())
    xy, labels = training_clicks(target, 5, torch.tensor([2]), input_size=256)
    assert torch.all(labels == 1)


def test_the_corrective_click_is_the_most_interior_voxel_of_the_largest_error():
    truth = np.zeros((15, 40, 40), bool)
    truth[2:13, 10:21, 10:30] = True
    prediction = truth.copy()
    prediction[2:13, 10:21, 19:30] = False  # a missed cube of 11 voxels a side, centred at (7, 15, 24)
    prediction[0:3, 0:3, 0:3] = True  # a small false positive
    click = corrective_click(prediction, truth, (1.0, 1.0, 1.0))
    assert click.positive and (click.z, click.y, click.x) == (7, 15, 24)
    # in mm: 3 mm slices make the thin axis the far one (5 slices deep, 15 mm), 1 mm pixels in-plane
    click = corrective_click(prediction[::2], truth[::2], (3.0, 1.0, 1.0))
    assert click.positive and (click.y, click.x) == (15, 24)
    prediction[2:13, 10:21, 19:30] = True
    click = corrective_click(prediction, truth, (1.0, 1.0, 1.0))
    assert not click.positive and (click.z, click.y, click.x) == (1, 1, 1)
    assert corrective_click(truth, truth, (1.0, 1.0, 1.0)) is None


def test_the_interior_click_lands_deep_in_the_error_and_says_miss_or_false_positive():
    """interactive training's click: on the most interior pixel of the error (a 40×20 missed half: its middle
    columns, not its rim), positive there; on a thick false-positive ring, negative and inside the ring's band."""
    from embedcache.model.clicks import interior_click

    target = torch.cat([_square(100, 140, 100, 140), _square(10, 30, 10, 30)])
    prediction = torch.cat([_square(100, 140, 100, 120), _square(0, 40, 0, 40)]) * 20 - 10
    xy, labels = interior_click(target, prediction, torch.tensor([3, 4]), input_size=256)
    assert xy.shape == (2, 1, 2) and labels.tolist() == [[1], [0]]
    col, row = xy[0, 0]
    assert 126 <= col <= 133 and 110 <= row <= 129, (row, col)  # 10 px wide: depth 10 only in its middle
    col, row = xy[1, 0]
    assert not (10 <= row < 30 and 10 <= col < 30)
    assert min(row, col, 39 - row, 39 - col) >= 3 or max(row, col) < 10  # deep in the ring
    same = interior_click(target, prediction, torch.tensor([3, 4]), input_size=256)[0]
    assert torch.equal(xy, same)
