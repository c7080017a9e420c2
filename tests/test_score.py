"""score: 3-D masks stacked from per-slice decodes, FLARE22 metrics per case and gland, the report files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embedcache import score as score_module
from embedcache.cache import open_cache
from embedcache.metrics import dice
from embedcache.volumes import read_label


def _constant_decoder(value: float):
    """A stand-in for the decoder whose logits are ``value`` everywhere: every prompt's mask is its whole slice."""

    def decode(prompt_encoder, mask_decoder, embeddings, boxes, **kw):
        n = len(boxes)
        return torch.full((n, 1, 256, 256), value), torch.zeros(n, 1)

    return decode


def test_whole_slice_masks_score_exactly_as_counted_by_hand(small_cache, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(score_module, "decode_boxes", _constant_decoder(10.0))
    report = score_module.score(small_cache, tmp_path / "r", cases="all", device="cpu")
    with open_cache(small_cache) as cache:
        for case in cache.cases:
            truth = read_label(case.label).array
            present = cache.present(case.rows)
            for j, label in enumerate(cache.labels):
                predicted = np.zeros(truth.shape, bool)
                predicted[cache.slice_index[case.rows][present[:, j]]] = True  # whole slices that had a box
                expected = dice(predicted, truth == label)
                assert report["cases"][case.name][str(label)]["vanilla"]["dice"] == pytest.approx(expected)
                assert 0 < expected < 0.2  # a gland fills a small part of its slices
    means = report["mean"]["7"]["vanilla"]
    assert means["dice"] == pytest.approx(np.mean([c["7"]["vanilla"]["dice"] for c in report["cases"].values()]))
    assert json.loads((tmp_path / "r" / "report.json").read_text())["mean"] == report["mean"]


def test_empty_predictions_score_zero_and_files_are_complete(small_cache, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(score_module, "decode_boxes", _constant_decoder(-10.0))
    report = score_module.score(small_cache, tmp_path / "r", cases="all", device="cpu")
    for by_label in report["cases"].values():
        for by_model in by_label.values():
            assert by_model["vanilla"]["dice"] == 0.0 and by_model["vanilla"]["nsd"] == 0.0
    assert report["nsd_tolerance_mm"] == {"7": 2.0, "8": 2.0}
    assert report["labels"] == {"7": "right adrenal", "8": "left adrenal"}
    rows = (tmp_path / "r" / "cases.csv").read_text().splitlines()
    assert rows[0] == "case,label,model,dice,nsd,dice_2d" and len(rows) == 1 + 3 * 2
    assert not list((tmp_path / "r").glob("*.partial"))
