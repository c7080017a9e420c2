from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from embedcache.cli import main

from conftest import cli, one_line, only_line_error


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_has_help(name):
    result = cli(name, "--help")
    assert result.exit_code == 0, result.output
    assert main.commands[name].help and main.commands[name].help.split("\n")[0] in " ".join(result.output.split())


def test_help_does_not_import_torch():
    """``embedcache --help`` is instant: neither torch nor the readers of data (numpy, pydicom, h5py, nibabel) load."""
    code = "import sys; from embedcache.cli import main; sys.argv=['embedcache','--help']\n" \
           "try:\n    main()\nexcept SystemExit:\n    pass\n" \
           "heavy = {'torch', 'numpy', 'pydicom', 'h5py', 'nibabel'} & set(sys.modules)\nassert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_bad_input_gives_one_line_errors(tmp_path, phantom_dir, tiny_model):
    only_line_error(cli("encode", tmp_path / "nowhere", "--out", tmp_path / "c.h5"), "nowhere: no such folder")
    only_line_error(cli("encode", phantom_dir, "--out", tmp_path / "c.h5", "--model", "vit_x"), "unknown model 'vit_x'")
    only_line_error(
        cli("encode", phantom_dir, "--out", tmp_path / "c.h5", "--model", "vit_b", "--weights", tmp_path / "w.pth"),
        "w.pth: checkpoint not found",
    )
    only_line_error(cli("encode", phantom_dir, "--out", tmp_path / "c.h5", "--window-width", "-5"), "--window-width must be")
    only_line_error(cli("info", tmp_path / "none.h5"), "none.h5: no such cache file")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    only_line_error(cli("info", tmp_path / "junk.h5"), "junk.h5: not a readable embedcache cache")
    image = sorted((phantom_dir / "imagesTr").iterdir())[0]
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), str(small))
    only_line_error(
        cli("encode", "--image", image, "--label", small, "--out", tmp_path / "c.h5", "--model", "tiny"),
        "small.nii.gz: label volume shape (8, 8, 8) does not match image",
    )
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "c.h5.parts").exists()


