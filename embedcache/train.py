"""Phase two: train SAM's mask decoder, and nothing else, against the embedding cache.

Read top to bottom: split the cache's cases into train and validation (by patient, seeded), put
the embeddings where the decoder runs (on the device once when they fit, else streamed from
HDF5 with read-ahead), then a plain loop: jittered box prompts → batched prompt encoder (frozen)
+ mask decoder (trained) → Dice + cross-entropy → AdamW with warm-up and cosine decay. Each epoch
ends with validation Dice, an atomic checkpoint, the best decoder kept, and early stopping.

Distributed: under ``torchrun`` every rank draws the same global batch and trains on its share of
the slices; each rank's loss is its prompts' sum over the global prompt count, so DDP's gradient
average reproduces one process's step.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from embedcache import cache as store
from embedcache.backbones import get_backbone, load_backbone, resolve_checkpoint, file_sha256
from embedcache.decoder import decode_boxes
from embedcache.devices import keep_freed_memory, pick_device
from embedcache.errors import EmbedcacheError
from embedcache.losses import dice_ce_per_prompt
from embedcache.prompts import jitter_boxes
from embedcache.readahead import ReadAhead

LAST, BEST, CONFIG, SPLIT, LOG = "last.pt", "decoder.pt", "config.json", "split.json", "log.csv"
LOW_RES = 256  # the decoder's mask logits are 256×256 over the encoder input


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of phase two. ``checkpoint=None``: the backbone's bundled weights."""

    cache: str = ""
    epochs: int = 30
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 8  # slices per step; each brings all its prompts (both glands)
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    box_jitter: float = 0.1  # each box edge moves up to this fraction of the box size, per step
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0
    patience: int = 10  # epochs without a better validation Dice before stopping
    precision: str = "auto"  # auto: bf16 on CUDA where supported, else fp16; fp32 on CPU
    compile: bool = False
    resident: str = "auto"  # auto | device | stream: where the embeddings live during training
    micro_batch: int = 0  # prompts per forward/backward within a step; 0: all on CUDA, 4 on CPU
    model: str | None = None  # None: the cache's backbone
    checkpoint: str | None = None

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must lie between 0 and 1, got {self.val_fraction}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("--epochs and --batch-size must be at least 1")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {self.precision}")
        if self.resident not in ("auto", "device", "stream"):
            raise ValueError(f"resident must be auto, device or stream, got {self.resident}")


# ------------------------------------------------------------------------------------------------ data


def split_cases(names: list[str], *, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split by case (patient): no case on both sides, at least one on each."""
    if len(names) < 2:
        raise EmbedcacheError(f"the cache holds {len(names)} case(s); a train/validation split needs at least 2")
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = min(max(1, round(len(names) * val_fraction)), len(names) - 1)
    val = sorted(names[i] for i in order[:n_val])
    return sorted(n for n in names if n not in val), val


@dataclass(frozen=True)
class Prompts:
    """Box prompts of a set of slices: prompt ``i`` asks for label slot ``slot[i]`` on slice ``slice_of[i]``."""

    rows: np.ndarray  # (S,) cache rows of the slices
    slice_of: np.ndarray  # (P,) index into rows
    slot: np.ndarray  # (P,) index into the cache's labels
    boxes: np.ndarray  # (P, 4) x0, y0, x1, y1 in slice pixels

    @classmethod
    def from_cache(cls, cache: store.Cache, rows: np.ndarray) -> "Prompts":
        boxes = cache.boxes[:][rows]  # (S, L, 4)
        present = ~np.isnan(boxes).any(axis=2)
        slice_of, slot = np.nonzero(present)
        return cls(rows=rows, slice_of=slice_of, slot=slot, boxes=boxes[slice_of, slot].astype(np.float32))

    def of_slices(self, slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The prompts on the given slices, grouped by slice, and each one's position in ``slices``."""
        groups = [self._by_slice[s] for s in slices]
        if not groups:
            return np.zeros(0, int), np.zeros(0, int)
        return np.concatenate(groups), np.repeat(np.arange(len(slices)), [len(g) for g in groups])

    def count(self, slices: np.ndarray) -> int:
        return int(sum(len(self._by_slice[s]) for s in slices))

    @cached_property  # writes the instance __dict__ directly, so it works on a frozen dataclass
    def _by_slice(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.slice_of == s) for s in range(len(self.rows))]


