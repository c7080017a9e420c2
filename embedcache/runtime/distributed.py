"""torchrun's environment, or a single process: rank, world size, device and a barrier."""

from __future__ import annotations

import atexit
import os
from datetime import timedelta


def is_main_process() -> bool:
    """True in a plain process and in torchrun's rank 0, which speaks for all (read from ``RANK``, no torch)."""
    return int(os.environ.get("RANK", "0")) == 0


class Dist:
    """Reads ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` as torchrun sets them and joins the process group
    (NCCL on CUDA, gloo on CPU); a plain process is rank 0 of a world of 1."""

    def __init__(self, device_name: str):
        import torch
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self._dist = dist
        if self.world > 1 and not dist.is_initialized():
            use_cuda = device_name != "cpu" and torch.cuda.is_available()
            # A long timeout: ranks wait at a barrier while others finish their share of an encode.
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=24))
            # Left to the interpreter's exit, the group's threads were destroyed still running: a rank that had
            # finished its work aborted ("terminate called without an active exception") and torchrun failed.
            atexit.register(_destroy_group, dist)
            if use_cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                device_name = f"cuda:{torch.cuda.current_device()}"
            else:
                device_name = "cpu"
        self.device_name = device_name

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            self._dist.barrier()


def _destroy_group(dist) -> None:
    """Leave the process group before the interpreter exits (its threads stopped, not destroyed running)."""
    if dist.is_initialized():
        dist.destroy_process_group()
