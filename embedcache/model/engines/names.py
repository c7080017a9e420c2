"""The engines by name: which there are, which are installed here, and what each refuses (an engine whose library is
missing, a CPU engine on CUDA, bf16 where it cannot run, ``--streams`` for torch); and the cache folder their
exported graphs and measurements live in. Nothing here imports torch or an engine's library."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from embedcache.config import ENGINES, check_engine_names
from embedcache.errors import UsageError
from embedcache.model.engines.sessions import openvino_core

__all__ = ["ENGINES", "EXTRA", "GRAPH_ENGINES", "cache_folder", "check_engine", "installed", "installed_engines"]

#: The engines that run an exported graph on the CPU, with the modules each needs.
GRAPH_ENGINES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}
#: What ``pip install`` brings the engines in with.
EXTRA = "pip install 'embedcache[cpu-fast]'"


def cache_folder() -> Path:
    """The user cache folder the exported graphs live in."""
    if os.environ.get("EMBEDCACHE_CACHE"):
        return Path(os.environ["EMBEDCACHE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "embedcache"


def check_engine(engine: str, device_type: str = "cpu", precision: str = "fp32", streams: int = 0) -> None:
    """Refuse an unknown engine or precision, an engine whose library is missing (naming the extra), a CPU
    engine on CUDA, bf16 where it cannot run, or ``--streams`` for torch."""
    check_engine_names(engine, precision, streams)
    if streams and engine == "torch":
        raise UsageError(f"--streams {streams}: slices at once are onnxruntime's and openvino's; add --engine openvino, "
                         "or drop --streams")
    if precision != "fp32" and engine != "openvino":
        raise UsageError(f"--encoder-precision {precision} runs through OpenVINO: add --engine openvino, or use --encoder-precision fp32")
    if engine in GRAPH_ENGINES:
        if device_type != "cpu":
            raise UsageError(f"--engine {engine} runs on the CPU; pass --device cpu, or --engine torch on CUDA")
        missing = [m for m in GRAPH_ENGINES[engine] if not installed(m)]
        if missing:
            raise UsageError(f"--engine {engine} needs {' and '.join(missing)}: {EXTRA}")
    if precision == "bf16":
        if "BF16" not in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise UsageError("--encoder-precision bf16: this CPU has no bf16 instructions (OpenVINO reports none); use "
                             "--encoder-precision fp32")


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here (without importing it)."""
    return importlib.util.find_spec(module) is not None


def installed_engines() -> list[str]:
    """The CPU engines whose libraries are installed here, torch first."""
    return ["torch"] + [e for e, modules in GRAPH_ENGINES.items() if all(installed(m) for m in modules)]
