"""A run folder: its split, its settings and what may change when it resumes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from embedcache.cache import store
from embedcache.cache.merge import merge
from embedcache.config import FinetuneConfig
from embedcache.errors import EmbedcacheError, UsageError
from embedcache.train.cases import Split
from embedcache.train.finetune import finetune
from embedcache.train.runs import RunFolder, resumed_config

from conftest import QUIET, finetune_config


def test_resume_refuses_another_cache_and_restarts_a_run_without_checkpoint(tiny_model, small_cache, tmp_path, notes):
    run = tmp_path / "run"
    finetune(finetune_config(small_cache, epochs=1), run, **QUIET)
    with store.open_cache(small_cache) as cache:
        records, signature = cache.cases, cache.signature
    other = tmp_path / "other.h5"
    merge(other, signature=signature, sources=[(small_cache, records[::-1][:2])])
    with pytest.raises(EmbedcacheError, match="other.h5: not the data the run in .* was trained on"):
        finetune(finetune_config(other, epochs=2), run, resume=True, **QUIET)

    # A folder whose first checkpoint was never written: --resume starts the run again.
    (run / "last.safetensors").unlink()
    (run / "decoder.safetensors").unlink()
    result = finetune(finetune_config(small_cache, epochs=1), run, resume=True, progress=None)
    assert [r.epoch for r in result.history] == [1] and any("no checkpoint yet" in n for n in notes)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(EmbedcacheError, match="not a run folder \\(it holds thesis.tex\\)"):
        finetune(finetune_config(small_cache, epochs=1), tmp_path / "mine", resume=True, **QUIET)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"
def test_resume_takes_only_the_resumable_settings_from_a_library_call(tmp_path):
    saved = FinetuneConfig(cache="a.h5", epochs=2, lr=1e-4, seed=3)
    resumed = resumed_config(replace(saved, epochs=5, cache="b.h5", patience=2), saved, path=tmp_path / "config.json")
    assert resumed == replace(saved, epochs=5, cache="b.h5", patience=2)
    with pytest.raises(UsageError, match=r"^--lr 0.001 differs from the run's 0.0001 \(.*config.json\); --resume"):
        resumed_config(replace(saved, lr=1e-3), saved, path=tmp_path / "config.json")
    # from the command line only the options typed count: an untyped default never contradicts the run
    typed = resumed_config(replace(saved, lr=1e-3, epochs=9), saved, path=tmp_path / "c", given_fields={"epochs"})
    assert typed == replace(saved, epochs=9)
    with pytest.raises(UsageError, match="--stop-grow-mm 5.0 differs"):
        resumed_config(replace(saved, stop_grow_mm=5.0), saved, path=tmp_path / "c", given_fields={"stop_grow_mm"})


def test_a_run_folder_keeps_its_split_with_the_seed_that_made_it(tmp_path):
    run = RunFolder(tmp_path / "run")
    config = FinetuneConfig(cache="a.h5", seed=4, split="/x/split.json")
    run.create(config, Split(("a", "b"), ("c",), ("d",)))
    assert run.split() == Split(("a", "b"), ("c",), ("d",)) and run.config() == config
    saved = json.loads((tmp_path / "run" / "split.json").read_text())
    assert saved == {"train": ["a", "b"], "val": ["c"], "test": ["d"], "seed": 4, "split_file": "/x/split.json"}
    (tmp_path / "run" / "split.json").write_text(json.dumps({"train": ["a"], "val": ["c"]}))  # an older run's
    assert run.split().test is None
