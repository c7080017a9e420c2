"""Where the frozen image encoder runs (``--engine``) and at what precision (``--encoder-precision``).

The CVPR 2024 "MedSAM on Laptop" winners got their CPU speed from the inference engine, not the
model. Beside eager PyTorch, embedcache runs the image encoder in ONNX Runtime or OpenVINO on the
CPU: the encoder is exported once per backbone and weights (their sha256) with ``torch.onnx.export``
into the user cache folder (``$EMBEDCACHE_CACHE``, else ``$XDG_CACHE_HOME/embedcache``, else
``~/.cache/embedcache``), beside a record of its own sha256, and re-exported when either changes;
nothing is downloaded. A fresh export is checked against eager PyTorch on one seeded input before it
is kept. Each engine is an :class:`~embedcache.model.encoder.Encoder`, so ``encode`` and ``predict``
run them unchanged. ``predict`` also runs the prompt encoder and mask decoder as a graph
(:class:`GraphDecoder`, exported once per backbone weights and decoder file, run at the encoder's
precision), and builds no eager model at all once both graphs exist; OpenVINO keeps what it compiles
beside them. A graph engine encodes ``--streams`` slices at once, each on its share of the cores (0, the
default: whichever of one or several was faster per slice in a short measurement, once per graph and CPU:
:func:`choose_streams`).

``--engine auto`` (the default) is torch on CUDA (and under torchrun); on a CPU it is the fastest
fp32 engine installed whose embeddings equal eager PyTorch's within :data:`EQUAL_TOLERANCE`, found by
a short measurement once per backbone, weights and CPU and recorded in the cache folder; a cache that
exists keeps the engine it began with. It is resolved in one place, :func:`resolve_engine`, before an
encoder is built. fp32 engines agree within that tolerance (tested, with the vanilla decoder's Dice on
the phantom equal to 4 decimals), so the signature records the engine without comparing it.
``--encoder-precision bf16`` (OpenVINO on a CPU with bf16 instructions) changes the embeddings: it is part of
what a cache and a decoder must share, and ``auto`` never chooses it; its Dice cost is measured in
``benchmarks/engines.py``.

The parts, each one job, lowest first (importing any of them imports neither torch nor an engine's library):

- :mod:`.names`: the engines, which are installed, what each refuses, the cache folder;
- :mod:`.graphs`: what a cached graph is checked for before an engine sees it;
- :mod:`.sessions`: a graph run in ONNX Runtime or OpenVINO, and OpenVINO's compiled blobs and their record;
- :mod:`.store`: the graphs exported, recorded and exported again;
- :mod:`.measure`: the timing, and how many slices at once a graph engine runs (measured, recorded);
- :mod:`.adapters`: :class:`GraphEncoder` and :class:`GraphDecoder`, and :func:`build_encoder`;
- :mod:`.auto`: ``--engine auto`` (:func:`resolve_engine`, :func:`choose_engine`).

The CPU's identity and threads are :mod:`embedcache.runtime.cpu`'s (re-exported here).
"""

from embedcache.model.engines.adapters import GraphDecoder, GraphEncoder, build_encoder
from embedcache.model.engines.auto import EQUAL_TOLERANCE, auto_record, choose_engine, resolve_engine, streams_for_auto
from embedcache.model.engines.measure import STREAMS_GAIN, choose_streams, timing_waits_for
from embedcache.model.engines.names import ENGINES, EXTRA, GRAPH_ENGINES, cache_folder, check_engine, installed_engines
from embedcache.model.engines.sessions import BLOB_RECORD, openvino_cache_dir
from embedcache.model.engines.store import (
    DECODER_GRAPH,
    EXPORT_TOLERANCE,
    EXTERNAL_DATA_BYTES,
    OPSET,
    exported_decoder,
    exported_encoder,
)
from embedcache.runtime.cpu import CPU_FEATURES, cgroup_cpu_quota, cpu_identity, cpu_name, cpu_threads

__all__ = ["BLOB_RECORD", "CPU_FEATURES", "DECODER_GRAPH", "ENGINES", "EQUAL_TOLERANCE", "EXPORT_TOLERANCE",
           "EXTERNAL_DATA_BYTES", "EXTRA", "GRAPH_ENGINES", "OPSET", "STREAMS_GAIN", "GraphDecoder", "GraphEncoder",
           "auto_record", "build_encoder", "cache_folder", "cgroup_cpu_quota", "check_engine", "choose_engine",
           "choose_streams", "cpu_identity", "cpu_name", "cpu_threads", "exported_decoder", "exported_encoder",
           "installed_engines", "openvino_cache_dir", "resolve_engine", "streams_for_auto", "timing_waits_for"]
