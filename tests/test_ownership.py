"""Nothing made by someone else is overwritten, one writer at a time, and only checked files are read.

Each case ends in one line with a non-zero exit, and every file that was not the command's own
keeps its bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import pytest

from embedcache.cache.merge import merge
from embedcache.cache.store import open_cache
from embedcache.io.files import WriterLock, lock_path

from conftest import cli, one_line


def _bytes(*paths: Path) -> dict:
    return {p: p.read_bytes() for p in paths}


def test_predict_never_writes_over_an_input_a_label_or_a_file_it_did_not_write(tiny_model, data, tmp_path):
    image, label = sorted((data / "imagesTr").iterdir())[0], sorted((data / "labelsTr").iterdir())[0]
    named_like_output = tmp_path / "in" / label.name  # CASE.nii.gz: predict's own output name for it
    named_like_output.parent.mkdir()
    shutil.copy(image, named_like_output)
    before = _bytes(named_like_output, label)
    common = ["--model", "tiny", "--device", "cpu", "--no-progress", "--protocol", "oracle"]
    # the folder of an input image or of the labels is refused whole, before the file of the same name is reached
    one_line(cli("predict", named_like_output, "--from-labels", label, "--out", named_like_output.parent, *common),
             f"is the folder of the input {named_like_output}", code=2)
    one_line(cli("predict", image, "--from-labels", label, "--out", label.parent, *common),
             f"is the folder of the input {label}", code=2)
    foreign = tmp_path / "theirs" / label.name
    foreign.parent.mkdir()
    foreign.write_bytes(b"someone's segmentation")
    one_line(cli("predict", image, "--from-labels", label, "--out", foreign.parent, *common),
             f"{foreign}: exists and predict did not write it")
    assert _bytes(named_like_output, label) == before and foreign.read_bytes() == b"someone's segmentation"
    (tmp_path / "crafted").mkdir()
    (tmp_path / "crafted" / "predict.json").write_text('{"written": ["x.nii.gz"]}')
    one_line(cli("predict", image, "--from-labels", label, "--out", tmp_path / "crafted", *common),
             "predict.json: not a record predict wrote")

    # Its own outputs it replaces: a rerun into the same folder works, and the record lists them.
    for _ in range(2):
        result = cli("predict", image, "--from-labels", label, "--out", tmp_path / "mine", *common)
        assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "mine" / "predict.json").read_text())
    case = label.name.removesuffix(".nii.gz")
    assert record["written"] == [label.name, f"{case}.review.json"] and record["config"]["prompts"] == "oracle"


def test_export_never_writes_over_the_weights_and_asks_before_replacing_a_file(tiny_model, tiny_checkpoint, run_dir,
                                                                               tmp_path):
    weights = tmp_path / "weights.pth"
    shutil.copy(tiny_checkpoint, weights)
    before = weights.read_bytes()
    one_line(cli("export", run_dir, "--weights", weights, "--out", weights, "--force"),
             f"{weights}: is the backbone weights")
    one_line(cli("export", run_dir, "--out", run_dir / "decoder.safetensors", "--force"), "is a file of the run")
    other = tmp_path / "notes.pth"
    other.write_bytes(b"my notes")
    one_line(cli("export", run_dir, "--out", other), f"{other}: exists; pass --force to replace it")
    assert weights.read_bytes() == before and other.read_bytes() == b"my notes"
    assert cli("export", run_dir, "--out", other, "--force").exit_code == 0 and other.read_bytes() != b"my notes"


def test_a_report_replaces_only_an_earlier_report_and_replaces_it_whole(tiny_model, small_cache, tmp_path):
    common = ["--protocols", "oracle", "--device", "cpu", "--no-progress"]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "thesis.docx").write_bytes(b"chapter 1")
    one_line(cli("score", small_cache, "--out", mixed, *common), f"{mixed}: holds thesis.docx, which a report does not")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<html>my page</html>")
    one_line(cli("score", small_cache, "--out", tmp_path / "site", *common), "holds files but no report of embedcache")
    assert (mixed / "thesis.docx").read_bytes() == b"chapter 1"
    assert (tmp_path / "site" / "index.html").read_text() == "<html>my page</html>"

    report = tmp_path / "report"
    assert cli("score", small_cache, "--out", report, *common).exit_code == 0
    (report / "overlay-best-label7-OLD-z1.png").write_bytes(b"an older report's picture")
    assert cli("score", small_cache, "--out", report, *common).exit_code == 0
    assert not (report / "overlay-best-label7-OLD-z1.png").exists()  # replaced whole: nothing of the old one mixes in
    assert json.loads((report / "config.json").read_text())["prompts"] == ["oracle"]
    # no building or old folder left beside it; the lock that keeps a second score out stays, as a cache's does
    assert [p.name for p in tmp_path.glob(".*")] == [".report.lock"]


def test_evaluate_refuses_to_score_a_folder_against_itself(data, tmp_path):
    one_line(cli("evaluate", data / "labelsTr", data / "labelsTr", "--out", tmp_path / "r"),
             "the predictions and the ground truth are the same folder")
    assert not (tmp_path / "r").exists()


def test_resume_of_a_folder_without_a_run_never_deletes_its_files(tiny_model, small_cache, tmp_path):
    """--resume of a folder with no checkpoint cleared every file named like a run's, the --split file it was about to
    read included: now only a folder that a finetune start made (its config.json) is cleared, never the split file."""
    folder = tmp_path / "project"
    folder.mkdir()
    split = folder / "split.json"
    split.write_text('{"train": ["PHANTOM_0001"], "val": ["PHANTOM_0002"], "test": []}')
    (folder / "log.csv").write_text("my notes")
    before = {p: p.read_bytes() for p in folder.iterdir()}
    one_line(cli("finetune", small_cache, "--out", folder, "--split", split, "--resume", "--epochs", "1",
                 "--device", "cpu"), "holds", "but no config.json of a finetune start")
    assert {p: p.read_bytes() for p in folder.iterdir()} == before


def test_resume_never_trains_away_a_finished_decoder(tiny_model, small_cache, run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "last.safetensors").unlink()
    before = (run / "decoder.safetensors").read_bytes()
    one_line(cli("finetune", small_cache, "--out", run, "--resume", "--device", "cpu"),
             "last.safetensors: missing, but the run holds a trained decoder.safetensors")
    assert (run / "decoder.safetensors").read_bytes() == before


def test_one_writer_at_a_time_and_a_killed_one_blocks_nothing(tiny_model, small_cache, data, tmp_path):
    out = tmp_path / "c.h5"
    with WriterLock(lock_path(out), what=str(out)):
        one_line(cli("encode", data, "--out", out, "--model", "tiny", "--device", "cpu"),
                 f"{out}: another embedcache (pid {os.getpid()}) is writing it")
    run = tmp_path / "run"
    with WriterLock(lock_path(run), what=str(run)):
        one_line(cli("finetune", small_cache, "--out", run, "--device", "cpu"), f"{run}: another embedcache (pid")
    assert not out.exists() and not run.exists()
    one_line(cli("finetune", tmp_path / "typo.h5", "--out", tmp_path / "r2"), "typo.h5: no such cache file")
    assert not lock_path(tmp_path / "r2").exists()  # a refused start leaves nothing behind, not even a lock file
    # A holder killed with SIGKILL leaves its lock file, but not its lock.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from embedcache.io.files import WriterLock; "
                               f"WriterLock(__import__('pathlib').Path({str(lock_path(out))!r}), what='x').__enter__(); "
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    result = cli("encode", data, "--out", out, "--model", "tiny", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("craft", ["external link", "virtual dataset", "wrong type"])
def test_a_cache_that_reads_another_file_or_lies_about_its_layout_is_refused(small_cache, tmp_path, craft):
    cache = tmp_path / "c.h5"
    shutil.copy(small_cache, cache)
    with h5py.File(cache, "r+") as f:
        n = f["embeddings"].shape[0]
        if craft == "external link":
            with h5py.File(tmp_path / "other.h5", "w") as other:
                other.create_dataset("e", data=f["embeddings"][:])
            del f["embeddings"]
            f["embeddings"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "e")
        elif craft == "virtual dataset":
            layout = h5py.VirtualLayout(shape=(n,), dtype="i4")
            layout[:] = h5py.VirtualSource(str(small_cache), "case_index", shape=(n,))
            del f["case_index"]
            f.create_virtual_dataset("case_index", layout)
        else:
            boxes = f["boxes"][:]
            del f["boxes"]
            f.create_dataset("boxes", data=boxes.astype("f8"))
    what = {"external link": "embeddings is an external link", "virtual dataset": "case_index is a virtual dataset",
            "wrong type": "boxes is float64"}[craft]
    one_line(cli("info", cache), f"{cache}: not a readable embedcache cache ({what}")


def test_a_case_list_that_lies_about_its_rows_is_refused(small_cache, tmp_path):
    with open_cache(small_cache) as cache:
        records, signature = cache.cases, cache.signature
    merge(tmp_path / "c.h5", signature=signature, sources=[(small_cache, records)])
    with h5py.File(tmp_path / "c.h5", "r+") as f:
        cases = json.loads(f["cases"][()])
        cases[0]["n_rows"] = 10**6
        del f["cases"]
        f.create_dataset("cases", data=json.dumps(cases))
    one_line(cli("info", tmp_path / "c.h5"), f"case {records[0].name}'s rows 0..999999 overlap another case or lie beyond")


def test_outputs_get_the_umask_mode_and_json_nesting_is_one_line(run_dir, data, tmp_path):
    assert (run_dir / "decoder.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()
    deep = tmp_path / "boxes.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    image = sorted((data / "imagesTr").iterdir())[0]
    one_line(cli("predict", image, "--boxes", deep, "--out", tmp_path / "p"), f"{deep}: not a readable JSON file (nested")


def test_info_never_cuts_a_case_name(small_cache, tmp_path):
    with open_cache(small_cache) as cache:
        records, signature = cache.cases, cache.signature
    long = [replace(r, name=f"FLARE22_Tr_{i:04d}_long_case_name") for i, r in enumerate(records)]
    merge(tmp_path / "c.h5", signature=signature, sources=[(small_cache, long)])
    from click.testing import CliRunner

    from embedcache.cli import main

    result = CliRunner().invoke(main, ["info", str(tmp_path / "c.h5")], env={"COLUMNS": "60"})
    assert result.exit_code == 0, result.output
    assert all(r.name in result.output for r in long), result.output


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_encode_never_writes_over_a_file_that_is_not_its_cache(data, tmp_path):
    image, label = sorted((data / "imagesTr").iterdir())[0], sorted((data / "labelsTr").iterdir())[0]
    before = _bytes(image)
    one_line(cli("encode", "--image", image, "--label", label, "--out", image),
             f"{image}: exists and is not a cache encode can resume (not a readable embedcache cache")
    assert _bytes(image) == before


def test_phantom_never_writes_into_a_dataset_and_finetune_records_where_the_cache_is(data, small_cache, tiny_model,
                                                                                     tmp_path, monkeypatch):
    image = sorted((data / "imagesTr").iterdir())[0]
    before = image.read_bytes()
    one_line(cli("phantom", data, "--cases", "2", "--size", "64"), f"{image}: exists; phantom writes a new dataset")
    assert image.read_bytes() == before and len(list((data / "imagesTr").iterdir())) == 3
    monkeypatch.chdir(small_cache.parent)
    run = tmp_path / "run"
    assert cli("finetune", small_cache.name, "--out", run, "--epochs", "1", "--batch-size", "2", "--val-fraction",
               "0.34", "--device", "cpu", "--no-progress").exit_code == 0
    assert json.loads((run / "config.json").read_text())["cache"] == str(small_cache)  # absolute, as typed relative


# ----------------------------------------------------------- temporary names, output folders, interrupted swaps


def test_temporary_names_are_the_runs_own_and_a_users_namesakes_survive(tiny_model, small_cache, run_dir, data,
                                                                        tmp_path):
    """score and evaluate used to delete a folder named .OUT.partial or .OUT.old beside --out, export to overwrite
    FILE.partial and encode to remove CACHE.partial: a temporary name is now unique to its write and marked as
    embedcache's, so a user's files of those names keep their bytes."""
    report, export, cache = tmp_path / "report", tmp_path / "decoder.pth", tmp_path / "cache.h5"
    theirs = {tmp_path / ".report.partial" / "notes.txt": b"mine", tmp_path / ".report.old" / "notes.txt": b"also",
              tmp_path / "decoder.pth.partial": b"my draft", tmp_path / "cache.h5.partial": b"my half cache",
              tmp_path / ".decoder.partial.pth": b"kept",
              # even a name with embedcache's own mark is not proof that embedcache made it
              tmp_path / ".report.embedcache-0123abcd.partial" / "data.txt": b"precious",
              tmp_path / ".report.embedcache-0123abcd.partial.old" / "data.txt": b"precious too"}
    for path, content in theirs.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
    for _ in range(2):  # a first report, then one that replaces it
        assert cli("score", small_cache, "--out", report, "--protocols", "oracle", "--device", "cpu",
                   "--no-progress").exit_code == 0
    assert cli("evaluate", data / "labelsTr", data / "labelsTr", "--out", report).exit_code == 1  # refused, no harm
    assert cli("export", run_dir, "--out", export).exit_code == 0
    assert cli("encode", data, "--out", cache, "--model", "tiny", "--device", "cpu", "--no-progress").exit_code == 0
    assert {p: p.read_bytes() for p in theirs} == theirs
    assert {p.name for p in tmp_path.iterdir() if ".embedcache-" in p.name} == {  # and none of its own left behind
        ".report.embedcache-0123abcd.partial", ".report.embedcache-0123abcd.partial.old"}


def test_predict_never_writes_inside_its_inputs(tiny_model, data, series_dir, tmp_path):
    """--out as the input series folder wrote into it, and the folder was then refused as an input; an --out
    inside a folder of volumes or of labels would mix predictions with them."""
    image, label = sorted((data / "imagesTr").iterdir())[0], sorted((data / "labelsTr").iterdir())[0]
    before = {p: p.read_bytes() for p in [*series_dir.iterdir(), *(data / "imagesTr").iterdir()]}
    for inputs, out in (([series_dir], series_dir), ([series_dir], series_dir / "pred"),
                        ([data / "imagesTr"], data / "imagesTr" / "pred"), ([image], data / "labelsTr")):
        result = cli("predict", *inputs, "--from-labels", data / "labelsTr" if inputs[0] != series_dir else label,
                     "--out", out, "--model", "tiny", "--device", "cpu")
        one_line(result, f"--out {out}: lies inside the input", code=2)
    link = tmp_path / "link"
    link.symlink_to(data / "imagesTr")
    for out in (data / "imagesTr", link):  # the folder of an input file, however a link spells it
        one_line(cli("predict", image, "--from-labels", label, "--out", out, "--model", "tiny", "--device", "cpu"),
                 "is the folder of the input", code=2)
    assert {p: p.read_bytes() for p in before} == before and not (series_dir / "pred").exists()
    assert sorted(p.name for p in (data / "imagesTr").iterdir()) == sorted(p.name for p in before
                                                                         if p.parent == data / "imagesTr")


def test_one_predict_writes_an_output_folder_at_a_time_and_keeps_what_another_wrote(tiny_model, data, tmp_path,
                                                                                      monkeypatch):
    """Two predicts into one --out ran at once and predict.json lost the first one's files (its rerun was then
    refused): a lock inside --out admits one writer, and the record is read again under it."""
    from embedcache.segment import predict as predict_module

    image, label = sorted((data / "imagesTr").iterdir())[0], sorted((data / "labelsTr").iterdir())[0]
    common = ["--from-labels", label, "--protocol", "oracle", "--model", "tiny", "--device", "cpu", "--no-progress"]
    out = tmp_path / "pred"
    out.mkdir()
    with WriterLock(out / predict_module.LOCK, what=str(out)):
        one_line(cli("predict", image, *common, "--out", out), f"{out}: another embedcache (pid {os.getpid()})")
    real_load = predict_module.load_predict_model

    def load_while_another_writes(*args, **kwargs):  # a second predict finishes while this one loads its model
        model = real_load(*args, **kwargs)
        (out / "OTHER.nii.gz").write_bytes(b"the other run's")
        (out / predict_module.CONFIG).write_text(json.dumps({"config": {}, "written": ["OTHER.nii.gz"]}))
        return model

    monkeypatch.setattr(predict_module, "load_predict_model", load_while_another_writes)
    assert cli("predict", image, *common, "--out", out).exit_code == 0
    written = json.loads((out / predict_module.CONFIG).read_text())["written"]
    assert "OTHER.nii.gz" in written and label.name in written
    monkeypatch.setattr(predict_module, "load_predict_model", real_load)
    assert cli("predict", image, *common, "--out", out).exit_code == 0  # its rerun is not refused


def test_a_killed_reports_swap_leaves_a_report_and_ctrl_c_says_what_it_kept(tiny_model, small_cache, tmp_path,
                                                                           monkeypatch):
    """A kill between the two renames of the old swap left no report at --out, and Ctrl-C deleted the new one while
    saying "finished work is kept". The swap is one exchange where the system can; where it cannot, the next run
    puts the old report back first. Ctrl-C says that no new report was written and the old one is kept."""
    from embedcache.evaluation import report as report_module
    from embedcache.io import files

    report = tmp_path / "report"
    common = ["--protocols", "oracle", "--device", "cpu", "--no-progress"]
    assert cli("score", small_cache, "--out", report, *common).exit_code == 0
    first = (report / "report.json").read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    real_write = report_module._write_files
    monkeypatch.setattr(report_module, "_write_files", interrupted)
    result = cli("score", small_cache, "--out", report, *common)
    assert result.exit_code == 130 and "no new report was written and an earlier one at --out is kept" in result.output
    assert (report / "report.json").read_bytes() == first
    monkeypatch.setattr(report_module, "_write_files", real_write)

    renames = []
    real_rename = Path.rename

    def dies_on_the_second_rename(self, target):  # the fallback's two renames, killed between them
        renames.append(self)
        if len(renames) == 2:
            raise KeyboardInterrupt
        return real_rename(self, target)

    real_exchange = files.exchange
    monkeypatch.setattr(files, "exchange", lambda a, b: False)
    monkeypatch.setattr(Path, "rename", dies_on_the_second_rename)
    killed = cli("score", small_cache, "--out", report, *common)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert killed.exit_code == 130, killed.output
    assert not report.exists()  # the instant the fallback cannot avoid: the old report waits under a marked name
    assert cli("info", small_cache).exit_code == 0
    files.recover_folder(report, is_ours=report_module.holds_a_report)  # what the next run does first, under the lock
    assert (report / "report.json").read_bytes() == first
    monkeypatch.setattr(files, "exchange", real_exchange)
    assert files.exchange(report, report) is True  # this system swaps in one step: the default path has no gap
    assert cli("score", small_cache, "--out", report, *common).exit_code == 0
    assert not [p for p in tmp_path.iterdir() if ".embedcache-" in p.name]


def test_dicom_output_is_checked_before_the_first_file_of_an_input_is_written(tiny_model, data, tmp_path, monkeypatch):
    """An empty prediction was refused by the SEG writer after the NIfTI was written: now no file of that input is."""
    from embedcache.segment import predict as predict_module

    series = tmp_path / "CT_0000"
    shutil.copytree(Path(__import__("conftest").pydicom_dir("dicomdirtests/98892001/CT5N")), series)
    import numpy as np

    from embedcache.io.nifti import write_nifti
    from embedcache.io.volumes import read_geometry

    geometry = read_geometry(series)
    labels = np.zeros(geometry.shape_zyx, np.uint8)
    labels[2, 4:10, 4:10] = 7
    write_nifti(labels, geometry, tmp_path / "CT.nii.gz")
    monkeypatch.setattr(predict_module, "_segment_job", lambda *a, **k: [])  # nothing found
    result = cli("predict", series, "--from-labels", tmp_path / "CT.nii.gz", "--output-type", "nifti,dicom-seg",
                 "--model", "tiny", "--device", "cpu", "--out", tmp_path / "pred", "--no-progress")
    assert result.exit_code == 1 and "the prediction is empty" in result.output and "nothing was written" in result.output
    assert not [p.name for p in (tmp_path / "pred").iterdir() if p.name.startswith("CT")]
    import pydicom
    from pydicom.uid import generate_uid

    moved = sorted(series.iterdir())[0]  # a slice of another frame of reference: refused before the model loads
    ds = pydicom.dcmread(moved)
    ds.FrameOfReferenceUID = generate_uid()
    ds.save_as(moved)
    result = cli("predict", series, "--from-labels", tmp_path / "CT.nii.gz", "--output-type", "nifti,dicom-seg",
                 "--model", "tiny", "--device", "cpu", "--out", tmp_path / "pred2", "--no-progress")
    assert result.exit_code == 1 and "2 frame(s) of reference" in result.output and not (tmp_path / "pred2").exists()


def test_a_killed_predicts_own_partial_dicom_object_is_replaced_on_rerun(tiny_model, tmp_path):
    """A kill during DICOM output left a complete SEG under its temporary name in --out, and the rerun refused it as
    a DICOM object of the series that predict did not write: its mark says it is predict's own."""
    import numpy as np

    from embedcache.io.dicom_out import write_seg
    from embedcache.io.labels import FLARE22
    from embedcache.io.nifti import write_nifti
    from embedcache.io.volumes import read_geometry

    from conftest import pydicom_dir

    pytest.importorskip("highdicom", reason="DICOM output needs the dicom extra (pip install 'embedcache[dicom]')")
    series = tmp_path / "CT5N_0000"
    shutil.copytree(pydicom_dir("dicomdirtests/98892001/CT5N"), series)
    geometry = read_geometry(series)
    labels = np.zeros(geometry.shape_zyx, np.uint8)
    labels[1:4, 3:10, 2:8] = 7
    write_nifti(labels, geometry, tmp_path / "CT5N.nii.gz")
    out = tmp_path / "pred"
    out.mkdir()
    left = write_seg(out / ".CT5N.seg.embedcache-0badf00d.partial.dcm", series, geometry.to_source(labels),
                     series_uid=None, label_ids=(7,), label_map=FLARE22, decoder="killed", semiautomatic=True)
    result = cli("predict", series, "--from-labels", tmp_path / "CT5N.nii.gz", "--protocol", "oracle", "--model", "tiny",
                 "--device", "cpu", "--output-type", "dicom-seg", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert not left.exists() and (out / "CT5N.seg.dcm").is_file()
