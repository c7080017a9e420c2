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
