"""Batched prompt encoder + mask decoder: many image embeddings × many prompts in one forward.

``segment_anything``'s ``MaskDecoder.forward`` takes one image and N prompts (it repeats the one
embedding per prompt). Training and scoring need B images × P prompts; :func:`decode_boxes` runs
the decoder's own submodules on all of them at once and is tested equal to the per-image call.

A prompt is a box, a box with clicks (points labelled 1 inside the target, 0 outside), or clicks
alone, as ``SamPredictor.predict(point_coords=..., point_labels=..., box=...)`` takes them. The
prompts of one call carry the same number of points: SAM has no padding for a point that is not
there beside a box (its ``-1`` "not a point" token is one more token the decoder attends to, and
changes the mask), so :func:`segment_boxes` decodes prompts with different counts in groups.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from embedcache.model.adapter import attach_adapter
from embedcache.model.refine import attach_refiner, refine_on_slice

#: Side of the decoder's mask logits, which cover the (padded) encoder input.
LOW_RES = 256


def decode_boxes(
    prompt_encoder: torch.nn.Module,
    mask_decoder: torch.nn.Module,
    embeddings: torch.Tensor,
    boxes: torch.Tensor | None,
    *,
    points: tuple[torch.Tensor, torch.Tensor] | None = None,
    masks: torch.Tensor | None = None,
    multimask_output: bool = False,
    all_outputs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks for box (and point) prompts.

    Arguments:
      embeddings: ``(B, 256, 64, 64)`` image embeddings.
      boxes: ``(B, P, 4)`` boxes ``(x0, y0, x1, y1)`` in the encoder input's pixels, or ``(N, 4)``
        with ``N`` prompts for ``N`` embeddings (one prompt each); None: points alone (SAM then adds
        its padding point, as ``SamPredictor`` does).
      points: coordinates ``(B, P, K, 2)`` (``(N, K, 2)``) ``(x, y)`` in the encoder input's pixels, as
        ``SamPredictor.transform.apply_coords`` gives them, and labels ``(B, P, K)`` (``(N, K)``): 1 a
        point on the target, 0 a point off it.
      masks: the previous round's low-resolution logits of each prompt, ``(B, P, 1, 256, 256)`` (``(N, 1, 256,
        256)``), as SAM's mask prompt (``SamPredictor.predict(mask_input=...)``): its prompt encoder downscales them
        into the dense embedding added to the image's, in place of the "no mask" embedding. None: no mask prompt.

    Returns:
      low-resolution mask logits ``(B, P, M, 256, 256)`` (``M`` = 1, or 3 with ``multimask_output``;
      ``(N, M, 256, 256)`` for ``(N, 4)`` boxes) covering the padded encoder input, and the predicted
      IoU ``(B, P, M)``.
    """
    if boxes is None and points is None:
        raise ValueError("a prompt needs a box or points")
    lead = (boxes.shape[:-1] if boxes is not None else points[1].shape[:-1])
    flat = len(lead) == 1
    b, p = (lead[0], 1) if flat else tuple(lead)
    coords = None
    if points is not None:
        k = points[1].shape[-1]
        coords = (points[0].reshape(b * p, k, 2).float(), points[1].reshape(b * p, k).to(torch.int64))
    if masks is not None:
        masks = masks.reshape(b * p, 1, *masks.shape[-2:]).to(prompt_encoder.no_mask_embed.weight.dtype)
    sparse, dense = prompt_encoder(points=coords, boxes=None if boxes is None else boxes.reshape(b * p, 4).float(),
                                   masks=masks)
    d = mask_decoder
    adapter = getattr(d, "adapter", None)  # finetune --adapter: a residual correction of each embedding
    if adapter is not None:
        embeddings = adapter(embeddings.to(d.iou_token.weight.dtype))
    tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
    tokens = torch.cat([tokens.unsqueeze(0).expand(b * p, -1, -1), sparse.to(tokens.dtype)], dim=1)
    src = embeddings.to(tokens.dtype).repeat_interleave(p, dim=0) + dense
    pos = prompt_encoder.get_dense_pe().to(tokens.dtype).expand(b * p, -1, -1, -1)
    n, c, h, w = src.shape
    hs, src = d.transformer(src, pos, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + d.num_mask_tokens, :]
    upscaled = d.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(d.output_hypernetworks_mlps)], dim=1)
    n, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(n, c, h * w)).view(n, -1, h, w)
    iou = d.iou_prediction_head(iou_token_out)
    keep = slice(None) if all_outputs else slice(1, None) if multimask_output else slice(0, 1)
    masks, iou = masks[:, keep], iou[:, keep]
    if flat:
        return masks, iou
    return masks.view(b, p, *masks.shape[1:]), iou.view(b, p, -1)


