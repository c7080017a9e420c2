"""Commands of phase two: ``finetune`` and ``export``."""

from __future__ import annotations

import os
from pathlib import Path

import click

from embedcache.cli.common import console, friendly_errors, progress_bar, progress_option, say_to
from embedcache.cli.options import old_spellings, options, typed
from embedcache.config import FinetuneConfig


@click.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", "-o", "run_dir", required=True, type=click.Path(path_type=Path), help="Run folder to create.")
@options(FinetuneConfig, "epochs", "lr", "batch_size", "val_fraction", "seed", "device")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@options(FinetuneConfig, "start_from", "model", "checkpoint", "box_jitter", "patience", "precision", "resident",
         "micro_batch", "compile", "split", "stop_prompts", "stop_grow_mm", "train_prompts", "loose_margin_mm", "adapter",
         "refine_head", "iou_head", "prompts", "max_points", "rounds", "round_loss")
@progress_option
@friendly_errors
def finetune(cache, run_dir, resume, progress, **settings):
    """Train only the mask decoder on the embedding cache CACHE, with box prompts and DiceCE loss.

    Test cases (imagesTs/ of the encoded data) are held out; the rest are split into train and
    validation by patient (seeded), or as --split says; all saved as split.json. Each
    epoch reports validation Dice; the best decoder is kept as RUN_DIR/decoder.safetensors, the last state
    as RUN_DIR/last.safetensors, the settings as config.json and the epochs in log.csv.
    --from RUN_DIR (or a decoder file) starts from that decoder instead of the backbone's.
    Under torchrun (`torchrun --nproc_per_node=K -m embedcache finetune ...`) it trains with DDP.
    """
    from embedcache.train.finetune import finetune as run_finetune

    # files as absolute paths: score and export read them from any folder
    files = {name: os.path.abspath(settings[name]) if settings[name] else None
             for name in ("checkpoint", "split", "start_from")}
    config = FinetuneConfig(cache=os.path.abspath(cache), **{**settings, **files})
    out = console()
    say = say_to(out)
    tables = [_epoch_table("finetune")]

    def on_view(view, path):  # a cache of both views trains a decoder per view
        what = {"whole": "whole slices", "regions": "the glands' regions"}[view]
        if view == "regions":
            if tables[-1].row_count:
                out.print(tables[-1])
            tables.append(_epoch_table(f"finetune: {what}"))
        say(f"{what}: {path}")

    def on_epoch(record):
        tables[-1].add_row(*_epoch_cells(record))
        say(
            f"epoch {record.epoch:3d}  loss {record.train_loss:.4f}  val loss {record.val_loss:.4f}  "
            f"val Dice {record.val_dice:.4f}{' *' if record.best else '  '}  {record.seconds:6.2f} s  "
            f"{record.prompts_per_s:7.1f} prompts/s"
        )

    with progress_bar(progress) as bar:
        result = run_finetune(config, run_dir, resume=resume, given_fields=typed() & set(settings), progress=bar,
                              on_epoch=on_epoch, on_view=on_view)
    if tables[-1].row_count:
        out.print(tables[-1])
    for done in (result, result.zoom):
        if done is None:
            continue
        start = f"decoder of --from {done.start_from}" if done.start_from else "vanilla decoder"
        what = "" if result.zoom is None else ("whole slices: " if done is result else "the glands' regions: ")
        say(f"{what}{start} val Dice {done.vanilla_val_dice:.4f} → fine-tuned {done.best_val_dice:.4f} "
            f"(epoch {done.best_epoch}); best decoder: {done.run_dir / 'decoder.safetensors'}")


def _epoch_table(title: str):
    from rich.table import Table

    return Table("epoch", "train loss", "val loss", "val Dice", "seconds", "prompts/s", title=title)


def _epoch_cells(record) -> list[str]:
    return [
        f"{record.epoch}{' *' if record.best else ''}", f"{record.train_loss:.4f}", f"{record.val_loss:.4f}",
        f"{record.val_dice:.4f}", f"{record.seconds:.2f}", f"{record.prompts_per_s:.1f}",
    ]


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Checkpoint file to write.")
@old_spellings("checkpoint", "--weights", ("--checkpoint",), type=click.Path(path_type=Path))
@click.option("--weights", "checkpoint", type=click.Path(path_type=Path), default=None,
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
