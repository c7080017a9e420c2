"""An optional trainable adapter on the cached image embedding, in front of the mask decoder.

Phase one stays valid: the cache still holds the frozen encoder's output, and the adapter learns
a residual correction of it, per slice, together with the decoder (``finetune --adapter``). A
bottleneck keeps it cheap beside the decoder's two-way transformer: 1×1 down to 64 channels, a
depthwise 3×3 (neighbouring patches: the 16-px context an adrenal limb needs), GELU, 1×1 back up
to 256, whose weights start at zero, so a new adapter is the identity and training starts from
the released decoder's answers. It lives inside the mask decoder module as ``adapter``, so its
weights are saved and loaded with the decoder's (``adapter.*`` keys).
"""

from __future__ import annotations

import torch
from torch import nn

#: Key prefix of the adapter's weights within a decoder state dict.
PREFIX = "adapter."


class EmbeddingAdapter(nn.Module):
    """``x + up(gelu(depthwise(down(x))))`` on ``(B, 256, 64, 64)`` embeddings; the identity at first."""

    def __init__(self, channels: int = 256, hidden: int = 64):
        super().__init__()
        self.down = nn.Conv2d(channels, hidden, 1)
        self.mix = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.up = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(nn.functional.gelu(self.mix(self.down(x))))


def attach_adapter(mask_decoder: nn.Module) -> nn.Module:
    """Give ``mask_decoder`` a new (identity) adapter; returns the decoder."""
    mask_decoder.add_module("adapter", EmbeddingAdapter())
    return mask_decoder


def has_adapter(state: dict) -> bool:
    """True for a decoder state dict trained with an adapter."""
    return any(key.startswith(PREFIX) for key in state)
