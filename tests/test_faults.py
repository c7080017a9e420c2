"""The catalogue of bad inputs and faults: each ends in one line on stderr with exit code 1 (2 for
usage errors), no traceback, and nothing lost or half-written. Faults that need a full disk, a
failing disk or root are simulated: a writer that raises, RLIMIT_FSIZE, a denied access check."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from embedcache.errors import EmbedcacheError

import tiny
from conftest import cli, one_line

MARKER = Path("/tmp") / f"embedcache-pwned-{os.getpid()}"


class _Evil:
    """Unpickling this writes MARKER: what a crafted checkpoint would do."""

    def __reduce__(self):
        return (exec, (f"open({str(MARKER)!r}, 'w').write('ran')",))


def _plant(path: Path) -> Path:
    import torch

    MARKER.unlink(missing_ok=True)
    torch.save({"decoder": _Evil(), "signature": _Evil()}, path)
    return path


# ------------------------------------------------------------------------------ nothing we load runs code


def test_a_crafted_decoder_runs_nothing_in_any_loading_path(tiny_model, small_cache, run_dir, data, tmp_path):
    evil = _plant(tmp_path / "decoder.safetensors")
    image = sorted((data / "imagesTr").iterdir())[0]
    one_line(cli("score", small_cache, "--decoder", evil, "--out", tmp_path / "r"), "a pickle file", "cannot run code")
    one_line(cli("predict", image, "--decoder", evil, "--from-labels", data / "labelsTr", "--out", tmp_path / "p"),
             "a pickle file")
    planted = tmp_path / "planted"
    shutil.copytree(run_dir, planted)
    _plant(planted / "decoder.safetensors")
    one_line(cli("export", planted, "--out", tmp_path / "x.pth"), "decoder.safetensors: a pickle file")
    _plant(planted / "last.safetensors")
    one_line(cli("finetune", small_cache, "--out", planted, "--resume", "--device", "cpu", "--no-progress"),
             "last.safetensors: a pickle file")
    _plant(tmp_path / "weights.pth")  # backbone weights go through torch.load(weights_only=True)
    one_line(cli("encode", data, "--out", tmp_path / "c.h5", "--model", "tiny", "--weights", tmp_path / "weights.pth"),
             "weights.pth: not a readable PyTorch checkpoint")
    assert not MARKER.exists()


def test_a_decoder_file_missing_fields_or_damaged_is_named(tiny_model, small_cache, run_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(run_dir / "decoder.safetensors"))
    save_file(tensors, str(tmp_path / "bare.safetensors"))  # the weights without embedcache's header
    one_line(cli("score", small_cache, "--decoder", tmp_path / "bare.safetensors", "--out", tmp_path / "r"),
             "bare.safetensors: a safetensors file, but not an embedcache checkpoint")
    header = json.dumps({"dict": [["epoch", 1]]})
    save_file(tensors, str(tmp_path / "partial.safetensors"), metadata={"format": "embedcache-checkpoint-1", "embedcache": header})
    one_line(cli("score", small_cache, "--decoder", tmp_path / "partial.safetensors", "--out", tmp_path / "r"),
             "checkpoint lacks config, signature, val_dice")
    data = (run_dir / "decoder.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    one_line(cli("score", small_cache, "--decoder", tmp_path / "cut.safetensors", "--out", tmp_path / "r"),
             "cut.safetensors: checkpoint is corrupt or truncated")


# ------------------------------------------------------------------------------------------- full disks


def test_a_full_disk_while_writing_a_shard_keeps_finished_cases(tiny_model, data, tmp_path, monkeypatch):
    out = tmp_path / "cache.h5"
    real, calls = Path.write_bytes, []

    def fills_up(self, content):
        calls.append(self)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, content)

    monkeypatch.setattr(Path, "write_bytes", fills_up)
    line = one_line(cli("encode", data, "--out", out, "--model", "tiny", "--device", "cpu", "--zoom", "0",
                        "--no-progress"),
                    "PHANTOM_0002.h5: no space left on device; it needs about", "free; free space and rerun")
    assert "MiB" in line
    assert sorted(p.name for p in (tmp_path / "cache.h5.parts").iterdir()) == ["PHANTOM_0001.h5"] and not out.exists()
    monkeypatch.setattr(Path, "write_bytes", real)
    resumed = cli("encode", data, "--out", out, "--model", "tiny", "--device", "cpu", "--zoom", "0", "--no-progress")
    assert resumed.exit_code == 0 and "1 cases already done" in resumed.output


def test_a_file_size_limit_in_the_merge_is_one_line_not_a_crash(tiny_checkpoint, data, tmp_path):
    """A real write failure inside libhdf5 (EFBIG under RLIMIT_FSIZE), which used to crash at exit."""
    out = tmp_path / "cache.h5"
    script = (f"import sys; sys.path.insert(0, {str(Path(tiny.__file__).parent)!r}); import tiny, pathlib; "
              f"tiny.register(pathlib.Path({str(tiny_checkpoint)!r})); import embedcache.cache.encode as e; "
              "e.check_free_space = lambda *a, **k: None; from embedcache.cli import main; main(sys.argv[1:])")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (12 << 20, 12 << 20))  # shards fit, the merged cache does not

    done = subprocess.run([sys.executable, "-c", script, "encode", str(data), "--out", str(out), "--model", "tiny",
                           "--device", "cpu", "--zoom", "0", "--no-progress"], capture_output=True, text=True,
                          preexec_fn=limit,
                          timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr[-2000:]
    assert lines == [lines[-1]] and "cache.h5: no space left on device; it needs about" in lines[-1], done.stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    assert len(list((tmp_path / "cache.h5.parts").glob("*.h5"))) == 3  # every finished case is kept


def test_the_free_space_check_counts_the_real_dtype(tiny_model, data, tmp_path, monkeypatch):
    import embedcache.io.files

    monkeypatch.setattr(embedcache.io.files, "free_bytes", lambda folder: 1 << 20)
    needs = {}
    for dtype in ("float16", "float32"):
        line = one_line(cli("encode", data, "--out", tmp_path / f"{dtype}.h5", "--model", "tiny", "--dtype", dtype),
                        "needs about", "but 1 MiB are free")
        needs[dtype] = float(line.split("needs about ")[1].split(" ")[0])
    # (4 MiB + 256 KiB mask + 256 KiB pixels) / (2 MiB + 512 KiB)
    assert 1.76 < needs["float32"] / needs["float16"] < 1.84


def test_a_failing_disk_while_saving_a_checkpoint_keeps_the_last_good_one(tiny_model, small_cache, run_dir, tmp_path,
                                                                        monkeypatch):
    import safetensors.torch

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    good = (run / "last.safetensors").read_bytes()

    def failing(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    one_line(cli("finetune", small_cache, "--out", run, "--resume", "--epochs", "2", "--no-progress"),
             "last.safetensors: write failed (Input/output error); check the disk and rerun")
    assert (run / "last.safetensors").read_bytes() == good and not list(run.glob("*.partial"))


# ------------------------------------------------------------------------------- bad voxels, bad settings


def test_nan_voxels_never_become_a_cache(tiny_model, data, tmp_path):
    image = sorted((data / "imagesTr").iterdir())[0]
    ct = nib.load(image)
    volume = np.asarray(ct.dataobj).astype(np.float32)
    volume[10, 20, 5] = np.nan
    nib.save(nib.Nifti1Image(volume, ct.affine), str(image))
    one_line(cli("encode", data, "--out", tmp_path / "c.h5", "--model", "tiny"),
             f"{image}: 1 voxels are NaN or infinite", "replace them")
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "c.h5.parts").exists()


def test_a_nan_window_is_a_usage_error(tiny_model, data, tmp_path):
    one_line(cli("encode", data, "--out", tmp_path / "c.h5", "--window-width", "nan"), "--window-width must be", code=2)
    one_line(cli("encode", data, "--out", tmp_path / "c.h5", "--window-level", "nan"), "--window-level must be", code=2)
    one_line(cli("encode", data, "--out", tmp_path / "c.h5", "--labels", "7,x"), "not a comma-separated list", code=2)
    one_line(cli("encode", data), "Missing option '--out'", code=2)


def refused_before_torch(*args) -> str:
    """``embedcache ARGS`` in a fresh interpreter: it must exit 1 without having imported torch; its stderr."""
    code = ("import sys\nfrom embedcache.cli import main\n"
            f"try:\n    main({[str(a) for a in args]!r})\nexcept SystemExit as exc:\n    assert exc.code == 1, exc.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported before the input was checked'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stderr.strip()


def test_input_errors_come_before_torch_is_imported(data, tmp_path):
    said = refused_before_torch("encode", "--image", data / "nope_0000.nii.gz", "--label", "x.nii.gz", "--out",
                                tmp_path / "c.h5")
    assert said.endswith("nope_0000.nii.gz: no such file; check the path")


# ----------------------------------------------------------------------------- everyday path mistakes


def test_everyday_path_mistakes_are_one_line(tiny_model, data, small_cache, run_dir, tmp_path, monkeypatch):
    image = sorted((data / "imagesTr").iterdir())[0]
    label = sorted((data / "labelsTr").iterdir())[0]
    one_line(cli("encode", "--image", tmp_path / "typo_0000.nii.gz", "--label", label, "--out", tmp_path / "c.h5"),
             "typo_0000.nii.gz: no such file")
    one_line(cli("encode", "--image", image, "--label", tmp_path / "typo.nii.gz", "--out", tmp_path / "c.h5"),
             "typo.nii.gz: no such file")
    (tmp_path / "folder.h5").mkdir()
    one_line(cli("encode", data, "--out", tmp_path / "folder.h5"), "folder.h5: is a folder")
    one_line(cli("encode", data, "--out", tmp_path / "nowhere" / "c.h5"), "nowhere: folder does not exist")
    one_line(cli("encode", data / "imagesTr", "--out", tmp_path / "c.h5"),
             "imagesTr: an images or labels folder itself; give the folder that holds it", str(data))
    one_line(cli("score", data, "--out", tmp_path / "r"), f"{data}: is a folder; give the cache file")
    one_line(cli("encode", data, "--series", "1.2.3", "--out", tmp_path / "c.h5"), "--series picks one series", code=2)
    (tmp_path / "report.txt").write_text("")
    one_line(cli("score", small_cache, "--out", tmp_path / "report.txt"), "report.txt: is a file")
    one_line(cli("export", run_dir, "--out", tmp_path / "folder.h5"), "folder.h5: is a folder")
    one_line(cli("export", small_cache, "--out", tmp_path / "sam.pth"),
             f"{small_cache}: a file; export takes the run folder")
    one_line(cli("finetune", small_cache, "--out", tmp_path / "report.txt"), "report.txt: is a file", code=1)
    import embedcache.io.files

    real = embedcache.io.files.os.access
    monkeypatch.setattr(embedcache.io.files.os, "access",  # as a read-only folder does for anyone but root
                        lambda p, mode: False if "locked" in str(p) and mode & os.W_OK else real(p, mode))
    (tmp_path / "locked").mkdir()
    one_line(cli("encode", data, "--out", tmp_path / "locked" / "c.h5"), "locked: folder is not writable")
    one_line(cli("score", small_cache, "--out", tmp_path / "locked"), "locked: folder is not writable")
    assert list((tmp_path / "locked").iterdir()) == []


def test_score_finds_the_sources_from_any_folder_and_after_a_move(tiny_model, data, tmp_path, monkeypatch):
    """The cache holds its sources' absolute paths; a moved dataset is named with --data, and what is
    found there must be the bytes that were encoded; encoding again from the new place re-points the cache."""
    from dataclasses import replace

    from embedcache.cache.merge import merge
    from embedcache.cache.store import open_cache

    monkeypatch.chdir(tmp_path)
    assert cli("encode", "data", "--out", "c.h5", "--model", "tiny", "--no-progress").exit_code == 0
    with open_cache(tmp_path / "c.h5") as cache:
        records, signature = cache.cases, cache.signature
    assert all(Path(r.image).is_absolute() and Path(r.label).parent == data / "labelsTr" for r in records)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    score = ("score", "../c.h5", "--protocols", "oracle", "--device", "cpu", "--no-progress", "--out")
    assert cli(*score, "r1").exit_code == 0
    expected = json.loads(Path("r1/report.json").read_text())["summary"]

    assert f"sources under {data}\n" in cli("info", "../c.h5").output
    data.rename(tmp_path / "moved")
    assert "3 label volume(s) not there: score needs --data DIR" in cli("info", "../c.h5").output
    one_line(cli(*score, "r2"), "PHANTOM_0001.nii.gz: case PHANTOM_0001's label volume is not there",
             "moved or deleted since encoding", "--data")
    one_line(cli(*score, "r2", "--data", "nowhere"), "nowhere: no such folder")
    assert cli(*score, "r2", "--data", "../moved").exit_code == 0
    assert json.loads(Path("r2/report.json").read_text())["summary"] == expected

    label = tmp_path / "moved" / "labelsTr" / "PHANTOM_0002.nii.gz"
    changed = nib.load(str(label))
    voxels = np.asarray(changed.dataobj).copy()
    voxels[0, 0, 0] = 1
    nib.save(nib.Nifti1Image(voxels, changed.affine, changed.header), str(label))
    one_line(cli(*score, "r3", "--data", "../moved"), "PHANTOM_0002.nii.gz: case PHANTOM_0002's files differ")

    # encoding again from the new place keeps the unchanged cases' embeddings and takes their new paths
    result = cli("encode", "../moved", "--out", "../c.h5", "--model", "tiny", "--no-progress")
    assert result.exit_code == 0, result.output
    with open_cache(tmp_path / "c.h5") as cache:
        assert all(Path(r.label).parent == tmp_path / "moved" / "labelsTr" for r in cache.cases)
        assert [r.digest for r in cache.cases if not r.name.startswith("PHANTOM_0002")] == \
               [r.digest for r in records if not r.name.startswith("PHANTOM_0002")]  # its glands' regions changed too
    assert cli(*score, "r4").exit_code == 0
    # the CT deleted after encoding: the numbers need only the labels; the pictures show the masks alone
    image = tmp_path / "moved" / "imagesTr" / "PHANTOM_0001_0000.nii.gz"
    image.unlink()
    result = cli(*score, "r6", "--cases", "all")
    assert result.exit_code == 0, result.output
    assert f"{image}: not there; the pictures of case PHANTOM_0001 show its masks without the CT" in result.output
    assert json.loads(Path("r6/report.json").read_text())["summary"] == \
           json.loads(Path("r4/report.json").read_text())["summary"]

    # a cache written before paths were absolute names the folder to run in
    relative = [replace(r, image=os.path.relpath(r.image, tmp_path), label=os.path.relpath(r.label, tmp_path))
                for r in records]
    merge(tmp_path / "old.h5", signature=signature, sources=[(tmp_path / "c.h5", relative)])
    one_line(cli("score", "../old.h5", "--protocols", "oracle", "--device", "cpu", "--out", "r5"),
             "relative to the folder encode ran in", "--data")


def test_a_run_finds_its_backbone_weights_from_any_folder(tiny_model, tiny_checkpoint, small_cache, tmp_path,
                                                          monkeypatch):
    shutil.copy(tiny_checkpoint, tmp_path / "w.pth")
    monkeypatch.chdir(tmp_path)
    result = cli("finetune", small_cache, "--out", "run", "--weights", "w.pth", "--epochs", "1", "--batch-size", "2",
                  "--val-fraction", "0.34", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = cli("score", small_cache, "--run", "../run", "--out", "r", "--protocols", "oracle", "--device", "cpu",
                  "--no-progress")
    assert result.exit_code == 0, result.output
    result = cli("export", "../run", "--out", "sam.pth")
    assert result.exit_code == 0, result.output


def test_a_symbolic_link_loop_in_the_data_folder(tiny_model, data, tmp_path):
    loop = data / "imagesTr" / "LOOP_0000.nii.gz"
    loop.symlink_to(loop)
    shutil.copy(sorted((data / "labelsTr").iterdir())[0], data / "labelsTr" / "LOOP.nii.gz")
    one_line(cli("encode", data, "--out", tmp_path / "c.h5", "--model", "tiny"),
             "LOOP_0000.nii.gz: a symbolic link that leads nowhere")


def test_a_damaged_config_or_split_on_resume(tiny_model, small_cache, run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "config.json").write_text(json.dumps({**json.loads((run_dir / "config.json").read_text()), "colour": "red"}))
    one_line(cli("finetune", small_cache, "--out", run, "--resume"), "config.json: unknown settings ['colour']")
    (run / "config.json").write_text("{not json")
    one_line(cli("finetune", small_cache, "--out", run, "--resume"), "config.json: not a readable settings file")
    shutil.copy(run_dir / "config.json", run / "config.json")
    one_line(cli("finetune", small_cache, "--out", run, "--resume", "--lr", "0.5"),
             "--lr 0.5 differs from the run's 0.0001", code=2)
    (tmp_path / "split.json").write_text("[")
    one_line(cli("finetune", small_cache, "--out", tmp_path / "new", "--split", tmp_path / "split.json"),
             "split.json: not a readable JSON file")
    (run / "split.json").write_text("{")
    one_line(cli("finetune", small_cache, "--out", run, "--resume", "--epochs", "2"),
             "split.json: not a readable split file", "start a new run")
    one_line(cli("score", small_cache, "--run", run, "--out", tmp_path / "r"), "split.json: not a readable split file")
    (run / "split.json").write_text('{"train": "PHANTOM_0001"}')
    one_line(cli("score", small_cache, "--run", run, "--out", tmp_path / "r"), "split.json: not a split that finetune wrote")


def test_a_run_with_a_split_file_resumes_from_any_folder(tiny_model, small_cache, tmp_path, monkeypatch):
    from embedcache.cache.store import open_cache

    with open_cache(small_cache) as cache:
        names = [c.name for c in cache.cases]
    monkeypatch.chdir(tmp_path)
    Path("split.json").write_text(json.dumps({"train": names[:2], "val": names[2:]}))
    train = ("finetune", small_cache, "--out", tmp_path / "run", "--batch-size", "2", "--device", "cpu", "--no-progress")
    assert cli(*train, "--split", "split.json", "--epochs", "1").exit_code == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "split.json").rename(tmp_path / "moved.json")  # the run folder holds its own split
    result = cli(*train, "--resume", "--epochs", "2")
    assert result.exit_code == 0 and "resuming" in result.output, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["split"] == str(tmp_path / "split.json")


def test_a_corrupted_cache_chunk_is_named_with_its_rows(tiny_model, small_cache, run_dir, tmp_path):
    damaged = tmp_path / "damaged.h5"
    shutil.copy(small_cache, damaged)
    with h5py.File(damaged, "r") as f:
        info = f["embeddings"].id.get_chunk_info(3)  # row 3's chunk
    with open(damaged, "r+b") as handle:
        handle.seek(info.byte_offset + 1000)
        handle.write(b"\x00\x11\x22\x33" * 64)
    line = one_line(cli("finetune", damaged, "--out", tmp_path / "run", "--device", "cpu", "--val-fraction", "0.34",
                         "--no-progress"), "damaged.h5: embeddings of rows [3] cannot be read")
    assert "encode it again" in line
    one_line(cli("score", damaged, "--out", tmp_path / "r", "--cases", "all", "--protocols", "oracle", "--device", "cpu",
                  "--no-progress"), "damaged.h5: embeddings of rows [", "cannot be read")


# ------------------------------------------------------------------------------------- no dead ends


def test_a_run_killed_before_its_first_epoch_ends_can_be_resumed(tiny_model, small_cache, tmp_path, monkeypatch):
    import embedcache.train.loop

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    with monkeypatch.context() as patch:  # only this; the tiny model stays registered
        patch.setattr(embedcache.train.loop, "train_epoch", killed)
        result = cli("finetune", small_cache, "--out", run, "--epochs", "1", "--val-fraction", "0.34", "--device",
                     "cpu", "--no-progress")
    assert result.exit_code == 130 and "rerun the same command to resume" in result.output
    assert (run / "last.safetensors").is_file()  # the folder was created with its first checkpoint
    resumed = cli("finetune", small_cache, "--out", run, "--resume", "--device", "cpu", "--no-progress")
    assert resumed.exit_code == 0 and "resuming" in resumed.output and "after epoch 0" in resumed.output


def test_a_nan_loss_in_the_first_epoch_points_to_a_checkpoint_that_exists(tiny_model, small_cache, tmp_path, monkeypatch):
    from embedcache.train import trainer

    real = trainer.dice_ce_per_prompt
    monkeypatch.setattr(trainer, "dice_ce_per_prompt", lambda logits, target: real(logits, target) * float("nan"))
    run = tmp_path / "run"
    line = one_line(cli("finetune", small_cache, "--out", run, "--epochs", "1", "--val-fraction", "0.34",
                         "--device", "cpu", "--no-progress"), "loss is not finite at epoch 1, step 1")
    assert line.endswith("last.safetensors") and (run / "last.safetensors").is_file()


# ------------------------------------------------------------------------ no silent loss or mix-ups


def test_predict_refuses_bad_boxes_and_collisions(data, tmp_path):
    image = sorted((data / "imagesTr").iterdir())[0]
    name = image.name.replace("_0000.nii.gz", "")
    boxes = tmp_path / "boxes.json"
    cases = {
        "list": ([{"label": 7, "box3d": [1, 1, 1, 5, 5, 5]}], "boxes.json: expected an object"),
        "nan": ({name: [{"label": 7, "slice": 3, "box": [1, 1, "NaN", 5]}]}, "box has a NaN or infinite value"),
        "text": ({name: [{"label": 7, "slice": 3, "box": [1, 1, "five", 5]}]}, "could not convert"),
        "outside": ({name: [{"label": 7, "box3d": [500, 500, 1, 600, 600, 5]}]}, "lies outside the volume"),
        "inverted": ({name: [{"label": 7, "box3d": [9, 9, 5, 1, 1, 1]}]}, "box is inverted"),
        "label": ({name: [{"label": 300, "box3d": [1, 1, 1, 5, 5, 5]}]}, "label 300 must lie in 1..255"),
    }
    for key, (table, fragment) in cases.items():
        boxes.write_text(json.dumps(table).replace('"NaN"', "NaN"))
        result = cli("predict", image, "--boxes", boxes, "--out", tmp_path / "p", "--device", "cpu")
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and fragment in result.output and "Traceback" not in result.output, (key, result.output)
        assert not (tmp_path / "p").exists(), key  # nothing written, the model never loaded
    twin = tmp_path / "twin" / image.name
    twin.parent.mkdir()
    shutil.copy(image, twin)
    one_line(cli("predict", image, twin, "--from-labels", data / "labelsTr", "--out", tmp_path / "p"),
             "would both be written to", code=2)
    del lines


def test_evaluate_reports_missing_and_misaligned_cases_and_scores_the_rest(data, tmp_path):
    labels = data / "labelsTr"
    pred = tmp_path / "pred"
    pred.mkdir()
    files = sorted(labels.iterdir())
    shutil.copy(files[0], pred / files[0].name)  # a perfect prediction
    moved = nib.load(files[1])
    affine = moved.affine.copy()
    affine[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(moved.dataobj), affine), str(pred / files[1].name))
    result = cli("evaluate", pred, labels, "--out", tmp_path / "e", "--no-progress")
    assert result.exit_code == 1 and "2 case(s) not scored" in result.output
    assert f"{files[1].name}: label geometry differs" in result.output and "no prediction for this case" in result.output
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert list(report["cases"]["given"]) == [files[0].name.replace(".nii.gz", "")]
    assert report["cases"]["given"][files[0].name.replace(".nii.gz", "")]["7"]["prediction"]["dice"] == 1.0
    assert len(report["errors"]) == 2


# ----------------------------------------------------------------------------------- what already held


def test_what_already_held(tiny_model, data, small_cache, tmp_path):
    image = sorted((data / "imagesTr").iterdir())[0]
    truncated = tmp_path / "cut_0000.nii.gz"
    truncated.write_bytes(image.read_bytes()[:5000])
    one_line(cli("encode", "--image", truncated, "--label", sorted((data / "labelsTr").iterdir())[0], "--out",
                  tmp_path / "c.h5"), "cut_0000.nii.gz: ")
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), str(small))
    one_line(cli("encode", "--image", image, "--label", small, "--out", tmp_path / "c.h5"),
             "small.nii.gz: label volume shape (8, 8, 8) does not match image")
    one_line(cli("encode", data, "--out", small_cache, "--model", "tiny", "--window-level", "40"),
             "cache was made with preprocess=")
    assert not (tmp_path / "c.h5").exists()


# ------------------------------------------------------------------ implausible CT, labels, options


def _nifti(path: Path, data: np.ndarray, *, dtype=None) -> Path:
    image = nib.Nifti1Image(data.astype(dtype) if dtype else data, np.diag([0.8, 0.8, 2.5, 1.0]))
    nib.save(image, str(path))
    return path


def test_implausible_ct_and_labels_are_named(data, tmp_path):
    """A blank volume, HU scaled by 1000, unsigned raw values and a label that is no id each end in one
    line naming the file, before a single slice is encoded (the rest of encode's checks come later)."""
    from embedcache.io.volumes import check_sources, read_image, read_label

    shape = (32, 32, 4)
    body = np.full(shape, -1000.0, np.float32)
    body[8:24, 8:24] = 40.0
    blank = _nifti(tmp_path / "blank_0000.nii.gz", np.full(shape, -1000.0, np.float32))
    with pytest.raises(EmbedcacheError, match="blank_0000.nii.gz: no tissue: fewer than 1 in 10,000 voxels"):
        read_image(blank)
    scaled = _nifti(tmp_path / "scaled_0000.nii.gz", body * 1000)
    with pytest.raises(EmbedcacheError, match=r"scaled_0000.nii.gz: 100 % of the voxels lie outside .* undo its scaling"):
        read_image(scaled)
    read_image(_nifti(tmp_path / "fine_0000.nii.gz", body))  # a body in HU reads
    label = _nifti(tmp_path / "label.nii.gz", np.zeros(shape, np.uint8))
    raw = _nifti(tmp_path / "raw_0000.nii.gz", body + 1024, dtype=np.uint16)  # scanner values, no rescale
    with pytest.raises(EmbedcacheError, match="raw_0000.nii.gz: voxels are unsigned .* no voxel can be air"):
        check_sources(raw, label)
    huge = np.zeros(shape, np.float32)
    huge[0, 0, 0] = 1e10
    with pytest.raises(EmbedcacheError, match=r"huge.nii.gz: label volume holds 1e\+10, which is no label id"):
        read_label(_nifti(tmp_path / "huge.nii.gz", huge))
    with pytest.raises(EmbedcacheError, match="negative.nii.gz: label volume holds -3, which is no label id"):
        read_label(_nifti(tmp_path / "negative.nii.gz", np.full(shape, -3, np.int16)))


def test_a_split_naming_an_unknown_case_is_refused_before_torch(small_cache, tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["PHANTOM_0001", "NOBODY"], "val": ["PHANTOM_0002"]}))
    said = refused_before_torch("finetune", small_cache, "--split", split, "--out", tmp_path / "run")
    assert "split.json: case NOBODY (train) is not in" in said.splitlines()[-1]


