"""Dice + cross-entropy on sigmoid logits, per prompt; the IoU head's squared error against the IoU
its mask really has; and the per-prompt 2-D Dice validation reports.

Equal to MONAI's ``DiceCELoss(sigmoid=True, squared_pred=True)`` (tested) when averaged over
prompts, but it returns one value per prompt: distributed training weights each rank's prompts by
the global prompt count, so K processes reproduce one process's loss exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_ce_per_prompt(
    logits: torch.Tensor, target: torch.Tensor, *, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5
) -> torch.Tensor:
    """``(N, 1, H, W)`` logits and targets in ``[0, 1]`` (soft targets allowed) → ``(N,)`` losses.

    Dice uses squared predictions in the denominator (``squared_pred``), as in the reference
    notebook's MONAI loss; the cross-entropy is the mean binary cross-entropy over pixels.
    """
    logits = logits.float()
    target = target.float()
    prob = torch.sigmoid(logits)
    dims = tuple(range(1, logits.ndim))
    intersection = (prob * target).sum(dims)
    denominator = (prob * prob).sum(dims) + (target * target).sum(dims)
    dice = 1.0 - (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dims)
    return dice + bce


def dice_2d(logits_low, masks):
    """Per-prompt Dice at full slice resolution: ``(P, 1, 256, 256)`` logits vs ``(P, S, S)`` bool masks → ``(P,)``.

    The logits are upsampled to the slice before the threshold. Both empty counts as 1 (FLARE22's rule).
    """
    size = masks.shape[-1]
    return dice_on_slice(F.interpolate(logits_low.float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0],
                         masks)


def dice_on_slice(logits, masks):
    """Per-prompt Dice of ``(P, S, S)`` logits on the slice vs ``(P, S, S)`` bool masks → ``(P,)``; both empty: 1."""
    pred = logits > 0
    inter = (pred & masks).sum((1, 2)).float()
    total = (pred.sum((1, 2)) + masks.sum((1, 2))).float()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` logits and targets in ``[0, 1]`` → ``(N,)`` IoU of the thresholded mask with the
    target (> 0.5), as the IoU head is asked to predict it; both empty counts as 1."""
    pred, truth = logits.detach() > 0, target > 0.5
    dims = tuple(range(1, logits.ndim))
    inter = (pred & truth).sum(dims).float()
    union = (pred | truth).sum(dims).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def iou_mse_per_prompt(iou_pred: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The IoU head's loss (LiteMedSAM's): ``(N, 1)`` predicted IoU against :func:`mask_iou` → ``(N,)``."""
    return (iou_pred.float()[:, 0] - mask_iou(logits, target)) ** 2
