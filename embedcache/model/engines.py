"""Where the frozen image encoder runs (``--engine``) and at what precision (``--precision``).

The CVPR 2024 "MedSAM on Laptop" winners got their CPU speed from the inference engine, not the
model. Beside eager PyTorch, embedcache runs the image encoder in ONNX Runtime or OpenVINO on the
CPU: the encoder is exported once per backbone and weights (their sha256) with ``torch.onnx.export``
into the user cache folder (``$EMBEDCACHE_CACHE``, else ``$XDG_CACHE_HOME/embedcache``, else
``~/.cache/embedcache``), beside a record of its own sha256, and re-exported when either changes;
nothing is downloaded. A fresh export is checked against eager PyTorch on one seeded input before it
is kept. Each engine has :class:`~embedcache.model.encoder.ImageEncoder`'s interface, so ``encode``
and ``predict`` run them unchanged. ``predict`` also runs the prompt encoder and mask decoder as a
graph (:class:`GraphDecoder`, exported once per backbone weights and decoder file, run at the encoder's
precision), and builds no eager model at all once both graphs exist; OpenVINO keeps what it compiles
beside them. A graph engine encodes ``--streams`` slices at once, each on its share of the cores (0, the
default: whichever of one or several was faster per slice in a short measurement, once per graph and CPU:
:func:`choose_streams`).

``--engine auto`` (the default) is torch on CUDA (and under torchrun); on a CPU it is the fastest
fp32 engine installed whose embeddings equal eager PyTorch's within :data:`EQUAL_TOLERANCE`, found by
a short measurement once per backbone, weights and CPU and recorded in the cache folder. fp32 engines
agree within that tolerance (tested, with the vanilla decoder's Dice on the phantom equal to 4
decimals), so the signature records the engine without comparing it. ``--precision bf16`` (OpenVINO
on a CPU with bf16 instructions) changes the embeddings: it is part of what a cache and a decoder
must share, and ``auto`` never chooses it; its Dice cost is measured in ``benchmarks/engines.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

# MAX_STREAMS: the most slices at once --streams allows; a record holding more (or more than this CPU's threads) is
# measured again, never used
from embedcache.config import MAX_STREAMS, check_engine_names
from embedcache.errors import EmbedcacheError, UsageError

#: The engines that run an exported graph on the CPU, with the modules each needs.
GRAPH_ENGINES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}
#: fp32 engines whose embeddings differ from eager PyTorch's by no more than this are interchangeable.
EQUAL_TOLERANCE = 1e-4
#: What ``pip install`` brings the engines in with.
EXTRA = "pip install 'embedcache[cpu-fast]'"
#: ONNX opset of the exported graphs.
OPSET = 17
#: A fresh export must give the eager encoder's embeddings within this (max abs difference).
EXPORT_TOLERANCE = 1e-3
#: A graph file that would be larger than this keeps its weights in one file beside it (``NAME.onnx.data``): one
#: protobuf holds at most 2 GiB, and SAM ViT-H's encoder weighs 2.5 GB in float32.
EXTERNAL_DATA_BYTES = 1 << 30
#: The record of the blobs OpenVINO compiled into a folder of :func:`openvino_cache_dir`: each one's sha256.
BLOB_RECORD = "embedcache-blobs.json"


def cache_folder() -> Path:
    """The user cache folder the exported graphs live in."""
    if os.environ.get("EMBEDCACHE_CACHE"):
        return Path(os.environ["EMBEDCACHE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "embedcache"


def check_engine(engine: str, device_type: str = "cpu", precision: str = "fp32", streams: int = 0) -> None:
    """Refuse an unknown engine or precision, an engine whose library is missing (naming the extra), a CPU
    engine on CUDA, bf16 where it cannot run, or ``--streams`` for torch."""
    check_engine_names(engine, precision, streams)
    if streams and engine == "torch":
        raise UsageError(f"--streams {streams}: slices at once are onnxruntime's and openvino's; add --engine openvino, "
                         "or drop --streams")
    if precision != "fp32" and engine != "openvino":
        raise UsageError(f"--precision {precision} runs through OpenVINO: add --engine openvino, or use --precision fp32")
    if engine in GRAPH_ENGINES:
        if device_type != "cpu":
            raise UsageError(f"--engine {engine} runs on the CPU; pass --device cpu, or --engine torch on CUDA")
        missing = [m for m in GRAPH_ENGINES[engine] if not _installed(m)]
        if missing:
            raise UsageError(f"--engine {engine} needs {' and '.join(missing)}: {EXTRA}")
    if precision == "bf16" and "BF16" not in _openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise UsageError("--precision bf16: this CPU has no bf16 instructions (OpenVINO reports none); use --precision fp32")


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def installed_engines() -> list[str]:
    """The CPU engines whose libraries are installed here, torch first."""
    return ["torch"] + [e for e, modules in GRAPH_ENGINES.items() if all(_installed(m) for m in modules)]


def cpu_threads() -> int:
    """The cores this process may run on: its affinity mask, capped by a cgroup CPU quota (a container's
    ``--cpus``) where one is set, for the engines' intra-op threads."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cores = max(1, os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return max(1, min(cores, quota)) if quota else cores


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPUs a cgroup quota allows (rounded up), from cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``;
    None where there is no quota."""
    import math

    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def _module(given):
    """A module given as itself or as the function that loads it (called only when an export needs it)."""
    import torch

    return given if isinstance(given, torch.nn.Module) else given()


def _exported(name: str, key: dict, module, examples: tuple, *, inputs: list[str], outputs: dict[str, tuple],
              engine: str, folder: Path | None, what: str, log=print) -> Path:
    """The ONNX graph ``name`` in the cache folder: the one exported before (its record holding ``key`` and the
    graph's own sha256, the graph taking ``inputs`` shaped as the ``examples`` and giving ``outputs``, name → shape,
    its weights inside it or in the one data file its record holds: :func:`_graph_fault`), else a fresh export of
    ``module`` (a module, or the function that loads it), checked in ``engine`` against eager PyTorch on the seeded
    ``examples`` and kept with its record."""
    import torch

    from embedcache.io.files import PARTIAL, WRITE_ERRNOS, atomic_write_text, commit, write_error
    from embedcache.model.backbones import file_sha256

    folder = Path(folder) if folder is not None else cache_folder()
    graph, record = folder / f"{name}.onnx", folder / f"{name}.json"
    data = graph.with_name(graph.name + ".data")
    if graph.is_file() and record.is_file():
        fault = "does not match its record"
        try:
            held = json.loads(record.read_text())
            if all(held.get(k) == v for k, v in key.items()) and held.get("sha256") == file_sha256(graph) and (
                    held.get("data_sha256") is None or held["data_sha256"] == file_sha256(data)):  # its weights
                # a record vouches for a graph only as far as it was written with it: one replaced with its record
                # updated, or emptied, would reach the engines, and their tracebacks, unless it is what we export
                fault = _graph_fault(graph, dict(zip(inputs, (x.shape for x in examples))), outputs,
                                     data.name if held.get("data_sha256") is not None else None)
                if fault is None:
                    return graph
        except (OSError, ValueError, AttributeError):
            pass
        log(f"{graph}: {fault}; exporting it again")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbedcacheError(f"{folder}: cannot hold the exported {what} ({exc.strerror}); set EMBEDCACHE_CACHE to "
                              "a writable folder") from None
    log(f"exporting {what} to ONNX (once per weights): {graph}")
    model = _module(module).float().eval()
    tensors = tuple(torch.from_numpy(x) for x in examples)
    # a folder of its own: an export over 2 GiB writes each weight as a file beside the graph, named by the tensor
    # alone (another graph's weights of the same name would be overwritten); they are gathered into one data file
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=PARTIAL, dir=folder))
    except OSError as exc:
        raise write_error(exc, graph) from None
    try:
        tmp = work / graph.name
        with torch.inference_mode():
            with warnings.catch_warnings():  # the TorchScript exporter's notes on constant folding are not the user's
                warnings.simplefilter("ignore")
                torch.onnx.export(model, tensors, str(tmp), opset_version=OPSET, dynamo=False, input_names=inputs,
                                  output_names=list(outputs))
            apart = _weights_apart(tmp, data.name)
            want = model(*tensors)
        want = [t.numpy() for t in (want if isinstance(want, (tuple, list)) else (want,))]
        got = _session(engine, tmp, "fp32", keep_compiled=False)(*examples)
        difference = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
        if not difference <= EXPORT_TOLERANCE:
            raise EmbedcacheError(f"{graph}: the exported {what} differs from PyTorch's by {difference:.2g} "
                                  f"(more than {EXPORT_TOLERANCE:g}) in {engine}; use --engine torch")
        weights = {"data_sha256": file_sha256(work / data.name)} if apart else {}
        if apart:  # the weights first: a graph never names a data file that is not yet there
            commit(work / data.name, data)
        commit(tmp, graph)
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:
            raise write_error(exc, graph) from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    atomic_write_text(record, json.dumps({**key, "sha256": file_sha256(graph), **weights, "opset": OPSET,
                                          "torch": torch.__version__, "max_abs_difference_from_torch": difference,
                                          "checked_in": engine}, indent=2) + "\n")
    return graph


def _weights_apart(graph: Path, location: str) -> bool:
    """Where the fresh export at ``graph`` is larger than :data:`EXTERNAL_DATA_BYTES` (or the exporter already
    wrote its weights beside it, as it does past 2 GiB), its weights go into one file ``location`` beside it, named
    in the graph; true where they did."""
    import onnx

    others = [p for p in graph.parent.iterdir() if p != graph]
    if not others and graph.stat().st_size <= EXTERNAL_DATA_BYTES:
        return False
    model = onnx.load(str(graph))  # with any weights the exporter wrote beside it
    for path in others:
        path.unlink()
    onnx.save_model(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=1024)
    return True


def _tensors(graph):
    """Every tensor an ONNX ``GraphProto`` holds: its initializers (sparse ones too) and those in its nodes' attributes,
    in subgraphs too: any of them may keep its data in a file of its own."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            yield from ([attribute.t] if attribute.HasField("t") else []) + list(attribute.tensors)
            for sparse in ([attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []) + list(
                    attribute.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(subgraph)


def _weight_files(model) -> set[str]:
    """Where ``model`` (an ONNX ``ModelProto`` loaded without its external data) keeps weights outside itself: each
    external tensor's ``location`` as written ("" for one that names none)."""
    import onnx

    return {next((e.value for e in t.external_data if e.key == "location"), "") for t in _tensors(model.graph)
            if t.data_location == onnx.TensorProto.EXTERNAL}


def _outside(location: str) -> bool:
    """Whether an external-data ``location`` is absolute or leaves the graph's folder (or is empty): the engines
    would read any file the user may read, or refuse it with their own exception."""
    posix = PurePosixPath(location.replace("\\", "/"))
    return not location or posix.is_absolute() or bool(PureWindowsPath(location).anchor) or ".." in posix.parts


def _load_graph(graph: Path):
    """The ONNX model at ``graph`` without its external data, or the reason it is none."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(graph), load_external_data=False)
    except (OSError, ValueError, DecodeError) as exc:
        return None, f"is not an ONNX graph ({type(exc).__name__})"
    return (model, None) if len(model.graph.node) else (None, "is not an ONNX graph (it holds no graph)")


def _io_fault(kind: str, values, want: dict[str, tuple]) -> str | None:
    """Why a graph's ``values`` (its inputs or outputs) are not the float32 tensors ``want`` names (name → shape;
    a size the graph leaves open passes), or None."""
    import onnx

    names = [v.name for v in values]
    if names != list(want):
        return f"its {kind} are {names}, not {list(want)}"
    for value, shape in zip(values, want.values()):
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if tensor.elem_type != onnx.TensorProto.FLOAT or len(dims) != len(shape) or any(
                d is not None and d != s for d, s in zip(dims, shape)):
            return f"its {kind[:-1]} {value.name} is {dims} of type {tensor.elem_type}, not float32 {list(shape)}"
    return None


#: Graphs (path, size, mtime, inode) whose weights were found inside their folder, so that the engines' many
#: sessions of one graph (a measurement builds one per round) read it once.
_INSIDE = set()


def _identity(graph: Path) -> tuple:
    """What names one version of the file at ``graph``: a graph written again is read again."""
    stat = Path(graph).stat()
    return str(Path(graph).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino


def _graph_fault(graph: Path, inputs: dict[str, tuple], outputs: dict[str, tuple], data: str | None) -> str | None:
    """Why the cached graph at ``graph`` is not one embedcache exported, or None: not an ONNX graph (an empty file),
    inputs or outputs other than ``inputs`` and ``outputs`` (names in order, float32, ranks and fixed sizes), or
    weights kept anywhere but in the data file ``data`` beside it (None: its record holds none, so every weight lies
    in the graph)."""
    model, fault = _load_graph(graph)
    if fault:
        return fault
    fault = _io_fault("inputs", model.graph.input, inputs) or _io_fault("outputs", model.graph.output, outputs)
    if fault:
        return fault
    files = _weight_files(model) - {data}
    if files:
        return f"its weights are read from {sorted(files)[0]!r}, which its record does not hold"
    _INSIDE.add(_identity(graph))
    return None


def _check_weights_inside(graph: Path) -> None:
    """Refuse, in one line naming it, a graph that is not ONNX or reads weights from outside its folder, before an
    engine sees it (each refused the path with its own exception, ONNX Runtime's and OpenVINO's, a traceback)."""
    if _identity(graph) in _INSIDE:
        return
    model, fault = _load_graph(graph)
    if fault is None:
        outside = sorted(location for location in _weight_files(model) if _outside(location))
        fault = f"reads its weights from {outside[0]!r}, outside its folder" if outside else None
    if fault:
        raise EmbedcacheError(f"{graph}: {fault}; delete it (embedcache exports its own graphs again)")
    _INSIDE.add(_identity(graph))


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def exported_encoder(backbone, image_encoder, checkpoint_sha256: str, *, engine: str = "onnxruntime",
                     folder: Path | None = None, log=print) -> Path:
    """The ONNX graph of ``backbone``'s image encoder (a module, or the function that loads it) with the weights of
    sha256 ``checkpoint_sha256``: the one exported before, else a fresh export, checked in ``engine``."""
    name = f"{backbone.name}-{checkpoint_sha256[:16]}-opset{OPSET}-torch{_torch_version()}"
    return _exported(name, {"backbone": backbone.name, "checkpoint_sha256": checkpoint_sha256}, image_encoder,
                     (_example(backbone),), inputs=["image"], outputs={"embedding": (1, 256, 64, 64)}, engine=engine,
                     folder=folder, what=f"{backbone.name}'s image encoder", log=log)


#: Bumped when :class:`~embedcache.model.decoder.AllMasks` changes what the exported decoder computes.
DECODER_GRAPH = 1


def exported_decoder(backbone, heads, checkpoint_sha256: str, decoder_sha256: str, *, engine: str = "onnxruntime",
                     folder: Path | None = None, log=print) -> Path:
    """The ONNX graph of the prompt encoder and mask decoder (``heads``: an
    :class:`~embedcache.model.decoder.AllMasks`, or the function that loads it) for one embedding and one box:
    ``backbone``'s prompt encoder from the weights of sha256 ``checkpoint_sha256`` and the mask decoder of
    ``decoder_sha256`` (a trained decoder file's, or ``"vanilla"``: the backbone's own)."""
    name = (f"decoder-{backbone.name}-{checkpoint_sha256[:16]}-{decoder_sha256[:16]}-v{DECODER_GRAPH}-opset{OPSET}-"
            f"torch{_torch_version()}")
    rng = np.random.default_rng(0)
    size = backbone.input_size
    examples = (rng.standard_normal((1, 256, 64, 64)).astype(np.float32) * 0.5,
                np.array([[0.25 * size, 0.3 * size, 0.55 * size, 0.6 * size]], np.float32))
    return _exported(name, {"backbone": backbone.name, "checkpoint_sha256": checkpoint_sha256,
                            "decoder_sha256": decoder_sha256, "format": DECODER_GRAPH}, heads, examples,
                     inputs=["embedding", "box"], outputs={"masks": (1, 4, 256, 256), "iou": (1, 4)}, engine=engine,
                     folder=folder, what=f"{backbone.name}'s mask decoder", log=log)


def _example(backbone) -> np.ndarray:
    """The seeded encoder input (already normalised, ``(1, 3, S, S)``) exports and measurements are checked on."""
    size = backbone.input_size
    return np.random.default_rng(0).uniform(0, 1, (1, 3, size, size)).astype(np.float32)


_OPENVINO_CORE = None


def _openvino_core():
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


def _session(engine: str, graph: Path, precision: str, *, keep_compiled: bool = True, streams: int = 1, log=print):
    """A function running the graph at ``graph`` in ``engine``: its float32 inputs, in order → its outputs (a list).
    It may be called from ``streams`` threads at once, each call then running on its own share of the cores
    (OpenVINO's throughput streams; ONNX Runtime's one session, ``cores // streams`` threads a run); with one stream
    a run has every core. OpenVINO keeps what it compiles in ``openvino/`` beside the graph (``keep_compiled``; its
    own cache, keyed by the graph, in a folder per settings: see ``openvino_cache_dir``): compiling the encoder and
    the decoder again took seconds at every start; each blob is checked against the sha256 recorded when it was
    written: :func:`_checked_blobs`). A graph that is not ONNX or reads weights from outside its folder is refused
    in one line first (:func:`_check_weights_inside`)."""
    import queue

    _check_weights_inside(graph)
    threads = cpu_threads()
    if engine == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, threads // streams)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = onnxruntime.InferenceSession(str(graph), sess_options=options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda *xs: session.run(None, dict(zip(names, xs)))  # a session runs from several threads at once
    if engine == "openvino":
        settings = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
                    "INFERENCE_NUM_THREADS": threads}
        settings.update({"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": streams} if streams > 1
                        else {"PERFORMANCE_HINT": "LATENCY"})
        blobs = openvino_cache_dir(graph, settings) if keep_compiled else None
        kept = _checked_blobs(blobs, log) if blobs is not None else None
        if kept is not None:  # None: a blob that failed its check could not be removed; compile without the cache
            settings["CACHE_DIR"] = str(blobs)
        compiled = _openvino_core().compile_model(str(graph), "CPU", settings)
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


def _checked_blobs(folder: Path, log=print) -> dict[str, tuple] | None:
    """Check what OpenVINO compiled into ``folder`` (embedcache's own, per settings: :func:`openvino_cache_dir`)
    against :data:`BLOB_RECORD` before OpenVINO imports it, unchecked (4 KiB flipped in a blob changed a
    prediction, exit 0): a blob whose sha256 differs from the record's, or that the record does not hold, is removed,
    and OpenVINO compiles it again. Returns the blobs kept, name → (size, mtime, sha256); None where one that failed
    could not be removed (the folder is then not to be used)."""
    from embedcache.model.backbones import file_sha256

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
            log(f"{blob}: {why}; removed, OpenVINO compiles it again")
        except FileNotFoundError:
            pass  # another process removed it first
        except OSError as exc:
            log(f"{blob}: {why} and cannot be removed ({exc.strerror}); compiling without OpenVINO's cache")
            return None
    return kept


def _record_blobs(folder: Path, kept: dict[str, tuple]) -> None:
    """Record the sha256 of every blob in ``folder`` once OpenVINO has written them, atomically (a blob
    :func:`_checked_blobs` kept, unchanged since, is not read again); a blob left unrecorded (a folder that cannot
    be written) is removed and compiled again next time."""
    from embedcache.io.files import atomic_write_text
    from embedcache.model.backbones import file_sha256

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


def _runner(engine: str, graph: Path, precision: str, streams: int = 1, log=print):
    """A function running the encoder graph at ``graph`` in ``engine``: one ``(1, 3, S, S)`` float32 input → its
    embedding (callable from ``streams`` threads at once)."""
    run = _session(engine, graph, precision, streams=streams, log=log)
    return lambda x: run(x)[0]


#: A graph engine runs more slices at once only where that is at least this much faster per slice (a lone slice then
#: runs on fewer cores).
STREAMS_GAIN = 0.03


def _stream_counts(threads: int) -> list[int]:
    """The slices-at-once a measurement tries: 1 and 2, and 4 on eight cores or more."""
    return [1] + ([2] if threads >= 2 else []) + ([4] if threads >= 8 else [])


def _time_pipelined(runners: dict, example: np.ndarray, slices: int, rounds: int = 2) -> dict:
    """Seconds per slice of each ``(make, streams)`` in ``runners`` (``make()`` builds the function that runs one
    slice): ``slices`` slices a round kept ``streams`` in flight (as predict's walk and encode feed them), the
    faster of ``rounds`` rounds, runner by runner in turn. Each round builds its runner afresh, warms it up on
    ``streams`` slices and lets it go before the next is built: OpenVINO's compiled models share the cores, and one
    kept beside another ran slower than alone (1.02 against 1.16 s a slice, the same model and settings)."""
    import gc
    from concurrent.futures import ThreadPoolExecutor

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


def _streams_record(graph: Path, engine: str, precision: str) -> Path:
    return Path(graph).parent / f"streams-{Path(graph).stem}-{engine}-{precision}-{_machine_key()}.json"


def _bounds_fault(held) -> str | None:
    """What in a streams or ``--engine auto`` record (a JSON object) lies outside what a measurement here writes, or
    None: slices at once (``streams``: one, or one per engine) outside 1 to :data:`MAX_STREAMS` or above this CPU's
    threads, seconds a slice (``seconds_per_slice``, ``seconds_per_slice_by_streams``) not finite and positive. A
    record is only read, never trusted: 100000 slices at once would have started as many threads."""
    if not isinstance(held, dict):
        return "is not a JSON object"
    most = min(MAX_STREAMS, cpu_threads())
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


def _pick_streams(seconds: dict[int, float]) -> int:
    """The slices-at-once to run: the most that each time paid :data:`STREAMS_GAIN` over the fewer."""
    chosen = 1
    for k in sorted(seconds)[1:]:
        if seconds[k] <= (1 - STREAMS_GAIN) * seconds[chosen]:
            chosen = k
    return chosen


def _keep_streams(graph: Path, engine: str, precision: str, seconds: dict[int, float]) -> int:
    """Record what a measurement chose (``seconds``: per slice by slices at once) beside the graph; returns it."""
    from embedcache.io.files import atomic_write_text

    chosen = _pick_streams(seconds)
    try:
        atomic_write_text(_streams_record(graph, engine, precision), json.dumps({
            "graph": Path(graph).name, "engine": engine, "precision": precision, "streams": chosen,
            "threads": cpu_threads(), "seconds_per_slice": {str(k): round(v, 4) for k, v in seconds.items()}},
            indent=2) + "\n")
    except OSError:
        pass  # the choice stands for this run; the next one measures again
    return chosen


def choose_streams(engine: str, graph: Path, precision: str, backbone, *, settle=None, log=print) -> int:
    """How many slices ``engine`` encodes at once through ``graph`` on this CPU: one on all the cores, or several,
    each on its share (the CPU's batch: on the AMD EPYC's two cores, TinyViT in OpenVINO ran predict about 1.1x faster
    as two one-core runs than as one two-core run). Measured once per graph, precision and CPU
    (:func:`_time_pipelined`: four slices a round on two cores, eight on more, two rounds; more than one at once
    only where it is :data:`STREAMS_GAIN` faster per slice) and recorded beside the graph; ``--engine auto``'s
    measurement records it too. ``settle()``, where given, is called before the timing: it waits for other work
    of this process (predict's first read, which took a core and made one at a time look faster)."""
    threads = cpu_threads()
    if threads < 2:
        return 1
    record = _streams_record(graph, engine, precision)
    try:
        held = json.loads(record.read_text())
        fault = _bounds_fault(held) or (None if "streams" in held else "holds no slices at once")
        if fault is None:
            return held["streams"]
        log(f"{record}: {fault}; measuring again")
    except (OSError, ValueError):
        pass
    log(f"{engine}: timing one slice at a time against several at once (once for this CPU and graph)")
    if settle is not None:
        settle()
    counts = _stream_counts(threads)
    runners = {k: (partial(_runner, engine, graph, precision, k, log=log), k) for k in counts}
    seconds = _time_pipelined(runners, _example(backbone), 2 * counts[-1])
    chosen = _keep_streams(graph, engine, precision, seconds)
    log(f"{engine}: {chosen} slice(s) at once (" + ", ".join(f"{k}: {v:.2f} s/slice" for k, v in seconds.items())
        + f"); {record}")
    return chosen


class GraphEncoder:
    """``backbone``'s image encoder as an exported graph run by ONNX Runtime or OpenVINO on the CPU, with
    :class:`~embedcache.model.encoder.ImageEncoder`'s interface (slices in, embeddings as torch tensors out).
    The graph takes one slice a run (TinyViT's export fixes the batch at 1); the CPU's batch is ``streams`` runs at
    once, each on its share of the cores (``streams``: given, else :func:`choose_streams` measures it), so encode
    hands it ``batch_size = streams`` slices at a time and predict encodes that many ahead of its walk. The engines
    release the GIL: encode's reader thread prepares the next case meanwhile."""

    def __init__(self, engine: str, backbone, image_encoder, checkpoint_sha256: str, *, out_dtype,
                 precision: str = "fp32", streams: int = 0, folder: Path | None = None, settle=None, log=print):
        import torch

        self.engine, self.precision = engine, precision
        self.backbone, self.out_dtype = backbone, out_dtype
        self.device = torch.device("cpu")
        self.cuda = False
        self.graph = exported_encoder(backbone, image_encoder, checkpoint_sha256, engine=engine, folder=folder, log=log)
        self.streams = streams or choose_streams(engine, self.graph, precision, backbone, settle=settle, log=log)
        self.run = _runner(engine, self.graph, precision, self.streams, log=log)
        self.batch_size = self.streams
        self._pool = None

    def upload(self, slices):
        """Slices as one CPU tensor, as :meth:`ImageEncoder.upload <embedcache.model.encoder.ImageEncoder.upload>`
        makes them on the CPU (torch is imported only once an engine runs)."""
        from embedcache.model.encoder import ImageEncoder

        return ImageEncoder.upload(self, slices)

    def __call__(self, slices):
        """``(n, S, S)`` float32 slices in [0, 1] → ``(n, 256, 64, 64)`` embeddings (a CPU tensor, ``out_dtype``)."""
        import torch

        with torch.inference_mode():
            x = self.backbone.prepare(self.upload(slices)).float().numpy()
        parts = [x[i : i + 1] for i in range(len(x))]
        if len(parts) > 1 and self.streams > 1:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="embedcache-stream")
            out = list(self._pool.map(self.run, parts))
        else:
            out = [self.run(p) for p in parts]
        return torch.from_numpy(np.concatenate(out)).to(self.out_dtype)

    def to_host(self, embeddings):
        """The embeddings and whether they are finite, as ImageEncoder hands them over on the CPU."""
        from embedcache.model.encoder import ImageEncoder

        return ImageEncoder.to_host(self, embeddings)


class GraphDecoder:
    """The prompt encoder and mask decoder as one exported graph (:func:`exported_decoder`) run by ONNX Runtime or
    OpenVINO at ``precision`` (predict's: the encoder's, so bf16 with a bf16 encoder), in
    :func:`~embedcache.model.decoder.decode_boxes`'s place for box prompts: one embedding and one box a run (the
    box3d walk asks for one slice at a time), all four mask outputs out, the one asked for kept.
    Prompts with clicks, and boxes in ``(B, P, 4)`` batches, go to the eager modules, loaded when first needed
    (``load_heads()`` gives ``(prompt_encoder, mask_decoder)``)."""

    def __init__(self, engine: str, backbone, load_heads, checkpoint_sha256: str, decoder_sha256: str, *,
                 precision: str = "fp32", folder: Path | None = None, log=print):
        self.engine, self.precision, self.load_heads, self._heads = engine, precision, load_heads, None

        def all_masks():
            from embedcache.model.decoder import AllMasks

            return AllMasks(*self.heads())

        self.graph = exported_decoder(backbone, all_masks, checkpoint_sha256, decoder_sha256, engine=engine,
                                      folder=folder, log=log)
        self.run = _session(engine, self.graph, precision, log=log)

    def heads(self):
        """The eager ``(prompt_encoder, mask_decoder)``, loaded once."""
        if self._heads is None:
            self._heads = self.load_heads()
        return self._heads

    def __call__(self, embeddings, boxes, *, points=None, multimask_output: bool = False):
        """As :func:`~embedcache.model.decoder.decode_boxes` without its two modules: ``(N, 256, 64, 64)`` embeddings
        and ``(N, 4)`` boxes (encoder-input pixels) → ``(N, M, 256, 256)`` mask logits and ``(N, M)`` predicted IoU."""
        import torch

        if points is not None or boxes is None or boxes.dim() != 2:
            from embedcache.model.decoder import decode_boxes

            return decode_boxes(*self.heads(), embeddings, boxes, points=points, multimask_output=multimask_output)
        e = embeddings.detach().float().cpu().numpy()
        b = boxes.detach().float().cpu().numpy()
        runs = [self.run(e[i : i + 1], b[i : i + 1]) for i in range(len(b))]
        keep = slice(1, None) if multimask_output else slice(0, 1)
        masks = np.concatenate([m for m, _ in runs])[:, keep]
        iou = np.concatenate([i for _, i in runs])[:, keep]
        return torch.from_numpy(masks).to(embeddings.device), torch.from_numpy(iou).to(embeddings.device)


def _cpuinfo(text: str | None = None) -> dict[str, str]:
    """Linux ``/proc/cpuinfo`` (or ``text``) as its first value of each field: the first processor's, every core
    of one machine being alike; empty where there is none."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what :mod:`platform` says."""
    import platform

    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


#: The instruction sets that change which engine and precision run fastest (and whether bf16 runs at all).
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_identity(cpuinfo: str | None = None) -> str:
    """The CPU as a measurement is valid for: its model name, family and model numbers, and which of
    :data:`CPU_FEATURES` it has (Linux ``/proc/cpuinfo``, or the text given). The name alone is not enough: an
    "AMD EPYC" of a cloud machine was an AVX2 CPU without bf16 one day and an AVX-512 one with bf16 the next, and a
    home folder shared by a cluster's nodes would have answered one with the other's measurement."""
    fields = _cpuinfo(cpuinfo)
    if not fields:
        return cpu_name()
    flags = set(fields.get("flags", "").split())
    features = ",".join(f for f in CPU_FEATURES if f in flags)
    return (f"{fields.get('model name') or cpu_name()} (family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')}; {features or 'none of ' + ','.join(CPU_FEATURES)})")


def _machine_key() -> str:
    """What an ``auto`` measurement holds for: the CPU (:func:`cpu_identity`), the threads and the engines' versions."""
    import torch

    model = cpu_identity()
    versions = [f"torch{torch.__version__}"]
    for module in ("onnxruntime", "openvino"):
        if _installed(module):
            from importlib.metadata import PackageNotFoundError, version

            try:
                versions.append(f"{module}{version(module)}")
            except PackageNotFoundError:
                pass
    return hashlib.sha256(f"{model}|{cpu_threads()}|{'|'.join(versions)}".encode()).hexdigest()[:16]


def auto_record(backbone, checkpoint_sha256: str, folder: Path | None = None) -> Path:
    """Where ``--engine auto``'s measurement for ``backbone`` with the weights of sha256 ``checkpoint_sha256`` on this
    CPU is recorded (a JSON object whose ``chosen`` engine later runs answer with)."""
    folder = Path(folder) if folder is not None else cache_folder()
    return folder / f"auto-{backbone.name}-{checkpoint_sha256[:16]}-{_machine_key()}.json"


def choose_engine(backbone, load_image_encoder, checkpoint_sha256: str, *, device, folder: Path | None = None,
                  settle=None, log=print) -> str:
    """What ``--engine auto`` runs ``backbone``'s encoder with on ``device``: torch on CUDA or where no other engine
    is installed; else the fastest fp32 engine whose embeddings equal torch's within :data:`EQUAL_TOLERANCE`,
    measured once per backbone, weights and CPU (each graph engine at every slices-at-once
    :func:`choose_streams` tries, with torch as encode runs it, alternating: :func:`_time_pipelined`) and recorded
    in the cache folder, with each engine's slices at once beside its graph. ``load_image_encoder()`` gives the
    encoder's module; it is called only when no record answers."""
    import torch

    from embedcache.io.files import atomic_write_text
    from embedcache.model.encoder import ImageEncoder

    candidates = installed_engines()
    if device.type != "cpu" or len(candidates) == 1:
        return "torch"
    record = auto_record(backbone, checkpoint_sha256, folder)
    folder = record.parent
    try:
        held = json.loads(record.read_text())
        fault = _bounds_fault(held)
        if fault is None and held.get("chosen") in candidates and held.get("checkpoint_sha256") == checkpoint_sha256:
            return held["chosen"]
        if fault:
            log(f"{record}: {fault}; measuring again")
    except (OSError, ValueError):
        pass
    log(f"--engine auto: timing {', '.join(candidates)} on {backbone.name}'s encoder (once for this CPU and weights)")
    image_encoder = _module(load_image_encoder)
    example = _example(backbone)
    counts = _stream_counts(cpu_threads())
    # eager torch as encode runs it (ImageEncoder: channels_last, which TinyViT's convolutions need to be fast)
    eager = ImageEncoder(backbone, image_encoder.float(), device=device, batch_size=1, out_dtype=torch.float32)
    run_eager = lambda x: eager.model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()  # noqa: E731
    runners = {("torch", 1): (lambda: run_eager, 1)}
    graphs = {}
    for engine in candidates[1:]:
        graphs[engine] = exported_encoder(backbone, image_encoder, checkpoint_sha256, engine=engine, folder=folder,
                                          log=log)
        runners.update({(engine, k): (partial(_runner, engine, graphs[engine], "fp32", k, log=log), k)
                        for k in counts})
    if settle is not None:
        settle()
    with torch.inference_mode():
        reference = run_eager(example)
        difference = {e: float(np.abs(runners[e, 1][0]()(example) - reference).max()) for e in candidates}
        seconds = _time_pipelined(runners, example, 2 * counts[-1])
    streams = {"torch": 1}
    for engine, graph in graphs.items():  # each engine's slices at once, as choose_streams would have chosen them
        streams[engine] = _keep_streams(graph, engine, "fp32", {k: seconds[engine, k] for k in counts})
    best = {e: seconds[e, streams[e]] for e in candidates}
    equal = [e for e in candidates if difference[e] <= EQUAL_TOLERANCE]
    chosen = min(equal, key=best.__getitem__)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps({
            "backbone": backbone.name, "checkpoint_sha256": checkpoint_sha256, "chosen": chosen,
            "seconds_per_slice": {e: round(v, 4) for e, v in best.items()}, "streams": streams,
            "seconds_per_slice_by_streams": {f"{e}@{k}": round(v, 4) for (e, k), v in seconds.items()},
            "max_abs_difference_from_torch": difference, "threads": cpu_threads()}, indent=2) + "\n")
    except OSError:
        pass  # the choice stands for this run; the next one measures again
    log(f"--engine auto: {chosen} (" + ", ".join(f"{e} {v:.2f} s/slice" + (f" {streams[e]} at once" if streams[e] > 1
                                                                            else "") for e, v in best.items())
        + f"); {record}")
    return chosen


def streams_for_auto(engine: str, streams: int, *, log=print) -> int:
    """The ``--streams`` that stand once ``--engine auto`` has chosen ``engine``: torch (CUDA, torchrun, or the CPU
    where it measured fastest) encodes ``--batch-size`` slices a forward instead, so they are dropped, with a note
    (an explicit ``--engine torch --streams N`` is refused)."""
    if engine == "torch" and streams:
        log(f"--streams {streams}: --engine auto chose torch here, which encodes --batch-size slices a forward "
            "instead; --streams is not used")
        return 0
    return streams


def build_encoder(engine: str, backbone, image_encoder, checkpoint_sha256: str, *, device, batch_size: int = 0,
                  out_dtype, precision: str = "fp32", streams: int = 0, settle=None, log=print):
    """The image encoder ``engine`` runs at ``precision`` (``torch``: :class:`~embedcache.model.encoder.ImageEncoder`
    on ``device``; ``auto``: resolved by :func:`choose_engine`). ``image_encoder``: the module, or the function that
    loads it (a graph engine calls it only to export). ``batch_size``: torch's slices per forward (0: chosen for the
    device); ``streams``: a graph engine's slices at once (0: measured by :func:`choose_streams`, after
    ``settle()``; ``auto``'s measurement too)."""
    check_engine(engine, device.type, precision, streams)
    if engine == "auto":
        engine = choose_engine(backbone, image_encoder, checkpoint_sha256, device=device, settle=settle, log=log)
        streams = streams_for_auto(engine, streams, log=log)
    if engine in GRAPH_ENGINES:
        return GraphEncoder(engine, backbone, image_encoder, checkpoint_sha256, out_dtype=out_dtype,
                            precision=precision, streams=streams, settle=settle, log=log)
    from embedcache.model.encoder import ImageEncoder

    return ImageEncoder(backbone, _module(image_encoder), device=device, batch_size=batch_size, out_dtype=out_dtype)