def test_predict_refuses_options_its_prompts_do_not_use(data, tmp_path):
    image = sorted((data / "imagesTr").iterdir())[0]
    (tmp_path / "boxes.json").write_text(json.dumps({"x": []}))
    for option, value in (("--box-margin-mm", "5"), ("--jitter", "0.2"), ("--seed", "3"), ("--protocol", "oracle")):
        one_line(cli("predict", image, "--boxes", tmp_path / "boxes.json", option, value, "--out", tmp_path / "p"),
                 f"{option} shapes the prompts drawn from --from-labels; --boxes are segmented as given", code=2)
    one_line(cli("score", tmp_path / "c.h5", "--box-margin-mm", "-5", "--out", tmp_path / "r"),
             "--box-margin-mm and --grow-mm must lie in 0..100 mm", code=2)


def test_a_decoder_that_does_not_fit_or_lies_in_its_header_is_one_line(tiny_model, small_cache, run_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(run_dir / "decoder.safetensors"), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    header = json.loads(meta["embedcache"])

    def crafted(name, tensors=tensors, **fields):
        items = [[k, fields.get(k, v)] for k, v in header["dict"]]
        save_file(tensors, str(tmp_path / name), metadata={**meta, "embedcache": json.dumps({"dict": items})})
        return tmp_path / name

    score = ["--out", tmp_path / "r", "--device", "cpu", "--protocols", "oracle"]
    one_line(cli("score", small_cache, "--decoder", crafted("sig.safetensors", signature="tiny"), *score),
             "sig.safetensors: signature is not one")
    one_line(cli("score", small_cache, "--decoder", crafted("dice.safetensors", val_dice="high"), *score),
             "dice.safetensors: checkpoint val_dice 'high' is not a Dice")
    first = sorted(tensors)[0]
    for name, changed, what in (
            ("missing.safetensors", {k: v for k, v in tensors.items() if k != first}, f"lacks {first[13:]}"),
            ("extra.safetensors", {**tensors, "mask_decoder.extra": tensors[first].clone()}, "has an extra tensor extra"),
            ("shape.safetensors", {**tensors, first: tensors[first].flatten()[:1].clone()}, f"{first[13:]} is (1,)")):
        one_line(cli("score", small_cache, "--decoder", crafted(name, tensors=changed), *score),
                 f"{name}: decoder does not fit model tiny ({what}")
    assert not (tmp_path / "r").exists()  # refused before the report was begun


def test_a_decoder_that_cannot_serve_the_prompts_is_refused_before_torch(data, run_dir, tmp_path):
    """The decoder's header alone says which labels it knows: a box for label 99 costs a second."""
    image = sorted((data / "imagesTr").iterdir())[0]
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({image.name: [{"label": 99, "box3d": [1, 1, 1, 5, 5, 2]}]}))
    said = refused_before_torch("predict", image, "--run", run_dir, "--boxes", boxes, "--out", tmp_path / "p")
    assert "label 99 is not one the decoder was trained for (7, 8)" in said
    assert not (tmp_path / "p").exists()


