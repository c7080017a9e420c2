"""--engine onnxruntime|openvino|auto and --encoder-precision: the exported encoder gives eager PyTorch's embeddings,
auto chooses among the equal ones, and the tools around them hold."""

from __future__ import annotations

import json
import shutil
import sys

import h5py
import numpy as np
import pytest

from embedcache.errors import UsageError
from embedcache.synth.phantom import limit_target_slices

from conftest import cli, export_graphs, one_line

pytest.importorskip("onnx", reason="onnx is an optional extra: pip install 'embedcache[cpu-fast]'")


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


needs_ort = pytest.mark.skipif(not _has("onnxruntime"), reason="ONNX Runtime is an optional extra: pip install 'embedcache[cpu-fast]'")
needs_ov = pytest.mark.skipif(not _has("openvino"), reason="OpenVINO is an optional extra: pip install 'embedcache[cpu-fast]'")
GRAPH_ENGINES = [pytest.param("onnxruntime", marks=needs_ort), pytest.param("openvino", marks=needs_ov)]


def _bf16_cpu():
    if not _has("openvino"):
        return False
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.fixture(scope="session")
def litemedsam_graphs(tmp_path_factory):
    """LiteMedSAM's encoder and vanilla decoder graphs, exported once for the session (about 10 s each on a 2-core
    CPU): each test's own cache folder starts with a copy, so only the tests about exporting export."""
    from embedcache.model.backbones import get_backbone

    return export_graphs(get_backbone("litemedsam"), tmp_path_factory.mktemp("litemedsam-graphs"))


@pytest.fixture
def data(phantom_dir, litemedsam_graphs, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDCACHE_CACHE", str(tmp_path / "user-cache"))
    shutil.copytree(litemedsam_graphs, tmp_path / "user-cache")
    out = tmp_path / "data"
    shutil.copytree(phantom_dir, out)
    limit_target_slices(out, per_case=1)
    return out


def _encode(data, out, *extra):
    """Encode with one slice beyond each gland (box3d's own margin; two, the default, cost a third more slices)."""
    if "--engine" in extra and "torch" not in extra and "--streams" not in extra:
        extra = (*extra, "--streams", "1")  # one at a time unless asked: no measurement in every test
    result = cli("encode", "--zoom", "0", data, "--out", out, "--device", "cpu", "--no-progress", "--margin-slices", "1", *extra)
    assert result.exit_code == 0, result.output
    return out


def _box_dice(cache, out) -> dict:
    """The vanilla decoder's mean Dice per prompt protocol (oracle, box3d) and gland, to 4 decimals."""
    result = cli("score", cache, "--out", out, "--protocols", "oracle,box3d", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "report.json").read_text())["summary"]
    return {(p, label): round(v["vanilla"]["dice"]["mean"], 4) for p, by in summary.items() for label, v in by.items()}


@pytest.fixture(scope="module")
def torch_reference(phantom_dir, tmp_path_factory):
    """Eager torch's float32 cache of ``data``'s slices and its Dice, made once for the engines compared with it."""
    root = tmp_path_factory.mktemp("torch-reference")
    shutil.copytree(phantom_dir, root / "data")
    limit_target_slices(root / "data", per_case=1)
    cache = _encode(root / "data", root / "torch.h5", "--engine", "torch", "--dtype", "float32")
    return cache, _box_dice(cache, root / "report")


@pytest.mark.parametrize("engine", GRAPH_ENGINES)
def test_graph_engines_embeddings_equal_torchs_and_score_the_same_to_four_decimals(engine, data, torch_reference,
                                                                                   tmp_path):
    reference, reference_dice = torch_reference
    cache = _encode(data, tmp_path / f"{engine}.h5", "--engine", engine, "--dtype", "float32", "--streams", "2")
    with h5py.File(reference) as want, h5py.File(cache) as got:  # two slices at once
        assert json.loads(want.attrs["signature"])["engine"] == "torch"
        assert json.loads(got.attrs["signature"])["engine"] == engine
        assert np.abs(want["embeddings"][:] - got["embeddings"][:]).max() <= 1e-4
    assert _box_dice(cache, tmp_path / "report") == reference_dice
    graphs = list((tmp_path / "user-cache").glob("litemedsam-*.onnx"))
    assert len(graphs) == 1 and graphs[0].with_suffix(".json").is_file()


