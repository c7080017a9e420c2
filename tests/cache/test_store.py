"""The HDF5 store alone: shards, merging, reopening, signature checks; no encoder involved."""

from __future__ import annotations

import dataclasses
import json

import h5py
import numpy as np
import pytest

from embedcache.cache import store
from embedcache.cache.merge import merge
from embedcache.cache.records import DECODER_KEYS, CaseRecord, Signature
from embedcache.config import PreprocessConfig
from embedcache.errors import CacheMismatchError, EmbedcacheError

SIZE = 64  # slice size: small masks keep these tests fast


def _signature(**changes) -> Signature:
    sig = Signature(backbone="tiny", checkpoint_sha256="ab" * 32, input_size=1024,
                    preprocess=PreprocessConfig(window_width_hu=350.0, window_level_hu=50.0, slice_size=SIZE),
                    labels=(7, 8), embedding_dtype="float16")
    return dataclasses.replace(sig, **changes)


def _record(name: str, n: int) -> CaseRecord:
    return CaseRecord(name=name, image=f"{name}_0000.nii.gz", label=f"{name}.nii.gz", digest=name * 2,
                      first_row=0, n_rows=n, shape_zyx=(20, SIZE, SIZE), spacing_mm=(2.5, 0.8, 0.8),
                      source_shape=(SIZE, SIZE, 20), source_affine=tuple(tuple(r) for r in np.eye(4)))


def _rows(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    boxes = np.full((n, 2, 4), np.nan, np.float32)
    boxes[:, 0] = [10, 12, 20, 30]
    boxes[::2, 1] = [30, 32, 40, 44]  # the left gland on every other slice only
    return dict(embeddings=rng.standard_normal((n, 256, 64, 64)).astype(np.float16),
                masks=rng.integers(0, 3, (n, SIZE, SIZE)).astype(np.uint8), boxes=boxes,
                slice_index=np.arange(n) + 5 * seed, spacing_mm=np.tile(np.float32([2.5, 0.8, 0.8]), (n, 1)))


def _shard(folder, name, n, seed, signature=None):
    writer = store.ShardWriter(folder, signature=signature or _signature(), case=_record(name, n))
    rows = _rows(n, seed)
    writer.write(**{k: v[:1] for k, v in rows.items()})  # in two parts, as encode batches do
    writer.write(**{k: v[1:] for k, v in rows.items()})
    return writer.finish(), rows


def test_a_shard_appears_only_when_its_case_is_complete(tmp_path):
    writer = store.ShardWriter(tmp_path, signature=_signature(), case=_record("A", 3))
    writer.write(**{k: v[:2] for k, v in _rows(3, 0).items()})
    assert not writer.complete and not (tmp_path / "A.h5").exists()
    with pytest.raises(RuntimeError, match="2 of 3 rows"):
        writer.finish()
    writer.abort()
    assert list(tmp_path.iterdir()) == []  # no partial file left


def test_merge_keeps_case_order_rows_and_offsets(tmp_path):
    a, rows_a = _shard(tmp_path, "A", 3, 1)
    b, rows_b = _shard(tmp_path, "B", 2, 2)
    records = merge(tmp_path / "c.h5", signature=_signature(),
                          sources=[(b, [store.read_shard(b)[1]]), (a, [store.read_shard(a)[1]])])
    assert [(r.name, r.first_row, r.n_rows) for r in records] == [("B", 0, 2), ("A", 2, 3)]
    with store.open_cache(tmp_path / "c.h5", expect=_signature()) as cache:
        assert len(cache) == 5 and [c.name for c in cache.cases] == ["B", "A"]
        case = cache.case("A")
        np.testing.assert_array_equal(case.row_index, [2, 3, 4])
        np.testing.assert_array_equal(cache.embeddings[case.rows], rows_a["embeddings"])
        np.testing.assert_array_equal(cache.masks[case.rows], rows_a["masks"])
        np.testing.assert_array_equal(cache.slice_index[:2], rows_b["slice_index"])
        np.testing.assert_array_equal(cache.case_index[:], [0, 0, 1, 1, 1])
        np.testing.assert_array_equal(cache.present(case.rows), [[True, True], [True, False], [True, True]])
        assert cache.present().shape == (5, 2)
    # merging again from the merged file itself (as a rerun of encode does) gives the same rows
    with store.open_cache(tmp_path / "c.h5") as cache:
        cases = cache.cases
    merge(tmp_path / "d.h5", signature=_signature(), sources=[(tmp_path / "c.h5", cases[::-1])])
    with store.open_cache(tmp_path / "d.h5") as d:
        np.testing.assert_array_equal(d.embeddings[d.case("A").rows], rows_a["embeddings"])
    assert not list(tmp_path.glob("*.partial"))


def test_an_interrupted_merge_leaves_the_old_cache(tmp_path, monkeypatch):
    a, _ = _shard(tmp_path, "A", 2, 1)
    out = tmp_path / "c.h5"
    merge(out, signature=_signature(), sources=[(a, [store.read_shard(a)[1]])])
    before = out.read_bytes()

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "commit", broken)
    with pytest.raises(KeyboardInterrupt):
        merge(out, signature=_signature(), sources=[(a, [store.read_shard(a)[1]])] * 2)
    assert out.read_bytes() == before and not list(tmp_path.glob("*.partial"))


