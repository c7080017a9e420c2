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
