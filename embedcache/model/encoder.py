"""The frozen image encoder of a backbone, ready to run: ``(n, S, S)`` slices in [0, 1] → embeddings.

Used by ``encode`` (which stores the embeddings) and ``predict`` (which decodes them at once), through the
:class:`Encoder` interface, whichever engine runs it: eager PyTorch (:class:`ImageEncoder`, here) or an exported
graph on a CPU engine (:class:`~embedcache.model.engines.GraphEncoder`).
On CUDA nothing here makes the host wait for the device: slices go up from pinned memory, and
:meth:`ImageEncoder.to_host` starts the copy back into pinned memory and returns at once; whoever
stores the embeddings waits for them (:meth:`HostEmbeddings.wait`), in a thread of its own.
torch is imported when an encoder is built, not with this module: the CPU engines' module declares its encoder
here and is imported before any input is checked.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from embedcache.runtime.devices import keep_freed_memory

if TYPE_CHECKING:
    import torch

    from embedcache.model.backbones import Backbone

#: The most slices one encoder batch holds on CUDA, however much memory is free.
MAX_CUDA_BATCH = 32


def batch_for_memory(per_slice_bytes: int, free_bytes: int, *, share: float = 0.5, cap: int = MAX_CUDA_BATCH) -> int:
    """The largest power of two (1 … ``cap``) of slices whose activations fit in ``share`` of the free memory."""
    fits = int(share * free_bytes) // max(int(per_slice_bytes), 1)
    batch = 1
    while batch * 2 <= min(fits, cap):
        batch *= 2
    return batch


class HostEmbeddings:
    """Embeddings on their way to host memory, and whether they are all finite."""

    def __init__(self, embeddings: torch.Tensor, finite: torch.Tensor, event=None):
        self._embeddings, self._finite, self._event = embeddings, finite, event

    def wait(self) -> tuple[np.ndarray, bool]:
        """``(n, 256, 64, 64)`` embeddings as numpy and whether all are finite, once the copy is done."""
        if self._event is not None:
            self._event.synchronize()
        return self._embeddings.numpy(), bool(self._finite)


class Encoder(Protocol):
    """What encode and predict run an image encoder through, whichever engine runs it (eager PyTorch or an exported
    graph on a CPU engine): slices in, embeddings out, handed to the host without waiting."""

    #: What runs it: ``torch``, ``onnxruntime`` or ``openvino`` (never ``auto``: that is resolved before it is built).
    engine: str
    #: Its arithmetic: ``fp32``, or ``bf16`` (OpenVINO).
    precision: str
    #: Where its embeddings come out (the CPU for a graph engine).
    device: torch.device
    #: Slices it runs at once, each on its own thread and share of the cores (a graph engine's ``--streams``); 0 for
    #: one that runs a whole batch in one forward (eager torch), which predict does not encode ahead.
    streams: int

    @property
    def batch_size(self) -> int:
        """The slices one call takes (encode hands it that many at a time)."""

    def upload(self, slices: np.ndarray | Sequence[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """Slices (an array, a list of ``(S, S)`` arrays, or a tensor) as one ``(n, S, S)`` tensor where it runs."""

    def __call__(self, slices: np.ndarray | Sequence[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """``(n, S, S)`` float32 slices in [0, 1] → ``(n, 256, 64, 64)`` embeddings on :attr:`device`."""

    def to_host(self, embeddings: torch.Tensor) -> HostEmbeddings:
        """Start handing ``embeddings`` (and whether they are finite) to host memory; returns at once."""


def upload_slices(slices: np.ndarray | Sequence[np.ndarray] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Slices (an array, a list of ``(S, S)`` arrays, or a tensor) as one ``(n, S, S)`` float32 tensor on
    ``device``; on CUDA stacked straight into pinned memory and copied without waiting, on the CPU an array is
    taken as it is, without a copy."""
    import torch

    cuda = device.type == "cuda"
    if isinstance(slices, torch.Tensor):
        return slices.to(device, non_blocking=True)
    if isinstance(slices, np.ndarray):
        if not cuda:  # the array itself, no copy
            return torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))
        slices = list(slices)
    shape = (len(slices), *slices[0].shape)
    staging = torch.empty(shape, dtype=torch.float32, pin_memory=cuda)
    np.stack(slices, out=staging.numpy())
    return staging.to(device, non_blocking=True) if cuda else staging