def test_signature_checks_name_the_field(tmp_path, notes):
    a, _ = _shard(tmp_path, "A", 2, 1)
    merge(tmp_path / "c.h5", signature=_signature(), sources=[(a, [store.read_shard(a)[1]])])
    for field, value in (("backbone", "vit_b"), ("checkpoint_sha256", "cd" * 32), ("labels", [7]),
                         ("embedding_dtype", "float32")):
        with pytest.raises(CacheMismatchError, match=f"c.h5: cache was made with {field}="):
            store.open_cache(tmp_path / "c.h5", expect=_signature(**{field: value}))
    store.open_cache(tmp_path / "c.h5", expect=_signature(embedcache_version="9.9")).close()
    assert any("c.h5: written by embedcache" in n for n in notes), notes
    assert _signature().difference(_signature(), DECODER_KEYS) is None
    assert _signature(labels=(7,)).difference(_signature(), DECODER_KEYS) == "labels=[7], not [7, 8]"


def test_unreadable_caches_are_named(tmp_path):
    with pytest.raises(EmbedcacheError, match="none.h5: no such cache file"):
        store.open_cache(tmp_path / "none.h5")
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.attrs["signature"] = json.dumps(_signature().to_dict())
    with pytest.raises(EmbedcacheError, match="empty.h5: not a readable embedcache cache"):
        store.open_cache(tmp_path / "empty.h5")


def test_merge_copies_stored_chunks_and_decodes_where_layouts_differ(tmp_path):
    a, rows_a = _shard(tmp_path, "A", 3, 1)
    with h5py.File(a, "r+") as f:  # as an older layout would be: masks plain, embeddings in one chunk
        for name, chunks in (("masks", None), ("embeddings", (3, 256, 64, 64))):
            data = f[name][:]
            del f[name]
            f.create_dataset(name, data=data, chunks=chunks)
    b, rows_b = _shard(tmp_path, "B", 2, 2)
    sources = [(a, [store.read_shard(a)[1]]), (b, [store.read_shard(b)[1]])]
    merge(tmp_path / "c.h5", signature=_signature(), sources=sources)
    with store.open_cache(tmp_path / "c.h5") as cache:
        for name in ("embeddings", "masks"):
            np.testing.assert_array_equal(cache.read(name, slice(0, 3)), rows_a[name])
            np.testing.assert_array_equal(cache.read(name, slice(3, 5)), rows_b[name])
        assert cache.embeddings.chunks == (1, 256, 64, 64) and cache.embeddings.fletcher32 and cache.masks.fletcher32


def test_a_shard_damaged_after_it_was_written_is_caught_when_the_merged_cache_is_read(tmp_path):
    """The merge copies stored chunks without decoding them, so the damage travels, checksum and all."""
    a, _ = _shard(tmp_path, "A", 3, 1)
    with h5py.File(a, "r") as f:
        offset = f["embeddings"].id.get_chunk_info(1).byte_offset
    with open(a, "r+b") as handle:  # one flipped byte inside row 1's embedding
        handle.seek(offset + 1000)
        byte = handle.read(1)
        handle.seek(offset + 1000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    merge(tmp_path / "c.h5", signature=_signature(), sources=[(a, [store.read_shard(a)[1]])])
    with store.open_cache(tmp_path / "c.h5") as cache:
        cache.read("embeddings", slice(0, 1))
        with pytest.raises(EmbedcacheError, match=r"c.h5: embeddings of rows \[1\] cannot be read .* encode it again"):
            cache.read("embeddings", slice(0, 3))
