"""The HDF5 embedding cache: write per case, merge, reopen with a signature check. No compute here.

Layout of a cache file (``N`` slices, ``L`` target labels, ``S`` = slice size, 512 by default)::

    attrs["signature"]   JSON: schema, backbone, checkpoint_sha256, input_size, preprocess,
                         labels, embedding_dtype, embedcache_version
    embeddings   (N, 256, 64, 64)  float16 (or float32), one slice per chunk, fletcher32 checksum
    masks        (N, S, S)         uint8 label ids, only the target labels kept (0 elsewhere); gzip, fletcher32
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
bytes), and the merge, which must write through it, runs in a child process: the parent only sees
an ``OSError`` it turns into one line.

Integrity: a corrupted chunk fails its fletcher32 checksum when read; :meth:`Cache.read` names the
cache and the rows instead of handing back garbage.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from embedcache import __version__
from embedcache.errors import CacheMismatchError, EmbedcacheError, reason as _reason
from embedcache.io.files import atomic_path, commit, partial_path
from embedcache.model.prompts import box_present

#: Every backbone's image embedding: 256 channels on a 64×64 grid.
EMBEDDING_SHAPE = (256, 64, 64)
SCHEMA = 1
#: Signature fields that must match for two caches (or a cache and a model) to mix.
MODEL_KEYS = ("schema", "backbone", "checkpoint_sha256", "input_size", "preprocess", "labels", "embedding_dtype")
#: Signature fields a trained decoder must share with the cache it decodes: the embeddings' maker and
#: meaning (the storage type may differ).
DECODER_KEYS = ("backbone", "checkpoint_sha256", "input_size", "preprocess", "labels")
ROW_DATASETS = ("embeddings", "masks", "boxes", "case_index", "slice_index", "spacing_mm")


@dataclass(frozen=True)
class CaseRecord:
    """One source case in a cache; ``first_row``/``n_rows`` locate its slices."""

    name: str
    image: str
    label: str
    digest: str
    first_row: int
    n_rows: int
    shape_zyx: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    source_shape: tuple[int, int, int]
    source_affine: tuple[tuple[float, ...], ...]
    subset: str = "train"  # "test" for a test folder's cases (imagesTs/), never trained on
    margin_slices: int = 0  # slices cached beyond each end of the glands (no boxes), for 3-D box prompts
    series_uid: str | None = None  # the DICOM series read from an image folder that holds several

    @classmethod
    def from_json(cls, obj: dict) -> "CaseRecord":
        obj = dict(obj)
        for key in ("shape_zyx", "spacing_mm", "source_shape"):
            obj[key] = tuple(obj[key])
        obj["source_affine"] = tuple(tuple(row) for row in obj["source_affine"])
        return cls(**obj)

    @property
    def rows(self) -> slice:
        """This case's rows of the cache, for h5py reads."""
        return slice(self.first_row, self.first_row + self.n_rows)

    @property
    def row_index(self) -> np.ndarray:
        """This case's rows of the cache as indices."""
        return np.arange(self.first_row, self.first_row + self.n_rows)


def make_signature(
    *, backbone: str, checkpoint_sha256: str, input_size: int, preprocess: dict, labels, embedding_dtype: str
) -> dict:
    return {
        "schema": SCHEMA,
        "backbone": backbone,
        "checkpoint_sha256": checkpoint_sha256,
        "input_size": int(input_size),
        "preprocess": dict(preprocess),
        "labels": [int(x) for x in labels],
        "embedding_dtype": embedding_dtype,
        "embedcache_version": __version__,
    }


def first_difference(found: dict, expected: dict, keys: tuple[str, ...]) -> str | None:
    """``key=FOUND, not EXPECTED`` for the first of ``keys`` on which two signatures differ, else None."""
    for key in keys:
        if found.get(key) != expected.get(key):
            return f"{key}={_short(found.get(key))}, not {_short(expected.get(key))}"
    return None


def check_signature(found: dict, expected: dict, *, path: Path) -> None:
    """Refuse a cache made by another model, checkpoint, preprocessing or label set; warn on version."""
    difference = first_difference(found, expected, MODEL_KEYS)
    if difference:
        raise CacheMismatchError(
            f"{path}: cache was made with {difference}; encode into a new file or use the settings it was made with"
        )
    if found.get("embedcache_version") != expected.get("embedcache_version"):
        warnings.warn(
            f"{path}: written by embedcache {found.get('embedcache_version')}, this is {expected.get('embedcache_version')}",
            stacklevel=2,
        )


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 80 else text[:16] + "…"