class SliceStore:
    """Embeddings and masks of a set of cache rows, on the training device or read from HDF5 per batch."""

    def __init__(self, cache: store.Cache, rows: np.ndarray, *, device: torch.device, resident: bool):
        self.cache, self.rows, self.device, self.resident = cache, rows, device, resident
        if resident:
            order = np.argsort(rows)  # h5py reads rows in increasing order
            embeddings = np.empty((len(rows), *cache.embeddings.shape[1:]), dtype=cache.embeddings.dtype)
            masks = np.empty((len(rows), *cache.masks.shape[1:]), dtype=np.uint8)
            for start in range(0, len(rows), 64):
                chunk = order[start : start + 64]
                embeddings[chunk] = cache.embeddings[rows[chunk]]
                masks[chunk] = cache.masks[rows[chunk]]
            self.embeddings = torch.from_numpy(embeddings).to(device)
            self.masks = torch.from_numpy(masks).to(device)

    def get(self, slices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, 256, 64, 64)`` embeddings (stored dtype) and ``(n, S, S)`` uint8 masks of local slices."""
        if self.resident:
            index = torch.from_numpy(slices).to(self.device)
            return self.embeddings[index], self.masks[index]
        rows = self.rows[slices]
        unique, inverse = np.unique(rows, return_inverse=True)
        emb = torch.from_numpy(self.cache.embeddings[unique])[torch.from_numpy(inverse)]
        masks = torch.from_numpy(self.cache.masks[unique])[torch.from_numpy(inverse)]
        pin = self.device.type == "cuda"
        return (
            (emb.pin_memory() if pin else emb).to(self.device, non_blocking=pin),
            (masks.pin_memory() if pin else masks).to(self.device, non_blocking=pin),
        )


def fits_on_device(n_rows: int, bytes_per_row: int, device: torch.device) -> bool:
    """True when the rows take at most half of the device's free memory (RAM for the CPU)."""
    need = n_rows * bytes_per_row
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return False
    return need <= free // 2


@dataclass
class Batch:
    embeddings: torch.Tensor  # (P, 256, 64, 64): each prompt's slice embedding (repeated per prompt)
    boxes: torch.Tensor  # (P, 4) in encoder-input pixels
    targets: torch.Tensor  # (P, 1, 256, 256) soft targets in [0, 1]
    masks: torch.Tensor  # (P, S, S) bool, full-resolution targets (validation Dice)


def make_batch(
    data: SliceStore, prompts: Prompts, slices: np.ndarray, *, labels: tuple[int, ...], box_scale: float,
    boxes: np.ndarray | None = None, slice_size: int = 512,
) -> Batch:
    """The prompts of ``slices`` (local indices) with their embeddings and targets on the device.

    ``boxes`` replaces ``prompts.boxes`` (same indexing), e.g. with jittered boxes.
    """
    which, local = prompts.of_slices(slices)
    emb, masks = data.get(slices)
    boxes = (prompts.boxes if boxes is None else boxes)[which]
    label_ids = torch.tensor(labels, device=masks.device)[torch.from_numpy(prompts.slot[which]).to(masks.device)]
    index = torch.from_numpy(local).to(masks.device)
    target = masks[index] == label_ids[:, None, None]
    # Loss at the decoder's native 256²: area averaging (2×2 for 512² slices) keeps a one-pixel-wide
    # limb as a half-weight target instead of dropping it, as nearest sampling would.
    if slice_size >= LOW_RES:
        soft = F.adaptive_avg_pool2d(target[:, None].float(), LOW_RES)
    else:
        soft = F.interpolate(target[:, None].float(), size=(LOW_RES, LOW_RES), mode="bilinear", align_corners=False)
    return Batch(
        embeddings=emb[index],
        boxes=torch.from_numpy(boxes * box_scale).to(emb.device),
        targets=soft,
        masks=target,
    )


# ----------------------------------------------------------------------------------------------- model


