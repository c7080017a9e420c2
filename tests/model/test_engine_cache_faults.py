"""A damaged engine cache folder: graphs that are not what embedcache exported, OpenVINO blobs changed on disk and
records out of bounds are exported, compiled or measured again (or refused in one line), never used."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from embedcache.errors import EmbedcacheError

from conftest import export_graphs

pytest.importorskip("onnx", reason="onnx is an optional extra: pip install 'embedcache[cpu-fast]'")


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


EXTRA = "an optional extra: pip install 'embedcache[cpu-fast]'"
needs_ort = pytest.mark.skipif(not _has("onnxruntime"), reason=f"ONNX Runtime is {EXTRA}")
needs_ov = pytest.mark.skipif(not _has("openvino"), reason=f"OpenVINO is {EXTRA}")
GRAPH_ENGINES = [pytest.param("onnxruntime", marks=needs_ort), pytest.param("openvino", marks=needs_ov)]


@pytest.fixture(scope="module")
def tiny_graphs(tmp_path_factory, tiny_checkpoint):
    """The tiny backbone's encoder and vanilla decoder graphs, exported once for this module (a second each); each
    test damages a copy in a cache folder of its own."""
    import tiny

    return export_graphs(tiny.tiny_backbone(tiny_checkpoint), tmp_path_factory.mktemp("tiny-graphs"))


@pytest.fixture
def cache(tiny_graphs, tmp_path, monkeypatch):
    """A copy of the tiny graphs as this test's EMBEDCACHE_CACHE: what it damages no other test sees."""
    folder = tmp_path / "user-cache"
    shutil.copytree(tiny_graphs, folder)
    monkeypatch.setenv("EMBEDCACHE_CACHE", str(folder))
    return folder


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _vouch(graph) -> None:
    """Update the graph's record to the graph as it is now, as one who replaced both would have."""
    record = graph.with_suffix(".json")
    held = json.loads(record.read_text())
    held["sha256"] = _sha256(graph)
    held.pop("data_sha256", None)
    record.write_text(json.dumps(held))


def _weights_at(graph, location: str, where) -> None:
    """Rewrite ``graph`` with its weights in the file ``where``, the graph naming it as ``location``."""
    import onnx

    model = onnx.load(str(graph))
    onnx.save_model(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.data", size_threshold=1024)
    shutil.move(graph.parent / "weights.data", where)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(graph))


def _another_graph(graph) -> None:
    """A valid ONNX graph of other inputs and outputs (one Relu) in ``graph``'s place."""
    import onnx
    from onnx import TensorProto, helper

    shape = [1, 3, 64, 64]
    relu = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    onnx.save(helper.make_model(relu, opset_imports=[helper.make_opsetid("", 17)]), str(graph))


def _encoder(engine, tiny_checkpoint, folder=None):
    """The tiny encoder in ``engine`` from the cache folder (``folder``, else EMBEDCACHE_CACHE), one slice at a time
    (no measurement)."""
    import torch

    from embedcache.io.files import file_sha256
    from embedcache.model.backbones import load_backbone
    from embedcache.model.engines import GraphEncoder

    import tiny

    backbone = tiny.tiny_backbone(tiny_checkpoint)
    return GraphEncoder(engine, backbone, lambda: load_backbone(backbone)[0].image_encoder,
                        file_sha256(tiny_checkpoint), out_dtype=torch.float32, streams=1, folder=folder)


