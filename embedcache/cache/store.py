"""The HDF5 embedding cache: write a case's shard, reopen a cache with its records checked. No compute here.

Layout of a cache file (``N`` slices, ``L`` target labels, ``S`` = slice size, 512 by default)::

    attrs["signature"]   JSON: schema, backbone, checkpoint_sha256, input_size, preprocess,
                         labels, embedding_dtype, embedcache_version
    embeddings   (N, 256, 64, 64)  float16 (or float32), one slice per chunk, fletcher32 checksum
    masks        (N, S, S)         uint8 label ids, only the target labels kept (0 elsewhere); gzip, fletcher32
    pixels       (N, S, S)         uint8, the windowed slice the encoder saw (0..255 for 0..1), where the signature's
                                   ``pixels`` is true (caches since the refinement head); gzip, fletcher32
    boxes        (N, L, 4)         float32 (x0, y0, x1, y1) in slice pixels; NaN where a label is absent
    case_index   (N,)              int32, row of `cases`
    slice_index  (N,)              int32, z of the slice in the canonical volume
    spacing_mm   (N, 3)            float32 (z, y, x) voxel size of the source volume
    cases        scalar string     JSON list, one object per case: name, image, label (absolute paths),
                                   digest, first_row, n_rows, shape_zyx, spacing_mm, source_shape,
                                   source_affine, subset (train | test), margin_slices, series_uid

Crash safety: an encode writes each case into its own shard ``CACHE.h5.parts/CASE.h5``, built in
memory and written to disk (under a ``.partial`` name, synced, renamed) only once all its rows are
there. The cache file itself is only ever replaced whole (written to ``.partial``, then renamed),
so a killed run leaves either the old cache or the new one, and complete shards to resume from.

Full disks: once a write of libhdf5's fails (ENOSPC), the library cannot close the file and
crashes the process at exit. So shards never meet the disk through libhdf5 (Python writes their
bytes), and the merge (:mod:`embedcache.cache.merge`), which must write through it, runs in a child
process: the parent only sees an ``OSError`` it turns into one line.

Integrity: a corrupted chunk fails its fletcher32 checksum when read; :meth:`Cache.read` names the
cache and the rows instead of handing back garbage.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np

from embedcache.cache.records import CaseRecord, Signature, check_case_rows
from embedcache.errors import CacheMismatchError, EmbedcacheError
from embedcache.errors import reason as _reason
from embedcache.io.files import atomic_path, commit
from embedcache.model import EMBEDDING_SHAPE
from embedcache.model.prompts import box_present


def row_layout(signature: Signature) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each row dataset's shape after its row axis, and its type: the one statement of the schema that
    writing (:func:`create_row_datasets`), merging and reading (:func:`check_layout`) share."""
    size = signature.slice_size
    pixels = {"pixels": ((size, size), "u1")} if signature.pixels else {}
    return {"embeddings": (EMBEDDING_SHAPE, signature.embedding_dtype), "masks": ((size, size), "u1"), **pixels,
            "boxes": ((len(signature.labels), 4), "f4"), "case_index": ((), "i4"), "slice_index": ((), "i4"),
            "spacing_mm": ((3,), "f4")}


