"""Which case is in which set: the seeded split, split files, test cases held out of training."""

from __future__ import annotations

import json

import pytest

from embedcache.cache import store
from embedcache.cache.merge import merge
from embedcache.errors import EmbedcacheError
from embedcache.train.cases import split_cases
from embedcache.train.finetune import finetune

from conftest import QUIET, finetune_config


def test_split_is_by_case_seeded_and_disjoint():
    names = [f"c{i}" for i in range(10)]
    train_a, val_a = split_cases(names, val_fraction=0.2, seed=1)
    assert split_cases(names, val_fraction=0.2, seed=1) == (train_a, val_a)
    assert len(val_a) == 2 and not set(train_a) & set(val_a) and sorted(train_a + val_a) == names
    assert split_cases(names, val_fraction=0.2, seed=2) != (train_a, val_a)
    assert split_cases(["a", "b"], val_fraction=0.9, seed=0)[0]  # at least one training case
    with pytest.raises(EmbedcacheError, match="needs at least 2"):
        split_cases(["only"], val_fraction=0.2, seed=0)


def test_a_cache_of_one_case_cannot_be_split(tiny_model, small_cache, tmp_path):
    with store.open_cache(small_cache) as cache:
        first = cache.cases[0]
        sig = cache.signature
    one = tmp_path / "one.h5"
    merge(one, signature=sig, sources=[(small_cache, [first])])
    with pytest.raises(EmbedcacheError, match="holds 1 case"):
        finetune(finetune_config(one), tmp_path / "run", **QUIET)


def test_test_cases_stay_out_of_training_and_a_split_file_fixes_the_sets(tiny_model, small_cache, tmp_path):
    from dataclasses import replace

    with store.open_cache(small_cache) as cache:
        records, signature = cache.cases, cache.signature
    names = [r.name for r in records]
    held = tmp_path / "held.h5"
    merge(held, signature=signature, sources=[(small_cache, [replace(r, subset="test") if r.name == names[2] else r
                                                                   for r in records])])
    finetune(finetune_config(held, epochs=1, val_fraction=0.5), tmp_path / "auto", **QUIET)
    split = json.loads((tmp_path / "auto" / "split.json").read_text())
    assert split["test"] == [names[2]] and sorted(split["train"] + split["val"]) == names[:2]

    (tmp_path / "split.json").write_text(json.dumps({"train": [names[1]], "val": [names[0]], "test": [names[2]]}))
    finetune(finetune_config(held, epochs=1, split=str(tmp_path / "split.json")), tmp_path / "fixed", **QUIET)
    split = json.loads((tmp_path / "fixed" / "split.json").read_text())
    assert (split["train"], split["val"], split["test"]) == ([names[1]], [names[0]], [names[2]])
    # a run's own split.json (it also records seed and split file) splits another run the same way
    finetune(finetune_config(held, epochs=1, split=str(tmp_path / "fixed" / "split.json")), tmp_path / "again", **QUIET)
    again = json.loads((tmp_path / "again" / "split.json").read_text())
    assert (again["train"], again["val"], again["test"]) == (split["train"], split["val"], split["test"])

    bad = {"unknown": ({"train": ["NOPE"], "val": [names[0]]}, "case NOPE \\(train\\) is not in"),
           "twice": ({"train": [names[0]], "val": [names[0]]}, f"case {names[0]} is in both train and val"),
           "test": ({"train": [names[2]], "val": [names[0]]}, f"case {names[2]} is a test case of the cache"),
           "folds": ([{"train": [], "val": []}] * 5, "holds 5 folds"),
           "extra": ({"train": [names[1]], "val": [names[0]], "fold": 3}, "expected")}
    for key, (content, match) in bad.items():
        (tmp_path / f"{key}.json").write_text(json.dumps(content))
        with pytest.raises(EmbedcacheError, match=match):
            finetune(finetune_config(held, split=str(tmp_path / f"{key}.json")), tmp_path / f"run-{key}", **QUIET)
        assert not (tmp_path / f"run-{key}").exists()


def test_a_zoom_caches_split_keeps_each_patients_slices_and_glands_together_and_may_name_the_source_cases(
        tiny_model, small_zoom_cache, tmp_path):
    import json

    from embedcache.cache.store import open_cache
    from embedcache.train.cases import choose_split, glands_of, load_split, view_split

    with open_cache(small_zoom_cache) as cache:
        glands = glands_of(cache)
        sources = ["PHANTOM_0001", "PHANTOM_0002", "PHANTOM_0003"]
        assert sorted(glands) == sources
        assert all(members == [f"{source}@7", f"{source}@8"] for source, members in glands.items())
        split = choose_split(cache, split_file=None, val_fraction=0.34, seed=0)
        train = {n.rsplit("@", 1)[0] for n in split.train}
        val = {n.rsplit("@", 1)[0] for n in split.val}
        assert train and val and not train & val  # no patient on both sides
        assert sorted(split.train + split.val) == sorted([*sources, *(g for m in glands.values() for g in m)])
        assert all(s in split.train + split.val for s in sources)  # its whole slices go where its glands go
        whole, regions = view_split(split, cache, "whole"), view_split(split, cache, "regions")
        assert sorted(whole.train + whole.val) == sources and not any("@" in n for n in whole.val)
        assert {n.rsplit("@", 1)[0] for n in regions.val} == set(whole.val) and all("@" in n for n in regions.train)
        path = tmp_path / "split.json"  # the whole-slice run's split, by source case
        path.write_text(json.dumps({"train": ["PHANTOM_0001", "PHANTOM_0002@8"], "val": ["PHANTOM_0003"]}))
        loaded = load_split(path, cache)
        assert loaded.train == ("PHANTOM_0001", "PHANTOM_0001@7", "PHANTOM_0001@8", "PHANTOM_0002@8")
        assert loaded.val == ("PHANTOM_0003", "PHANTOM_0003@7", "PHANTOM_0003@8")
        with pytest.raises(EmbedcacheError, match="the split's train cases hold no whole"):
            view_split(loaded.__class__(("PHANTOM_0002@8",), loaded.val), cache, "whole")