def logits_to_slice(low_res: torch.Tensor, *, input_size: int, slice_size: int) -> torch.Tensor:
    """Low-resolution logits ``(..., 256, 256)`` over the padded encoder input → ``(..., slice_size, slice_size)``.

    Upsample to the encoder input, drop the padding, and resize to the (square) slice, as
    ``Sam.postprocess_masks`` does.
    """
    lead = low_res.shape[:-2]
    x = low_res.reshape(-1, 1, *low_res.shape[-2:])
    x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    x = F.interpolate(x, size=(slice_size, slice_size), mode="bilinear", align_corners=False)
    return x.view(*lead, slice_size, slice_size)


def slice_to_grid(logits: torch.Tensor, shape_yx: tuple[int, int]) -> torch.Tensor:
    """Logits ``(P, S, S)`` on the ``slice_size`` slice → ``(P, *shape_yx)`` on the slice's own pixel grid."""
    return F.interpolate(logits[:, None], size=tuple(shape_yx), mode="bilinear", align_corners=False)[:, 0]


def masks_on_grid(low_res: torch.Tensor, *, input_size: int, slice_size: int, shape_yx: tuple[int, int]) -> torch.Tensor:
    """Low-resolution logits ``(P, 1, 256, 256)`` → boolean masks ``(P, *shape_yx)`` on a slice's own pixel grid: to
    the ``slice_size`` slice, then to the source grid, as :func:`segment_boxes` draws them.

    The logits are thresholded only on that grid, so a mask is not made blocky by resampling it after the threshold.
    """
    return slice_to_grid(logits_to_slice(low_res[:, 0], input_size=input_size, slice_size=slice_size), shape_yx) > 0


