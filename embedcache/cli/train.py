"""Commands of phase two: ``finetune`` and ``export``."""

from __future__ import annotations

import os
from pathlib import Path

import click

from embedcache.cli.common import console, device_option, friendly_errors, progress_bar, progress_option, say_to
from embedcache.config import POINT_MODES


@click.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", "-o", "run_dir", required=True, type=click.Path(path_type=Path), help="Run folder to create.")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--lr", default=1e-4, show_default=True, type=float, help="Peak learning rate (AdamW).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 4096),
              help="Slices per step; each brings all its box prompts.")
@click.option("--val-fraction", default=0.2, show_default=True, type=float, help="Share of cases held out.")
@click.option("--seed", default=0, show_default=True, type=int)
@device_option
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--model", default=None, help="Backbone the cache must have been made with (default: the cache's).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="The backbone weights the cache was encoded with (default: bundled).")
@click.option("--box-jitter", default=0.1, show_default=True, type=float,
              help="Each box edge moves up to this fraction of the box size per step.")
@click.option("--patience", default=10, show_default=True, type=click.IntRange(1, 100_000),
              help="Stop after this many epochs without a better validation Dice.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
              help="Mixed precision on CUDA (auto: bf16 where supported, else fp16); CPU runs fp32.")
@click.option("--resident", default="auto", show_default=True, type=click.Choice(["auto", "device", "stream"]),
              help="Keep the cache on the device (auto: when it fits) or stream it from HDF5.")
@click.option("--micro-batch", default=0, show_default=True, type=click.IntRange(0, 4096),
              help="Prompts per forward/backward within a step (same gradients); 0: all on CUDA, 4 on CPU.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the decoder step (no faster on a 2-core CPU: see the README's benchmarks).")
@click.option("--split", "split_file", type=click.Path(path_type=Path), default=None,
              help='A split file {"train": [...], "val": [...], "test": [...]} instead of --val-fraction.')
@click.option("--stop-prompts/--no-stop-prompts", default=True, show_default=True,
              help="Also train on the slices just beyond each gland, prompted with the neighbour's box (target: empty).")
@click.option("--stop-grow-mm", default=3.0, show_default=True, type=float,
              help="Stop and propagated prompts: the neighbour's box grows by this much, as score's --grow-mm grows box3d's.")
@click.option("--train-prompts", default="jitter:1,loose:1,propagated:1", show_default=True,
              help="Training boxes, a mix KIND[:WEIGHT],... of tight, jitter (--box-jitter), medsam (edges out 0-20 px "
                   "at 1024 px), loose (the 3-D box's in-plane extent) and propagated (a neighbour slice's box, grown), "
                   "e.g. jitter:2,loose:1,propagated:1.")
@click.option("--loose-margin-mm", default=6.0, show_default=True, type=float,
              help="Loose prompts: the gland's 3-D extent grows by a margin drawn from 0..this (mm).")
@click.option("--adapter", is_flag=True,
              help="Also train a small residual adapter on the cached embeddings (1x1 down, depthwise 3x3, 1x1 up), "
                   "in front of the decoder; the cache stays valid.")
@click.option("--iou-head/--no-iou-head", default=True, show_default=True,
              help="Also train the IoU head (MSE against each mask's true IoU), so score --min-iou and predict's "
                   "low-IoU slices can trust it.")
@click.option("--prompts", default="box", show_default=True, type=click.Choice(list(POINT_MODES)),
              help="What a training prompt carries: its box; its box and 0..--max-points corrective clicks (from the "
                   "error of the decoder's own mask); or mixed: a third each box, box + clicks, clicks alone.")
@click.option("--max-points", default=5, show_default=True, type=click.IntRange(1, 32),
              help="The most clicks a training prompt carries (--prompts box+points or mixed).")
@progress_option
@friendly_errors
def finetune(cache, run_dir, epochs, lr, batch_size, val_fraction, seed, device, resume, model, checkpoint,
             box_jitter, patience, precision, resident, micro_batch, compile_, split_file, stop_prompts, stop_grow_mm,
             train_prompts, loose_margin_mm, adapter, iou_head, prompts, max_points, progress):
    """Train only the mask decoder on the embedding cache CACHE, with box prompts and DiceCE loss.

    Test cases (imagesTs/ of the encoded data) are held out; the rest are split into train and
    validation by patient (seeded), or as --split says; all saved as split.json. Each
    epoch reports validation Dice; the best decoder is kept as RUN_DIR/decoder.safetensors, the last state
    as RUN_DIR/last.safetensors, the settings as config.json and the epochs in log.csv.
    Under torchrun (`torchrun --nproc_per_node=K -m embedcache finetune ...`) it trains with DDP.
    """
    from embedcache.config import FinetuneConfig
    from embedcache.train.finetune import finetune as run_finetune

    config = FinetuneConfig(
        cache=os.path.abspath(cache), epochs=epochs, lr=lr, batch_size=batch_size, val_fraction=val_fraction, seed=seed,
        device=device, box_jitter=box_jitter, patience=patience, precision=precision, compile=compile_,
        resident=resident, micro_batch=micro_batch, model=model,
        checkpoint=os.path.abspath(checkpoint) if checkpoint else None,  # score and export read it from any folder
        split=os.path.abspath(split_file) if split_file else None, stop_prompts=stop_prompts,
        stop_grow_mm=stop_grow_mm, train_prompts=train_prompts, loose_margin_mm=loose_margin_mm,
        iou_head=iou_head, adapter=adapter, prompts=prompts, max_points=max_points,
    )
    out = console()
    say = say_to(out)
    table = _epoch_table()

    def on_epoch(record):
        table.add_row(*_epoch_cells(record))
        say(
            f"epoch {record.epoch:3d}  loss {record.train_loss:.4f}  val loss {record.val_loss:.4f}  "
            f"val Dice {record.val_dice:.4f}{' *' if record.best else '  '}  {record.seconds:6.2f} s  "
            f"{record.prompts_per_s:7.1f} prompts/s"
        )

    with progress_bar(progress) as bar:
        result = run_finetune(config, run_dir, resume=resume, given_fields=_typed_fields(), progress=bar,
                              on_epoch=on_epoch, log=say)
    if result.history:
        out.print(table)
    say(
        f"vanilla decoder val Dice {result.vanilla_val_dice:.4f} → fine-tuned {result.best_val_dice:.4f} "
        f"(epoch {result.best_epoch}); best decoder: {run_dir / 'decoder.safetensors'}"
    )


#: FinetuneConfig fields whose option is named otherwise in the command's parameters.
FIELD_OF_PARAMETER = {"compile_": "compile", "split_file": "split"}


def _typed_fields() -> frozenset[str]:
    """The FinetuneConfig fields whose options were typed on the command line: on ``--resume`` only
    these are held against the run's own settings."""
    ctx = click.get_current_context()
    return frozenset(FIELD_OF_PARAMETER.get(name, name) for name in ctx.params
                     if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE)


def _epoch_table():
    from rich.table import Table

    return Table("epoch", "train loss", "val loss", "val Dice", "seconds", "prompts/s", title="finetune")


def _epoch_cells(record) -> list[str]:
    return [
        f"{record.epoch}{' *' if record.best else ''}", f"{record.train_loss:.4f}", f"{record.val_loss:.4f}",
        f"{record.val_dice:.4f}", f"{record.seconds:.2f}", f"{record.prompts_per_s:.1f}",
    ]


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Checkpoint file to write.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="The original backbone weights, if not where the run found them.")
@click.option("--force", is_flag=True, help="Replace --out if it exists (never the backbone weights or the run's files).")
@friendly_errors
def export(run_dir, out, checkpoint, force):
    """Write RUN_DIR's best decoder into a full checkpoint in the backbone's own format.

    The original image encoder and prompt encoder with the fine-tuned mask decoder: SAM and MedSAM
    files load in plain segment_anything (`sam_model_registry["vit_b"](checkpoint=OUT)`), LiteMedSAM
    files keep LiteMedSAM's state-dict layout.
    """
    from embedcache.train.decoders import export_run

    click.echo(f"wrote {export_run(run_dir, out, checkpoint=checkpoint, force=force)}")
