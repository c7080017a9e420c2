"""Where the frozen image encoder runs: eager PyTorch, or ONNX Runtime on the CPU (``--engine``).

The CVPR 2024 "MedSAM on Laptop" winners got their CPU speed from the inference engine, not the
model. :class:`OnnxEncoder` exports a backbone's image encoder once per backbone and weights (its
sha256) with ``torch.onnx.export`` into the user cache folder (``$EMBEDCACHE_CACHE``, else
``$XDG_CACHE_HOME/embedcache``, else ``~/.cache/embedcache``), beside a record of its own sha256,
and re-exports it when either changes; nothing is downloaded. A fresh export is checked against
eager PyTorch on one seeded input before it is kept. It has :class:`~embedcache.model.encoder.ImageEncoder`'s
interface, so ``encode`` and ``predict`` run it unchanged.

Only fp32 is offered: its embeddings equal eager PyTorch's within 1e-4 (tested, with the vanilla
decoder's Dice on the phantom equal to 4 decimals), so the cache signature records the engine but
a cache of either engine serves a decoder trained on the other. Reduced precision changes the
embeddings and is not offered until its Dice cost is measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from embedcache.errors import EmbedcacheError, UsageError

#: ``--engine`` choices.
ENGINES = ("torch", "onnxruntime")
#: What ``pip install`` brings an engine in with.
EXTRA = "pip install 'embedcache[cpu-fast]'"
#: ONNX opset of the exported graphs.
OPSET = 17
#: A fresh export must give the eager encoder's embeddings within this (max abs difference).
EXPORT_TOLERANCE = 1e-3


def cache_folder() -> Path:
    """The user cache folder the exported graphs live in."""
    if os.environ.get("EMBEDCACHE_CACHE"):
        return Path(os.environ["EMBEDCACHE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "embedcache"


def check_engine(engine: str, device_type: str = "cpu") -> None:
    """Refuse an unknown engine, one whose library is missing (naming the extra), or ONNX Runtime on CUDA."""
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine}: choose from {', '.join(ENGINES)}")
    if engine == "onnxruntime":
        if device_type != "cpu":
            raise UsageError("--engine onnxruntime runs on the CPU; pass --device cpu, or --engine torch on CUDA")
        try:
            import onnx  # noqa: F401  (torch.onnx.export writes through it)
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UsageError(f"--engine onnxruntime needs ONNX Runtime and onnx: {EXTRA}") from None


def cpu_threads() -> int:
    """The cores this process may run on (its affinity mask), for ONNX Runtime's intra-op threads."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def exported_encoder(backbone, image_encoder, checkpoint_sha256: str, *, folder: Path | None = None,
                     log=print) -> Path:
    """The ONNX graph of ``backbone``'s image encoder with the weights of sha256 ``checkpoint_sha256``: the one
    exported before (its record and its own sha256 intact), else a fresh export, checked and kept."""
    import torch

    from embedcache.io.files import atomic_path, atomic_write_text

    folder = Path(folder) if folder is not None else cache_folder()
    name = f"{backbone.name}-{checkpoint_sha256[:16]}-opset{OPSET}-torch{torch.__version__.split('+')[0]}"
    graph, record = folder / f"{name}.onnx", folder / f"{name}.json"
    if graph.is_file() and record.is_file():
        try:
            held = json.loads(record.read_text())
            if held.get("checkpoint_sha256") == checkpoint_sha256 and held.get("sha256") == _sha256(graph):
                return graph
        except (OSError, ValueError, AttributeError):
            pass
        log(f"{graph}: does not match its record; exporting it again")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbedcacheError(f"{folder}: cannot hold the exported encoder ({exc.strerror}); set EMBEDCACHE_CACHE to "
                              "a writable folder") from None
    log(f"exporting {backbone.name}'s image encoder to ONNX (once per backbone and weights): {graph}")
    size = backbone.input_size
    example = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, (1, 3, size, size)).astype(np.float32))
    model = image_encoder.float().eval()
    with atomic_path(graph) as tmp, torch.inference_mode():
        with warnings.catch_warnings():  # the TorchScript exporter's notes on constant folding are not the user's
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(tmp), opset_version=OPSET, dynamo=False, input_names=["image"],
                              output_names=["embedding"])
        want = model(example).numpy()
        got = _session(Path(tmp)).run(None, {"image": example.numpy()})[0]
        difference = float(np.abs(got - want).max())
        if not difference <= EXPORT_TOLERANCE:
            raise EmbedcacheError(f"{graph}: the exported encoder differs from PyTorch's by {difference:.2g} "
                                  f"(more than {EXPORT_TOLERANCE:g}); use --engine torch")
    atomic_write_text(record, json.dumps({"backbone": backbone.name, "checkpoint_sha256": checkpoint_sha256,
                                          "sha256": _sha256(graph), "opset": OPSET, "torch": torch.__version__,
                                          "max_abs_difference_from_torch": difference}, indent=2) + "\n")
    return graph


def _session(graph: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(graph), sess_options=options, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """``backbone``'s image encoder as an ONNX Runtime session on the CPU, with
    :class:`~embedcache.model.encoder.ImageEncoder`'s interface (slices in, embeddings as torch tensors out).
    The graph takes one slice at a time (TinyViT's export fixes the batch at 1); batch 1 is the CPU's best anyway."""

    engine = "onnxruntime"

    def __init__(self, backbone, image_encoder, checkpoint_sha256: str, *, out_dtype, folder: Path | None = None,
                 log=print):
        import torch

        self.backbone, self.out_dtype = backbone, out_dtype
        self.device = torch.device("cpu")
        self.cuda = False
        self.graph = exported_encoder(backbone, image_encoder, checkpoint_sha256, folder=folder, log=log)
        self.session = _session(self.graph)
        self.batch_size = 1

    def upload(self, slices):
        import torch

        if isinstance(slices, torch.Tensor):
            return slices.float()
        return torch.from_numpy(np.ascontiguousarray(np.stack(list(slices)) if not isinstance(slices, np.ndarray)
                                                     else slices, dtype=np.float32))

    def __call__(self, slices):
        """``(n, S, S)`` float32 slices in [0, 1] → ``(n, 256, 64, 64)`` embeddings (a CPU tensor, ``out_dtype``)."""
        import torch

        with torch.inference_mode():
            x = self.backbone.prepare(self.upload(slices)).float().numpy()
        out = [self.session.run(None, {"image": x[i : i + 1]})[0] for i in range(len(x))]
        return torch.from_numpy(np.concatenate(out)).to(self.out_dtype)

    def to_host(self, embeddings):
        import torch

        from embedcache.model.encoder import HostEmbeddings

        return HostEmbeddings(embeddings, torch.isfinite(embeddings).all())


def build_encoder(engine: str, backbone, image_encoder, checkpoint_sha256: str, *, device, batch_size: int = 0,
                  out_dtype, log=print):
    """The image encoder ``engine`` runs (``torch``: :class:`~embedcache.model.encoder.ImageEncoder` on ``device``)."""
    check_engine(engine, device.type)
    if engine == "onnxruntime":
        return OnnxEncoder(backbone, image_encoder, checkpoint_sha256, out_dtype=out_dtype, log=log)
    from embedcache.model.encoder import ImageEncoder

    return ImageEncoder(backbone, image_encoder, device=device, batch_size=batch_size, out_dtype=out_dtype)
