"""The exported graphs as encode and predict run them: :class:`GraphEncoder`, an
:class:`~embedcache.model.encoder.Encoder` beside eager PyTorch's :class:`~embedcache.model.encoder.ImageEncoder`,
and :class:`GraphDecoder`, in :func:`~embedcache.model.decoder.decode_boxes`'s place for box prompts; and
:func:`build_encoder`, which builds the one a concrete engine names."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from embedcache.model.encoder import Encoder, HostEmbeddings, ImageEncoder, embeddings_to_host, upload_slices
from embedcache.model.engines.measure import choose_streams
from embedcache.model.engines.names import GRAPH_ENGINES, check_engine
from embedcache.model.engines.sessions import runner, session
from embedcache.model.engines.store import exported_decoder, exported_encoder, load_module


class GraphEncoder(Encoder):
    """``backbone``'s image encoder as an exported graph run by ONNX Runtime or OpenVINO on the CPU: an
    :class:`~embedcache.model.encoder.Encoder` (slices in, embeddings as CPU torch tensors out).
    The graph takes one slice a run (TinyViT's export fixes the batch at 1); the CPU's batch is ``streams`` runs at
    once, each on its share of the cores (``streams``: given, else :func:`choose_streams` measures it), so encode
    hands it ``batch_size = streams`` slices at a time and predict encodes that many ahead of its walk. The engines
    release the GIL: encode's reader thread prepares the next case meanwhile."""

    def __init__(self, engine: str, backbone, image_encoder, checkpoint_sha256: str, *, out_dtype,
                 precision: str = "fp32", streams: int = 0, folder: Path | None = None):
        import torch

        self.engine, self.precision = engine, precision
        self.backbone, self.out_dtype = backbone, out_dtype
        self.device = torch.device("cpu")
        self.graph = exported_encoder(backbone, image_encoder, checkpoint_sha256, engine=engine, folder=folder)
        self.streams = streams or choose_streams(engine, self.graph, precision, backbone)
        self.run = runner(engine, self.graph, precision, self.streams)
        self._pool = None

    @property
    def batch_size(self) -> int:
        """Its streams: encode hands it one slice per stream at a time."""
        return self.streams

    def upload(self, slices):
        """Slices as one CPU tensor (:func:`~embedcache.model.encoder.upload_slices`)."""
        return upload_slices(slices, self.device)

    def __call__(self, slices):
        """``(n, S, S)`` float32 slices in [0, 1] → ``(n, 256, 64, 64)`` embeddings (a CPU tensor, ``out_dtype``)."""
        import torch

        with torch.inference_mode():
            x = self.backbone.prepare(self.upload(slices)).float().numpy()
        parts = [x[i : i + 1] for i in range(len(x))]
        if len(parts) > 1 and self.streams > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="embedcache-stream")
            out = list(self._pool.map(self.run, parts))
        else:
            out = [self.run(p) for p in parts]
        return torch.from_numpy(np.concatenate(out)).to(self.out_dtype)

    def to_host(self, embeddings) -> HostEmbeddings:
        """The embeddings and whether they are finite: on the CPU already."""
        return embeddings_to_host(embeddings, self.device)


class GraphDecoder:
    """The prompt encoder and mask decoder as one exported graph (:func:`exported_decoder`) run by ONNX Runtime or
    OpenVINO at ``precision`` (predict's: the encoder's, so bf16 with a bf16 encoder), in
    :func:`~embedcache.model.decoder.decode_boxes`'s place for box prompts: one embedding and one box a run (the
    box3d walk asks for one slice at a time), all four mask outputs out, the one asked for kept.
    Prompts with clicks, and boxes in ``(B, P, 4)`` batches, go to the eager modules, loaded when first needed
    (``load_heads()`` gives ``(prompt_encoder, mask_decoder)``)."""

    def __init__(self, engine: str, backbone, load_heads, checkpoint_sha256: str, decoder_sha256: str, *,
                 precision: str = "fp32", folder: Path | None = None):
        self.engine, self.precision, self.load_heads, self._heads = engine, precision, load_heads, None

        def all_masks():
            from embedcache.model.decoder import AllMasks

            return AllMasks(*self.heads())

        self.graph = exported_decoder(backbone, all_masks, checkpoint_sha256, decoder_sha256, engine=engine,
                                      folder=folder)
        self.run = session(engine, self.graph, precision)

    def heads(self):
        """The eager ``(prompt_encoder, mask_decoder)``, loaded once."""
        if self._heads is None:
            self._heads = self.load_heads()
        return self._heads

    def __call__(self, embeddings, boxes, *, points=None, multimask_output: bool = False, masks=None):
        """As :func:`~embedcache.model.decoder.decode_boxes` without its two modules: ``(N, 256, 64, 64)`` embeddings
        and ``(N, 4)`` boxes (encoder-input pixels) → ``(N, M, 256, 256)`` mask logits and ``(N, M)`` predicted IoU.
        Points and mask prompts are not in the graph: the eager modules decode them."""
        import torch

        if points is not None or masks is not None or boxes is None or boxes.dim() != 2:
            from embedcache.model.decoder import decode_boxes

            return decode_boxes(*self.heads(), embeddings, boxes, points=points, multimask_output=multimask_output,
                                masks=masks)
        e = embeddings.detach().float().cpu().numpy()
        b = boxes.detach().float().cpu().numpy()
        runs = [self.run(e[i : i + 1], b[i : i + 1]) for i in range(len(b))]
        keep = slice(1, None) if multimask_output else slice(0, 1)
        masks = np.concatenate([m for m, _ in runs])[:, keep]
        iou = np.concatenate([i for _, i in runs])[:, keep]
        return torch.from_numpy(masks).to(embeddings.device), torch.from_numpy(iou).to(embeddings.device)


def build_encoder(engine: str, backbone, image_encoder, checkpoint_sha256: str, *, device, batch_size: int = 0,
                  out_dtype, precision: str = "fp32", streams: int = 0) -> Encoder:
    """The image encoder ``engine`` runs at ``precision``: torch's :class:`~embedcache.model.encoder.ImageEncoder` on
    ``device``, or a :class:`GraphEncoder`. ``engine`` is a concrete one: ``auto`` is resolved first
    (:func:`~embedcache.model.engines.auto.resolve_engine`). ``image_encoder``: the module, or the function that
    loads it (a graph engine calls it only to export). ``batch_size``: torch's slices per forward (0: chosen for the
    device); ``streams``: a graph engine's slices at once (0: measured by :func:`choose_streams`)."""
    if engine == "auto":
        raise ValueError("build_encoder takes a concrete engine: resolve --engine auto with resolve_engine first")
    check_engine(engine, device.type, precision, streams)
    if engine in GRAPH_ENGINES:
        return GraphEncoder(engine, backbone, image_encoder, checkpoint_sha256, out_dtype=out_dtype,
                            precision=precision, streams=streams)
    return ImageEncoder(backbone, load_module(image_encoder), device=device, batch_size=batch_size,
                        out_dtype=out_dtype)
