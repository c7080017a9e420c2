"""Scoring on the cache: vanilla against fine-tuned decoder, under each prompt protocol, in 3-D.

Read top to bottom: choose the cases (held-out test cases when there are any), then for every
case, gland, protocol and model run the protocol (:mod:`embedcache.evaluation.protocols`) on the
cached embeddings, and compare the 3-D prediction with the label volume on its own voxels:
FLARE22's Dice and NSD, and the mean 2-D Dice of the slices holding the gland. The report
(:mod:`embedcache.evaluation.report`) says which cases, which prompts and which checkpoint made
each number; the :class:`~embedcache.config.ScoreConfig` is saved beside it as ``config.json``.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from embedcache.cache.records import CaseRecord
from embedcache.cache.regions import GlandRegion
from embedcache.cache.store import Cache, open_cache
from embedcache.config import ScoreConfig, to_json
from embedcache.errors import EmbedcacheError
from embedcache.evaluation import protocols
from embedcache.evaluation.metrics import dice, gland_metrics
from embedcache.evaluation.page import Overlay
from embedcache.evaluation.report import Report, check_report_folder, report_labels, write_report
from embedcache.evaluation.segmenter import Decoder, Segmenter
from embedcache.evaluation.zoom import BothViews, check_zoom_decoder, redraw_prediction
from embedcache.io.datasets import discover_cases
from embedcache.io.volumes import read_image, read_label, source_digest
from embedcache.runtime.devices import pick_device
from embedcache.train.cases import choose_cases
from embedcache.train.checkpoint import checkpoint_file, read_header
from embedcache.train.decoders import load_model, load_trained_decoder, zoom_decoder_file
from embedcache.train.runs import LOG, RunFolder

logger = logging.getLogger(__name__)

#: The file in the report folder that holds the settings that made it.
CONFIG = "config.json"


def case_sources(records: list[CaseRecord], data: Path | None) -> dict[str, tuple[Path | None, Path]]:
    """Per case, the image and label volume it was encoded from: where the cache says, or, given
    ``data`` (the dataset's folder now, after it moved), the case of that name there, checked byte
    for byte against the cache's digest of what was encoded. The image is None where it is gone:
    the CT only makes the pictures (:func:`_overlays`); the label volume is needed."""
    if data is None:
        sources = {c.name: (Path(c.image) if Path(c.image).exists() else None, Path(c.label)) for c in records}
        for name, (_, path) in sources.items():
            if path.exists():
                continue
            if not path.is_absolute():  # a cache of embedcache 0.1.0 before absolute paths
                raise EmbedcacheError(f"{path}: case {name}'s label volume is not there: the cache holds its path "
                                      "relative to the folder encode ran in; run score there, or pass --data DIR")
            raise EmbedcacheError(f"{path}: case {name}'s label volume is not there (moved or deleted since "
                                  "encoding); pass --data with the dataset folder where it is now")
        return sources
    found = {c.name: c for c in discover_cases(data)}
    sources = {}
    for case in records:
        if case.name not in found:
            raise EmbedcacheError(f"{data}: has no case {case.name}, which the cache holds; give the folder it was "
                                  "encoded from")
        source = found[case.name]
        if source_digest(source.image, source.label) != case.digest:
            raise EmbedcacheError(f"{source.label}: case {case.name}'s files differ from those encoded (sha256); "
                                  "encode again, or give the folder it was encoded from")
        sources[case.name] = (source.image, source.label)
    return sources


class CachedCase:
    """One case's cached embeddings: the :class:`~embedcache.evaluation.segmenter.SliceEmbeddings` score's
    segmenters decode, for any mask decoder."""

    def __init__(self, cache: Cache, case: CaseRecord, *, device: torch.device):
        self.case, self.device = case, device
        self.row_of_z = {int(z): i for i, z in enumerate(cache.read("slice_index", case.rows))}
        self.embeddings_by_row = torch.from_numpy(cache.read("embeddings", case.rows)).to(device)
        self.cache_path = cache.path
        # the slices' pixels (a refinement head's input) beside them, read now: a case outlives its cache's reading
        self._pixels = cache.read("pixels", case.rows) if cache.pixels is not None else None

    def rows(self, zs: np.ndarray) -> list[int]:
        """The case's rows of slices ``zs``; a slice that was not cached is an error saying how to cache it."""
        missing = [int(z) for z in zs if int(z) not in self.row_of_z]
        if missing:
            raise EmbedcacheError(
                f"{self.cache_path}: case {self.case.name} has no embedding of slice {missing[0]}, which its prompts "
                f"need; encode with --margin-slices of at least the box margin (the cache has {self.case.margin_slices})"
            )
        return [self.row_of_z[int(z)] for z in zs]

    @property
    def shape_yx(self) -> tuple[int, int]:
        return tuple(self.case.shape_zyx[1:])

    def embeddings(self, zs: np.ndarray) -> torch.Tensor:
        return self.embeddings_by_row[torch.tensor(self.rows(zs), device=self.device)].float()

    def ahead(self, zs) -> None:
        """Cached slices need no encoding ahead."""

    def pixels(self, zs: np.ndarray) -> np.ndarray:
        """The cached pixels of slices ``zs``: a refinement head's input."""
        if self._pixels is None:
            raise EmbedcacheError(f"{self.cache_path}: holds no slice pixels (encoded before the refinement head), "
                                  "which a decoder trained with --refine-head draws from; encode the data again")
        return self._pixels[self.rows(zs)]

    def segment_with(self, prompt_encoder, mask_decoder, *, input_size: int, slice_size: int) -> Segmenter:
        """This case's :class:`~embedcache.evaluation.segmenter.Segmenter` through the given decoder."""
        return Segmenter(self, Decoder(prompt_encoder, mask_decoder, input_size, slice_size))


@dataclass
class ZoomView:
    """``score --zoom``: the cache of the glands' regions (``encode --zoom``) and the zoom decoder beside its
    backbone."""

    path: Path
    cache: Cache
    model: object  # train.decoders.Model, its one decoder "finetuned"
    decoder: Path

    def segment(self, case: str, label: int, dev) -> tuple[Segmenter, GlandRegion] | None:
        """The region of gland ``label`` of ``case`` and its segmenter over the cached region rows; None where the
        zoom cache holds no such gland."""
        record = next((c for c in self.cache.cases
                       if c.region and c.region["source"] == case and c.region["label"] == label), None)
        if record is None:
            return None
        model = self.model
        segment = CachedCase(self.cache, record, device=dev).segment_with(
            model.parts.prompt_encoder, model.decoders["finetuned"], input_size=model.backbone.input_size,
            slice_size=self.cache.signature.slice_size)
        return segment, GlandRegion.from_dict(record.region)


def open_zoom(config: ScoreConfig, decoder: Path, scored: Cache, dev, stack: ExitStack) -> ZoomView:
    """The zoom decoder ``decoder`` and its cache (``config.zoom_cache``; else the ``scored`` cache when it holds the
    glands' regions, else the cache the decoder was fine-tuned on), checked against each other; a cache opened here
    stays open while ``stack`` does."""
    header = read_header(decoder)
    whole = checkpoint_file(Path(config.run or config.decoder)) if config.run or config.decoder else None
    check_zoom_decoder(header.signature, decoder, read_header(whole).signature if whole else None, whole)
    if config.zoom_cache and not Path(config.zoom_cache).is_file():
        raise EmbedcacheError(f"{config.zoom_cache}: no such cache; --zoom-cache takes the cases encoded with encode "
                              "--zoom")
    if config.zoom_cache:
        path = config.zoom_cache
    elif scored.signature.zoom_mm:
        path = str(scored.path)
    else:
        path = header.config.get("cache")
        if not path or not Path(path).is_file():
            raise EmbedcacheError(f"{decoder}: the cache it was fine-tuned on ({path or 'not recorded'}) is not there; "
                                  "give --zoom-cache, the cases encoded with encode --zoom")
    same = Path(path).resolve() == Path(scored.path).resolve()
    cache = scored if same else stack.enter_context(open_cache(Path(path)))
    if not cache.signature.zoom_mm:
        raise EmbedcacheError(f"{path}: holds whole slices; --zoom-cache takes the cases encoded with encode --zoom")
    trained = load_trained_decoder(decoder, expect=cache.signature, expect_path=Path(path), view="regions")
    model = load_model(cache.signature.backbone, trained=trained,
                       checkpoint=Path(config.checkpoint) if config.checkpoint else None, device=dev,
                       expect_sha256=cache.signature.checkpoint_sha256, made=f"the cache {path}", vanilla=False)
    return ZoomView(Path(path), cache, model, decoder)


def score(config: ScoreConfig, out_dir: Path, *, progress=None) -> Report:
    """Score the vanilla decoder (and the fine-tuned one of ``config.run`` or ``config.decoder``) on a
    case set of ``config.cache`` under each of ``config.prompts``; write the report to ``out_dir``."""
    out_dir, cache_path = Path(out_dir), Path(config.cache)
    run_dir = Path(config.run) if config.run else None
    check_report_folder(out_dir)
    dev = pick_device(config.device)
    with open_cache(cache_path) as cache, ExitStack() as stack:
        zoom_file = zoom_decoder_file(config.zoom, Path(config.run or config.decoder) if config.run or config.decoder
                                      else None)
        if zoom_file is None and config.zoom_cache:
            raise EmbedcacheError(f"--zoom-cache {config.zoom_cache}: no decoder of the glands' regions to draw in it "
                                  "(--run has none beside it); give --zoom")
        zoom = open_zoom(config, zoom_file, cache, dev, stack) if zoom_file else None
        trained = None
        if config.run or config.decoder:
            trained = load_trained_decoder(Path(config.run or config.decoder), expect=cache.signature,
                                           expect_path=cache_path)
        scored = choose_cases(cache, RunFolder(run_dir).split() if run_dir else None, config.cases)
        records = [c for c in cache.cases if c.name in scored.names]
        sources = case_sources(records, Path(config.data) if config.data else None)
        for case in records:
            if sources[case.name][0] is None:
                logger.info(f"{case.image}: not there; the pictures of case {case.name} show its masks without the CT")
        model = load_model(cache.signature.backbone, trained=trained,
                           checkpoint=Path(config.checkpoint) if config.checkpoint else None, device=dev,
                           expect_sha256=cache.signature.checkpoint_sha256, made=f"the cache {cache_path}")
        results, picks = _score_cases(cache, records, sources, model, config, dev, progress, zoom=zoom)
        overlays = _overlays(picks)
    report = Report(
        kind="score", case_set=scored.set, case_set_note=scored.note, case_names=scored.names,
        made_by={"cache": str(cache_path), "run": str(run_dir) if run_dir else None,
                 **(trained.describe() if trained else {"decoder": "vanilla only"}),
                 **({"zoom decoder": str(zoom.decoder), "zoom cache": str(zoom.path),
                     "zoom margin (mm)": zoom.cache.signature.zoom_mm} if zoom else {}),
                 "protocol settings": asdict(config.protocol)},
        prompts={p: protocols.DESCRIPTIONS[p] for p in config.prompts}, protocol_settings=asdict(config.protocol),
        models=tuple(model.decoders) + (("zoomed",) if zoom else ()),
        **report_labels(cache.signature.label_map, cache.labels), cases=results,
    )
    return write_report(out_dir, report, overlays=overlays, log_csv=run_dir / LOG if run_dir else None,
                        extra={CONFIG: to_json(config) + "\n"})


def _score_cases(cache: Cache, records: list[CaseRecord], sources: dict, model, config: ScoreConfig, dev, progress, *,
                 zoom: ZoomView | None = None):
    """Every protocol on every gland of ``records`` with every decoder of ``model`` (and, with ``zoom``, the
    fine-tuned one's masks drawn again in each gland's region, as model ``zoomed``, and corrected through both views
    under clicks): the results
    (``{protocol: {case: {label: {model: metrics}}}}``) and the best and worst slices to show."""
    size = {"input_size": model.backbone.input_size, "slice_size": cache.signature.slice_size}
    results: dict = {p: {} for p in config.prompts}
    shown = config.prompts[-1] if "box3d" not in config.prompts else "box3d"  # the overlays show the realistic protocol
    picks: dict[tuple[int, str], Pick] = {}
    task = progress.add_task("scoring", total=len(records) * len(cache.labels)) if progress else None
    for case in records:
        image_path, label_path = sources[case.name]
        truth = read_label(label_path).array
        if tuple(truth.shape) != tuple(case.shape_zyx):
            raise EmbedcacheError(f"{label_path}: label volume changed since encoding; encode again")
        cached = CachedCase(cache, case, device=dev)
        segments = {m: cached.segment_with(model.parts.prompt_encoder, d, **size) for m, d in model.decoders.items()}
        for label in cache.labels:
            gt = truth == label
            done: dict[str, dict] = {}
            region = zoom.segment(case.name, label, dev) if zoom else None
            for protocol in config.prompts:
                curves = {m: {} for m in (*segments, *(("zoomed",) if zoom else ()))}
                run = partial(protocols.run, truth=gt, spacing_mm=case.spacing_mm, settings=config.protocol,
                              case=case.name, label=label)
                observe = {m: partial(_observe, curves[m], gt, case.spacing_mm, label, cache.signature.label_map)
                           for m in curves}
                # clicks start where box3d ends
                predictions = {m: run(protocol, segment, start=done.get("box3d", {}).get(m), observe=observe[m])
                               for m, segment in segments.items()}
                if zoom is not None:
                    predictions["zoomed"] = _zoomed(protocol, predictions["finetuned"], segments["finetuned"], region,
                                                    gt, case.spacing_mm, run, start=done.get("box3d", {}).get("zoomed"),
                                                    observe=observe["zoomed"])
                done[protocol] = predictions
                results[protocol].setdefault(case.name, {})[str(label)] = {
                    m: {**gland_metrics(p.mask, gt, spacing_mm=case.spacing_mm, label=label,
                                     label_map=cache.signature.label_map), **click_metrics(curves.get(m, {}))}
                    for m, p in predictions.items()
                }
                if protocol == shown:
                    _keep_extremes(picks, case, image_path, label, protocol, gt, predictions)
            if progress:
                progress.advance(task)
    return results, picks


def _zoomed(protocol: str, first: protocols.Prediction, whole, region, gt: np.ndarray, spacing_mm, run, *, start,
            observe) -> protocols.Prediction:
    """``score --zoom``'s model ``zoomed`` under ``protocol``: the fine-tuned decoder's prediction ``first`` with its
    slices drawn again by both views (:func:`~embedcache.evaluation.zoom.redraw`); under ``clicks``, the ``box3d``
    prediction drawn so (``start``, else made here) corrected click by click through
    :class:`~embedcache.evaluation.zoom.BothViews`. ``region``: the gland's zoomed segmenter and region, or None
    (the zoom cache has no such gland: the whole slice alone)."""
    both = None if region is None else BothViews(whole, *region, spacing_mm[1:], gt.shape[1:])
    if protocol != "clicks":
        return first.copy() if both is None else redraw_prediction(first, both)
    if start is None:
        start = _zoomed("box3d", run("box3d", whole), whole, region, gt, spacing_mm, run, start=None, observe=None)
    return run("clicks", both or whole, start=start, observe=observe)


def _observe(curve: dict, gt: np.ndarray, spacing_mm, label: int, label_map, k: int, mask: np.ndarray) -> None:
    """The clicks protocol's mask after ``k`` clicks, scored into ``curve[k]``."""
    curve[k] = gland_metrics(mask, gt, spacing_mm=spacing_mm, label=label, label_map=label_map)


def click_metrics(curve: dict[int, dict]) -> dict[str, float]:
    """``dice@k`` and ``nsd@k`` after each of 0..N clicks, and ``dice_auc``: the area under Dice per click
    (trapezoids), divided by N so that it lies in 0..1 (N = 0: the Dice after the box). Empty: no clicks scored."""
    if not curve:
        return {}
    ks = sorted(curve)
    values = {f"{metric}@{k}": float(curve[k][metric]) for k in ks for metric in ("dice", "nsd")}
    dices = np.array([curve[k]["dice"] for k in ks])
    values["dice_auc"] = float(dices[0] if len(ks) == 1 else ((dices[1:] + dices[:-1]) / 2).sum() / (len(ks) - 1))
    return values


@dataclass
class Pick:
    """A slice worth showing: the best or the worst (``tag``) of a gland so far, by the last model's 2-D Dice."""

    case: CaseRecord
    image: Path | None  # None: the CT is gone, the picture shows the masks on air
    label: int
    z: int
    protocol: str
    tag: str
    dice: dict[str, float]
    truth: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    box: tuple[float, float, float, float] | None = None


def _keep_extremes(picks: dict, case: CaseRecord, image: Path | None, label: int, protocol: str, gt: np.ndarray,
                   predictions: dict) -> None:
    """Remember the best and the worst slice of this gland so far (by the last model's 2-D Dice)."""
    key_model = list(predictions)[-1]
    for z in np.flatnonzero(gt.any(axis=(1, 2))):
        scores = {m: dice(p.mask[z], gt[z]) for m, p in predictions.items()}
        for tag, better in (("best", np.greater), ("worst", np.less)):
            held = picks.get((label, tag))
            if held is None or better(scores[key_model], held.dice[key_model]):
                picks[(label, tag)] = Pick(case=case, image=image, label=label, z=int(z), protocol=protocol, tag=tag,
                                           dice=scores, truth=gt[z].copy(),
                                           masks={m: p.mask[z].copy() for m, p in predictions.items()},
                                           box=predictions[key_model].boxes.get(int(z)))


def _overlays(picks: dict[tuple[int, str], Pick]) -> list[Overlay]:
    images: dict = {}
    shown = []
    for pick in sorted(picks.values(), key=lambda p: (p.label, p.tag != "best")):
        case = pick.case
        if case.name not in images:  # air where the CT is gone (deleted after encoding, say)
            images[case.name] = np.full(case.shape_zyx, -1000, np.float32) if pick.image is None \
                else read_image(pick.image, series_uid=case.series_uid).array
        shown.append(Overlay(case=case.name, label=pick.label, z=pick.z, protocol=pick.protocol, tag=pick.tag,
                             hu=images[case.name][pick.z], truth=pick.truth, masks=pick.masks, box=pick.box,
                             dice=pick.dice))
    return shown
