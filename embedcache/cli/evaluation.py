"""Commands that measure and segment: ``score``, ``evaluate``, ``predict``."""

from __future__ import annotations

from pathlib import Path

import click

from embedcache.cli.common import (
    REPLACES,
    console,
    friendly_errors,
    label_map_options,
    parse_labels,
    progress_bar,
    progress_option,
    resolve_labels,
    say_to,
)
from embedcache.cli.options import options, typed
from embedcache.errors import EmbedcacheError, UsageError

#: The fields of the prompt protocols' settings, shared by score and predict, in the order --help lists them.
PROTOCOL_FIELDS = ("jitter", "seed", "margin_mm", "margin_slices", "grow_mm", "walk", "min_iou", "middle", "clicks",
                   "refine", "reach")


def score_options(*names: str):
    from embedcache.config import ScoreConfig

    return options(ScoreConfig, *names)


def predict_options(*names: str):
    from embedcache.config import PredictConfig

    return options(PredictConfig, *names)


def protocol_options(func):
    """The options of the prompt protocols (:class:`~embedcache.config.ProtocolSettings`), shared by score and
    predict."""
    from embedcache.config import ProtocolSettings

    return options(ProtocolSettings, *PROTOCOL_FIELDS)(func)


def _settings(params: dict):
    """The :class:`~embedcache.config.ProtocolSettings` of a command's parameters (popped from ``params``)."""
    from embedcache.config import ProtocolSettings

    return ProtocolSettings(**{name: params.pop(name) for name in PROTOCOL_FIELDS})


@click.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path), help="Report folder.")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None, help="A finetune run folder.")
@click.option("--decoder", "decoder_file", type=click.Path(path_type=Path), default=None,
              help="A fine-tuned decoder file (RUN_DIR/decoder.safetensors) instead of --run.")
@score_options("cases", "prompts")
@protocol_options
@score_options("checkpoint", "data", "device")
@score_options("zoom", "zoom_cache")
@progress_option
@friendly_errors(interrupted=REPLACES)
def score(cache, out_dir, run_dir, decoder_file, cases, prompts, checkpoint, data, device, zoom, zoom_cache, progress,
          **protocol):
    """Score the vanilla decoder against the fine-tuned one on the cached embeddings of CACHE.

    Per prompt protocol (oracle: tight boxes on every slice, an upper bound; jitter: sloppy boxes;
    box3d: one 3-D box per gland, propagated from its middle slice, as a person works; clicks, when
    asked: box3d and then --clicks corrective clicks, Dice after each), case and
    gland: 3-D Dice and NSD (FLARE22) on the label volume. By default on the held-out test cases.
    Writes report.json, cases.csv, plots, overlays and index.html to OUT.
    """
    from embedcache.cache.store import open_cache
    from embedcache.config import ScoreConfig
    from embedcache.train.checkpoint import checkpoint_file, read_signature
    from embedcache.train.decoders import check_decoder_fits

    config = ScoreConfig(cache=str(cache), run=_text(run_dir), decoder=_text(decoder_file), cases=cases,
                         prompts=prompts, protocol=_settings(protocol),
                         checkpoint=_text(checkpoint), data=_text(data), device=device, zoom=_text(zoom),
                         zoom_cache=_text(zoom_cache))
    with open_cache(cache) as opened:  # a mistyped path or a decoder for another cache costs a second, not torch's import
        if run_dir or decoder_file:
            decoder = checkpoint_file(run_dir or decoder_file)
            check_decoder_fits(read_signature(decoder), opened.signature, source=decoder, path=cache)
    if data is not None and not data.is_dir():
        raise EmbedcacheError(f"{data}: no such folder; --data takes the dataset folder the cache was encoded from")
    from embedcache.evaluation.score import score as run_score

    with progress_bar(progress) as bar:
        report = run_score(config, out_dir, progress=bar)
    _print_summary(report)
    click.echo(f"report: {out_dir / 'index.html'}")