@needs_ort
def test_the_graph_is_exported_once_and_again_when_it_no_longer_matches_its_record(data, tmp_path):
    notes = []
    graph = next((tmp_path / "user-cache").glob("litemedsam-*.onnx"))  # the session's export
    stamp = graph.stat().st_mtime_ns
    _encode(data, tmp_path / "b.h5", "--engine", "onnxruntime")
    assert graph.stat().st_mtime_ns == stamp  # reused, not exported again
    with open(graph, "r+b") as handle:  # damaged: exported again, never used
        handle.seek(1000)
        handle.write(b"\0" * 64)
    result = cli("encode", "--zoom", "0", data, "--out", tmp_path / "c.h5", "--device", "cpu", "--no-progress", "--engine",
                 "onnxruntime", "--streams", "1", "--margin-slices", "1")
    assert result.exit_code == 0 and "does not match its record; exporting it again" in result.output
    notes.append(result.output)
    with h5py.File(tmp_path / "b.h5") as b, h5py.File(tmp_path / "c.h5") as c:
        assert np.array_equal(b["embeddings"][:], c["embeddings"][:])


def _more(data, tmp_path):
    more = tmp_path / "more"
    shutil.copytree(data, more)
    (more / "imagesTr" / "PHANTOM_0001_0000.nii.gz").rename(more / "imagesTr" / "EXTRA_0001_0000.nii.gz")
    (more / "labelsTr" / "PHANTOM_0001.nii.gz").rename(more / "labelsTr" / "EXTRA_0001.nii.gz")
    return more


@needs_ort
def test_a_cache_grows_only_with_the_engine_that_began_it(data, tmp_path):
    out = _encode(data, tmp_path / "c.h5", "--engine", "torch")
    more = _more(data, tmp_path)
    result = cli("encode", "--zoom", "0", more, "--out", out, "--device", "cpu", "--no-progress", "--engine", "onnxruntime")
    one_line(result, "was encoded with --engine torch", "into a new --out")
    result = cli("encode", "--zoom", "0", more, "--out", out, "--device", "cpu", "--no-progress", "--margin-slices", "1")
    assert result.exit_code == 0, result.output  # auto: as the cache began
    from embedcache.cache.store import open_cache

    with open_cache(out) as cache:
        assert cache.signature.engine == "torch" and "EXTRA_0001" in [c.name for c in cache.cases]


def test_a_missing_engine_is_one_line_naming_the_extra(data, tmp_path, monkeypatch):
    from embedcache.model.engines import check_engine

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as when it is not installed
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(UsageError, match=r"embedcache\[cpu-fast\]"):
        check_engine("onnxruntime")
    for engine in ("onnxruntime", "openvino"):
        result = cli("encode", "--zoom", "0", data, "--out", tmp_path / "c.h5", "--device", "cpu", "--engine", engine)
        one_line(result, f"--engine {engine} needs {engine}", "cpu-fast", code=2)
        assert not (tmp_path / "c.h5").exists()
    with pytest.raises(UsageError, match="runs on the CPU"):
        check_engine("openvino", "cuda")
    with pytest.raises(UsageError, match="runs through OpenVINO"):
        check_engine("onnxruntime", "cpu", "bf16")
    result = cli("encode", "--zoom", "0", data, "--out", tmp_path / "c.h5", "--device", "cpu", "--engine", "torch", "--streams", "2")
    one_line(result, "--streams 2: slices at once are onnxruntime's and openvino's", "drop --streams", code=2)
    result = cli("encode", "--zoom", "0", data, "--out", tmp_path / "c.h5", "--device", "cpu", "--encoder-precision", "bf16")
    one_line(result, "--encoder-precision bf16 runs through OpenVINO", "--engine openvino", code=2)
    from embedcache.io.datasets import discover_cases

    case = discover_cases(data)[0]
    result = cli("predict", case.image, "--from-labels", case.label, "--out", tmp_path / "pred", "--device", "cpu",
                 "--engine", "openvino")
    one_line(result, "--engine openvino needs openvino", "cpu-fast", code=2)
    assert not (tmp_path / "pred").exists()  # refused before the output folder is made
    # auto with no other engine installed: torch, no measurement; --streams, a graph engine's, is said to go unused
    result = cli("encode", "--zoom", "0", data, "--out", tmp_path / "auto.h5", "--device", "cpu", "--no-progress", "--margin-slices",
                 "1", "--streams", "2")
    assert result.exit_code == 0 and "--streams 2: --engine auto chose torch here" in result.output, result.output
    with h5py.File(tmp_path / "auto.h5") as f:
        assert json.loads(f.attrs["signature"])["engine"] == "torch"