# ------------------------------------------------------------------------------------------ bounded inputs


def _nifti_declaring(path: Path, shape) -> Path:
    """A small uncompressed NIfTI whose header declares ``shape``: what a damaged or crafted header says."""
    image = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    nib.save(image, str(path))
    raw = bytearray(path.read_bytes())
    raw[40:56] = np.array([3, *shape, 1, 1, 1, 1], "<i2").tobytes()  # dim[0..7]
    path.write_bytes(bytes(raw))
    return path


def test_a_header_declaring_a_huge_grid_is_refused_before_a_voxel_is_read(data, tmp_path):
    """A 1 KB header may declare 30000 × 30000 slices (or a gzip inflate to them): the size is checked against the
    documented bound before reading, so evaluate and predict say so in one line instead of a MemoryError."""
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    truth.mkdir(), pred.mkdir()
    case = sorted((data / "labelsTr").iterdir())[0]
    shutil.copy(case, truth / case.name)
    _nifti_declaring(pred / case.name.replace(".nii.gz", ".nii"), (30000, 30000, 2))
    result = cli("evaluate", pred, truth, "--out", tmp_path / "r", "--no-progress")
    assert "declares a 30000×30000×2 grid, beyond the largest volume" in result.output and "Traceback" not in result.output
    negative = _nifti_declaring(pred / case.name.replace(".nii.gz", ".nii"), (8, 8, -36))
    result = cli("evaluate", pred, truth, "--out", tmp_path / "r", "--no-progress")
    assert "with a negative size; the header is damaged" in result.output and "Traceback" not in result.output
    negative.unlink()
    big = _nifti_declaring(tmp_path / "big.nii", (32000, 32000, 1))  # NIfTI-1 sizes are int16
    result = cli("predict", big, "--from-labels", case, "--out", tmp_path / "p", "--device", "cpu")
    one_line(result, "1 input(s) failed")  # the input's own line first, then the run's
    assert f"{big}: its header declares a 32000×32000×1 grid" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "p").exists()


