"""Training data from the cache: the case split, the index of box prompts, slices on the device, batches.

A *prompt* here is one (slice, gland) pair with its box; a slice that holds both glands brings two
prompts on the same embedding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from embedcache.cache.store import Cache
from embedcache.model.clicks import SEED_BITS
from embedcache.model.decoder import LOW_RES
from embedcache.model.prompts import box_present, grow_box, jitter_boxes, outward_boxes, union_box
from embedcache.runtime.readahead import ReadAhead


@dataclass(frozen=True)
class PromptIndex:
    """The box prompts of a set of cache rows: prompt ``i`` asks for label slot ``slot[i]`` on local slice
    ``slice_of[i]``, with the cached tight box ``boxes[i]``. Beside it, what the other kinds of training
    prompt (:data:`embedcache.config.TRAIN_PROMPTS`) are drawn from: the gland's in-plane extent over
    all its slices of the case, the tight boxes of the gland on the slices above and below, and the
    slice's pixels per mm."""

    rows: np.ndarray  # (n,) cache rows of the slices; "local slice" k is rows[k]
    slice_of: np.ndarray  # (P,) index into rows
    slot: np.ndarray  # (P,) index into the cache's labels
    boxes: np.ndarray  # (P, 4) x0, y0, x1, y1 in slice pixels
    extent: np.ndarray  # (P, 4) the gland's box over all its slices of the case (the 3-D box, no margin)
    neighbours: np.ndarray  # (P, 2, 4) the gland's tight box on the slice below and above; NaN where it is absent
    px_per_mm: np.ndarray  # (P, 2) slice pixels per mm along x and y
    stop: np.ndarray  # (P,) bool: a stop prompt (a slice just beyond the gland, empty target)

    @classmethod
    def from_cache(cls, cache: Cache, rows: np.ndarray, *, stop_prompts: bool = False, grow_mm: float = 3.0) -> "PromptIndex":
        """The cached boxes of ``rows``, and only the rows that have a prompt.

        ``stop_prompts`` adds what a 3-D box's propagation asks at a gland's ends: the slice just
        beyond the gland (a cached margin slice, or a gap), prompted with the gland's box on the
        neighbouring slice grown by ``grow_mm``, whose target is empty."""
        boxes = cache.read("boxes", slice(None))[rows]  # (n, L, 4)
        z = cache.read("slice_index", slice(None))[rows]
        case_of = cache.read("case_index", slice(None))[rows]
        size = cache.signature.slice_size
        px_per_mm = np.array([(size / (c.spacing_mm[2] * c.shape_zyx[2]), size / (c.spacing_mm[1] * c.shape_zyx[1]))
                              for c in cache.cases], np.float32).reshape(-1, 2)[case_of]  # (n, 2)
        present = box_present(boxes)
        slice_of, slot = np.nonzero(present)
        where = {(int(c), int(k)): i for i, (c, k) in enumerate(zip(case_of, z))}
        neighbours = np.full((len(slice_of), 2, 4), np.nan, np.float32)
        for p, (i, j) in enumerate(zip(slice_of, slot)):
            for side, step in enumerate((-1, 1)):
                other = where.get((int(case_of[i]), int(z[i]) + step))
                if other is not None and present[other, j]:
                    neighbours[p, side] = boxes[other, j]
        prompt_boxes, stop = boxes[slice_of, slot].astype(np.float32), np.zeros(len(slice_of), bool)
        if stop_prompts:
            other, stop_slot, source = _stop_prompts(where, case_of, z, present, boxes)
            grown = [grow_box(b, tuple(grow_mm * px_per_mm[o]), within=(0, 0, size, size)) for o, b in zip(other, source)]
            slice_of, slot = np.concatenate([slice_of, other]), np.concatenate([slot, stop_slot])
            prompt_boxes = np.concatenate([prompt_boxes, np.array(grown, np.float32).reshape(-1, 4)])
            neighbours = np.concatenate([neighbours, np.stack([source, np.full_like(source, np.nan)], axis=1)])
            stop = np.concatenate([stop, np.ones(len(other), bool)])
        extents = {(int(c), int(j)): union_box(boxes[case_of == c, j]) for c in np.unique(case_of) for j in range(boxes.shape[1])}
        extent = np.array([extents[int(case_of[i]), int(j)] for i, j in zip(slice_of, slot)], np.float32).reshape(-1, 4)
        used = np.unique(slice_of)
        local = np.full(len(rows), -1)
        local[used] = np.arange(len(used))
        order = np.lexsort((slot, local[slice_of]))  # grouped by slice, as batches take them
        return cls(rows=rows[used], slice_of=local[slice_of][order], slot=slot[order], boxes=prompt_boxes[order],
                   extent=extent[order], neighbours=neighbours[order], px_per_mm=px_per_mm[slice_of][order],
                   stop=stop[order])

    def of_slices(self, slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The prompts on the given local slices, grouped by slice, and each one's position in ``slices``."""
        groups = [self._by_slice[s] for s in slices]
        if not groups:
            return np.zeros(0, int), np.zeros(0, int)
        return np.concatenate(groups), np.repeat(np.arange(len(slices)), [len(g) for g in groups])

    def count(self, slices: np.ndarray) -> int:
        return int(sum(len(self._by_slice[s]) for s in slices))

    @cached_property  # writes the instance __dict__ directly, so it works on a frozen dataclass
    def _by_slice(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.slice_of == s) for s in range(len(self.rows))]