@pytest.mark.parametrize("engine", GRAPH_ENGINES)
def test_predict_with_a_graph_engine_segments_as_with_torch(engine, data, tmp_path):
    from embedcache.evaluation.metrics import dice
    from embedcache.io.datasets import discover_cases
    from embedcache.io.volumes import read_label

    case = discover_cases(data)[0]
    out = {}
    for e in ("torch", engine):
        result = cli("predict", case.image, "--from-labels", case.label, "--out", tmp_path / e, "--engine", e,
                     "--device", "cpu", "--no-progress", *(("--streams", "2") if e != "torch" else ()))  # two at once
        assert result.exit_code == 0, result.output
        assert e == "torch" or f"({e} fp32 2 at once, decoder {e}" in result.output.splitlines()[-1]
        out[e] = read_label(tmp_path / e / f"{case.name}.nii.gz").array
    for label in (7, 8):
        assert (out["torch"] == label).any()
        assert dice(out["torch"] == label, out[engine] == label) >= 0.995
    if engine == "openvino":  # what it compiled is kept for the next start
        assert any((tmp_path / "user-cache" / "openvino").iterdir())


@needs_ort
def test_auto_times_the_engines_once_and_chooses_an_equal_one(data, tiny_model, tmp_path, notes, monkeypatch):
    from embedcache.model.engines import choose_streams
    from embedcache.model.engines.measure import pick_streams, stream_counts
    from embedcache.runtime.cpu import cpu_threads

    # the tiny backbone: the same measurement and choice, in milliseconds (LiteMedSAM's took over a minute here);
    # every core the machine has, not a test worker's one (conftest), so that two slices at once are timed too
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    first = cli("encode", "--zoom", "0", data, "--out", tmp_path / "a.h5", "--device", "cpu", "--no-progress", "--model", "tiny")
    assert first.exit_code == 0, first.output
    assert "--engine auto: timing torch, onnxruntime" in first.output
    records = list((tmp_path / "user-cache").glob("auto-tiny-*.json"))
    assert len(records) == 1
    held = json.loads(records[0].read_text())
    assert held["chosen"] in ("torch", "onnxruntime", "openvino")
    assert held["max_abs_difference_from_torch"][held["chosen"]] <= 1e-4
    assert held["seconds_per_slice"][held["chosen"]] == min(held["seconds_per_slice"].values()) or \
        any(d > 1e-4 for d in held["max_abs_difference_from_torch"].values())
    with h5py.File(tmp_path / "a.h5") as f:
        assert json.loads(f.attrs["signature"])["engine"] == held["chosen"]
    for engine, streams in held["streams"].items():  # each engine timed as many slices at once as it runs best
        if engine != "torch":
            measured = json.loads(next((tmp_path / "user-cache").glob(f"streams-tiny-*-{engine}-fp32-*.json")).read_text())
            timed = {int(k): v for k, v in measured["seconds_per_slice"].items()}
            assert streams == measured["streams"] == pick_streams(timed)
            assert set(timed) == set(stream_counts(cpu_threads()))
            graph = tmp_path / "user-cache" / measured["graph"]  # what a graph engine then runs, without measuring
            notes.clear()
            assert choose_streams(engine, graph, "fp32", tiny_model) == streams and notes == []
    again = cli("encode", "--zoom", "0", data, "--out", tmp_path / "b.h5", "--device", "cpu", "--no-progress", "--model", "tiny")
    assert again.exit_code == 0 and "timing" not in again.output  # measured once per CPU and weights
    with h5py.File(tmp_path / "b.h5") as f:
        assert json.loads(f.attrs["signature"])["engine"] == held["chosen"]


