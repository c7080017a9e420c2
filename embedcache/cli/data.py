"""Commands of the data and phase one: ``phantom``, ``encode``, ``info``."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import click

from embedcache.cli.common import (
    console,
    friendly_errors,
    label_map_options,
    parse_labels,
    progress_bar,
    progress_option,
    resolve_labels,
    say_to,
    silence_notes,
)
from embedcache.cli.options import options, typed
from embedcache.config import PAINT_STYLES, EncodeConfig, PhantomConfig, PreprocessConfig
from embedcache.errors import UsageError
from embedcache.runtime.distributed import is_main_process


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--cases", default=None, type=click.IntRange(1, 10_000),
              help="Number of training volumes [default: 4; with --anatomy, every label map but the test cases].")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same files.")
@options(PhantomConfig, "size")
@click.option("--test-cases", default=0, show_default=True, type=click.IntRange(0, 10_000),
              help="More volumes in imagesTs/ + labelsTs/: held-out test cases.")
@click.option("--anatomy", type=click.Path(path_type=Path), default=None,
              help="A folder of real label maps (FLARE22 ids) to paint CT around, on each map's own grid.")
@click.option("--style", type=click.Choice(tuple(PAINT_STYLES)), default=None,
              help="With --anatomy: how the CT is painted: portal (portal-venous phase), arterial (another phase, "
                   "texture, noise and blur: a second style to test on) or varied (each case its own style around "
                   "portal's, for training) [default: portal].")
@progress_option
@friendly_errors
def phantom(out: Path, cases: int | None, seed: int, size: int, test_cases: int, anatomy: Path | None,
            style: str | None, progress: bool):
    """Write synthetic abdominal CT with FLARE22 labels to OUT (imagesTr/ + labelsTr/, and imagesTs/ + labelsTs/).

    Liver, kidneys, spleen, aorta, IVC and thin, irregular adrenal glands (7 = right, 8 = left)
    in HU with partial volume and noise: the default data, so everything runs with nothing to fetch.
    With --anatomy, the CT is painted around real label maps instead (organs, fat, body wall, spine,
    the crura beside the glands): real adrenal shapes, for measuring accuracy where it counts.
    """
    from embedcache.synth.phantom import write_phantom

    if anatomy is not None and "size" in typed():
        raise UsageError("--size shapes the synthetic phantom; with --anatomy each CT takes its label map's grid: "
                         "drop it")
    if anatomy is None and style is not None:
        raise UsageError("--style paints CT around --anatomy label maps; the synthetic phantom has one style: drop it")
    with progress_bar(progress) as bar:
        if anatomy is not None:
            from embedcache.synth.anatomy import write_anatomy

            names = write_anatomy(anatomy, out, cases=cases, test_cases=test_cases, seed=seed,
                                  style=style or "portal", progress=bar)
        else:
            config = PhantomConfig(size=size, pixel_mm=0.8 * 512 / size)
            names = write_phantom(out, cases=cases or 4, seed=seed, config=config, progress=bar, test_cases=test_cases)
    click.echo(f"wrote {len(names)} cases to {out} (imagesTr/, labelsTr/" + (", imagesTs/, labelsTs/)" if test_cases else ")"))


@click.command()
@click.argument("data", required=False, type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Cache file to write, e.g. cache.h5.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="An image (NIfTI file or DICOM series folder); repeatable, paired in order with --label.")
@click.option("--label", "labels_", multiple=True, type=click.Path(path_type=Path),
              help="The label NIfTI of the --image at the same position.")
@click.option("--series", default=None, help="SeriesInstanceUID to read from DICOM folders holding several series.")
@options(EncodeConfig, "backbone", "checkpoint")
@click.option("--labels", default=None, callback=parse_labels,
              help="Target label ids [default: the label map's adrenal glands: 7,8 in FLARE22's ids].")
@label_map_options
@options(PreprocessConfig, "window_width_hu", "window_level_hu", "slice_size")
@options(EncodeConfig, "embedding_dtype", "device", "batch_size", "margin_slices", "workers", "zoom_mm")
@options(EncodeConfig, "augment")
@options(EncodeConfig, "engine", "precision", "streams")
@progress_option
@friendly_errors
def encode(data, out, images, labels_, series, labels, label_map, label_preset, augment, progress, **settings):
    """Encode every slice of DATA that holds a target label into the HDF5 cache OUT.

    DATA is a FLARE22-style folder (imagesTr/ + labelsTr/ or images/ + labels/, and imagesTs/ +
    labelsTs/ for held-out test cases). Instead, give explicit --image/--label pairs; an image may
    be a DICOM series folder. An interrupted run resumes: rerun the same command and finished
    cases are skipped. Under torchrun (`torchrun --nproc_per_node=K -m embedcache encode ...`)
    the cases are shared among the ranks.
    """

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
    main_rank = is_main_process()
    say = say_to(console())
    if not main_rank:
        silence_notes()
    # what the ids mean: --label-map, a dataset.json beside the data (nnU-Net's), --label-preset, else FLARE22's
    from embedcache.io.labels import beside

    near = (data,) if data is not None else tuple(dict.fromkeys(f for p in labels_ for f in beside(p)))
    mapping, labels, note = resolve_labels(label_map, label_preset, near, labels)
    preprocess = PreprocessConfig(**{f.name: settings.pop(f.name) for f in fields(PreprocessConfig)})
    checkpoint = settings.pop("checkpoint")
    config = EncodeConfig(**settings, checkpoint=str(checkpoint) if checkpoint else None, labels=labels,
                          preprocess=preprocess, augment=augment,
                          label_map=mapping)
    if data is not None:
        cases = discover_cases(data)
    else:
        cases = [CaseSource(name=case_name(i), image=i, label=l, series_uid=series) for i, l in zip(images, labels_)]
    with progress_bar(progress and main_rank) as bar:
        summary = run_encode(cases, out, config, progress=bar)
    if not main_rank:
        return
    say(
        f"encoded {summary.slices_encoded} slices of {summary.cases_encoded} cases on {summary.device}"
        + (f" at {summary.slices_per_s:.2f} slices/s" if summary.slices_encoded else "")
        + (f"; {summary.cases_resumed} cases already done" if summary.cases_resumed else "")
        + (f"; {len(summary.cases_skipped)} skipped without target labels" if summary.cases_skipped else "")
    )
    if note:
        say(note)
    _print_info(out)


@click.command()
@click.argument("cache", type=click.Path(path_type=Path))
@friendly_errors
def info(cache: Path):
    """Print what the cache file CACHE holds: model, preprocessing, cases, slices and boxes."""
    _print_info(cache)


def _print_info(path: Path) -> None:
    from rich.console import Console
    from rich.table import Column, Table

    from embedcache.cache.store import open_cache

    with open_cache(path) as cache:
        sig = cache.signature
        present = cache.present()
        size_mib = path.stat().st_size / 2**20
        out = Console()
        out.print(f"[bold]{path}[/]  {size_mib:.1f} MiB, embedcache {sig.embedcache_version}")
        out.print(
            f"model {sig.backbone} (input {sig.input_size} px, checkpoint sha256 {sig.checkpoint_sha256[:12]}), "
            f"embeddings {tuple(cache.embeddings.shape)} {sig.embedding_dtype}, encoded by {sig.engine} {sig.precision}",
            markup=False,
        )
        pre = sig.preprocess
        out.print(
            f"window W{pre.window_width_hu:g}/L{pre.window_level_hu:g} HU, slices {pre.slice_size}², "
            f"labels {', '.join(f'{k} = {sig.label_map.name(k)}' for k in sig.labels)} ({sig.label_map.source})"
            + {("whole",): "; whole slices",
               ("whole", "regions"): f"; whole slices and each gland's region grown {sig.zoom_mm:g} mm (--zoom)",
               ("regions",): f"; each gland's region alone, grown {sig.zoom_mm:g} mm"}[sig.views]
            + ("; slice pixels kept (--refine-head)" if sig.pixels else "; no slice pixels (encoded before them)"),
            markup=False,
        )
        # The case column is never cut, in a narrow terminal or a log: a cut name tells no case from another.
        widest = max([len("total"), *(len(c.name) for c in cache.cases)])
        table = Table(Column("case", no_wrap=True, min_width=widest), "set", "slices",
                      *[f"boxes {label}" for label in cache.labels], "margin", "spacing z, y, x (mm)")
        for case in cache.cases:
            table.add_row(
                case.name, case.subset, str(case.n_rows),
                *[str(int(present[case.rows, j].sum())) for j in range(len(cache.labels))], str(case.margin_slices),
                ", ".join(f"{s:.3g}" for s in case.spacing_mm),
            )
        table.add_section()
        table.add_row("total", "", str(len(cache)), *[str(int(present[:, j].sum())) for j in range(len(cache.labels))],
                      "", "")
        out.print(table)
        labels = {case.label for case in cache.cases}  # a gland's region has its case's label volume
        missing = sum(not os.path.exists(label) for label in labels)
        try:
            where = f"sources under {os.path.commonpath([p for c in cache.cases for p in (c.image, c.label)])}"
        except ValueError:  # absolute and relative paths: cases of an older version's encode
            where = "sources"
        out.print(where + (f"; {missing} label volume(s) not there: score needs --data DIR" if missing else ""),
                      markup=False, soft_wrap=True)  # a path wrapped is a path broken for copying
