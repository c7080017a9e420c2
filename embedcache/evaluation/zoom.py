"""Zoom-out-zoom-in: a gland drawn on whole slices, then drawn again in its zoomed region, the two views averaged.

A decoder fine-tuned on a cache of the glands' regions (``encode --zoom``, :mod:`embedcache.cache.regions`) draws a
gland several times finer than one on whole slices, but alone it does not carry over to CT painted another way;
the mean of the two decoders' logits gains on both (``benchmarks/zoom.py``). :func:`redraw` takes the first
pass's mask (any protocol's, or predict's) and returns the second.
"""

from __future__ import annotations

import numpy as np

from embedcache.cache.regions import GlandRegion, box_to_region, zoom_out_values
from embedcache.model.prompts import box_from_mask, grow_box

#: mm each slice's box (around the first pass's mask) is grown before both views decode it: chosen on the
#: realistic bed's val cases among 0-3 mm (benchmarks/zoom.py)
GROW_MM = 2.0
#: the zoomed view's logit outside its region, where only the whole slice speaks
OUTSIDE = -20.0


def redraw(mask_zyx: np.ndarray, whole, zoomed, where: GlandRegion, spacing_yx, *, grow_mm: float = GROW_MM,
           weights: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """``mask_zyx`` (the first pass's bool mask of one gland) with each of its slices inside the region's slices
    ``where.z0 … where.z1`` drawn again: the box around the slice's mask grown by ``grow_mm`` decoded by ``whole``
    (the whole-slice :class:`~embedcache.evaluation.segmenter.Segmenter`) and, mapped into the region, by ``zoomed``
    (the region's, whose slice ``z`` is the volume's slice ``z`` zoomed); their logits averaged on the slice grid
    and thresholded at 0. Empty slices and slices beyond the region keep the first pass. ``weights`` weigh the
    whole-slice and the zoomed logits (a view weighed 0 is not decoded: ``(0, 1)`` is the zoomed view alone)."""
    import torch

    from embedcache.model.decoder import logits_on_grid

    out = np.array(mask_zyx, bool, copy=True)
    height, width = out.shape[1:]
    zs = [z for z in range(where.z0, min(where.z1, len(out) - 1) + 1) if out[z].any()]
    if not zs:
        return out
    grow = (grow_mm / spacing_yx[1], grow_mm / spacing_yx[0])
    boxes = np.array([grow_box(box_from_mask(out[z]), grow, within=(0, 0, width, height)) for z in zs], np.float32)
    inside = np.array([box_to_region(b, where.region, spacing_yx) for b in boxes], np.float32)
    size = where.region.size

    def logits(segment, boxes, shape):
        _, _, low = segment(np.array(zs), boxes, low_res=True)
        d = segment.decoder
        return logits_on_grid(torch.as_tensor(low)[:, None], input_size=d.input_size, slice_size=d.slice_size,
                              shape_yx=shape).numpy()

    mean = np.zeros((len(zs), height, width), np.float32)
    if weights[0]:
        mean += weights[0] * logits(whole, boxes, (height, width))
    if weights[1]:
        mean += weights[1] * zoom_out_values(logits(zoomed, inside, (size, size)), where.region, spacing_yx,
                                             (height, width), fill=OUTSIDE)
    for i, z in enumerate(zs):
        out[z] = mean[i] > 0
    return out
