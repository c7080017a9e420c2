"""What every command shares: one-line errors, progress bars, plain log lines, shared options.

torch and the models are never imported here, so ``embedcache --help`` is instant.
"""

from __future__ import annotations

import functools
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from embedcache.errors import EmbedcacheError, UsageError


def console():
    from rich.console import Console

    return Console(stderr=True)


def progress_bar(enabled: bool):
    """A rich progress bar with an items/s column, or a no-op context when switched off."""
    from contextlib import nullcontext

    if not enabled:
        return nullcontext(None)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
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
        console=console(),
    )


def say_to(out):
    """One plain line per message: no markup, no highlighting, no wrapping (log files stay greppable)."""
    return lambda message: out.print(message, markup=False, highlight=False, soft_wrap=True)


class ConsoleNotes(logging.Handler):
    """The ``embedcache`` logger's records on a rich console, as :func:`say_to` prints: one plain line each (rich's
    own ``RichHandler`` lays records out in wrapped columns), ``warning: `` or ``error: `` before those levels.
    Printed through the console, a note lands above a live progress bar instead of through it."""

    PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}

    def __init__(self, out):
        super().__init__(logging.INFO)
        self.say = say_to(out)

    def emit(self, record):
        try:
            self.say(self.PREFIX.get(record.levelno, "") + record.getMessage())
        except Exception:
            self.handleError(record)


@contextmanager
def notes_to(out):
    """While inside, the ``embedcache`` logger's notes (INFO and above) are printed on ``out``."""
    logger = logging.getLogger("embedcache")
    handler, level = ConsoleNotes(out), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def silence_notes() -> None:
    """No notes from here to the end of the command (a torchrun rank other than the first says nothing)."""
    logging.getLogger("embedcache").setLevel(logging.CRITICAL + 1)


class _OneLineUsageError(click.ClickException):
    """A usage error as one line (click's own UsageError adds the usage and a hint), exit code 2."""

    exit_code = 2


#: What Ctrl-C leaves, said as the command stops: true of the commands that resume.
RESUMES = "interrupted; finished work is kept, rerun the same command to resume"
#: ... and of those that replace their output whole (score, evaluate).
REPLACES = "interrupted; no new report was written and an earlier one at --out is kept as it was"


def friendly_errors(func=None, *, interrupted: str = RESUMES):
    """Turn our user errors into one line on stderr: exit code 2 for usage errors, 1 for the rest; Ctrl-C into
    the line ``interrupted`` (what the command leaves behind), exit code 130.

    Any other exception is a bug and keeps its traceback.
    """
    if func is None:
        return functools.partial(friendly_errors, interrupted=interrupted)

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
            click.echo(interrupted, err=True)
            sys.exit(130)

    return wrapper


def progress_option(func):
    return click.option(
        "--progress/--no-progress", default=True, show_default=True, help="Show progress bars (switch off for logs)."
    )(func)


def parse_labels(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    from embedcache.config import check_label_ids

    try:
        labels = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of label ids, e.g. 7,8") from None
    try:
        return check_label_ids(labels)
    except UsageError as exc:
        raise click.BadParameter(str(exc).removeprefix("--labels ")) from None


class Group(click.Group):
    """click's group, but every error, click's own usage errors included, is one line on stderr."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            with notes_to(console()):
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


def label_map_options(func):
    """``--label-map`` and ``--label-preset``: what the data's label ids mean (embedcache.io.labels)."""
    from embedcache.io.labels import PRESETS

    func = click.option("--label-preset", type=click.Choice(list(PRESETS)), default=None,
                        help="The ids of a public data set: " + ", ".join(PRESETS) + ".")(func)
    return click.option("--label-map", type=click.Path(path_type=Path), default=None,
                        help="What the label ids mean: an nnU-Net or Decathlon dataset.json, or a JSON or TSV of id → "
                             "name [default: a dataset.json beside the data, else --label-preset, else FLARE22's "
                             "ids].")(func)


def resolve_labels(label_map_path, preset, folders, labels):
    """The label map of a command's options, the target labels (those given, else the map's adrenal glands) and
    the note a command says once at its end where the map fell back to FLARE22's ids (else None): said last, so
    a refused input is still one line."""
    from embedcache.io.labels import fallback_note, resolve_label_map

    label_map, fallback = resolve_label_map(path=label_map_path, preset_name=preset, folders=folders)
    targets = tuple(labels) if labels else label_map.adrenals()
    if not targets:
        raise UsageError(f"{label_map.source} names no adrenal gland; give --labels with the target ids")
    return label_map, targets, fallback_note(targets) if fallback else None
