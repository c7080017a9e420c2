"""The benchmark scripts run end to end (a smoke test with the tiny backbone; no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_run_all_writes_its_json_and_table(tiny_model, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import run_all

    result = run_all.main(["--device", "cpu", "--backbones", "tiny", "--quick", "--out", str(tmp_path)])
    saved = json.loads(next(tmp_path.glob("run_all-cpu-quick-*.json")).read_text())
    assert saved["backbones"].keys() == {"tiny"} and saved["machine"]["device"] == "cpu"
    figures = result["backbones"]["tiny"]
    assert figures["encode"]["pipeline_over_bare"] > 0 and figures["epoch"]["cached_over_bound"] > 0
    assert figures["dtype"]["max_abs_difference"] < 0.05  # a float16 cache decodes like a float32 one
    table = next(tmp_path.glob("run_all-cpu-quick-*.md")).read_text()
    assert "| tiny (bundled weights) |" in table and "CPU," in table


def test_epoch_times_finetune_at_extra_batch_sizes(tiny_model, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import epoch

    result = epoch.main(["--backbones", "tiny", "--cases", "2", "--slices-per-case", "2", "--device", "cpu",
                         "--epochs", "2", "--phantom-size", "128", "--extra-batch-sizes", "2,3", "--no-save"])["tiny"]
    assert set(result["finetune_at_batch_size"]) == {"2", "3"}
    assert all(b["prompts_per_s"] > 0 for b in result["finetune_at_batch_size"].values())
