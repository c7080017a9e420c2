"""Running a graph: an ONNX Runtime or OpenVINO session on the CPU's threads (one run at a time on every core, or
``streams`` runs at once, each on its share), OpenVINO's one Core of the process, and what OpenVINO compiles, kept
beside the graph in a folder per settings and checked against the sha256 recorded when it was written."""

from __future__ import annotations

import json
import logging
import queue
from pathlib import Path

import numpy as np

from embedcache.io.files import atomic_write_text, file_sha256
from embedcache.model.engines.graphs import check_weights_inside
from embedcache.runtime import cpu

logger = logging.getLogger(__name__)

#: The record of the blobs OpenVINO compiled into a folder of :func:`openvino_cache_dir`: each one's sha256.
BLOB_RECORD = "embedcache-blobs.json"

_OPENVINO_CORE = None


def openvino_core():
    """OpenVINO's one Core of this process. Its bindings set up their numpy interface on the first call that takes
    an array; two infer requests making that first call from two threads at once hung the process (2 and 3 in 8
    fresh processes here, OpenVINO 2026.4), so one array goes through here, on one thread, before any model runs."""
    global _OPENVINO_CORE
    if _OPENVINO_CORE is None:
        import openvino

        openvino.Tensor(np.zeros((1,), np.float32))
        _OPENVINO_CORE = openvino.Core()
    return _OPENVINO_CORE


def openvino_cache_dir(graph: Path, settings: dict) -> Path:
    """Where OpenVINO keeps what it compiled from ``graph`` under ``settings``: a folder of its own per settings
    (``openvino/f32-LATENCY-1x2`` beside the graph). OpenVINO's own cache key leaves the precision hint out (2026.4,
    CPU; the stream count too, by others' account): a bf16 compile of LiteMedSAM's encoder imported the blob an
    fp32 one had left, under the same name, and its first run crashed the process (a segfault in the plugin's JIT
    code: every bf16 encode after an fp32 one, in this process or an earlier one)."""
    name = f"{settings['INFERENCE_PRECISION_HINT']}-{settings['PERFORMANCE_HINT']}-" \
           f"{settings.get('NUM_STREAMS', 1)}x{settings['INFERENCE_NUM_THREADS']}"
    return Path(graph).parent / "openvino" / name


def session(engine: str, graph: Path, precision: str, *, keep_compiled: bool = True, streams: int = 1):
    """A function running the graph at ``graph`` in ``engine``: its float32 inputs, in order → its outputs (a list).
    It may be called from ``streams`` threads at once, each call then running on its own share of the cores
    (OpenVINO's throughput streams; ONNX Runtime's one session, ``cores // streams`` threads a run); with one stream
    a run has every core. OpenVINO keeps what it compiles in ``openvino/`` beside the graph (``keep_compiled``; its
    own cache, keyed by the graph, in a folder per settings: see :func:`openvino_cache_dir`): compiling the encoder
    and the decoder again took seconds at every start; each blob is checked against the sha256 recorded when it was
    written: :func:`_checked_blobs`). A graph that is not ONNX or reads weights from outside its folder is refused
    in one line first (:func:`~embedcache.model.engines.graphs.check_weights_inside`)."""
    check_weights_inside(graph)
    threads = cpu.cpu_threads()
    if engine == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, threads // streams)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        ort = onnxruntime.InferenceSession(str(graph), sess_options=options, providers=["CPUExecutionProvider"])
        names = [i.name for i in ort.get_inputs()]
        return lambda *xs: ort.run(None, dict(zip(names, xs)))  # a session runs from several threads at once
    if engine == "openvino":
        settings = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
                    "INFERENCE_NUM_THREADS": threads}
        settings.update({"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": streams} if streams > 1
                        else {"PERFORMANCE_HINT": "LATENCY"})
        blobs = openvino_cache_dir(graph, settings) if keep_compiled else None
        kept = _checked_blobs(blobs) if blobs is not None else None
        if kept is not None:  # None: a blob that failed its check could not be removed; compile without the cache
            settings["CACHE_DIR"] = str(blobs)
        compiled = openvino_core().compile_model(str(graph), "CPU", settings)
        if kept is not None:
            _record_blobs(blobs, kept)
        free = queue.SimpleQueue()  # one infer request per stream: a call takes one, runs, and gives it back
        for _ in range(streams):
            free.put(compiled.create_infer_request())
        outputs = len(compiled.outputs)

        def run(*xs):
            request = free.get()
            try:
                result = request.infer(dict(enumerate(xs)))
                return [result[i].copy() for i in range(outputs)]
            finally:
                free.put(request)

        return run
    raise ValueError(engine)


def runner(engine: str, graph: Path, precision: str, streams: int = 1):
    """A function running the encoder graph at ``graph`` in ``engine``: one ``(1, 3, S, S)`` float32 input → its
    embedding (callable from ``streams`` threads at once)."""
    run = session(engine, graph, precision, streams=streams)
    return lambda x: run(x)[0]


def _checked_blobs(folder: Path) -> dict[str, tuple] | None:
    """Check what OpenVINO compiled into ``folder`` (embedcache's own, per settings: :func:`openvino_cache_dir`)
    against :data:`BLOB_RECORD` before OpenVINO imports it, unchecked (4 KiB flipped in a blob changed a
    prediction, exit 0): a blob whose sha256 differs from the record's, or that the record does not hold, is removed,
    and OpenVINO compiles it again. Returns the blobs kept, name → (size, mtime, sha256); None where one that failed
    could not be removed (the folder is then not to be used)."""
    record = folder / BLOB_RECORD
    try:
        held = json.loads(record.read_text())["sha256"]
        held = held if isinstance(held, dict) else {}
    except (OSError, ValueError, TypeError, KeyError):
        held = {}  # no record (or not ours): every blob is unknown
    kept = {}
    for blob in sorted(folder.glob("*.blob")):
        why = f"differs from the sha256 {record.name} holds" if blob.name in held else f"is not in {record.name}"
        try:
            stat = blob.stat()
            digest = file_sha256(blob)
            if held.get(blob.name) == digest:
                kept[blob.name] = (stat.st_size, stat.st_mtime_ns, digest)
                continue
            blob.unlink()
            logger.warning(f"{blob}: {why}; removed, OpenVINO compiles it again")
        except FileNotFoundError:
            pass  # another process removed it first
        except OSError as exc:
            logger.warning(f"{blob}: {why} and cannot be removed ({exc.strerror}); compiling without OpenVINO's cache")
            return None
    return kept


def _record_blobs(folder: Path, kept: dict[str, tuple]) -> None:
    """Record the sha256 of every blob in ``folder`` once OpenVINO has written them, atomically (a blob
    :func:`_checked_blobs` kept, unchanged since, is not read again); a blob left unrecorded (a folder that cannot
    be written) is removed and compiled again next time."""
    blobs = {}
    try:
        for blob in sorted(folder.glob("*.blob")):
            stat, was = blob.stat(), kept.get(blob.name)
            same = was is not None and was[:2] == (stat.st_size, stat.st_mtime_ns)
            blobs[blob.name] = was[2] if same else file_sha256(blob)
        if blobs != {name: was[2] for name, was in kept.items()}:
            atomic_write_text(folder / BLOB_RECORD, json.dumps({"sha256": blobs}, indent=2) + "\n")
    except OSError:
        pass
