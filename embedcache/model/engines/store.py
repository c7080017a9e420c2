"""The exported graphs in the cache folder: the image encoder and the prompt encoder + mask decoder exported once per
weights with ``torch.onnx.export``, each beside a record of its own sha256 (and of its weights' file, where they lie
beside it), checked against eager PyTorch before it is kept, and exported again when its record, its sha256 or its
shape no longer match (:func:`~embedcache.model.engines.graphs.graph_fault`); nothing is downloaded."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from embedcache.errors import EmbedcacheError
from embedcache.io.files import PARTIAL, WRITE_ERRNOS, atomic_write_text, commit, file_sha256, write_error
from embedcache.model.engines.graphs import graph_fault
from embedcache.model.engines.names import cache_folder
from embedcache.model.engines.sessions import session

logger = logging.getLogger(__name__)

#: ONNX opset of the exported graphs.
OPSET = 17
#: A fresh export must give the eager encoder's embeddings within this (max abs difference).
EXPORT_TOLERANCE = 1e-3
#: A graph file that would be larger than this keeps its weights in one file beside it (``NAME.onnx.data``): one
#: protobuf holds at most 2 GiB, and SAM ViT-H's encoder weighs 2.5 GB in float32.
EXTERNAL_DATA_BYTES = 1 << 30
#: Bumped when :class:`~embedcache.model.decoder.AllMasks` changes what the exported decoder computes.
DECODER_GRAPH = 1


def load_module(given):
    """A module given as itself or as the function that loads it (called only when an export needs it)."""
    import torch

    return given if isinstance(given, torch.nn.Module) else given()


def example_input(backbone) -> np.ndarray:
    """The seeded encoder input (already normalised, ``(1, 3, S, S)``) exports and measurements are checked on."""
    size = backbone.input_size
    return np.random.default_rng(0).uniform(0, 1, (1, 3, size, size)).astype(np.float32)


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def exported_encoder(backbone, image_encoder, checkpoint_sha256: str, *, engine: str = "onnxruntime",
                     folder: Path | None = None) -> Path:
    """The ONNX graph of ``backbone``'s image encoder (a module, or the function that loads it) with the weights of
    sha256 ``checkpoint_sha256``: the one exported before, else a fresh export, checked in ``engine``."""
    name = f"{backbone.name}-{checkpoint_sha256[:16]}-opset{OPSET}-torch{_torch_version()}"
    return _exported(name, {"backbone": backbone.name, "checkpoint_sha256": checkpoint_sha256}, image_encoder,
                     (example_input(backbone),), inputs=["image"], outputs={"embedding": (1, 256, 64, 64)},
                     engine=engine, folder=folder, what=f"{backbone.name}'s image encoder")


def exported_decoder(backbone, heads, checkpoint_sha256: str, decoder_sha256: str, *, engine: str = "onnxruntime",
                     folder: Path | None = None) -> Path:
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
                     folder=folder, what=f"{backbone.name}'s mask decoder")


def _exported(name: str, key: dict, module, examples: tuple, *, inputs: list[str], outputs: dict[str, tuple],
              engine: str, folder: Path | None, what: str) -> Path:
    """The ONNX graph ``name`` in the cache folder: the one exported before (its record holding ``key`` and the
    graph's own sha256, the graph taking ``inputs`` shaped as the ``examples`` and giving ``outputs``, name → shape,
    its weights inside it or in the one data file its record holds: :func:`graph_fault`), else a fresh export of
    ``module`` (a module, or the function that loads it), checked in ``engine`` against eager PyTorch on the seeded
    ``examples`` and kept with its record."""
    import torch

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
                fault = graph_fault(graph, dict(zip(inputs, (x.shape for x in examples))), outputs,
                                    data.name if held.get("data_sha256") is not None else None)
                if fault is None:
                    return graph
        except (OSError, ValueError, AttributeError):
            pass
        logger.warning(f"{graph}: {fault}; exporting it again")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbedcacheError(f"{folder}: cannot hold the exported {what} ({exc.strerror}); set EMBEDCACHE_CACHE to "
                              "a writable folder") from None
    logger.info(f"exporting {what} to ONNX (once per weights): {graph}")
    model = load_module(module).float().eval()
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
        got = session(engine, tmp, "fp32", keep_compiled=False)(*examples)
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