class SliceData:
    """Embeddings and masks (and, for a refinement head, pixels) of a set of cache rows, on the training device or
    read from HDF5 per batch."""

    def __init__(self, cache: Cache, rows: np.ndarray, *, device: torch.device, resident: bool, pixels: bool = False):
        self.cache, self.rows, self.device, self.resident = cache, rows, device, resident
        self.names = ("embeddings", "masks") + (("pixels",) if pixels else ())
        if resident:
            order = np.argsort(rows)  # h5py reads rows in increasing order
            held = {name: np.empty((len(rows), *getattr(cache, name).shape[1:]), dtype=getattr(cache, name).dtype)
                    for name in self.names}
            for start in range(0, len(rows), 64):
                chunk = order[start : start + 64]
                for name in self.names:
                    held[name][chunk] = cache.read(name, rows[chunk])
            self.held = {name: torch.from_numpy(array).to(device) for name, array in held.items()}
            self.embeddings, self.masks = self.held["embeddings"], self.held["masks"]
            self.pixels = self.held.get("pixels")

    def get(self, slices: np.ndarray) -> tuple[torch.Tensor, ...]:
        """``(n, 256, 64, 64)`` embeddings (stored dtype) and ``(n, size, size)`` uint8 masks of local slices (and
        their ``(n, size, size)`` uint8 pixels, where this holds them)."""
        if self.resident:
            index = torch.from_numpy(slices).to(self.device)
            return tuple(self.held[name][index] for name in self.names)
        rows = self.rows[slices]
        unique, inverse = np.unique(rows, return_inverse=True)
        pin = self.device.type == "cuda"
        out = []
        for name in self.names:
            part = torch.from_numpy(self.cache.read(name, unique))[torch.from_numpy(inverse)]
            out.append((part.pin_memory() if pin else part).to(self.device, non_blocking=pin))
        return tuple(out)


def fits_on_device(n_rows: int, bytes_per_row: int, device: torch.device) -> bool:
    """True when the rows take at most half of the device's free memory (RAM for the CPU)."""
    need = n_rows * bytes_per_row
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return False
    return need <= free // 2


