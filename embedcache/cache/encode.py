"""Phase one: run the frozen image encoder once per target slice and store the embeddings.

Read top to bottom:
1. check the inputs (files, headers, voxels, geometry) and the output folder: a second, before
   torch is imported or the checkpoint hashed;
2. settle the signature (backbone, checkpoint sha256, preprocessing, labels);
3. plan: which cases are already done (in the cache or as complete shards), which slices of the
   rest hold a target label;
4. a reader (a thread, or worker processes on CUDA) loads and preprocesses case after case; the
   main thread launches batches on the encoder (inference mode, fp16 autocast on CUDA); on CUDA a
   writer thread takes their embeddings into each case's shard and writes out the complete ones
   while the next batches encode (on the CPU the main thread does, between encoder calls);
5. merge the cache and the new shards into one file, atomically, and drop the shards.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np

from embedcache.cache import store as cache
from embedcache.cache.store import CaseRecord, ShardWriter, row_bytes
from embedcache.config import EncodeConfig
from embedcache.errors import CacheMismatchError, EmbedcacheError
from embedcache.io.files import PARTIAL, WRITE_ERRNOS, check_free_space, check_writable_folder, write_error
from embedcache.cache.preprocess import resize_mask, slice_to_model
from embedcache.model.prompts import boxes_for_labels
from embedcache.runtime.readahead import ReadAhead, WriteBehind
from embedcache.io.datasets import CaseSource
from embedcache.io.volumes import check_sources, read_image, read_label, source_digest


@dataclass(frozen=True)
class PlannedCase:
    source: CaseSource
    digest: str
    z: np.ndarray  # canonical slice indices holding a target label
    label_slices: np.ndarray  # (n, y, x) uint8, target labels only


@dataclass
class EncodeSummary:
    out: Path
    cases_total: int = 0
    cases_encoded: int = 0
    cases_resumed: int = 0
    cases_skipped: list[str] = field(default_factory=list)
    slices_encoded: int = 0
    slices_total: int = 0
    encode_seconds: float = 0.0
    device: str = "cpu"
    # Where the encode loop's time went, to tell which stage sets the pace: the main thread waiting
    # for prepared slices; the writer thread waiting for the encoder's results, and writing.
    input_wait_s: float = 0.0
    encoder_wait_s: float = 0.0
    writing_s: float = 0.0
    merge_s: float = 0.0

    @property
    def slices_per_s(self) -> float:
        return self.slices_encoded / self.encode_seconds if self.encode_seconds > 0 else 0.0


def _signature(config: EncodeConfig, checkpoint_sha256: str) -> dict:
    from embedcache.model.backbones import get_backbone

    backbone = get_backbone(config.backbone)
    return cache.make_signature(
        backbone=backbone.name,
        checkpoint_sha256=checkpoint_sha256,
        input_size=backbone.input_size,
        preprocess=asdict(config.preprocess),
        labels=config.labels,
        embedding_dtype=config.embedding_dtype,
    )


def signature_for(config: EncodeConfig) -> dict:
    """The signature a cache encoded with ``config`` carries (reads the checkpoint to hash it)."""
    from embedcache.model.backbones import file_sha256, get_backbone, resolve_checkpoint

    backbone = get_backbone(config.backbone)
    checkpoint = resolve_checkpoint(backbone, Path(config.checkpoint) if config.checkpoint else None)
    return _signature(config, file_sha256(checkpoint))


def shard_folder(out: Path) -> Path:
    """Where an encode into ``out`` keeps its finished cases until they are merged: ``out.parts/``."""
    return Path(out).with_name(Path(out).name + ".parts")


def _target_slices(label, labels: tuple[int, ...], margin: int) -> tuple[np.ndarray, np.ndarray]:
    """The slices holding a target label and the ``margin`` slices beyond them, with their target labels."""
    keep = np.isin(label, labels)
    held = keep.any(axis=(1, 2))
    near = np.convolve(held, np.ones(2 * margin + 1), mode="same") > 0 if held.any() else held
    z = np.flatnonzero(near)
    slices = np.where(keep[z], label[z], 0).astype(np.uint8)
    return z, slices


def plan_case(source: CaseSource, config: EncodeConfig, digest: str) -> PlannedCase | None:
    """Find a case's target slices and their margins (its sources checked by :func:`check_sources`
    already); None (with a warning) when it has none."""
    label = read_label(source.label)
    z, slices = _target_slices(label.array, config.labels, config.margin_slices)
    if z.size == 0:
        found = sorted(int(v) for v in np.unique(label.array) if v)
        warnings.warn(
            f"{source.label}: holds none of labels {list(config.labels)} (found {found[:12]}); case skipped",
            stacklevel=2,
        )
        return None
    return PlannedCase(source=source, digest=digest, z=z, label_slices=slices)


@dataclass(frozen=True)
class _CaseBatch:
    """One case, preprocessed: what the encoder and the shard need."""

    plan: PlannedCase
    record: CaseRecord
    images: np.ndarray  # (n, S, S) float32 in [0, 1]
    masks: np.ndarray  # (n, S, S) uint8
    boxes: np.ndarray  # (n, L, 4)
    slice_index: np.ndarray  # (n,)


def prepare_case(plan: PlannedCase, config: EncodeConfig) -> _CaseBatch:
    """Read a planned case's image and turn its planned slices into model-ready slices, masks and boxes.

    Margin slices, and slices whose gland (a voxel or two) vanished when resampled, get no box."""
    size = config.preprocess.slice_size
    image = read_image(plan.source.image, series_uid=plan.source.series_uid)
    pre = config.preprocess
    masks = resize_mask(plan.label_slices, (size, size))
    boxes = np.stack([boxes_for_labels(m, config.labels) for m in masks])
    z = plan.z
    images = np.stack(
        [slice_to_model(image.array[k], width_hu=pre.window_width_hu, level_hu=pre.window_level_hu, slice_size=size) for k in z]
    ) if z.size else np.zeros((0, size, size), np.float32)
    geometry = image.geometry
    record = CaseRecord(
        name=plan.source.name,
        digest=plan.digest,
        first_row=0,
        n_rows=int(z.size),
        shape_zyx=tuple(int(s) for s in geometry.shape_zyx),
        spacing_mm=tuple(float(s) for s in geometry.spacing_mm),
        source_shape=tuple(int(s) for s in geometry.source_shape),
        source_affine=tuple(tuple(float(v) for v in row) for row in geometry.source_affine),
        margin_slices=config.margin_slices,
        **_where(plan.source),  # absolute paths: score finds the sources from any working folder
    )
    return _CaseBatch(plan=plan, record=record, images=images, masks=masks, boxes=boxes, slice_index=z)


def load_encoder(config: EncodeConfig, *, device):
    """The image encoder ``config`` names, with its weights, on ``device`` (an :class:`ImageEncoder`)."""
    import torch

    from embedcache.model.backbones import get_backbone, load_backbone
    from embedcache.model.encoder import ImageEncoder

    backbone = get_backbone(config.backbone)
    parts, _ = load_backbone(backbone, Path(config.checkpoint) if config.checkpoint else None)
    out_dtype = torch.float16 if config.embedding_dtype == "float16" else torch.float32
    return ImageEncoder(backbone, parts.image_encoder, device=device, batch_size=config.batch_size, out_dtype=out_dtype)


def encode(
    cases: list[CaseSource],
    out: Path,
    config: EncodeConfig,
    *,
    progress=None,
    log=print,
) -> EncodeSummary:
    """Encode ``cases`` into the cache ``out``, resuming from whatever an earlier run completed.

    Under ``torchrun`` each rank encodes its share of the cases (every K-th) into the shards that
    resume uses, and rank 0 merges them: the same cache as one process. ``progress`` is a
    :class:`rich.progress.Progress` (or None for silence); ``log`` takes one-line notes.
    """
    from embedcache.runtime.devices import pick_device
    from embedcache.runtime.distributed import Dist

    out = Path(out)
    check_inputs(cases, out)
    signature = signature_for(config)
    dist = Dist(config.device)
    summary = EncodeSummary(out=out, cases_total=len(cases))
    done, shards = _finished(out, signature, tidy=dist.main)
    plans, dropped = _plan(cases[dist.rank :: dist.world], config, done, shards, summary, log)
    size = row_bytes(embedding_dtype=config.embedding_dtype, slice_size=config.preprocess.slice_size)
    all_rows = summary.slices_total + sum(r.n_rows for r in done.values()) + sum(r.n_rows for _, r in shards.values())
    check_free_space(out.parent, (summary.slices_total + all_rows) * size, what="encoding (shards and the merged cache)")

    shard_dir = shard_folder(out)
    if plans:
        shard_dir.mkdir(exist_ok=True)
        device = pick_device(dist.device_name)
        summary.device = str(device)
        encoder = load_encoder(config, device=device)
        started = time.perf_counter()
        for record in _encode_plans(plans, config, encoder, shard_dir, signature, progress, row_size=size,
                                    summary=summary):
            shards[record.name] = (shard_dir / f"{record.name}.h5", record)
            summary.cases_encoded += 1
            summary.slices_encoded += record.n_rows
        summary.encode_seconds = time.perf_counter() - started
    if dist.world > 1:  # every rank's shards are on disk: rank 0 merges them all
        summary, dropped = _gather(dist, summary, dropped)
        if not dist.main:
            dist.barrier()  # returns once the merged cache exists
            return summary
        done, shards = _finished(out, signature, tidy=False)
        for name in dropped:
            done.pop(name, None)

    # One cache file, cases in input order; cases cached earlier but not in this input are kept, last.
    # A case moved between imagesTr/ and imagesTs/ keeps its embeddings and takes its new set; one
    # whose files moved (same bytes) takes their new paths, where score will look for them.
    names = [c.name for c in cases]
    now = {c.name: _where(c) for c in cases}
    sources: list[tuple[Path, list[CaseRecord]]] = []
    for name in names + [n for n in {**done, **shards} if n not in set(names)]:
        source, record = shards[name] if name in shards else (out, done[name]) if name in done else (None, None)
        if record is not None:
            sources.append((source, [replace(record, **now.get(name, {}))]))
    regrouped = any(replace(record, **now.get(name, {})) != record for name, record in done.items())
    if shards or regrouped or dropped or not out.exists():
        if not any(cases for _, cases in sources):
            raise EmbedcacheError(
                f"no slice holds any of labels {list(config.labels)} in the {len(cases)} given case(s); "
                "check --labels against the label files"
            )
        total = sum(r.n_rows for _, records in sources for r in records)
        check_free_space(out.parent, total * size, what="the merged cache")
        started = time.perf_counter()
        try:
            cache.merge(out, signature=signature, sources=sources, slice_size=config.preprocess.slice_size)
        except OSError as exc:
            raise write_error(exc, out, needed=total * size) from None
        summary.merge_s = time.perf_counter() - started
    cache.remove_tree(shard_dir)
    dist.barrier()
    return summary


def _where(case: CaseSource) -> dict:
    """What a cached case records of where its sources are now: its set, its files' absolute paths and
    the DICOM series read."""
    return {"subset": case.subset, "image": os.path.abspath(case.image), "label": os.path.abspath(case.label),
            "series_uid": case.series_uid}


def _gather(dist, summary: EncodeSummary, dropped: list[str]) -> tuple[EncodeSummary, list[str]]:
    """Every rank's counts added up, and every rank's dropped cases, on every rank (a collective: it
    returns once every rank has encoded its share)."""
    import torch.distributed

    parts: list = [None] * dist.world
    torch.distributed.all_gather_object(parts, (summary, dropped))
    total = EncodeSummary(out=summary.out, cases_total=summary.cases_total, device=summary.device)
    for part, _ in parts:
        total.cases_encoded += part.cases_encoded
        total.cases_resumed += part.cases_resumed
        total.cases_skipped += part.cases_skipped
        total.slices_encoded += part.slices_encoded
        total.slices_total += part.slices_total
        for name in ("encode_seconds", "input_wait_s", "encoder_wait_s", "writing_s"):  # the slowest rank's
            setattr(total, name, max(getattr(total, name), getattr(part, name)))
    return total, [name for _, names in parts for name in names]


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


def _finished(out: Path, signature: dict, *, tidy: bool = True) -> tuple[dict[str, CaseRecord], dict[str, tuple[Path, CaseRecord]]]:
    """What is done already: cases in the existing cache, and complete shards of an interrupted run.

    ``tidy`` (one process, or rank 0) also removes what an interrupted run left half-written."""
    done: dict[str, CaseRecord] = {}
    if out.exists():
        with cache.open_cache(out, expect=signature) as existing:
            done = {c.name: c for c in existing.cases}
    shard_dir = shard_folder(out)
    shards: dict[str, tuple[Path, CaseRecord]] = {}
    if shard_dir.exists():
        for leftover in shard_dir.glob("*" + PARTIAL) if tidy else ():
            leftover.unlink()  # a case that was being written when the last run stopped
        for shard in sorted(shard_dir.glob("*.h5")):
            try:
                found, record = cache.read_shard(shard)
            except (OSError, KeyError, ValueError):
                if tidy:
                    shard.unlink()
                continue
            try:
                cache.check_signature(found, signature, path=shard)
            except CacheMismatchError as exc:
                raise EmbedcacheError(
                    f"{shard_dir}: holds an interrupted encode with other settings ({exc}); delete the folder or rerun "
                    "with its settings"
                ) from None
            shards[record.name] = (shard, record)
    return done, shards


def _plan(cases, config, done, shards, summary: EncodeSummary, log) -> tuple[list[PlannedCase], list[str]]:
    """The cases still to encode, with their target slices, and the cases whose cached rows no longer
    hold (their sources changed), which are dropped from ``done`` and ``shards``."""
    plans: list[PlannedCase] = []
    dropped: list[str] = []
    for case in cases:
        digest = source_digest(case.image, case.label)
        cached = [r for r in (done.get(case.name), shards.get(case.name, (None, None))[1]) if r is not None]
        fresh = [r for r in cached if r.digest == digest and r.margin_slices >= config.margin_slices
                 and r.series_uid == case.series_uid]  # the digest covers every series of a DICOM folder
        if fresh:
            summary.cases_resumed += 1
            continue
        # Sources changed since they were encoded: what was cached for them no longer holds.
        if cached:
            dropped.append(case.name)
        done.pop(case.name, None)
        stale = shards.pop(case.name, None)
        if stale:
            stale[0].unlink()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = plan_case(case, config, digest)
        for w in caught:
            log(f"warning: {w.message}")
        if plan is None:
            summary.cases_skipped.append(case.name)
        else:
            plans.append(plan)
    summary.slices_total = sum(len(p.z) for p in plans)
    return plans, dropped


def _encode_plans(plans, config: EncodeConfig, encoder, shard_dir: Path, signature: dict, progress, *, row_size: int,
                  summary: EncodeSummary):
    """Encode planned cases in batches that may span cases; yield each case's record once its shard is complete.

    The main thread only launches work: it takes prepared cases from the reader, sends batches to
    the encoder and hands each batch's embeddings, still on their way to the host, to a writer
    thread (on CUDA; see :func:`write_behind_depth`). The writer waits for them, fills the cases'
    shards and writes out the complete ones, while the encoder runs the next batches."""
    total = sum(len(p.z) for p in plans)
    task = progress.add_task("encoding", total=total) if progress else None
    reader = _reader(plans, config, encoder.device)
    behind = WriteBehind(depth=write_behind_depth(encoder.device), name="embedcache-writer")
    store = _Store(progress, task, summary)
    pending: list[tuple[ShardWriter, int]] = []  # (writer, row within its case) awaiting the encoder
    writers: list[ShardWriter] = []
    try:
        for item in _timed(reader, summary):
            writer = ShardWriter(shard_dir, signature=signature, case=item.record, slice_size=config.preprocess.slice_size)
            writers.append(writer)
            store.cases[writer] = item
            pending.extend((writer, row) for row in range(item.record.n_rows))
            while len(pending) >= encoder.batch_size:
                _encode_batch(pending[: encoder.batch_size], store, encoder, behind)
                del pending[: encoder.batch_size]
            if item.record.n_rows == 0:
                behind.submit(partial(store.finish_ready, [writer]))
            yield from store.drain()
        if pending:
            _encode_batch(pending, store, encoder, behind)
        behind.join()
        yield from store.drain()
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise write_error(exc, shard_dir, needed=sum(len(p.z) for p in plans) * row_size) from None
    finally:
        behind.close()  # first: the writer thread may be writing into these shards
        if isinstance(reader, ReadAhead):
            reader.close()
        del reader  # a DataLoader's workers end with its iterator
        for writer in writers:
            writer.abort()


def _timed(items, summary: EncodeSummary):
    """``items``, adding the time spent waiting for each to ``summary.input_wait_s``."""
    items = iter(items)
    while True:
        started = time.perf_counter()
        item = next(items, _timed)
        summary.input_wait_s += time.perf_counter() - started
        if item is _timed:
            return
        yield item


def write_behind_depth(device) -> int:
    """Batches whose storing may wait in the writer thread: 2 on CUDA, where the encoder runs on
    while the host writes; 0 (stored in the main thread, between encoder calls) on the CPU, where
    a writer thread would only take cores from the encoder's threads."""
    return 2 if device.type == "cuda" else 0


