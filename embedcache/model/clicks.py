"""Clicks: where a person (or the trainer) puts a point on a slice, and what label it gets.

Two rules, one for each phase:

* :func:`training_clicks` (``finetune --prompts box+points|mixed``): ``k`` points per prompt drawn
  uniformly from the error region between the target and the decoder's own prediction of the same
  prompt (a missed pixel is a positive click, a pixel it should not have drawn a negative one), as
  SAM's interactive training samples its corrective clicks; where that region is smaller than ``k``
  pixels, the rest come from inside the box, labelled by the target. Without a prediction (points
  alone), every point lies on the target. All on the device, at the decoder's 256² resolution, from a
  seeded integer hash: the same seed gives the same clicks on any device and any number of ranks.
* :func:`interior_click` (``finetune --prompts interactive``): one click per prompt and round, on the most interior
  pixel of the error between the target and the round before's prediction (the depth of a pixel: how many
  3×3 erosions of the error it survives, up to :data:`DEPTH`; ties broken by the seeded hash), positive in a
  miss and negative in a false positive: the 2-D, batched counterpart of ``score``'s rule below.
* :func:`corrective_click` (``score --protocols clicks``): the most interior voxel (largest distance to
  its border, in mm) of the largest 3-D connected component of the error, positive when that
  component is a missed region and negative when it is a false positive: the rule of the CVPR 2025
  interactive 3-D segmentation challenge, deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch only where clicks are drawn for training: predict checks its inputs before importing it
    import torch

#: Seeds of :func:`training_clicks` lie in 0..2**SEED_BITS - 1 (with the pixel index they fill 32 bits).
SEED_BITS = 16
_MASK32 = 0xFFFFFFFF


def _hash_noise(seeds: torch.Tensor, pixels: int) -> torch.Tensor:
    """``(n,)`` int64 seeds → ``(n, pixels)`` float noise in [0, 1): a 32-bit integer hash of (seed, pixel)."""
    import torch

    index = torch.arange(pixels, device=seeds.device, dtype=torch.int64)
    x = (seeds[:, None].to(torch.int64) * pixels + index[None]) & _MASK32
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (x >> 16) ^ x
    return x.to(torch.float32) / float(2**32)


def training_clicks(target: torch.Tensor, k: int, seeds: torch.Tensor, *, input_size: int,
                    prediction: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` clicks per prompt for training.

    Arguments:
      target: ``(n, 1, 256, 256)`` soft targets (a pixel is on the target above 0.5).
      seeds: ``(n,)`` integers in ``0..2**SEED_BITS - 1``.
      prediction: ``(n, 1, 256, 256)`` the decoder's logits for the same prompts without points; the
        clicks then come from its error region. None: points alone, all on the target.
      boxes: ``(n, 4)`` the prompts' boxes in encoder-input pixels: where the clicks come from when
        the error region is too small.

    Returns:
      ``(n, k, 2)`` coordinates ``(x, y)`` in encoder-input pixels (pixel centres, in SAM's convention)
      and ``(n, k)`` labels: 1 a pixel of the target, 0 one off it.
    """
    import torch

    from embedcache.model.decoder import LOW_RES

    n = len(target)
    truth = (target[:, 0] > 0.5).reshape(n, -1)
    noise = _hash_noise(seeds, LOW_RES * LOW_RES)
    if prediction is None:
        score = noise + 2.0 * truth
    else:
        error = (prediction[:, 0].detach() > 0).reshape(n, -1) ^ truth
        score = noise + 2.0 * error
        if boxes is not None:
            step = input_size / LOW_RES
            centre = (torch.arange(LOW_RES, device=target.device, dtype=torch.float32) + 0.5) * step
            x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
            inside = ((centre[None] >= x0) & (centre[None] < x1))[:, None, :] & \
                     ((centre[None] >= y0) & (centre[None] < y1))[:, :, None]
            score = score + 1.0 * inside.reshape(n, -1)
    picked = score.topk(k, dim=1).indices  # (n, k): error pixels first, then the box, then anything
    labels = truth.gather(1, picked).to(torch.int64)
    step = input_size / LOW_RES
    # SAM's prompt encoder adds half a pixel to a point: this puts it on the low-res pixel's centre
    x = (picked % LOW_RES).float() * step + (step - 1.0) / 2.0
    y = (picked // LOW_RES).float() * step + (step - 1.0) / 2.0
    return torch.stack([x, y], dim=-1), labels


#: The most 3×3 erosions :func:`interior_click` counts (a pixel deeper than this is as interior as any).
DEPTH = 12


def interior_click(target: torch.Tensor, prediction: torch.Tensor, seeds: torch.Tensor, *, input_size: int,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One corrective click per prompt on the most interior pixel of its error.

    Arguments:
      target: ``(n, 1, 256, 256)`` soft targets (a pixel is on the target above 0.5).
      prediction: ``(n, 1, 256, 256)`` the round before's logits.
      seeds: ``(n,)`` integers in ``0..2**SEED_BITS - 1`` (a different one per round: the tie-break).

    Returns:
      ``(n, 1, 2)`` coordinates ``(x, y)`` in encoder-input pixels (pixel centres, as :func:`training_clicks`) and
      ``(n, 1)`` labels: 1 where the pixel is on the target (a miss), 0 where it is not (a false positive). A
      prompt without error gets a pixel drawn by the hash, labelled by the target.
    """
    import torch
    import torch.nn.functional as F

    from embedcache.model.decoder import LOW_RES

    n = len(target)
    truth = target[:, :1] > 0.5
    error = ((prediction[:, :1].detach() > 0) ^ truth).float()
    depth, inner = torch.zeros_like(error), error
    for _ in range(DEPTH):
        depth = depth + inner
        inner = -F.max_pool2d(-F.pad(inner, (1, 1, 1, 1)), 3, stride=1)  # erosion; beyond the edge is not error
    score = depth.reshape(n, -1) + _hash_noise(seeds, LOW_RES * LOW_RES) * 0.5
    picked = score.argmax(dim=1, keepdim=True)  # (n, 1)
    labels = truth.reshape(n, -1).gather(1, picked).to(torch.int64)
    step = input_size / LOW_RES
    x = (picked % LOW_RES).float() * step + (step - 1.0) / 2.0
    y = (picked // LOW_RES).float() * step + (step - 1.0) / 2.0
    return torch.stack([x, y], dim=-1), labels


@dataclass(frozen=True)
class Click:
    """One click on voxel ``(z, y, x)`` of a canonical volume: ``positive`` on the target, else off it."""

    z: int
    y: int
    x: int
    positive: bool

    def point(self) -> tuple[float, float, float]:
        """``(x, y, label)`` as :func:`embedcache.model.decoder.segment_boxes` takes a point."""
        return float(self.x), float(self.y), 1.0 if self.positive else 0.0


def corrective_click(prediction: np.ndarray, truth: np.ndarray, spacing_mm) -> Click | None:
    """The next corrective click for a bool ``(z, y, x)`` prediction of ``truth``: the most interior voxel
    of the largest 3-D error component (6-connected; interior by the Euclidean distance in mm to the
    component's border, the first voxel in (z, y, x) order on a tie); None when there is no error."""
    from scipy import ndimage

    error = prediction ^ truth
    if not error.any():
        return None
    components, count = ndimage.label(error)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    largest = int(sizes.argmax())
    where = ndimage.find_objects((components == largest).astype(np.int32))[0]
    region = np.pad(components[where] == largest, 1)  # a border of background: the volume's edge is an edge too
    distance = ndimage.distance_transform_edt(region, sampling=tuple(float(s) for s in spacing_mm))
    z, y, x = (int(v) - 1 + s.start for v, s in zip(np.unravel_index(int(distance.argmax()), region.shape), where))
    return Click(z, y, x, positive=bool(truth[z, y, x]))
