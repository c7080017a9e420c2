"""Frozen settings for each phase, saved beside every output so a result says what made it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from embedcache import LEFT_ADRENAL, RIGHT_ADRENAL


@dataclass(frozen=True)
class PreprocessConfig:
    """CT window (HU) and the square slice size (px) every slice is resampled to."""

    window_width_hu: float = 350.0
    window_level_hu: float = 50.0
    slice_size: int = 512

    def __post_init__(self):
        if self.window_width_hu <= 0:
            raise ValueError(f"window width must be positive, got {self.window_width_hu} HU")
        if not 64 <= self.slice_size <= 2048:
            raise ValueError(f"slice size must lie in 64..2048 px, got {self.slice_size}")


@dataclass(frozen=True)
class EncodeConfig:
    """Settings of phase one. ``checkpoint=None`` means the backbone's bundled weights."""

    backbone: str = "litemedsam"
    checkpoint: str | None = None
    labels: tuple[int, ...] = (RIGHT_ADRENAL, LEFT_ADRENAL)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    embedding_dtype: str = "float16"
    device: str = "auto"
    batch_size: int = 0  # 0: pick for the device (1 on CPU, where larger batches are slower; 16 on CUDA)

    def __post_init__(self):
        if self.embedding_dtype not in ("float16", "float32"):
            raise ValueError(f"embedding dtype must be float16 or float32, got {self.embedding_dtype}")
        if self.batch_size < 0:
            raise ValueError(f"batch size must be at least 1 (or 0 for automatic), got {self.batch_size}")
        if not self.labels or any(not 0 < label < 256 for label in self.labels) or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct ids in 1..255, got {self.labels}")


def to_json(config) -> str:
    return json.dumps(asdict(config), indent=2, sort_keys=True)


def save_config(config, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(to_json(config) + "\n")
    tmp.replace(path)
