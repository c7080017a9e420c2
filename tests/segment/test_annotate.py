"""The interaction core a viewer drives: a box and clicks give the voxels predict --boxes writes for the same box and
points; each step can be undone; a bad step is refused and changes nothing; saving never replaces another's file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from embedcache.config import PredictConfig
from embedcache.errors import EmbedcacheError, UsageError
from embedcache.evaluation.protocols import box3d_from_label
from embedcache.io.datasets import discover_cases
from embedcache.io.volumes import read_geometry, read_label
from embedcache.model.clicks import corrective_click
from embedcache.segment.annotate import Annotation

from conftest import cli, file_corners, one_line


@pytest.fixture
def session(phantom_dir, tiny_model):
    case = discover_cases(phantom_dir)[0]
    annotation = Annotation.open(case.image, PredictConfig(model="tiny", device="cpu"))
    yield case, annotation
    annotation.close()


def test_a_box_and_two_clicks_give_what_predict_boxes_writes_and_undo_takes_them_back(session, tmp_path):
    case, annotation = session
    truth = read_label(case.label)
    gland = truth.array == 7
    box = box3d_from_label(gland, truth.spacing_mm, margin_mm=0.0, margin_slices=1)
    after_box = annotation.box(7, box.z0, box.z1, box.box).mask.copy()
    clicks = []
    for _ in range(2):
        click = corrective_click(annotation.predictions[7].mask, gland, truth.spacing_mm)
        assert click is not None
        annotation.click(7, click.z, click.y, click.x, positive=click.positive)
        clicks.append(click)
    annotated = annotation.labels()
    assert not np.array_equal(annotated == 7, after_box)  # the clicks changed something

    geometry = read_geometry(case.image)
    low, high = file_corners(geometry, box.z0, box.z1, box.box)
    points = [[*map(int, geometry.source_index([[c.x, c.y, c.z]])[0]), int(c.positive)] for c in clicks]
    (tmp_path / "b.json").write_text(json.dumps({case.name: [{"label": 7, "box3d": [*map(int, low), *map(int, high)],
                                                               "points": points}]}))
    result = cli("predict", case.image, "--boxes", tmp_path / "b.json", "--out", tmp_path / "p", "--model", "tiny",
                 "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_label(tmp_path / "p" / f"{case.name}.nii.gz").array, annotated)

    saved = annotation.save(tmp_path / "mine.nii.gz")
    np.testing.assert_array_equal(read_label(saved).array, annotated)
    assert annotation.save(saved) == saved  # its own file: replaced
    assert annotation.undo() == 7 and annotation.undo() == 7
    np.testing.assert_array_equal(annotation.predictions[7].mask, after_box)
    assert annotation.requests[7].clicks == ()
    assert annotation.undo() == 7 and 7 not in annotation.predictions and not annotation.labels().any()
    assert annotation.undo() is None


def test_a_bad_step_is_one_line_and_changes_nothing(session, tmp_path):
    case, annotation = session
    depth, height, width = annotation.shape
    with pytest.raises(UsageError, match="has no box yet"):
        annotation.click(7, 1, 1, 1)
    with pytest.raises(UsageError, match="label 5: the decoder segments 7, 8"):
        annotation.box(5, 0, 1, (0, 0, 10, 10))
    with pytest.raises(UsageError, match="lies outside the volume"):
        annotation.box(7, depth + 2, depth + 4, (0, 0, 10, 10))
    with pytest.raises(UsageError, match="inverted or empty"):
        annotation.box(7, 2, 4, (20, 20, 20, 30))
    with pytest.raises(UsageError, match="nothing to save yet"):
        annotation.save(tmp_path / "empty.nii.gz")
    assert annotation.requests == {} and annotation._history == []
    truth = read_label(case.label)
    box = box3d_from_label(truth.array == 8, truth.spacing_mm, margin_mm=0.0, margin_slices=1)
    before = annotation.box(8, box.z0, box.z1, box.box).mask.copy()
    outside = box.z1 + 1 if box.z1 + 1 < depth else box.z0 - 1
    with pytest.raises(UsageError, match=f"click on slice {outside} lies outside the box"):
        annotation.click(8, outside, height // 2, width // 2)
    with pytest.raises(UsageError, match="outside the volume"):
        annotation.click(8, box.z0, height, 0)
    np.testing.assert_array_equal(annotation.predictions[8].mask, before)
    assert annotation.requests[8].clicks == () and len(annotation._history) == 1
    theirs = tmp_path / "theirs.nii.gz"
    theirs.write_bytes(b"someone's file")
    with pytest.raises(EmbedcacheError, match="theirs.nii.gz: exists and this annotation did not write it"):
        annotation.save(theirs)
    assert theirs.read_bytes() == b"someone's file"


def test_predict_without_prompts_asks_for_boxes_or_labels(phantom_dir, tmp_path):
    case = discover_cases(phantom_dir)[0]
    one_line(cli("predict", case.image, "--out", tmp_path / "p", "--device", "cpu"), "give either --boxes", code=2)
    assert not (tmp_path / "p").exists()


@pytest.fixture
def own_copy(phantom_dir, tmp_path, tiny_model):
    """A phantom case's image in a folder of the test's own (the annotated labels are written beside it)."""
    case = discover_cases(phantom_dir)[0]
    image = tmp_path / "ct" / case.image.name
    image.parent.mkdir()
    shutil.copy(case.image, image)
    return case, image


def _boxes(annotation, truth, labels=(7, 8)):
    for label in labels:
        box = box3d_from_label(truth.array == label, truth.spacing_mm, margin_mm=0.0, margin_slices=1)
        annotation.box(label, box.z0, box.z1, box.box)


def test_an_accepted_slice_replaces_the_decoded_mask_and_stays_through_clicks_until_undone(session):
    case, annotation = session
    truth = read_label(case.label)
    gland = truth.array == 7
    _boxes(annotation, truth, (7,))
    z = int(np.flatnonzero(gland.any(axis=(1, 2)))[len(np.flatnonzero(gland.any(axis=(1, 2)))) // 2])
    decoded = annotation.predictions[7].mask.copy()
    annotation.accept(7, z, gland[z])
    np.testing.assert_array_equal(annotation.labels()[z] == 7, gland[z])
    assert z not in dict(annotation.look_at(7))  # drawn by the person: nothing to review there
    click = corrective_click(annotation.predictions[7].mask, gland, truth.spacing_mm)
    annotation.click(7, click.z, click.y, click.x, positive=click.positive)
    np.testing.assert_array_equal(annotation.predictions[7].mask[z], gland[z])  # the click left it as drawn
    annotation.undo()
    annotation.undo()
    np.testing.assert_array_equal(annotation.predictions[7].mask, decoded)
    assert annotation.accepted.get(7, frozenset()) == frozenset()
    with pytest.raises(UsageError, match="accepted mask is 3×2 pixels"):
        annotation.accept(7, z, np.zeros((2, 3), bool))


def test_add_to_training_appends_the_case_with_the_rows_encode_makes_of_the_saved_labels(own_copy, tmp_path):
    case, image = own_copy
    truth = read_label(case.label)
    cache = tmp_path / "mine.h5"
    config = PredictConfig(model="tiny", device="cpu")
    annotation = Annotation.open(image, config, cache=cache)
    try:
        _boxes(annotation, truth)
        added = annotation.add_to_training()
    finally:
        annotation.close()
    assert added.labels == image.parent / f"{case.name}.annotated.nii.gz" and not added.replaced
    np.testing.assert_array_equal(read_label(added.labels).array, annotation.labels())

    # encode of the image and the labels it wrote makes the same rows
    from embedcache.cache.encode import encode
    from embedcache.cache.store import open_cache
    from embedcache.config import EncodeConfig
    from embedcache.io.datasets import CaseSource

    encode([CaseSource(case.name, image, added.labels)], tmp_path / "encoded.h5",
           EncodeConfig(backbone="tiny", device="cpu"), progress=None)
    with open_cache(cache) as mine, open_cache(tmp_path / "encoded.h5") as theirs:
        names = [case.name, f"{case.name}@7", f"{case.name}@8"]  # a new cache holds both views, as encode's default
        assert [c.name for c in mine.cases] == names == [c.name for c in theirs.cases]
        assert mine.cases[0].subset == "train" and mine.signature.views == ("whole", "regions")
        assert mine.signature.pixels and theirs.signature.pixels
        assert mine.signature.difference(theirs.signature) is None
        for held, made in zip(mine.cases, theirs.cases):
            assert (held.digest, held.region, held.shape_zyx) == (made.digest, made.region, made.shape_zyx)
            for name in ("slice_index", "masks", "pixels", "boxes", "spacing_mm"):
                np.testing.assert_array_equal(mine.read(name, held.rows), theirs.read(name, made.rows))
            np.testing.assert_allclose(mine.read("embeddings", held.rows).astype(np.float32),
                                       theirs.read("embeddings", made.rows).astype(np.float32), atol=2e-3)
        rows = set(int(z) for z in mine.read("slice_index", mine.cases[0].rows))

    # opened again with the cache, its slices are not encoded again; a second add replaces the case
    again = Annotation.open(image, config, cache=cache)
    try:
        assert again.encoded() == rows
        _boxes(again, truth, (8,))
        second = again.add_to_training()
    finally:
        again.close()
    assert second.replaced and second.labels == added.labels
    with open_cache(cache) as mine:
        assert [c.name for c in mine.cases] == [case.name, f"{case.name}@8"]  # its old right gland's region went too
        assert not (mine.read("masks", slice(None)) == 7).any()  # the right gland was not annotated this time

    # a cache of whole slices alone (encode --zoom 0) takes the whole slices alone
    other = next(c for c in discover_cases(case.image.parent.parent) if c.name != case.name)
    encode([other], tmp_path / "whole.h5", EncodeConfig(backbone="tiny", device="cpu", zoom_mm=0.0), progress=None)
    third = Annotation.open(image, config, cache=tmp_path / "whole.h5")
    try:
        _boxes(third, truth, (7,))
        third.add_to_training()
    finally:
        third.close()
    with open_cache(tmp_path / "whole.h5") as whole:
        assert [c.name for c in whole.cases] == [other.name, case.name] and whole.signature.views == ("whole",)


def test_add_to_training_refuses_a_foreign_label_file_a_test_case_and_another_models_cache(own_copy, small_cache,
                                                                                            tmp_path):
    case, image = own_copy
    truth = read_label(case.label)
    foreign = image.parent / f"{case.name}.annotated.nii.gz"
    shutil.copy(case.label, foreign)  # the person's own labels under that name
    annotation = Annotation.open(image, PredictConfig(model="tiny", device="cpu"), cache=tmp_path / "new.h5")
    try:
        with pytest.raises(UsageError, match="nothing to add yet"):
            annotation.add_to_training()
        _boxes(annotation, truth, (7,))
        with pytest.raises(EmbedcacheError, match="annotated.nii.gz: exists and this annotation did not write it"):
            annotation.add_to_training()
        assert not (tmp_path / "new.h5").exists() and read_label(foreign).array.max() == truth.array.max()
        foreign.unlink()

        import h5py

        test_cache = tmp_path / "test.h5"
        shutil.copy(small_cache, test_cache)
        with h5py.File(test_cache, "r+") as f:  # the small cache's first case, renamed to this one, as a test case
            cases = json.loads(f["cases"][()])
            cases[0].update(name=case.name, subset="test")
            del f["cases"]
            f["cases"] = json.dumps(cases)
        before = test_cache.read_bytes()
        with pytest.raises(EmbedcacheError, match=f"already holds a case {case.name}, made there from"):
            annotation.add_to_training(test_cache)
        assert test_cache.read_bytes() == before
    finally:
        annotation.close()
    from embedcache.errors import CacheMismatchError

    with pytest.raises(CacheMismatchError, match="cache was made with"):  # LiteMedSAM's cache, a tiny model
        Annotation.open(image, PredictConfig(model="tiny", device="cpu", review_iou=0.5),
                        cache=_cache_of_another_model(small_cache, tmp_path))


def _cache_of_another_model(cache, tmp_path):
    import h5py

    other = tmp_path / "other.h5"
    shutil.copy(cache, other)
    with h5py.File(other, "r+") as f:
        signature = json.loads(f.attrs["signature"])
        signature["checkpoint_sha256"] = "0" * 64
        f.attrs["signature"] = json.dumps(signature)
    return other


def test_annotate_refuses_before_any_window_what_it_cannot_open(phantom_dir, tiny_model, tmp_path, monkeypatch):
    case = discover_cases(phantom_dir)[0]
    one_line(cli("annotate", tmp_path / "missing.nii.gz", "--model", "tiny", "--device", "cpu"), "missing.nii.gz")
    one_line(cli("annotate", case.image, "--labels", "5", "--model", "tiny", "--device", "cpu"),
             "label 5: the decoder segments 7, 8", code=2)
    one_line(cli("annotate", case.image, "--model", "tiny", "--device", "cpu", "--cache", tmp_path / "no" / "c.h5"),
             "c.h5: its folder does not exist")
    monkeypatch.setitem(__import__("sys").modules, "napari", None)  # the extra not installed
    one_line(cli("annotate", case.image), "needs napari: pip install 'embedcache[napari]'", code=2)


def test_zoom_draws_the_box_and_clicks_as_predict_zoom_writes_them(tiny_model, small_cache, run_dir, zoom_run,
                                                                   tmp_path, monkeypatch):
    """annotate --zoom: the box's region made when the box is drawn, the click's slice decoded by both views (its
    region slice encoded); the same box and click in a boxes file give the same voxels under predict --zoom."""
    from embedcache.evaluation import zoom as zoom_module

    calls = []
    call = zoom_module.BothViews.__call__

    def spy(self, zs, boxes, **kw):
        calls.append((list(map(int, zs)), kw.get("points")))
        return call(self, zs, boxes, **kw)

    monkeypatch.setattr(zoom_module.BothViews, "__call__", spy)
    case = next(c for c in discover_cases(small_cache.parent / "data") if c.name == "PHANTOM_0003")
    annotation = Annotation.open(case.image, PredictConfig(run=str(run_dir), zoom=str(zoom_run / "zoom"), device="cpu"))
    try:
        truth = read_label(case.label)
        gland = truth.array == 8
        box = box3d_from_label(gland, truth.spacing_mm, margin_mm=0.0, margin_slices=1)
        annotation.box(8, box.z0, box.z1, box.box)
        (region,) = annotation.zoom._open  # the box's region, made with the box
        click = corrective_click(annotation.predictions[8].mask, gland, truth.spacing_mm)
        annotation.click(8, click.z, click.y, click.x, positive=click.positive)
        assert ([click.z], ) == tuple(zs for zs, points in calls if points is not None)  # the click, through both
        assert click.z in region.encoded
        annotated = annotation.labels()
    finally:
        annotation.close()
    geometry = read_geometry(case.image)
    low, high = file_corners(geometry, box.z0, box.z1, box.box)
    point = [*map(int, geometry.source_index([[click.x, click.y, click.z]])[0]), int(click.positive)]
    (tmp_path / "b.json").write_text(json.dumps({case.name: [{"label": 8, "box3d": [*map(int, low), *map(int, high)],
                                                              "points": [point]}]}))
    args = (case.image, "--boxes", tmp_path / "b.json", "--run", run_dir, "--device", "cpu", "--no-progress")
    assert cli("predict", *args, "--zoom", zoom_run / "zoom", "--out", tmp_path / "z").exit_code == 0
    np.testing.assert_array_equal(read_label(tmp_path / "z" / f"{case.name}.nii.gz").array, annotated)
    one_line(cli("annotate", case.image, "--run", run_dir, "--zoom", run_dir, "--device", "cpu"),
             "trained on whole slices; --zoom takes a decoder")
    for zoom, found in (("auto", True), ("off", False)):  # a run of both views brings its regions' decoder itself
        opened = Annotation.open(case.image, PredictConfig(run=str(zoom_run), zoom=zoom, device="cpu"))
        try:
            assert (opened.zoom is not None) == found
        finally:
            opened.close()