@needs_ov
def test_bf16_is_a_cache_of_its_own_and_close_to_fp32(data, tmp_path):
    if not _bf16_cpu():
        pytest.skip("this CPU has no bf16 instructions")
    fp32 = _encode(data, tmp_path / "fp32.h5", "--engine", "openvino", "--dtype", "float32")
    bf16 = _encode(data, tmp_path / "bf16.h5", "--engine", "openvino", "--encoder-precision", "bf16", "--dtype", "float32")
    with h5py.File(fp32) as a, h5py.File(bf16) as b:
        assert json.loads(b.attrs["signature"])["precision"] == "bf16"
        difference = np.abs(a["embeddings"][:] - b["embeddings"][:])
        assert 1e-4 < difference.max() < 0.5 and difference.mean() < 0.01  # not fp32, but near it
    assert "encoded by openvino bf16" in cli("info", bf16).output
    result = cli("encode", "--zoom", "0", _more(data, tmp_path), "--out", fp32, "--device", "cpu", "--no-progress", "--engine",
                 "openvino", "--encoder-precision", "bf16", "--dtype", "float32")
    one_line(result, "precision=fp32, not bf16", "encode into a new file")


def test_threads_follow_the_cgroup_quota(tmp_path):
    from embedcache.runtime.cpu import cgroup_cpu_quota

    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(v1) is None


def test_threads_follow_omp_num_threads_within_the_cores_the_process_has(monkeypatch):
    """A job started with ``OMP_NUM_THREADS=1`` beside another keeps its engines to one thread, as torch keeps its own;
    a value above the cores, or one that is not a positive whole number, leaves the cores."""
    from embedcache.runtime import cpu

    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cpu, "cgroup_cpu_quota", lambda: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu.cpu_threads() == 4
    for asked, threads in (("1", 1), ("3", 3), (" 2 ", 2), ("16", 4), ("0", 4), ("-2", 4), ("two", 4), ("", 4)):
        monkeypatch.setenv("OMP_NUM_THREADS", asked)
        assert cpu.cpu_threads() == threads, asked
    monkeypatch.setattr(cpu, "cgroup_cpu_quota", lambda: 2)  # a container's --cpus 2 caps it too
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu.cpu_threads() == 2


def test_a_measurement_holds_for_one_cpu_not_for_every_cpu_of_that_name(monkeypatch):
    from embedcache.model.backbones import get_backbone
    from embedcache.model.engines import auto_record
    from embedcache.runtime import cpu

    def cpuinfo(family, model, flags):
        block = f"processor\t: {{n}}\nmodel name\t: AMD EPYC\ncpu family\t: {family}\nmodel\t\t: {model}\nflags\t\t: {flags}\n"
        return "\n".join(block.format(n=n) for n in range(2))  # the first processor's block speaks for all

    zen2 = cpuinfo(23, 49, "fpu sse2 avx avx2 fma")
    zen4 = cpuinfo(25, 17, "fpu sse2 avx avx2 fma avx512f avx512_vnni avx512_bf16")
    assert cpu.cpu_identity(zen2) == "AMD EPYC (family 23 model 49; avx2)"
    assert cpu.cpu_identity(zen4) == "AMD EPYC (family 25 model 17; avx2,avx512f,avx512_vnni,avx512_bf16)"
    assert cpu.cpu_identity("") == cpu.cpu_name()  # no /proc/cpuinfo: the name the platform gives
    records = set()
    for identity in [cpu.cpu_identity(zen2), cpu.cpu_identity(zen4)]:  # one name, two CPUs: two records
        monkeypatch.setattr(cpu, "cpu_identity", lambda identity=identity: identity)
        records.add(auto_record(get_backbone("litemedsam"), "0" * 64).name)
    assert len(records) == 2


