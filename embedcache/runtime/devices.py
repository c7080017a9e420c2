"""Where the work runs: device choice and the CPU allocator setting both phases use."""

from __future__ import annotations

import sys

from embedcache.errors import EmbedcacheError


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EmbedcacheError(f"--device {name}: no CUDA device is visible to torch; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise EmbedcacheError(f"--device {name}: choose auto, cpu or cuda[:N]")
    return torch.device(name)


def keep_freed_memory() -> None:
    """Ask glibc to keep freed activation buffers instead of unmapping them after every layer.

    The encoder and the decoder's backward allocate and free tens of MiB per layer; with glibc's
    defaults each becomes an mmap/munmap pair and page faults, a large share of the encoder's CPU
    time (system time) and a smaller one of a decoder step.
    Process-wide; Linux/glibc only, elsewhere a no-op.
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 64 << 20)
