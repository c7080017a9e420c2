"""The report record: what report.json, cases.csv and the page hold."""

from __future__ import annotations

import json

from embedcache.evaluation.report import Report, write_report


def _report(**changes) -> Report:
    cases = {"oracle": {"A": {"7": {"vanilla": {"dice": 1.0, "nsd": 1.0, "dice_2d": 1.0}}},
                        "B": {"7": {"vanilla": {"dice": 0.5, "nsd": 0.25, "dice_2d": 0.5}}}}}
    values = dict(kind="score", case_set="test", case_set_note="held out", case_names=("A", "B"),
                  made_by={"decoder": "vanilla only"}, prompts={"oracle": "tight boxes"}, models=("vanilla",),
                  labels={"7": "right adrenal"}, nsd_tolerance_mm={"7": 2.0}, cases=cases,
                  protocol_settings={"jitter": 0.1})
    return Report(**{**values, **changes})


def test_the_report_record_is_what_report_json_holds(tmp_path):
    written = write_report(tmp_path, _report())
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == json.loads(json.dumps(written.to_dict()))
    assert written.summary["oracle"]["7"]["vanilla"]["dice"] == {"mean": 0.75, "sd": 0.25, "n": 2}
    assert written.figures == {"dice": "dice.png"} and saved["protocol_settings"] == {"jitter": 0.1}
    assert "errors" not in saved  # a score report lists no unscored cases; evaluate's does
    evaluated = write_report(tmp_path / "e", _report(kind="evaluate", protocol_settings=None, errors={"C": "no file"}))
    assert "protocol_settings" not in evaluated.to_dict() and evaluated.to_dict()["errors"] == {"C": "no file"}
    assert "C: no file" in (tmp_path / "e" / "index.html").read_text()
    rows = (tmp_path / "cases.csv").read_text().splitlines()
    assert rows == ["protocol,case,label,gland,model,dice,nsd,dice_2d",
                    "oracle,A,7,right adrenal,vanilla,1.0000,1.0000,1.0000",
                    "oracle,B,7,right adrenal,vanilla,0.5000,0.2500,0.5000"]
