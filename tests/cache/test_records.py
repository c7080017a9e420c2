"""The cache's records: a Signature and a CaseRecord round-trip through JSON and are checked when read."""

from __future__ import annotations

import json
from dataclasses import replace

import h5py
import numpy as np
import pytest

from embedcache.cache import store
from embedcache.cache.records import CaseRecord, Signature, check_case_rows
from embedcache.config import PreprocessConfig
from embedcache.errors import EmbedcacheError

SIGNATURE = Signature(backbone="tiny", checkpoint_sha256="ab" * 32, input_size=1024,
                      preprocess=PreprocessConfig(slice_size=64), labels=(7, 8))
RECORD = CaseRecord(name="A", image="/d/A_0000.nii.gz", label="/d/A.nii.gz", digest="cd" * 32, first_row=0, n_rows=3,
                    shape_zyx=(20, 64, 64), spacing_mm=(2.5, 0.8, 0.8), source_shape=(64, 64, 20),
                    source_affine=tuple(tuple(float(v) for v in row) for row in np.eye(4)))


def test_records_round_trip_through_json():
    values = json.loads(json.dumps(SIGNATURE.to_dict()))
    assert Signature.from_dict(values, source="x") == SIGNATURE and SIGNATURE.slice_size == 64
    assert values["preprocess"] == {"window_width_hu": 350.0, "window_level_hu": 50.0, "slice_size": 64}
    assert CaseRecord.from_dict(json.loads(json.dumps(RECORD.to_dict())), source="x") == RECORD


@pytest.mark.parametrize("change, what", [
    (lambda s: "tiny", "signature is not one"),
    (lambda s: {k: v for k, v in s.items() if k != "labels"}, "signature is not one"),
    (lambda s: {**s, "extra": 1}, "signature is not one"),
    (lambda s: {**s, "input_size": "1024"}, "wrong type"),
    (lambda s: {**s, "labels": [7, "8"]}, "are not label ids"),
    (lambda s: {**s, "embedding_dtype": "int8"}, "is not float16 or float32"),
    (lambda s: {**s, "preprocess": {"slice_size": 64}}, "preprocess"),
    (lambda s: {**s, "preprocess": {**s["preprocess"], "slice_size": 10**9}}, "out of range"),
])
def test_a_crafted_signature_is_named(change, what):
    with pytest.raises(EmbedcacheError, match=f"^cache.h5: .*{what}.*encode it again"):
        Signature.from_dict(change(SIGNATURE.to_dict()), source="cache.h5")


@pytest.mark.parametrize("change", [
    lambda r: {k: v for k, v in r.items() if k != "digest"},
    lambda r: {**r, "n_rows": "3"},
    lambda r: {**r, "first_row": -1},
    lambda r: {**r, "shape_zyx": [20, 64]},
    lambda r: {**r, "spacing_mm": [2.5, float("nan"), 0.8]},
    lambda r: {**r, "subset": "val"},
    lambda r: {**r, "source_affine": [[1, 0, 0, 0]] * 3},
])
def test_a_crafted_case_record_is_named(change):
    with pytest.raises(EmbedcacheError, match="^cache.h5: .*case record"):
        CaseRecord.from_dict(change(json.loads(json.dumps(RECORD.to_dict()))), source="cache.h5")


def test_case_rows_must_lie_inside_the_datasets_without_overlap():
    check_case_rows([RECORD, replace(RECORD, name="B", first_row=3, n_rows=2)], 5, source="c.h5")
    for records, n in (([replace(RECORD, n_rows=10**6)], 5), ([RECORD, replace(RECORD, name="B", first_row=2)], 6),
                       ([RECORD, RECORD], 6)):
        with pytest.raises(EmbedcacheError, match="^c.h5: case"):
            check_case_rows(records, n, source="c.h5")


def test_a_cache_whose_records_lie_about_its_rows_is_refused_on_open(tmp_path):
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f.attrs["signature"] = json.dumps(SIGNATURE.to_dict())
        store.create_row_datasets(f, n=5, signature=SIGNATURE)
        f.create_dataset("cases", data=json.dumps([replace(RECORD, n_rows=10**6).to_dict()]))
    with pytest.raises(EmbedcacheError, match="c.h5: case A's rows 0..999999 overlap another case or lie beyond the 5"):
        store.open_cache(path)
