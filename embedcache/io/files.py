"""Writing files so that a crash, Ctrl-C or a full disk never leaves a half-written one in place.

Every output of embedcache is written under a temporary name beside its final path, synced to disk,
and only then renamed over it: a reader sees the old file or the new one. A temporary name is unique
to its write and marked as embedcache's (``.NAME.embedcache-TOKEN.partial``), and is reserved by
creating it exclusively: a user's ``NAME.partial`` is never written over or removed, and what a
killed run left behind is known as embedcache's by its mark (:func:`is_partial`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from embedcache.errors import EmbedcacheError, reason

PARTIAL = ".partial"
#: What marks a temporary name as embedcache's own, between the name and its token.
MARK = ".embedcache-"
_MARKED = re.compile(r"^\..+" + re.escape(MARK) + r"[0-9a-f]{8}" + re.escape(PARTIAL) + r"(\.[A-Za-z0-9.]+)?$")
#: errno values that mean "this disk cannot take the write", not a bug.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
WRITE_ERRNOS = (*NO_SPACE, *NOT_WRITABLE, errno.EIO)


def partial_path(path: Path, *, keep_suffix: bool = False) -> Path:
    """A new temporary name to write ``path`` under, reserved (created empty, exclusively) so that no other file
    is ever written over: ``.NAME.embedcache-TOKEN.partial``, or ``.STEM.embedcache-TOKEN.partial.SUFFIX`` with
    ``keep_suffix`` for writers that choose the format by the suffix (nibabel, rt-utils)."""
    path = Path(path)
    stem, suffix = _split_suffix(path.name) if keep_suffix else (path.name, "")
    return _reserve(lambda token: path.with_name(f".{stem}{MARK}{token}{PARTIAL}{suffix}"),
                    lambda tmp: os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)))


def _split_suffix(name: str) -> tuple[str, str]:
    """``CASE.nii.gz`` → ``("CASE", ".nii.gz")``, ``x.seg.dcm`` → ``("x.seg", ".dcm")``: the suffix a writer chooses its
    format by."""
    suffix = ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix
    return name[: len(name) - len(suffix)], suffix


def _reserve(name_for, create) -> Path:
    """The first name ``name_for(token)`` that ``create`` makes exclusively (raising FileExistsError if taken)."""
    while True:
        candidate = name_for(secrets.token_hex(4))
        try:
            create(candidate)
            return candidate
        except FileExistsError:
            continue


def is_partial(name: str) -> bool:
    """Whether ``name`` is one of embedcache's temporary names (:func:`partial_path`, :func:`partial_folder`)."""
    return bool(_MARKED.match(name))


def partials_of(path: Path) -> list[Path]:
    """The temporary files and folders embedcache's writes of ``path`` left beside it (a killed run's)."""
    path = Path(path)
    stems = {path.name, _split_suffix(path.name)[0]}
    try:
        found = list(path.parent.iterdir())
    except OSError:
        return []
    return [p for p in found if is_partial(p.name) and p.name[1:].split(MARK)[0] in stems]


def partial_folder(path: Path) -> Path:
    """A new, empty, marked folder beside ``path`` to build a folder that will replace ``path`` whole."""
    path = Path(path)
    return _reserve(lambda token: path.with_name(f".{path.name}{MARK}{token}{PARTIAL}"), Path.mkdir)