class _Store:
    """The writer thread's side of :func:`_encode_plans`: prepared cases by shard writer, and the
    records of the shards it has finished, for the main thread to collect."""

    def __init__(self, progress, task, summary: EncodeSummary):
        self.progress, self.task, self.summary = progress, task, summary
        self.cases: dict[ShardWriter, _CaseBatch] = {}
        self.finished: deque[CaseRecord] = deque()

    def drain(self):
        while self.finished:
            yield self.finished.popleft()

    def write(self, rows: list[tuple[ShardWriter, int]], fetched) -> None:
        started = time.perf_counter()
        embeddings, finite = fetched.wait()
        waited = time.perf_counter()
        try:
            self._write(rows, embeddings, finite)
        finally:
            self.summary.encoder_wait_s += waited - started
            self.summary.writing_s += time.perf_counter() - waited

    def _write(self, rows: list[tuple[ShardWriter, int]], embeddings: np.ndarray, finite: bool) -> None:
        if not finite:  # never let a NaN into the cache, whatever its cause
            bad = sorted({self.cases[w].plan.source.name for (w, r), e in zip(rows, embeddings) if not np.isfinite(e).all()})
            raise EmbedcacheError(
                f"{bad[0]}: the image encoder returned NaN or infinite embeddings; check the image's voxels "
                "(and --dtype float32 if they overflow float16)"
            )
        start = 0
        while start < len(rows):
            writer = rows[start][0]
            stop = start
            while stop < len(rows) and rows[stop][0] is writer:
                stop += 1
            item, first = self.cases[writer], rows[start][1]
            sel = slice(first, first + stop - start)
            writer.write(
                embeddings=embeddings[start:stop],
                masks=item.masks[sel],
                boxes=item.boxes[sel],
                slice_index=item.slice_index[sel],
                spacing_mm=np.broadcast_to(np.float32(item.record.spacing_mm), (stop - start, 3)),
            )
            start = stop
        if self.progress:
            self.progress.advance(self.task, len(rows))
        self.finish_ready([w for w, _ in rows])

    def finish_ready(self, writers) -> None:
        """Write out the shards of ``writers`` whose rows are all in (a case's last batch, or an empty case)."""
        for writer in dict.fromkeys(writers):
            if writer.complete and writer in self.cases:
                writer.finish()
                del self.cases[writer]
                self.finished.append(writer.case)