def _create_row_datasets(f: h5py.File, *, n: int, n_labels: int, slice_size: int, dtype: str) -> None:
    if n == 0:  # a case whose glands vanished in resampling: an empty record, no chunks to lay out
        f.create_dataset("embeddings", shape=(0, *EMBEDDING_SHAPE), dtype=dtype)
        f.create_dataset("masks", shape=(0, slice_size, slice_size), dtype="u1")
    else:
        f.create_dataset(
            "embeddings", shape=(n, *EMBEDDING_SHAPE), dtype=dtype, chunks=(1, *EMBEDDING_SHAPE), fletcher32=True
        )
        f.create_dataset(
            "masks", shape=(n, slice_size, slice_size), dtype="u1", chunks=(1, slice_size, slice_size),
            compression="gzip", compression_opts=1, fletcher32=True,
        )
    f.create_dataset("boxes", shape=(n, n_labels, 4), dtype="f4")
    f.create_dataset("case_index", shape=(n,), dtype="i4")
    f.create_dataset("slice_index", shape=(n,), dtype="i4")
    f.create_dataset("spacing_mm", shape=(n, 3), dtype="f4")


def _finish(f: h5py.File, tmp: Path, final: Path) -> None:
    f.flush()
    f.close()
    commit(tmp, final)


def row_bytes(*, embedding_dtype: str, slice_size: int) -> int:
    """Bytes one cached slice takes at most: its embedding and its (uncompressed) mask."""
    return int(np.prod(EMBEDDING_SHAPE)) * np.dtype(embedding_dtype).itemsize + slice_size**2 + 64


class ShardWriter:
    """Writes one case's rows into ``folder/NAME.h5``; the file appears only when the case is complete.

    The shard is built in memory (libhdf5's core driver) and written out by :meth:`finish` in one go.
    """

    def __init__(self, folder: Path, *, signature: dict, case: CaseRecord, slice_size: int):
        self.final = Path(folder) / f"{case.name}.h5"
        self.case = case
        self.row = 0
        self._f = h5py.File(f"{case.name}.h5", "w", driver="core", backing_store=False)
        self._f.attrs["signature"] = json.dumps(signature, sort_keys=True)
        self._f.attrs["case"] = json.dumps(asdict(case))
        _create_row_datasets(
            self._f, n=case.n_rows, n_labels=len(signature["labels"]), slice_size=slice_size,
            dtype=signature["embedding_dtype"],
        )

    def write(self, *, embeddings, masks, boxes, slice_index, spacing_mm) -> None:
        """Write the next ``len(embeddings)`` rows."""
        rows = slice(self.row, self.row + len(embeddings))
        f = self._f
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


def read_shard(path: Path) -> tuple[dict, CaseRecord]:
    """Signature and case record of a complete shard."""
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["signature"]), CaseRecord.from_json(json.loads(f.attrs["case"]))


class Cache:
    """A read-only cache file. Datasets are h5py datasets: index them to read rows."""

    def __init__(self, path: Path):
        self.path = Path(path)
        # One embedding chunk is 2 MiB; a larger chunk cache keeps sequential reads out of libhdf5's slow path.
        self._f = h5py.File(self.path, "r", rdcc_nbytes=64 << 20)
        self.signature: dict = json.loads(self._f.attrs["signature"])
        self.cases: list[CaseRecord] = [CaseRecord.from_json(c) for c in json.loads(self._f["cases"][()])]
        self.embeddings = self._f["embeddings"]
        self.masks = self._f["masks"]
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
        return tuple(self.signature["labels"])

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_cache(path: Path, *, expect: dict | None = None) -> Cache:
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
            check_signature(cache.signature, expect, path=path)
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