class BoxDecoder(torch.nn.Module):
    """Prompt encoder (frozen) + mask decoder (trained) as one module, so DDP sees one forward."""

    def __init__(self, prompt_encoder: torch.nn.Module, mask_decoder: torch.nn.Module):
        super().__init__()
        self.prompt_encoder = prompt_encoder.requires_grad_(False)
        self.mask_decoder = mask_decoder.requires_grad_(True)
        # Single-mask output: the loss never reaches the IoU head or the hypernetworks of the three
        # multimask tokens. Frozen, they stay as released (and DDP finds no unused parameters).
        mask_decoder.iou_prediction_head.requires_grad_(False)
        for mlp in mask_decoder.output_hypernetworks_mlps[1:]:
            mlp.requires_grad_(False)

    def forward(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``(P, 256, 64, 64)`` embeddings, ``(P, 4)`` boxes → ``(P, 1, 256, 256)`` mask logits."""
        return decode_boxes(self.prompt_encoder, self.mask_decoder, embeddings, boxes)[0]


def micro_batch_for(config: FinetuneConfig, device: torch.device) -> int:
    """Prompts per forward/backward: ``config.micro_batch``, or 0 (all at once) on CUDA and 4 on CPU."""
    if config.micro_batch:
        return config.micro_batch
    return 0 if device.type == "cuda" else 4


def autocast_for(device: torch.device, precision: str):
    if device.type != "cuda" or precision == "fp32":
        return nullcontext(), None
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def lr_lambda(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def dice_2d(logits_low: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-prompt Dice at full slice resolution: ``(P, 1, 256, 256)`` logits vs ``(P, S, S)`` masks.

    Both empty counts as 1 (FLARE22's rule).
    """
    size = masks.shape[-1]
    pred = F.interpolate(logits_low.float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0] > 0
    inter = (pred & masks).sum((1, 2)).float()
    total = (pred.sum((1, 2)) + masks.sum((1, 2))).float()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


# ----------------------------------------------------------------------------------------- checkpoints


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)


@dataclass(frozen=True)
class TrainedDecoder:
    """A fine-tuned decoder as saved by ``finetune``: its weights, the cache signature it was trained
    on, the file it came from and the backbone weights the run started from (None: bundled)."""

    state: dict
    signature: dict
    source: Path
    checkpoint: Path | None


def load_trained_decoder(run_dir: Path | None = None, decoder_file: Path | None = None) -> TrainedDecoder:
    """``decoder_file``, or the best decoder of ``run_dir``."""
    path = Path(decoder_file) if decoder_file else Path(run_dir) / BEST
    state = load_checkpoint(path)
    if "decoder" not in state or "signature" not in state:
        raise EmbedcacheError(f"{path}: not an embedcache decoder checkpoint; pass RUN_DIR/decoder.pt")
    weights = state.get("config", {}).get("checkpoint")
    return TrainedDecoder(state["decoder"], state["signature"], path, Path(weights) if weights else None)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise EmbedcacheError(f"{path}: no checkpoint; train first (embedcache finetune) or check the run folder")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise EmbedcacheError(
            f"{path}: checkpoint is corrupt or truncated ({type(exc).__name__}); delete it and train again"
        ) from None


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_dice: float
    lr: float
    seconds: float
    prompts_per_s: float
    best: bool = False


@dataclass
class FinetuneResult:
    run_dir: Path
    vanilla_val_dice: float
    best_val_dice: float
    best_epoch: int
    history: list[EpochRecord] = field(default_factory=list)
    stopped_early: bool = False


class _Dist:
    """torchrun's environment, or a single process."""

    def __init__(self, device_name: str):
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.dist = dist
        if self.world > 1 and not dist.is_initialized():
            use_cuda = device_name != "cpu" and torch.cuda.is_available()
            dist.init_process_group("nccl" if use_cuda else "gloo")
            if use_cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                device_name = f"cuda:{torch.cuda.current_device()}"
            else:
                device_name = "cpu"
        self.device_name = device_name

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            self.dist.barrier()



def expected_signature(cache: store.Cache, config: FinetuneConfig) -> dict:
    """The signature a cache must carry for this fine-tune: the chosen backbone and the weights it starts from."""
    backbone = get_backbone(config.model or cache.signature["backbone"])
    weights = resolve_checkpoint(backbone, Path(config.checkpoint) if config.checkpoint else None)
    return {**cache.signature, "backbone": backbone.name, "input_size": backbone.input_size,
            "checkpoint_sha256": file_sha256(weights)}