def _encode_batch(rows, store: _Store, encoder, behind: WriteBehind) -> None:
    """Launch one batch on the encoder and queue its storing; returns without waiting for either."""
    embeddings = encoder([store.cases[w].images[r] for w, r in rows])
    behind.submit(partial(store.write, rows, encoder.to_host(embeddings)))


def workers_for(config: EncodeConfig, device) -> int:
    """Processes that prepare slices ahead of the encoder: ``config.workers``, or (-1) none on the
    CPU, where the encoder itself is the bottleneck and one reader thread keeps up, and on CUDA
    half the cores up to 8: preparing a slice (read, HU, window, resample) costs ~8 ms of one core
    here, so each worker feeds ~120 slices/s, and TinyViT on a GPU encodes several hundred."""
    if config.workers >= 0:
        return config.workers
    return max(1, min(8, (os.cpu_count() or 2) // 2)) if device.type == "cuda" else 0


class _PreparedCases:
    """``prepare_case`` as a map-style dataset for a DataLoader's worker processes. A user error in a
    worker comes back as a value, so it reaches the user as its one line (a DataLoader re-raises
    worker exceptions with the worker's traceback folded into the message)."""

    def __init__(self, plans, config):
        self.plans, self.config = plans, config

    def __len__(self):
        return len(self.plans)

    def __getitem__(self, i):
        try:
            return prepare_case(self.plans[i], self.config)
        except EmbedcacheError as exc:
            return exc


def _as_is(item):
    return item


def _reader(plans, config: EncodeConfig, device):
    """Prepared cases in plan order: from worker processes (a torch DataLoader) when
    :func:`workers_for` asks for them, else from one read-ahead thread."""
    workers = workers_for(config, device)
    if workers == 0:
        return ReadAhead(lambda plan: prepare_case(plan, config), plans, depth=2, name="embedcache-reader")
    from torch.utils.data import DataLoader

    loader = DataLoader(_PreparedCases(plans, config), batch_size=None, shuffle=False, num_workers=workers,
                        collate_fn=_as_is, prefetch_factor=2)
    return (_raise_errors(item) for item in loader)


def _raise_errors(item):
    if isinstance(item, EmbedcacheError):
        raise item
    return item