def test_a_boxes_file_is_bounded_and_says_what_is_wrong(data, tmp_path):
    """Clicks per gland are capped in the file as --clicks is (2000 clicks ran 25 minutes); a key given twice is
    refused (JSON keeps the last, silently); corners of 1e308 lie outside the volume, with no numpy warning."""
    image = sorted((data / "imagesTr").iterdir())[0]
    name = image.name.replace("_0000.nii.gz", "")
    boxes = tmp_path / "boxes.json"
    many = [[20, 20, 10, 1]] * 21
    boxes.write_text(json.dumps({name: [{"label": 7, "box3d": [10, 10, 5, 40, 40, 15], "points": many}]}))
    result = cli("predict", image, "--boxes", boxes, "--out", tmp_path / "p", "--device", "cpu")
    assert result.exit_code == 1 and "label 7 has 21 clicks in this file; at most 20" in result.output
    boxes.write_text('{"%s": [{"label": 7, "box3d": [10, 10, 5, 40, 40, 15]}], "%s": []}' % (name, name))
    one_line(cli("predict", image, "--boxes", boxes, "--out", tmp_path / "p", "--device", "cpu"),
             f"key '{name}' appears twice in one object")
    boxes.write_text(json.dumps({name: [{"label": 7, "box3d": [1, 1, 1, 1e308, 1e308, 1e308]}]}))
    result = cli("predict", image, "--boxes", boxes, "--out", tmp_path / "p", "--device", "cpu")
    assert result.exit_code == 1 and "lies outside the volume" in result.output, result.output
    assert "Warning" not in result.output and "inverted" not in result.output
    assert not (tmp_path / "p").exists()


