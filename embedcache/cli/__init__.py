"""The ``embedcache`` command line: each command parses options, builds a config and calls one function.

torch and the models are imported inside the commands, so ``embedcache --help`` is instant.
"""

from __future__ import annotations

import functools
import os
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
            from embedcache.io.files import WRITE_ERRNOS, write_error

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
@click.option("--test-cases", default=0, show_default=True, type=click.IntRange(0, 10_000),
              help="More volumes in imagesTs/ + labelsTs/: held-out test cases.")
@progress_option
@friendly_errors
def phantom(out: Path, cases: int, seed: int, size: int, test_cases: int, progress: bool):
    """Write synthetic abdominal CT with FLARE22 labels to OUT (imagesTr/ + labelsTr/, and imagesTs/ + labelsTs/).

    Liver, kidneys, spleen, aorta, IVC and thin, irregular adrenal glands (7 = right, 8 = left)
    in HU with partial volume and noise: the default data, so everything runs with nothing to fetch.
    """
    from embedcache.io.phantom import PhantomConfig, write_phantom

    config = PhantomConfig(size=size, pixel_mm=0.8 * 512 / size)
    with _progress(progress) as bar:
        names = write_phantom(out, cases=cases, seed=seed, config=config, progress=bar, test_cases=test_cases)
    click.echo(f"wrote {len(names)} cases to {out} (imagesTr/, labelsTr/" + (", imagesTs/, labelsTs/)" if test_cases else ")"))


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
              help="Slices per encoder forward; 0 picks 1 on CPU, and on CUDA the most (up to 32) that fit in half the free memory.")
@click.option("--margin-slices", default=2, show_default=True, type=int,
              help="Also encode this many slices beyond each end of a gland (no boxes): 3-D box prompts need them.")
@click.option("--workers", default=-1, show_default=True, type=int,
              help="Processes preparing slices ahead of the encoder; -1: none on CPU, half the cores up to 8 on CUDA.")