def exchange(a: Path, b: Path) -> bool:
    """Swap the names of ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``): a reader finds one or
    the other at each name at every instant. False where the system or file system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_folder(new: Path, final: Path) -> None:
    """Put the folder ``new`` (beside ``final``) where ``final`` is, so that ``final`` holds the old folder or the new
    one at every instant: one exchange of the two where the system can, then the old one removed. Elsewhere the old
    one moves to a marked ``.old`` name first, and :func:`recover_folder` puts it back if the run dies between the
    two renames."""
    new, final = Path(new), Path(final)
    if not final.exists():
        new.rename(final)
        return
    if exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)  # the old folder, under the new one's temporary name
        return
    reserved = partial_folder(final)
    old = reserved.with_name(reserved.name + ".old")  # its token is this run's: no one else's name
    final.rename(old)
    reserved.rmdir()
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(final: Path, *, is_ours) -> None:
    """After a run killed inside :func:`replace_folder`'s fallback: the old folder back at ``final`` (call it while
    holding ``final``'s writer lock). Only a marked ``.old`` folder that ``is_ours(folder)`` recognises (an earlier
    report, say) is put back; nothing is removed: a marked name alone does not prove who made a folder."""
    final = Path(final)
    if final.exists():
        return
    olds = [p for p in partials_of(final) if p.is_dir() and p.name.endswith(".old") and is_ours(p)]
    if olds:
        olds[0].rename(final)


def commit(tmp: Path, path: Path) -> None:
    """Sync the finished temporary file ``tmp`` to disk and rename it over ``path``, with the mode any
    new file gets under the umask (some writers make their temporary files private, 0600)."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
        os.fchmod(handle.fileno(), 0o666 & ~_umask())
    Path(tmp).replace(path)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path, *, keep_suffix: bool = False, needed: int | None = None) -> Iterator[Path]:
    """Yield the temporary path to write; on success sync it and rename it over ``path``, on any
    failure (or interrupt) remove it and leave ``path`` as it was. A full, read-only or failing
    disk becomes an :class:`EmbedcacheError` naming ``path`` (and ``needed``, the bytes it takes)."""
    path = Path(path)
    tmp = None
    try:
        tmp = partial_path(path, keep_suffix=keep_suffix)
        yield tmp
        commit(tmp, path)
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if exc.errno in WRITE_ERRNOS:
            raise write_error(exc, path, needed=needed) from None
        raise
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path, *, what: str = "JSON file", fix: str = "", unique_keys: bool = False):
    """The JSON value in ``path``; a missing, unreadable or malformed file is one line naming it. With
    ``unique_keys``, an object that names a key twice is refused (JSON keeps the last silently)."""
    def pairs(items):
        seen = set()
        for key, _ in items:
            if key in seen:
                raise ValueError(f"key {key!r} appears twice in one object; keep one")
            seen.add(key)
        return dict(items)

    try:
        return json.loads(Path(path).read_text(), object_pairs_hook=pairs if unique_keys else None)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EmbedcacheError(f"{path}: not a readable {what} ({exc}){'; ' + fix if fix else ''}") from None
    except RecursionError:  # nested deeper than any file embedcache reads
        raise EmbedcacheError(f"{path}: not a readable {what} (nested too deeply){'; ' + fix if fix else ''}") from None


def same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` are one file (or folder) on disk, by inode: a link or another spelling of
    the path counts."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist
        return False


def lock_path(path: Path) -> Path:
    """The lock file of ``path``: ``.NAME.lock`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def writer_lock(path: Path, *, main: bool = True):
    """The :class:`WriterLock` of ``path`` in the process that writes it (``main``), else nothing to hold."""
    return WriterLock(lock_path(path), what=str(path)) if main else nullcontext()


class WriterLock:
    """One writer at a time for ``path`` (a cache being encoded, a run folder being trained): an
    exclusive ``flock`` on the lock file ``lock``, which the kernel releases when the process ends,
    however it ends, so a killed run never blocks the next. The holder writes its pid into the file,
    so a second writer is told which process holds it."""

    def __init__(self, lock: Path, *, what: str):
        self.lock, self.what, self._handle = Path(lock), what, None

    def __enter__(self) -> "WriterLock":
        import fcntl

        try:
            handle = open(self.lock, "a+")
        except OSError as exc:
            raise write_error(exc, self.lock) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise EmbedcacheError(f"{self.what}: another embedcache ({who}) is writing it; wait for it to end or stop "
                                  f"it (lock {self.lock})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.close()  # releases the flock; the file stays, empty of meaning
            self._handle = None


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def write_error(exc: OSError, path: Path, *, needed: int | None = None):
    """One line for a write that the disk refused: where, why, and (when known) how much space it needs."""
    path = Path(path)
    if exc.errno in NO_SPACE:
        try:
            free = f", {_size(free_bytes(path.parent if not path.is_dir() else path))} free"
        except OSError:
            free = ""
        need = f"; it needs about {_size(needed)}{free}" if needed else ""
        return EmbedcacheError(f"{path}: no space left on device{need}; free space and rerun (finished work is kept)")
    if exc.errno in NOT_WRITABLE:
        return EmbedcacheError(f"{path}: cannot write here ({os.strerror(exc.errno)}); choose another folder")
    why = os.strerror(exc.errno) if exc.errno else reason(exc)
    return EmbedcacheError(f"{path}: write failed ({why}); check the disk and rerun")


def check_writable_folder(folder: Path, *, what: str = "--out") -> None:
    """Refuse a missing or read-only folder before any work is done in it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EmbedcacheError(f"{folder}: folder does not exist; create it or choose another {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EmbedcacheError(f"{folder}: folder is not writable; choose another {what}")


def check_free_space(folder: Path, needed: int, *, what: str) -> None:
    free = free_bytes(folder)
    if needed > free:
        raise EmbedcacheError(
            f"{folder}: {what} needs about {_size(needed)} but {_size(free)} are free; free space or choose another --out"
        )


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def is_pickle(path: Path) -> bool:
    """True for a file that only a pickle loader reads: ``torch.save``'s zip archive or a bare pickle stream."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        return False
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"


def make_output_folder(folder: Path, *, what: str = "--out") -> Path:
    """Create ``folder`` (and its parents) for outputs, or refuse one that is a file or not writable."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise EmbedcacheError(f"{folder}: is a file; {what} names a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(exc, folder) from None
    check_writable_folder(folder, what=what)
    return folder


_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) for this process."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]
