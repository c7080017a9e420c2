"""Training data from the cache: prompts and batches on the device."""

from __future__ import annotations

import numpy as np
import torch

from embedcache.cache import store

from conftest import small_batch


def test_batches_hold_both_glands_of_a_slice_on_one_embedding(tiny_model, small_cache):
    batch, prompts = small_batch(tiny_model, small_cache)
    n = prompts.count(np.array([0, 1, 2]))
    assert batch.embeddings.shape == (n, 256, 64, 64) and batch.targets.shape == (n, 1, 256, 256)
    assert n > 3  # both glands on most mid-gland slices
    which, local = prompts.of_slices(np.array([0, 1, 2]))
    for i in range(n):
        torch.testing.assert_close(batch.embeddings[i], batch.embeddings[np.flatnonzero(local == local[i])[0]])
    # soft targets are the 2×2 area average of the full-resolution mask
    full = batch.masks.float()[:, None]
    torch.testing.assert_close(batch.targets, torch.nn.functional.avg_pool2d(full, 2))


def test_stop_prompts_ask_for_nothing_just_beyond_each_gland(tiny_model, small_cache):
    from embedcache.train.data import PromptIndex

    with store.open_cache(small_cache) as cache:
        rows = np.arange(len(cache))
        plain = PromptIndex.from_cache(cache, rows)
        stop = PromptIndex.from_cache(cache, rows, stop_prompts=True)
        z, case_of, masks = cache.slice_index[:], cache.case_index[:], cache.masks[:]
        present = cache.present()
    assert len(plain.rows) == int(present.any(axis=1).sum())  # margin slices have no prompt of their own
    extra = len(stop.boxes) - len(plain.boxes)
    assert extra == 3 * 2 * 2  # 3 cases, 2 glands, one slice below and one above each
    for i in range(len(stop.boxes)):
        row, label = stop.rows[stop.slice_of[i]], (7, 8)[stop.slot[i]]
        if not present[row, stop.slot[i]]:  # a stop prompt: its slice lacks the gland, a neighbour has it
            assert not (masks[row] == label).any()
            neighbours = [r for r in range(len(z)) if case_of[r] == case_of[row] and abs(int(z[r]) - int(z[row])) == 1]
            assert any(present[r, stop.slot[i]] for r in neighbours)


def _independent_boxes(cache):
    """Per (case, z, slot): the tight box of that label's cached mask, straight from the masks."""
    from embedcache.model.prompts import box_from_mask

    z, case_of, masks = cache.slice_index[:], cache.case_index[:], cache.masks[:]
    found = {}
    for row in range(len(z)):
        for slot, label in enumerate(cache.labels):
            box = box_from_mask(masks[row] == label)
            if box is not None:
                found[int(case_of[row]), int(z[row]), slot] = box
    return found, z, case_of


def test_loose_prompts_are_the_glands_3d_extent_grown_by_the_drawn_margin(tiny_model, small_cache):
    from embedcache.train.data import PromptIndex, draw_boxes

    with store.open_cache(small_cache) as cache:
        rows = np.arange(len(cache))
        prompts = PromptIndex.from_cache(cache, rows)
        truth, z, case_of = _independent_boxes(cache)
        size = cache.signature.slice_size
        spacing = {i: c.spacing_mm for i, c in enumerate(cache.cases)}
        shapes = {i: c.shape_zyx for i, c in enumerate(cache.cases)}
    which = np.arange(len(prompts.boxes))
    wider = 0
    for margin in (0.0, 4.0):
        loose = draw_boxes(prompts, which, mix={"loose": 1.0}, rng=np.random.default_rng(0), jitter=0.0,
                           loose_margin_mm=margin, grow_mm=3.0, limit=float(size))
        drawn = np.random.default_rng(0).uniform(0.0, margin, size=(len(which), 1))[:, 0]
        for i in which:
            row = prompts.rows[prompts.slice_of[i]]
            case, slot = int(case_of[row]), int(prompts.slot[i])
            boxes = np.array([b for (c, _, s), b in truth.items() if c == case and s == slot])
            extent = np.concatenate([boxes[:, :2].min(0), boxes[:, 2:].max(0)])
            assert len(boxes) >= 2
            wider += not np.array_equal(extent, truth[case, int(z[row]), slot])
            # the margin in mm, converted with the slice's own pixel size along x and y
            px = np.array([size / (spacing[case][2] * shapes[case][2]), size / (spacing[case][1] * shapes[case][1])])
            want = np.clip(extent + drawn[i] * np.concatenate([-px, px]), 0, size)
            np.testing.assert_allclose(loose[i], want, atol=1e-4)
    assert wider > 0  # on some slices the 3-D extent is wider than the slice's own box