def _text(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def _print_summary(report) -> None:
    """One table per protocol: mean ± sd per gland and metric, per model, and the difference."""
    from rich.console import Console
    from rich.table import Table

    from embedcache.evaluation.page import MODEL_NAMES

    out = Console()
    out.print(f"{report.case_set} cases ({len(report.case_names)}): {report.case_set_note}", markup=False, highlight=False)
    models = report.models
    for protocol, by_label in report.summary.items():
        table = Table("gland", "metric", *[MODEL_NAMES.get(m, m) for m in models],
                      *(["difference"] if len(models) == 2 else []), title=f"prompts: {protocol}")
        for label, by_model in by_label.items():
            for metric in ("dice", "nsd"):
                stats = [by_model[m][metric] if m in by_model else None for m in models]  # older reports: no zoomed clicks
                table.add_row(report.labels[label], metric,
                              *[f"{x['mean']:.4f} ± {x['sd']:.4f}" if x else "—" for x in stats],
                              *([f"{stats[1]['mean'] - stats[0]['mean']:+.4f}"] if len(stats) == 2 else []))
        out.print(table)
    _print_clicks(out, report)


def _print_clicks(out, report) -> None:
    """The clicks protocol's mean Dice after 0..N clicks and its AUC, per gland and model (nothing without it)."""
    from rich.table import Table

    from embedcache.evaluation.page import MODEL_NAMES, click_counts

    counts = click_counts(report.summary)
    if not counts:
        return
    table = Table("gland", "model", *[f"{k} click{'' if k == 1 else 's'}" for k in counts], "AUC",
                  title="prompts: clicks, mean Dice after each corrective click")
    for label, by_model in report.summary["clicks"].items():
        for model, values in by_model.items():
            table.add_row(report.labels[label], MODEL_NAMES.get(model, model),
                          *[f"{values[f'dice@{k}']['mean']:.4f}" for k in counts], f"{values['dice_auc']['mean']:.4f}")
    out.print(table)


@click.command()
@click.argument("pred", type=click.Path(path_type=Path))
@click.argument("labels_dir", metavar="LABELS", type=click.Path(path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path), help="Report folder.")
@click.option("--labels", default=None, callback=parse_labels,
              help="Label ids to score [default: the label map's adrenal glands: 7,8 in FLARE22's ids].")
@label_map_options
@click.option("--name", default="prediction", show_default=True, help="What to call the predictions in the report.")
@progress_option
@friendly_errors(interrupted=REPLACES)
def evaluate(pred, labels_dir, out_dir, labels, label_map, label_preset, name, progress):
    """Dice and NSD of the label NIfTIs in PRED against the ground truth in LABELS.

    Matched by case name (PRED/CASE.nii.gz with LABELS/CASE.nii.gz) and compared on the label's
    voxels with FLARE22's rules and NSD tolerances: put embedcache's predictions beside nnU-Net's
    or TotalSegmentator's. What the ids mean comes from --label-map, a dataset.json beside LABELS,
    --label-preset, or else FLARE22's ids. A case without a prediction, or on another grid, is
    reported (exit code 1) and the rest are scored. Writes the same report as score.
    """
    from embedcache.evaluation.evaluate import evaluate as run_evaluate

    say = say_to(console())
    from embedcache.io.labels import beside

    mapping, labels, note = resolve_labels(label_map, label_preset, beside(labels_dir), labels)
    with progress_bar(progress) as bar:
        report = run_evaluate(pred, labels_dir, out_dir, labels=labels, label_map=mapping, name=name, progress=bar)
    _print_summary(report)
    if note:
        say(note)
    click.echo(f"report: {out_dir / 'index.html'}")
    if report.errors:
        raise click.ClickException(f"{len(report.errors)} case(s) not scored; see the errors above")


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for the label NIfTIs.")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None, help="A finetune run folder.")
@click.option("--decoder", "decoder_file", type=click.Path(path_type=Path), default=None,
              help="A fine-tuned decoder file instead of --run (neither: the vanilla decoder).")
@click.option("--boxes", "boxes_file", type=click.Path(path_type=Path), default=None,
              help="JSON: 3-D boxes (or boxes on one slice) per input and label, in the file's voxel indices.")
@click.option("--from-labels", type=click.Path(path_type=Path), default=None,
              help="A label NIfTI (or a folder of CASE.nii.gz) whose glands give the prompts.")
@predict_options("prompts")
@protocol_options
@predict_options("series")
@predict_options("output_types")
@predict_options("review_iou")
@predict_options("zoom")
@label_map_options
@predict_options("engine", "precision", "streams", "model", "checkpoint", "device")
@progress_option
@friendly_errors
def predict(inputs, out_dir, run_dir, decoder_file, boxes_file, from_labels, prompts, series, output_types, review_iou,
            zoom, label_map, label_preset, engine, precision, streams, model, checkpoint, device, progress, **protocol):
    """Segment INPUTS (NIfTI files, folders of them, or DICOM series folders) from box prompts.

    A 3-D box per gland is segmented from its middle slice and propagated slice by slice (box3d);
    a box on one slice segments that slice; points beside a box are corrective clicks, applied in
    order (see the boxes file in docs/commands.md). Writes OUT/CASE.nii.gz per input with the decoder's label
    ids (or those of --label-map / --label-preset; FLARE22's by default) on the input's own grid and affine, so it opens aligned in 3D Slicer or ITK-SNAP. An input that
    fails is reported and the rest go on; the exit code is then 1.
    """
    from embedcache.config import PredictConfig, ProtocolSettings, flag

    shaping = [name for name in ("prompts", "margin_mm", "margin_slices", "jitter", "seed", "clicks") if name in typed()]
    if boxes_file is not None and shaping:
        spelled = flag(PredictConfig if shaping[0] == "prompts" else ProtocolSettings, shaping[0])
        raise UsageError(f"{spelled} shapes the prompts drawn from --from-labels; --boxes are segmented as given: "
                         "drop it")
    config = PredictConfig(run=_text(run_dir), decoder=_text(decoder_file), boxes=_text(boxes_file),
                           from_labels=_text(from_labels), prompts=prompts, protocol=_settings(protocol),
                           series=series, model=model, checkpoint=_text(checkpoint), device=device, review_iou=review_iou,
                           engine=engine, precision=precision, streams=streams, label_map=_text(label_map),
                           label_preset=label_preset, zoom=_text(zoom),
                           output_types=output_types)
    from embedcache.segment.predict import predict as run_predict

    with progress_bar(progress) as bar:
        done = run_predict(list(inputs), out_dir, config, progress=bar)
    pace = done.pace()
    if done.written:
        click.echo(f"wrote {len(done.written)} file(s) to {out_dir}" + (f": {pace}" if pace else ""))
    else:  # a run whose every input failed says so, and names no folder it did not make
        click.echo("wrote no files" + ("" if out_dir.is_dir() else f"; {out_dir} was not made"))
    if done.note:
        say_to(console())(done.note)
    if done.errors:
        raise click.ClickException(f"{len(done.errors)} input(s) failed; see the errors above")


@click.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None, help="A finetune run folder.")
@click.option("--decoder", "decoder_file", type=click.Path(path_type=Path), default=None,
              help="A fine-tuned decoder file instead of --run (neither: the vanilla decoder).")
