"""encode --augment: training-only copies, their geometry, and that they never validate, test or score."""

from __future__ import annotations

import numpy as np
import pytest

from embedcache.cache import store
from embedcache.cache.augment import augment_slices, source_of
from embedcache.errors import UsageError
from embedcache.io import labels as labels_of
from embedcache.synth.phantom import limit_target_slices, write_phantom

import tiny
from conftest import SMALL_PHANTOM, finetune_config


def _slices(right=7, left=8, other=None):
    hu = np.full((2, 40, 60), -100.0, np.float32)
    labels = np.zeros((2, 40, 60), np.uint8)
    labels[:, 10:15, 5:12] = right  # right adrenal on the image's left (canonical x grows to the patient's left)
    labels[:, 20:30, 40:44] = left
    if other is not None:
        labels[:, 30:36, 25:35] = other  # an unpaired organ across the middle
    hu[labels > 0] = 30.0
    return hu, labels


@pytest.mark.parametrize("preset, right, left, unpaired", [("flare22", 7, 8, 4), ("totalsegmentator", 8, 9, 7),
                                                          ("amos", 11, 12, 10), ("btcv", 12, 13, 11)])
def test_a_flip_mirrors_left_right_and_swaps_the_glands_labels_of_the_data_sets_own_ids(preset, right, left, unpaired):
    """Each convention's right adrenal becomes its left one on the mirrored side; its pancreas keeps its id
    (in TotalSegmentator's ids 7 is the pancreas, which a FLARE22 table would have turned into 8)."""
    label_map = labels_of.preset(preset)
    hu, labels = _slices(right, left, unpaired)
    flipped_hu, flipped = augment_slices(hu, labels, "CASE~flip", mirrored=label_map.mirrored((right, left)))
    np.testing.assert_array_equal(flipped_hu, hu[..., ::-1])
    np.testing.assert_array_equal(flipped == left, (labels == right)[..., ::-1])  # the gland that was right is left
    np.testing.assert_array_equal(flipped == right, (labels == left)[..., ::-1])
    np.testing.assert_array_equal(flipped == unpaired, (labels == unpaired)[..., ::-1])
    assert set(np.unique(flipped)) == set(np.unique(labels))


def test_flip_is_refused_where_a_target_has_no_known_side_or_partner():
    from embedcache.config import EncodeConfig

    word = labels_of.preset("word")  # one adrenal class for both glands: it keeps its id
    assert word.mirrored((12,)) == {3: 4, 4: 3}
    custom = labels_of.from_names({1: "adrenal_gland_right", 2: "lesion"}, "dataset.json")
    with pytest.raises(UsageError, match="label 1 .*right adrenal.* no left partner"):
        EncodeConfig(labels=(1,), augment=("flip",), label_map=custom)
    with pytest.raises(UsageError, match="label 2 .*lesion.* whose side is known"):
        EncodeConfig(labels=(2,), augment=("flip",), label_map=custom)
    EncodeConfig(labels=(1,), augment=("rotate",), label_map=custom)  # only flips need sides


def test_rotation_scale_and_intensity_are_seeded_by_the_copys_name_and_keep_the_anatomy():
    hu, labels = _slices()
    for kind in ("rotate", "scale"):
        a_hu, a = augment_slices(hu, labels, f"CASE~{kind}")
        again_hu, again = augment_slices(hu, labels, f"CASE~{kind}")
        _, other = augment_slices(hu, labels, f"OTHER~{kind}")
        np.testing.assert_array_equal(a, again)
        np.testing.assert_array_equal(a_hu, again_hu)
        assert not np.array_equal(a, labels) and not np.array_equal(a, other)
        for label in (7, 8):  # moved, not lost: area within the zoom's square and a pixel's rounding
            assert 0.6 < (a == label).sum() / (labels == label).sum() < 1.5
        assert a_hu[0, 0, 0] == -1000.0 or kind == "rotate"  # air comes in where the zoom leaves the source
    shifted, same = augment_slices(hu, labels, "CASE~intensity")
    np.testing.assert_array_equal(same, labels)
    gain_offset = np.polyfit(hu.ravel(), shifted.ravel(), 1)
    assert 0.9 <= gain_offset[0] <= 1.1 and -30 <= gain_offset[1] <= 30 and not np.allclose(shifted, hu)


