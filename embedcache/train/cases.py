"""Which case belongs to which set: the split a fine-tune trains and validates on, split files, and
the set ``score`` reports on. The one home of these decisions; no torch here.

Each case belongs to one set: ``train``, ``val`` (chooses the checkpoint) or ``test`` (never seen in
training: the cache's ``imagesTs/`` cases, or a split file's ``test``). The augmented copies of a
case (``encode --augment``) follow it into training only: never into a split, ``val``, ``test`` or a
scored set (:func:`augmented_of`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedcache.cache.augment import source_of
from embedcache.cache.store import Cache
from embedcache.errors import EmbedcacheError, UsageError
from embedcache.io.files import read_json


@dataclass(frozen=True)
class Split:
    """A fine-tune's cases by set; ``test`` is None where a run's ``split.json`` does not record it."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...] | None = ()

    def to_dict(self) -> dict:
        return {"train": list(self.train), "val": list(self.val),
                **({"test": list(self.test)} if self.test is not None else {})}


def split_cases(names: list[str], *, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split by case (patient): no case on both sides, at least one on each."""
    if len(names) < 2:
        raise EmbedcacheError(f"the cache holds {len(names)} case(s); a train/validation split needs at least 2")
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = min(max(1, round(len(names) * val_fraction)), len(names) - 1)
    val = sorted(names[i] for i in order[:n_val])
    return sorted(n for n in names if n not in val), val


#: What ``finetune`` writes into ``RUN_DIR/split.json`` beside the three sets (the seed and the split file it took).
RUN_SPLIT_EXTRAS = ("seed", "split_file")


def load_split(path: Path, cache: Cache) -> Split:
    """A split file (``{"train": [...], "val": [...], "test": [...]}``, as nnU-Net's ``splits_final.json``
    holds per fold), checked against the cache: every case known, none in two sets, no test case of
    the cache (``imagesTs/``) in train or val."""
    path = Path(path)
    split = read_json(path)
    if isinstance(split, list):
        raise EmbedcacheError(f"{path}: holds {len(split)} folds (nnU-Net's splits_final.json); save the fold to train "
                              'on as its own file {"train": [...], "val": [...]}')
    if isinstance(split, dict):  # a run's own RUN_DIR/split.json also records how it was made: train another on it
        split = {k: v for k, v in split.items() if k not in RUN_SPLIT_EXTRAS}
    if not isinstance(split, dict) or not {"train", "val"} <= set(split) or set(split) - {"train", "val", "test"} \
            or not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in split.values()):
        raise EmbedcacheError(f'{path}: expected {{"train": [case names], "val": [...], "test": [...]}} (test optional)')
    known = {c.name: c for c in cache.cases}
    glands = glands_of(cache)  # a split may name the source cases, as the whole-slice run's does: each brings its glands
    split = {key: [g for name in names for g in ([name] if name in known else []) + glands.get(name, [])
                   or [name]] for key, names in split.items()}
    seen: dict[str, str] = {}
    for key in ("train", "val", "test"):
        for name in split.get(key, []):
            if name not in known:
                raise EmbedcacheError(f"{path}: case {name} ({key}) is not in {cache.path}; encode it or remove it")
            if name in seen:
                raise EmbedcacheError(f"{path}: case {name} is in both {seen[name]} and {key}; put each case in one set")
            if known[name].subset == "augment":
                raise EmbedcacheError(f"{path}: case {name} is an augmented copy (encode --augment); name its source "
                                      "case: its copies train with it, and never validate or test")
            if key != "test" and known[name].subset == "test":
                raise EmbedcacheError(f"{path}: case {name} is a test case of the cache (imagesTs/); it may not be "
                                      f"trained on: move it to test")
            seen[name] = key
    if not split["train"] or not split["val"]:
        raise EmbedcacheError(f"{path}: train and val need at least one case each")
    return Split(tuple(split["train"]), tuple(split["val"]), tuple(split.get("test", [])))


def choose_split(cache: Cache, *, split_file: str | None, val_fraction: float, seed: int) -> Split:
    """Train, validation and test cases: the split file's, or the cache's test cases (``imagesTs/``)
    held out and the rest split by patient, seeded."""
    if split_file:
        return load_split(Path(split_file), cache)
    test = [c.name for c in cache.cases if c.subset == "test"]
    names = [c.name for c in cache.cases if c.n_rows > 0 and c.subset == "train"]
    glands = glands_of(cache)
    if glands:  # glands' regions (encode --zoom): split by source case (patient), its whole slices with its glands
        members = {g for gs in glands.values() for g in gs}
        groups = {name: [name] for name in names if name not in members}
        for source, members in glands.items():
            groups.setdefault(source, []).extend(g for g in members if g in names)
        sources = sorted(source for source, members in groups.items() if members)
        train, val = split_cases(sources, val_fraction=val_fraction, seed=seed)
        train, val = ([g for s in side for g in groups[s]] for side in (train, val))
    else:
        train, val = split_cases(names, val_fraction=val_fraction, seed=seed)
    return Split(tuple(train), tuple(val), tuple(test))


def glands_of(cache: Cache) -> dict[str, list[str]]:
    """Each source case → its glands' region cases (``encode --zoom``); empty for a cache of whole slices only."""
    out: dict[str, list[str]] = {}
    for case in cache.cases:
        if case.region is not None:
            out.setdefault(case.region["source"], []).append(case.name)
    return out


def view_split(split: Split, cache: Cache, view: str) -> Split:
    """``split`` cut to one view of a cache that holds both: its ``whole``-slice cases, or its glands' ``regions``
    (``CASE@LABEL``; a whole-slice case of ``split`` brings its glands, as a resumed run's own split names only
    those); each set keeps its patients."""
    regions, glands = {c.name for c in cache.cases if c.region is not None}, glands_of(cache)

    def keep(names) -> tuple[str, ...]:
        if view == "whole":
            return tuple(n for n in names if n not in regions)
        return tuple(dict.fromkeys(g for n in names for g in ([n] if n in regions else glands.get(n, []))))

    cut = Split(keep(split.train), keep(split.val), None if split.test is None else keep(split.test))
    if not cut.train or not cut.val:
        side = "train" if not cut.train else "val"
        raise EmbedcacheError(f"{cache.path}: the split's {side} cases hold no {view}; each needs cases of both views "
                              "(encode --zoom encodes them together)")
    return cut


def augmented_of(cache: Cache, train: tuple[str, ...]) -> list[str]:
    """The augmented copies (set ``augment``) of the ``train`` cases: what a fine-tune adds to its training
    set, and nowhere else."""
    chosen = set(train)
    return [c.name for c in cache.cases if c.subset == "augment" and c.n_rows > 0 and source_of(c.name)[0] in chosen]


def check_split_in_cache(split: Split, cache: Cache, *, run: Path) -> Split:
    """A resumed run's own split, if ``cache`` holds its training and validation cases."""
    known = {c.name for c in cache.cases}
    missing = [n for n in split.train + split.val if n not in known]
    if missing:
        raise EmbedcacheError(f"{cache.path}: not the data the run in {run} was trained on (it lacks case "
                              f"{missing[0]}); resume with the run's cache or start a new run")
    return split


@dataclass(frozen=True)
class ScoredCases:
    """The set ``score`` reports on, its cases, and a sentence on what it is worth."""

    set: str
    names: tuple[str, ...]
    note: str


def choose_cases(cache: Cache, split: Split | None, wanted: str | None) -> ScoredCases:
    """The case set to score: by default the held-out test cases (the run's split, or the cache's
    ``imagesTs/`` cases), else the validation cases, which chose the checkpoint, else every case
    (``wanted``: one of :data:`~embedcache.config.CASE_SETS`, or None)."""
    whole = "whole" in cache.signature.views  # then the glands' regions are drawn in, not scored as cases of their own
    encoded = [c.name for c in cache.cases if c.n_rows > 0 and c.subset != "augment"  # copies are never scored
               and not (whole and c.region is not None)]
    test = split.test if split and split.test is not None else [c.name for c in cache.cases if c.subset == "test"]
    sets = {"test": test, "all": encoded}
    if split:
        sets.update(train=split.train, val=split.val)
    if wanted is None:
        wanted = "test" if [n for n in test if n in encoded] else ("val" if split else "all")
    if wanted not in sets:
        raise UsageError(f"--cases {wanted} needs --run RUN_DIR (its split.json); or use --cases test or all")
    names = tuple(n for n in encoded if n in sets[wanted])
    if not names:
        raise EmbedcacheError(f"{cache.path}: no {wanted} cases to score; encode a test set (imagesTs/) or choose --cases")
    notes = {
        "test": "held out: no training or checkpoint choice saw them",
        "val": "these validation cases chose the checkpoint (best validation Dice): an optimistic estimate",
        "train": "the decoder was trained on these cases: not an estimate of accuracy on new scans",
        "all": "every case in the cache, the training cases included" if split else
               "every case in the cache; none is marked as held out (no imagesTs/ cases)",
    }
    return ScoredCases(wanted, names, notes[wanted])
