"""Phase one: run the frozen image encoder once per target slice and store the embeddings.

Read top to bottom:
1. check the inputs (files, headers, voxels, geometry) and the output folder: a second, before
   torch is imported or the checkpoint hashed;
2. settle the signature (backbone, checkpoint sha256, preprocessing, labels);
3. plan: which cases are already done (in the cache or as complete shards), which slices of the
   rest hold a target label;
4. a reader (a thread, or worker processes on CUDA) loads and preprocesses case after case; the
   main thread launches batches on the encoder (inference mode, fp16 autocast on CUDA); on CUDA a
   writer thread takes their embeddings into each case's shard and writes out the complete ones
   while the next batches encode (on the CPU the main thread does, between encoder calls);
5. merge the cache and the new shards into one file, atomically, and drop the shards.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from embedcache.cache import store
from embedcache.cache.augment import with_augmented
from embedcache.cache.merge import merge
from embedcache.cache.pipeline import EncodeSummary, encode_plans
from embedcache.cache.plan import (
    check_inputs,
    existing_signature,
    finished,
    gland_cases,
    plan_cases,
    shard_folder,
    where,
)
from embedcache.cache.records import CaseRecord, Signature
from embedcache.cache.store import row_bytes
from embedcache.config import EncodeConfig
from embedcache.errors import EmbedcacheError
from embedcache.io.datasets import CaseSource
from embedcache.io.files import check_free_space, write_error, writer_lock
from embedcache.model.engines import build_encoder, check_engine
from embedcache.model.engines import resolve_engine as resolve
from embedcache.runtime.devices import pick_device
from embedcache.runtime.distributed import Dist


def _signature(config: EncodeConfig, checkpoint_sha256: str) -> Signature:
    from embedcache.model.backbones import get_backbone

    backbone = get_backbone(config.backbone)
    return Signature(backbone=backbone.name, checkpoint_sha256=checkpoint_sha256, input_size=backbone.input_size,
                     preprocess=config.preprocess, labels=config.labels, embedding_dtype=config.embedding_dtype,
                     engine=config.engine, precision=config.precision,
                     label_map=config.label_map.only(config.labels), zoom_mm=float(config.zoom_mm), pixels=True)


def signature_for(config: EncodeConfig) -> Signature:
    """The signature a cache encoded with ``config`` carries (reads the checkpoint to hash it)."""
    from embedcache.model.backbones import Weights

    return _signature(config, Weights.of(config.backbone, config.checkpoint).sha256)


def load_encoder(config: EncodeConfig, *, device):
    """The image encoder ``config`` names, with its weights, on ``device``, run by ``config.engine``
    (an :class:`~embedcache.model.encoder.Encoder`: eager torch's, or a graph engine's). ``encode`` resolves
    ``--engine auto`` first (:func:`resolve_engine`); a caller that has not is answered as a new cache would be."""
    import torch

    from embedcache.model.backbones import Weights

    weights = Weights.of(config.backbone, config.checkpoint)
    image_encoder = weights.load().image_encoder
    out_dtype = torch.float16 if config.embedding_dtype == "float16" else torch.float32
    engine, streams = resolve(config.engine, weights.backbone, image_encoder, weights.sha256, device=device,
                              streams=config.streams)
    return build_encoder(engine, weights.backbone, image_encoder, weights.sha256, device=device,
                         batch_size=config.batch_size, out_dtype=out_dtype, precision=config.precision, streams=streams)


def resolve_engine(config: EncodeConfig, out: Path, dist) -> EncodeConfig:
    """``config`` with ``--engine auto`` made concrete by :func:`embedcache.model.engines.resolve_engine`: the engine
    of the cache (or interrupted encode) at ``out`` where there is one, so it grows as it began; torch on CUDA or
    under torchrun; else the fastest equal engine on this CPU."""
    from embedcache.model.backbones import Weights

    if config.engine != "auto":
        return config
    held = existing_signature(out)
    weights = Weights.of(config.backbone, config.checkpoint)  # its sha256 remembered: the signature's is free
    # the weights are loaded to time the engines only when no earlier measurement on this CPU answers
    engine, streams = resolve(config.engine, weights.backbone, lambda: weights.load().image_encoder, weights.sha256,
                              device=pick_device(dist.device_name), streams=config.streams,
                              held=held.engine if held is not None else None, distributed=dist.world > 1)
    return replace(config, engine=engine, streams=streams)


def encode(
    cases: list[CaseSource],
    out: Path,
    config: EncodeConfig,
    *,
    progress=None,
) -> EncodeSummary:
    """Encode ``cases`` into the cache ``out``, resuming from whatever an earlier run completed.

    Under ``torchrun`` each rank encodes its share of the cases (every K-th) into the shards that
    resume uses, and rank 0 merges them: the same cache as one process. ``progress`` is a
    :class:`rich.progress.Progress` (or None for silence); notes go to the
    ``embedcache`` logger.
    """
    out = Path(out)
    check_inputs(cases, out)

    check_engine(config.engine, pick_device(config.device).type, config.precision, config.streams)  # before any work
    cases = with_augmented(cases, config.augment)  # training-only copies, each encoded as a case of its own
    if config.zoom_mm:
        cases = gland_cases(cases, config.labels)  # each case's glands' regions after it, each a case of its own
    dist = Dist(config.device)
    with writer_lock(out, main=dist.main):  # under torchrun rank 0 writes the cache for all
        config = resolve_engine(config, out, dist)
        signature = signature_for(config)
        return _encode(cases, out, config, signature, dist, progress=progress)


def _encode(cases: list[CaseSource], out: Path, config: EncodeConfig, signature: Signature, dist, *,
            progress) -> EncodeSummary:
    summary = EncodeSummary(out=out, cases_total=len(cases))
    done, shards = finished(out, signature, tidy=dist.main)
    plan = plan_cases(cases[dist.rank :: dist.world], config, done, shards)
    summary.cases_resumed, summary.cases_skipped, summary.slices_total = plan.resumed, plan.skipped, plan.slices
    dropped = plan.dropped
    size = row_bytes(embedding_dtype=config.embedding_dtype, slice_size=config.preprocess.slice_size)
    all_rows = summary.slices_total + sum(r.n_rows for r in done.values()) + sum(r.n_rows for _, r in shards.values())
    check_free_space(out.parent, (summary.slices_total + all_rows) * size, what="encoding (shards and the merged cache)")

    shard_dir = shard_folder(out)
    if plan.cases:
        device = pick_device(dist.device_name)
        summary.device = str(device)
        encoder = load_encoder(config, device=device)  # weights or an export that fail leave no folder behind
        shard_dir.mkdir(exist_ok=True)
        started = time.perf_counter()
        for record in encode_plans(plan.cases, config, encoder, shard_dir, signature, progress, row_size=size,
                                   summary=summary):
            shards[record.name] = (shard_dir / f"{record.name}.h5", record)
            summary.cases_encoded += 1
            summary.slices_encoded += record.n_rows
        summary.encode_seconds = time.perf_counter() - started
    if dist.world > 1:  # every rank's shards are on disk: rank 0 merges them all
        summary, dropped = _gather(dist, summary, dropped)
        if not dist.main:
            dist.barrier()  # returns once the merged cache exists
            return summary
        done, shards = finished(out, signature, tidy=False)
        for name in dropped:
            done.pop(name, None)
    summary.merge_s = _merge_cases(out, cases, done, shards, dropped, signature=signature, row_size=size)
    store.remove_tree(shard_dir)
    dist.barrier()
    return summary


def _merge_cases(out: Path, cases: list[CaseSource], done: dict[str, CaseRecord],
                 shards: dict[str, tuple[Path, CaseRecord]], dropped: list[str], *, signature: Signature,
                 row_size: int) -> float:
    """One cache file of the cached and the newly encoded cases, in input order (cases cached earlier but
    not in this input are kept, last), when anything changed; the seconds the merge took.

    A case moved between imagesTr/ and imagesTs/ keeps its embeddings and takes its new set; one
    whose files moved (same bytes) takes their new paths, where score will look for them."""
    names = [c.name for c in cases]
    now = {c.name: where(c) for c in cases}
    sources: list[tuple[Path, list[CaseRecord]]] = []
    for name in names + [n for n in {**done, **shards} if n not in set(names)]:
        source, record = shards[name] if name in shards else (out, done[name]) if name in done else (None, None)
        if record is not None:
            sources.append((source, [replace(record, **now.get(name, {}))]))
    regrouped = any(replace(record, **now.get(name, {})) != record for name, record in done.items())
    if not (shards or regrouped or dropped or not out.exists()):
        return 0.0
    if not any(records for _, records in sources):
        raise EmbedcacheError(
            f"no slice holds any of labels {list(signature.labels)} in the {len(cases)} given case(s); "
            "check --labels against the label files"
        )
    total = sum(r.n_rows for _, records in sources for r in records)
    check_free_space(out.parent, total * row_size, what="the merged cache")
    started = time.perf_counter()
    try:
        merge(out, signature=signature, sources=sources)
    except OSError as exc:
        raise write_error(exc, out, needed=total * row_size) from None
    return time.perf_counter() - started


def _gather(dist, summary: EncodeSummary, dropped: list[str]) -> tuple[EncodeSummary, list[str]]:
    """Every rank's counts added up, and every rank's dropped cases, on every rank (a collective: it
    returns once every rank has encoded its share)."""
    import torch.distributed

    parts: list = [None] * dist.world
    torch.distributed.all_gather_object(parts, (summary, dropped))
    total = EncodeSummary(out=summary.out, cases_total=summary.cases_total, device=summary.device)
    for part, _ in parts:
        total.cases_encoded += part.cases_encoded
        total.cases_resumed += part.cases_resumed
        total.cases_skipped += part.cases_skipped
        total.slices_encoded += part.slices_encoded
        total.slices_total += part.slices_total
        for name in ("encode_seconds", "input_wait_s", "encoder_wait_s", "writing_s"):  # the slowest rank's
            setattr(total, name, max(getattr(total, name), getattr(part, name)))
    return total, [name for _, names in parts for name in names]
