"""``--engine auto``, made concrete in one place (:func:`resolve_engine`): the engine of the cache being grown, where
there is one; torch on CUDA and under torchrun; on a CPU the fastest fp32 engine installed whose embeddings equal
eager PyTorch's within :data:`EQUAL_TOLERANCE`, found by a short measurement once per backbone, weights and CPU and
recorded in the cache folder (:func:`choose_engine`). ``auto`` never chooses bf16."""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import numpy as np

from embedcache.io.files import atomic_write_text
from embedcache.model.encoder import ImageEncoder
from embedcache.model.engines import measure, names
from embedcache.model.engines.sessions import runner
from embedcache.model.engines.store import example_input, exported_encoder, load_module
from embedcache.runtime import cpu

logger = logging.getLogger(__name__)

#: fp32 engines whose embeddings differ from eager PyTorch's by no more than this are interchangeable.
EQUAL_TOLERANCE = 1e-4


def resolve_engine(engine: str, backbone, load_image_encoder, checkpoint_sha256: str, *, device, streams: int = 0,
                   held: str | None = None, distributed: bool = False) -> tuple[str, int]:
    """The concrete engine ``engine`` runs as, and the ``--streams`` that stand with it: any engine but ``auto`` as it
    is; ``auto``: ``held`` (the engine of the cache, or interrupted encode, being grown: it grows as it began) where
    given, torch on CUDA or under torchrun (``distributed``), else :func:`choose_engine`'s measurement of
    ``backbone``'s encoder (``load_image_encoder()``, called only when no record answers; see
    :func:`~embedcache.model.engines.measure.timing_waits_for`). Once auto has chosen torch, ``--streams`` is dropped with a note (:func:`streams_for_auto`)."""
    if engine != "auto":
        return engine, streams
    if held is not None:
        chosen = held
    elif device.type != "cpu" or distributed:
        chosen = "torch"
    else:
        chosen = choose_engine(backbone, load_image_encoder, checkpoint_sha256, device=device)
    return chosen, streams_for_auto(chosen, streams)


def streams_for_auto(engine: str, streams: int) -> int:
    """The ``--streams`` that stand once ``--engine auto`` has chosen ``engine``: torch (CUDA, torchrun, or the CPU
    where it measured fastest) encodes ``--batch-size`` slices a forward instead, so they are dropped, with a note
    (an explicit ``--engine torch --streams N`` is refused)."""
    if engine == "torch" and streams:
        logger.info(f"--streams {streams}: --engine auto chose torch here, which encodes --batch-size slices a forward "
            "instead; --streams is not used")
        return 0
    return streams


def auto_record(backbone, checkpoint_sha256: str, folder: Path | None = None) -> Path:
    """Where ``--engine auto``'s measurement for ``backbone`` with the weights of sha256 ``checkpoint_sha256`` on this
    CPU is recorded (a JSON object whose ``chosen`` engine later runs answer with)."""
    folder = Path(folder) if folder is not None else names.cache_folder()
    return folder / f"auto-{backbone.name}-{checkpoint_sha256[:16]}-{measure.machine_key()}.json"


def choose_engine(backbone, load_image_encoder, checkpoint_sha256: str, *, device, folder: Path | None = None) -> str:
    """What ``--engine auto`` runs ``backbone``'s encoder with on ``device``: torch on CUDA or where no other engine
    is installed; else the fastest fp32 engine whose embeddings equal torch's within :data:`EQUAL_TOLERANCE`,
    measured once per backbone, weights and CPU (each graph engine at every slices-at-once
    :func:`~embedcache.model.engines.measure.choose_streams` tries, with torch as encode runs it, alternating:
    :func:`~embedcache.model.engines.measure.time_pipelined`) and recorded in the cache folder, with each engine's
    slices at once beside its graph. ``load_image_encoder()`` gives the encoder's module; it is called only when no
    record answers."""
    import torch

    candidates = names.installed_engines()
    if device.type != "cpu" or len(candidates) == 1:
        return "torch"
    record = auto_record(backbone, checkpoint_sha256, folder)
    folder = record.parent
    try:
        held = json.loads(record.read_text())
        fault = measure.record_fault(held)
        if fault is None and held.get("chosen") in candidates and held.get("checkpoint_sha256") == checkpoint_sha256:
            return held["chosen"]
        if fault:
            logger.warning(f"{record}: {fault}; measuring again")
    except (OSError, ValueError):
        pass
    logger.info(f"--engine auto: timing {', '.join(candidates)} on {backbone.name}'s encoder (once for this CPU and weights)")
    image_encoder = load_module(load_image_encoder)
    example = example_input(backbone)
    counts = measure.stream_counts(cpu.cpu_threads())
    # eager torch as encode runs it (ImageEncoder: channels_last, which TinyViT's convolutions need to be fast)
    eager = ImageEncoder(backbone, image_encoder.float(), device=device, batch_size=1, out_dtype=torch.float32)
    run_eager = lambda x: eager.model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()  # noqa: E731
    runners = {("torch", 1): (lambda: run_eager, 1)}
    graphs = {}
    for engine in candidates[1:]:
        graphs[engine] = exported_encoder(backbone, image_encoder, checkpoint_sha256, engine=engine, folder=folder)
        runners.update({(engine, k): (partial(runner, engine, graphs[engine], "fp32", k), k)
                        for k in counts})
    measure.settle_before_timing()
    with torch.inference_mode():
        reference = run_eager(example)
        difference = {e: float(np.abs(runners[e, 1][0]()(example) - reference).max()) for e in candidates}
        seconds = measure.time_pipelined(runners, example, 2 * counts[-1])
    at_once = {"torch": 1}
    for engine, graph in graphs.items():  # each engine's slices at once, as choose_streams would have chosen them
        at_once[engine] = measure.keep_streams(graph, engine, "fp32", {k: seconds[engine, k] for k in counts})
    best = {e: seconds[e, at_once[e]] for e in candidates}
    equal = [e for e in candidates if difference[e] <= EQUAL_TOLERANCE]
    chosen = min(equal, key=best.__getitem__)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps({
            "backbone": backbone.name, "checkpoint_sha256": checkpoint_sha256, "chosen": chosen,
            "seconds_per_slice": {e: round(v, 4) for e, v in best.items()}, "streams": at_once,
            "seconds_per_slice_by_streams": {f"{e}@{k}": round(v, 4) for (e, k), v in seconds.items()},
            "max_abs_difference_from_torch": difference, "threads": cpu.cpu_threads()}, indent=2) + "\n")
    except OSError:
        pass  # the choice stands for this run; the next one measures again
    logger.info(f"--engine auto: {chosen} (" + ", ".join(f"{e} {v:.2f} s/slice" + (f" {at_once[e]} at once" if at_once[e] > 1
                                                                            else "") for e, v in best.items())
        + f"); {record}")
    return chosen
