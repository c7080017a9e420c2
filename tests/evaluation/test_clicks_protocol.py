"""The clicks protocol with a real decoder: LiteMedSAM fine-tuned with clicks on the phantom."""

from __future__ import annotations

import shutil

import numpy as np
import torch

from embedcache.cache.encode import encode
from embedcache.cache.store import open_cache
from embedcache.config import EncodeConfig
from embedcache.evaluation import protocols
from embedcache.evaluation.metrics import dice
from embedcache.evaluation.score import CachedCase
from embedcache.io.datasets import discover_cases
from embedcache.io.volumes import read_label
from embedcache.model.clicks import corrective_click
from embedcache.model.prompts import box_from_mask, grow_box
from embedcache.synth.phantom import limit_target_slices
from embedcache.train.decoders import load_model, load_trained_decoder
from embedcache.train.finetune import finetune

from conftest import QUIET, finetune_config


def test_a_corrective_click_in_a_missed_region_raises_the_slice_dice_of_a_click_trained_decoder(phantom_dir, tmp_path):
    """A box that covers the left half of a gland (a walk's box from a too-small mask) misses the right half;
    the corrective click lands there, its slice's box grows to hold it, and the click-trained decoder's
    Dice on that slice rises."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    limit_target_slices(data, per_case=2)
    cache = tmp_path / "lite.h5"
    encode(discover_cases(data), cache, EncodeConfig(device="cpu", margin_slices=0), **QUIET)
    run = tmp_path / "run"
    finetune(finetune_config(cache, epochs=3, prompts="box+points", val_fraction=0.34), run, **QUIET)
    trained = load_trained_decoder(run)
    model = load_model("litemedsam", trained=trained, checkpoint=None, device=torch.device("cpu"), vanilla=False)
    rises = []
    with open_cache(cache) as opened:
        for record in opened.cases:
            cached = CachedCase(opened, record, device=torch.device("cpu"))
            segment = cached.segment_with(model.parts.prompt_encoder, model.decoder, input_size=256, slice_size=512)
            labels = read_label(record.label).array
            height, width = labels.shape[1:]
            for label in (7, 8):
                truth = labels == label
                for z in np.flatnonzero(truth.any(axis=(1, 2))):
                    x0, y0, x1, y1 = box_from_mask(truth[z])
                    half = (x0, y0, (x0 + x1) // 2, y1)
                    masks, iou = segment(np.array([z]), np.array([half], np.float32))
                    start = protocols.Prediction(np.zeros_like(truth), {int(z): half}, {int(z): float(iou[0])})
                    start.mask[z] = masks[0]
                    only = np.zeros_like(truth)
                    only[z] = truth[z]
                    # the most interior voxel of the largest missed region (the mask may also spill out of the box)
                    click = corrective_click(start.mask & only, only, record.spacing_mm)
                    assert click.positive and click.z == z
                    box = protocols.Box3D(int(z), int(z), grow_box((x0, y0, x1, y1), (4.0, 4.0), within=(0, 0, width, height)))
                    before = dice(start.mask[z], truth[z])
                    after = protocols.refine(start.copy(), box, click, segment, grow_px=(4.0, 4.0)).mask[z]
                    rises.append(dice(after, truth[z]) - before)
    assert len(rises) >= 6
    assert np.mean(rises) > 0.1 and np.mean(np.array(rises) > 0) >= 0.8, rises
