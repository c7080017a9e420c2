"""A tiny ViT backbone with seeded random weights, so encode tests run in seconds.

Registered as model ``tiny`` by the fixtures, and by ``python tests/tiny.py CHECKPOINT ARGS...``,
which runs the embedcache CLI in a subprocess with it (for the kill -9 test).
"""

from __future__ import annotations

import dataclasses
import sys
from contextlib import contextmanager
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
    """Register the tiny backbone as model ``tiny`` for the rest of the process (a subprocess's CLI)."""
    backbone = tiny_backbone(checkpoint)
    backbones.BACKBONES["tiny"] = backbone
    return backbone


@contextmanager
def registered(checkpoint: Path):
    """The tiny backbone as model ``tiny`` while the block runs; the registry as it was afterwards."""
    previous = backbones.BACKBONES.get("tiny")
    backbone = register(checkpoint)
    try:
        yield backbone
    finally:
        if previous is None:
            backbones.BACKBONES.pop("tiny", None)
        else:
            backbones.BACKBONES["tiny"] = previous


if __name__ == "__main__":
    register(Path(sys.argv[1]))
    from embedcache.cli import main

    main(sys.argv[2:])
