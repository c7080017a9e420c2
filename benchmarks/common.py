"""What every benchmark shares: the machine description saved with each figure, and weights for
backbones that ship none (random weights cost what real ones do)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from embedcache.backbones import Backbone

RESULTS = Path(__file__).resolve().parent / "results"


def machine(device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def weights_for(backbone: Backbone, folder: Path, given: Path | None = None) -> Path | None:
    """``given``, else None for a backbone with bundled weights, else a seeded random-weight file in ``folder``."""
    if given is not None or backbone.bundled_checkpoint is not None:
        return given
    torch.manual_seed(0)
    path = Path(folder) / f"{backbone.name}-random.pth"
    torch.save(backbone.build().state_dict(), path)
    return path