@needs_ov
def test_an_unusable_cache_folder_is_one_line_and_leaves_nothing_behind(data, tmp_path, monkeypatch):
    taken = tmp_path / "a-file"
    taken.write_text("someone's\n")
    monkeypatch.setenv("EMBEDCACHE_CACHE", str(taken))
    result = cli("encode", "--zoom", "0", data, "--out", tmp_path / "c.h5", "--device", "cpu", "--engine", "openvino")
    one_line(result, f"{taken}: cannot hold the exported", "set EMBEDCACHE_CACHE")
    assert taken.read_text() == "someone's\n"
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "c.h5.parts").exists()  # no cache, no shard folder


def _seeded_prompts():
    """Three seeded embeddings and a box on each (tight, whole-slice, small), as the graph decoder tests decode."""
    import torch

    embeddings = torch.randn(3, 256, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.5
    boxes = torch.tensor([[40.0, 50.0, 120.0, 140.0], [10.0, 10.0, 250.0, 250.0], [100.0, 90.0, 130.0, 118.0]])
    return embeddings, boxes


@pytest.mark.parametrize("engine", GRAPH_ENGINES)
def test_the_graph_decoder_decodes_as_the_eager_one_and_leaves_clicks_to_it(engine, tmp_path, notes):
    import torch

    from embedcache.model.backbones import get_backbone, load_backbone
    from embedcache.model.decoder import decode_boxes
    from embedcache.model.engines import GraphDecoder

    backbone = get_backbone("litemedsam")
    parts, sha = load_backbone(backbone)
    heads = (parts.prompt_encoder, parts.mask_decoder)
    graph = GraphDecoder(engine, backbone, lambda: heads, sha, "vanilla", folder=tmp_path)
    embeddings, boxes = _seeded_prompts()
    with torch.inference_mode():
        for multimask in (False, True):
            want = decode_boxes(*heads, embeddings, boxes, multimask_output=multimask)
            got = graph(embeddings, boxes, multimask_output=multimask)
            for g, w in zip(got, want):
                assert g.shape == w.shape and float((g - w).abs().max()) <= 1e-3
        clicks = (torch.tensor([[[60.0, 70.0]]] * 3), torch.ones(3, 1))
        want = decode_boxes(*heads, embeddings, boxes, points=clicks)
        assert all(torch.equal(g, w) for g, w in zip(graph(embeddings, boxes, points=clicks), want))
        notes.clear()
        again = GraphDecoder(engine, backbone, lambda: pytest.fail("the eager decoder was loaded"), sha, "vanilla",
                             folder=tmp_path)
        assert notes == []  # exported once: neither loaded nor logged
        assert again.graph == graph.graph and torch.equal(again(embeddings, boxes)[1], graph(embeddings, boxes)[1])


@needs_ov
def test_a_bf16_encoder_decodes_through_a_bf16_decoder_graph_close_to_fp32(tmp_path):
    """Where the encoder runs in bf16 the decoder graph does too (1.75x per decode on a Zen 4, box3d Dice on the
    realistic bed's held-out cases within 0.0004 of the fp32 graph's); its masks are bf16's, not fp32's, and close."""
    if not _bf16_cpu():
        pytest.skip("this CPU has no bf16 instructions")
    import torch

    from embedcache.model.backbones import get_backbone, load_backbone
    from embedcache.model.engines import GraphDecoder
    from embedcache.segment.predict import PredictModel

    backbone = get_backbone("litemedsam")
    parts, sha = load_backbone(backbone)
    heads = (parts.prompt_encoder, parts.mask_decoder)
    fp32, bf16 = (GraphDecoder("openvino", backbone, lambda: heads, sha, "vanilla", precision=precision,
                               folder=tmp_path) for precision in ("fp32", "bf16"))
    assert bf16.graph == fp32.graph  # one graph, compiled at two precisions
    embeddings, boxes = _seeded_prompts()
    with torch.inference_mode():
        (want, want_iou), (got, got_iou) = (decode(embeddings, boxes)[:2] for decode in (fp32, bf16))
    assert float((got - want).abs().max()) > 1e-3  # it ran in bf16
    union = ((got > 0) | (want > 0)).sum()
    assert union > 0 and ((got > 0) & (want > 0)).sum() / union >= 0.8
    assert float((got_iou - want_iou).abs().max()) < 0.05
    encoder = type("Encoder", (), {"engine": "openvino", "precision": "bf16", "streams": 1})()
    model = PredictModel(encoder=encoder, prompt_encoder=None, mask_decoder=None, input_size=256, preprocess=None,
                         decode=bf16)
    assert model.engines == "openvino bf16, decoder openvino bf16"


@needs_ort
def test_predict_on_a_graph_engine_builds_no_eager_model_once_its_graphs_exist(data, run_dir, tiny_checkpoint, tmp_path,
                                                                               monkeypatch):
    import embedcache.train.decoders as decoders
    from embedcache.io.datasets import discover_cases
    from embedcache.io.files import file_sha256
    from embedcache.io.volumes import read_label
    from embedcache.train.checkpoint import BEST

    import tiny

    case = discover_cases(data)[0]
    args = ("predict", case.image, "--from-labels", case.label, "--run", run_dir, "--device", "cpu", "--no-progress")
    with tiny.registered(tiny_checkpoint):
        eager = cli(*args, "--engine", "torch", "--out", tmp_path / "torch")
        first = cli(*args, "--engine", "onnxruntime", "--out", tmp_path / "a")
        assert eager.exit_code == 0 and first.exit_code == 0, first.output
        assert "exporting tiny's mask decoder" in first.output and "decoder onnxruntime" in first.output
        monkeypatch.setattr(decoders, "load_model", lambda *a, **k: pytest.fail("the eager model was built"))
        second = cli(*args, "--engine", "onnxruntime", "--out", tmp_path / "b")
    assert second.exit_code == 0 and "exporting" not in second.output, second.output
    got = {name: read_label(tmp_path / name / f"{case.name}.nii.gz").array for name in ("torch", "a", "b")}
    assert np.array_equal(got["a"], got["b"])
    assert (got["a"] != got["torch"]).sum() <= max(5, 0.01 * ((got["a"] > 0) | (got["torch"] > 0)).sum())
    graphs = list((tmp_path / "user-cache").glob("decoder-tiny-*.onnx"))  # one per decoder file
    assert len(graphs) == 1 and file_sha256(run_dir / BEST)[:16] in graphs[0].name


def test_more_slices_at_once_only_where_each_step_pays():
    from embedcache.model.engines.measure import pick_streams

    assert pick_streams({1: 1.0, 2: 0.9}) == 2
    assert pick_streams({1: 1.0, 2: 0.99}) == 1  # within the noise: a lone slice keeps every core
    assert pick_streams({1: 1.0, 2: 1.2}) == 1
    assert pick_streams({1: 1.0, 2: 0.9, 4: 0.89}) == 2 and pick_streams({1: 1.0, 2: 0.9, 4: 0.8}) == 4


_FIRST_RUNS = """
import sys, threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from embedcache.model.engines.sessions import session

run = session("openvino", Path(sys.argv[1]), "fp32", keep_compiled=False, streams=2)
stop = threading.Event()
def busy():  # another thread of numpy work, as encode's reader is, switching the GIL
    labels = np.arange(64 * 256 * 256, dtype=np.int32).reshape(64, 256, 256)
    while not stop.is_set():
        labels.astype(np.uint8)
threading.Thread(target=busy, daemon=True).start()
x = np.ones((2, 3, 64, 64), np.float32)
with ThreadPoolExecutor(2) as pool:
    list(pool.map(run, [x[:1], x[1:]]))
stop.set()
print("ran")
"""


@needs_ov
def test_two_streams_first_runs_at_once_do_not_hang(tmp_path):
    """OpenVINO's bindings set up their numpy interface on their first array; two streams' first runs arriving at once
    hung 2 to 3 fresh processes in 8 until one array went through on one thread first (``openvino_core``)."""
    import subprocess

    import onnx
    from onnx import TensorProto, helper

    shape = [1, 3, 64, 64]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "relu.onnx"))
    for attempt in range(10):  # each a fresh process (the set-up happens once per one); without it 2-3 in 10 hung
        try:
            done = subprocess.run([sys.executable, "-c", _FIRST_RUNS, str(tmp_path / "relu.onnx")], capture_output=True,
                                  text=True, timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"fresh process {attempt + 1}: two streams' first runs hung")
        assert done.returncode == 0 and done.stdout.strip() == "ran", done.stderr[-2000:]