def test_propagated_prompts_are_a_neighbours_mask_box_grown_by_grow_mm(tiny_model, small_cache):
    from embedcache.model.prompts import grow_box
    from embedcache.train.data import PromptIndex, draw_boxes

    with store.open_cache(small_cache) as cache:
        prompts = PromptIndex.from_cache(cache, np.arange(len(cache)))
        truth, z, case_of = _independent_boxes(cache)
        size = cache.signature.slice_size
        px_of = [(size / (c.spacing_mm[2] * c.shape_zyx[2]), size / (c.spacing_mm[1] * c.shape_zyx[1])) for c in cache.cases]
    which = np.arange(len(prompts.boxes))
    grown = draw_boxes(prompts, which, mix={"propagated": 1.0}, rng=np.random.default_rng(1), jitter=0.0,
                       loose_margin_mm=10.0, grow_mm=3.0, limit=float(size))
    margin = np.random.default_rng(1).uniform(0.0, 10.0, size=(len(which), 1))[:, 0]  # the loose box it stays inside
    differs = 0
    for i in which:
        row = prompts.rows[prompts.slice_of[i]]
        key = int(case_of[row]), int(z[row]), int(prompts.slot[i])
        sources = [truth[(key[0], key[1] + step, key[2])] for step in (-1, 1) if (key[0], key[1] + step, key[2]) in truth]
        assert len(sources) == 1  # two target slices per case: one neighbour each
        px = px_of[key[0]]
        boxes = np.array([b for (c, _, s), b in truth.items() if c == key[0] and s == key[2]])
        loose = grow_box(np.concatenate([boxes[:, :2].min(0), boxes[:, 2:].max(0)]), (margin[i] * px[0], margin[i] * px[1]),
                         within=(0, 0, size, size))
        want = grow_box(sources[0], (3.0 * px[0], 3.0 * px[1]), within=loose)
        np.testing.assert_allclose(grown[i], want, atol=1e-4)
        differs += not np.array_equal(sources[0], prompts.boxes[i])
    assert differs > 0  # some neighbours' boxes are not the slice's own: the test tells them apart


def test_medsam_prompts_move_every_edge_outward_by_at_most_20_px_at_1024(tiny_model, small_cache):
    from embedcache.train.data import PromptIndex, draw_boxes

    with store.open_cache(small_cache) as cache:
        prompts = PromptIndex.from_cache(cache, np.arange(len(cache)))
        size = cache.signature.slice_size
    which = np.arange(len(prompts.boxes))
    boxes = draw_boxes(prompts, which, mix={"medsam": 1.0}, rng=np.random.default_rng(2), jitter=0.0,
                       loose_margin_mm=0.0, grow_mm=0.0, limit=float(size))
    outward = (boxes - prompts.boxes[which]) * np.array([-1, -1, 1, 1])
    clipped = (boxes == 0) | (boxes == size)
    assert (outward[~clipped] > 0).all() and (outward <= 20 * size / 1024 + 1e-4).all()


def test_a_prompt_mix_draws_each_kind_by_its_weight(tiny_model, small_cache):
    from embedcache.train.data import PromptIndex, draw_boxes

    with store.open_cache(small_cache) as cache:
        prompts = PromptIndex.from_cache(cache, np.arange(len(cache)))
        size = float(cache.signature.slice_size)
    which = np.repeat(np.arange(len(prompts.boxes)), 200)
    boxes = draw_boxes(prompts, which, mix={"tight": 0.75, "loose": 0.25}, rng=np.random.default_rng(3), jitter=0.0,
                       loose_margin_mm=5.0, grow_mm=0.0, limit=size)
    tight = (boxes == prompts.boxes[which]).all(axis=1)
    assert 0.7 < tight.mean() < 0.8


def test_point_modes_draw_counts_and_boxes_as_they_say_and_leave_the_boxes_drawn_as_without_points(tiny_model,
                                                                                                  small_cache):
    from embedcache.config import FinetuneConfig
    from embedcache.runtime.distributed import Dist
    from embedcache.train.data import PromptIndex, case_sets, draw_clicks
    from embedcache.train.loop import _training_plan

    with store.open_cache(small_cache) as cache:
        prompts = PromptIndex.from_cache(cache, np.arange(len(cache)), stop_prompts=True)
        train = case_sets(cache, {"t": [c.name for c in cache.cases]}, box_scale=tiny_model.box_scale(512),
                          device=torch.device("cpu"), resident="device", stop_prompts=("t",))["t"]
    which = np.repeat(np.arange(len(prompts.boxes)), 300)
    rng = np.random.default_rng(0)
    count, box, seeds = draw_clicks(prompts, which, mode="box", max_points=5, rng=rng)
    assert not count.any() and box.all()
    count, box, _ = draw_clicks(prompts, which, mode="box+points", max_points=5, rng=rng)
    assert box.all() and set(count.tolist()) == set(range(6))
    count, box, seeds = draw_clicks(prompts, which, mode="mixed", max_points=3, rng=rng)
    stop = prompts.stop[which]
    assert set(count[~box].tolist()) == {1, 2, 3} and not (~box & stop).any()  # nothing to click on a stop prompt
    assert 0.25 < (~box[~stop]).mean() < 0.42 and 0.25 < (count[box] == 0).mean() < 0.6
    assert seeds.min() >= 0 and seeds.max() < 2**16
    slices = np.arange(len(train))
    plans = {mode: _training_plan(slices, 123, train, FinetuneConfig(prompts=mode), Dist("cpu"))
             for mode in ("box", "box+points")}
    np.testing.assert_array_equal(plans["box"].boxes, plans["box+points"].boxes)
    assert plans["box"].clicks is None and len(plans["box+points"].clicks[0]) == len(plans["box+points"].boxes)