@dataclass
class Batch:
    embeddings: torch.Tensor  # (P, 256, 64, 64): each prompt's slice embedding (repeated per prompt)
    boxes: torch.Tensor  # (P, 4) in encoder-input pixels
    targets: torch.Tensor  # (P, 1, 256, 256) soft targets in [0, 1]
    masks: torch.Tensor  # (P, size, size) bool, full-resolution targets (validation Dice)
    clicks: Clicks | None = None  # finetune --prompts box+points|mixed: the points each prompt carries
    pixels: torch.Tensor | None = None  # (P, size, size) uint8 slice pixels, for a refinement head (finetune --refine-head)
    box_scale: float = 1.0  # slice pixels → encoder-input pixels (``boxes / box_scale``: the boxes on the slice)


@dataclass
class Clicks:
    """How many training clicks each prompt of a batch carries (:func:`embedcache.model.clicks.training_clicks`
    places them on the device): counts and box flags on the host, to group the prompts by, seeds on the device."""

    count: np.ndarray  # (P,) points per prompt, 0..--max-points
    box: np.ndarray  # (P,) bool: the prompt keeps its box (False: points alone)
    seeds: torch.Tensor  # (P,) int64 seeds of the click positions

    def groups(self) -> list[tuple[bool, int, np.ndarray]]:
        """``(box, count, prompts)`` for each kind of prompt in the batch, in a fixed order."""
        keys = sorted({(bool(b), int(c)) for b, c in zip(self.box, self.count)}, key=lambda bc: (not bc[0], bc[1]))
        return [(b, c, np.flatnonzero((self.box == b) & (self.count == c))) for b, c in keys]


@dataclass
class BatchPlan:
    """A batch as the host knows it: which slices, and per prompt its slice's position among them,
    its label id and its box (encoder-input pixels). Building one needs no device."""

    slices: np.ndarray  # (n,) local slice indices
    local: np.ndarray  # (P,) position of each prompt's slice in ``slices``
    label: np.ndarray  # (P,) label ids
    boxes: np.ndarray  # (P, 4) float32, encoder-input pixels
    count: int = 0  # prompts of the whole (all-rank) batch, for the loss weights
    clicks: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (P,) point counts, box flags, seeds


def plan_batch(prompts: PromptIndex, slices: np.ndarray, *, labels: tuple[int, ...], box_scale: float,
               boxes: np.ndarray | None = None, count: int = 0, clicks=None) -> BatchPlan:
    """The prompts of ``slices`` (local indices); ``boxes`` replaces ``prompts.boxes`` (same indexing),
    e.g. with jittered boxes, and ``clicks`` (point counts, box flags, seeds; indexed the same way) gives
    prompts points."""
    which, local = prompts.of_slices(slices)
    boxes = (prompts.boxes if boxes is None else boxes)[which]
    return BatchPlan(slices=np.asarray(slices), local=local, label=np.asarray(labels, np.int64)[prompts.slot[which]],
                     boxes=boxes * box_scale, count=count,
                     clicks=None if clicks is None else tuple(np.asarray(a)[which] for a in clicks))


