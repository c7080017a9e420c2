"""Commands that measure and segment: ``score``, ``evaluate``, ``predict``."""

from __future__ import annotations

from pathlib import Path

import click

from embedcache.cli.common import (
    REPLACES,
    console,
    device_option,
    engine_options,
    friendly_errors,
    label_map_options,
    parse_labels,
    progress_bar,
    progress_option,
    resolve_labels,
    say_to,
)
from embedcache.errors import EmbedcacheError, UsageError


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
        click.option("--walk", default="grow", show_default=True,
                     type=click.Choice(["grow", "fallback", "extent", "bounded"]),
                     help="box3d: grow (stop where the mask vanishes), fallback (there, prompt the 3-D box again, as "
                          "MedSAM does), extent (every slice gets the 3-D box: no walk) or bounded (grow scaled by "
                          "the slice spacing, each box within the last one grown as much)."),
        click.option("--min-iou", default=0.0, show_default=True, type=float,
                     help="box3d: a mask whose predicted IoU is below this counts as vanished (needs a decoder "
                          "trained with --iou-head; 0: off)."),
        click.option("--middle", default="single", show_default=True, type=click.Choice(["single", "multimask"]),
                     help="box3d: the 3-D box's own prompt (the middle slice; every slice under --walk extent) gives "
                          "one mask, or SAM's three with the best predicted IoU kept."),
        click.option("--clicks", "clicks", default=5, show_default=True, type=int,
                     help="clicks: corrective clicks per gland after the 3-D box (0..20)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _settings(jitter, seed, box_margin_mm, box_margin_slices, grow_mm, walk, min_iou, middle, clicks):
    from embedcache.config import ProtocolSettings

    return ProtocolSettings(jitter=jitter, seed=seed, margin_mm=box_margin_mm, margin_slices=box_margin_slices,
                            grow_mm=grow_mm, walk=walk, min_iou=min_iou, middle=middle, clicks=clicks)


@click.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path), help="Report folder.")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None, help="A finetune run folder.")
@click.option("--decoder", "decoder_file", type=click.Path(path_type=Path), default=None,
              help="A fine-tuned decoder file (RUN_DIR/decoder.safetensors) instead of --run.")
@click.option("--cases", default=None, type=click.Choice(["test", "val", "train", "all"]),
              help="Which cases to score [default: test cases if any, else val with --run, else all].")
@click.option("--prompts", default="oracle,jitter,box3d", show_default=True,
              help="Prompt protocols, comma-separated: oracle, jitter, box3d, clicks (box3d and --clicks corrective "
                   "clicks per gland, Dice after each).")
@protocol_options
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="The backbone weights the cache was encoded with (default: the run's, or bundled).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="The dataset folder, if it moved since encoding: each case's label volume and image are "
                   "taken from there by name, checked against the cache's sha256 of what was encoded.")
@device_option
@progress_option
@friendly_errors(interrupted=REPLACES)
def score(cache, out_dir, run_dir, decoder_file, cases, prompts, jitter, seed, box_margin_mm, box_margin_slices,
          grow_mm, walk, min_iou, middle, clicks, checkpoint, data, device, progress):
    """Score the vanilla decoder against the fine-tuned one on the cached embeddings of CACHE.

    Per prompt protocol (oracle: tight boxes on every slice, an upper bound; jitter: sloppy boxes;
    box3d: one 3-D box per gland, propagated from its middle slice, as a person works; clicks, when
    asked: box3d and then --clicks corrective clicks, Dice after each), case and
    gland: 3-D Dice and NSD (FLARE22) on the label volume. By default on the held-out test cases.
    Writes report.json, cases.csv, plots, overlays and index.html to OUT.
    """
    from embedcache.cache.store import open_cache
    from embedcache.config import ScoreConfig
    from embedcache.evaluation.protocols import parse_protocols
    from embedcache.train.checkpoint import checkpoint_file, read_signature
    from embedcache.train.decoders import check_decoder_fits

    config = ScoreConfig(cache=str(cache), run=_text(run_dir), decoder=_text(decoder_file), cases=cases,
                         prompts=parse_protocols(prompts),
                         protocol=_settings(jitter, seed, box_margin_mm, box_margin_slices, grow_mm, walk, min_iou, middle,
                                              clicks),
                         checkpoint=_text(checkpoint), data=_text(data), device=device)
    with open_cache(cache) as opened:  # a mistyped path or a decoder for another cache costs a second, not torch's import
        if run_dir or decoder_file:
            decoder = checkpoint_file(run_dir or decoder_file)
            check_decoder_fits(read_signature(decoder), opened.signature, source=decoder, path=cache)
    if data is not None and not data.is_dir():
        raise EmbedcacheError(f"{data}: no such folder; --data takes the dataset folder the cache was encoded from")
    from embedcache.evaluation.score import score as run_score

    with progress_bar(progress) as bar:
        report = run_score(config, out_dir, progress=bar, log=say_to(console()))
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
                stats = [by_model[m][metric] for m in models]
                table.add_row(report.labels[label], metric, *[f"{x['mean']:.4f} ± {x['sd']:.4f}" for x in stats],
                              *([f"{stats[1]['mean'] - stats[0]['mean']:+.4f}"] if len(stats) == 2 else []))
        out.print(table)
    _print_clicks(out, report)


