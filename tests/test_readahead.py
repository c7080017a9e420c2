from __future__ import annotations

import threading
import time

import pytest

from embedcache.readahead import ReadAhead


def test_results_come_in_order_and_errors_where_they_happened():
    assert list(ReadAhead(lambda x: x * x, range(10), depth=2)) == [x * x for x in range(10)]

    def make(x):
        if x == 3:
            raise ValueError("bad item 3")
        return x

    seen = []
    with pytest.raises(ValueError, match="bad item 3"):
        for value in ReadAhead(make, range(10)):
            seen.append(value)
    assert seen == [0, 1, 2]


def test_close_stops_the_thread_even_with_a_full_queue():
    reader = ReadAhead(lambda x: x, range(1_000_000), depth=1, name="test-readahead")
    next(iter(reader))
    reader.close()
    deadline = time.monotonic() + 5
    while any(t.name == "test-readahead" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "test-readahead" for t in threading.enumerate())
