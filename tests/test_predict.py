from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from embedcache.cli import main
from embedcache.errors import EmbedcacheError
from embedcache.metrics import dice
from embedcache.phantom import limit_target_slices
from embedcache.predict import BoxPrompt, check_prompts
from embedcache.volumes import discover_cases, read_label


@pytest.fixture
def one_slice_case(phantom_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    limit_target_slices(data, per_case=1)
    return discover_cases(data)[0]


def test_predicted_nifti_keeps_the_input_grid_and_lands_on_the_ground_truth(one_slice_case, tmp_path):
    case = one_slice_case
    result = CliRunner().invoke(main, ["predict", str(case.image), "--from-labels", str(case.label),
                                       "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "pred" / f"{case.name}.nii.gz"
    written, source = nib.load(out), nib.load(case.image)
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)
    predicted, truth = read_label(out).array, read_label(case.label).array
    for label in (7, 8):
        assert dice(predicted == label, truth == label) > 0.5  # vanilla LiteMedSAM with exact boxes
    # The same boxes as JSON give the same volume.
    z = int(np.flatnonzero(np.isin(truth, (7, 8)).any(axis=(1, 2)))[0])
    from embedcache.prompts import boxes_for_labels

    boxes = boxes_for_labels(truth[z], (7, 8))
    table = {case.name: [{"slice": z, "label": lab, "box": boxes[j].tolist()} for j, lab in enumerate((7, 8))]}
    (tmp_path / "boxes.json").write_text(json.dumps(table))
    result = CliRunner().invoke(main, ["predict", str(case.image), "--boxes", str(tmp_path / "boxes.json"),
                                       "--out", str(tmp_path / "pred2"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_label(tmp_path / "pred2" / f"{case.name}.nii.gz").array, predicted)


def test_bad_boxes_are_refused_with_what_to_fix():
    shape = (10, 64, 80)
    with pytest.raises(EmbedcacheError, match="has x1 <= x0"):
        check_prompts([BoxPrompt(2, 7, (30, 10, 20, 20))], shape, "boxes.json")
    with pytest.raises(EmbedcacheError, match="outside the 80×64 px slice"):
        check_prompts([BoxPrompt(2, 7, (30, 10, 90, 20))], shape, "boxes.json")
    with pytest.raises(EmbedcacheError, match="slice 12, but the volume has slices 0..9"):
        check_prompts([BoxPrompt(12, 7, (30, 10, 40, 20))], shape, "boxes.json")


def test_an_unreadable_input_is_reported_and_the_rest_go_on(one_slice_case, tmp_path):
    broken = tmp_path / "BROKEN_0000.nii.gz"
    broken.write_bytes(b"not a nifti")
    labels = one_slice_case.label.parent
    result = CliRunner().invoke(main, ["predict", str(broken), str(one_slice_case.image), "--from-labels", str(labels),
                                       "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert result.exit_code == 1
    assert "BROKEN_0000.nii.gz: not a readable NIfTI" in result.output
    assert (tmp_path / "pred" / f"{one_slice_case.name}.nii.gz").is_file()
    assert "1 input(s) failed" in result.output
