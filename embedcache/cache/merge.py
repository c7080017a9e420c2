"""Merging shards and caches into one cache file, replaced whole, in a child process.

Once a write of libhdf5's fails (a full disk), the library cannot close the file and crashes the
process at exit; so the merge runs in a forked child, and the parent only sees an ``OSError`` (or
the child's one-line error) that it turns into one line. Stored chunks are copied as they are,
never decoded and encoded again.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import re
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np

from embedcache.cache.records import CaseRecord, Signature
from embedcache.cache.store import create_row_datasets, finish, row_layout
from embedcache.errors import EmbedcacheError
from embedcache.errors import reason as _reason
from embedcache.io.files import partial_path


def merge(out: Path, *, signature: Signature, sources: list[tuple[Path, list[CaseRecord]]]) -> list[CaseRecord]:
    """Write ``out`` from the given cases of other cache or shard files, replacing ``out`` atomically.

    ``sources`` pairs a file with the records (as stored in that file) of the cases to take from it.
    Returns the case records as stored in ``out``. Runs in a child process where the platform can
    fork (see the module docstring); its errors come back as the same exceptions.
    """
    tmp = partial_path(out)  # this merge's own name: a crashed child's file is removed by name, nothing else
    if "fork" not in multiprocessing.get_all_start_methods():
        return _merge(out, tmp, signature=signature, sources=sources)
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_merge_child, args=(send, out, tmp, signature, sources), daemon=True)
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
        return [CaseRecord.from_dict(r, source=out) for r in payload]
    if kind == "oserror":
        raise OSError(payload[0], payload[1], payload[2])
    if kind == "error":
        raise EmbedcacheError(payload)
    if kind == "interrupt":
        raise KeyboardInterrupt
    tmp.unlink(missing_ok=True)
    raise EmbedcacheError(f"{out}: writing the cache failed (exit code {child.exitcode}); rerun to try again")


def _merge_child(send, out, tmp, signature, sources) -> None:
    try:
        records = _merge(out, tmp, signature=signature, sources=sources)
        send.send(("ok", [r.to_dict() for r in records]))
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
    found = re.search(r"errno = (\d+)", message)
    return int(found.group(1)) if found else None


def _merge(out: Path, tmp: Path, *, signature: Signature,
           sources: list[tuple[Path, list[CaseRecord]]]) -> list[CaseRecord]:
    out = Path(out)
    total = sum(case.n_rows for _, cases in sources for case in cases)
    records: list[CaseRecord] = []
    f = h5py.File(tmp, "w")
    try:
        f.attrs["signature"] = json.dumps(signature.to_dict(), sort_keys=True)
        create_row_datasets(f, n=total, signature=signature)
        row = 0
        for source, cases in sources:
            with h5py.File(source, "r") as src:
                for case in cases:
                    rows_out = slice(row, row + case.n_rows)
                    for name in row_layout(signature):
                        if name == "case_index":
                            f[name][rows_out] = len(records)
                        elif not _copy_chunks(src[name], f[name], case, row, source):
                            f[name][rows_out] = _read_source(src, name, case, source)
                    records.append(replace(case, first_row=row))
                    row = rows_out.stop
        f.create_dataset("cases", data=json.dumps([c.to_dict() for c in records]))
        finish(f, tmp, out)
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
    (checksummed, compressed), never decoding them: faster than reading and writing them, and the
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
