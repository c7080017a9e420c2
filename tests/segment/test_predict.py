from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from embedcache.errors import EmbedcacheError
from embedcache.evaluation.metrics import dice
from embedcache.evaluation.protocols import box3d_from_label
from embedcache.io.datasets import discover_cases
from embedcache.io.volumes import read_geometry, read_label
from embedcache.segment.prompt_file import read_boxes_file, requests_from_json
from embedcache.synth.phantom import limit_target_slices

from conftest import cli, file_corners


@pytest.fixture
def one_slice_case(phantom_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    limit_target_slices(data, per_case=1)
    return discover_cases(data)[0]


def _predict(*args):
    return cli("predict", *args, "--device", "cpu")


def test_predicted_nifti_keeps_the_input_grid_and_lands_on_the_ground_truth(one_slice_case, tmp_path):
    case = one_slice_case
    result = _predict(case.image, "--from-labels", case.label, "--protocol", "oracle", "--out", tmp_path / "pred")
    assert result.exit_code == 0, result.output
    out = tmp_path / "pred" / f"{case.name}.nii.gz"
    written, source = nib.load(out), nib.load(case.image)
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)
    predicted, truth = read_label(out).array, read_label(case.label).array
    for label in (7, 8):
        assert dice(predicted == label, truth == label) > 0.5  # vanilla LiteMedSAM with exact boxes
    # The same boxes as JSON, in the file's own voxel indices, give the same volume.
    geometry = read_geometry(case.image)
    table = {case.name: []}
    for label in (7, 8):
        z = int(np.flatnonzero((truth == label).any(axis=(1, 2)))[0])
        ys, xs = np.nonzero(truth[z] == label)
        low, high = file_corners(geometry, z, z, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
        assert low[2] == high[2]  # the phantom's files are axial: one k
        table[case.name].append({"slice": int(low[2]), "label": label, "box": [int(low[0]), int(low[1]), int(high[0]), int(high[1])]})
    (tmp_path / "boxes.json").write_text(json.dumps(table))
    result = _predict(case.image, "--boxes", tmp_path / "boxes.json", "--out", tmp_path / "pred2")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_label(tmp_path / "pred2" / f"{case.name}.nii.gz").array, predicted)


def test_the_review_file_names_each_decoded_slice_by_the_files_own_index_and_flags_low_predicted_iou(one_slice_case,
                                                                                                    tmp_path):
    case = one_slice_case
    truth, geometry = read_label(case.label).array, read_geometry(case.image)
    result = _predict(case.image, "--from-labels", case.label, "--protocol", "oracle", "--review-iou", "1",
                      "--out", tmp_path / "pred")
    assert result.exit_code == 0, result.output
    review = json.loads((tmp_path / "pred" / f"{case.name}.review.json").read_text())
    assert f"{case.name}.review.json" in json.loads((tmp_path / "pred" / "predict.json").read_text())["written"]
    assert review["threshold"] == 1.0 and [g["label"] for g in review["glands"]] == [7, 8]
    for gland in review["glands"]:
        z = int(np.flatnonzero((truth == gland["label"]).any(axis=(1, 2)))[0])
        low, _ = file_corners(geometry, z, z, (0, 0, 1, 1))
        (entry,) = gland["slices"]
        assert entry["slice"] == int(low[2]) and entry["axis"] == 2
        assert 0 < entry["predicted_iou"] < 1 and entry["voxels"] > 0
        assert gland["look_at"] == [entry["slice"]]  # below a threshold of 1: every slice
    again = _predict(case.image, "--from-labels", case.label, "--protocol", "oracle", "--review-iou", "0",
                     "--out", tmp_path / "pred")
    assert again.exit_code == 0, again.output  # predict's own files: replaced
    review = json.loads((tmp_path / "pred" / f"{case.name}.review.json").read_text())
    assert all(g["look_at"] == [] for g in review["glands"])


def test_a_review_file_predict_did_not_write_is_never_replaced(one_slice_case, tmp_path):
    case = one_slice_case
    (tmp_path / "pred").mkdir()
    theirs = tmp_path / "pred" / f"{case.name}.review.json"
    theirs.write_text("mine")
    result = _predict(case.image, "--from-labels", case.label, "--protocol", "oracle", "--out", tmp_path / "pred")
    assert result.exit_code != 0 and "exists and predict did not write it" in result.output
    assert theirs.read_text() == "mine"