def merge(out: Path, *, signature: dict, sources: list[tuple[Path, list[CaseRecord]]], slice_size: int) -> list[CaseRecord]:
    """Write ``out`` from the given cases of other cache or shard files, replacing ``out`` atomically.

    ``sources`` pairs a file with the records (as stored in that file) of the cases to take from it.
    Returns the case records as stored in ``out``. Runs in a child process where the platform can
    fork (see the module docstring); its errors come back as the same exceptions.
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        return _merge(out, signature=signature, sources=sources, slice_size=slice_size)
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_merge_child, args=(send, out, signature, sources, slice_size), daemon=True)
    child.start()
    send.close()
    try:
        try:
            kind, payload = receive.recv()
        except EOFError:
            kind, payload = "crash", None
    finally:
        child.join()  # also after Ctrl-C: the child cleans up its partial file first
    if kind == "ok":
        return [CaseRecord.from_json(r) for r in payload]
    if kind == "oserror":
        raise OSError(payload[0], payload[1], payload[2])
    if kind == "error":
        raise EmbedcacheError(payload)
    if kind == "interrupt":
        raise KeyboardInterrupt
    partial_path(out).unlink(missing_ok=True)
    raise EmbedcacheError(f"{out}: writing the cache failed (exit code {child.exitcode}); rerun to try again")


def _merge_child(send, out, signature, sources, slice_size) -> None:
    try:
        records = _merge(out, signature=signature, sources=sources, slice_size=slice_size)
        send.send(("ok", [asdict(r) for r in records]))
    except OSError as exc:
        code = exc.errno or _errno_in(str(exc))
        send.send(("oserror", (code, os.strerror(code) if code else _reason(exc), str(out))))
    except EmbedcacheError as exc:
        send.send(("error", str(exc)))
    except KeyboardInterrupt:
        send.send(("interrupt", None))
    except BaseException as exc:  # a bug: say what it was
        send.send(("error", f"{out}: merge failed ({type(exc).__name__}: {_reason(exc)})"))
    finally:
        send.close()
        os._exit(0)  # skip libhdf5's exit handlers, which crash after a failed write


def _errno_in(message: str) -> int | None:
    """libhdf5 puts the system's errno in its message ("errno = 28") where h5py sets none."""
    import re

    found = re.search(r"errno = (\d+)", message)
    return int(found.group(1)) if found else None


def _merge(out: Path, *, signature: dict, sources: list[tuple[Path, list[CaseRecord]]], slice_size: int) -> list[CaseRecord]:
    out = Path(out)
    tmp = partial_path(out)
    total = sum(case.n_rows for _, cases in sources for case in cases)
    records: list[CaseRecord] = []
    f = h5py.File(tmp, "w")
    try:
        f.attrs["signature"] = json.dumps(signature, sort_keys=True)
        _create_row_datasets(
            f, n=total, n_labels=len(signature["labels"]), slice_size=slice_size, dtype=signature["embedding_dtype"]
        )
        row = 0
        for source, cases in sources:
            with h5py.File(source, "r") as src:
                for case in cases:
                    rows_out = slice(row, row + case.n_rows)
                    for name in ROW_DATASETS:
                        if name == "case_index":
                            f[name][rows_out] = len(records)
                        elif not _copy_chunks(src[name], f[name], case, row, source):
                            f[name][rows_out] = _read_source(src, name, case, source)
                    records.append(CaseRecord(**{**asdict(case), "first_row": row}))
                    row = rows_out.stop
        f.create_dataset("cases", data=json.dumps([asdict(c) for c in records]))
        _finish(f, tmp, out)
    except BaseException:
        try:
            if f.id.valid:
                f.close()  # fails too after a failed write; the file goes anyway
        except Exception:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        raise
    return records


def _copy_chunks(src: h5py.Dataset, dst: h5py.Dataset, case: CaseRecord, row: int, source: Path) -> bool:
    """Copy ``case``'s rows of a one-row-per-chunk dataset to ``dst`` from ``row`` on as stored bytes
    (checksummed, compressed), never decoding them: 2× faster here than reading and writing, and the
    checksums still guard every read of the merged cache. False where the layouts differ (nothing copied)."""
    same = (src.chunks == dst.chunks and src.chunks is not None and src.chunks[0] == 1
            and src.compression == dst.compression and src.compression_opts == dst.compression_opts
            and src.fletcher32 == dst.fletcher32 and src.dtype == dst.dtype)
    if not same:
        return False
    rest = (0,) * (len(src.shape) - 1)
    for k in range(case.n_rows):
        try:
            filter_mask, chunk = src.id.read_direct_chunk((case.first_row + k, *rest))
        except OSError as exc:
            raise _unreadable(exc, source, src.name.lstrip("/"), case) from None
        dst.id.write_direct_chunk((row + k, *rest), chunk, filter_mask)
    return True


def _read_source(src: h5py.File, name: str, case: CaseRecord, source: Path) -> np.ndarray:
    try:
        return src[name][case.rows]
    except OSError as exc:
        raise _unreadable(exc, source, name, case) from None


def _unreadable(exc: OSError, source: Path, name: str, case: CaseRecord) -> Exception:
    """A read error of a merge's source: the disk's own errors as they are, anything else a damaged file."""
    if (exc.errno or _errno_in(str(exc))) in (errno.ENOSPC, errno.EIO):
        return exc
    return EmbedcacheError(
        f"{source}: {name} of case {case.name} cannot be read ({_reason(exc)}); the file is damaged: "
        "delete it and encode again"
    )


def remove_tree(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
