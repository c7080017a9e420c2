"""The trainable model and its optimizer step, built in one place for finetune, tests and benchmarks.

:func:`build_trainer` loads a backbone's prompt encoder and mask decoder (the image encoder is not
needed: the cache holds its output), freezes all but the mask decoder (and, unless ``--iou-head``,
its IoU head), and assembles AdamW with
linear warm-up and cosine decay, mixed precision on CUDA, and DDP under ``torchrun``.
:class:`TrainStep` runs one optimizer step on a batch.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embedcache.config import FinetuneConfig
from embedcache.model.backbones import Backbone, load_backbone
from embedcache.model.clicks import SEED_BITS, interior_click, training_clicks
from embedcache.model.decoder import PromptDecoder
from embedcache.model.losses import dice_ce_per_prompt, iou_mse_per_prompt
from embedcache.model.refine import refine_loss
from embedcache.train.data import Batch


def lr_factor(total_steps: int, warmup_steps: int):
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def autocast_for(device: torch.device, precision: str):
    """The autocast context and GradScaler (fp16 only) for ``precision`` on ``device``; CPU runs fp32."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext(), None
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def micro_batch_for(config: FinetuneConfig, device: torch.device) -> int:
    """Prompts per forward/backward: ``config.micro_batch``, or 0 (all at once) on CUDA and 4 on CPU."""
    if config.micro_batch:
        return config.micro_batch
    return 0 if device.type == "cuda" else 4