@click.option("--labels", callback=parse_labels, default=None,
              help="The glands to annotate, e.g. 7,8 [default: every label the decoder was trained on].")
@click.option("--cache", "cache_file", type=click.Path(path_type=Path), default=None,
              help="CACHE.h5 (the project's format): slices it holds of IMAGE are not encoded again, and \"add to "
                   "training\" appends the corrected case to it (made if missing).")
@click.option("--save-to", type=click.Path(path_type=Path), default=None,
              help="Where \"save\" writes first (.nii.gz, .seg.dcm or .rtstruct.dcm) [default: ./CASE.nii.gz].")
@protocol_options
@predict_options("zoom")
@predict_options("series")
@predict_options("review_iou")
@label_map_options
@predict_options("engine", "precision", "streams", "model", "checkpoint", "device")
@friendly_errors
def annotate(image, run_dir, decoder_file, labels, cache_file, save_to, zoom, series, review_iou, label_map,
             label_preset, engine, precision, streams, model, checkpoint, device, **protocol):
    """Segment IMAGE (a NIfTI file or a DICOM series folder) by hand in napari: draw a box around a gland on any
    slice, set its first and last slice, click where the mask is wrong; save the result, or add the corrected case
    to a cache to fine-tune on. Needs the napari extra: pip install 'embedcache[napari]'.
    """
    try:
        import napari  # noqa: F401  (the extra, asked for before the model loads)
    except ImportError:
        raise UsageError("embedcache annotate needs napari: pip install 'embedcache[napari]'") from None
    from embedcache.config import PredictConfig

    config = PredictConfig(run=_text(run_dir), decoder=_text(decoder_file), protocol=_settings(protocol),
                           series=series, model=model, checkpoint=_text(checkpoint), device=device,
                           review_iou=review_iou, engine=engine, precision=precision, streams=streams,
                           label_map=_text(label_map), label_preset=label_preset, zoom=_text(zoom))
    from embedcache.segment.annotate import Annotation

    with console().status(f"opening {image} and the model…"):
        annotation = Annotation.open(image, config, cache=cache_file, labels=labels)
    from embedcache.viewer.annotator import open_window

    _, widget = open_window(annotation, save_to=save_to)
    try:
        napari.run()
    finally:
        widget.close()
