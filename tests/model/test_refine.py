"""The refinement head: its windows and what it draws land on the slice's own pixels, and a new head changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedcache.model.refine import CROP, RefineHead, crop_targets, paste, refine_crops, refine_on_slice, windows


class CopyPixels(torch.nn.Module):
    """A stand-in head whose logits are the pixels' brightness: what it draws is where the slice is bright."""

    def parameters(self, recurse: bool = True):
        yield torch.zeros(1)

    def forward(self, logits, pixels):
        return (pixels - 0.5) * 40.0


def _blob(size: int, seed: int) -> np.ndarray:
    """A thin, bent limb a few pixels wide, as an adrenal gland is on a slice."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    mask = np.zeros((size, size), bool)
    for t in np.linspace(0, 1, 40):
        cy, cx = size * 0.4 + 30 * t, size * 0.5 + 12 * np.sin(3 * t) + rng.normal(0, 0.5)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(1.0, 6.0)
    return mask


def _box(mask: np.ndarray) -> torch.Tensor:
    ys, xs = np.nonzero(mask)
    return torch.tensor([[xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0]])


def test_a_window_is_a_square_around_the_box_that_holds_it():
    boxes = torch.tensor([[100.0, 200.0, 140.0, 220.0], [10.0, 10.0, 12.0, 30.0]])
    w = windows(boxes)
    torch.testing.assert_close((w[:, :2] + w[:, 2:]) / 2, (boxes[:, :2] + boxes[:, 2:]) / 2)
    torch.testing.assert_close(w[:, 2] - w[:, 0], w[:, 3] - w[:, 1])
    assert (w[:, :2] < boxes[:, :2]).all() and (w[:, 2:] > boxes[:, 2:]).all()


@pytest.mark.parametrize("size", [512, 256])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_what_the_head_draws_in_its_window_lands_on_the_slices_own_pixels(size, seed):
    """A head that draws the bright pixels gives back, on the slice, exactly the bright pixels of the window: the crop
    and the paste are one geometry (finer than the slice, as a gland's window is)."""
    mask = _blob(size, seed)
    box = _box(mask)
    window = windows(box)
    assert (window[0, 2] - window[0, 0]) < CROP  # the crop is finer than the slice
    pixels = torch.from_numpy(mask.astype(np.uint8) * 255)[None]
    background = torch.full((1, size, size), -5.0)
    drawn = refine_on_slice(CopyPixels(), torch.zeros(1, 1, 256, 256), background, pixels, box)[0] > 0
    np.testing.assert_array_equal(drawn.numpy(), mask)
    # the training target is that same mask resampled into the window
    target = crop_targets(torch.from_numpy(mask)[None], window)
    assert target.shape == (1, 1, CROP, CROP) and 0.0 <= float(target.min()) and float(target.max()) <= 1.0
    seen = refine_crops(CopyPixels(), torch.zeros(1, 1, 256, 256), pixels, window)
    assert ((seen > 0) == (target > 0.5)).float().mean() > 0.99


def test_outside_its_window_and_for_a_prompt_without_a_box_the_decoders_logits_stay():
    size = 128
    logits = torch.randn(2, size, size)
    crops = torch.full((1, 1, CROP, CROP), 7.0)
    window = torch.tensor([[30.0, 40.0, 70.0, 80.0]])
    out = paste(logits[:1], crops, window)[0]
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[40:80, 30:70] = True  # the pixels whose centres lie inside the window
    torch.testing.assert_close(out[inside], torch.full_like(out[inside], 7.0))
    torch.testing.assert_close(out[~inside], logits[0][~inside])
    boxes = torch.tensor([[30.0, 40.0, 50.0, 60.0], [float("nan")] * 4])
    pixels = torch.zeros(2, size, size, dtype=torch.uint8)
    out = refine_on_slice(CopyPixels(), torch.zeros(2, 1, 256, 256), logits, pixels, boxes)
    torch.testing.assert_close(out[1], logits[1])


def test_a_new_head_returns_the_decoders_logits_and_learns():
    head = RefineHead()
    logits = torch.randn(3, 1, CROP, CROP)
    pixels = torch.rand(3, 1, CROP, CROP)
    torch.testing.assert_close(head(logits, pixels), logits)
    head(logits, pixels).sum().backward()
    assert head.out.weight.grad is not None and head.out.weight.grad.abs().sum() > 0
