"""How many slices a graph engine runs at once on this CPU: the timing both it and ``--engine auto`` use
(:func:`time_pipelined`), the choice (:func:`pick_streams`), and its record beside the graph, keyed by the CPU, its
threads and the engines' versions (:func:`machine_key`); a record is only read, never trusted
(:func:`record_fault`)."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

# MAX_STREAMS: the most slices at once --streams allows; a record holding more (or more than this CPU's threads) is
# measured again, never used
from embedcache.config import MAX_STREAMS
from embedcache.io.files import atomic_write_text
from embedcache.model.engines.names import installed
from embedcache.model.engines.sessions import runner
from embedcache.model.engines.store import example_input
from embedcache.runtime import cpu

logger = logging.getLogger(__name__)

#: A graph engine runs more slices at once only where that is at least this much faster per slice (a lone slice then
#: runs on fewer cores).
STREAMS_GAIN = 0.03


#: What a measurement waits for before it times anything (:func:`timing_waits_for`); None: nothing.
_BEFORE_TIMING: ContextVar = ContextVar("embedcache_before_timing", default=None)


@contextmanager
def timing_waits_for(settle):
    """Inside, a measurement of engines or streams first calls ``settle()`` (predict: wait for the first input's read,
    which ran beside the model's loading), so that what it times has the cores to itself; nothing waits where no
    measurement runs, as when a record answers."""
    token = _BEFORE_TIMING.set(settle)
    try:
        yield
    finally:
        _BEFORE_TIMING.reset(token)


def settle_before_timing() -> None:
    """Wait for what :func:`timing_waits_for` named, if anything."""
    settle = _BEFORE_TIMING.get()
    if settle is not None:
        settle()


def stream_counts(threads: int) -> list[int]:
    """The slices-at-once a measurement tries: 1 and 2, and 4 on eight cores or more."""
    return [1] + ([2] if threads >= 2 else []) + ([4] if threads >= 8 else [])


def pick_streams(seconds: dict[int, float]) -> int:
    """The slices-at-once to run: the most that each time paid :data:`STREAMS_GAIN` over the fewer."""
    chosen = 1
    for k in sorted(seconds)[1:]:
        if seconds[k] <= (1 - STREAMS_GAIN) * seconds[chosen]:
            chosen = k
    return chosen


def time_pipelined(runners: dict, example: np.ndarray, slices: int, rounds: int = 2) -> dict:
    """Seconds per slice of each ``(make, streams)`` in ``runners`` (``make()`` builds the function that runs one
    slice): ``slices`` slices a round kept ``streams`` in flight (as predict's walk and encode feed them), the
    faster of ``rounds`` rounds, runner by runner in turn. Each round builds its runner afresh, warms it up on
    ``streams`` slices and lets it go before the next is built: OpenVINO's compiled models share the cores, and one
    kept beside another runs slower than alone."""
    timed = {key: [] for key in runners}
    for _ in range(rounds):
        for key, (make, k) in runners.items():
            run = make()
            with ThreadPoolExecutor(k) as pool:
                list(pool.map(lambda _: run(example), range(k)))  # the warm-up: first-call allocations, kernels
                started = time.perf_counter()
                list(pool.map(lambda _: run(example), range(slices)))
                timed[key].append((time.perf_counter() - started) / slices)
            run = None  # let it go before the next is built
            gc.collect()
    return {key: min(v) for key, v in timed.items()}


def machine_key() -> str:
    """What a measurement holds for: the CPU (:func:`~embedcache.runtime.cpu.cpu_identity`), the threads and the
    engines' versions."""
    import torch

    model = cpu.cpu_identity()
    versions = [f"torch{torch.__version__}"]
    for module in ("onnxruntime", "openvino"):
        if installed(module):
            try:
                versions.append(f"{module}{version(module)}")
            except PackageNotFoundError:
                pass
    return hashlib.sha256(f"{model}|{cpu.cpu_threads()}|{'|'.join(versions)}".encode()).hexdigest()[:16]


def record_fault(held) -> str | None:
    """What in a streams or ``--engine auto`` record (a JSON object) lies outside what a measurement here writes, or
    None: slices at once (``streams``: one, or one per engine) outside 1 to :data:`MAX_STREAMS` or above this CPU's
    threads, seconds a slice (``seconds_per_slice``, ``seconds_per_slice_by_streams``) not finite and positive. A
    record is only read, never trusted: 100000 slices at once would have started as many threads."""
    if not isinstance(held, dict):
        return "is not a JSON object"
    most = min(MAX_STREAMS, cpu.cpu_threads())
    streams = held.get("streams", 1)
    for k in streams.values() if isinstance(streams, dict) else [streams]:
        if type(k) is not int or not 1 <= k <= most:
            return f"holds {k!r} slices at once (1 to {most} here)"
    for field in ("seconds_per_slice", "seconds_per_slice_by_streams"):
        seconds = held.get(field, {})
        for v in seconds.values() if isinstance(seconds, dict) else [seconds]:
            if type(v) not in (int, float) or not (math.isfinite(v) and v > 0):
                return f"holds {v!r} seconds a slice"
    return None


def streams_record(graph: Path, engine: str, precision: str) -> Path:
    """Where the slices at once measured for ``graph`` in ``engine`` at ``precision`` on this CPU are recorded
    (beside the graph)."""
    return Path(graph).parent / f"streams-{Path(graph).stem}-{engine}-{precision}-{machine_key()}.json"


def keep_streams(graph: Path, engine: str, precision: str, seconds: dict[int, float]) -> int:
    """Record what a measurement chose (``seconds``: per slice by slices at once) beside the graph; returns it."""
    chosen = pick_streams(seconds)
    try:
        atomic_write_text(streams_record(graph, engine, precision), json.dumps({
            "graph": Path(graph).name, "engine": engine, "precision": precision, "streams": chosen,
            "threads": cpu.cpu_threads(), "seconds_per_slice": {str(k): round(v, 4) for k, v in seconds.items()}},
            indent=2) + "\n")
    except OSError:
        pass  # the choice stands for this run; the next one measures again
    return chosen


def choose_streams(engine: str, graph: Path, precision: str, backbone) -> int:
    """How many slices ``engine`` encodes at once through ``graph`` on this CPU: one on all the cores, or several,
    each on its share (the CPU's batch: which pays depends on the CPU, see docs/cpu-engines.md). Measured once per
    graph, precision and CPU (:func:`time_pipelined`: four slices a round on two cores, eight on more, two rounds;
    more than one at once only where it is :data:`STREAMS_GAIN` faster per slice) and recorded beside the graph;
    ``--engine auto``'s measurement records it too. What :func:`timing_waits_for` names is waited for first: other
    work of this process (predict's first read) takes a core and makes one at a time look faster."""
    threads = cpu.cpu_threads()
    if threads < 2:
        return 1
    record = streams_record(graph, engine, precision)
    try:
        held = json.loads(record.read_text())
        fault = record_fault(held) or (None if "streams" in held else "holds no slices at once")
        if fault is None:
            return held["streams"]
        logger.warning(f"{record}: {fault}; measuring again")
    except (OSError, ValueError):
        pass
    logger.info(f"{engine}: timing one slice at a time against several at once (once for this CPU and graph)")
    settle_before_timing()
    counts = stream_counts(threads)
    runners = {k: (partial(runner, engine, graph, precision, k), k) for k in counts}
    seconds = time_pipelined(runners, example_input(backbone), 2 * counts[-1])
    chosen = keep_streams(graph, engine, precision, seconds)
    logger.info(f"{engine}: {chosen} slice(s) at once (" + ", ".join(f"{k}: {v:.2f} s/slice" for k, v in seconds.items())
        + f"); {record}")
    return chosen