class AllMasks(torch.nn.Module):
    """One embedding ``(1, 256, 64, 64)`` and one box ``(1, 4)`` (encoder-input pixels) → all four mask outputs'
    logits ``(1, 4, 256, 256)`` and predicted IoU ``(1, 4)``: the module exported for the CPU engines
    (:class:`~embedcache.model.engines.GraphDecoder`), which keep the single or multimask outputs themselves."""

    def __init__(self, prompt_encoder: torch.nn.Module, mask_decoder: torch.nn.Module):
        super().__init__()
        self.prompt_encoder, self.mask_decoder = prompt_encoder, mask_decoder

    def forward(self, embedding: torch.Tensor, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_boxes(self.prompt_encoder, self.mask_decoder, embedding, box, all_outputs=True)


class PromptDecoder(torch.nn.Module):
    """Prompt encoder (frozen) + mask decoder (trained) as one module, so DDP sees one forward."""

    def __init__(self, prompt_encoder: torch.nn.Module, mask_decoder: torch.nn.Module, *, train_iou: bool = False,
                 adapter: bool = False, refine: bool = False):
        super().__init__()
        if adapter:
            attach_adapter(mask_decoder)
        if refine:
            attach_refiner(mask_decoder)
        self.prompt_encoder = prompt_encoder.requires_grad_(False)
        self.mask_decoder = mask_decoder.requires_grad_(True)
        # Single-mask output: the loss never reaches the hypernetworks of the three multimask tokens,
        # nor the IoU head unless it is trained (``train_iou``). Frozen, they stay as released (and
        # DDP finds no unused parameters).
        mask_decoder.iou_prediction_head.requires_grad_(train_iou)
        for mlp in mask_decoder.output_hypernetworks_mlps[1:]:
            mlp.requires_grad_(False)

    def forward(self, embeddings: torch.Tensor, boxes: torch.Tensor | None,
                points: tuple[torch.Tensor, torch.Tensor] | None = None,
                masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, 256, 64, 64)`` embeddings, ``(P, 4)`` boxes (and ``(P, K, 2)`` points with ``(P, K)``
        labels) in encoder-input pixels (and ``(P, 1, 256, 256)`` previous logits as the mask prompt) →
        ``(P, 1, 256, 256)`` mask logits and ``(P, 1)`` predicted IoU."""
        return decode_boxes(self.prompt_encoder, self.mask_decoder, embeddings, boxes, points=points, masks=masks)


def segment_boxes(prompt_encoder: torch.nn.Module, mask_decoder: torch.nn.Module, embeddings: torch.Tensor,
                  boxes: torch.Tensor, *, input_size: int, slice_size: int, shape_yx: tuple[int, int],
                  multimask: bool = False, points: list | None = None, decode=None, previous: torch.Tensor | None = None,
                  low_res: bool = False, pixels: torch.Tensor | None = None,
                  grid_logits: bool = False) -> tuple[torch.Tensor, ...]:
    """Masks on a slice's own pixel grid for boxes drawn on it, and the decoder's predicted IoU of each.

    Arguments:
      embeddings: ``(k, 256, 64, 64)``, one per prompt, of slices that were resampled to ``slice_size``².
      boxes: ``(k, 4)`` ``(x0, y0, x1, y1)`` pixel edges on the ``shape_yx`` slice; a row of NaN: no box
        (points alone).
      multimask: decode SAM's three multimask outputs and keep, per prompt, the one whose predicted IoU
        is highest (SAM's own answer to an ambiguous prompt, such as a loose box).
      points: per prompt, None or an ``(n, 3)`` array of clicks ``(x, y, label)`` on the ``shape_yx``
        slice: ``x`` its column and ``y`` its row, as ``SamPredictor`` takes them; label 1 on the target,
        0 off it. Prompts with different counts decode in separate groups (see the module).
      decode: what decodes in :func:`decode_boxes`'s place, given its arguments but the two modules (an exported
        graph: :class:`~embedcache.model.engines.GraphDecoder`); None: :func:`decode_boxes` itself.
      previous: ``(k, 1, 256, 256)`` each prompt's low-resolution logits of an earlier round on the same slice, given
        back as SAM's mask prompt (``SamPredictor.predict(mask_input=...)``); None: no mask prompt.
      low_res: also return the kept output's low-resolution logits ``(k, 1, 256, 256)``: the next round's ``previous``.
      pixels: ``(k, slice_size, slice_size)`` uint8, each prompt's slice as the cache's ``pixels`` holds it: what a
        decoder with a refinement head (``finetune --refine-head``, :mod:`embedcache.model.refine`) redraws its masks from.
      grid_logits: return the logits on the ``shape_yx`` grid (whose sign the masks are) in the masks' place.

    Returns:
      ``(k, *shape_yx)`` bool masks and ``(k,)`` predicted IoU (and, with ``low_res``, the logits).
    """
    height, width = shape_yx
    scale = torch.tensor([slice_size / width, slice_size / height] * 2, device=boxes.device) * (input_size / slice_size)
    counts = [0 if points is None or points[i] is None else len(points[i]) for i in range(len(boxes))]
    given = ~torch.isnan(boxes).any(dim=1).cpu().numpy()
    groups: dict[tuple[bool, int], list[int]] = {}
    for i, (has_box, n) in enumerate(zip(given, counts)):
        if not has_box and n == 0:
            raise ValueError(f"prompt {i} has neither a box nor points")
        groups.setdefault((bool(has_box), n), []).append(i)
    low = iou = None
    for (has_box, n), members in groups.items():
        index = torch.tensor(members, device=boxes.device)
        clicks = None
        if n:
            xyl = torch.as_tensor(np.stack([np.asarray(points[i], np.float32) for i in members]), device=boxes.device)
            clicks = (xyl[..., :2] * scale[:2], xyl[..., 2])
        extra = {} if previous is None else {"masks": previous[index]}
        part_low, part_iou = (decode or partial(decode_boxes, prompt_encoder, mask_decoder))(
            embeddings[index], boxes[index] * scale if has_box else None, points=clicks, multimask_output=multimask,
            **extra)
        if low is None:
            low = part_low.new_empty((len(boxes), *part_low.shape[1:]))
            iou = part_iou.new_empty((len(boxes), *part_iou.shape[1:]))
        low[index], iou[index] = part_low, part_iou
    best = iou.argmax(dim=1)
    pick = torch.arange(len(best), device=best.device)
    low, iou = low[pick, best][:, None], iou[pick, best]
    on_slice = logits_to_slice(low[:, 0], input_size=input_size, slice_size=slice_size)
    refiner = getattr(mask_decoder, "refiner", None)
    if refiner is not None:
        if pixels is None:
            raise ValueError("a decoder with a refinement head needs the slices' pixels")  # a caller's bug
        on_slice = refine_on_slice(refiner, low, on_slice, pixels, boxes * (scale / (input_size / slice_size)))
    logits = slice_to_grid(on_slice, shape_yx)
    masks = logits if grid_logits else logits > 0
    return (masks, iou, low) if low_res else (masks, iou)
