"""Pure array functions: CT window, normalization, slice resampling and its exact inverse for masks.

Slices are ``(y, x)`` or batches ``(n, y, x)``; HU in, ``[0, 1]`` float32 out. Resampling uses
half-pixel centres (``nearest-exact`` for masks), so a mask taken to ``size × size`` and back
returns unchanged whenever the source side is at most ``size``.
"""

from __future__ import annotations

import numpy as np


def window_hu(hu: np.ndarray, *, width_hu: float = 350.0, level_hu: float = 50.0) -> np.ndarray:
    """Clip HU to ``[level - width/2, level + width/2]`` and scale that window to ``[0, 1]`` (float32).

    The default is the mediastinal (soft tissue) window, W350/L50, as in the reference notebook.
    """
    if width_hu <= 0:
        raise ValueError(f"window width must be positive, got {width_hu}")  # a caller's bug: configs check it
    low = level_hu - width_hu / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(width_hu)
    return np.clip(out, 0.0, 1.0, out=out)


def _as_batch(array: np.ndarray):
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    single = tensor.ndim == 2
    return (tensor[None] if single else tensor)[:, None], single  # (n, 1, y, x)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling of ``(y, x)`` or ``(n, y, x)`` float images to ``size = (height, width)``.

    Antialiased when shrinking, so thin structures are averaged rather than skipped.
    """
    import torch.nn.functional as F

    tensor, single = _as_batch(image.astype(np.float32, copy=False))
    if tuple(tensor.shape[-2:]) == tuple(size):
        out = tensor
    else:
        shrink = size[0] < tensor.shape[-2] or size[1] < tensor.shape[-1]
        out = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    out = out[:, 0].numpy()
    return out[0] if single else out


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest (half-pixel centre) resampling of ``(y, x)`` or ``(n, y, x)`` integer masks to ``size``."""
    import torch
    import torch.nn.functional as F

    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.copy()
    tensor, single = _as_batch(mask.astype(np.int32, copy=False))
    out = F.interpolate(tensor.float(), size=size, mode="nearest-exact")[:, 0].to(torch.int32).numpy()
    out = out.astype(mask.dtype, copy=False)
    return out[0] if single else out


def slice_to_model(hu_slice: np.ndarray, *, width_hu: float, level_hu: float, slice_size: int) -> np.ndarray:
    """One axial HU slice ``(y, x)`` → windowed, normalized ``(slice_size, slice_size)`` float32 in ``[0, 1]``."""
    return resize_image(window_hu(hu_slice, width_hu=width_hu, level_hu=level_hu), (slice_size, slice_size))
