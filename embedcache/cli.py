"""The ``embedcache`` command line: each command parses options, builds a config and calls one function.

torch and the models are imported inside the commands, so ``embedcache --help`` is instant.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import replace
from pathlib import Path

import click

from embedcache import __version__
from embedcache.errors import EmbedcacheError, UsageError


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _progress(enabled: bool):
    """A rich progress bar with an items/s column, or a no-op context when switched off."""
    from contextlib import nullcontext

    if not enabled:
        return nullcontext(None)
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.2f}/s" if task.speed else "", style="cyan")

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_console(),
    )


def _say(console):
    """One plain line per message: no markup, no highlighting, no wrapping (log files stay greppable)."""
    return lambda message: console.print(message, markup=False, highlight=False, soft_wrap=True)


class _OneLineUsageError(click.ClickException):
    """A usage error as one line (click's own UsageError adds the usage and a hint), exit code 2."""

    exit_code = 2


def friendly_errors(func):
    """Turn our user errors into one line on stderr: exit code 2 for usage errors, 1 for the rest.

    Any other exception is a bug and keeps its traceback.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UsageError as exc:
            raise _OneLineUsageError(str(exc)) from None
        except EmbedcacheError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # a disk that refuses a write somewhere we did not expect it
            from embedcache.files import WRITE_ERRNOS, write_error

            if exc.errno not in WRITE_ERRNOS or not exc.filename:
                raise
            raise click.ClickException(str(write_error(exc, Path(exc.filename)))) from None
        except KeyboardInterrupt:
            click.echo("interrupted; finished work is kept, rerun the same command to resume", err=True)
            sys.exit(130)

    return wrapper


def progress_option(func):
    return click.option(
        "--progress/--no-progress", default=True, show_default=True, help="Show progress bars (switch off for logs)."
    )(func)


def _parse_labels(ctx, param, value: str) -> tuple[int, ...]:
    try:
        labels = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of label ids, e.g. 7,8") from None
    if not labels:
        raise click.BadParameter("give at least one label id, e.g. 7,8")
    return labels


class _Group(click.Group):
    """click's group, but every error, click's own usage errors included, is one line on stderr."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="embedcache")
def main():
    """Fine-tune Segment Anything's mask decoder on CT against cached image embeddings.

    Phase one, `encode`, runs the frozen image encoder once per slice that holds a target label
    and stores the embeddings in HDF5; phase two trains only the mask decoder against that cache.
    """


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--cases", default=4, show_default=True, type=click.IntRange(1, 10_000), help="Number of volumes.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same files.")
@click.option("--size", default=512, show_default=True, type=click.IntRange(64, 1024), help="Axial pixels per side.")
@progress_option
@friendly_errors
def phantom(out: Path, cases: int, seed: int, size: int, progress: bool):
    """Write synthetic abdominal CT with FLARE22 labels to OUT (imagesTr/ + labelsTr/).

    Liver, kidneys, spleen, aorta, IVC and thin, irregular adrenal glands (7 = right, 8 = left)
    in HU with partial volume and noise: the default data, so everything runs with nothing to fetch.
    """
    from embedcache.phantom import PhantomConfig, write_phantom

    config = PhantomConfig(size=size, pixel_mm=0.8 * 512 / size)
    with _progress(progress) as bar:
        names = write_phantom(out, cases=cases, seed=seed, config=config, progress=bar)
    click.echo(f"wrote {len(names)} cases to {out} (imagesTr/, labelsTr/)")


@main.command()
@click.argument("data", required=False, type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Cache file to write, e.g. cache.h5.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="An image (NIfTI file or DICOM series folder); repeatable, paired in order with --label.")
@click.option("--label", "labels_", multiple=True, type=click.Path(path_type=Path),
              help="The label NIfTI of the --image at the same position.")
@click.option("--series", default=None, help="SeriesInstanceUID to read from DICOM folders holding several series.")
@click.option("--model", default="litemedsam", show_default=True, help="Backbone: litemedsam, vit_b, vit_l, vit_h, medsam.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Weights file; required for all but litemedsam, whose weights are bundled.")
@click.option("--labels", default="7,8", show_default=True, callback=_parse_labels, help="Target label ids.")
@click.option("--window-width", default=350.0, show_default=True, type=float, help="CT window width (HU).")
@click.option("--window-level", default=50.0, show_default=True, type=float, help="CT window level (HU).")
@click.option("--slice-size", default=512, show_default=True, type=int, help="Slices are resampled to this square size (px).")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
              help="Storage type of the embeddings.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--batch-size", default=0, show_default=True, type=click.IntRange(0, 1024),
              help="Slices per encoder forward; 0 picks 1 on CPU, 16 on CUDA.")
