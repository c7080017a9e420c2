"""Phase one's pipeline: prepared slices in, embeddings out into each case's shard.

The main thread only launches work: a reader (a thread, or worker processes on CUDA) prepares
case after case (read, HU, window, resample, masks and boxes); the main thread sends batches,
which may span cases, to the encoder; on CUDA a writer thread takes their embeddings into the
cases' shards and writes out the complete ones while the next batches encode (on the CPU the main
thread does, between encoder calls).
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from embedcache.cache.augment import AUGMENT, augment_slices
from embedcache.cache.plan import PlannedCase, where
from embedcache.cache.preprocess import resize_mask, slice_to_model
from embedcache.cache.records import CaseRecord, Signature
from embedcache.cache.regions import GlandRegion, zoom_in
from embedcache.cache.store import ShardWriter, to_pixels
from embedcache.config import EncodeConfig
from embedcache.errors import EmbedcacheError
from embedcache.io.datasets import CaseSource
from embedcache.io.files import WRITE_ERRNOS, write_error
from embedcache.io.volumes import read_image
from embedcache.model.prompts import boxes_for_labels
from embedcache.runtime.readahead import ReadAhead, WriteBehind


@dataclass
class EncodeSummary:
    """What an encode did and where its time went (encode returns it; the pipeline fills in its stages' times)."""

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


@dataclass(frozen=True)
class CaseBatch:
    """One case, preprocessed: what the encoder and the shard need."""

    plan: PlannedCase
    record: CaseRecord
    images: np.ndarray  # (n, S, S) float32 in [0, 1]
    masks: np.ndarray  # (n, S, S) uint8
    boxes: np.ndarray  # (n, L, 4)
    slice_index: np.ndarray  # (n,)


def prepare_case(plan: PlannedCase, config: EncodeConfig) -> CaseBatch:
    """Read a planned case's image and turn its planned slices into model-ready slices, masks and boxes.

    Margin slices, and slices whose gland (a voxel or two) vanished when resampled, get no box."""
    size = config.preprocess.slice_size
    image = read_image(plan.source.image, series_uid=plan.source.series_uid)
    pre = config.preprocess
    z = plan.z
    hu, labels = image.array[z], plan.label_slices
    if plan.region is not None:  # the gland's region, resampled as its label was (cache.plan.plan_gland)
        hu = zoom_in(hu, plan.region.region, image.spacing_mm[1:])
    if plan.source.subset == AUGMENT:  # a training-only copy: its source's slices, moved alike
        mirrored = config.label_map.mirrored(config.labels) if "flip" in config.augment else None
        hu, labels = augment_slices(hu, labels, plan.source.name, mirrored=mirrored)
    masks, boxes = masks_and_boxes(labels, config.labels, size)
    images = np.stack(
        [slice_to_model(s, width_hu=pre.window_width_hu, level_hu=pre.window_level_hu, slice_size=size) for s in hu]
    ) if z.size else np.zeros((0, size, size), np.float32)
    geometry = image.geometry
    record = case_record(plan.source, geometry, digest=plan.digest, n_rows=int(z.size),
                         margin_slices=config.margin_slices, region=plan.region)
    return CaseBatch(plan=plan, record=record, images=images, masks=masks, boxes=boxes, slice_index=z)


def case_record(source: CaseSource, geometry, *, digest: str, n_rows: int, margin_slices: int,
                region: GlandRegion | None = None) -> CaseRecord:
    """The cache's record of ``source`` (its sources' absolute paths: score finds them from any working folder) on
    ``geometry``, its ``n_rows`` rows first in its shard. A gland's ``region`` (``encode --zoom``) is recorded, and
    the record's grid is the region's: its slices at ``size × size`` pixels of ``side_mm / size``."""
    shape, spacing = tuple(int(s) for s in geometry.shape_zyx), tuple(float(s) for s in geometry.spacing_mm)
    if region is not None:
        side = region.region
        shape, spacing = (shape[0], side.size, side.size), (spacing[0], side.pixel_mm, side.pixel_mm)
    return CaseRecord(
        name=source.name,
        digest=digest,
        first_row=0,
        n_rows=n_rows,
        shape_zyx=shape,
        spacing_mm=spacing,
        source_shape=tuple(int(s) for s in geometry.source_shape),
        source_affine=tuple(tuple(float(v) for v in row) for row in geometry.source_affine),
        margin_slices=margin_slices,
        region=None if region is None else {**region.to_dict(), "label": int(source.gland),
                                            "source": source.name.rsplit("@", 1)[0]},
        **where(source),
    )


def masks_and_boxes(label_slices: np.ndarray, labels: tuple[int, ...], size: int) -> tuple[np.ndarray, np.ndarray]:
    """A cache's rows of ``(n, y, x)`` label slices: their masks at ``size`` × ``size`` and each target label's box
    there, ``(n, len(labels), 4)`` (NaN where absent)."""
    masks = resize_mask(label_slices, (size, size))
    boxes = np.stack([boxes_for_labels(m, labels) for m in masks]) if len(masks) else np.zeros((0, len(labels), 4),
                                                                                                  np.float32)
    return masks, boxes


def encode_plans(plans, config: EncodeConfig, encoder, shard_dir: Path, signature: Signature, progress, *, row_size: int,
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
            writer = ShardWriter(shard_dir, signature=signature, case=item.record)
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
        self.cases: dict[ShardWriter, CaseBatch] = {}
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
                pixels=to_pixels(item.images[sel]) if writer.pixels else None,
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
    half the cores up to 8: preparing a slice (read, HU, window, resample) is cheap next to encoding it on
    a CPU, but one core cannot keep up with a GPU encoding TinyViT (benchmarks/encode.py)."""
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
