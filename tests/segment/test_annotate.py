"""The interaction core a viewer drives: a box and clicks give the voxels predict --boxes writes for the same box and
points; each step can be undone; a bad step is refused and changes nothing; saving never replaces another's file."""

from __future__ import annotations

import json

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