@progress_option
@friendly_errors
def encode(data, out, images, labels_, series, model, checkpoint, labels, window_width, window_level, slice_size,
           dtype, device, batch_size, progress):
    """Encode every slice of DATA that holds a target label into the HDF5 cache OUT.

    DATA is a FLARE22-style folder (imagesTr/ + labelsTr/ or images/ + labels/). Instead, give
    explicit --image/--label pairs; an image may be a DICOM series folder. An interrupted run
    resumes: rerun the same command and finished cases are skipped.
    """
    from embedcache.config import EncodeConfig, PreprocessConfig
    from embedcache.encode import encode as run_encode
    from embedcache.volumes import CaseSource, case_name, discover_cases

    if data is not None and images:
        raise click.UsageError("give either DATA or --image/--label pairs, not both")
    if data is None and not images:
        raise click.UsageError("give a dataset folder DATA or at least one --image/--label pair")
    if len(images) != len(labels_):
        raise click.UsageError(f"{len(images)} --image but {len(labels_)} --label; give one label per image")
    config = EncodeConfig(
        backbone=model,
        checkpoint=str(checkpoint) if checkpoint else None,
        labels=labels,
        preprocess=PreprocessConfig(window_width_hu=window_width, window_level_hu=window_level, slice_size=slice_size),
        embedding_dtype=dtype,
        device=device,
        batch_size=batch_size,
    )
    if data is not None:
        cases = discover_cases(data)
    else:
        cases = [CaseSource(name=case_name(i), image=i, label=l, series_uid=series) for i, l in zip(images, labels_)]
    say = _say(_console())
    with _progress(progress) as bar:
        summary = run_encode(cases, out, config, progress=bar, log=say)
    say(
        f"encoded {summary.slices_encoded} slices of {summary.cases_encoded} cases on {summary.device}"
        + (f" at {summary.slices_per_s:.2f} slices/s" if summary.slices_encoded else "")
        + (f"; {summary.cases_resumed} cases already done" if summary.cases_resumed else "")
        + (f"; {len(summary.cases_skipped)} skipped without target labels" if summary.cases_skipped else "")
    )
    _print_info(out)


@main.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", "-o", "run_dir", required=True, type=click.Path(path_type=Path), help="Run folder to create.")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--lr", default=1e-4, show_default=True, type=float, help="Peak learning rate (AdamW).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 4096),
              help="Slices per step; each brings all its box prompts.")