def _from_labels(phantom_dir, tmp_path, *prompts):
    """A phantom case with 3 target slices, predicted by the tiny model from its own label under ``prompts``
    into ``tmp_path/a`` (3-D boxes without an in-plane margin, so integer voxel corners can give them too)."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    limit_target_slices(data, per_case=3)
    case = discover_cases(data)[0]
    margin = ["--box-margin-mm", "0", "--box-margin-slices", "1", "--model", "tiny"]
    result = _predict(case.image, "--from-labels", case.label, *prompts, *margin, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    return case, read_label(case.label), read_geometry(case.image), read_label(tmp_path / "a" / f"{case.name}.nii.gz").array


def test_a_3d_box_in_voxels_or_millimetres_segments_as_box3d_from_the_label(phantom_dir, tiny_model, tmp_path):
    case, truth, geometry, from_labels = _from_labels(phantom_dir, tmp_path, "--protocol", "box3d")
    voxel, world = [], []
    for label in (7, 8):  # both glands, in the order --from-labels paints them
        box = box3d_from_label(truth.array == label, truth.spacing_mm, margin_mm=0.0, margin_slices=1)
        low, high = file_corners(geometry, box.z0, box.z1, box.box)
        corners = [nib.affines.apply_affine(geometry.source_affine, corner).tolist() for corner in (low, high)]
        voxel.append({"label": label, "box3d": [*map(int, low), *map(int, high)]})
        world.append({"label": label, "space": "world",
                      "box3d": [min(corners[0][i], corners[1][i]) for i in range(3)]
                      + [max(corners[0][i], corners[1][i]) for i in range(3)]})
    for name, entries in (("voxel", voxel), ("world", world)):
        (tmp_path / f"{name}.json").write_text(json.dumps({case.name: entries}))
        result = _predict(case.image, "--boxes", tmp_path / f"{name}.json", "--out", tmp_path / name, "--model", "tiny")
        assert result.exit_code == 0, result.output
        given = read_label(tmp_path / name / f"{case.name}.nii.gz").array
        np.testing.assert_array_equal(given, from_labels, err_msg=name)
    assert (from_labels == 7).any() and (from_labels == 8).any()


def test_bad_boxes_are_refused_with_what_to_fix(one_slice_case, tmp_path):
    geometry = read_geometry(one_slice_case.image)
    i, j, k = geometry.source_shape
    path, name = tmp_path / "b.json", one_slice_case.name

    def refused(entry, match, labels=(7, 8)):
        with pytest.raises(EmbedcacheError, match=match):
            requests_from_json({name: [entry]}, path, one_slice_case.image, geometry, labels)

    refused({"label": 7, "box3d": [30, 10, 5, 20, 20, 6]}, r"\[0\]: box is inverted")
    refused({"label": 7, "box3d": [i + 5, 0, 0, i + 9, 9, 2]}, "lies outside the volume")
    refused({"label": 7, "box3d": [1, 1, 1, "a", 5, 5]}, "box3d needs 6 numbers|could not convert")
    refused({"label": 7, "box3d": [1, 1, 1, float("nan"), 5, 5]}, "NaN or infinite")
    refused({"label": 9, "box3d": [1, 1, 1, 5, 5, 5]}, r"label 9 is not one the decoder was trained for \(7, 8\)")
    refused({"label": 7, "slice": 2, "box": [1, 1, 5]}, "box needs 4 numbers")
    refused({"box3d": [1, 1, 1, 5, 5, 5]}, "missing 'label'")
    refused({"label": 7, "box3d": [1, 1, 1, 5, 5, 5], "space": "ras"}, "space must be one of voxel, world, lps")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(EmbedcacheError, match=r"list.json: expected an object"):
        read_boxes_file(tmp_path / "list.json")
    good = requests_from_json({name: [{"label": 7, "box3d": [0, 0, 0, i - 1, j - 1, k - 1]}]}, path,
                              one_slice_case.image, geometry, (7, 8))
    assert good[0].box.z0 == 0 and good[0].box.z1 == k - 1 and good[0].box.box == (0.0, 0.0, float(i), float(j))


def test_an_unreadable_input_is_reported_and_the_rest_go_on(one_slice_case, tmp_path):
    broken = tmp_path / "BROKEN_0000.nii.gz"
    broken.write_bytes(b"not a nifti")
    labels = one_slice_case.label.parent
    result = _predict(broken, one_slice_case.image, "--from-labels", labels, "--protocol", "oracle", "--out", tmp_path / "p")
    assert result.exit_code == 1
    assert "BROKEN_0000.nii.gz: not a readable NIfTI" in result.output
    assert (tmp_path / "p" / f"{one_slice_case.name}.nii.gz").is_file()
    assert "1 input(s) failed" in result.output


def test_a_run_whose_every_input_fails_writes_nothing_and_says_so(one_slice_case, tmp_path):
    broken = tmp_path / "BROKEN_0000.nii.gz"
    broken.write_bytes(b"not a nifti")
    out = tmp_path / "p"
    result = _predict(broken, "--from-labels", one_slice_case.label.parent, "--protocol", "oracle", "--out", out)
    assert result.exit_code == 1
    assert "BROKEN_0000.nii.gz: not a readable NIfTI" in result.output
    assert not out.exists()
    assert f"wrote no files; {out} was not made" in result.output and "wrote 0" not in result.output


def test_a_folder_of_nifti_volumes_is_its_volumes_and_one_holding_other_files_is_refused(one_slice_case, tmp_path):
    images = tmp_path / "imagesTs"  # CASE_0000.nii.gz files, as nnU-Net's predict takes them
    images.mkdir()
    for source in sorted(one_slice_case.image.parent.glob("*.nii.gz"))[:2]:
        shutil.copy(source, images / source.name)
    (images / "dataset.json").write_text("{}")  # a note beside them is not an input
    result = _predict(images, "--from-labels", one_slice_case.label.parent, "--protocol", "oracle", "--out",
                      tmp_path / "p")
    assert result.exit_code == 0, result.output
    cases = sorted(f.name.replace("_0000", "") for f in images.glob("*.nii.gz"))
    assert len(cases) == 2 and sorted(f.name for f in (tmp_path / "p").glob("*.nii.gz")) == cases
    (images / "IM0001").write_bytes(b"DICM")  # a series folder or a folder of volumes? Neither: say so
    result = _predict(images, "--from-labels", one_slice_case.label.parent, "--out", tmp_path / "q")
    assert result.exit_code != 0
    assert f"{images}: holds 2 NIfTI volume(s) beside other files (IM0001)" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "q").exists()


def test_two_inputs_for_one_output_are_refused_before_any_work(one_slice_case, tmp_path):
    twin = tmp_path / "elsewhere"
    twin.mkdir()
    shutil.copy(one_slice_case.image, twin / one_slice_case.image.name)
    result = _predict(one_slice_case.image, twin / one_slice_case.image.name, "--from-labels", one_slice_case.label,
                      "--out", tmp_path / "p")
    assert result.exit_code == 2 and "would both be written to" in result.output
    assert not (tmp_path / "p").exists()


class _Bars:
    """Records what predict does with a rich Progress: tasks, their totals and advances."""

    def __init__(self):
        self.tasks = []

    def add_task(self, description, total=None):
        self.tasks.append({"description": description, "total": total, "done": 0})
        return len(self.tasks) - 1

    def update(self, task, description=None):
        self.tasks[task]["description"] = description

    def advance(self, task, advance=1):
        self.tasks[task]["done"] += advance


def test_predict_shows_inputs_done_and_slices_encoded(one_slice_case, tmp_path):
    from embedcache.config import PredictConfig
    from embedcache.segment.predict import predict

    case, bars = one_slice_case, _Bars()
    config = PredictConfig(from_labels=str(case.label), prompts="oracle", device="cpu")
    done = predict([case.image], tmp_path / "p", config, progress=bars)
    assert len(done.written) == 1 and not done.errors
    truth = read_label(case.label).array
    gland_slices = np.flatnonzero(np.isin(truth, (7, 8)).any(axis=(1, 2)))
    inputs, slices = bars.tasks
    assert inputs == {"description": f"predicting {case.name}", "total": 1, "done": 1}
    assert slices == {"description": "slices encoded", "total": None, "done": len(gland_slices)}
    assert done.cases == 1 and done.glands == 2 and done.slices_encoded == len(gland_slices) and done.seconds > 0
    assert done.pace().startswith(f"{done.seconds:.1f} s per case, {done.seconds / 2:.1f} s per gland (")


def test_points_from_a_boxes_file_give_what_the_clicks_protocol_gives_for_the_same_clicks(phantom_dir, tiny_model,
                                                                                           tmp_path):
    """predict --from-labels --protocol clicks places the clicks as score does and lists them in the review file;
    the same 3-D boxes with those points in a boxes file segment to the same volume."""
    case, truth, geometry, from_labels = _from_labels(phantom_dir, tmp_path, "--protocol", "clicks", "--clicks", "3")
    review = json.loads((tmp_path / "a" / f"{case.name}.review.json").read_text())
    entries = []
    for gland in review["glands"]:
        label = gland["label"]
        assert 1 <= len(gland["points"]) <= 3
        box = box3d_from_label(truth.array == label, truth.spacing_mm, margin_mm=0.0, margin_slices=1)
        low, high = file_corners(geometry, box.z0, box.z1, box.box)
        entries.append({"label": label, "box3d": [*map(int, low), *map(int, high)], "points": gland["points"]})
    (tmp_path / "b.json").write_text(json.dumps({case.name: entries}))
    result = _predict(case.image, "--boxes", tmp_path / "b.json", "--out", tmp_path / "b", "--model", "tiny")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_label(tmp_path / "b" / f"{case.name}.nii.gz").array, from_labels)
    again = json.loads((tmp_path / "b" / f"{case.name}.review.json").read_text())
    assert [g["points"] for g in again["glands"]] == [g["points"] for g in review["glands"]]
    # without the points: box3d alone, another result
    for entry in entries:
        del entry["points"]
    (tmp_path / "c.json").write_text(json.dumps({case.name: entries}))
    assert _predict(case.image, "--boxes", tmp_path / "c.json", "--out", tmp_path / "c", "--model", "tiny").exit_code == 0
    assert not np.array_equal(read_label(tmp_path / "c" / f"{case.name}.nii.gz").array, from_labels)


def test_bad_points_are_refused_with_the_entry_and_the_fix(one_slice_case, tmp_path):
    geometry = read_geometry(one_slice_case.image)
    i, j, k = geometry.source_shape
    path, name = tmp_path / "p.json", one_slice_case.name
    box3d = [2, 2, 0, 20, 20, 1]

    def refused(entry, match):
        with pytest.raises(EmbedcacheError, match=match):
            requests_from_json({name: [{"label": 7, **entry}]}, path, one_slice_case.image, geometry, (7, 8))

    refused({"box3d": box3d, "points": [[5, 5, 0, 2]]}, r"\[0\]: point 0's label must be 1 \(on the gland\) or 0")
    refused({"box3d": box3d, "points": [[5, 5, 0, True]]}, "label must be 1")
    refused({"box3d": box3d, "points": [[5, "a", 0, 1]]}, "could not convert|point 0 needs 4 numbers")
    refused({"box3d": box3d, "points": [[5, 5, 0]]}, "point 0 needs 4 numbers")
    refused({"box3d": box3d, "points": []}, "points must be a list")
    refused({"box3d": box3d, "points": [[i + 3, 5, 0, 1]]}, "point 0 .* lies outside the volume")
    refused({"box3d": box3d, "points": [[30, 5, 0, 1]]}, "point 0 .* lies outside the entry's box")
    assert requests_from_json({name: [{"label": 7, "box3d": box3d, "points": [[30, 5, 0, 0]]}]}, path,
                              one_slice_case.image, geometry, (7, 8))[0].clicks[0].positive is False  # spill: fine
    refused({"box3d": box3d, "points": [[5, 5, 0, 1], [5, 5, k - 1, 1]]}, "point 1 .* outside the entry's box")
    refused({"slice": 0, "box": [2, 2, 20, 20], "points": [[5, 5, 1, 1]]}, "point 0 .* outside the entry's slice")
    refused({"slice": 0, "points": [[5, 5, 0, 0]]}, "one of them on the gland")
    refused({"slice": 0, "points": [[5, 5, 1, 1]]}, "every point on slice 0")
    good = requests_from_json({name: [{"label": 7, "slice": 0, "points": [[5, 6, 0, 1], [9, 9, 0, 0]]}]}, path,
                              one_slice_case.image, geometry, (7, 8))
    assert good[0].points_only and [c.positive for c in good[0].clicks] == [True, False]


def test_slices_told_of_are_encoded_ahead_once_each_and_those_no_longer_wanted_are_dropped():
    import threading

    from embedcache.config import PreprocessConfig
    from embedcache.segment.predict import OnTheFly

    started, release, encoded = threading.Event(), threading.Event(), []

    class Encoder:  # stands in for an engine: the first slice waits until released
        streams = 1

        def __call__(self, slices):
            encoded.append(float(slices[0].mean()))
            started.set()
            release.wait(10)
            return slices.copy()

    class Eager:  # stands in for eager torch: encodes when asked, never ahead
        streams = 0

        def __call__(self, slices):
            return slices.copy()

    hu = np.stack([np.full((64, 64), 100.0 * z - 400) for z in range(6)]).astype(np.float32)
    volume = OnTheFly(hu, Encoder(), PreprocessConfig(slice_size=64))
    on_demand = OnTheFly(hu, Eager(), PreprocessConfig(slice_size=64))
    volume.ahead([2, 3, 4, 5])
    assert started.wait(10)  # slice 2 is being encoded; 3, 4 and 5 wait behind it
    volume.ahead([2, 1])  # the walk turned: 3..5 are dropped, 1 comes after 2
    release.set()
    for z in (2, 1, 4):  # 4 was dropped: encoded now, when asked for
        np.testing.assert_array_equal(volume.embedding(z), on_demand.embedding(z))
        np.testing.assert_array_equal(volume.embedding(z), on_demand.embedding(z))  # and kept
    assert len(encoded) == 3
    started.clear()
    release.clear()
    volume.ahead([0, 5])
    assert started.wait(10)  # 0 is being encoded, 5 waits
    threading.Timer(0.5, release.set).start()
    volume.close()  # drops what waits at once, then waits for what runs
    assert len(encoded) == 4 and release.is_set()


def test_zoom_draws_each_gland_again_in_its_region_and_refuses_a_decoder_of_the_wrong_kind(
        tiny_model, small_cache, zoom_run, run_dir, tmp_path, monkeypatch):
    from embedcache.config import PredictConfig
    from embedcache.evaluation import protocols
    from embedcache.evaluation.protocols import Prediction
    from embedcache.evaluation.zoom import BothViews
    from embedcache.segment.predict import predict

    clicked = []

    def first_pass(protocol, segment, *, truth, start=None, **kw):  # the tiny decoder draws nothing: the truth
        if protocol == "clicks":  # the clicks start from box3d drawn again, and go through both views
            clicked.append((segment, start))
            return start
        return Prediction(truth.copy())

    monkeypatch.setattr(protocols, "run", first_pass)
    case = next(c for c in discover_cases(small_cache.parent / "data") if c.name == "PHANTOM_0003")
    runs = {}
    for name, zoom, prompts in (("whole", None, "box3d"), ("zoom", str(zoom_run / "zoom"), "box3d"),
                                ("clicks", str(zoom_run / "zoom"), "clicks")):
        config = PredictConfig(run=str(run_dir), from_labels=str(case.label), device="cpu", zoom=zoom, prompts=prompts)
        runs[name] = predict([case.image], tmp_path / name, config)
        assert runs[name].written and not runs[name].errors
    whole, zoomed, clicks = (read_label(tmp_path / n / f"{case.name}.nii.gz").array for n in ("whole", "zoom", "clicks"))
    truth = read_label(case.label).array
    assert np.array_equal(whole, np.where(np.isin(truth, (7, 8)), truth, 0))  # the first pass alone
    drawn = [z for z in range(len(whole)) for label in (7, 8) if (whole[z] == label).any()]
    # each gland's slices encoded in its region, and each whole slice once (the stand-in first pass encoded none)
    assert runs["whole"].slices_encoded == 0 and runs["zoom"].slices_encoded == len(drawn) + len(set(drawn))
    changed = np.flatnonzero((whole != zoomed).any(axis=(1, 2)))
    assert changed.size and set(changed) <= set(drawn)  # drawn again: only the slices the first pass drew
    assert np.array_equal(clicks, zoomed) and len(clicked) == 2
    assert all(isinstance(segment, BothViews) for segment, _ in clicked)
    recorded = json.loads((tmp_path / "zoom" / "predict.json").read_text())["config"]["zoom"]
    assert recorded == str(zoom_run / "zoom" / "decoder.safetensors")  # the decoder file it drew with
    wrong = _predict(case.image, "--from-labels", case.label, "--run", run_dir, "--zoom", run_dir, "--out",
                     tmp_path / "w1")
    assert wrong.exit_code == 1 and "trained on whole slices; --zoom takes a decoder" in wrong.output
    swapped = _predict(case.image, "--from-labels", case.label, "--run", zoom_run / "zoom", "--zoom", zoom_run / "zoom",
                       "--out",
                       tmp_path / "w2")
    assert swapped.exit_code == 1 and "give it as --zoom" in swapped.output
    auto = _predict(case.image, "--from-labels", case.label, "--run", zoom_run, "--out", tmp_path / "auto")
    assert auto.exit_code == 0, auto.output  # the run's own regions' decoder, found and recorded
    recorded = json.loads((tmp_path / "auto" / "predict.json").read_text())["config"]["zoom"]
    assert recorded == str(zoom_run / "zoom" / "decoder.safetensors")
    off = _predict(case.image, "--from-labels", case.label, "--run", zoom_run, "--zoom", "off", "--out", tmp_path / "o")
    assert off.exit_code == 0 and json.loads((tmp_path / "o" / "predict.json").read_text())["config"]["zoom"] == "off"
    alone = _predict(case.image, "--from-labels", case.label, "--zoom", zoom_run / "zoom", "--out", tmp_path / "w3")
    assert alone.exit_code == 1 and "give --run or --decoder too" in alone.output
    assert not any((tmp_path / w).exists() for w in ("w1", "w2", "w3"))


def test_zoom_decodes_a_persons_clicks_through_both_views(tiny_model, small_cache, zoom_run, run_dir, tmp_path,
                                                          monkeypatch):
    """A boxes file's click, under ``--zoom``: its slice decoded by both decoders, the click in the region's pixels."""
    from embedcache.evaluation import zoom as zoom_module

    calls = []
    call = zoom_module.BothViews.__call__

    def spy(self, zs, boxes, **kw):
        calls.append((self.where, list(map(int, zs)), kw.get("points")))
        return call(self, zs, boxes, **kw)

    monkeypatch.setattr(zoom_module.BothViews, "__call__", spy)
    case = next(c for c in discover_cases(small_cache.parent / "data") if c.name == "PHANTOM_0003")
    truth, geometry = read_label(case.label), read_geometry(case.image)
    gland = truth.array == 8
    box = box3d_from_label(gland, truth.spacing_mm, margin_mm=0.0, margin_slices=1)
    z, (y, x) = box.z0 + 1, np.argwhere(gland[box.z0 + 1])[0]
    low, high = file_corners(geometry, box.z0, box.z1, box.box)
    point = [*map(int, geometry.source_index([[x, y, z]])[0]), 1]
    (tmp_path / "b.json").write_text(json.dumps({case.name: [{"label": 8, "box3d": [*map(int, low), *map(int, high)],
                                                              "points": [point]}]}))
    args = (case.image, "--boxes", tmp_path / "b.json", "--run", run_dir)
    assert _predict(*args, "--out", tmp_path / "whole").exit_code == 0 and not calls
    result = _predict(*args, "--zoom", zoom_run / "zoom", "--out", tmp_path / "zoom")
    assert result.exit_code == 0, result.output
    with_points = [(where, zs, points) for where, zs, points in calls if points is not None]
    assert with_points and all(zs == [z] for _, zs, _ in with_points)  # the click's slice, with its click
    where, _, points = with_points[0]
    assert (where.z0, where.z1) == (box.z0, box.z1) and np.allclose(points[0], [[x, y, 1.0]])


def test_a_run_with_a_refinement_head_predicts_from_the_pixels_the_cache_holds(tiny_model, small_cache, refined_run,
                                                                                 tmp_path):
    """predict draws with the head from each slice's pixels made on the fly: the very pixels the cache trained it on,
    so a box gives predict the mask it gives score."""
    from embedcache.cache.store import open_cache
    from embedcache.config import PreprocessConfig
    from embedcache.io.volumes import read_image
    from embedcache.segment.predict import OnTheFly


    with open_cache(small_cache) as cache:
        case = cache.cases[0]
        source = next(c for c in discover_cases(small_cache.parent / "data") if c.name == case.name)
        volume = OnTheFly(read_image(source.image).array, encoder=None, preprocess=PreprocessConfig())
        zs = cache.read("slice_index", case.rows)
        np.testing.assert_array_equal(volume.pixels(zs), cache.read("pixels", case.rows))
    result = _predict(source.image, "--from-labels", source.label, "--run", refined_run, "--engine", "torch",
                      "--out", tmp_path / "pred")
    assert result.exit_code == 0, result.output
    assert read_label(tmp_path / "pred" / f"{case.name}.nii.gz").array.shape == read_label(source.label).array.shape
