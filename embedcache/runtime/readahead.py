"""Work ahead and behind in a thread: the next cases read (encode) or batches built (streamed
finetune) while the current one computes, and the last results stored while the next compute.
numpy, nibabel's zlib, file writes and torch release the GIL for the heavy parts.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable


class ReadAhead:
    """Iterates ``make(item)`` for ``items``, computed in a daemon thread up to ``depth`` results ahead.

    An exception in ``make`` is raised in the consuming thread at the item where it happened.
    :meth:`close` stops the thread early; it never blocks on a queue nobody reads.
    """

    _DONE = object()

    def __init__(self, make: Callable, items: Iterable, *, depth: int = 2, name: str = "embedcache-readahead"):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make, items), daemon=True, name=name)
        self._thread.start()

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make, items) -> None:
        try:
            for item in items:
                if not self._put(make(item)):
                    return
            self._put(self._DONE)
        except BaseException as exc:  # handed to the consuming thread, raised there
            self._put(exc)

    def __iter__(self):
        while True:
            value = self._queue.get()
            if value is self._DONE:
                return
            if isinstance(value, BaseException):
                raise value
            yield value

    def close(self) -> None:
        self._stop.set()


class WriteBehind:
    """Runs submitted jobs in order in a daemon thread, up to ``depth`` of them waiting: the device
    computes the next batch while the host stores the last one.

    :meth:`submit` blocks while ``depth`` jobs wait (the store sets the pace when it is the slower).
    An exception in a job is raised in the submitting thread, by the next :meth:`submit` or by
    :meth:`join`; the jobs after it are dropped. :meth:`close` lets the running job finish, drops
    the rest and returns once the thread has ended, so what the jobs write can be closed after it.
    ``depth=0`` runs each job in :meth:`submit` itself, no thread: for a CPU, whose cores the
    computation already keeps busy.
    """

    _STOP = object()

    def __init__(self, *, depth: int = 2, name: str = "embedcache-writer"):
        self._inline = depth == 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        if not self._inline:
            self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is self._STOP:
                return
            if self._error is None and not self._cancel.is_set():
                try:
                    job()
                except BaseException as exc:  # handed to the submitting thread, raised there
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._cancel.set()  # raised once; the jobs after it stay dropped
            raise error

    def submit(self, job: Callable[[], object]) -> None:
        self._raise()
        if self._cancel.is_set() or not (self._inline or self._thread.is_alive()):
            raise RuntimeError("WriteBehind: submit after close or after an error")
        if self._inline:
            job()
        else:
            self._queue.put(job)

    def join(self) -> None:
        """Wait until every submitted job has run; raise the first error one of them met."""
        if self._thread.is_alive():
            self._queue.put(self._STOP)
            self._thread.join()
        self._raise()

    def close(self) -> None:
        """Stop early: the running job finishes, waiting ones are dropped; returns once the thread ended."""
        self._cancel.set()
        if self._thread.is_alive():
            self._queue.put(self._STOP)  # the thread drains the queue without running jobs
            self._thread.join()
