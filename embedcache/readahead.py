"""Work ahead in a thread: the next cases read (encode) or batches built (streamed finetune) while
the current one computes. numpy, h5py, nibabel's zlib and torch release the GIL for the heavy parts.
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
