"""What a cached ONNX graph is checked for before an engine sees it: that it is an ONNX graph at all, takes and gives
the float32 tensors embedcache exports, and reads its weights from nowhere but inside its folder (from the one data
file its record holds, where it has one). A graph that fails is exported again (:mod:`.store`), or refused in one
line (:func:`check_weights_inside`, before every session: :mod:`.sessions`)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from embedcache.errors import EmbedcacheError

#: Graphs (path, size, mtime, inode) whose weights were found inside their folder, so that the engines' many
#: sessions of one graph (a measurement builds one per round) read it once.
_INSIDE = set()


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


def _identity(graph: Path) -> tuple:
    """What names one version of the file at ``graph``: a graph written again is read again."""
    stat = Path(graph).stat()
    return str(Path(graph).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino


def graph_fault(graph: Path, inputs: dict[str, tuple], outputs: dict[str, tuple], data: str | None) -> str | None:
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


def check_weights_inside(graph: Path) -> None:
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