def draw_clicks(prompts: PromptIndex, which: np.ndarray, *, mode: str, max_points: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point counts, box flags and click seeds of prompts ``which`` under ``mode`` (:data:`embedcache.config.POINT_MODES`).
    A stop prompt (nothing to click on) keeps its box under ``mixed``. Under ``interactive`` every prompt keeps its
    box and has count 1: it runs the rounds (:class:`~embedcache.train.trainer.TrainStep`), its clicks placed there."""
    n = len(which)
    count, box = np.zeros(n, np.int64), np.ones(n, bool)
    if mode == "box+points":
        count = rng.integers(0, max_points + 1, size=n)
    elif mode == "mixed":
        kind = rng.integers(0, 3, size=n)
        count = np.where(kind > 0, rng.integers(1, max_points + 1, size=n), 0)
        box = (kind < 2) | prompts.stop[which]
    elif mode == "interactive":
        count = np.ones(n, np.int64)
    seeds = rng.integers(0, 2**SEED_BITS, size=n)
    return count, box, seeds


def assemble(embeddings: torch.Tensor, masks: torch.Tensor, local: torch.Tensor, label: torch.Tensor,
             boxes: torch.Tensor, *, slice_size: int, clicks: Clicks | None = None, pixels: torch.Tensor | None = None,
             box_scale: float = 1.0) -> Batch:
    """A batch from its slices' ``(n, 256, 64, 64)`` embeddings and ``(n, S, S)`` masks (and pixels) and its prompts'
    device tensors: gathers and a pooling, no host synchronisation."""
    target = masks[local] == label[:, None, None]
    # Loss at the decoder's native 256²: area averaging (2×2 for 512² slices) keeps a one-pixel-wide
    # limb as a half-weight target instead of dropping it, as nearest sampling would.
    if slice_size >= LOW_RES:
        soft = F.adaptive_avg_pool2d(target[:, None].float(), LOW_RES)
    else:
        soft = F.interpolate(target[:, None].float(), size=(LOW_RES, LOW_RES), mode="bilinear", align_corners=False)
    return Batch(embeddings=embeddings[local], boxes=boxes, targets=soft, masks=target, clicks=clicks,
                 pixels=None if pixels is None else pixels[local], box_scale=box_scale)


def fetch_batch(data: SliceData, plan: BatchPlan, *, slice_size: int, box_scale: float = 1.0) -> Batch:
    """One planned batch: its slices read (or gathered) and its prompts copied to the device."""
    emb, masks, *pixels = data.get(plan.slices)
    device = emb.device
    return assemble(emb, masks, torch.from_numpy(plan.local).to(device), torch.from_numpy(plan.label).to(device),
                    torch.from_numpy(plan.boxes).to(device), slice_size=slice_size, clicks=_clicks(plan, device),
                    pixels=pixels[0] if pixels else None, box_scale=box_scale)


def _clicks(plan: BatchPlan, device: torch.device, seeds: torch.Tensor | None = None) -> Clicks | None:
    if plan.clicks is None or not plan.clicks[0].any():
        return None
    count, box, seed = plan.clicks
    return Clicks(count=count, box=box, seeds=seeds if seeds is not None else torch.from_numpy(seed).to(device))


class DeviceBatches:
    """An epoch of planned batches over device-resident slices: every plan's index arrays and boxes go
    to the device in one copy, then each batch is views and gathers there, so the host never waits
    for the device between steps. Yields ``(batch, count)``."""

    def __init__(self, data: SliceData, plans: list[BatchPlan], *, slice_size: int, box_scale: float = 1.0):
        self.data, self.plans, self.slice_size, self.box_scale = data, plans, slice_size, box_scale
        device = data.device

        def flat(key, dtype):
            parts = [getattr(p, key).astype(dtype) for p in plans]
            return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype)).to(device)

        self.slices, self.local, self.label = flat("slices", np.int64), flat("local", np.int64), flat("label", np.int64)
        boxes = [p.boxes.astype(np.float32).reshape(-1, 4) for p in plans]
        self.boxes = torch.from_numpy(np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)).to(device)
        seeds = [p.clicks[2] if p.clicks is not None else np.zeros(len(p.local), np.int64) for p in plans]
        self.seeds = torch.from_numpy(np.concatenate(seeds).astype(np.int64) if seeds else np.zeros(0, np.int64)).to(device)
        self.slice_start = np.cumsum([0] + [len(p.slices) for p in plans])
        self.prompt_start = np.cumsum([0] + [len(p.local) for p in plans])

    def __iter__(self):
        for i, plan in enumerate(self.plans):
            s = slice(int(self.slice_start[i]), int(self.slice_start[i + 1]))
            p = slice(int(self.prompt_start[i]), int(self.prompt_start[i + 1]))
            index = self.slices[s]
            pixels = None if self.data.pixels is None else self.data.pixels[index]
            yield assemble(self.data.embeddings[index], self.data.masks[index], self.local[p], self.label[p],
                           self.boxes[p], slice_size=self.slice_size,
                           clicks=_clicks(plan, self.boxes.device, self.seeds[p]), pixels=pixels,
                           box_scale=self.box_scale), plan.count


def _stop_prompts(where: dict, case_of: np.ndarray, z: np.ndarray, present: np.ndarray, boxes: np.ndarray):
    """(local slice, label slot, the gland's box on the neighbouring slice) of every slice next to a
    gland's slice that lacks the gland; ``where`` maps (case, z) to the local slice."""
    found = []
    for i, j in zip(*np.nonzero(present)):
        for step in (-1, 1):
            other = where.get((int(case_of[i]), int(z[i]) + step))
            if other is not None and not present[other, j]:
                found.append((other, j, boxes[i, j]))
    if not found:
        return np.zeros(0, int), np.zeros(0, int), np.zeros((0, 4), np.float32)
    other, slot, box = zip(*found)
    return np.array(other), np.array(slot), np.array(box, np.float32)


def draw_boxes(prompts: PromptIndex, which: np.ndarray, *, mix: dict[str, float], rng: np.random.Generator,
               jitter: float, loose_margin_mm: float, grow_mm: float, limit: float) -> np.ndarray:
    """Training boxes for prompts ``which``: each draws one kind of :data:`embedcache.config.TRAIN_PROMPTS`
    with ``mix``'s weights. ``loose``: the gland's extent grown by a margin drawn from 0..``loose_margin_mm``;
    ``propagated``: the tight box of a neighbouring slice (either side, drawn) grown by ``grow_mm`` and
    kept inside the loose box, as box3d's walk grows the previous mask's box (``loose`` on a slice with
    no neighbour, where the walk starts); a stop prompt keeps its propagated box under ``tight``,
    ``loose`` and ``propagated`` alike. Boxes in slice pixels, inside ``[0, limit]``."""
    which = np.asarray(which, int)
    kinds = list(mix)
    # draws only what the mix uses, so that plain jitter draws exactly as it always has
    drawn = (rng.choice(len(kinds), size=len(which), p=np.array([mix[k] for k in kinds])) if len(kinds) > 1
             else np.zeros(len(which), int))
    px = prompts.px_per_mm[which]
    margin = np.zeros((len(which), 1), np.float32)
    if "loose" in mix or "propagated" in mix:
        margin = rng.uniform(0.0, loose_margin_mm, size=(len(which), 1)).astype(np.float32)
    side = rng.integers(0, 2, size=len(which)) if "propagated" in mix else np.zeros(len(which), int)
    loose = np.clip(_grown(prompts.extent[which], margin * px), 0.0, limit)
    out = prompts.boxes[which].copy()
    stop = prompts.stop[which]
    for index, kind in enumerate(kinds):
        chosen = drawn == index
        if kind == "jitter" and jitter > 0:
            out[chosen] = jitter_boxes(out[chosen], fraction=jitter, rng=rng, limit=limit)
        elif kind == "medsam":
            out[chosen] = outward_boxes(out[chosen], max_px=20.0 * limit / 1024.0, rng=rng, limit=limit)
        elif kind == "loose":
            out[chosen & ~stop] = loose[chosen & ~stop]
        elif kind == "propagated":
            pairs = prompts.neighbours[which]
            first = pairs[np.arange(len(which)), side]
            other = pairs[np.arange(len(which)), 1 - side]
            source = np.where(box_present(first)[:, None], first, other)
            has = box_present(source) & chosen & ~stop
            grown = _grown(source[has], grow_mm * px[has])
            out[has] = np.concatenate([np.maximum(grown[:, :2], loose[has, :2]), np.minimum(grown[:, 2:], loose[has, 2:])], axis=1)
            alone = chosen & ~stop & ~box_present(source)
            out[alone] = loose[alone]
    return out


def _grown(boxes: np.ndarray, grow_xy: np.ndarray) -> np.ndarray:
    """``(k, 4)`` boxes grown by ``(k, 2)`` = (x, y) pixels on every side."""
    grow = np.concatenate([grow_xy, grow_xy], axis=1) * np.array([-1, -1, 1, 1], np.float32)
    return (boxes + grow).astype(np.float32)


@dataclass
class CaseSet:
    """One side of the split: its cases' slices and box prompts, ready to batch on the device."""

    names: list[str]
    prompts: PromptIndex
    slices: SliceData
    labels: tuple[int, ...]
    box_scale: float  # slice pixels → encoder-input pixels
    slice_size: int

    def __len__(self) -> int:
        return len(self.prompts.rows)

    def plan(self, slices: np.ndarray, boxes: np.ndarray | None = None, count: int = 0, clicks=None) -> BatchPlan:
        """The batch of local ``slices``; ``boxes`` (indexed as ``prompts.boxes``) replaces the cached boxes,
        ``clicks`` (:func:`draw_clicks`'s arrays, indexed the same way) gives prompts points."""
        return plan_batch(self.prompts, slices, labels=self.labels, box_scale=self.box_scale, boxes=boxes, count=count,
                          clicks=clicks)

    def batch(self, slices: np.ndarray, boxes: np.ndarray | None = None) -> Batch:  # benchmarks/epoch.py
        """The prompts of local ``slices`` on the device; ``boxes`` as for :meth:`plan`."""
        return fetch_batch(self.slices, self.plan(slices, boxes), slice_size=self.slice_size, box_scale=self.box_scale)

    def batches(self, plans: list[BatchPlan]):
        """``(batch, count)`` for each plan: gathered on the device when the slices live there (one copy
        per epoch), else read from HDF5 a few batches ahead in a thread."""
        if self.slices.resident:
            return DeviceBatches(self.slices, plans, slice_size=self.slice_size, box_scale=self.box_scale)
        return ReadAhead(lambda plan: (fetch_batch(self.slices, plan, slice_size=self.slice_size,
                                                   box_scale=self.box_scale), plan.count), plans, depth=3)


def case_sets(cache: Cache, names: dict[str, list[str]], *, box_scale: float, device: torch.device,
              resident: str = "auto", stop_prompts: tuple[str, ...] = (), stop_grow_mm: float = 3.0,
              pixels: bool = False) -> dict[str, CaseSet]:
    """A :class:`CaseSet` per named list of cases, holding the slices that have prompts (the sets named
    in ``stop_prompts`` also get :meth:`PromptIndex.from_cache`'s stop prompts). ``resident``:
    ``device`` keeps every set's embeddings on the device, ``stream`` reads them from HDF5 per batch,
    ``auto`` the former when all sets together take at most half of the device's free memory. ``pixels``: the
    slices' pixels too (a refinement head's input)."""
    all_rows = {key: np.concatenate([cache.case(n).row_index for n in group]) if group else np.zeros(0, int)
                for key, group in names.items()}
    prompts = {key: PromptIndex.from_cache(cache, rows, stop_prompts=key in stop_prompts, grow_mm=stop_grow_mm)
               for key, rows in all_rows.items()}
    slice_size = cache.signature.slice_size
    bytes_per_row = int(np.prod(cache.embeddings.shape[1:])) * cache.embeddings.dtype.itemsize + slice_size**2 * (1 + pixels)
    on_device = resident == "device" or (
        resident == "auto" and fits_on_device(sum(len(p.rows) for p in prompts.values()), bytes_per_row, device)
    )
    return {
        key: CaseSet(
            names=list(names[key]), prompts=prompts[key],
            slices=SliceData(cache, prompts[key].rows, device=device, resident=on_device, pixels=pixels),
            labels=cache.labels, box_scale=box_scale, slice_size=slice_size,
        )
        for key in names
    }
