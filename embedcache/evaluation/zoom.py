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
from embedcache.evaluation.protocols import Prediction
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


class BothViews:
    """The :class:`~embedcache.evaluation.protocols.Segment` of one gland seen twice: each prompt (its box and clicks,
    on the slice grid) decoded by ``whole`` (the whole-slice :class:`~embedcache.evaluation.segmenter.Segmenter`)
    and, on the region's slices ``where.z0 … where.z1``, mapped into the region and decoded by ``zoomed``; the two
    logits averaged on the slice grid (weighed by ``weights``, ``(whole, zoomed)``) and thresholded at 0. Beyond the
    region's slices the whole slice alone decides. The predicted IoU is the views' mean. ``shape_yx``: the slices'
    ``(height, width)``."""

    def __init__(self, whole, zoomed, where: GlandRegion, spacing_yx, shape_yx, *,
                 weights: tuple[float, float] = (1.0, 1.0)):
        self.whole, self.zoomed, self.where, self.weights = whole, zoomed, where, weights
        self.shape_yx = tuple(int(n) for n in shape_yx)
        self.spacing_yx = tuple(float(s) for s in spacing_yx)

    @property
    def feeds_back(self) -> bool:
        """Whether both decoders take their previous logits back as the mask prompt (both fine-tuned with
        ``--prompts interactive``): then each prompt's low-resolution logits come back packed, ``(2, 256, 256)``,
        the whole slice's then the region's (zeros beyond the region's slices), and are given back so."""
        return bool(getattr(self.whole, "feeds_back", False) and getattr(self.zoomed, "feeds_back", False))

    def __call__(self, zs, boxes, *, multimask: bool = False, points=None, previous=None, low_res: bool = False):
        if (low_res or previous is not None) and not self.feeds_back:  # a caller's bug: protocols ask feeds_back
            raise ValueError("BothViews of decoders that do not both take their logits back")
        zs, boxes = np.asarray(zs), np.asarray(boxes, np.float32)
        previous = None if previous is None else np.asarray(previous, np.float32)  # (k, 2, 256, 256)
        low = [None, None]
        height, width = self.shape_yx
        inside = (zs >= self.where.z0) & (zs <= self.where.z1)
        kept = self.weights[0] or not inside.all()
        mean = np.zeros((len(zs), height, width), np.float32)
        iou = np.zeros(len(zs), np.float32)
        if kept:  # the whole slice speaks on every slice beyond the region, and within it unless weighed 0
            values, whole_iou, low[0] = self._logits(self.whole, zs, boxes, points, multimask, (height, width),
                                                     None if previous is None else previous[:, 0])
            mean += np.where(inside[:, None, None], self.weights[0], 1.0) * values
            iou += np.where(inside, self.weights[0], 1.0) * whole_iou
        if self.weights[1] and inside.any():
            region, size = self.where.region, self.where.region.size
            sub = np.flatnonzero(inside)
            mapped = np.array([box_to_region(b, region, self.spacing_yx) for b in boxes[sub]], np.float32)
            clicks = None if points is None else [None if points[i] is None else self._into_region(points[i])
                                                  for i in sub]
            values, zoomed_iou, low[1] = self._logits(self.zoomed, zs[sub], mapped, clicks, multimask, (size, size),
                                                      None if previous is None else previous[sub, 1])
            mean[sub] += self.weights[1] * zoom_out_values(values, region, self.spacing_yx, (height, width),
                                                           fill=OUTSIDE)
            iou[sub] += self.weights[1] * zoomed_iou
        weight = np.where(inside, self.weights[0] + self.weights[1], 1.0)
        if not low_res:
            return mean > 0, iou / weight
        size = next(x for x in low if x is not None).shape[-2:]
        packed = np.zeros((len(zs), 2, *size), np.float32)
        if low[0] is not None:
            packed[:, 0] = low[0]
        if low[1] is not None:
            packed[np.flatnonzero(inside), 1] = low[1]
        return mean > 0, iou / weight, packed

    def _into_region(self, points) -> np.ndarray:
        """``(n, 3)`` clicks ``(x, y, label)`` on the slice grid → the region's."""
        points = np.array(points, np.float32, copy=True)
        u, v = self.where.region.to_region(points[:, 0], points[:, 1], self.spacing_yx)
        points[:, 0], points[:, 1] = u, v
        return points

    def ahead(self, zs: list[int]) -> None:
        self.whole.ahead(zs)
        self.zoomed.ahead([z for z in zs if self.where.z0 <= z <= self.where.z1])

    @staticmethod
    def _logits(segment, zs, boxes, points, multimask, shape, previous) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``segment``'s logits of each prompt on the ``shape`` grid (its own slice's or region's), its IoU and its
        low-resolution logits (``previous``: the ones it gave last time, as the mask prompt)."""
        kwargs = {"points": points} if points is not None else {}
        if previous is not None:
            kwargs["previous"] = previous
        logits, iou, low = segment(zs, boxes, multimask=multimask, low_res=True, grid_logits=True, **kwargs)
        if tuple(logits.shape[1:]) != tuple(shape):  # a caller's bug: each segmenter draws on its own grid
            raise ValueError(f"logits on {tuple(logits.shape[1:])}, not {tuple(shape)}")
        return np.asarray(logits, np.float32), np.asarray(iou, np.float32), np.asarray(low, np.float32)


def redraw(mask_zyx: np.ndarray, whole, zoomed, where: GlandRegion, spacing_yx, *, grow_mm: float = GROW_MM,
           weights: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """``mask_zyx`` (the first pass's bool mask of one gland) with each of its slices inside the region's slices
    ``where.z0 … where.z1`` drawn again: the box around the slice's mask grown by ``grow_mm`` decoded by
    :class:`BothViews` of ``whole`` (the whole-slice :class:`~embedcache.evaluation.segmenter.Segmenter`) and
    ``zoomed`` (the region's, whose slice ``z`` is the volume's slice ``z`` zoomed). Empty slices and slices beyond
    the region keep the first pass. ``weights`` weigh the whole-slice and the zoomed logits (a view weighed 0 is not
    decoded: ``(0, 1)`` is the zoomed view alone)."""
    both = BothViews(whole, zoomed, where, spacing_yx, np.shape(mask_zyx)[1:], weights=weights)
    return _redraw(mask_zyx, both, grow_mm=grow_mm)[0]


def redraw_prediction(first: Prediction, both: BothViews, *, grow_mm: float = GROW_MM) -> Prediction:
    """``first`` (a protocol's or predict's prediction of one gland) drawn again through ``both`` as :func:`redraw`
    draws its mask; each slice drawn again records the box both views were given and their mean predicted IoU, so a
    click there is decoded again from the prompt that drew it, and, where ``both`` feeds back, both views' logits.
    Its clicks stay; the whole slice's own logits go (a mask prompt of one view only)."""
    mask, zs, boxes, iou, low = _redraw(first.mask, both, grow_mm=grow_mm)
    out = Prediction(mask, dict(first.boxes), dict(first.iou), list(first.clicks))
    for i, z in enumerate(zs):
        out.boxes[z], out.iou[z] = tuple(float(v) for v in boxes[i]), float(iou[i])
        if low is not None:
            out.logits[z] = low[i].astype(np.float16)
    return out


def _redraw(mask_zyx, both: BothViews, *, grow_mm: float):
    """:func:`redraw`'s mask, and the slices it drew again with each one's box, predicted IoU and (where both views
    feed back) packed logits."""
    out = np.array(mask_zyx, bool, copy=True)
    height, width = out.shape[1:]
    where, spacing_yx = both.where, both.spacing_yx
    zs = [z for z in range(where.z0, min(where.z1, len(out) - 1) + 1) if out[z].any()]
    if not zs:
        return out, [], np.zeros((0, 4), np.float32), np.zeros(0, np.float32), None
    grow = (grow_mm / spacing_yx[1], grow_mm / spacing_yx[0])
    boxes = np.array([grow_box(box_from_mask(out[z]), grow, within=(0, 0, width, height)) for z in zs], np.float32)
    if both.weights[1] and hasattr(both.zoomed, "ahead"):  # a region encoded on the fly starts on the slices it draws
        both.zoomed.ahead(zs)
    masks, iou, *low = both(np.array(zs), boxes, low_res=both.feeds_back)
    for i, z in enumerate(zs):
        out[z] = masks[i]
    return out, zs, boxes, iou, (low[0] if low else None)