def test_label_ids_are_checked_alike_by_every_command(data, tmp_path):
    """evaluate took --labels 300,-1 and reported Dice 1.0 for both; encode refused the same ids."""
    for command in (["evaluate", data / "labelsTr", data / "labelsTr", "--out", tmp_path / "r"],
                    ["encode", data, "--out", tmp_path / "c.h5"]):
        for ids in ("300,-1", "7,7", "0"):
            result = cli(*command, "--labels", ids)
            assert result.exit_code == 2 and "distinct ids in 1..255" in result.output, (command[0], ids, result.output)
            assert "Traceback" not in result.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "c.h5").exists()


def test_ct_cropped_inside_the_body_is_read_with_a_note_and_other_airless_volumes_are_not(data, tmp_path, notes):
    """A region of interest around the kidneys and glands holds no air: its fat and soft tissue say it is CT in HU.
    MR-like values (no fat band below zero), a PNG stack and a normalized volume are still refused."""
    from embedcache.io.nifti import write_nifti
    from embedcache.io.volumes import read_image

    image = read_image(sorted((data / "imagesTr").iterdir())[0])
    z, y, x = image.array.shape
    cropped = image.array[:, y // 2 - 20 : y // 2 + 20, x // 2 - 30 : x // 2 + 30]
    assert cropped.min() > -500  # no air
    path = tmp_path / "roi.nii.gz"
    write_nifti(cropped, _geometry_of(cropped.shape), path)
    assert read_image(path).array.shape == cropped.shape
    assert any(re.search("holds no air .* read as CT cropped inside the body", n) for n in notes), notes
    for name, values in (("mr", np.abs(cropped) * 3 + 200), ("png", np.clip(cropped, 0, 255)),
                         ("normalized", (cropped - cropped.mean()) / cropped.std())):
        other = tmp_path / f"{name}.nii.gz"
        write_nifti(values.astype(np.float32), _geometry_of(cropped.shape), other)
        with pytest.raises(EmbedcacheError, match="does not look like CT in Hounsfield units"):
            read_image(other)


def _geometry_of(shape_zyx):
    from embedcache.io.geometry import Geometry

    return Geometry(source_shape=(shape_zyx[2], shape_zyx[1], shape_zyx[0]), source_affine=np.diag([-1.0, -1, 2.5, 1]))
