"""Writing files so that a crash, Ctrl-C or a full disk never leaves a half-written one in place.

Every output of embedcache is written under a temporary ``.partial`` name beside its final path,
synced to disk, and only then renamed over it: a reader sees the old file or the new one.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PARTIAL = ".partial"


def partial_path(path: Path, *, keep_suffix: bool = False) -> Path:
    """The temporary name ``path`` is written under: ``NAME.partial``, or ``.STEM.partial.SUFFIX`` with
    ``keep_suffix`` for writers that choose the format by the suffix (nibabel)."""
    path = Path(path)
    if not keep_suffix:
        return path.with_name(path.name + PARTIAL)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    stem = path.name[: len(path.name) - len(suffix)]
    return path.with_name(f".{stem}{PARTIAL}{suffix}")


def commit(tmp: Path, path: Path) -> None:
    """Sync the finished temporary file ``tmp`` to disk and rename it over ``path``."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    Path(tmp).replace(path)


@contextmanager
def atomic_path(path: Path, *, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield the temporary path to write; on success sync it and rename it over ``path``, on any
    failure (or interrupt) remove it and leave ``path`` as it was."""
    path = Path(path)
    tmp = partial_path(path, keep_suffix=keep_suffix)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
