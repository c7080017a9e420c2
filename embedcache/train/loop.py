"""Phase two: train SAM's mask decoder, and nothing else, against the embedding cache.

Read :func:`train` top to bottom: split the cache's cases into train and validation (by
patient, seeded), put the embeddings where the decoder runs, build the trainer, then one loop whose
epochs each train → validate → record → save → stop? The parts live elsewhere: the checks before
any of this and the resume policy in :mod:`embedcache.train.finetune`, the split in
:mod:`embedcache.train.cases`, data access in :mod:`embedcache.train.data`, the model and its
optimizer step in :mod:`embedcache.train.trainer`, the run folder in :mod:`embedcache.train.runs`
and its checkpoints in :mod:`embedcache.train.checkpoint`.

Distributed: under ``torchrun`` every rank draws the same global batch and trains on its share of
the slices; each rank's loss is its prompts' sum over the global prompt count, so DDP's gradient
average reproduces one process's step.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from embedcache.cache.records import MODEL_KEYS, Signature, first_difference
from embedcache.cache.store import Cache, open_cache
from embedcache.config import FinetuneConfig, parse_prompt_mix
from embedcache.errors import EmbedcacheError, reason
from embedcache.model.backbones import Weights, get_backbone
from embedcache.model.losses import dice_2d, dice_ce_per_prompt, dice_on_slice
from embedcache.model.refine import PREFIX as REFINER
from embedcache.model.refine import has_refiner, refine_loss, refine_on_slice
from embedcache.runtime.devices import keep_freed_memory, pick_device
from embedcache.runtime.distributed import Dist
from embedcache.runtime.readahead import ReadAhead
from embedcache.train.cases import Split, augmented_of
from embedcache.train.checkpoint import BEST, Checkpoint, load_checkpoint, save_checkpoint
from embedcache.train.data import CaseSet, case_sets, draw_boxes, draw_clicks
from embedcache.train.decoders import load_decoder_state, load_trained_decoder
from embedcache.train.runs import LAST, EpochRecord, RunFolder
from embedcache.train.trainer import Trainer, build_trainer

logger = logging.getLogger(__name__)


@dataclass
class RunState:
    """Where a run stands after an epoch: what ``--resume`` restores besides the weights."""

    epoch: int = 0  # the last finished epoch (0: none yet)
    best_dice: float = -1.0
    best_epoch: int = 0
    since_best: int = 0
    vanilla_dice: float = math.nan
    history: list[EpochRecord] = field(default_factory=list)

    def record(self, record: EpochRecord) -> None:
        """Add an epoch; mark it best when its validation Dice beats every earlier one."""
        if record.val_dice > self.best_dice:
            self.best_dice, self.best_epoch, self.since_best, record.best = record.val_dice, record.epoch, 0, True
        else:
            self.since_best += 1
        self.epoch = record.epoch
        self.history.append(record)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunState":
        return cls(**{**values, "history": [EpochRecord(**h) for h in values["history"]]})


@dataclass
class FinetuneResult:
    run_dir: Path
    vanilla_val_dice: float
    best_val_dice: float
    best_epoch: int
    history: list[EpochRecord] = field(default_factory=list)
    stopped_early: bool = False
    start_from: str | None = None  # the decoder the run started from (--from); None: the backbone's (vanilla_val_dice's)
    zoom: "FinetuneResult | None" = None  # a cache of both views: the glands' regions' run, in RUN_DIR/zoom


def train(config: FinetuneConfig, run: RunFolder, split: Split, *, resume: bool, view: str | None = None,
          progress=None, on_epoch=None) -> FinetuneResult:
    """Train the mask decoder on ``config.cache``'s ``split``; write checkpoints, config, split and log to
    ``run``, whose start :func:`embedcache.train.finetune.finetune` has checked (``resume``: continue it).
    ``view``: the one view of a cache of two the split's cases hold (``whole`` or ``regions``), which the
    checkpoints record as the embeddings the decoder was trained on (:meth:`Signature.of_view`)."""
    dist = Dist(config.device)
    device = pick_device(dist.device_name)
    if device.type == "cpu":
        keep_freed_memory()

    with open_cache(Path(config.cache)) as cache:
        cache.signature.check_matches(expected_signature(cache, config), path=Path(config.cache))
        sets = _case_sets(cache, config, device, split)
        trained_on = cache.signature.of_view(view)
        train, val = sets["train"], sets["val"]
        steps_per_epoch = math.ceil(len(train) / config.batch_size)
        trainer = build_trainer(get_backbone(cache.signature.backbone), _weights(config), config, device=device,
                                total_steps=steps_per_epoch * config.epochs, world=dist.world)
        fingerprint = _fingerprint(cache, sets, trained_on)
        if resume:
            state = _restore(run, trainer, cache, fingerprint, trained_on)
            logger.info(f"resuming {run.path} after epoch {state.epoch} (best val Dice {state.best_dice:.4f} at epoch {state.best_epoch})")
        else:
            state = _start(run, trainer, config, sets, dist, cache, fingerprint, split, trained_on)
            start = f"decoder of --from {config.start_from}" if config.start_from else "vanilla decoder"
            logger.info(f"{start}: val Dice {state.vanilla_dice:.4f} on {len(val.prompts.boxes)} prompts of {len(val.names)} case(s)")
        task = progress.add_task(f"finetune{' (regions)' if view == 'regions' else ''}", total=(config.epochs - state.epoch) * steps_per_epoch) if progress else None
        board = run.tensorboard() if dist.main else None  # None also where TensorBoard is not installed
        stopped_early = False
        for epoch in range(state.epoch + 1, config.epochs + 1):
            # train: one pass over the training slices in seeded order, boxes drawn as --train-boxes says
            started = time.perf_counter()
            train_loss, seen = train_epoch(trainer, train, config, epoch=epoch, dist=dist, resume_from=run.file(LAST),
                                           progress=progress, task=task)
            seconds = time.perf_counter() - started
            # validate: exact boxes, Dice at full slice resolution
            val_loss, val_dice = validate(trainer, val, batch_size=config.batch_size)
            # record and save: the best decoder, and the state to resume from
            record = EpochRecord(epoch=epoch, train_loss=train_loss, val_loss=val_loss, val_dice=val_dice,
                                 lr=trainer.scheduler.get_last_lr()[0], seconds=seconds,
                                 prompts_per_s=seen * dist.world / seconds)
            state.record(record)
            if dist.main:
                _save_epoch(run, trainer, state, config, trained_on, fingerprint, best=record.best)
                run.append_log(record, board)
                if on_epoch:
                    on_epoch(record)
            dist.barrier()
            # stop when validation has not improved for `patience` epochs
            if state.since_best >= config.patience:
                stopped_early = True
                logger.info(f"no better validation Dice for {config.patience} epochs: stopping after epoch {epoch}")
                break
    return FinetuneResult(run.path, state.vanilla_dice, state.best_dice, state.best_epoch, state.history, stopped_early,
                          config.start_from)


def expected_signature(cache: Cache, config: FinetuneConfig) -> Signature:
    """The signature a cache must carry for this fine-tune: the chosen backbone and the weights it starts from."""
    weights = Weights.of(config.model or cache.signature.backbone, config.checkpoint)
    return replace(cache.signature, backbone=weights.backbone.name, input_size=weights.backbone.input_size,
                   checkpoint_sha256=weights.sha256)


def _weights(config: FinetuneConfig) -> Path | None:
    return Path(config.checkpoint) if config.checkpoint else None


def _case_sets(cache: Cache, config: FinetuneConfig, device: torch.device, split: Split) -> dict[str, CaseSet]:
    """The train and validation sets of this run, on the device (or streamed)."""
    box_scale = get_backbone(cache.signature.backbone).box_scale(cache.signature.slice_size)
    train = list(split.train) + augmented_of(cache, split.train)  # copies train with their sources, never validate
    sets = case_sets(cache, {"train": train, "val": list(split.val)}, box_scale=box_scale, device=device,
                     resident=config.resident, stop_prompts=("train",) if config.stop_prompts else (),
                     pixels=config.refine_head)
    if len(sets["train"].prompts.boxes) == 0 or len(sets["val"].prompts.boxes) == 0:
        raise EmbedcacheError(f"{config.cache}: no box prompts on one side of the split; encode more cases")
    return sets


def train_epoch(trainer: Trainer, train: CaseSet, config: FinetuneConfig, *, epoch: int, dist: Dist, resume_from: Path,
                progress=None, task=None) -> tuple[float, int]:
    """One pass over ``train`` in an order seeded by (seed, epoch); the mean loss per prompt and the
    prompts this rank saw. A non-finite loss is an error that names the epoch, the step, its rows and
    the checkpoint to resume from."""
    trainer.model.train()
    trainer.model.prompt_encoder.eval()
    rng = np.random.default_rng([config.seed, epoch])
    order = rng.permutation(len(train))
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    jitter_seeds = rng.integers(0, 2**63, size=len(batches))
    # Every batch of the epoch planned on the host first (seeded boxes included); then steps only.
    plans = [_training_plan(slices, seed, train, config, dist) for slices, seed in zip(batches, jitter_seeds)]
    feeder = train.batches(plans)
    try:
        for batch, global_count in feeder:
            trainer.step(batch, global_count)
            if progress:
                progress.advance(task)
    finally:
        if isinstance(feeder, ReadAhead):
            feeder.close()
    loss, seen, bad_step = trainer.step.end_epoch()
    if bad_step is not None:
        rows = sorted(int(r) for r in train.prompts.rows[batches[bad_step]])
        raise EmbedcacheError(
            f"loss is not finite at epoch {epoch}, step {bad_step + 1} (cache rows {rows[:8]}"
            f"{' …' if len(rows) > 8 else ''}); lower --lr. The last good checkpoint is {resume_from}"
        )
    return loss, seen


def _training_plan(slices: np.ndarray, seed: int, train: CaseSet, config: FinetuneConfig, dist: Dist):
    """This rank's share of a global batch, its boxes drawn (``--train-boxes``) for the whole global
    batch, so that each prompt gets the same box on any rank."""
    boxes = train.prompts.boxes
    mix = parse_prompt_mix(config.train_prompts)
    which, _ = train.prompts.of_slices(np.sort(slices))
    if mix != {"jitter": 1.0} or config.box_jitter > 0:
        boxes = boxes.copy()
        boxes[which] = draw_boxes(train.prompts, which, mix=mix, rng=np.random.default_rng(seed),
                                  jitter=config.box_jitter, loose_margin_mm=config.loose_margin_mm,
                                  grow_mm=config.stop_grow_mm, limit=float(train.slice_size))
    clicks = None
    if config.prompts != "box":  # its own stream: the boxes are drawn as without points
        drawn = draw_clicks(train.prompts, which, mode=config.prompts, max_points=config.max_points,
                            rng=np.random.default_rng([seed, 1]))
        clicks = tuple(np.zeros(len(boxes), a.dtype) for a in drawn)
        for full, part in zip(clicks, drawn):
            full[which] = part
    return train.plan(np.sort(slices[dist.rank :: dist.world]), boxes=boxes, count=train.prompts.count(slices),
                      clicks=clicks)


@torch.no_grad()
def validate(trainer: Trainer, val: CaseSet, *, batch_size: int) -> tuple[float, float]:
    """Mean DiceCE loss and mean 2-D Dice (at full slice resolution) over ``val``'s prompts, exact boxes; with a
    refinement head, its loss joins the decoder's and the Dice is of its masks."""
    model = trainer.model.eval()
    refiner = getattr(model.mask_decoder, "refiner", None)
    dices, losses = [], []
    plans = [val.plan(np.arange(start, min(start + batch_size, len(val)))) for start in range(0, len(val), batch_size)]
    for batch, _ in val.batches([p for p in plans if len(p.local)]):
        with trainer.autocast:
            logits, _ = model(batch.embeddings, batch.boxes)
        loss = dice_ce_per_prompt(logits, batch.targets)
        if refiner is None:
            dices.append(dice_2d(logits, batch.masks))
        else:
            boxes = batch.boxes / batch.box_scale
            loss = loss + refine_loss(refiner, logits, batch.pixels, batch.masks, boxes)
            size = batch.masks.shape[-1]
            drawn = F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            dices.append(dice_on_slice(refine_on_slice(refiner, logits.float(), drawn, batch.pixels, boxes), batch.masks))
        losses.append(loss)
    return torch.cat(losses).mean().item(), torch.cat(dices).mean().item()