def _slice():
    return np.random.default_rng(0).uniform(0, 1, (1, 64, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_embedding(tiny_graphs, tiny_checkpoint):
    """The undamaged tiny encoder graph's embedding of :func:`_slice` in ONNX Runtime."""
    return _encoder("onnxruntime", tiny_checkpoint, folder=tiny_graphs)(_slice()).numpy()


@needs_ort
@pytest.mark.parametrize("fault", ["another graph", "0 bytes", "weights outside its folder",
                                   "weights at an absolute path", "weights in a file its record does not hold"])
def test_a_cached_graph_that_is_not_what_was_exported_is_exported_again(fault, cache, tiny_checkpoint, tiny_embedding,
                                                                         tmp_path, notes):
    """A graph replaced together with its record (the record's sha256 updated), emptied, or naming weights outside the
    cache folder ended in ONNX Runtime's traceback (and one naming a data file its record holds no sha256 of ran with
    weights nobody checked): before any engine sees it, its inputs, outputs and weight files are checked against what
    embedcache exports, and one that fails is exported again. The file outside is left as it was, never read."""
    graph = next(cache.glob("tiny-*.onnx"))
    outside = tmp_path / "outside.data"
    if fault == "another graph":
        _another_graph(graph)
    elif fault == "0 bytes":
        graph.write_bytes(b"")
    elif fault == "weights outside its folder":
        _weights_at(graph, "../outside.data", outside)
    elif fault == "weights at an absolute path":
        _weights_at(graph, str(outside), outside)
    else:
        _weights_at(graph, graph.name + ".data", graph.with_name(graph.name + ".data"))
    _vouch(graph)
    before = outside.read_bytes() if outside.exists() else None
    got = _encoder("onnxruntime", tiny_checkpoint)(_slice())
    assert any(f"{graph}: " in n and "exporting it again" in n for n in notes), notes
    assert np.array_equal(got.numpy(), tiny_embedding)
    assert (outside.read_bytes() if outside.exists() else None) == before
    notes.clear()
    _encoder("onnxruntime", tiny_checkpoint)  # exported once more, then kept
    assert not any("exporting" in n for n in notes), notes


@needs_ort
def test_a_cached_decoder_graph_of_other_inputs_is_exported_again(cache, tiny_checkpoint, notes):
    """The decoder graph is checked as the encoder's is: the encoder's graph copied in its place (its record vouching
    for it) is exported again, and the graph decoder decodes as the eager one."""
    import torch

    from embedcache.model.backbones import load_backbone
    from embedcache.model.decoder import decode_boxes
    from embedcache.model.engines import GraphDecoder

    import tiny

    backbone = tiny.tiny_backbone(tiny_checkpoint)
    parts, sha = load_backbone(backbone)
    decoder = next(cache.glob("decoder-tiny-*.onnx"))
    shutil.copy(next(cache.glob("tiny-*.onnx")), decoder)
    _vouch(decoder)
    graph = GraphDecoder("onnxruntime", backbone, lambda: (parts.prompt_encoder, parts.mask_decoder), sha, "vanilla")
    assert any(f"{decoder}: " in n and "exporting it again" in n for n in notes), notes
    embeddings = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.5
    boxes = torch.tensor([[256.0, 300.0, 560.0, 610.0]])
    with torch.inference_mode():
        want = decode_boxes(parts.prompt_encoder, parts.mask_decoder, embeddings, boxes)
        got = graph(embeddings, boxes)
    assert all(float((g - w).abs().max()) <= 1e-3 for g, w in zip(got, want))


@pytest.mark.parametrize("engine", GRAPH_ENGINES)
@pytest.mark.parametrize("where", ["../w.data", "absolute"])
def test_a_graph_reading_weights_outside_its_folder_is_refused_in_one_line(engine, where, tmp_path):
    """A graph no record vouches for, handed to an engine, whose weights lie outside its folder: one line naming the
    graph and saying to delete it, before the engine reads anything (each engine refused it with its own exception)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from embedcache.model.engines.sessions import session

    folder = tmp_path / "graphs"
    folder.mkdir()
    weights = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weights])
    path = folder / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    _weights_at(path, str(tmp_path / "w.data") if where == "absolute" else where, tmp_path / "w.data")
    with pytest.raises(EmbedcacheError) as refused:
        session(engine, path, "fp32", keep_compiled=False)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and "delete it" in message and "\n" not in message


def _flip(path, size: int = 4096) -> None:
    """Invert ``size`` bytes in the middle of the file, in place (its size unchanged)."""
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        chunk = handle.read(size)
        handle.seek(path.stat().st_size // 2)
        handle.write(bytes(b ^ 0xFF for b in chunk))


@needs_ov
def test_a_compiled_openvino_blob_changed_on_disk_is_compiled_again(cache, tiny_checkpoint, notes):
    """OpenVINO imported the blobs it compiled unchecked: 4 KiB flipped in place changed a prediction, exit 0. Each
    blob's sha256 is recorded when it is written and checked before the next compile; a blob that differs is removed
    and compiled again, and encodes as the first compile did."""
    want = _encoder("openvino", tiny_checkpoint)(_slice())
    blobs = list((cache / "openvino").glob("*/*.blob"))
    assert len(blobs) == 1
    blob = blobs[0]
    _flip(blob)
    notes.clear()
    got = _encoder("openvino", tiny_checkpoint)(_slice())
    assert np.array_equal(got.numpy(), want.numpy())
    records = list(blob.parent.glob("*.json"))
    assert len(records) == 1 and any(str(blob) in n for n in notes), notes
    assert json.loads(records[0].read_text())["sha256"] == {blob.name: _sha256(blob)}


@pytest.mark.parametrize("streams, seconds", [(100000, 1.0), (257, 1.0), (3, 1.0), (1, -1.0), (1, float("nan")),
                                              (1, float("inf"))])
def test_a_streams_record_out_of_bounds_is_measured_again(streams, seconds, cache, tiny_checkpoint, monkeypatch, notes):
    """A streams record of 100000 slices at once (--streams allows 0 to 256) was used as it was: a record holding slices
    at once outside 1 to 256 or above this CPU's threads (here two), or seconds that are not finite and positive, is
    measured again, never used."""
    from embedcache.model.engines import choose_streams, measure
    from embedcache.runtime import cpu

    import tiny

    monkeypatch.setattr(cpu, "cpu_threads", lambda: 2)
    monkeypatch.setattr(measure, "time_pipelined", lambda runners, *a, **k: {1: 1.0, 2: 0.5})  # two at once pays
    graph = next(cache.glob("tiny-*.onnx"))
    record = measure.streams_record(graph, "onnxruntime", "fp32")
    record.write_text(json.dumps({"graph": graph.name, "engine": "onnxruntime", "precision": "fp32",
                                  "streams": streams, "threads": 2, "seconds_per_slice": {"1": seconds}}))
    chosen = choose_streams("onnxruntime", graph, "fp32", tiny.tiny_backbone(tiny_checkpoint))
    assert chosen == 2 and json.loads(record.read_text())["streams"] == 2
    assert any(str(record) in n and "measuring again" in n for n in notes), notes


@needs_ort
@pytest.mark.parametrize("change", [{"streams": {"torch": 1, "onnxruntime": 100000}},
                                    {"seconds_per_slice": {"torch": float("nan")}},
                                    {"seconds_per_slice": {"torch": 0.0}},
                                    {"seconds_per_slice_by_streams": {"torch@1": -2.0}}])
def test_an_auto_record_out_of_bounds_is_measured_again(change, cache, tiny_checkpoint, monkeypatch, notes):
    """``--engine auto``'s record is bounded as the streams records are: slices at once within 1 to 256 and this CPU's
    threads, seconds finite and positive; one outside is measured again (its choice not used)."""
    import torch

    from embedcache.io.files import file_sha256
    from embedcache.model.backbones import load_backbone
    from embedcache.model.engines import auto_record, choose_engine, measure, names
    from embedcache.runtime import cpu

    import tiny

    monkeypatch.setattr(cpu, "cpu_threads", lambda: 2)
    monkeypatch.setattr(names, "installed_engines", lambda: ["torch", "onnxruntime"])
    monkeypatch.setattr(measure, "time_pipelined", lambda runners, *a, **k: {key: 1.0 for key in runners})
    backbone = tiny.tiny_backbone(tiny_checkpoint)
    sha = file_sha256(tiny_checkpoint)
    record = auto_record(backbone, sha)
    record.write_text(json.dumps({"backbone": "tiny", "checkpoint_sha256": sha, "chosen": "onnxruntime",
                                  "seconds_per_slice": {"torch": 1.0, "onnxruntime": 0.5},
                                  "streams": {"torch": 1, "onnxruntime": 1}, **change}))
    chosen = choose_engine(backbone, lambda: load_backbone(backbone)[0].image_encoder, sha, device=torch.device("cpu"))
    assert any(str(record) in n and "measuring again" in n for n in notes), notes
    held = json.loads(record.read_text())
    assert chosen == held["chosen"] == "torch"  # all equally fast: the first, as measured, not as the record said
    assert all(1 <= k <= 2 for k in held["streams"].values())


def test_a_measurement_waits_for_what_predict_names_and_a_record_waits_for_nothing(cache, tiny_checkpoint,
                                                                                    monkeypatch):
    """predict reads its first input while the model loads; a streams measurement must not time the CPU while that
    read runs: inside ``timing_waits_for(settle)`` it calls ``settle()`` before it times anything, and where its
    record answers it neither times nor waits."""
    from embedcache.model.engines import choose_streams, measure, timing_waits_for
    from embedcache.runtime import cpu

    import tiny

    events = []
    monkeypatch.setattr(cpu, "cpu_threads", lambda: 2)
    monkeypatch.setattr(measure, "time_pipelined",
                        lambda runners, *a, **k: events.append("timed") or {1: 1.0, 2: 0.5})
    graph = next(cache.glob("tiny-*.onnx"))
    backbone = tiny.tiny_backbone(tiny_checkpoint)
    with timing_waits_for(lambda: events.append("settled")):
        assert choose_streams("onnxruntime", graph, "fp32", backbone) == 2
    assert events == ["settled", "timed"]
    events.clear()
    with timing_waits_for(lambda: events.append("settled")):
        assert choose_streams("onnxruntime", graph, "fp32", backbone) == 2  # the record answers
    assert events == []
    measure.streams_record(graph, "onnxruntime", "fp32").unlink()
    assert choose_streams("onnxruntime", graph, "fp32", backbone) == 2 and events == ["timed"]  # outside: no wait
