"""Phase two's entry point: the checks that need no model, the resume policy, then the loop.

Everything here runs before torch is imported, so a mistyped cache, a run folder that cannot be
used or a split file naming a case the cache lacks costs a second; :func:`finetune` is what the CLI, tests and benchmarks call.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from embedcache.cache.store import Cache, open_cache
from embedcache.config import FinetuneConfig
from embedcache.errors import EmbedcacheError
from embedcache.io.files import file_sha256, make_output_folder, writer_lock
from embedcache.runtime.distributed import is_main_process
from embedcache.train.cases import check_split_in_cache, choose_split, view_split
from embedcache.train.decoders import ZOOM_AUTO, check_start_decoder, zoom_decoder_file
from embedcache.train.runs import CONFIG, RESUMABLE, RunFolder, resumed_config

if TYPE_CHECKING:
    from embedcache.train.loop import FinetuneResult


def finetune(config: FinetuneConfig, run_dir: Path, *, resume: bool = False, given_fields: frozenset[str] | None = None,
             progress=None, on_epoch=None, on_view=None) -> FinetuneResult:
    """Train the mask decoder on ``config.cache``; write checkpoints, config, split and log to ``run_dir``.

    ``resume`` continues the run in ``run_dir`` with its own settings: only those in
    :data:`~embedcache.train.runs.RESUMABLE` may change, taken from ``config``; any other field named
    in ``given_fields`` (None: every field of ``config``) that differs from the run's is refused.
    ``progress`` is a :class:`rich.progress.Progress` (or None); notes go to the ``embedcache`` logger;
    ``on_epoch`` is called with each epoch's :class:`~embedcache.train.runs.EpochRecord`.

    A cache of both views (``encode --zoom``) trains two decoders on one split of its patients: ``run_dir``'s on
    the whole slices, then ``run_dir/zoom``'s on the glands' regions (the result's ``zoom``); ``resume`` continues
    both; ``on_view`` is called with the view (``whole``, ``regions``) and its run folder as each begins.
    """
    run = RunFolder(run_dir)
    if resume and run.file(CONFIG).is_file():
        config = resumed_config(config, run.config(), path=run.file(CONFIG), given_fields=given_fields)
    main = is_main_process()  # under torchrun rank 0 writes the folder for all
    with open_cache(Path(config.cache)) as cache:  # checked before anything is written, the lock included
        if config.refine_head and not cache.signature.pixels:
            raise EmbedcacheError(f"{cache.path}: holds no slice pixels (encoded before the refinement head), which "
                                  "--refine-head trains on; encode the data again, or drop --refine-head")
        if main:
            make_output_folder(run.path.parent, what="--out's parent folder")
        with writer_lock(run.path, main=main):
            resume = run.check_start(resume=resume, keep=(config.split,))
            if not resume:  # a resumed run has its own weights: what it started from is its config's record
                config = started_from(config, cache)
            # a resumed run takes its own split, wherever the --split file went
            split = check_split_in_cache(run.split(), cache, run=run.path) if resume else choose_split(
                cache, split_file=config.split, val_fraction=config.val_fraction, seed=config.seed)
            from embedcache.train.loop import train

            if cache.signature.views != ("whole", "regions"):
                return train(config, run, split, resume=resume, progress=progress, on_epoch=on_epoch)
            # both views (encode --zoom): the whole slices' decoder in RUN_DIR, then the regions' in RUN_DIR/zoom
            zoom = run.zoom
            zoom_resume = zoom.check_start(resume=resume and zoom.path.exists(), keep=(config.split,))
            zoom_split = check_split_in_cache(zoom.split(), cache, run=zoom.path) if zoom_resume else \
                view_split(split, cache, "regions")
            zoom_config = regions_config(config, zoom, cache, resume=zoom_resume)
            if on_view:
                on_view("whole", run.path)
            whole = train(config, run, view_split(split, cache, "whole"), resume=resume,
                          view="whole", progress=progress, on_epoch=on_epoch)
            if on_view:
                on_view("regions", zoom.path)
            regions = train(zoom_config, zoom, zoom_split, resume=zoom_resume, view="regions", progress=progress,
                            on_epoch=on_epoch)
            return replace(whole, zoom=regions)


def regions_config(config: FinetuneConfig, zoom: RunFolder, cache: Cache, *, resume: bool) -> FinetuneConfig:
    """The settings of the regions' run ``zoom`` beside a run of ``config``: resumed, its own, with the settings a
    resume may change taken from ``config``; new, ``config``'s, starting (``--from RUN``) from RUN's own regions'
    decoder where it has one, else from the decoder ``--from`` names."""
    if resume:
        return resumed_config(config, zoom.config(), path=zoom.file(CONFIG), given_fields=frozenset(RESUMABLE))
    own = zoom_decoder_file(ZOOM_AUTO, Path(config.start_from)) if config.start_from else None
    return started_from(replace(config, start_from=str(own)), cache) if own else config


def started_from(config: FinetuneConfig, cache: Cache) -> FinetuneConfig:
    """``config`` with the sha256 of the decoder ``--from`` names (None without ``--from``), once that decoder is
    checked to fit ``cache`` and the run's decoder settings (:func:`~embedcache.train.decoders.check_start_decoder`)."""
    if not config.start_from:
        return replace(config, start_from_sha256=None)
    path = check_start_decoder(Path(config.start_from), signature=cache.signature, cache=cache.path,
                               adapter=config.adapter, interactive=config.prompts == "interactive",
                               refine=config.refine_head)
    return replace(config, start_from_sha256=file_sha256(path))
