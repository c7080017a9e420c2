"""The one segmenter: the slices of one volume, wherever their embeddings come from, through one mask decoder.

``score`` reads a case's embeddings from the cache (:class:`~embedcache.evaluation.score.CachedCase`), ``predict``
encodes a new volume's slices as the walk asks for them (:class:`~embedcache.segment.predict.OnTheFly`); both
hand a :class:`Segmenter` to the prompt protocols, so the same box gives the same mask in either (SAM's
``SamPredictor`` holds an image's features the same way; here one object holds "the embedding of slice z").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:  # torch is imported where a slice is decoded: predict checks its inputs before torch loads
    import torch


class SliceEmbeddings(Protocol):
    """Where a volume's slice embeddings come from."""

    #: ``(height, width)`` of the volume's axial slices (px), on which boxes and masks are given.
    shape_yx: tuple[int, int]

    def embeddings(self, zs: np.ndarray) -> torch.Tensor:
        """``(len(zs), 256, 64, 64)`` float32 embeddings of slices ``zs``, on the decoder's device."""

    def ahead(self, zs: list[int]) -> None:
        """The slices a walk will ask for next, in order (a source that encodes on the fly starts on them)."""

    def pixels(self, zs: np.ndarray) -> np.ndarray:
        """``(len(zs), S, S)`` uint8: the slices as the encoder saw them (a cache's ``pixels``), which a decoder with a
        refinement head redraws its masks from."""


@dataclass(frozen=True)
class Decoder:
    """A mask decoder with its prompt encoder, the backbone's input size (px) and the size the slices were resampled
    to (px) before encoding; ``decode``: an exported graph that decodes in the two modules' place (see
    :func:`~embedcache.model.decoder.segment_boxes`)."""

    prompt_encoder: object
    mask_decoder: object
    input_size: int
    slice_size: int
    decode: object = None


class Segmenter:
    """The :class:`~embedcache.evaluation.protocols.Segment` of one volume (``slices``) and one ``decoder``: boxes
    ``(k, 4)`` (and clicks, and each slice's previous low-resolution logits) on slices ``zs`` → ``(k, height, width)``
    bool masks and ``(k,)`` predicted IoU (and, asked for, the ``(k, 256, 256)`` logits to give back next round)."""

    def __init__(self, slices: SliceEmbeddings, decoder: Decoder):
        self.slices, self.decoder = slices, decoder

    @property
    def feeds_back(self) -> bool:
        """Whether the protocols give a slice's previous logits back (``previous=``, asking for the new ones with
        ``low_res=``): for a decoder trained with them (``finetune --prompts interactive``). LiteMedSAM's released
        decoder, and one fine-tuned without them, follow the mask prompt to worse masks (measured: a click then
        lowers its slice's Dice), so they decode without it."""
        return bool(getattr(self.decoder.mask_decoder, "mask_prompt", False))

    def __call__(self, zs: np.ndarray, boxes: np.ndarray, *, multimask: bool = False, points=None,
                 previous: np.ndarray | None = None, low_res: bool = False,
                 grid_logits: bool = False) -> tuple[np.ndarray, ...]:
        """``grid_logits``: the logits on the slice's grid (float32; the masks are where they are positive) in the
        masks' place."""
        import torch

        from embedcache.model.decoder import segment_boxes

        d = self.decoder
        with torch.no_grad():
            embeddings = self.slices.embeddings(zs)
            pixels = None
            if getattr(d.mask_decoder, "refiner", None) is not None:  # finetune --refine-head
                pixels = torch.as_tensor(self.slices.pixels(zs), device=embeddings.device)
            prior = None if previous is None else \
                torch.as_tensor(np.asarray(previous, np.float32), device=embeddings.device).reshape(len(zs), 1, *previous.shape[-2:])
            out = segment_boxes(d.prompt_encoder, d.mask_decoder, embeddings,
                                torch.as_tensor(boxes, dtype=torch.float32, device=embeddings.device),
                                input_size=d.input_size, slice_size=d.slice_size, shape_yx=self.slices.shape_yx,
                                multimask=multimask, points=points, decode=d.decode, previous=prior, low_res=low_res,
                                pixels=pixels, grid_logits=grid_logits)
        masks, iou = out[0].cpu().numpy(), out[1].float().cpu().numpy()
        return (masks, iou, out[2][:, 0].float().cpu().numpy()) if low_res else (masks, iou)

    def ahead(self, zs: list[int]) -> None:
        self.slices.ahead(zs)