def _fingerprint(cache: Cache, sets: dict[str, CaseSet], trained_on: Signature) -> dict:
    """Which cases (and which versions of their sources) each set holds, and the embeddings' signature."""
    return {"signature": trained_on.to_dict(),
            **{key: {name: cache.case(name).digest for name in group.names} for key, group in sets.items()}}


def _start(run: RunFolder, trainer: Trainer, config: FinetuneConfig, sets: dict[str, CaseSet], dist: Dist,
           cache: Cache, fingerprint: dict, split: Split, trained_on: Signature) -> RunState:
    """A new run: load the decoder of ``--from`` if given (else the backbone's stays), score it, then write the
    settings, the split, log row 0 and the epoch-0 checkpoint, so that from here on the folder can always be
    resumed."""
    if config.start_from:  # checked by finetune before torch was imported; read through the safetensors loader
        trained = load_trained_decoder(Path(config.start_from), expect=cache.signature, expect_path=cache.path,
                                       view=None)
        if config.refine_head and not has_refiner(trained.state):  # a decoder without a head: its new head starts here
            new = {k: v for k, v in trainer.decoder_state().items() if k.startswith(REFINER)}
            trained = replace(trained, state={**trained.state, **new})
        load_decoder_state(trainer.model.mask_decoder, trained)
    vanilla_loss, vanilla_dice = validate(trainer, sets["val"], batch_size=config.batch_size)
    state = RunState(vanilla_dice=vanilla_dice)
    if dist.main:
        run.create(config, split)
        run.append_log(EpochRecord(0, float("nan"), vanilla_loss, vanilla_dice, 0.0, 0.0, 0.0))
        _save_epoch(run, trainer, state, config, trained_on, fingerprint, best=False)
    dist.barrier()
    return state


