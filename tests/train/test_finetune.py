"""finetune end to end: a run written and resumed exactly, streamed or resident, compiled, distributed, stopped by a bad loss."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from embedcache.errors import CacheMismatchError, EmbedcacheError, UsageError
from embedcache.train import trainer as trainer_module
from embedcache.train.finetune import finetune

import tiny
from conftest import QUIET, decoder_weights, finetune_config


def test_a_cache_of_both_views_trains_a_decoder_per_view_on_one_split_and_resumes_each(tiny_model, small_zoom_cache,
                                                                                        tmp_path):
    from embedcache.train.checkpoint import read_signature
    from embedcache.train.runs import RunFolder

    run, views, seen = tmp_path / "run", [], []

    def interrupt_in_the_regions_epoch_1(record):  # as Ctrl-C would, once the regions' epoch 1 is saved
        seen.append((views[-1][0], record.epoch))
        if views[-1][0] == "regions" and record.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(finetune_config(small_zoom_cache), run, on_epoch=interrupt_in_the_regions_epoch_1,
                 on_view=lambda view, path: views.append((view, path)), **QUIET)
    assert views == [("whole", run), ("regions", run / "zoom")]
    assert seen == [("whole", 1), ("whole", 2), ("regions", 1)]
    whole, regions = read_signature(run / "decoder.safetensors"), read_signature(run / "zoom" / "decoder.safetensors")
    assert whole.views == ("whole",) and regions.views == ("regions",) and regions.zoom_mm == 10.0  # what each saw
    split, glands = RunFolder(run).split(), RunFolder(run / "zoom").split()
    assert not any("@" in n for n in split.train + split.val) and all("@" in n for n in glands.train + glands.val)
    assert {n.split("@")[0] for n in glands.val} == set(split.val)  # one split of the patients

    trained = []
    resumed = finetune(finetune_config(small_zoom_cache), run, resume=True, on_epoch=trained.append, **QUIET)
    assert [r.epoch for r in trained] == [2]  # the whole slices' run was done; the regions' goes on from epoch 1
    assert [r.epoch for r in resumed.history] == [1, 2] and [r.epoch for r in resumed.zoom.history] == [1, 2]
    for folder in (run, run / "zoom"):
        assert [r["epoch"] for r in csv.DictReader(open(folder / "log.csv"))] == ["0", "1", "2"]

    # stopped before the regions' run began: --resume starts it, on the glands of the whole run's own split
    late = tmp_path / "late"

    def stop_at_regions(view, path):
        if view == "regions":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(finetune_config(small_zoom_cache, epochs=1), late, on_view=stop_at_regions, **QUIET)
    assert not (late / "zoom").exists()
    again = finetune(finetune_config(small_zoom_cache, epochs=1), late, resume=True, **QUIET)
    assert [r.epoch for r in again.zoom.history] == [1]
    assert RunFolder(late / "zoom").split() == glands

    # --from RUN starts each view from RUN's decoder of that view
    more = tmp_path / "more"
    finetune(finetune_config(small_zoom_cache, epochs=1, start_from=str(run)), more, **QUIET)
    assert json.loads((more / "config.json").read_text())["start_from"] == str(run)
    assert json.loads((more / "zoom" / "config.json").read_text())["start_from"] == \
        str(run / "zoom" / "decoder.safetensors")


def test_finetune_writes_a_run_and_resumes(tiny_model, small_cache, tmp_path):
    run = tmp_path / "run"
    epochs_seen = []

    def interrupt_after_epoch_1(record):  # as Ctrl-C would, once epoch 1 is saved
        epochs_seen.append(record)
        if record.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(finetune_config(small_cache, epochs=2), run, on_epoch=interrupt_after_epoch_1, **QUIET)
    assert [r.epoch for r in epochs_seen] == [1]
    for name in ("decoder.safetensors", "last.safetensors", "config.json", "split.json", "log.csv"):
        assert (run / name).is_file(), name
    split = json.loads((run / "split.json").read_text())
    assert len(split["val"]) == 1 and not set(split["train"]) & set(split["val"])
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]  # epoch 0: the vanilla decoder
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    assert not list(run.glob("*.partial"))

    with pytest.raises(EmbedcacheError, match="run folder exists; pass --resume"):
        finetune(finetune_config(small_cache, epochs=2), run, **QUIET)
    trained = []
    resumed = finetune(finetune_config(small_cache, epochs=2), run, resume=True, on_epoch=trained.append, **QUIET)
    assert [r.epoch for r in trained] == [2]  # epoch 1 is not trained again
    assert [r.epoch for r in resumed.history] == [1, 2]

    # Resuming gives the same weights as never stopping.
    straight = finetune(finetune_config(small_cache, epochs=2), tmp_path / "straight", **QUIET)
    a = decoder_weights(run / "last.safetensors")
    b = decoder_weights(tmp_path / "straight" / "last.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert straight.best_val_dice == pytest.approx(resumed.best_val_dice)


def test_streaming_from_hdf5_trains_like_the_resident_cache(tiny_model, small_cache, tmp_path):
    finetune(finetune_config(small_cache, epochs=1, resident="device"), tmp_path / "resident", **QUIET)
    finetune(finetune_config(small_cache, epochs=1, resident="stream"), tmp_path / "stream", **QUIET)
    a, b = decoder_weights(tmp_path / "resident" / "last.safetensors"), decoder_weights(tmp_path / "stream" / "last.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_compile_trains_through_the_compiled_decoder_and_saves_plain_weights(tiny_model, small_cache, tmp_path,
                                                                            monkeypatch):
    """--compile: the steps run through torch.compile's graph, and the run saves the same weights under the
    same names as an eager run (the aot_eager backend traces forward and backward as inductor would, without
    its C++ build: 80 s on 2 cores)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counter, **kw))
    finetune(finetune_config(small_cache), tmp_path / "eager", **QUIET)
    assert counter.frame_count == 0
    finetune(finetune_config(small_cache, compile=True), tmp_path / "compiled", **QUIET)
    assert counter.frame_count >= 1 and counter.op_count > 0
    for name in ("last.safetensors", "decoder.safetensors"):
        eager, compiled = decoder_weights(tmp_path / "eager" / name), decoder_weights(tmp_path / "compiled" / name)
        assert compiled.keys() == eager.keys()
        for key in eager:
            torch.testing.assert_close(compiled[key], eager[key])