@click.option("--val-fraction", default=0.2, show_default=True, type=float, help="Share of cases held out.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
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
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the decoder.")
@progress_option
@friendly_errors
def finetune(cache, run_dir, epochs, lr, batch_size, val_fraction, seed, device, resume, model, checkpoint,
             box_jitter, patience, precision, resident, micro_batch, compile_, progress):
    """Train only the mask decoder on the embedding cache CACHE, with box prompts and DiceCE loss.

    Cases are split into train and validation by patient (seeded, saved as split.json). Each
    epoch reports validation Dice; the best decoder is kept as RUN_DIR/decoder.safetensors, the last state
    as RUN_DIR/last.safetensors, the settings as config.json and the epochs in log.csv.
    Under torchrun (`torchrun --nproc_per_node=K -m embedcache finetune ...`) it trains with DDP.
    """
    from embedcache.cache import open_cache
    from embedcache.config import FinetuneConfig, load_config
    from embedcache.runs import CONFIG, RunFolder

    config = FinetuneConfig(
        cache=str(cache), epochs=epochs, lr=lr, batch_size=batch_size, val_fraction=val_fraction, seed=seed,
        device=device, box_jitter=box_jitter, patience=patience, precision=precision, compile=compile_,
        resident=resident, micro_batch=micro_batch, model=model, checkpoint=str(checkpoint) if checkpoint else None,
    )
    if resume and (run_dir / CONFIG).is_file():
        saved = load_config(FinetuneConfig, run_dir / CONFIG)
        ctx = click.get_current_context()
        given = {
            name for name in ctx.params
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        }
        overrides = {k: getattr(config, k) for k in ("epochs", "device", "patience") if k in given}
        config = replace(saved, cache=str(cache), **overrides)
    console = _console()
    say = _say(console)
    # The checks that need no model first, so that a mistake costs a second, not torch's import.
    open_cache(cache).close()
    resume = RunFolder(run_dir).check_start(resume=resume, log=say)
    from embedcache.train import finetune as run_finetune

    table = _epoch_table()

    def on_epoch(record):
        table.add_row(*_epoch_cells(record))
        say(
            f"epoch {record.epoch:3d}  loss {record.train_loss:.4f}  val loss {record.val_loss:.4f}  "
            f"val Dice {record.val_dice:.4f}{' *' if record.best else '  '}  {record.seconds:6.2f} s  "
            f"{record.prompts_per_s:7.1f} prompts/s"
        )

    with _progress(progress) as bar:
        result = run_finetune(config, run_dir, resume=resume, progress=bar, on_epoch=on_epoch, log=say)
    if result.history:
        console.print(table)
    say(
        f"vanilla decoder val Dice {result.vanilla_val_dice:.4f} → fine-tuned {result.best_val_dice:.4f} "
        f"(epoch {result.best_epoch}); best decoder: {run_dir / 'decoder.safetensors'}"
    )


def _epoch_table():
    from rich.table import Table

    return Table("epoch", "train loss", "val loss", "val Dice", "seconds", "prompts/s", title="finetune")


def _epoch_cells(record) -> list[str]:
    return [
        f"{record.epoch}{' *' if record.best else ''}", f"{record.train_loss:.4f}", f"{record.val_loss:.4f}",
        f"{record.val_dice:.4f}", f"{record.seconds:.2f}", f"{record.prompts_per_s:.1f}",
    ]


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Checkpoint file to write.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="The original backbone weights, if not where the run found them.")
@friendly_errors
def export(run_dir, out, checkpoint):
    """Write RUN_DIR's best decoder into a full checkpoint in the backbone's own format.

    The original image encoder and prompt encoder with the fine-tuned mask decoder: SAM and MedSAM
    files load in plain segment_anything (`sam_model_registry["vit_b"](checkpoint=OUT)`), LiteMedSAM
    files keep LiteMedSAM's state-dict layout.
    """
    from embedcache.runs import export_run

    click.echo(f"wrote {export_run(run_dir, out, checkpoint=checkpoint)}")


@main.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path), help="Report folder.")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None, help="A finetune run folder.")
@click.option("--decoder", "decoder_file", type=click.Path(path_type=Path), default=None,
              help="A fine-tuned decoder file (RUN_DIR/decoder.safetensors) instead of --run.")
@click.option("--cases", default=None, type=click.Choice(["train", "val", "all"]),
              help="Which cases to score [default: val with --run, else all].")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="The backbone weights the cache was encoded with (default: the run's, or bundled).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@progress_option