def _restore(run: RunFolder, trainer: Trainer, cache: Cache, fingerprint: dict, trained_on: Signature) -> RunState:
    """Load ``last.safetensors`` into the trainer; the run state it was saved with. Refuses a cache
    other than the run's, or one whose cases (or their sources) changed."""
    checkpoint = load_checkpoint(run.file(LAST))
    saved = checkpoint.data
    for key in ("train", "val"):
        if saved.get(key) != fingerprint[key]:
            changed = sorted(set(saved.get(key, {}).items()) ^ set(fingerprint[key].items()))
            raise EmbedcacheError(
                f"{cache.path}: not the data the run in {run.path} was trained on (its {key} cases differ at "
                f"{changed[0][0] if changed else '?'}); resume with the run's cache or start a new run"
            )
    before = Signature.from_dict(saved.get("signature"), source=run.file(LAST)).to_dict()  # older fields filled in
    difference = first_difference(trained_on.to_dict(), before, MODEL_KEYS)
    if difference:
        raise EmbedcacheError(f"{cache.path}: the run in {run.path} was trained on a cache with {difference}; "
                              "resume with the run's cache or start a new run")
    try:
        trainer.model.mask_decoder.load_state_dict(checkpoint.decoder)
        trainer.optimizer.load_state_dict(checkpoint.optimizer)
        trainer.scheduler.load_state_dict(checkpoint.scheduler)
        return RunState.from_dict(checkpoint.state)
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise EmbedcacheError(
            f"{run.file(LAST)}: checkpoint does not fit this run ({reason(exc)}); start a new run"
        ) from None


def _save_epoch(run: RunFolder, trainer: Trainer, state: RunState, config: FinetuneConfig, signature: Signature,
                fingerprint: dict, *, best: bool) -> None:
    """``decoder.safetensors`` when this epoch is the best so far; ``last.safetensors`` always."""
    val_dice = state.history[-1].val_dice if state.history else state.vanilla_dice
    common = dict(decoder=trainer.decoder_state(), signature=signature, config=asdict(config), epoch=state.epoch,
                  val_dice=val_dice)
    if best:
        save_checkpoint(Checkpoint(**common), run.file(BEST))
    save_checkpoint(Checkpoint(**common, optimizer=trainer.optimizer.state_dict(),
                               scheduler=trainer.scheduler.state_dict(), state=state.to_dict(), data=fingerprint),
                    run.file(LAST))