class TrainStep:
    """One optimizer step on a batch: forward, DiceCE (plus the IoU head's MSE when it is trained),
    backward, clipping, AdamW, schedule.

    Losses and finiteness stay on the device until :meth:`end_epoch`, so a GPU step never waits
    for the host. ``global_count`` is the prompt count of the whole (all-rank) batch, and each
    prompt's loss is weighted by it, so a batch may run as micro-batches of ``micro_batch`` prompts
    whose gradients add up to the whole batch's (on a CPU small micro-batches are faster per prompt: the
    activations of large ones leave the caches).
    """

    def __init__(self, net, optimizer, scheduler, params, *, autocast, scaler, grad_clip: float, world: int = 1,
                 micro_batch: int = 0, iou_weight: float = 0.0, plain=None, input_size: int = 1024, rounds: int = 0,
                 round_loss: str = "every"):
        self.net, self.optimizer, self.scheduler, self.params = net, optimizer, scheduler, params
        self.plain = plain if plain is not None else net  # the module itself, for the click's no-grad forward
        self.input_size = input_size  # the encoder input's side: where training clicks are placed
        self.iou_weight = iou_weight  # the IoU head's MSE joins the loss with this weight (0: the head is frozen)
        self.autocast, self.scaler, self.grad_clip, self.world = autocast, scaler, grad_clip, world
        self.micro_batch = micro_batch
        self.rounds, self.round_loss = rounds, round_loss  # --prompts interactive (rounds 0: the other modes)
        self._losses, self._finite, self._seen = [], [], 0

    def _chunks(self, batch: Batch) -> list[tuple[object, bool, int]]:
        """``(prompts, box given, points)`` per forward: micro-batches of prompts of the same kind (SAM takes
        one point count per call). Without clicks, slices of the batch, as always."""
        n = len(batch.boxes)
        groups = [(True, 0, np.arange(n))] if batch.clicks is None else batch.clicks.groups()
        chunks = []
        for box, k, index in groups:
            size = self.micro_batch or max(len(index), 1)
            for i in range(0, len(index), size):
                part = index[i : i + size]
                chunks.append((slice(int(part[0]), int(part[-1]) + 1) if batch.clicks is None
                               else torch.from_numpy(part).to(batch.boxes.device), box, k))
        return chunks or [(slice(0, 0), True, 0)]

    def _forward(self, batch: Batch, part, box: bool, k: int):
        """Logits and predicted IoU of the prompts ``part``, with ``k`` training clicks each (and their box, if ``box``)."""
        embeddings, boxes = batch.embeddings[part], batch.boxes[part]
        if k == 0:
            return self.net(embeddings, boxes)

        prediction = None
        if box:  # the clicks correct what the decoder draws for the box alone
            with torch.no_grad():
                prediction, _ = self.plain(embeddings, boxes)
        points = training_clicks(batch.targets[part], k, batch.clicks.seeds[part], input_size=self.input_size,
                                 prediction=prediction, boxes=boxes if box else None)
        return self.net(embeddings, boxes if box else None, points)

    def _per_prompt(self, logits, iou, target, batch: Batch, part):
        per_prompt = dice_ce_per_prompt(logits, target)
        if self.iou_weight:
            per_prompt = per_prompt + self.iou_weight * iou_mse_per_prompt(iou, logits, target)
        refiner = getattr(getattr(self.plain, "mask_decoder", None), "refiner", None)
        if refiner is not None:  # finetune --refine-head: the head's loss in each prompt's window joins the decoder's
            per_prompt = per_prompt + refine_loss(refiner, logits, batch.pixels[part], batch.masks[part],
                                                  batch.boxes[part] / batch.box_scale)
        return per_prompt

    def _plan_rounds(self, seeds: torch.Tensor) -> list[bool]:
        """Whether each round after the first adds a click: all but the last, and (from 5 rounds) one in the middle,
        chosen by the batch's first seed, as SAM's loop keeps two rounds without a new point."""
        adds = [True] * (self.rounds - 2) + [False]
        if self.rounds >= 5:
            adds[int(seeds[:1].sum().item()) % (self.rounds - 2)] = False
        return adds

    def _rounds(self, batch: Batch, part, sync, backward) -> tuple[torch.Tensor, torch.Tensor]:
        """``--prompts interactive`` on prompts ``part``: the box alone, then ``rounds - 1`` rounds, each fed the round
        before's logits (detached) as the mask prompt and, where it adds one, a click on the most interior pixel of
        that round's error (:func:`~embedcache.model.clicks.interior_click`); each round that has a loss (every round,
        or the last) runs forward and ``backward(per_prompt, weight)`` inside ``sync(last round)``. The last round's
        per-prompt loss and finiteness come back."""
        embeddings, boxes, target = batch.embeddings[part], batch.boxes[part], batch.targets[part]
        seeds = batch.clicks.seeds[part]
        adds = self._plan_rounds(seeds)
        weight = 1.0 / self.rounds if self.round_loss == "every" else 1.0
        points = previous = None
        for r in range(self.rounds):
            if r and adds[r - 1]:
                xy, label = interior_click(target, previous, (seeds * 31 + r) % 2**SEED_BITS,
                                           input_size=self.input_size)
                points = (xy, label) if points is None else (torch.cat([points[0], xy], 1), torch.cat([points[1], label], 1))
            last = r == self.rounds - 1
            if self.round_loss == "every" or last:
                with sync(last):
                    with self.autocast:
                        logits, iou = self.net(embeddings, boxes, points, previous)
                        per_prompt = self._per_prompt(logits, iou, target, batch, part)
                    loss = backward(per_prompt, weight)
            else:
                with torch.no_grad(), self.autocast:
                    logits, _ = self.plain(embeddings, boxes, points, previous)
            previous = logits.detach().float()
        return per_prompt.detach(), torch.isfinite(loss.detach())

    def __call__(self, batch: Batch, global_count: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        n = len(batch.boxes)
        chunks = self._chunks(batch)
        losses, finite = [], []
        for i, (part, box, k) in enumerate(chunks):
            # DDP: all-reduce the gradients once, on the last backward (of the last round) of the last micro-batch.
            def sync(last: bool = True, final: bool = i == len(chunks) - 1):
                return nullcontext() if (final and last) or not hasattr(self.net, "no_sync") else self.net.no_sync()

            def backward(per_prompt, weight=1.0):
                loss = per_prompt.sum() * (weight * self.world / max(global_count, 1))
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                return loss

            if self.rounds and k:
                per_prompt, ok = self._rounds(batch, part, sync, backward)
            else:
                with sync():
                    with self.autocast:
                        logits, iou = self._forward(batch, part, box, k)
                        per_prompt = self._per_prompt(logits, iou, batch.targets[part], batch, part)
                    ok = torch.isfinite(backward(per_prompt).detach())
            losses.append(per_prompt.detach().sum())
            finite.append(ok)
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


@dataclass
class Trainer:
    """What a fine-tune trains with. ``model`` is the plain module (its ``mask_decoder`` is saved);
    ``step`` runs ``net``, which is ``model`` wrapped in DDP and/or ``torch.compile`` when asked."""

    model: PromptDecoder
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: TrainStep
    autocast: object

    def decoder_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.mask_decoder.state_dict().items()}


def build_trainer(backbone: Backbone, checkpoint: Path | None, config: FinetuneConfig, *, device: torch.device,
                  total_steps: int, world: int = 1) -> Trainer:
    """The prompt encoder (frozen) and mask decoder (trained) of ``backbone`` with ``checkpoint``'s
    weights (None: bundled), on ``device``, with AdamW, the lr schedule over ``total_steps`` and the step."""
    parts, _ = load_backbone(backbone, checkpoint)
    model = PromptDecoder(parts.prompt_encoder, parts.mask_decoder, train_iou=config.iou_head, adapter=config.adapter,
                          refine=config.refine_head).to(device)
    del parts  # the image encoder is not needed: the cache holds its output
    params = [p for p in model.mask_decoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, int(config.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(total_steps, warmup))
    autocast, scaler = autocast_for(device, config.precision)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)
    step = TrainStep(net, optimizer, scheduler, params, autocast=autocast, scaler=scaler, grad_clip=config.grad_clip,
                     world=world, micro_batch=micro_batch_for(config, device), iou_weight=1.0 if config.iou_head else 0.0,
                     plain=model, input_size=backbone.input_size,
                     rounds=config.rounds if config.prompts == "interactive" else 0, round_loss=config.round_loss)
    return Trainer(model=model, optimizer=optimizer, scheduler=scheduler, step=step, autocast=autocast)