def embeddings_to_host(embeddings: torch.Tensor, device: torch.device) -> HostEmbeddings:
    """Start copying ``embeddings`` (and whether they are finite) from ``device`` to host memory; returns at once
    (from the CPU they are there already)."""
    import torch

    with torch.inference_mode():
        finite = torch.isfinite(embeddings).all()
        if device.type != "cuda":
            return HostEmbeddings(embeddings, finite)
        host = torch.empty(embeddings.shape, dtype=embeddings.dtype, pin_memory=True)
        host.copy_(embeddings, non_blocking=True)
        host_finite = torch.empty((), dtype=torch.bool, pin_memory=True)
        host_finite.copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        # the device's own stream: with --device cuda:1 the current device may still be cuda:0
        event.record(torch.cuda.current_stream(device))
        return HostEmbeddings(host, host_finite, event)


class ImageEncoder(Encoder):
    """``backbone``'s image encoder on ``device``, in inference mode (fp16 autocast on CUDA).

    ``batch_size`` 0 picks the device's best: 1 on CPU (larger batches encode fewer slices a second there:
    benchmarks/encode.py); on CUDA the largest power of two up to 32 whose activations, measured on one slice,
    fit in half the free memory.
    ``out_dtype``: the embeddings' dtype (None: float16).
    """

    engine, precision = "torch", "fp32"
    streams = 0  # one forward a batch of batch_size slices

    def __init__(self, backbone: Backbone, image_encoder: torch.nn.Module, *, device: torch.device,
                 batch_size: int = 0, out_dtype: torch.dtype | None = None):
        import torch

        self.backbone, self.device = backbone, device
        self.out_dtype = torch.float16 if out_dtype is None else out_dtype
        # channels_last lets oneDNN/cuDNN run TinyViT's convolutions without layout reorders;
        # for ViT it only touches the patch embedding.
        self.model = image_encoder.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
        self.cuda = device.type == "cuda"
        if not self.cuda:
            keep_freed_memory()
        self._batch_size = batch_size or (0 if self.cuda else 1)
        # fp16 autocast on CUDA: the encoder's matmuls run on tensor cores; embeddings are stored fp16 anyway.
        self.autocast = torch.autocast("cuda", dtype=torch.float16) if self.cuda else nullcontext()

    @property
    def batch_size(self) -> int:
        if not self._batch_size:
            self._batch_size = self._measure_cuda_batch()
        return self._batch_size

    def _measure_cuda_batch(self) -> int:
        """One slice's activation memory, measured, against the free memory (see :func:`batch_for_memory`).
        It resets the device's peak-memory statistics: whoever reports a peak asks for ``batch_size`` first."""
        import torch

        size = self.backbone.input_size
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self(np.zeros((1, size, size), np.float32))
        torch.cuda.synchronize(self.device)
        per_slice = torch.cuda.max_memory_allocated(self.device) - before
        free, _ = torch.cuda.mem_get_info(self.device)
        return batch_for_memory(per_slice, free)

    def upload(self, slices: np.ndarray | Sequence[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """Slices as one ``(n, S, S)`` tensor on the device (:func:`upload_slices`)."""
        return upload_slices(slices, self.device)

    def __call__(self, slices: np.ndarray | Sequence[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """``(n, S, S)`` float32 slices in [0, 1] → ``(n, 256, 64, 64)`` embeddings on the device, in ``out_dtype``."""
        import torch

        with torch.inference_mode(), self.autocast:
            x = self.upload(slices)
            emb = self.model(self.backbone.prepare(x).contiguous(memory_format=torch.channels_last))
            return emb.to(self.out_dtype)

    def to_host(self, embeddings: torch.Tensor) -> HostEmbeddings:
        """Start copying ``embeddings`` (and whether they are finite) to host memory; returns at once."""
        return embeddings_to_host(embeddings, self.device)
