"""An optional refinement head: the decoder's mask redrawn near the prompt's box from the slice's own pixels.

The mask decoder draws from 64 × 64 embeddings and its logits are 256 × 256: for a 512² slice one output pixel is two
slice pixels, while an adrenal limb is two to six slice pixels thick. HQ-SAM answers with a high-quality output token
that fuses early, fine features into the mask; here the finest feature there is, the CT slice itself (the cache's
``pixels``, :mod:`embedcache.cache.store`), joins the decoder's logits in a small convolutional head.

Geometry. Coordinates follow :mod:`embedcache.cache.preprocess` (pixel ``i`` covers ``[i, i + 1)``). Each prompt's
*window* is a square of the ``S × S`` slice around its box (:func:`windows`). The head sees the window resampled to
``CROP × CROP`` (``torchvision.ops.roi_align``, bilinear): the decoder's logits (bilinear from 256², as
:func:`~embedcache.model.decoder.logits_to_slice` draws them) and the pixels. It returns logits there: the decoder's
plus a correction whose last layer starts at zero, so a new head changes nothing and training starts from the
decoder's answers. :func:`paste` samples them back at each slice pixel's centre inside the window; outside it the
decoder's own logits stay. The loss (:func:`crop_targets`) compares the crop with the target resampled the same way.

It lives inside the mask decoder module as ``refiner``, as the adapter does, so its weights are saved and loaded with
the decoder's (``refiner.*`` keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

#: Key prefix of the head's weights within a decoder state dict.
PREFIX = "refiner."
#: Side of the window the head draws in (px): finer than the slice for a gland's window on a whole slice.
CROP = 128
#: The window: the box's longer side times this, plus :data:`PAD` slice pixels, centred on the box.
GROW = 1.5
PAD = 16.0


class RefineHead(nn.Module):
    """``(P, 1, C, C)`` logits and ``(P, 1, C, C)`` pixels in ``[0, 1]`` → ``(P, 1, C, C)`` refined logits: the logits
    plus a correction by five convolutions (dilated 1, 2, 4, 1: a 31-pixel view), the identity at first."""

    def __init__(self, channels: int = 24):
        super().__init__()
        c = channels
        self.body = nn.Sequential(
            nn.Conv2d(2, c, 3, padding=1), nn.GELU(),
            nn.Conv2d(c, c, 3, padding=2, dilation=2), nn.GELU(),
            nn.Conv2d(c, c, 3, padding=4, dilation=4), nn.GELU(),
            nn.Conv2d(c, c, 3, padding=1), nn.GELU(),
        )
        self.out = nn.Conv2d(c, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, logits: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        x = torch.cat([logits.clamp(-20.0, 20.0) / 10.0, pixels * 2.0 - 1.0], dim=1)
        return logits + self.out(self.body(x))


def attach_refiner(mask_decoder: nn.Module) -> nn.Module:
    """Give ``mask_decoder`` a new (identity) refinement head; returns the decoder."""
    mask_decoder.add_module("refiner", RefineHead())
    return mask_decoder


def has_refiner(state: dict) -> bool:
    """True for a decoder state dict trained with a refinement head."""
    return any(key.startswith(PREFIX) for key in state)


def windows(boxes: torch.Tensor) -> torch.Tensor:
    """``(P, 4)`` boxes ``(x0, y0, x1, y1)`` in slice pixels → ``(P, 4)`` square windows around them."""
    boxes = boxes.float()
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1, keepdim=True) * GROW + PAD
    return torch.cat([centre - side / 2, centre + side / 2], dim=1)


def _crop(images: torch.Tensor, window: torch.Tensor, *, scale: float, sampling: int) -> torch.Tensor:
    """``(P, 1, H, W)`` images → ``(P, 1, CROP, CROP)``: each one's window (slice pixels; ``scale``: image pixels per
    slice pixel) resampled, ``sampling``² bilinear samples averaged per output pixel."""
    rois = torch.cat([torch.arange(len(window), device=window.device, dtype=window.dtype)[:, None], window], dim=1)
    return roi_align(images.float(), rois, (CROP, CROP), spatial_scale=scale, sampling_ratio=sampling, aligned=True)


def refine_crops(head: RefineHead, low_res: torch.Tensor, pixels: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """The head's logits ``(P, 1, CROP, CROP)`` in each window, from the decoder's ``(P, 1, 256, 256)`` logits over the
    ``S × S`` slice and the slice's ``(P, S, S)`` pixels (uint8, as cached)."""
    size = pixels.shape[-1]
    logits = _crop(low_res, window, scale=low_res.shape[-1] / size, sampling=1)
    seen = _crop(pixels[:, None].float() / 255.0, window, scale=1.0, sampling=2)
    return head(logits.to(next(head.parameters()).dtype), seen.to(next(head.parameters()).dtype))


def crop_targets(masks: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """``(P, S, S)`` bool targets → ``(P, 1, CROP, CROP)`` soft targets in the windows, resampled as the pixels are."""
    return _crop(masks[:, None].float(), window, scale=1.0, sampling=2)


def refine_loss(head: RefineHead, low_res: torch.Tensor, pixels: torch.Tensor, masks: torch.Tensor,
                boxes: torch.Tensor) -> torch.Tensor:
    """``(P,)`` DiceCE of the head's window logits against the targets resampled alike (prompts' boxes ``(P, 4)`` in
    slice pixels, masks ``(P, S, S)`` bool)."""
    from embedcache.model.losses import dice_ce_per_prompt

    window = windows(boxes)
    return dice_ce_per_prompt(refine_crops(head, low_res, pixels, window), crop_targets(masks, window))


def paste(slice_logits: torch.Tensor, crops: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """``(P, S, S)`` logits on the slice with each prompt's ``(P, 1, CROP, CROP)`` window logits sampled in at the
    centres of the slice pixels inside its window; the slice's own logits elsewhere."""
    p, size = slice_logits.shape[0], slice_logits.shape[-1]
    centres = torch.arange(size, device=slice_logits.device, dtype=torch.float32) + 0.5
    x0, y0, x1, y1 = (window[:, i, None].float() for i in range(4))
    u = 2.0 * (centres[None] - x0) / (x1 - x0) - 1.0  # (P, S): x of each column in the crop's [-1, 1]
    v = 2.0 * (centres[None] - y0) / (y1 - y0) - 1.0  # (P, S): y of each row
    grid = torch.stack([u[:, None, :].expand(p, size, size), v[:, :, None].expand(p, size, size)], dim=-1)
    sampled = F.grid_sample(crops.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]
    inside = (u.abs() < 1)[:, None, :] & (v.abs() < 1)[:, :, None]
    return torch.where(inside, sampled.to(slice_logits.dtype), slice_logits)


def refine_on_slice(head: RefineHead, low_res: torch.Tensor, slice_logits: torch.Tensor, pixels: torch.Tensor,
                    boxes: torch.Tensor) -> torch.Tensor:
    """``(P, S, S)`` slice logits (the decoder's ``(P, 1, 256, 256)`` ``low_res`` drawn on the slice) with each
    prompt's window redrawn by ``head`` from the slice's ``(P, S, S)`` uint8 pixels; ``boxes`` ``(P, 4)`` in slice
    pixels, a row of NaN (clicks alone) leaving its prompt as the decoder drew it."""
    given = ~torch.isnan(boxes).any(dim=1)
    if not bool(given.any()):
        return slice_logits
    window = windows(boxes[given])
    crops = refine_crops(head, low_res[given], pixels[given], window)
    out = slice_logits.clone()
    out[given] = paste(slice_logits[given], crops, window)
    return out
