"""Batched prompt encoder + mask decoder: many image embeddings × many box prompts in one forward.

``segment_anything``'s ``MaskDecoder.forward`` takes one image and N prompts (it repeats the one
embedding per prompt). Training and scoring need B images × P prompts; :func:`decode_boxes` runs
the decoder's own submodules on all of them at once and is tested equal to the per-image call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from embedcache.model.adapter import attach_adapter

#: Side of the decoder's mask logits, which cover the (padded) encoder input.
LOW_RES = 256


def decode_boxes(
    prompt_encoder: torch.nn.Module,
    mask_decoder: torch.nn.Module,
    embeddings: torch.Tensor,
    boxes: torch.Tensor,
    *,
    multimask_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks for box prompts.

    Arguments:
      embeddings: ``(B, 256, 64, 64)`` image embeddings.
      boxes: ``(B, P, 4)`` boxes ``(x0, y0, x1, y1)`` in the encoder input's pixels, or ``(N, 4)``
        with ``N`` prompts for ``N`` embeddings (one prompt each).

    Returns:
      low-resolution mask logits ``(B, P, M, 256, 256)`` (``M`` = 1, or 3 with ``multimask_output``;
      ``(N, M, 256, 256)`` for ``(N, 4)`` boxes) covering the padded encoder input, and the predicted
      IoU ``(B, P, M)``.
    """
    flat = boxes.ndim == 2
    if flat:
        boxes = boxes[:, None]
    b, p = boxes.shape[:2]
    sparse, dense = prompt_encoder(points=None, boxes=boxes.reshape(b * p, 4), masks=None)
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
    keep = slice(1, None) if multimask_output else slice(0, 1)
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


def masks_on_grid(low_res: torch.Tensor, *, input_size: int, slice_size: int, shape_yx: tuple[int, int]) -> torch.Tensor:
    """Low-resolution logits ``(P, 1, 256, 256)`` → boolean masks ``(P, *shape_yx)`` on a slice's own pixel grid.

    The logits go to the ``slice_size`` slice, then to the source grid, and only then are they
    thresholded, so a mask is not made blocky by resampling it after the threshold.
    """
    logits = logits_to_slice(low_res, input_size=input_size, slice_size=slice_size)
    return F.interpolate(logits, size=tuple(shape_yx), mode="bilinear", align_corners=False)[:, 0] > 0


class BoxDecoder(torch.nn.Module):
    """Prompt encoder (frozen) + mask decoder (trained) as one module, so DDP sees one forward."""

    def __init__(self, prompt_encoder: torch.nn.Module, mask_decoder: torch.nn.Module, *, train_iou: bool = False,
                 adapter: bool = False):
        super().__init__()
        if adapter:
            attach_adapter(mask_decoder)
        self.prompt_encoder = prompt_encoder.requires_grad_(False)
        self.mask_decoder = mask_decoder.requires_grad_(True)
        # Single-mask output: the loss never reaches the hypernetworks of the three multimask tokens,
        # nor the IoU head unless it is trained (``train_iou``). Frozen, they stay as released (and
        # DDP finds no unused parameters).
        mask_decoder.iou_prediction_head.requires_grad_(train_iou)
        for mlp in mask_decoder.output_hypernetworks_mlps[1:]:
            mlp.requires_grad_(False)

    def forward(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, 256, 64, 64)`` embeddings, ``(P, 4)`` boxes in encoder-input pixels → ``(P, 1, 256, 256)``
        mask logits and ``(P, 1)`` predicted IoU."""
        return decode_boxes(self.prompt_encoder, self.mask_decoder, embeddings, boxes)


def segment_boxes(prompt_encoder: torch.nn.Module, mask_decoder: torch.nn.Module, embeddings: torch.Tensor,
                  boxes: torch.Tensor, *, input_size: int, slice_size: int, shape_yx: tuple[int, int],
                  multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks on a slice's own pixel grid for boxes drawn on it, and the decoder's predicted IoU of each.

    Arguments:
      embeddings: ``(k, 256, 64, 64)``, one per prompt, of slices that were resampled to ``slice_size``².
      boxes: ``(k, 4)`` ``(x0, y0, x1, y1)`` pixel edges on the ``shape_yx`` slice.
      multimask: decode SAM's three multimask outputs and keep, per prompt, the one whose predicted IoU
        is highest (SAM's own answer to an ambiguous prompt, such as a loose box).

    Returns:
      ``(k, *shape_yx)`` bool masks and ``(k,)`` predicted IoU.
    """
    height, width = shape_yx
    scale = torch.tensor([slice_size / width, slice_size / height] * 2, device=boxes.device) * (input_size / slice_size)
    low, iou = decode_boxes(prompt_encoder, mask_decoder, embeddings, boxes * scale, multimask_output=multimask)
    best = iou.argmax(dim=1)
    pick = torch.arange(len(best), device=best.device)
    low, iou = low[pick, best][:, None], iou[pick, best]
    return masks_on_grid(low, input_size=input_size, slice_size=slice_size, shape_yx=shape_yx), iou
