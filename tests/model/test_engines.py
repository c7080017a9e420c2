"""--engine onnxruntime: the exported encoder gives eager PyTorch's embeddings, and the tools around it hold."""

from __future__ import annotations

import json
import shutil
import sys

import h5py
import numpy as np
import pytest

from embedcache.errors import UsageError
from embedcache.io.phantom import limit_target_slices

from conftest import cli, one_line

pytest.importorskip("onnxruntime", reason="ONNX Runtime is an optional extra: pip install 'embedcache[cpu-fast]'")
pytest.importorskip("onnx", reason="onnx is an optional extra: pip install 'embedcache[cpu-fast]'")


@pytest.fixture
def data(phantom_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDCACHE_CACHE", str(tmp_path / "user-cache"))
    out = tmp_path / "data"
    shutil.copytree(phantom_dir, out)
    limit_target_slices(out, per_case=2)
    return out


def _encode(data, out, *extra):
    result = cli("encode", data, "--out", out, "--device", "cpu", "--no-progress", *extra)
    assert result.exit_code == 0, result.output
    return out


def test_onnxruntime_embeddings_equal_torchs_and_score_the_same_to_four_decimals(data, tmp_path):
    caches = {engine: _encode(data, tmp_path / f"{engine}.h5", "--engine", engine, "--dtype", "float32")
              for engine in ("torch", "onnxruntime")}
    embeddings = {}
    for engine, path in caches.items():
        with h5py.File(path) as f:
            embeddings[engine] = f["embeddings"][:]
            assert json.loads(f.attrs["signature"])["engine"] == engine
    assert np.abs(embeddings["torch"] - embeddings["onnxruntime"]).max() <= 1e-4
    dice = {}
    for engine, path in caches.items():
        result = cli("score", path, "--out", tmp_path / f"report-{engine}", "--prompts", "oracle,box3d", "--device",
                     "cpu", "--no-progress")
        assert result.exit_code == 0, result.output
        summary = json.loads((tmp_path / f"report-{engine}" / "report.json").read_text())["summary"]
        dice[engine] = {(p, label): round(v["vanilla"]["dice"]["mean"], 4) for p, by in summary.items()
                        for label, v in by.items()}
    assert dice["torch"] == dice["onnxruntime"]
    graphs = list((tmp_path / "user-cache").glob("litemedsam-*.onnx"))
    assert len(graphs) == 1 and graphs[0].with_suffix(".json").is_file()


def test_the_graph_is_exported_once_and_again_when_it_no_longer_matches_its_record(data, tmp_path):
    notes = []
    _encode(data, tmp_path / "a.h5", "--engine", "onnxruntime")
    graph = next((tmp_path / "user-cache").glob("*.onnx"))
    stamp = graph.stat().st_mtime_ns
    _encode(data, tmp_path / "b.h5", "--engine", "onnxruntime")
    assert graph.stat().st_mtime_ns == stamp  # reused, not exported again
    with open(graph, "r+b") as handle:  # damaged: exported again, never used
        handle.seek(1000)
        handle.write(b"\0" * 64)
    result = cli("encode", data, "--out", tmp_path / "c.h5", "--device", "cpu", "--no-progress", "--engine",
                 "onnxruntime")
    assert result.exit_code == 0 and "does not match its record; exporting it again" in result.output
    notes.append(result.output)
    with h5py.File(tmp_path / "b.h5") as b, h5py.File(tmp_path / "c.h5") as c:
        assert np.array_equal(b["embeddings"][:], c["embeddings"][:])


def test_a_cache_grows_only_with_the_engine_that_began_it(data, tmp_path):
    out = _encode(data, tmp_path / "c.h5")
    more = tmp_path / "more"
    shutil.copytree(data, more)
    (more / "imagesTr" / "PHANTOM_0001_0000.nii.gz").rename(more / "imagesTr" / "EXTRA_0001_0000.nii.gz")
    (more / "labelsTr" / "PHANTOM_0001.nii.gz").rename(more / "labelsTr" / "EXTRA_0001.nii.gz")
    result = cli("encode", more, "--out", out, "--device", "cpu", "--no-progress", "--engine", "onnxruntime")
    one_line(result, "was encoded with --engine torch", "into a new --out")


def test_a_missing_engine_is_one_line_naming_the_extra(data, tmp_path, monkeypatch):
    from embedcache.model.engines import check_engine

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as when it is not installed
    with pytest.raises(UsageError, match=r"embedcache\[cpu-fast\]"):
        check_engine("onnxruntime")
    result = cli("encode", data, "--out", tmp_path / "c.h5", "--device", "cpu", "--engine", "onnxruntime")
    one_line(result, "--engine onnxruntime needs ONNX Runtime", "cpu-fast", code=2)
    assert not (tmp_path / "c.h5").exists()
    with pytest.raises(UsageError, match="runs on the CPU"):
        check_engine("onnxruntime", "cuda")


def test_predict_with_onnxruntime_segments_as_with_torch(data, tmp_path):
    from embedcache.evaluation.metrics import dice
    from embedcache.io.datasets import discover_cases
    from embedcache.io.volumes import read_label

    case = discover_cases(data)[0]
    out = {}
    for engine in ("torch", "onnxruntime"):
        result = cli("predict", case.image, "--from-labels", case.label, "--out", tmp_path / engine, "--engine", engine,
                     "--device", "cpu", "--no-progress")
        assert result.exit_code == 0, result.output
        out[engine] = read_label(tmp_path / engine / f"{case.name}.nii.gz").array
    for label in (7, 8):
        assert (out["torch"] == label).any()
        assert dice(out["torch"] == label, out["onnxruntime"] == label) >= 0.995