@needs_ov
def test_openvino_keeps_what_it_compiled_apart_per_precision_and_streams(tmp_path):
    """OpenVINO's own cache key leaves the precision hint out: on a bf16 CPU a bf16 compile of LiteMedSAM's encoder
    imported the blob of an earlier fp32 one and crashed the process. Each settings' blob lies in a folder of its
    own, and each runs at its own precision."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from embedcache.model.engines.sessions import session

    weights = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(weights, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "matmul.onnx"))
    x = np.random.default_rng(1).normal(size=(1, 64)).astype(np.float32)
    exact = x.astype(np.float64) @ weights
    settings = [("fp32", 1), ("fp32", 2)] + ([("bf16", 1), ("fp32", 1)] if _bf16_cpu() else [])
    for precision, streams in settings:
        got = session("openvino", tmp_path / "matmul.onnx", precision, streams=streams)(x)[0]
        error = np.abs(got - exact).max()
        assert (error > 1e-3) if precision == "bf16" else (error < 1e-4), (precision, streams, error)
    folders = sorted(p.name for p in (tmp_path / "openvino").iterdir() if any(p.glob("*.blob")))
    assert len(folders) == len(set(settings)), folders


@needs_ort
def test_a_graph_too_large_for_one_file_keeps_its_weights_in_one_file_of_its_own(tiny_checkpoint, tmp_path,
                                                                                 monkeypatch, notes):
    """Past 2 GiB (SAM ViT-H's encoder) a graph's weights cannot lie in the graph: they go into NAME.onnx.data beside
    it, whose sha256 the record holds, so that two graphs' weights never mix and damaged weights are exported again."""
    import torch

    from embedcache.io.files import file_sha256
    from embedcache.model.engines import exported_encoder, store
    from embedcache.model.engines.sessions import runner

    import tiny

    monkeypatch.setattr(store, "EXTERNAL_DATA_BYTES", 0)  # as a graph past the limit does
    backbone = tiny.tiny_backbone(tiny_checkpoint)
    image = torch.from_numpy(store.example_input(backbone))
    graphs, want = {}, {}
    for seed in (0, 1):  # two weights, one folder
        torch.manual_seed(seed)
        encoder = backbone.build().image_encoder.eval()
        with torch.inference_mode():
            want[seed] = encoder(image).numpy()
        graphs[seed] = exported_encoder(backbone, encoder, str(seed) * 64, engine="onnxruntime", folder=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        n for g in graphs.values() for n in (g.name, g.name + ".data", g.with_suffix(".json").name))
    for seed, graph in graphs.items():
        assert graph.stat().st_size < 200_000 < (tmp_path / (graph.name + ".data")).stat().st_size
        record = json.loads(graph.with_suffix(".json").read_text())
        assert record["data_sha256"] == file_sha256(tmp_path / (graph.name + ".data"))
        got = runner("onnxruntime", graph, "fp32")(image.numpy())
        assert np.abs(got - want[seed]).max() <= 1e-4  # each its own weights
    data = tmp_path / (graphs[0].name + ".data")
    with open(data, "r+b") as handle:  # damaged weights: exported again, never used
        handle.seek(data.stat().st_size // 2)
        handle.write(b"\xff" * 64)
    notes.clear()
    torch.manual_seed(0)
    again = exported_encoder(backbone, backbone.build().image_encoder.eval(), "0" * 64, engine="onnxruntime",
                             folder=tmp_path)
    assert again == graphs[0] and "does not match its record; exporting it again" in notes[0]
    assert np.abs(runner("onnxruntime", again, "fp32")(image.numpy()) - want[0]).max() <= 1e-4
