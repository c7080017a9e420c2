from __future__ import annotations

import threading
import time

import pytest

from embedcache.runtime.readahead import ReadAhead, WriteBehind


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


def test_write_behind_runs_jobs_in_order_and_raises_their_error_in_the_submitter():
    done = []
    behind = WriteBehind(depth=2)
    for i in range(20):
        behind.submit(lambda i=i: done.append(i))
    behind.join()
    assert done == list(range(20))

    def fails():
        raise OSError(28, "No space left on device")

    done.clear()
    behind = WriteBehind(depth=1)
    behind.submit(lambda: done.append(0))
    behind.submit(fails)
    behind.submit(lambda: done.append(2))  # may be queued before the failure is known: it is dropped
    with pytest.raises(OSError, match="No space left"):
        for i in range(3, 100):  # the error comes back by a later submit, or by join
            behind.submit(lambda i=i: done.append(i))
            time.sleep(0.01)
        behind.join()
    behind.close()
    assert done == [0]


def test_write_behind_blocks_the_submitter_while_depth_jobs_wait():
    gate, started = threading.Event(), threading.Event()
    behind = WriteBehind(depth=1, name="test-writebehind")
    behind.submit(lambda: (started.set(), gate.wait()))
    started.wait(5)
    behind.submit(lambda: None)  # waits in the queue
    third = threading.Thread(target=behind.submit, args=(lambda: None,))
    third.start()
    third.join(0.3)
    assert third.is_alive()  # the store sets the pace
    gate.set()
    third.join(5)
    behind.join()


def test_write_behind_close_lets_the_running_job_finish_and_drops_the_rest():
    gate, started, done = threading.Event(), threading.Event(), []

    def slow():
        started.set()
        gate.wait(5)
        done.append("slow")

    behind = WriteBehind(depth=4, name="test-writebehind-close")
    behind.submit(slow)
    behind.submit(lambda: done.append("dropped"))
    started.wait(5)
    closer = threading.Thread(target=behind.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # close waits for the job writing into files the caller will close
    gate.set()
    closer.join(5)
    assert done == ["slow"] and not any(t.name == "test-writebehind-close" for t in threading.enumerate())
