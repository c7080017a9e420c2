"""The benchmark scripts run end to end (a smoke test with the tiny backbone; no timing is asserted)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def session_engine_cache_kept():
    """A benchmark's main() runs in its own EMBEDCACHE_CACHE and puts the caller's back: when it did not, every later
    test lost the session's engine cache (test_what_already_held measured LiteMedSAM's --engine auto again, 94 s)."""
    before = os.environ["EMBEDCACHE_CACHE"]
    yield
    assert os.environ["EMBEDCACHE_CACHE"] == before, "a benchmark left EMBEDCACHE_CACHE at its own folder"


def test_run_all_writes_its_json_and_table(tiny_model, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import run_all

    result = run_all.main(["--device", "cpu", "--backbones", "tiny", "--quick", "--sizes", "6,2,2", "--out", str(tmp_path)])
    saved = json.loads(next(tmp_path.glob("run_all-cpu-quick-*.json")).read_text())
    assert saved["backbones"].keys() == {"tiny"} and saved["machine"]["device"] == "cpu"
    assert saved["sizes"] == {"encode_slices": 6, "epoch_cases": 2, "epoch_slices_per_case": 2}
    figures = result["backbones"]["tiny"]
    assert figures["encode"]["pipeline_over_bare"] > 0 and figures["epoch"]["cached_over_bound"] > 0
    assert figures["dtype"]["max_abs_difference"] < 0.05  # a float16 cache decodes like a float32 one
    assert figures["engines"]["torch"]["speedup_over_torch"] == 1.0  # every engine installed, side by side
    table = next(tmp_path.glob("run_all-cpu-quick-*.md")).read_text()
    assert "| tiny (bundled weights) |" in table and "CPU," in table and "encoder × eager torch" in table


def test_epoch_times_finetune_at_extra_batch_sizes_and_compiled(tiny_model, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import epoch
    import run_all
    import torch
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")  # dynamo's graphs run as they are: inductor's C++ build would take
    # a minute here, AOT autograd 20 s (test_finetune's compile test runs that)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counter, **kw))
    result = epoch.main(["--backbones", "tiny", "--cases", "2", "--slices-per-case", "2", "--device", "cpu",
                         "--epochs", "2", "--phantom-size", "128", "--extra-batch-sizes", "3",
                         "--compile-batch-sizes", "2", "--no-save"])["tiny"]
    assert set(result["finetune_at_batch_size"]) == {"3"}  # each size is 4 epochs: one shows the loop
    assert all(b["prompts_per_s"] > 0 for b in result["finetune_at_batch_size"].values())
    compiled = result["compile_at_batch_size"]["2"]
    assert counter.frame_count >= 1  # the compiled run really ran through torch.compile
    assert len(compiled["all_epoch_s"]["eager"]) == 2 and len(compiled["all_epoch_s"]["compiled"]) == 1
    ratio = compiled["compiled_epoch_s"] / compiled["eager_epoch_s"]  # of rounded figures: compare loosely
    assert abs(compiled["compiled_over_eager"] - ratio) < 1e-3 * ratio + 1e-4
    assert "× eager's epoch (batch 2;" in run_all._compiled("2", compiled)
    # a compile that fails is recorded, not raised: the other figures of a GPU run survive it
    failed = epoch.compile_cost(epoch.FinetuneConfig(cache=str(tmp_path / "none.h5"), device="cpu"), tmp_path, 1)
    assert "error" in failed and "failed" in run_all._compiled("8", failed)


def test_clicks_chooses_on_val_reports_on_test_under_each_rule_and_reuses_what_is_done(tiny_model, small_cache,
                                                                                        tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import clicks

    from embedcache.cache.store import open_cache

    with open_cache(small_cache) as cache:
        names = [c.name for c in cache.cases]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": names[:1], "val": names[1:2], "test": names[2:]}))
    argv = [str(small_cache), "--split", str(split), "--work", str(tmp_path / "work"), "--epochs", "1", "--clicks", "2",
            "--recipes", "vanilla,box,interactive,interactive-last", "--rounds", "3", "--test-rules", "local",
            "--reaches", "1,3", "--name", "small", "--out", str(tmp_path)]
    result = clicks.main(argv)
    chosen_reach = result["chosen_reach_on_val"]
    assert set(chosen_reach["val"]) == {1, 3} and result["reach"] == chosen_reach["reach"] in (1, 3)
    assert (tmp_path / "work" / f"{chosen_reach['decoder']}-val-local-reach1.json").is_file()
    chosen = result["chosen_on_val"]["recipe"]
    assert chosen in ("interactive", "interactive-last") and set(result["chosen_on_val"]["val"]) == set(clicks.CANDIDATES)
    other = ({"interactive", "interactive-last"} - {chosen}).pop()
    assert "test" not in result["decoders"][other] and "val" in result["decoders"][other]  # val chooses, test reports
    assert set(result["decoders"][chosen]["test"]) == {"local", "walk"}
    assert set(result["decoders"]["box"]["test"]) == {"local"}
    for recipe in ("vanilla", "box", chosen):
        for rule, value in result["decoders"][recipe]["test"].items():
            gland = value["glands"]["right adrenal"]
            assert len(gland["dice_after"]) == 3 and 0 <= gland["dice_auc"] <= 1 and gland["cases"] == len(names) - 2
            assert value["decodes_per_click"] >= 1 or value["clicks_given"] == 0
    # the rules start from the same box3d: equal Dice at 0 clicks
    test = result["decoders"][chosen]["test"]
    assert test["local"]["glands"]["right adrenal"]["dice_after"][0] == test["walk"]["glands"]["right adrenal"]["dice_after"][0]
    finetuned = result["decoders"][chosen]["finetune"]
    assert finetuned["prompts"] == "interactive" and finetuned["rounds"] == 3 and finetuned["seconds_per_epoch"][0] > 0
    assert json.loads((tmp_path / "work" / chosen / "config.json").read_text())["prompts"] == "interactive"
    table = next(tmp_path.glob("clicks-small-cpu-*.md")).read_text()
    assert f"| `{chosen}` | walk |" in table and "| vanilla | local |" in table
    files = sorted(p.name for p in (tmp_path / "work").glob("*.json"))
    again = clicks.main(argv)  # done: read, not redone
    assert sorted(p.name for p in (tmp_path / "work").glob("*.json")) == files
    assert again["decoders"]["box"]["test"] == result["decoders"]["box"]["test"]


def test_engines_times_each_engine_against_torch_and_scores_each_in_one_run(tiny_model, run_dir, tmp_path,
                                                                             monkeypatch):
    import pytest

    from embedcache.model.engines import installed_engines
    from embedcache.synth.phantom import limit_target_slices, write_phantom

    from conftest import SMALL_PHANTOM

    if len(installed_engines()) == 1:
        pytest.skip("no other engine installed: pip install 'embedcache[cpu-fast]'")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import engines

    data = tmp_path / "data"
    write_phantom(data, cases=1, test_cases=1, seed=3, config=SMALL_PHANTOM)
    limit_target_slices(data, per_case=2)
    # the first graph engine one slice at a time, the next as its measurement chose, the last two slices at once
    graph_engines = installed_engines()[1:]
    specs = ["torch", f"{graph_engines[0]}@1", *graph_engines[1:], f"{graph_engines[-1]}@2"]
    result = engines.main(["--backbones", "tiny", "--engines", ",".join(specs), "--slices", "2", "--rounds", "2",
                           "--dice", str(data), "--run", str(run_dir), "--out", str(tmp_path / "out")])
    figures = result["backbones"]["tiny"]["engines"]
    assert list(figures) == specs and figures["torch"]["speedup_over_torch"] == 1.0
    for spec in specs[1:]:
        assert figures[spec]["max_abs_difference_from_torch"] < 1e-3 and figures[spec]["seconds_per_slice"] > 0
    assert figures[specs[-1]]["streams"] == 2 and figures["torch"]["streams"] == 1
    dice = result["dice"]["engines"]
    assert list(dice) == specs and dice["torch"]["dice_difference_from_torch"] == {
        label: {"vanilla": 0.0, "finetuned": 0.0} for label in ("7", "8")}
    for spec in specs[1:]:  # fp32 engines: the same Dice to 4 decimals
        assert all(abs(d) <= 1e-4 for by in dice[spec]["dice_difference_from_torch"].values() for d in by.values())
    saved = json.loads(next((tmp_path / "out").glob("engines-cpu-*.json")).read_text())
    test_case = [p.name.removesuffix("_0000.nii.gz") for p in (data / "imagesTs").iterdir()]
    assert saved["backbones"].keys() == {"tiny"} and saved["dice"]["cases"] == test_case
    table = next((tmp_path / "out").glob("engines-cpu-*.md")).read_text()
    assert "**tiny encoder**" in table and "**Box3d Dice" in table


def test_engines_predict_times_each_engine_end_to_end_and_scores_what_it_wrote(tiny_checkpoint, run_dir, tmp_path,
                                                                                monkeypatch):
    import sys

    import pytest

    from embedcache.model.engines import installed_engines
    from embedcache.synth.phantom import write_phantom

    from conftest import SMALL_PHANTOM

    if len(installed_engines()) == 1:
        pytest.skip("no other engine installed: pip install 'embedcache[cpu-fast]'")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import engines

    # each predict a fresh process with the tiny backbone registered
    monkeypatch.setattr(engines, "EMBEDCACHE", [sys.executable, str(Path(__file__).parent / "tiny.py"), str(tiny_checkpoint)])
    data = tmp_path / "data"
    write_phantom(data, cases=1, test_cases=1, seed=3, config=SMALL_PHANTOM)
    specs = ["torch", installed_engines()[1]]
    result = engines.main(["--skip-encoder", "--engines", ",".join(specs), "--rounds", "1", "--warmup", "0", "--predict", str(data),
                           "--run", str(run_dir), "--out", str(tmp_path / "out")])
    pace = result["predict"]["engines"]
    assert list(pace) == specs and pace["torch"]["speedup_over_torch"] == 1.0
    assert result["predict"]["labels"] == [7, 8]
    for spec in specs:
        assert pace[spec]["seconds_per_case"] > 0 and len(pace[spec]["dice"]) == 2
        assert all(0.0 <= d <= 1.0 for d in pace[spec]["dice"]) and "s per case" in pace[spec]["last_line"]
    assert pace["torch"]["voxels_differing_from_torch"] == 0
    assert f"decoder {specs[1]}" in pace[specs[1]]["last_line"]  # the decoder ran as a graph too
    assert "**predict, one case end to end**" in next((tmp_path / "out").glob("engines-cpu-*.md")).read_text()


def test_encode_sets_the_engines_side_by_side_end_to_end(tiny_model, tmp_path, monkeypatch):
    import pytest

    from embedcache.model.engines import installed_engines

    if len(installed_engines()) == 1:
        pytest.skip("no other engine installed: pip install 'embedcache[cpu-fast]'")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("EMBEDCACHE_CACHE", str(tmp_path / "engine-cache"))
    import encode

    specs = ["torch", f"{installed_engines()[1]}@1"]  # one at a time: engines.py's test runs the measurement
    result = encode.main(["--backbone", "tiny", "--slices", "2", "--phantom-size", "128", "--repeats", "1",
                          "--engines", ",".join(specs), "--no-save"])
    figures = result["engines"]
    assert list(figures) == specs and figures["torch"]["speedup_over_torch"] == 1.0
    assert figures["torch"]["max_abs_difference_from_torch"] == 0.0 and result["slices"] >= 2
    assert figures[specs[1]]["max_abs_difference_from_torch"] <= 1e-4 and figures[specs[1]]["pipeline_slices_per_s"] > 0


def test_int8_costs_are_dice_lost_against_fp32_per_gland_and_the_gate_holds_every_gland(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import int8

    models = {"fp32": {"box3d_dice": {7: {"a": 0.80, "b": 0.90}, 8: {"a": 0.90, "b": 0.70}}},
              "bf16": {"box3d_dice": {7: {"a": 0.81, "b": 0.89}, 8: {"a": 0.90, "b": 0.70}}},
              "int8": {"box3d_dice": {7: {"a": 0.80, "b": 0.90}, 8: {"a": 0.88, "b": 0.71}}}}
    int8.add_costs(models)
    assert models["fp32"]["dice_cost_mean"] == {"7": 0.0, "8": 0.0} and models["fp32"]["within_gate"]
    assert models["bf16"]["dice_cost_mean"] == {"7": 0.0, "8": 0.0} and models["bf16"]["dice_cost_worst_case"]["7"] == 0.01
    assert models["int8"]["dice_cost_mean"] == {"7": 0.0, "8": 0.005} and models["int8"]["within_gate"]  # at the gate
    models["int8"]["box3d_dice"][8]["b"] = 0.70
    int8.add_costs(models)
    assert models["int8"]["dice_cost_mean"]["8"] == 0.01 and not models["int8"]["within_gate"]  # one gland fails it
    assert models["int8"]["dice_cost_worst_case"] == {"7": 0.0, "8": 0.02}


def test_int8_quantizes_times_and_scores_fp32_and_int8_on_the_held_out_cases(tiny_model, run_dir, tmp_path, monkeypatch):
    pytest.importorskip("nncf", reason="benchmarks/int8.py needs NNCF, which no extra installs: pip install nncf")
    pytest.importorskip("openvino", reason="pip install 'embedcache[cpu-fast]'")
    from embedcache.synth.phantom import write_phantom

    from conftest import SMALL_PHANTOM

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import int8

    data = tmp_path / "data"
    write_phantom(data, cases=1, test_cases=1, seed=3, config=SMALL_PHANTOM)
    result = int8.main(["--data", str(data), "--run", str(run_dir), "--calibration", "3", "--every", "1",
                        "--rounds", "1", "--name", "smoke", "--out", str(tmp_path / "out")])
    models = result["models"]
    assert {"fp32", "int8"} <= models.keys() and models["fp32"]["max_abs_difference"] == 0.0
    assert result["calibration_slices"] == 3 and result["test_cases"] == [p.name.removesuffix("_0000.nii.gz")
                                                                           for p in (data / "imagesTs").iterdir()]
    assert models["int8"]["max_abs_difference"] > 0  # quantized: not fp32's graph under another name
    for figures in models.values():
        assert set(figures["box3d_mean"]) == {"7", "8"} and all(0.0 <= d <= 1.0 for d in figures["box3d_mean"].values())
    saved = json.loads(next((tmp_path / "out").glob("int8-smoke-*.json")).read_text())
    assert saved["models"]["int8"]["within_gate"] == models["int8"]["within_gate"]
    assert "| int8 |" in next((tmp_path / "out").glob("int8-smoke-*.md")).read_text()


def test_annotate_times_the_cold_box_and_each_click_per_engine_and_says_where_the_time_goes(tiny_model, tmp_path,
                                                                                             monkeypatch):
    from embedcache.model.engines import installed_engines

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import annotate

    specs = ["torch", *installed_engines()[1:2]]  # eager torch and one graph engine (its decoder graph too)
    result = annotate.main(["--model", "tiny", "--quick", "--engines", ",".join(specs), "--streams", "1",
                            "--out", str(tmp_path)])
    assert list(result["engines"]) == specs and not result["case"]["realistic"]  # --quick: the phantom
    for spec, figures in result["engines"].items():
        assert "error" not in figures, figures
        cold = figures["cold_first_box"]
        assert cold["encodes"] >= 1 and cold["decodes"] >= 1 and cold["seconds"] >= cold["box_s"] > 0
        # the shares add up to the step's wall time
        assert abs(cold["decode_s"] + cold["encode_s"] + cold["other_s"] - cold["box_s"]) < 1e-3
        assert figures["boxes"].keys() == {"7", "8"} and figures["load_before"] and len(figures["load_after"]) == 3
        for click in figures["clicks"]:
            assert click["encodes"] == 0 and click["decodes"] >= 1  # every slice of the box was encoded first
        assert figures["click_summary"]["clicks"] == len(figures["clicks"]) >= 1
    assert result["engines"]["torch"]["warmup"]["exported"] is False
    if len(specs) > 1:
        assert result["engines"][specs[1]]["warmup"]["exported"]  # a fresh engine cache folder: the graphs exported
    table = next(tmp_path.glob("annotate-latency-quick-cpu-*.md")).read_text()
    assert "| torch | fp32 |" in table and "targets met" in table


def test_annotate_loop_times_each_step_and_scores_the_decoder_before_and_after_with_a_control(tiny_model, tmp_path,
                                                                                             monkeypatch):
    from embedcache.synth.phantom import write_phantom

    from conftest import SMALL_PHANTOM

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import annotate_loop

    write_phantom(tmp_path / "maps", cases=4, seed=3, config=SMALL_PHANTOM)  # its label maps stand in for FLARE22's
    result = annotate_loop.main(["--labels", str(tmp_path / "maps" / "labelsTr"), "--work", str(tmp_path / "work"),
                                 "--train", "2", "--test", "1", "--val", "1", "--epochs", "1", "--clicks", "1",
                                 "--accept", "2", "--model", "tiny", "--name", "loop", "--out", str(tmp_path / "out")])
    steps = result["loop_s"]
    assert set(steps) == {"open_s", "boxes_s", "clicks_s", "add_s", "finetune_s", "loop_s"}
    assert abs(steps["loop_s"] - sum(v for k, v in steps.items() if k != "loop_s")) < 0.05
    assert result["bed"]["new_case"] == "PHANTOM_0004" and result["bed"]["new_case_rows"] > 0
    for after in result["new_case_dice_after_box_then_each_click"].values():
        assert len(after) >= 3 and after[-1] > after[0]  # the two painted slices count
    assert set(result["test_box3d"]) == {"run0", "run1 (with the new case)", "control (without it)"}
    split = json.loads((tmp_path / "work" / "split-grown.json").read_text())
    assert "PHANTOM_0004" in split["train"]  # run1 trained on the annotated case, the control did not
    assert "PHANTOM_0004" not in json.loads((tmp_path / "work" / "control" / "split.json").read_text())["train"]
    assert "| **the loop** |" in (tmp_path / "out" / "loop.md").read_text()


def test_recipes_reports_the_second_painting_style_and_where_box3d_loses_voxels(tiny_model, small_cache, tmp_path,
                                                                                monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import shutil

    import numpy as np
    import recipes

    from embedcache.cache.store import open_cache

    with open_cache(small_cache) as cache:
        names = [c.name for c in cache.cases]
    work = tmp_path / "work"
    work.mkdir()
    (work / "split.json").write_text(json.dumps({"train": names[:1], "val": names[1:2], "test": names[2:]}))
    other = tmp_path / "other.h5"  # the same training cases painted another way, in a real study
    shutil.copyfile(small_cache, other)
    result = recipes.main([str(small_cache), "--work", str(work), "--epochs", "1", "--recipes", "vanilla,jitter",
                           "--walks", "grow", "--min-ious", "0", "--second-style", str(small_cache), "--name", "small",
                           "--train-cache", str(other), "--out", str(tmp_path)])
    assert json.loads((work / "jitter" / "config.json").read_text())["cache"] == str(other.resolve())  # trained there
    assert result["train_cache"] == str(other)
    for row in result["recipes"].values():
        assert row["test2"] == row["test"]  # the same cache as its own second style: the same figures
        where = row["test_where"]
        assert set(where) == {"oracle", "box3d-grow"}
        for label, counts in where["oracle"].items():
            assert counts.get("beyond", {}).get("slices", 0) == 0  # the oracle never prompts a slice without the gland
            held = sum(c["voxels"] for c in counts.values())
            assert held == sum(c["voxels"] for c in where["box3d-grow"][label].values()) > 0
    table = (tmp_path / "small.md").read_text()
    assert "box3d-grow, 2nd style |" in table and "Where voxels are lost, test cases, 2nd style" in table
    # each slice position, counted on its own
    truth = np.zeros((7, 8, 8), bool)
    truth[1:6, 2:6, 2:6] = True
    mask = truth.copy()
    mask[1] = False  # the first slice missed
    mask[3, 0, 0] = True  # one voxel too many in the middle
    mask[6, 2:4, 2:4] = True  # four beyond the gland
    counts = recipes.where_lost(mask, truth)
    assert counts["end"] == {"slices": 2, "voxels": 32, "missed": 16, "extra": 0, "empty": 1}
    assert counts["next to end"]["slices"] == 2 and counts["middle"] == {"slices": 1, "voxels": 16, "missed": 0,
                                                                           "extra": 1, "empty": 0}
    assert counts["beyond"] == {"slices": 1, "voxels": 0, "missed": 0, "extra": 4, "empty": 0}


def test_error_rim_tells_a_boundary_rim_from_a_missed_region(tiny_model, small_cache, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import error_rim
    import numpy as np

    from embedcache.cache.store import open_cache

    truth = np.zeros((3, 20, 20), bool)
    truth[:, 5:15, 5:15] = True
    grown = np.zeros_like(truth)
    grown[:, 4:16, 4:16] = True  # one pixel too many all round: all rim, one component
    assert error_rim.error_shape(grown, truth) == {"error": 3 * 44, "on_rim": 3 * 44, "largest": 3 * 44,
                                                   "components": 1, "gland": 300}
    missed = truth.copy()
    missed[1, 8:12, 8:12] = False  # a hole inside: off the rim
    assert error_rim.error_shape(missed, truth)["on_rim"] == 0
    with open_cache(small_cache) as cache:
        names = [c.name for c in cache.cases]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [], "val": [], "test": names[:2]}))
    result = error_rim.main([str(small_cache), "--split", str(split), "--clicks", "1", "--name", "small",
                             "--out", str(tmp_path)])
    assert set(result["summary"]) == {"0", "1"}
    for by_label in result["summary"].values():
        for s in by_label.values():
            assert s["cases"] == 2 and 0 <= s["on_rim_pct"] <= 100 and 0 <= s["largest_component_pct"] <= 100
    assert "| on the rim (±1 px)" in next(tmp_path.glob("error-rim-small-cpu-*.md")).read_text()


def test_zoom_maps_each_glands_region_back_exactly_and_scores_every_view(tiny_model, small_cache, small_zoom_cache,
                                                                         tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import zoom

    from embedcache.cache.store import open_cache

    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["PHANTOM_0001"], "val": ["PHANTOM_0002"], "test": ["PHANTOM_0003"]}))
    result = zoom.main([str(small_cache), "--decoder", "vanilla", "--zoom-cache", str(small_zoom_cache),
                        "--zoom-decoder", "vanilla", "--split", str(split), "--second-style", str(small_cache),
                        "--second-zoom-cache", str(small_zoom_cache), "--name", "small", "--out", str(tmp_path),
                        "--clicks", "1", "--oracle"])
    assert set(result["sets"]) == {"val", "test", "test, 2nd style"}
    assert sorted(result["sets"]["test"]) == ["PHANTOM_0003@7", "PHANTOM_0003@8"]
    assert result["sets"]["test"] == result["sets"]["test, 2nd style"]  # the same caches twice: the same figures
    rows = [row for rows in result["sets"].values() for row in rows.values()]
    assert all(row["roundtrip"] == 1.0 for row in rows)  # every cached region mask lands on its own pixels
    assert any(row["slices"] for row in rows) and result["margin_mm"] == 10.0
    with open_cache(small_zoom_cache) as cache:
        assert result["encoded"]["test"]["regions"] == sum(c.n_rows for c in cache.cases
                                                           if c.region and c.region["source"] == "PHANTOM_0003")
    for row in rows:
        for view in zoom.VIEWS + zoom.ORACLE_VIEWS + zoom.CLICK_VIEWS:
            assert 0.0 <= row[view]["dice"] <= 1.0
    written = (tmp_path / "small.md").read_text()
    assert "| test, 2nd style | 7 |" in written and "average+clicks |" in written and "1 corrective clicks" in written
    assert "oracle average |" in written
    with pytest.raises(SystemExit, match="not a zoom cache"):
        zoom.main([str(small_cache), "--decoder", "vanilla", "--zoom-cache", str(small_cache), "--zoom-decoder",
                   "vanilla", "--split", str(split), "--out", str(tmp_path)])