def test_encode_then_info_and_signature_mismatch(tmp_path, phantom_dir, tiny_model):
    out = tmp_path / "c.h5"
    result = cli("encode", phantom_dir, "--out", out, "--model", "tiny", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "encoded" in result.output and "PHANTOM_0003" in result.output
    info = cli("info", out)
    assert info.exit_code == 0 and "model tiny" in info.output and "total" in info.output
    said = " ".join(info.output.split())  # as the terminal's width wrapped it
    assert "whole slices and each gland's region grown 25 mm (--zoom); slice pixels kept" in said and "PHANTOM_0003@8" in said  # both views
    again = cli("encode", phantom_dir, "--out", out, "--model", "tiny", "--window-level", "40", "--no-progress")
    only_line_error(again, "c.h5: cache was made with preprocess=")
    resumed = cli("encode", phantom_dir, "--out", out, "--model", "tiny", "--no-progress")
    assert "9 cases already done" in resumed.output  # 3 cases and their 6 glands


def test_phantom_command_writes_flare_layout(tmp_path):
    result = cli("phantom", tmp_path / "p", "--cases", "1", "--size", "64", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p" / "imagesTr" / "PHANTOM_0001_0000.nii.gz").is_file()
    assert (tmp_path / "p" / "labelsTr" / "PHANTOM_0001.nii.gz").is_file()


def test_finetune_and_export_from_the_command_line(tmp_path, small_cache, tiny_model):
    run = tmp_path / "run"
    result = cli("finetune", small_cache, "--out", run, "--epochs", "1", "--batch-size", "2",
                  "--val-fraction", "0.34", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "vanilla decoder val Dice" in result.output and "fine-tuned" in result.output
    assert "prompts/s" in result.output and (run / "decoder.safetensors").is_file()
    only_line_error(cli("finetune", small_cache, "--out", run, "--no-progress"), "run folder exists; pass --resume")
    only_line_error(cli("finetune", tmp_path / "none.h5", "--out", tmp_path / "r2"), "none.h5: no such cache file")
    only_line_error(cli("finetune", small_cache, "--out", tmp_path / "r3", "--val-fraction", "1.5"), "--val-fraction")
    exported = cli("export", run, "--out", tmp_path / "full.pth")
    assert exported.exit_code == 0 and (tmp_path / "full.pth").is_file()
    only_line_error(cli("export", tmp_path / "nothing", "--out", tmp_path / "x.pth"), "no checkpoint")


def test_finetune_from_a_run_and_what_it_refuses_to_start_from(tmp_path, small_cache, tiny_model, run_dir):
    """--from RUN_DIR trains on from that run's decoder; a path that is no decoder, a decoder of another cache and one
    the run's settings would build otherwise are each one line before anything is trained; so is --resume with
    another --from."""
    import torch

    from embedcache.cache.store import open_cache
    from embedcache.model.backbones import load_backbone
    from embedcache.train.checkpoint import Checkpoint, save_checkpoint

    quick = ("--epochs", "1", "--batch-size", "2", "--val-fraction", "0.34", "--device", "cpu", "--no-progress")
    first = run_dir  # the session's run of these settings
    started = cli("finetune", small_cache, "--out", tmp_path / "second", "--from", first, *quick)
    assert started.exit_code == 0, started.output
    assert f"decoder of --from {first} val Dice" in started.output
    one_line(cli("finetune", small_cache, "--out", tmp_path / "second", "--resume", "--from", tmp_path / "second",
                 *quick), "--from", "differs from the run's", code=2)

    with open_cache(small_cache) as cache:
        signature = cache.signature
    vanilla = load_backbone(tiny_model)[0].mask_decoder.state_dict()

    def decoder(name, *, state=vanilla, config=None, **changes):
        path = tmp_path / name
        save_checkpoint(Checkpoint(decoder=state, signature=replace(signature, **changes), config=config or {},
                                   epoch=1, val_dice=0.5), path)
        return path

    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 64)
    torch.save(vanilla, tmp_path / "pickled.pth")
    adapted = {**vanilla, "adapter.up.bias": torch.zeros(256)}
    for start, extra, fragments in [
        (tmp_path / "nowhere", (), ["nowhere: no such run folder or decoder file"]),
        (tmp_path / "empty", (), ["empty: a folder without decoder.safetensors"]),
        (tmp_path / "junk.safetensors", (), ["junk.safetensors: checkpoint is corrupt"]),
        (tmp_path / "pickled.pth", (), ["pickled.pth: a pickle file"]),
        (decoder("vit_b.safetensors", backbone="vit_b"), (), ["vit_b.safetensors: decoder was trained on a cache "
                                                              "with backbone=vit_b, not tiny"]),
        (decoder("labels.safetensors", labels=(7,)), (), ["labels.safetensors: decoder was trained on a cache with "
                                                          "labels="]),
        (decoder("wider.safetensors", preprocess=replace(signature.preprocess, window_width_hu=400.0)), (),
         ["decoder was trained on a cache with preprocess="]),
        (decoder("adapted.safetensors", state=adapted), (), ["adapted.safetensors: decoder was trained with "
                                                             "--adapter; give --adapter"]),
        (decoder("plain.safetensors"), ("--adapter",), ["plain.safetensors: decoder was trained without --adapter; "
                                                        "drop --adapter"]),
        (decoder("clicks.safetensors", config={"prompts": "interactive"}), (),
         ["clicks.safetensors: decoder was trained with --prompts interactive", "give --prompts interactive"]),
    ]:
        out = tmp_path / f"refused-{start.stem}"
        one_line(cli("finetune", small_cache, "--out", out, "--from", start, *extra, *quick), *fragments)
        assert not out.exists() or not any(out.iterdir()), start


def test_score_reports_vanilla_against_finetuned(tmp_path, small_cache, tiny_model, run_dir):
    import json

    run = run_dir  # one epoch of batch 2, one case in three validating
    result = cli("score", small_cache, "--run", run, "--out", tmp_path / "report", "--protocols", "oracle,box3d",
                  "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "right adrenal" in result.output and "difference" in result.output and "index.html" in result.output
    assert "val cases (1): these validation cases chose the checkpoint" in result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    split = json.loads((run / "split.json").read_text())
    assert report["case_names"] == split["val"] and report["models"] == ["vanilla", "finetuned"]
    assert sorted(report["cases"]["box3d"]) == split["val"] and report["made_by"]["epoch"] == 1
    for protocol in ("oracle", "box3d"):
        for label in ("7", "8"):
            for model in ("vanilla", "finetuned"):
                for metric in ("dice", "nsd", "dice_2d"):
                    assert 0.0 <= report["summary"][protocol][label][model][metric]["mean"] <= 1.0
    pictures = sorted((tmp_path / "report").glob("overlay-*.png"))
    assert len(pictures) == 4  # best and worst per gland
    page = (tmp_path / "report" / "index.html").read_text()
    assert all(p.name in page for p in pictures) and "learning_curve.png" in page
    assert (tmp_path / "report" / "cases.csv").read_text().count("\n") == 1 + 2 * 2 * 2 * len(split["val"])

    # The vanilla weights given as the "fine-tuned" decoder score exactly as the vanilla decoder.
    from embedcache.cache.store import open_cache
    from embedcache.model.backbones import load_backbone
    from embedcache.train.checkpoint import Checkpoint, save_checkpoint

    with open_cache(small_cache) as cache:
        signature = cache.signature
    vanilla = load_backbone(tiny_model)[0].mask_decoder.state_dict()
    made = dict(config={}, epoch=0, val_dice=0.0)
    save_checkpoint(Checkpoint(decoder=vanilla, signature=signature, **made), tmp_path / "vanilla.safetensors")
    same = cli("score", small_cache, "--decoder", tmp_path / "vanilla.safetensors", "--out", tmp_path / "r2",
                "--device", "cpu", "--no-progress")
    assert same.exit_code == 0, same.output
    twin = json.loads((tmp_path / "r2" / "report.json").read_text())
    for by_case in twin["cases"].values():
        for case in by_case.values():
            for by_model in case.values():
                assert by_model["vanilla"] == by_model["finetuned"]
    save_checkpoint(Checkpoint(decoder=vanilla, signature=replace(signature, backbone="vit_b"), **made), tmp_path / "other.safetensors")
    only_line_error(cli("score", small_cache, "--decoder", tmp_path / "other.safetensors", "--out", tmp_path / "r5"),
                    "decoder was trained on a cache with backbone=vit_b, not tiny")
    only_line_error(cli("score", small_cache, "--out", tmp_path / "r3", "--cases", "val"), "needs --run")
    only_line_error(cli("score", small_cache, "--run", tmp_path / "nothing", "--out", tmp_path / "r4"), "no checkpoint")


def test_notes_and_warnings_are_plain_lines_on_stderr(tmp_path, phantom_copy, tiny_model):
    """The library says what it notices through the ``embedcache`` logger; the command prints each note as one plain
    line (a warning as ``warning: ...``, never a Python ``UserWarning`` with its source line) and takes its printer
    away when it ends."""
    import logging

    image = next((phantom_copy / "imagesTr").iterdir())
    image.rename(image.with_name("LONELY_0000.nii.gz"))  # an image without its label
    result = cli("encode", phantom_copy, "--out", tmp_path / "c.h5", "--device", "cpu", "--no-progress",
                 "--model", "tiny")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    warned = [line for line in lines if "LONELY_0000.nii.gz: no label" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and warned[0].endswith("case skipped"), lines
    assert "UserWarning" not in result.output and "Traceback" not in result.output
    assert logging.getLogger("embedcache").handlers == []