def test_bad_runs_fail_with_one_line_and_keep_the_last_good_checkpoint(tiny_model, small_cache, tmp_path, monkeypatch):
    with pytest.raises(EmbedcacheError, match="no such run folder to resume"):
        finetune(finetune_config(small_cache), tmp_path / "none", resume=True, **QUIET)
    with pytest.raises(CacheMismatchError, match="backbone"):
        finetune(finetune_config(small_cache, model="litemedsam"), tmp_path / "other", **QUIET)

    run = tmp_path / "run"
    finetune(finetune_config(small_cache, epochs=1), run, **QUIET)
    good = (run / "last.safetensors").read_bytes()
    real = trainer_module.dice_ce_per_prompt
    monkeypatch.setattr(trainer_module, "dice_ce_per_prompt", lambda logits, target: real(logits, target) * float("nan"))
    with pytest.raises(EmbedcacheError, match=r"loss is not finite at epoch 2, step 1 \(cache rows \["):
        finetune(finetune_config(small_cache, epochs=2), run, resume=True, **QUIET)
    assert (run / "last.safetensors").read_bytes() == good
    monkeypatch.setattr(trainer_module, "dice_ce_per_prompt", real)

    (run / "last.safetensors").write_bytes(good[: len(good) // 3])
    with pytest.raises(EmbedcacheError, match="last.safetensors: checkpoint is corrupt or truncated"):
        finetune(finetune_config(small_cache, epochs=2), run, resume=True, **QUIET)


def test_from_a_run_starts_from_its_decoder_and_records_which(tiny_model, small_cache, tmp_path):
    """--from RUN: the new run's epoch 0 is the old run's best decoder (at an lr too small to move it, its decoder
    stays that one); without --from it is the backbone's. config.json names the file it started from and its sha256,
    and a resume keeps that record."""
    from embedcache.io.files import file_sha256
    from embedcache.model.backbones import load_backbone
    from embedcache.train.checkpoint import load_checkpoint

    first = tmp_path / "first"
    finetune(finetune_config(small_cache, epochs=1, lr=3e-3), first, **QUIET)
    trained = load_checkpoint(first / "decoder.safetensors")
    vanilla = load_backbone(tiny_model)[0].mask_decoder.state_dict()
    assert any(not torch.allclose(trained.decoder[k], vanilla[k], atol=1e-4) for k in vanilla)  # training moved it

    still = dict(epochs=1, lr=1e-12)  # AdamW moves each weight by at most about lr per step
    started = finetune(finetune_config(small_cache, start_from=str(first), **still), tmp_path / "from", **QUIET)
    plain = finetune(finetune_config(small_cache, **still), tmp_path / "plain", **QUIET)
    from_weights = decoder_weights(tmp_path / "from" / "decoder.safetensors")
    plain_weights = decoder_weights(tmp_path / "plain" / "decoder.safetensors")
    assert set(from_weights) == set(trained.decoder) == set(vanilla)
    for key in vanilla:
        torch.testing.assert_close(from_weights[key], trained.decoder[key], atol=1e-7, rtol=0)
        torch.testing.assert_close(plain_weights[key], vanilla[key], atol=1e-7, rtol=0)
    # epoch 0 scores the decoder it started from: the first run's best, on the same validation case
    assert started.vanilla_val_dice == pytest.approx(trained.val_dice, abs=1e-6)
    assert started.start_from == str(first) and plain.start_from is None
    assert started.vanilla_val_dice != pytest.approx(plain.vanilla_val_dice, abs=1e-6)

    saved = json.loads((tmp_path / "from" / "config.json").read_text())
    assert saved["start_from"] == str(first)
    assert saved["start_from_sha256"] == file_sha256(first / "decoder.safetensors")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["start_from_sha256"] is None
    header = load_checkpoint(tmp_path / "from" / "decoder.safetensors").config
    assert header["start_from_sha256"] == saved["start_from_sha256"]

    # A resume has its own weights: the file --from named may change or go; the record stays the run's.
    (first / "decoder.safetensors").unlink()
    resumed = finetune(finetune_config(small_cache, start_from=str(first), epochs=2, lr=1e-12), tmp_path / "from",
                       resume=True, **QUIET)
    assert [r.epoch for r in resumed.history] == [1, 2]
    assert json.loads((tmp_path / "from" / "config.json").read_text()) == saved
    with pytest.raises(UsageError, match=r"^--from .*plain differs from the run's .*first"):
        finetune(finetune_config(small_cache, start_from=str(tmp_path / "plain"), epochs=2, lr=1e-12),
                 tmp_path / "from", resume=True, **QUIET)


def test_torchrun_with_two_processes_matches_one_process(tiny_model, tiny_checkpoint, small_cache, tmp_path):
    """DDP on CPU (gloo): two ranks, each half of every batch, reproduce one process's weights."""
    single = tmp_path / "single"
    finetune(finetune_config(small_cache, epochs=2, batch_size=2), single, **QUIET)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(tiny.__file__).parent), *sys.path]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           tiny.__file__, str(tiny_checkpoint), "finetune", str(small_cache), "--out", str(tmp_path / "ddp"),
           "--epochs", "2", "--batch-size", "2", "--val-fraction", "0.34", "--device", "cpu", "--lr", "3e-4",
           "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    a, b = decoder_weights(single / "last.safetensors"), decoder_weights(tmp_path / "ddp" / "last.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4)