@pytest.fixture(scope="module")
def augmented_cache(tmp_path_factory, tiny_checkpoint):
    """Three train cases and one test case, with flipped copies: a tiny-backbone cache."""
    from embedcache.cache.encode import encode
    from embedcache.config import EncodeConfig
    from embedcache.io.datasets import discover_cases

    root = tmp_path_factory.mktemp("augmented")
    write_phantom(root / "data", cases=3, test_cases=1, seed=5, config=SMALL_PHANTOM)
    limit_target_slices(root / "data", per_case=2)
    with tiny.registered(tiny_checkpoint):
        encode(discover_cases(root / "data"), root / "cache.h5",
               EncodeConfig(backbone="tiny", device="cpu", augment=("flip",), margin_slices=0), progress=None)
    return root / "cache.h5"


def test_encode_adds_a_flipped_copy_of_every_training_case_and_none_of_a_test_case(augmented_cache, tiny_model):
    with store.open_cache(augmented_cache) as cache:
        by_name = {c.name: c for c in cache.cases}
        copies = [c for c in cache.cases if c.subset == "augment"]
        # each training case's whole slices are copied; its glands' regions (encode's default --zoom) are not
        assert sorted(c.name for c in copies) == sorted(f"{c.name}~flip" for c in cache.cases
                                                        if c.subset == "train" and c.region is None)
        assert any(c.region for c in cache.cases) and not any(c.region for c in copies)
        assert all(by_name[source_of(c.name)[0]].subset == "train" for c in copies)
        for copy in copies:
            source = by_name[source_of(copy.name)[0]]
            assert copy.n_rows == source.n_rows and copy.image == source.image
            mine, theirs = cache.masks[copy.rows], cache.masks[source.rows]
            np.testing.assert_array_equal(mine == 8, (theirs == 7)[..., ::-1])
            np.testing.assert_array_equal(mine == 7, (theirs == 8)[..., ::-1])
            assert not np.array_equal(cache.embeddings[copy.rows], cache.embeddings[source.rows])


def test_augmented_rows_train_with_their_source_and_never_reach_validation_test_or_score(augmented_cache, tiny_model,
                                                                                         tmp_path):
    from embedcache.config import ScoreConfig
    from embedcache.evaluation.score import score
    from embedcache.train.checkpoint import load_checkpoint
    from embedcache.train.finetune import finetune
    from embedcache.train.runs import LAST

    result = finetune(finetune_config(augmented_cache, epochs=1, val_fraction=0.34), tmp_path / "run")
    seen = load_checkpoint(result.run_dir / LAST).data  # what each set was built from
    split = (tmp_path / "run" / "split.json").read_text()
    assert "~" not in split  # the split names source cases only
    assert all("~" not in name for name in seen["val"]) and len(seen["val"]) == 1
    train_sources = [n for n in seen["train"] if "~" not in n]
    assert sorted(n for n in seen["train"] if "~" in n) == sorted(f"{n}~flip" for n in train_sources)
    assert f"{seen['val'] and next(iter(seen['val']))}~flip" not in seen["train"]  # the val case's copy: nowhere
    for cases in ("test", "val", "all"):
        report = score(ScoreConfig(cache=str(augmented_cache), run=str(result.run_dir), cases=cases, prompts=("oracle",),
                                   device="cpu"), tmp_path / f"r-{cases}")
        assert report.case_names and not any("~" in n for n in report.case_names)


def test_a_split_file_naming_an_augmented_copy_is_refused(augmented_cache, tiny_model, tmp_path):
    import json

    from embedcache.errors import EmbedcacheError
    from embedcache.train.cases import load_split

    with store.open_cache(augmented_cache) as cache:
        names = [c.name for c in cache.cases if c.subset == "train" and c.region is None]
        (tmp_path / "split.json").write_text(json.dumps({"train": names[:1], "val": [f"{names[1]}~flip"]}))
        with pytest.raises(EmbedcacheError, match="is an augmented copy"):
            load_split(tmp_path / "split.json", cache)


def test_an_unknown_augmentation_is_one_line():
    from embedcache.config import EncodeConfig

    with pytest.raises(UsageError, match="--augment spin: choose distinct kinds from flip, rotate, scale, intensity"):
        EncodeConfig(augment=("spin",))
