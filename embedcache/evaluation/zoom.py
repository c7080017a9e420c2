"""Zoom-out-zoom-in: a gland drawn on whole slices, then drawn again in its zoomed region, the two views averaged.

A decoder fine-tuned on a cache of the glands' regions (``encode --zoom``, :mod:`embedcache.cache.regions`) draws a
gland several times finer than one on whole slices, but alone it does not carry over to CT painted another way;
the mean of the two decoders' logits gains on both (``benchmarks/zoom.py``). :func:`redraw` takes the first
pass's mask (any protocol's, or predict's) and returns the second.
"""

from __future__ import annotations

import numpy as np

from embedcache.cache.records import Signature
from embedcache.cache.regions import GlandRegion, box_to_region, region_around, zoom_out_values
from embedcache.errors import EmbedcacheError
from embedcache.model.prompts import box_from_mask, grow_box

#: mm each slice's box (around the first pass's mask) is grown before both views decode it: chosen on the
#: realistic bed's val cases among 0-3 mm (benchmarks/zoom.py)
GROW_MM = 2.0
#: the zoomed view's logit outside its region, where only the whole slice speaks
OUTSIDE = -20.0


#: what a zoom decoder must share with the whole-slice one it is averaged with: the embeddings' maker and meaning
SHARED_KEYS = ("backbone", "checkpoint_sha256", "input_size", "preprocess", "labels")


def check_zoom_decoder(zoom: Signature, zoom_path, whole: Signature | None, whole_path) -> None:
    """Refuse, in one line, a ``--zoom`` decoder not trained on a zoom cache, a whole-slice decoder that was, and a
    pair made from other embeddings (another backbone, weights, preprocessing or labels)."""
    if not zoom.zoom_mm:
        raise EmbedcacheError(f"{zoom_path}: trained on whole slices; --zoom takes a decoder fine-tuned on a cache of "
                              "the glands' regions (encode --zoom MM, then finetune on it)")
    if whole is None:
        raise EmbedcacheError(f"--zoom {zoom_path} is averaged with a fine-tuned whole-slice decoder: give --run or "
                              "--decoder too")
    if whole.zoom_mm:
        raise EmbedcacheError(f"{whole_path}: trained on the glands' regions (encode --zoom); give it as --zoom, and "
                              "a decoder trained on whole slices as --run or --decoder")
    difference = zoom.difference(whole, SHARED_KEYS)
    if difference:
        raise EmbedcacheError(f"{zoom_path}: trained on embeddings made with {difference} (those of {whole_path}); "
                              "fine-tune both decoders on caches of one model and preprocessing")


def region_of_box(box, z0: int, z1: int, spacing_yx, *, margin_mm: float, size: int) -> GlandRegion:
    """The region a person's 3-D box (its in-plane ``box`` in pixel edges, slices ``z0 … z1``) defines: the box grown
    by the zoom cache's margin, as ``encode --zoom`` grows a gland's extent."""
    return GlandRegion(region_around(box, spacing_yx, margin_mm=margin_mm, size=size), int(z0), int(z1))


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
