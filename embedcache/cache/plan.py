"""Phase one's plan and resume bookkeeping: what is done already (in the cache, or as complete
shards of an interrupted run), which cases are still to encode, which of their slices hold a
target label. Reads headers and label volumes only: no torch, no model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from embedcache.cache import store
from embedcache.cache.augment import AUGMENT
from embedcache.cache.records import CaseRecord, Signature
from embedcache.cache.regions import GlandRegion, gland_region, zoom_in
from embedcache.config import EncodeConfig
from embedcache.errors import CacheMismatchError, EmbedcacheError
from embedcache.io.datasets import CaseSource
from embedcache.io.files import PARTIAL, check_writable_folder
from embedcache.io.volumes import check_sources, read_label, source_digest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedCase:
    source: CaseSource
    digest: str
    z: np.ndarray  # canonical slice indices holding a target label
    label_slices: np.ndarray  # (n, y, x) uint8, target labels only (a gland region: (n, size, size), its label)
    region: GlandRegion | None = None  # encode --zoom: the region of the gland source.gland


@dataclass
class Plan:
    """The cases still to encode, those whose cached rows no longer hold (their sources changed), and
    those found done or without a target label."""

    cases: list[PlannedCase] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    resumed: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def slices(self) -> int:
        return sum(len(p.z) for p in self.cases)


def shard_folder(out: Path) -> Path:
    """Where an encode into ``out`` keeps its finished cases until they are merged: ``out.parts/``."""
    return Path(out).with_name(Path(out).name + ".parts")


def target_slices(label, labels: tuple[int, ...], margin: int) -> tuple[np.ndarray, np.ndarray]:
    """The slices holding a target label and the ``margin`` slices beyond them, with their target labels."""
    keep = np.isin(label, labels)
    held = keep.any(axis=(1, 2))
    near = np.convolve(held, np.ones(2 * margin + 1), mode="same") > 0 if held.any() else held
    z = np.flatnonzero(near)
    slices = np.where(keep[z], label[z], 0).astype(np.uint8)
    return z, slices


def gland_name(name: str, label: int) -> str:
    """The case of one gland's zoomed region (``encode --zoom``): ``CASE@LABEL``."""
    return f"{name}@{label}"


def gland_cases(cases: list[CaseSource], labels: tuple[int, ...]) -> list[CaseSource]:
    """``encode --zoom``: each case followed by its target labels present in its label volume, each a case of its own
    (:func:`gland_name`) that encodes the gland's region; augmented copies (``--augment``) stay whole slices alone."""
    out = []
    for case in cases:
        out.append(case)
        if case.subset == AUGMENT:
            continue
        present = set(np.unique(read_label(case.label).array).tolist())
        out += [replace(case, name=gland_name(case.name, label), gland=label) for label in labels if label in present]
    return out


def plan_gland(source: CaseSource, config: EncodeConfig, digest: str, label) -> PlannedCase | None:
    """The region of the gland ``source.gland``: its slices and ``--margin-slices`` beyond each end, the gland's
    label resampled into the region (nearest pixel)."""
    gland = label.array == source.gland
    if not gland.any():
        return None
    where, z, slices = gland_rows(gland, source.gland, label.geometry.spacing_mm[1:], margin_mm=config.zoom_mm,
                                  size=config.preprocess.slice_size, zpad=config.margin_slices)
    return PlannedCase(source=source, digest=digest, z=z, label_slices=slices, region=where)


def gland_rows(gland: np.ndarray, label: int, spacing_yx, *, margin_mm: float, size: int,
               zpad: int) -> tuple[GlandRegion, np.ndarray, np.ndarray]:
    """The rows ``encode --zoom`` caches of one gland (``gland``, a 3-D bool mask, not empty, of label ``label``): its
    region (:func:`~embedcache.cache.regions.gland_region`), the region's slices ``z`` and the gland resampled into
    them (nearest pixel) as label slices."""
    where = gland_region(gland, spacing_yx, margin_mm=margin_mm, size=size, zpad=zpad)
    z = np.arange(where.z0, where.z1 + 1)
    slices = zoom_in(gland[z], where.region, spacing_yx, mask=True).astype(np.uint8) * np.uint8(label)
    return where, z, slices


def plan_case(source: CaseSource, config: EncodeConfig, digest: str) -> PlannedCase | None:
    """Find a case's target slices and their margins (its sources checked by :func:`check_sources`
    already); None (with a warning) when it has none."""
    label = read_label(source.label)
    if source.gland is not None:
        return plan_gland(source, config, digest, label)
    z, slices = target_slices(label.array, config.labels, config.margin_slices)
    if z.size == 0:
        found = sorted(int(v) for v in np.unique(label.array) if v)
        logger.warning(f"{source.label}: holds none of labels {list(config.labels)} (found {found[:12]}); case skipped")
        return None
    return PlannedCase(source=source, digest=digest, z=z, label_slices=slices)