@friendly_errors
def score(cache, out_dir, run_dir, decoder_file, cases, checkpoint, device, progress):
    """Score the vanilla decoder against the fine-tuned one on the cached boxes of CACHE.

    Per case and gland, on the 3-D label volume: Dice, NSD at 2 mm (FLARE22) and the mean 2-D
    Dice of the slices holding the gland. Writes report.json, cases.csv, PNG overlays of the best
    and worst slices and index.html, a page with the table and the pictures.
    """
    from embedcache.labels import name as gland_name
    from embedcache.score import METRICS, score as run_score

    if run_dir and decoder_file:
        raise click.UsageError("give --run or --decoder, not both")
    with _progress(progress) as bar:
        report = run_score(cache, out_dir, run_dir=run_dir, decoder_file=decoder_file,
                           cases=cases or ("val" if run_dir else "all"), checkpoint=checkpoint, device=device,
                           progress=bar)
    from rich.console import Console
    from rich.table import Table

    models = report["models"]
    table = Table("gland", "metric", *models, *(["difference"] if len(models) == 2 else []),
                  title=f"{report['cases_scored']} cases: {len(report['cases'])}")
    for label in report["mean"]:
        for metric in METRICS:
            values = [report["mean"][label][m][metric] for m in models]
            table.add_row(gland_name(int(label)), metric, *[f"{v:.4f}" for v in values],
                          *([f"{values[1] - values[0]:+.4f}"] if len(values) == 2 else []))
    Console().print(table)
    click.echo(f"report: {out_dir / 'index.html'}")


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for the label NIfTIs.")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None, help="A finetune run folder.")
@click.option("--decoder", "decoder_file", type=click.Path(path_type=Path), default=None,
              help="A fine-tuned decoder file instead of --run (neither: the vanilla decoder).")
@click.option("--boxes", "boxes_file", type=click.Path(path_type=Path), default=None,
              help="JSON boxes per input, slice and label (schema in the README).")
@click.option("--from-labels", type=click.Path(path_type=Path), default=None,
              help="A label NIfTI (or a folder of CASE.nii.gz) whose glands give the boxes.")
@click.option("--model", default="litemedsam", show_default=True, help="Backbone when no run or decoder is given.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="Backbone weights (default: bundled).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@friendly_errors
def predict(inputs, out_dir, run_dir, decoder_file, boxes_file, from_labels, model, checkpoint, device):
    """Segment INPUTS (NIfTI files or DICOM series folders) with box prompts.

    Writes OUT/CASE.nii.gz per input with FLARE22 label ids on the input's own grid and affine,
    so it opens aligned in 3D Slicer or ITK-SNAP. The image encoder runs on the fly. An input
    that fails is reported and the rest go on; the exit code is then 1.
    """
    from embedcache.predict import predict as run_predict

    if run_dir and decoder_file:
        raise click.UsageError("give --run or --decoder, not both")
    console = _console()
    written, errors = run_predict(
        list(inputs), out_dir, run_dir=run_dir, decoder_file=decoder_file, boxes_file=boxes_file,
        from_labels=from_labels, model=model, checkpoint=checkpoint, device=device,
        log=_say(console),
    )
    click.echo(f"wrote {len(written)} of {len(inputs)} label volumes to {out_dir}")
    if errors:
        raise click.ClickException(f"{len(errors)} input(s) failed; see the errors above")


@main.command()
@click.argument("cache", type=click.Path(path_type=Path))
@friendly_errors
def info(cache: Path):
    """Print what the cache file CACHE holds: model, preprocessing, cases, slices and boxes."""
    _print_info(cache)


def _print_info(path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from embedcache.cache import open_cache

    with open_cache(path) as cache:
        sig = cache.signature
        present = cache.present()
        size_mib = path.stat().st_size / 2**20
        console = Console()
        console.print(f"[bold]{path}[/]  {size_mib:.1f} MiB, embedcache {sig['embedcache_version']}")
        console.print(
            f"model {sig['backbone']} (input {sig['input_size']} px, checkpoint sha256 {sig['checkpoint_sha256'][:12]}), "
            f"embeddings {tuple(cache.embeddings.shape)} {sig['embedding_dtype']}",
            markup=False,
        )
        pre = sig["preprocess"]
        console.print(
            f"window W{pre['window_width_hu']:g}/L{pre['window_level_hu']:g} HU, slices {pre['slice_size']}², "
            f"labels {sig['labels']}",
            markup=False,
        )
        table = Table("case", "slices", *[f"boxes {label}" for label in cache.labels], "spacing (z, y, x) mm")
        for case in cache.cases:
            table.add_row(
                case.name, str(case.n_rows), *[str(int(present[case.rows, j].sum())) for j in range(len(cache.labels))],
                ", ".join(f"{s:.2f}" for s in case.spacing_mm),
            )
        table.add_section()
        table.add_row("total", str(len(cache)), *[str(int(present[:, j].sum())) for j in range(len(cache.labels))], "")
        console.print(table)


if __name__ == "__main__":
    main()