@progress_option
@friendly_errors
def encode(data, out, images, labels_, series, model, checkpoint, labels, window_width, window_level, slice_size,
           dtype, device, batch_size, margin_slices, workers, progress):
    """Encode every slice of DATA that holds a target label into the HDF5 cache OUT.

    DATA is a FLARE22-style folder (imagesTr/ + labelsTr/ or images/ + labels/, and imagesTs/ +
    labelsTs/ for held-out test cases). Instead, give explicit --image/--label pairs; an image may
    be a DICOM series folder. An interrupted run resumes: rerun the same command and finished
    cases are skipped. Under torchrun (`torchrun --nproc_per_node=K -m embedcache encode ...`)
    the cases are shared among the ranks.
    """

    from embedcache.config import EncodeConfig, PreprocessConfig
    from embedcache.cache.encode import encode as run_encode
    from embedcache.io.datasets import CaseSource, case_name, discover_cases

    if data is not None and images:
        raise click.UsageError("give either DATA or --image/--label pairs, not both")
    if data is None and not images:
        raise click.UsageError("give a dataset folder DATA or at least one --image/--label pair")
    if len(images) != len(labels_):
        raise click.UsageError(f"{len(images)} --image but {len(labels_)} --label; give one label per image")
    if data is not None and series:
        raise click.UsageError("--series picks one series of an --image DICOM folder; in a dataset folder keep one "
                               "series per case folder")
    config = EncodeConfig(
        backbone=model,
        checkpoint=str(checkpoint) if checkpoint else None,
        labels=labels,
        preprocess=PreprocessConfig(window_width_hu=window_width, window_level_hu=window_level, slice_size=slice_size),
        embedding_dtype=dtype,
        device=device,
        batch_size=batch_size,
        margin_slices=margin_slices,
        workers=workers,
    )
    if data is not None:
        cases = discover_cases(data)
    else:
        cases = [CaseSource(name=case_name(i), image=i, label=l, series_uid=series) for i, l in zip(images, labels_)]
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 speaks for all
    say = _say(_console()) if main_rank else (lambda message: None)
    with _progress(progress and main_rank) as bar:
        summary = run_encode(cases, out, config, progress=bar, log=say)
    if not main_rank:
        return
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
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the decoder step (no faster on a 2-core CPU: see the README's benchmarks).")
@click.option("--split", "split_file", type=click.Path(path_type=Path), default=None,
              help='A split file {"train": [...], "val": [...], "test": [...]} instead of --val-fraction.')
@click.option("--stop-prompts", is_flag=True,
              help="Also train on the slices just beyond each gland, prompted with the neighbour's box (target: empty).")
@progress_option
@friendly_errors
def finetune(cache, run_dir, epochs, lr, batch_size, val_fraction, seed, device, resume, model, checkpoint,
             box_jitter, patience, precision, resident, micro_batch, compile_, split_file, stop_prompts, progress):
    """Train only the mask decoder on the embedding cache CACHE, with box prompts and DiceCE loss.

    Test cases (imagesTs/ of the encoded data) are held out; the rest are split into train and
    validation by patient (seeded), or as --split says; all saved as split.json. Each
    epoch reports validation Dice; the best decoder is kept as RUN_DIR/decoder.safetensors, the last state
    as RUN_DIR/last.safetensors, the settings as config.json and the epochs in log.csv.
    Under torchrun (`torchrun --nproc_per_node=K -m embedcache finetune ...`) it trains with DDP.
    """
    from embedcache.cache.store import open_cache
    from embedcache.config import FinetuneConfig, load_config
    from embedcache.train.runs import CONFIG, RunFolder

    config = FinetuneConfig(
        cache=str(cache), epochs=epochs, lr=lr, batch_size=batch_size, val_fraction=val_fraction, seed=seed,
        device=device, box_jitter=box_jitter, patience=patience, precision=precision, compile=compile_,
        resident=resident, micro_batch=micro_batch, model=model,
        checkpoint=os.path.abspath(checkpoint) if checkpoint else None,  # score and export read it from any folder
        split=os.path.abspath(split_file) if split_file else None, stop_prompts=stop_prompts,
    )
    if resume and (run_dir / CONFIG).is_file():
        config = _resumed_config(config, load_config(FinetuneConfig, run_dir / CONFIG), run_dir / CONFIG)
    console = _console()
    say = _say(console)
    # The checks that need no model first, so that a mistake costs a second, not torch's import.
    open_cache(cache).close()
    resume = RunFolder(run_dir).check_start(resume=resume, log=say)
    from embedcache.train.loop import finetune as run_finetune

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


#: Options that may change on --resume; any other given on the command line must equal the run's.
RESUMABLE = ("epochs", "device", "patience", "cache", "resident", "compile")
#: FinetuneConfig fields named differently on the command line.
OPTION_OF_FIELD = {"compile": "compile_", "split": "split_file"}


def _resumed_config(given, saved, path: Path):
    """The run's own settings, with the few that may change taken from the command line; refuse a
    command line that asks for a different run."""
    ctx = click.get_current_context()
    typed = {name for name in ctx.params if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    for field, value in vars(given).items():
        if field not in RESUMABLE and OPTION_OF_FIELD.get(field, field) in typed and value != getattr(saved, field):
            raise UsageError(f"--{field.replace('_', '-')} {value} differs from the run's {getattr(saved, field)} "
                             f"({path}); --resume continues that run: drop the option or start a new run")
    return replace(saved, **{k: getattr(given, k) for k in RESUMABLE if OPTION_OF_FIELD.get(k, k) in typed or k == "cache"})


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
    from embedcache.train.runs import export_run

    click.echo(f"wrote {export_run(run_dir, out, checkpoint=checkpoint)}")


def protocol_options(func):
    """The options of the prompt protocols, shared by score and predict."""
    options = [
        click.option("--jitter", default=0.1, show_default=True, type=float,
                     help="jitter: each box edge moves up to this fraction of the box size."),
        click.option("--seed", default=0, show_default=True, type=int, help="jitter: same seed, same boxes."),
        click.option("--box-margin-mm", default=3.0, show_default=True, type=float,
                     help="box3d from a label: the 3-D box is this much larger in-plane..."),
        click.option("--box-margin-slices", default=1, show_default=True, type=int,
                     help="...and this many slices longer at each end."),
        click.option("--grow-mm", default=3.0, show_default=True, type=float,
                     help="box3d: each next slice's box is the previous mask's, grown by this much."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _settings(jitter, seed, box_margin_mm, box_margin_slices, grow_mm):
    from embedcache.evaluation.protocols import ProtocolSettings

    return ProtocolSettings(jitter=jitter, seed=seed, margin_mm=box_margin_mm, margin_slices=box_margin_slices,
                            grow_mm=grow_mm)


@main.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path), help="Report folder.")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None, help="A finetune run folder.")
@click.option("--decoder", "decoder_file", type=click.Path(path_type=Path), default=None,
              help="A fine-tuned decoder file (RUN_DIR/decoder.safetensors) instead of --run.")
@click.option("--cases", default=None, type=click.Choice(["test", "val", "train", "all"]),
              help="Which cases to score [default: test cases if any, else val with --run, else all].")
@click.option("--prompts", default="oracle,jitter,box3d", show_default=True,
              help="Prompt protocols, comma-separated: oracle, jitter, box3d.")
@protocol_options
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="The backbone weights the cache was encoded with (default: the run's, or bundled).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="The dataset folder, if it moved since encoding: each case's label volume and image are "
                   "taken from there by name, checked against the cache's sha256 of what was encoded.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@progress_option
@friendly_errors
def score(cache, out_dir, run_dir, decoder_file, cases, prompts, jitter, seed, box_margin_mm, box_margin_slices,
          grow_mm, checkpoint, data, device, progress):
    """Score the vanilla decoder against the fine-tuned one on the cached embeddings of CACHE.

    Per prompt protocol (oracle: tight boxes on every slice, an upper bound; jitter: sloppy boxes;
    box3d: one 3-D box per gland, propagated from its middle slice, as a person works), case and
    gland: 3-D Dice and NSD (FLARE22) on the label volume. By default on the held-out test cases.
    Writes report.json, cases.csv, plots, overlays and index.html to OUT.
    """
    from embedcache.cache.store import open_cache
    from embedcache.evaluation.protocols import parse_protocols

    if run_dir and decoder_file:
        raise UsageError("give --run or --decoder, not both")
    chosen, settings = parse_protocols(prompts), _settings(jitter, seed, box_margin_mm, box_margin_slices, grow_mm)
    open_cache(cache).close()  # a mistyped path costs a second, not torch's import
    if data is not None and not data.is_dir():
        raise EmbedcacheError(f"{data}: no such folder; --data takes the dataset folder the cache was encoded from")
    from embedcache.evaluation.score import score as run_score

    with _progress(progress) as bar:
        report = run_score(cache, out_dir, run_dir=run_dir, decoder_file=decoder_file, cases=cases, prompts=chosen,
                           settings=settings, checkpoint=checkpoint, device=device, data=data, progress=bar,
                           log=_say(_console()))
    _print_summary(report)
    click.echo(f"report: {out_dir / 'index.html'}")


def _print_summary(report: dict) -> None:
    """One table per protocol: mean ± sd per gland and metric, per model, and the difference."""
    from rich.console import Console
    from rich.table import Table

    from embedcache.evaluation.report import MODEL_NAMES

    console = Console()
    console.print(f"{report['case_set']} cases ({len(report['case_names'])}): {report['case_set_note']}",
                  markup=False, highlight=False)
    models = report["models"]
    for protocol, by_label in report["summary"].items():
        table = Table("gland", "metric", *[MODEL_NAMES.get(m, m) for m in models],
                      *(["difference"] if len(models) == 2 else []), title=f"prompts: {protocol}")
        for label, by_model in by_label.items():
            for metric in ("dice", "nsd"):
                stats = [by_model[m][metric] for m in models]
                table.add_row(report["labels"][label], metric, *[f"{x['mean']:.4f} ± {x['sd']:.4f}" for x in stats],
                              *([f"{stats[1]['mean'] - stats[0]['mean']:+.4f}"] if len(stats) == 2 else []))
        console.print(table)


@main.command()
@click.argument("pred", type=click.Path(path_type=Path))
@click.argument("labels_dir", metavar="LABELS", type=click.Path(path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path), help="Report folder.")
@click.option("--labels", default="7,8", show_default=True, callback=_parse_labels, help="Label ids to score.")
@click.option("--name", default="prediction", show_default=True, help="What to call the predictions in the report.")
@progress_option
@friendly_errors
def evaluate(pred, labels_dir, out_dir, labels, name, progress):
    """Dice and NSD of the label NIfTIs in PRED against the ground truth in LABELS.

    Matched by case name (PRED/CASE.nii.gz with LABELS/CASE.nii.gz) and compared on the label's
    voxels with FLARE22's rules and NSD tolerances: put embedcache's predictions beside nnU-Net's
    or TotalSegmentator's. A case without a prediction, or on another grid, is reported (exit
    code 1) and the rest are scored. Writes the same report as score.
    """
    from embedcache.evaluation.evaluate import evaluate as run_evaluate

    with _progress(progress) as bar:
        report = run_evaluate(pred, labels_dir, out_dir, labels=labels, name=name, progress=bar,
                              log=_say(_console()))
    _print_summary(report)
    click.echo(f"report: {out_dir / 'index.html'}")
    if report["errors"]:
        raise click.ClickException(f"{len(report['errors'])} case(s) not scored; see the errors above")


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for the label NIfTIs.")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None, help="A finetune run folder.")
@click.option("--decoder", "decoder_file", type=click.Path(path_type=Path), default=None,
              help="A fine-tuned decoder file instead of --run (neither: the vanilla decoder).")
@click.option("--boxes", "boxes_file", type=click.Path(path_type=Path), default=None,
              help="JSON: 3-D boxes (or boxes on one slice) per input and label, in the file's voxel indices.")
@click.option("--from-labels", type=click.Path(path_type=Path), default=None,
              help="A label NIfTI (or a folder of CASE.nii.gz) whose glands give the prompts.")
@click.option("--prompts", default="box3d", show_default=True, type=click.Choice(["oracle", "jitter", "box3d"]),
              help="With --from-labels: how the glands become prompts (see score).")
@protocol_options
@click.option("--series", default=None, help="SeriesInstanceUID to read from DICOM folders holding several series.")
@click.option("--model", default="litemedsam", show_default=True, help="Backbone when no run or decoder is given.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="Backbone weights (default: bundled).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@progress_option
@friendly_errors
def predict(inputs, out_dir, run_dir, decoder_file, boxes_file, from_labels, prompts, jitter, seed, box_margin_mm,
            box_margin_slices, grow_mm, series, model, checkpoint, device, progress):
    """Segment INPUTS (NIfTI files or DICOM series folders) from box prompts.

    A 3-D box per gland is segmented from its middle slice and propagated slice by slice (box3d);
    a box on one slice segments that slice. Writes OUT/CASE.nii.gz per input with FLARE22 label ids
    on the input's own grid and affine, so it opens aligned in 3D Slicer or ITK-SNAP. An input that
    fails is reported and the rest go on; the exit code is then 1.
    """
    if run_dir and decoder_file:
        raise UsageError("give --run or --decoder, not both")
    settings = _settings(jitter, seed, box_margin_mm, box_margin_slices, grow_mm)
    from embedcache.evaluation.predict import predict as run_predict

    with _progress(progress) as bar:
        written, errors = run_predict(
            list(inputs), out_dir, run_dir=run_dir, decoder_file=decoder_file, boxes_file=boxes_file,
            from_labels=from_labels, prompts=prompts, settings=settings, model=model, checkpoint=checkpoint,
            series=series, device=device, progress=bar, log=_say(_console()),
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

    from embedcache.cache.store import open_cache

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
        table = Table("case", "set", "slices", *[f"boxes {label}" for label in cache.labels], "margin",
                      "spacing z, y, x (mm)")
        for case in cache.cases:
            table.add_row(
                case.name, case.subset, str(case.n_rows),
                *[str(int(present[case.rows, j].sum())) for j in range(len(cache.labels))], str(case.margin_slices),
                ", ".join(f"{s:.3g}" for s in case.spacing_mm),
            )
        table.add_section()
        table.add_row("total", "", str(len(cache)), *[str(int(present[:, j].sum())) for j in range(len(cache.labels))],
                      "", "")
        console.print(table)
        missing = sum(not os.path.exists(case.label) for case in cache.cases)
        try:
            where = f"sources under {os.path.commonpath([p for c in cache.cases for p in (c.image, c.label)])}"
        except ValueError:  # absolute and relative paths: cases of an older version's encode
            where = "sources"
        console.print(where + (f"; {missing} label volume(s) not there: score needs --data DIR" if missing else ""),
                      markup=False, soft_wrap=True)  # a path wrapped is a path broken for copying


if __name__ == "__main__":
    main()