def check_inputs(cases: list[CaseSource], out: Path) -> None:
    """Everything about the inputs and the output that can be checked without the model: one line
    for the first problem, in about a second."""
    if out.is_dir():
        raise EmbedcacheError(f"{out}: is a folder; --out names the cache file, e.g. cache.h5")
    check_writable_folder(out.parent)
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[0]
        raise EmbedcacheError(f"case name {dup} appears twice in the input; give each case a distinct name")
    for case in cases:
        check_sources(case.image, case.label, series_uid=case.series_uid)


def where(case: CaseSource) -> dict:
    """What a cached case records of where its sources are now: its set, its files' absolute paths and
    the DICOM series read."""
    return {"subset": case.subset, "image": os.path.abspath(case.image), "label": os.path.abspath(case.label),
            "series_uid": case.series_uid}


def finished(out: Path, signature: Signature, *, tidy: bool = True) -> tuple[dict[str, CaseRecord], dict[str, tuple[Path, CaseRecord]]]:
    """What is done already: cases in the existing cache, and complete shards of an interrupted run.

    ``tidy`` (one process, or rank 0) also removes what an interrupted run left half-written."""
    done: dict[str, CaseRecord] = {}
    if out.exists():
        try:
            existing = store.open_cache(out, expect=signature)
        except CacheMismatchError:
            raise
        except EmbedcacheError as exc:  # someone's file, or a cache damaged beyond reading: never written over
            why = str(exc).split(": ", 1)[-1].removesuffix("; encode it again")
            raise EmbedcacheError(f"{out}: exists and is not a cache encode can resume ({why}); choose another --out, "
                                  "or delete it if it is a damaged cache") from None
        with existing:
            _same_engine(existing.signature, signature, path=out)
            done = {c.name: c for c in existing.cases}
    shard_dir = shard_folder(out)
    shards: dict[str, tuple[Path, CaseRecord]] = {}
    if shard_dir.exists():
        for leftover in shard_dir.glob("*" + PARTIAL) if tidy else ():
            leftover.unlink()  # a case that was being written when the last run stopped
        for shard in sorted(shard_dir.glob("*.h5")):
            try:
                found, record = store.read_shard(shard)
            except (OSError, KeyError, ValueError):
                if tidy:
                    shard.unlink()
                continue
            try:
                found.check_matches(signature, path=shard)
            except CacheMismatchError as exc:
                raise EmbedcacheError(
                    f"{shard_dir}: holds an interrupted encode with other settings ({exc}); delete the folder or rerun "
                    "with its settings"
                ) from None
            _same_engine(found, signature, path=shard_dir)
            shards[record.name] = (shard, record)
    return done, shards


def existing_signature(out: Path) -> Signature | None:
    """The signature of the cache at ``out``, else of a complete shard of an interrupted encode into it; None where
    there is neither (or neither can be read: :func:`finished` then says why)."""
    if out.is_file():
        try:
            with store.open_cache(out) as existing:
                return existing.signature
        except EmbedcacheError:
            return None
    shard_dir = shard_folder(out)
    for shard in sorted(shard_dir.glob("*.h5")) if shard_dir.is_dir() else ():
        try:
            return store.read_shard(shard)[0]
        except (OSError, KeyError, ValueError, EmbedcacheError):
            continue
    return None


def _same_engine(found: Signature, signature: Signature, *, path: Path) -> None:
    """A cache grows with the engine that began it, so that its signature says what made every row."""
    if found.engine != signature.engine:
        raise EmbedcacheError(f"{path}: was encoded with --engine {found.engine}; add to it with that engine (or "
                              f"--engine auto), or encode with --engine {signature.engine} into a new --out")


def plan_cases(cases: list[CaseSource], config: EncodeConfig, done: dict[str, CaseRecord],
               shards: dict[str, tuple[Path, CaseRecord]]) -> Plan:
    """The cases still to encode, with their target slices, and the cases whose cached rows no longer
    hold (their sources changed), which are dropped from ``done`` and ``shards``."""
    plan = Plan()
    for case in cases:
        digest = source_digest(case.image, case.label)
        cached = [r for r in (done.get(case.name), shards.get(case.name, (None, None))[1]) if r is not None]
        fresh = [r for r in cached if r.digest == digest and r.margin_slices >= config.margin_slices
                 and r.series_uid == case.series_uid]  # the digest covers every series of a DICOM folder
        if fresh:
            plan.resumed += 1
            continue
        # Sources changed since they were encoded: what was cached for them no longer holds.
        if cached:
            plan.dropped.append(case.name)
        done.pop(case.name, None)
        stale = shards.pop(case.name, None)
        if stale:
            stale[0].unlink()
        planned = plan_case(case, config, digest)
        if planned is None:
            plan.skipped.append(case.name)
        else:
            plan.cases.append(planned)
    return plan