def to_pixels(images: np.ndarray) -> np.ndarray:
    """Model-ready slices (float in ``[0, 1]``, :func:`~embedcache.cache.preprocess.slice_to_model`) → the cache's
    ``pixels`` (uint8, 0..255)."""
    return np.clip(np.rint(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def create_row_datasets(f: h5py.File, *, n: int, signature: Signature) -> None:
    """The row datasets of ``n`` slices in the layout the module docstring gives: embeddings and masks
    one slice per chunk with fletcher32 checksums (masks gzipped too), unless there are no rows to lay out
    (a case whose glands vanished in resampling)."""
    packed = dict(compression="gzip", compression_opts=1, fletcher32=True)
    storage = {"embeddings": dict(fletcher32=True), "masks": packed, "pixels": packed}
    for name, (tail, dtype) in row_layout(signature).items():
        options = dict(chunks=(1, *tail), **storage[name]) if name in storage and n > 0 else {}
        f.create_dataset(name, shape=(n, *tail), dtype=dtype, **options)


def check_layout(f: h5py.File, signature: Signature, *, source) -> int:
    """The row count of a cache or shard file whose row datasets are plain datasets held in the file
    itself (no external link, external storage or virtual dataset: those read another file without
    a word) with the shapes and types :func:`row_layout` gives them."""
    rows = set()
    for name, (tail, dtype) in row_layout(signature).items():
        link = f.get(name, getlink=True)
        dataset = f.get(name) if isinstance(link, h5py.HardLink) else None
        if not isinstance(dataset, h5py.Dataset) or dataset.is_virtual or dataset.external:
            kind = {h5py.ExternalLink: "an external link", h5py.SoftLink: "a soft link"}.get(type(link), "")
            what = "missing" if link is None else kind or ("a virtual dataset" if getattr(dataset, "is_virtual", 0)
                                                          else "not a dataset held in the file")
            raise _unreadable_cache(source, f"{name} is {what}; a cache holds its own data")
        if dataset.ndim < 1 or dataset.shape[1:] != tuple(tail) or dataset.dtype != np.dtype(dtype):
            raise _unreadable_cache(source, f"{name} is {dataset.dtype} {list(dataset.shape)}, not {np.dtype(dtype)} "
                                            f"[N, {', '.join(map(str, tail))}]")
        rows.add(dataset.shape[0])
    if len(rows) != 1:
        raise _unreadable_cache(source, f"its datasets hold different numbers of rows: {sorted(rows)}")
    return rows.pop()


def _unreadable_cache(source, why: str) -> EmbedcacheError:
    return EmbedcacheError(f"{source}: not a readable embedcache cache ({why}); encode it again")


def finish(f: h5py.File, tmp: Path, final: Path) -> None:
    """Flush and close a file written under its temporary name ``tmp``, then put it in place as ``final``."""
    f.flush()
    f.close()
    commit(tmp, final)


def row_bytes(*, embedding_dtype: str, slice_size: int) -> int:
    """Bytes one cached slice takes at most: its embedding and its (uncompressed) mask and pixels."""
    return int(np.prod(EMBEDDING_SHAPE)) * np.dtype(embedding_dtype).itemsize + 2 * slice_size**2 + 64


class ShardWriter:
    """Writes one case's rows into ``folder/NAME.h5``; the file appears only when the case is complete.

    The shard is built in memory (libhdf5's core driver) and written out by :meth:`finish` in one go.
    """

    def __init__(self, folder: Path, *, signature: Signature, case: CaseRecord):
        self.final = Path(folder) / f"{case.name}.h5"
        self.case = case
        self.pixels = signature.pixels  # whether its rows take pixels
        self.row = 0
        self._f = h5py.File(f"{case.name}.h5", "w", driver="core", backing_store=False)
        self._f.attrs["signature"] = json.dumps(signature.to_dict(), sort_keys=True)
        self._f.attrs["case"] = json.dumps(case.to_dict())
        create_row_datasets(self._f, n=case.n_rows, signature=signature)

    def write(self, *, embeddings, masks, boxes, slice_index, spacing_mm, pixels=None) -> None:
        """Write the next ``len(embeddings)`` rows; ``pixels`` (uint8, :func:`to_pixels`) where the signature holds
        them, and only there."""
        rows = slice(self.row, self.row + len(embeddings))
        f = self._f
        if ("pixels" in f) != (pixels is not None):
            raise RuntimeError(f"{self.final}: pixels {'missing' if pixels is None else 'not in the layout'}")  # a bug
        if pixels is not None:
            f["pixels"][rows] = pixels
        f["embeddings"][rows] = embeddings
        f["masks"][rows] = masks
        f["boxes"][rows] = boxes
        f["case_index"][rows] = 0
        f["slice_index"][rows] = slice_index
        f["spacing_mm"][rows] = spacing_mm
        self.row = rows.stop

    @property
    def complete(self) -> bool:
        return self.row == self.case.n_rows

    def finish(self) -> Path:
        """Write the complete shard to disk (atomically); an ``OSError`` leaves no file behind."""
        if not self.complete:
            raise RuntimeError(f"{self.final}: {self.row} of {self.case.n_rows} rows written")
        self._f.flush()
        image = self._f.id.get_file_image()
        self._f.close()
        with atomic_path(self.final, needed=len(image)) as tmp:
            Path(tmp).write_bytes(image)
        return self.final

    def abort(self) -> None:
        if self._f.id.valid:
            self._f.close()


def read_shard(path: Path) -> tuple[Signature, CaseRecord]:
    """Signature and case record of a complete shard (an ``OSError``, ``KeyError`` or ``ValueError`` for an
    unreadable file, an :class:`EmbedcacheError` for records that are not embedcache's)."""
    with h5py.File(path, "r") as f:
        signature = Signature.from_dict(json.loads(f.attrs["signature"]), source=path)
        case = CaseRecord.from_dict(json.loads(f.attrs["case"]), source=path)
        check_case_rows([replace(case, first_row=0)], check_layout(f, signature, source=path), source=path)
        return signature, case


class Cache:
    """A read-only cache file. Datasets are h5py datasets: index them to read rows."""

    def __init__(self, path: Path):
        self.path = Path(path)
        # One embedding chunk is 2 MiB; a larger chunk cache keeps sequential reads out of libhdf5's slow path.
        self._f = h5py.File(self.path, "r", rdcc_nbytes=64 << 20)
        try:
            self.signature = Signature.from_dict(json.loads(self._f.attrs["signature"]), source=self.path)
            n_rows = check_layout(self._f, self.signature, source=self.path)
            listed = self._f.get("cases") if isinstance(self._f.get("cases", getlink=True), h5py.HardLink) else None
            cases = json.loads(listed[()]) if isinstance(listed, h5py.Dataset) and listed.shape == () else None
            if not isinstance(cases, list):
                raise EmbedcacheError(f"{self.path}: its case list is missing or not one; encode it again")
            self.cases = [CaseRecord.from_dict(c, source=self.path) for c in cases]
            check_case_rows(self.cases, n_rows, source=self.path)
        except BaseException:
            self._f.close()
            raise
        self.embeddings = self._f["embeddings"]
        self.masks = self._f["masks"]
        self.pixels = self._f["pixels"] if self.signature.pixels else None
        self.boxes = self._f["boxes"]
        self.case_index = self._f["case_index"]
        self.slice_index = self._f["slice_index"]
        self.spacing_mm = self._f["spacing_mm"]

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def case(self, name: str) -> CaseRecord:
        return next(c for c in self.cases if c.name == name)

    def present(self, rows=slice(None)) -> np.ndarray:
        """``(n, L)`` bool: which labels have a box on the given rows (all rows by default)."""
        return box_present(self.read("boxes", rows))

    def read(self, name: str, rows) -> np.ndarray:
        """Rows of a dataset (a slice, or increasing indices); a chunk that fails its checksum or cannot be
        read is an error naming the cache and the rows."""
        dataset = self._f[name]
        try:
            return dataset[rows]
        except OSError as exc:
            indices = range(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows).ravel()
            bad = [int(r) for r in indices if not _readable(dataset, int(r))]
            raise EmbedcacheError(
                f"{self.path}: {name} of rows {bad[:8]}{' …' if len(bad) > 8 else ''} cannot be read "
                f"({_reason(exc)}); the file is damaged: encode it again"
            ) from None

    @property
    def labels(self) -> tuple[int, ...]:
        return self.signature.labels

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_cache(path: Path, *, expect: Signature | None = None) -> Cache:
    """Open a cache for reading; with ``expect``, refuse one whose signature does not fit it."""
    path = Path(path)
    if path.is_dir():
        raise EmbedcacheError(f"{path}: is a folder; give the cache file (CACHE.h5) that `embedcache encode` wrote")
    if not path.is_file():
        raise EmbedcacheError(f"{path}: no such cache file; run `embedcache encode` first")
    try:
        cache = Cache(path)
    except (OSError, KeyError, ValueError) as exc:
        raise EmbedcacheError(
            f"{path}: not a readable embedcache cache ({_reason(exc)}); encode it again"
        ) from None
    if expect is not None:
        try:
            cache.signature.check_matches(expect, path=path)
        except CacheMismatchError:
            cache.close()
            raise
    return cache


def _readable(dataset, row: int) -> bool:
    try:
        dataset[row]
        return True
    except OSError:
        return False


def remove_tree(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