def _print_clicks(out, report) -> None:
    """The clicks protocol's mean Dice after 0..N clicks and its AUC, per gland and model (nothing without it)."""
    from rich.table import Table

    from embedcache.evaluation.page import MODEL_NAMES
    from embedcache.evaluation.report import click_counts

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
    from embedcache.config import check_label_map_options
    from embedcache.evaluation.evaluate import evaluate as run_evaluate

    say = say_to(console())
    check_label_map_options(label_map, label_preset)
    from embedcache.io.labels import beside

    mapping, labels, note = resolve_labels(label_map, label_preset, beside(labels_dir), labels)
    with progress_bar(progress) as bar:
        report = run_evaluate(pred, labels_dir, out_dir, labels=labels, label_map=mapping, name=name, progress=bar,
                              log=say)
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
@click.option("--prompts", default="box3d", show_default=True,
              type=click.Choice(["oracle", "jitter", "box3d", "clicks"]),
              help="With --from-labels: how the glands become prompts (see score; clicks: the label places them).")
@protocol_options
@click.option("--series", default=None, help="SeriesInstanceUID to read from DICOM folders holding several series.")
@click.option("--output-type", "output_types", default="nifti", show_default=True,
              help="What to write per input, comma-separated: nifti (CASE.nii.gz), dicom-seg (CASE.seg.dcm, a DICOM "
                   "Segmentation) and rtstruct (CASE.rtstruct.dcm, an RT Structure Set); DICOM ones need a DICOM input.")
@click.option("--review-iou", default=0.5, show_default=True, type=float,
              help="OUT/CASE.review.json lists the slices whose predicted IoU is below this: where to look.")
@label_map_options
@engine_options
@click.option("--model", default="litemedsam", show_default=True, help="Backbone when no run or decoder is given.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="Backbone weights (default: bundled).")
@device_option
@progress_option
@friendly_errors
def predict(inputs, out_dir, run_dir, decoder_file, boxes_file, from_labels, prompts, jitter, seed, box_margin_mm,
            box_margin_slices, grow_mm, walk, min_iou, middle, clicks, series, output_types, review_iou, label_map,
            label_preset, engine, precision, streams, model, checkpoint, device, progress):
    """Segment INPUTS (NIfTI files, folders of them, or DICOM series folders) from box prompts.

    A 3-D box per gland is segmented from its middle slice and propagated slice by slice (box3d);
    a box on one slice segments that slice; points beside a box are corrective clicks, applied in
    order (see the README's boxes file). Writes OUT/CASE.nii.gz per input with the decoder's label
    ids (or those of --label-map / --label-preset; FLARE22's by default) on the input's own grid and affine, so it opens aligned in 3D Slicer or ITK-SNAP. An input that
    fails is reported and the rest go on; the exit code is then 1.
    """
    from embedcache.config import PredictConfig

    ctx = click.get_current_context()
    typed = [name for name in ("prompts", "box_margin_mm", "box_margin_slices", "jitter", "seed", "clicks")
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if boxes_file is not None and typed:
        raise UsageError(f"--{typed[0].replace('_', '-')} shapes the prompts drawn from --from-labels; --boxes are "
                         "segmented as given: drop it")
    config = PredictConfig(run=_text(run_dir), decoder=_text(decoder_file), boxes=_text(boxes_file),
                           from_labels=_text(from_labels), prompts=prompts,
                           protocol=_settings(jitter, seed, box_margin_mm, box_margin_slices, grow_mm, walk, min_iou, middle,
                                              clicks),
                           series=series, model=model, checkpoint=_text(checkpoint), device=device, review_iou=review_iou,
                           engine=engine, precision=precision, streams=streams, label_map=_text(label_map),
                           label_preset=label_preset,
                           output_types=tuple(t.strip() for t in output_types.split(",") if t.strip()))
    from embedcache.evaluation.predict import predict as run_predict

    with progress_bar(progress) as bar:
        done = run_predict(list(inputs), out_dir, config, progress=bar, log=say_to(console()))
    pace = done.pace()
    if done.written:
        click.echo(f"wrote {len(done.written)} file(s) to {out_dir}" + (f": {pace}" if pace else ""))
    else:  # a run whose every input failed says so, and names no folder it did not make
        click.echo("wrote no files" + ("" if out_dir.is_dir() else f"; {out_dir} was not made"))
    if done.note:
        say_to(console())(done.note)
    if done.errors:
        raise click.ClickException(f"{len(done.errors)} input(s) failed; see the errors above")