def finetune(
    config: FinetuneConfig, run_dir: Path, *, resume: bool = False, progress=None, log=print, on_epoch=None
) -> FinetuneResult:
    """Train the mask decoder on ``config.cache``; write checkpoints, config, split and log to ``run_dir``."""
    run_dir = Path(run_dir)
    dist = _Dist(config.device)
    device = pick_device(dist.device_name)
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise EmbedcacheError(f"{run_dir}: run folder exists; pass --resume to continue it or choose a new --out")
    if resume and not (run_dir / LAST).exists():
        raise EmbedcacheError(f"{run_dir}: nothing to resume (no {LAST}); start without --resume")

    if device.type == "cpu":
        keep_freed_memory()
    cache = store.open_cache(Path(config.cache))
    try:
        store.check_signature(cache.signature, expected_signature(cache, config), path=Path(config.cache))
        return _train(cache, config, run_dir, dist, device, resume=resume, progress=progress, log=log, on_epoch=on_epoch)
    finally:
        cache.close()


def _train(cache, config, run_dir, dist, device, *, resume, progress, log, on_epoch) -> FinetuneResult:
    backbone = get_backbone(cache.signature["backbone"])
    slice_size = cache.signature["preprocess"]["slice_size"]
    labels = tuple(cache.labels)
    names = [c.name for c in cache.cases if c.n_rows > 0]
    train_names, val_names = split_cases(names, val_fraction=config.val_fraction, seed=config.seed)
    rows_of = {c.name: np.arange(c.first_row, c.first_row + c.n_rows) for c in cache.cases}
    train_rows = np.concatenate([rows_of[n] for n in train_names])
    val_rows = np.concatenate([rows_of[n] for n in val_names])

    bytes_per_row = int(np.prod(cache.embeddings.shape[1:])) * cache.embeddings.dtype.itemsize + slice_size**2
    resident = config.resident == "device" or (
        config.resident == "auto" and fits_on_device(len(train_rows) + len(val_rows), bytes_per_row, device)
    )
    train_data = SliceStore(cache, train_rows, device=device, resident=resident)
    val_data = SliceStore(cache, val_rows, device=device, resident=resident)
    train_prompts, val_prompts = Prompts.from_cache(cache, train_rows), Prompts.from_cache(cache, val_rows)
    if len(train_prompts.boxes) == 0 or len(val_prompts.boxes) == 0:
        raise EmbedcacheError(f"{config.cache}: no box prompts on one side of the split; encode more cases")

    parts, _ = load_backbone(backbone, Path(config.checkpoint) if config.checkpoint else None)
    model = BoxDecoder(parts.prompt_encoder, parts.mask_decoder).to(device)
    del parts  # the image encoder is not needed: the cache holds its output
    trainable = [p for p in model.mask_decoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, max(1, int(config.warmup_fraction * total_steps)))
    )
    autocast, scaler = autocast_for(device, config.precision)
    net = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)
    box_scale = backbone.box_scale(slice_size)

    def batch_of(slices, boxes=None, data=train_data, prompts=train_prompts):
        return make_batch(data, prompts, slices, labels=labels, box_scale=box_scale, boxes=boxes, slice_size=slice_size)

    @torch.no_grad()
    def validate() -> tuple[float, float]:
        model.eval()
        dices, losses = [], []
        for start in range(0, len(val_rows), config.batch_size):
            batch = batch_of(np.arange(start, min(start + config.batch_size, len(val_rows))),
                             data=val_data, prompts=val_prompts)
            if len(batch.boxes) == 0:
                continue
            with autocast:
                logits = model(batch.embeddings, batch.boxes)
            losses.append(dice_ce_per_prompt(logits, batch.targets))
            dices.append(dice_2d(logits, batch.masks))
        return torch.cat(losses).mean().item(), torch.cat(dices).mean().item()

    history: list[EpochRecord] = []
    start_epoch, best_dice, best_epoch, since_best = 1, -1.0, 0, 0
    if resume:
        state = load_checkpoint(run_dir / LAST)
        try:
            model.mask_decoder.load_state_dict(state["decoder"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise EmbedcacheError(
                f"{run_dir / LAST}: checkpoint does not fit this run ({str(exc).splitlines()[0][:100]}); start a new run"
            ) from None
        start_epoch = state["epoch"] + 1
        best_dice, best_epoch, since_best = state["best_dice"], state["best_epoch"], state["since_best"]
        vanilla_dice = state["vanilla_val_dice"]
        history = [EpochRecord(**h) for h in state["history"]]
        log(f"resuming {run_dir} after epoch {state['epoch']} (best val Dice {best_dice:.4f} at epoch {best_epoch})")
    else:
        vanilla_loss, vanilla_dice = validate()
        if dist.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            from embedcache.config import save_config

            save_config(config, run_dir / CONFIG)
            (run_dir / SPLIT).write_text(json.dumps({"train": train_names, "val": val_names, "seed": config.seed}, indent=2) + "\n")
            _append_log(run_dir, EpochRecord(0, float("nan"), vanilla_loss, vanilla_dice, 0.0, 0.0, 0.0))
        log(f"vanilla decoder: val Dice {vanilla_dice:.4f} on {len(val_prompts.boxes)} prompts of {len(val_names)} case(s)")

    task = progress.add_task("finetune", total=(config.epochs - start_epoch + 1) * steps_per_epoch) if progress else None
    board = _tensorboard(run_dir) if dist.main else None
    step_fn = TrainStep(net, optimizer, scheduler, trainable, autocast=autocast, scaler=scaler,
                        grad_clip=config.grad_clip, world=dist.world, micro_batch=micro_batch_for(config, device))
    stopped_early = False
    for epoch in range(start_epoch, config.epochs + 1):
        model.train()
        model.prompt_encoder.eval()
        rng = np.random.default_rng([config.seed, epoch])
        order = rng.permutation(len(train_rows))
        batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        # Every rank draws the same global batches and jitter; each trains on its share of the slices.
        jitter_seeds = rng.integers(0, 2**63, size=len(batches))

        def make(item):
            slices, seed = item
            boxes = train_prompts.boxes
            if config.box_jitter > 0:  # jitter the whole global batch, so each prompt moves the same on any rank
                which, _ = train_prompts.of_slices(np.sort(slices))
                boxes = boxes.copy()
                boxes[which] = jitter_boxes(boxes[which], fraction=config.box_jitter, rng=np.random.default_rng(seed),
                                            limit=float(slice_size))
            batch = batch_of(np.sort(slices[dist.rank :: dist.world]), boxes=boxes)
            return batch, train_prompts.count(slices)

        started = time.perf_counter()
        items = zip(batches, jitter_seeds)
        feeder = (make(item) for item in items) if resident else ReadAhead(make, items, depth=3)
        try:
            for batch, global_count in feeder:
                step_fn(batch, global_count)
                if progress:
                    progress.advance(task)
        finally:
            if isinstance(feeder, ReadAhead):
                feeder.close()
        train_loss, seen, bad_step = step_fn.end_epoch()
        seconds = time.perf_counter() - started
        if bad_step is not None:
            rows = sorted(int(r) for r in train_rows[batches[bad_step]])
            raise EmbedcacheError(
                f"loss is not finite at epoch {epoch}, step {bad_step + 1} (cache rows {rows[:8]}"
                f"{' …' if len(rows) > 8 else ''}); lower --lr. The last good checkpoint is {run_dir / LAST}"
            )
        val_loss, val_dice = validate()
        record = EpochRecord(
            epoch=epoch, train_loss=train_loss, val_loss=val_loss, val_dice=val_dice,
            lr=scheduler.get_last_lr()[0], seconds=seconds, prompts_per_s=seen * dist.world / seconds,
        )
        if val_dice > best_dice:
            best_dice, best_epoch, since_best, record.best = val_dice, epoch, 0, True
        else:
            since_best += 1
        history.append(record)
        if dist.main:
            decoder_state = {k: v.detach().cpu() for k, v in model.mask_decoder.state_dict().items()}
            meta = {"config": asdict(config), "signature": cache.signature, "epoch": epoch}
            if record.best:
                atomic_save({**meta, "decoder": decoder_state, "val_dice": val_dice}, run_dir / BEST)
            atomic_save({
                **meta, "decoder": decoder_state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "best_dice": best_dice, "best_epoch": best_epoch, "since_best": since_best,
                "vanilla_val_dice": vanilla_dice, "history": [asdict(h) for h in history],
            }, run_dir / LAST)
            _append_log(run_dir, record)
            if board is not None:
                for key in ("train_loss", "val_loss", "val_dice", "lr", "prompts_per_s"):
                    board.add_scalar(key, getattr(record, key), epoch)
                board.flush()
            if on_epoch:
                on_epoch(record)
        dist.barrier()
        if since_best >= config.patience:
            stopped_early = True
            log(f"no better validation Dice for {config.patience} epochs: stopping after epoch {epoch}")
            break
    return FinetuneResult(run_dir, vanilla_dice, best_dice, best_epoch, history, stopped_early)


class TrainStep:
    """One optimizer step on a batch: forward, DiceCE, backward, clipping, AdamW, schedule.

    Losses and finiteness stay on the device until :meth:`end_epoch`, so a GPU step never waits
    for the host. ``global_count`` is the prompt count of the whole (all-rank) batch, and each
    prompt's loss is weighted by it, so a batch may run as micro-batches of ``micro_batch`` prompts
    whose gradients add up to the whole batch's (on 2 CPU cores a decoder forward + backward
    costs 0.23 s per prompt in fours and 0.36 s in sixteens: the activations leave the caches).
    """

    def __init__(self, net, optimizer, scheduler, params, *, autocast, scaler, grad_clip: float, world: int = 1,
                 micro_batch: int = 0):
        self.net, self.optimizer, self.scheduler, self.params = net, optimizer, scheduler, params
        self.autocast, self.scaler, self.grad_clip, self.world = autocast, scaler, grad_clip, world
        self.micro_batch = micro_batch
        self._losses, self._finite, self._seen = [], [], 0

    def __call__(self, batch: Batch, global_count: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        n = len(batch.boxes)
        size = self.micro_batch or max(n, 1)
        chunks = [slice(i, i + size) for i in range(0, n, size)] or [slice(0, 0)]
        losses, finite = [], []
        for i, part in enumerate(chunks):
            # DDP: all-reduce the gradients once, on the last micro-batch.
            sync = nullcontext() if i == len(chunks) - 1 or not hasattr(self.net, "no_sync") else self.net.no_sync()
            with sync:
                with self.autocast:
                    logits = self.net(batch.embeddings[part], batch.boxes[part])
                    per_prompt = dice_ce_per_prompt(logits, batch.targets[part])
                loss = per_prompt.sum() * self.world / max(global_count, 1)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            losses.append(per_prompt.detach().sum())
            finite.append(torch.isfinite(loss.detach()))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.optimizer.step()
        self.scheduler.step()
        self._losses.append(torch.stack(losses).sum())
        self._finite.append(torch.stack(finite).all())
        self._seen += n

    def end_epoch(self) -> tuple[float, int, int | None]:
        """Mean training loss per prompt, prompts seen on this rank, and the first non-finite step (or None)."""
        if not self._losses:
            return float("nan"), 0, None
        finite = torch.stack(self._finite).cpu()
        bad = None if bool(finite.all()) else int((~finite).nonzero()[0, 0])
        loss = torch.stack(self._losses).sum().item() / max(self._seen, 1)
        seen = self._seen
        self._losses, self._finite, self._seen = [], [], 0
        return loss, seen, bad


def _append_log(run_dir: Path, record: EpochRecord) -> None:
    path = run_dir / LOG
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(record)))
        if new:
            writer.writeheader()
        writer.writerow(asdict(record))


def _tensorboard(run_dir: Path):
    """A TensorBoard writer in ``run_dir/tensorboard`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def export_run(run_dir: Path, out: Path, *, checkpoint: Path | None = None) -> Path:
    """Write a full checkpoint in the backbone's own layout: its original image encoder and prompt
    encoder with the run's best mask decoder. Meta SAM / MedSAM files load with
    ``segment_anything.sam_model_registry[...](checkpoint=out)``; LiteMedSAM files keep LiteMedSAM's
    state-dict layout (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).
    """
    from embedcache.backbones import read_state_dict

    run_dir, out = Path(run_dir), Path(out)
    state = load_checkpoint(run_dir / BEST)
    signature, config = state["signature"], state["config"]
    backbone = get_backbone(signature["backbone"])
    given = checkpoint or config.get("checkpoint")
    weights = resolve_checkpoint(backbone, Path(given) if given else None)
    if file_sha256(weights) != signature["checkpoint_sha256"]:
        raise EmbedcacheError(
            f"{weights}: not the weights the run in {run_dir} was trained from (sha256 differs); "
            "pass the original file with --checkpoint"
        )
    full = read_state_dict(weights)
    decoder_keys = {k for k in full if k.startswith("mask_decoder.")}
    if decoder_keys != {"mask_decoder." + k for k in state["decoder"]}:
        raise EmbedcacheError(f"{run_dir / BEST}: decoder does not fit {weights}; was the run made with another model?")
    full.update({"mask_decoder." + k: v for k, v in state["decoder"].items()})
    if not out.parent.exists():
        raise EmbedcacheError(f"{out.parent}: folder does not exist; create it or choose another --out")
    atomic_save(full, out)
    return out
