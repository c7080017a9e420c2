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
