"""A tiny ViT backbone with seeded random weights, so encode tests run in seconds.

Registered as model ``tiny`` by the fixtures, and by ``python tests/tiny.py CHECKPOINT ARGS...``,
which runs the embedcache CLI in a subprocess with it (for the kill -9 test).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from embedcache.model import backbones


def tiny_backbone(checkpoint: Path) -> backbones.Backbone:
    return dataclasses.replace(
        backbones.BACKBONES["vit_b"],
        name="tiny",
        description="test ViT: 2 blocks of width 32",
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(),  # windowed attention only: global attention over 4096 tokens is the slow part
        bundled_checkpoint=lambda: Path(checkpoint),
    )


def write_tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    parts = tiny_backbone(path).build()
    torch.save(parts.state_dict(), path)
    return path


def register(checkpoint: Path) -> backbones.Backbone:
    backbone = tiny_backbone(checkpoint)
    backbones.BACKBONES["tiny"] = backbone
    return backbone


if __name__ == "__main__":
    register(Path(sys.argv[1]))
    from embedcache.cli import main

    main(sys.argv[2:])
