"""score: each protocol on the cached embeddings, 3-D metrics per case and gland, the case set, the report."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from embedcache.cache import store
from embedcache.cache.merge import merge
from embedcache.config import ProtocolSettings, ScoreConfig
from embedcache.errors import EmbedcacheError
from embedcache.evaluation import score as score_module
from embedcache.io.volumes import read_label

from conftest import cli


def _stand_in_segmenter(self, prompt_encoder, mask_decoder, **size):
    """For any model: the ground truth (any target label) inside the box where the slice holds it, else the
    whole box: perfect on the gland, a false positive beyond it."""
    truth = np.isin(read_label(self.case.label).array, (7, 8))

    def segment(zs, boxes, **_):
        self.rows(zs)  # only cached slices can be asked for
        masks = []
        for z, (x0, y0, x1, y1) in zip(zs, boxes):
            inside = np.zeros(truth.shape[1:], bool)
            inside[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = True
            masks.append(truth[z] & inside if (truth[z] & inside).any() else inside)
        return np.array(masks), np.ones(len(masks))

    return segment


def test_oracle_is_perfect_where_box3d_pays_for_slices_beyond_the_gland(small_cache, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(score_module.CachedCase, "segment_with", _stand_in_segmenter)
    report = score_module.score(ScoreConfig(cache=str(small_cache), device="cpu", protocol=ProtocolSettings(grow_mm=50.0)),
                                tmp_path / "r")
    assert report.case_set == "all" and "none is marked as held out" in report.case_set_note
    assert list(report.cases) == ["oracle", "jitter", "box3d"] and report.models == ("vanilla",)
    for case, by_label in report.cases["oracle"].items():
        for label, by_model in by_label.items():
            assert by_model["vanilla"]["dice"] == 1.0 and by_model["vanilla"]["nsd"] == 1.0
            box3d = report.cases["box3d"][case][label]["vanilla"]
            assert box3d["dice"] < 1.0 and box3d["dice_2d"] == 1.0  # right on every gland slice, wrong beyond
    summary = report.summary["box3d"]["7"]["vanilla"]["dice"]
    values = [c["7"]["vanilla"]["dice"] for c in report.cases["box3d"].values()]
    assert summary == {"mean": pytest.approx(np.mean(values)), "sd": pytest.approx(np.std(values)), "n": 3}
    out = tmp_path / "r"
    assert json.loads((out / "report.json").read_text())["summary"] == json.loads(json.dumps(report.summary))
    rows = (out / "cases.csv").read_text().splitlines()
    assert rows[0] == "protocol,case,label,gland,model,dice,nsd,dice_2d" and len(rows) == 1 + 3 * 3 * 2
    assert {row.split(",")[3] for row in rows[1:]} == {"right adrenal", "left adrenal"}
    assert (out / "dice.png").stat().st_size > 5000 and len(list(out.glob("overlay-*.png"))) == 4
    page = (out / "index.html").read_text()
    assert "box3d" in page and "dice.png" in page and all(p.name in page for p in out.glob("overlay-*.png"))
    assert not list(out.glob("*.partial"))


def test_box3d_needs_the_cached_margin_slices(small_cache, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(score_module.CachedCase, "segment_with", _stand_in_segmenter)
    with pytest.raises(EmbedcacheError, match=r"has no embedding of slice \d+.*--margin-slices .*the cache has 2"):
        score_module.score(ScoreConfig(cache=str(small_cache), device="cpu", prompts=("box3d",),
                                       protocol=ProtocolSettings(margin_slices=4)), tmp_path / "r")


def _with_test_case(small_cache, tmp_path):
    with store.open_cache(small_cache) as cache:
        records, signature = cache.cases, cache.signature
    records = [replace(r, subset="test") if r.name == records[-1].name else r for r in records]
    out = tmp_path / "with_test.h5"
    merge(out, signature=signature, sources=[(small_cache, records)])
    return out, records[-1].name


def test_held_out_test_cases_are_scored_by_default(small_cache, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(score_module.CachedCase, "segment_with", _stand_in_segmenter)
    cache, test_case = _with_test_case(small_cache, tmp_path)
    report = score_module.score(ScoreConfig(cache=str(cache), device="cpu", prompts=("oracle",)), tmp_path / "r")
    assert report.case_set == "test" and report.case_names == (test_case,)
    assert "held out" in report.case_set_note
    every = score_module.score(ScoreConfig(cache=str(cache), device="cpu", prompts=("oracle",), cases="all"), tmp_path / "r2")
    assert len(every.case_names) == 3
    with pytest.raises(EmbedcacheError, match="--cases val needs --run"):
        score_module.score(ScoreConfig(cache=str(cache), device="cpu", cases="val"), tmp_path / "r3")


def test_evaluate_on_predicts_output_reproduces_scores_box3d(small_cache, tiny_model, tmp_path):
    """The same 3-D boxes through predict (embeddings on the fly) and score (cached) give the same masks."""
    assert cli(*["finetune", str(small_cache), "--out", str(tmp_path / "run"), "--epochs", "1",
                             "--batch-size", "2", "--val-fraction", "0.34", "--device", "cpu", "--no-progress"]).exit_code == 0
    scored = cli(*["score", str(small_cache), "--run", str(tmp_path / "run"), "--cases", "all", "--protocols",
                               "box3d", "--out", str(tmp_path / "score"), "--device", "cpu", "--no-progress"])
    assert scored.exit_code == 0, scored.output
    assert "prompts: box3d" in scored.output and "every case in the cache, the training cases included" in scored.output
    with store.open_cache(small_cache) as cache:
        images = [c.image for c in cache.cases]
        labels = str(cache.cases[0].label).rsplit("/", 1)[0]
    predicted = cli(*["predict", *images, "--run", str(tmp_path / "run"), "--from-labels", labels,
                                  "--protocol", "box3d", "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert predicted.exit_code == 0, predicted.output
    evaluated = cli(*["evaluate", str(tmp_path / "pred"), labels, "--out", str(tmp_path / "eval"),
                                  "--no-progress"])
    assert evaluated.exit_code == 0, evaluated.output
    score_report = json.loads((tmp_path / "score" / "report.json").read_text())["cases"]["box3d"]
    eval_report = json.loads((tmp_path / "eval" / "report.json").read_text())["cases"]["given"]
    assert sorted(score_report) == sorted(eval_report)
    for case, by_label in score_report.items():
        for label, by_model in by_label.items():
            assert eval_report[case][label]["prediction"] == by_model["finetuned"], (case, label)
    learning = tmp_path / "score" / "learning_curve.png"
    assert learning.is_file() and "learning_curve.png" in (tmp_path / "score" / "index.html").read_text()


def test_a_case_from_one_series_of_a_mixed_dicom_folder_is_scored_from_that_series(tiny_model, series_dir, tmp_path):
    """The cache records ``--series``: score reads the image again (for its pictures) from the same series."""
    import shutil

    import pydicom

    from embedcache.io.nifti import write_nifti
    from embedcache.io.volumes import read_image

    from conftest import cli, pydicom_dir

    mixed = tmp_path / "mixed"
    shutil.copytree(series_dir, mixed)
    for f in pydicom_dir("dicomdirtests/98892001/CT2N").iterdir():
        shutil.copy(f, mixed / f"other_{f.name}")
    uid = str(pydicom.dcmread(next(series_dir.iterdir())).SeriesInstanceUID)
    image = read_image(mixed, series_uid=uid)
    label = np.zeros(image.array.shape, np.uint8)
    label[1:3, 4:8, 3:7] = 7
    label[2:4, 8:12, 10:14] = 8
    write_nifti(label, image.geometry, tmp_path / "label.nii.gz")
    encode = ["encode", "--image", str(mixed), "--label", str(tmp_path / "label.nii.gz"), "--series", uid,
              "--out", str(tmp_path / "c.h5"), "--model", "tiny", "--no-progress"]
    done = cli(*encode)
    assert done.exit_code == 0, done.output
    done = cli(*encode)
    assert done.exit_code == 0 and "encoded 0 slices" in done.output and "3 cases already done" in done.output
    with store.open_cache(tmp_path / "c.h5") as cache:
        assert cache.cases[0].series_uid == uid
    done = cli(*["score", str(tmp_path / "c.h5"), "--out", str(tmp_path / "r"), "--device", "cpu",
                             "--protocols", "oracle", "--no-progress"])
    assert done.exit_code == 0, done.output
    assert len(list((tmp_path / "r").glob("overlay-*.png"))) == 4


def _click_aware_segmenter(self, prompt_encoder, mask_decoder, **size):
    """A decoder that draws the left half of the gland inside its box and, for each positive click, the whole
    gland (any target label) on that slice, and honours a negative click by drawing nothing: clicks help."""
    truth = np.isin(read_label(self.case.label).array, (7, 8))

    def segment(zs, boxes, points=None, **_):
        masks = []
        for i, (z, (x0, y0, x1, y1)) in enumerate(zip(zs, boxes)):
            inside = np.zeros(truth.shape[1:], bool)
            inside[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = True
            mask = truth[z] & inside
            cols = np.flatnonzero(mask.any(axis=0))
            if cols.size:
                mask[:, (cols[0] + cols[-1]) // 2 + 1 :] = False
            given = None if points is None else points[i]
            if given is not None and (given[:, 2] == 1).any():
                mask = truth[z] & inside
            if given is not None and (given[:, 2] == 0).any():
                mask = mask & False
            masks.append(mask)
        return np.array(masks), np.ones(len(masks))

    return segment


def test_clicks_record_dice_after_every_click_starting_from_box3d(small_cache, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(score_module.CachedCase, "segment_with", _click_aware_segmenter)
    settings = ProtocolSettings(clicks=3)
    report = score_module.score(ScoreConfig(cache=str(small_cache), device="cpu", prompts=("box3d", "clicks"),
                                            protocol=settings), tmp_path / "r")
    assert list(report.cases) == ["box3d", "clicks"]
    gains = []
    for case, by_label in report.cases["clicks"].items():
        for label, by_model in by_label.items():
            values = by_model["vanilla"]
            assert values["dice@0"] == pytest.approx(report.cases["box3d"][case][label]["vanilla"]["dice"])
            curve = [values[f"dice@{k}"] for k in range(4)]
            assert values["dice"] == pytest.approx(curve[-1]) and values["nsd"] == pytest.approx(values["nsd@3"])
            assert values["dice_auc"] == pytest.approx((curve[0] / 2 + curve[1] + curve[2] + curve[3] / 2) / 3)
            gains.append(curve[-1] - curve[0])
    assert min(gains) >= 0 and max(gains) > 0.05  # each positive click restores its slice
    out = tmp_path / "r"
    assert (out / "clicks.png").stat().st_size > 1000 and report.figures["clicks"] == "clicks.png"
    rows = (out / "clicks.csv").read_text().splitlines()
    assert rows[0] == "case,label,gland,model,clicks,dice,nsd" and len(rows) == 1 + 4 * sum(
        len(by_label) for by_label in report.cases["clicks"].values())
    page = (out / "index.html").read_text()
    assert "Dice after each corrective click" in page and 'src="clicks.png"' in page
    # scored again: the same clicks, the same numbers (deterministic)
    again = score_module.score(ScoreConfig(cache=str(small_cache), device="cpu", prompts=("clicks",), protocol=settings),
                               tmp_path / "r2")
    assert again.cases["clicks"] == report.cases["clicks"]


def test_score_prints_dice_after_each_click(small_cache, tiny_model, tmp_path):
    result = cli("score", small_cache, "--out", tmp_path / "r", "--protocols", "box3d,clicks", "--clicks", "2",
                 "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "mean Dice after each corrective click" in result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    for label in ("7", "8"):
        value = report["summary"]["clicks"][label]["vanilla"]["dice@2"]["mean"]
        assert f"{value:.4f}" in result.output
    assert (tmp_path / "r" / "clicks.png").is_file()


@pytest.mark.parametrize("value", ["-1", "21", "two"])
def test_a_bad_click_count_is_one_line(small_cache, tmp_path, value):
    from conftest import only_line_error

    result = cli("score", small_cache, "--out", tmp_path / "r", "--protocols", "clicks", "--clicks", value)
    only_line_error(result, "--clicks")
    assert not (tmp_path / "r").exists()


def test_zoom_scores_the_fine_tuned_masks_drawn_again_in_each_glands_region(small_cache, small_zoom_cache, run_dir,
                                                                           zoom_run, tiny_model, tmp_path, monkeypatch):
    calls = []

    def spy(first, both, **kw):
        out = redraw(first, both, **kw)
        calls.append((both.where, out))
        return out

    redraw = score_module.redraw_prediction
    monkeypatch.setattr(score_module, "redraw_prediction", spy)
    config = ScoreConfig(cache=str(small_cache), run=str(run_dir), zoom=str(zoom_run / "zoom"), cases="all",
                         prompts=("oracle", "box3d", "clicks"), protocol=ProtocolSettings(clicks=1), device="cpu")
    report = score_module.score(config, tmp_path / "r")
    assert report.models == ("vanilla", "finetuned", "zoomed")
    assert report.made_by["zoom cache"] == str(small_zoom_cache)  # the cache the zoom run was fine-tuned on
    with store.open_cache(small_zoom_cache) as cache:
        regions = {(c.region["source"], c.region["label"]): c.region for c in cache.cases if c.region}
    assert len(calls) == 2 * len(regions)  # oracle and box3d, once per gland; clicks start from box3d's
    assert {(w.z0, w.z1, w.region.cx) for w, _ in calls} == {(r["z0"], r["z1"], r["cx"]) for r in regions.values()}
    for protocol, by_case in report.cases.items():
        for case, by_label in by_case.items():
            for label, by_model in by_label.items():
                assert "zoomed" in by_model
                if protocol == "clicks":  # the curve starts at the zoomed box3d mask, then one click through both
                    box3d = report.cases["box3d"][case][label]["zoomed"]
                    assert by_model["zoomed"]["dice@0"] == pytest.approx(box3d["dice"])
                    assert {"dice@1", "nsd@1", "dice_auc"} <= set(by_model["zoomed"])
    assert "fine-tuned + zoom" in (tmp_path / "r" / "index.html").read_text()
    whole = cli("score", small_cache, "--out", tmp_path / "w", "--run", run_dir, "--zoom", zoom_run / "zoom", "--zoom-cache",
                small_cache)
    assert whole.exit_code == 1 and "holds whole slices; --zoom-cache takes" in whole.output
    missing = cli("score", small_cache, "--out", tmp_path / "m", "--run", run_dir, "--zoom", zoom_run / "zoom", "--zoom-cache",
                  tmp_path / "nothere.h5")
    assert missing.exit_code == 1 and "nothere.h5: no such cache; --zoom-cache takes" in missing.output
    assert not (tmp_path / "m").exists()
    # a run fine-tuned on a cache of both views scores with its own regions' decoder, in that cache's regions
    auto = score_module.score(ScoreConfig(cache=str(small_zoom_cache), run=str(zoom_run), cases="all",
                                          prompts=("box3d",), device="cpu"), tmp_path / "auto")
    assert auto.models == ("vanilla", "finetuned", "zoomed")
    assert auto.made_by["zoom decoder"] == str(zoom_run / "zoom" / "decoder.safetensors")
    assert auto.made_by["zoom cache"] == str(small_zoom_cache)
    assert set(auto.case_names) == {"PHANTOM_0001", "PHANTOM_0002", "PHANTOM_0003"}  # regions are drawn in, not scored
    off = cli("score", small_zoom_cache, "--out", tmp_path / "off", "--run", zoom_run, "--zoom", "off", "--cases", "all",
              "--protocols", "box3d", "--device", "cpu", "--no-progress")
    assert off.exit_code == 0 and json.loads((tmp_path / "off" / "report.json").read_text())["models"] == \
        ["vanilla", "finetuned"]
    regions = cli("score", small_zoom_cache, "--out", tmp_path / "g", "--run", zoom_run / "zoom")
    assert regions.exit_code == 1 and "trained on the glands' regions alone" in regions.output
    alone = cli("score", small_cache, "--out", tmp_path / "a", "--zoom-cache", small_zoom_cache)
    assert alone.exit_code == 1 and "no decoder of the glands' regions to draw in it" in alone.output
