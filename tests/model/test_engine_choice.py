"""--engine auto is made concrete in one place (engines.resolve_engine) before an encoder is built, and every encoder,
eager or a graph engine's, is an Encoder: what encode and predict call on it is its own."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import cli


def _never():
    pytest.fail("the encoder was loaded: nothing was to be measured")


def test_a_concrete_engine_is_itself_and_auto_is_the_held_cache_s_engine_or_torch_on_cuda_and_torchrun(tiny_model, notes):
    from embedcache.model.engines import resolve_engine

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    resolve = lambda engine, **k: resolve_engine(engine, tiny_model, _never, "0" * 64, **k)  # noqa: E731
    assert resolve("openvino", device=cpu, streams=2, held="torch") == ("openvino", 2)
    assert resolve("torch", device=cuda, streams=0) == ("torch", 0)
    assert resolve("auto", device=cpu, streams=2, held="onnxruntime") == ("onnxruntime", 2)  # as it began
    assert resolve("auto", device=cuda, held="openvino") == ("openvino", 0)  # the cache's, even on CUDA
    assert resolve("auto", device=cuda, streams=2) == ("torch", 0)
    assert notes == ["--streams 2: --engine auto chose torch here, which encodes --batch-size slices a forward "
                     "instead; --streams is not used"]
    assert resolve("auto", device=cpu, distributed=True) == ("torch", 0)  # torchrun
    notes.clear()
    assert resolve("auto", device=cpu, held="torch", streams=0) == ("torch", 0)
    assert notes == []  # no note: no streams


def test_auto_on_a_cpu_answers_with_the_measurement_s_record(tiny_model, tiny_checkpoint, tmp_path, monkeypatch, notes):
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is an optional extra: pip install 'embedcache[cpu-fast]'")
    from embedcache.io.files import file_sha256
    from embedcache.model.engines import auto_record, resolve_engine

    monkeypatch.setenv("EMBEDCACHE_CACHE", str(tmp_path))
    sha = file_sha256(tiny_checkpoint)
    auto_record(tiny_model, sha).write_text(json.dumps({"backbone": "tiny", "checkpoint_sha256": sha,
                                                        "chosen": "onnxruntime"}))
    # the record answers: nothing is measured, nothing loaded, and the --streams given stand
    assert resolve_engine("auto", tiny_model, _never, sha, device=torch.device("cpu"), streams=1) == ("onnxruntime", 1)
    assert notes == []


def test_build_encoder_takes_a_concrete_engine_only(tiny_model):
    from embedcache.model.engines import build_encoder

    with pytest.raises(ValueError, match="resolve_engine"):
        build_encoder("auto", tiny_model, _never, "0" * 64, device=torch.device("cpu"), out_dtype=torch.float32)


def test_predict_s_decoder_graph_runs_in_the_engine_auto_chose(tiny_model, tiny_checkpoint, data, tmp_path,
                                                                monkeypatch):
    """auto is resolved before the encoder is built (here from its record), and the engine it resolved to runs the
    decoder graph too."""
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is an optional extra: pip install 'embedcache[cpu-fast]'")
    from embedcache.io.datasets import discover_cases
    from embedcache.io.files import file_sha256
    from embedcache.model.engines import auto_record

    monkeypatch.setenv("EMBEDCACHE_CACHE", str(tmp_path / "user-cache"))
    (tmp_path / "user-cache").mkdir()
    sha = file_sha256(tiny_checkpoint)
    auto_record(tiny_model, sha).write_text(json.dumps({"backbone": "tiny", "checkpoint_sha256": sha,
                                                        "chosen": "onnxruntime"}))
    case = discover_cases(data)[0]
    result = cli("predict", case.image, "--from-labels", case.label, "--out", tmp_path / "out", "--model", "tiny",
                 "--device", "cpu", "--no-progress", "--streams", "1")
    assert result.exit_code == 0, result.output
    assert "(onnxruntime fp32, decoder onnxruntime" in result.output.splitlines()[-1], result.output


def _own(cls, name) -> bool:
    """Whether ``cls`` itself (or a class between it and Encoder) defines ``name``, not Encoder's declaration."""
    from embedcache.model.encoder import Encoder

    return any(name in vars(c) for c in cls.__mro__[: cls.__mro__.index(Encoder)])


def test_both_encoders_are_encoders_and_implement_every_member_themselves(tiny_model, tiny_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is an optional extra: pip install 'embedcache[cpu-fast]'")
    from embedcache.io.files import file_sha256
    from embedcache.model.backbones import load_backbone
    from embedcache.model.encoder import Encoder, HostEmbeddings, ImageEncoder
    from embedcache.model.engines import GraphEncoder

    assert set(Encoder.__annotations__) == {"engine", "precision", "device", "streams"}
    assert {"batch_size", "upload", "__call__", "to_host"} <= set(vars(Encoder))
    for cls in (ImageEncoder, GraphEncoder):
        assert Encoder in cls.__mro__
        assert all(_own(cls, name) for name in ("batch_size", "upload", "__call__", "to_host")), cls
    parts, _ = load_backbone(tiny_model)
    eager = ImageEncoder(tiny_model, parts.image_encoder, device=torch.device("cpu"), out_dtype=torch.float32)
    graph = GraphEncoder("onnxruntime", tiny_model, parts.image_encoder, file_sha256(tiny_checkpoint),
                         out_dtype=torch.float32, streams=2, folder=tmp_path)
    slices = np.random.default_rng(0).uniform(0, 1, (2, 64, 64)).astype(np.float32)
    for encoder, (engine, streams, batch) in [(eager, ("torch", 0, 1)), (graph, ("onnxruntime", 2, 2))]:
        assert (encoder.engine, encoder.precision, encoder.device.type) == (engine, "fp32", "cpu")
        assert (encoder.streams, encoder.batch_size) == (streams, batch)
        assert torch.equal(encoder.upload(list(slices)), torch.from_numpy(slices))
        host = encoder.to_host(encoder(slices))
        assert isinstance(host, HostEmbeddings)
        embeddings, finite = host.wait()
        assert embeddings.shape == (2, 256, 64, 64) and finite
    np.testing.assert_allclose(graph(slices).numpy(), eager(slices).numpy(), atol=1e-4)


def test_the_engines_and_the_encoder_interface_import_without_torch():
    """encode and predict refuse an engine before torch is imported: the engines' modules and the Encoder interface
    they declare their encoder with import neither torch nor an engine's library."""
    code = ("import sys\nimport embedcache.model.engines, embedcache.model.encoder\n"
            "assert not {'torch', 'onnx', 'onnxruntime', 'openvino'} & set(sys.modules), 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)
