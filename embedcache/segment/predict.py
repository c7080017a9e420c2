"""Segment new CT from what a person gives: a 3-D box per gland, a box on one slice (a JSON file,
:mod:`embedcache.segment.prompt_file`), or a label volume to draw them from. The image encoder
runs on the fly; the output is a label NIfTI on the input's own grid, and the
:class:`~embedcache.config.PredictConfig` that made it is saved beside it in ``predict.json``, with the
names of the files predict wrote there: it never writes over an input, the labels its prompts come
from, or a file it did not write.

A ``box3d`` is segmented by the ``box3d`` protocol (middle slice, then propagation slice by slice;
see :mod:`embedcache.evaluation.protocols`); a ``box`` on ``slice`` k segments that slice only.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from functools import cache, partial
from pathlib import Path

import numpy as np

from embedcache.cache.preprocess import slice_to_model
from embedcache.cache.regions import GlandRegion, ZoomedSlices, gland_region
from embedcache.cache.store import to_pixels
from embedcache.config import OUTPUT_TYPES, PredictConfig, PreprocessConfig, ProtocolSettings
from embedcache.errors import EmbedcacheError, UsageError
from embedcache.evaluation import protocols
from embedcache.evaluation.protocols import Prediction
from embedcache.evaluation.segmenter import Decoder, Segmenter
from embedcache.evaluation.zoom import BothViews, check_zoom_decoder, redraw_prediction, region_of_box
from embedcache.io.datasets import case_name
from embedcache.io.dicom_out import (
    check_labels,
    check_no_other_object,
    check_only_series,
    check_source_series,
    write_rtstruct,
    write_seg,
)
from embedcache.io.files import (
    WriterLock,
    atomic_path,
    atomic_write_text,
    file_sha256,
    make_output_folder,
    partials_of,
    read_json,
    same_file,
)
from embedcache.io.geometry import Geometry
from embedcache.io.labels import LabelMap, beside, fallback_note, resolve_label_map
from embedcache.io.nifti import write_nifti
from embedcache.io.volumes import check_same_grid, expand_inputs, read_geometry, read_image, read_label
from embedcache.model.engines import (
    GRAPH_ENGINES,
    GraphDecoder,
    build_encoder,
    check_engine,
    resolve_engine,
    timing_waits_for,
)
from embedcache.runtime.devices import pick_device
from embedcache.segment.prompt_file import Request, read_boxes_file, requests_from_json
from embedcache.train.checkpoint import checkpoint_file, read_signature
from embedcache.train.decoders import ZOOM_OFF, load_model, load_trained_decoder, zoom_decoder_file

logger = logging.getLogger(__name__)

#: The file beside the label volumes that holds the settings that made them.
CONFIG = "predict.json"
#: The lock of an output folder, inside it: one predict writes there at a time.
LOCK = ".embedcache.lock"
#: Beside each CASE.nii.gz, CASE + this: every decoded slice's predicted IoU, the low ones first.
REVIEW = ".review.json"


@dataclass(frozen=True)
class Job:
    """One input, checked: where it is, what to segment, where the result goes."""

    image: Path
    out: Path  # CASE.nii.gz (written where --output-type asks for nifti)
    geometry: Geometry
    review: Path  # the slices to look at: each decoded slice's predicted IoU
    outputs: tuple[tuple[str, Path], ...] = ()  # (--output-type, file) of each result to write
    requests: tuple[Request, ...] = ()
    label_file: Path | None = None  # --from-labels: the requests come from this volume's glands

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file this job writes."""
        return tuple(path for _, path in self.outputs) + (self.review,)


def plan(inputs: list[Path], out_dir: Path, config: PredictConfig, *, labels, label_map: LabelMap,
         owned: set[str]) -> tuple[list[Job], list[str]]:
    """Check every input before any model is loaded; returns the jobs to run and the errors of the rest.
    ``labels``: the decoder's (None: any in a boxes file; with ``--from-labels`` the map's adrenal glands).
    ``owned``: the outputs earlier runs of predict wrote in ``out_dir`` (:func:`written_before`)."""
    names = [case_name(Path(i)) for i in inputs]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        same = [str(i) for i, n in zip(inputs, names) if n == clash[0]]
        raise UsageError(f"{' and '.join(same)} would both be written to {Path(out_dir) / (clash[0] + '.nii.gz')}; "
                         "rename one or predict them into different folders")
    dicom = any(kind != "nifti" for kind in config.output_types)
    if config.from_labels is not None and not (labels or label_map.adrenals()):
        raise UsageError(f"{label_map.source} names no adrenal gland, the vanilla decoder's targets; give the label map "
                         "that names them, or --run a decoder trained on your labels")
    if dicom and config.from_labels is not None:
        check_labels(labels or label_map.adrenals(), label_map)  # every segment and ROI gets its name and code
    boxes_file = Path(config.boxes) if config.boxes else None
    table = read_boxes_file(boxes_file) if boxes_file is not None else None
    jobs, errors = [], []
    for image in map(Path, inputs):
        try:
            geometry = read_geometry(image, series_uid=config.series)
            out = Path(out_dir) / f"{case_name(image)}.nii.gz"
            review = Path(out_dir) / f"{case_name(image)}{REVIEW}"
            outputs = tuple((kind, Path(out_dir) / f"{case_name(image)}{OUTPUT_TYPES[kind]}") for kind in config.output_types)
            check_dicom_source(image, config.output_types, config.series)
            if table is not None:
                job = Job(image, out, geometry, review, outputs,
                          requests=requests_from_json(table, boxes_file, image, geometry, labels))
                if dicom:
                    check_labels(sorted({r.label for r in job.requests}), label_map)
            else:
                label_file = Path(config.from_labels)
                if label_file.is_dir():
                    label_file = label_file / f"{case_name(image)}.nii.gz"
                check_same_grid(geometry, read_geometry(label_file), image_path=image, label_path=label_file)
                job = Job(image, out, geometry, review, outputs, label_file=label_file)
            jobs.append(job)
        except EmbedcacheError as exc:
            errors.append(str(exc))
            logger.error(str(exc))
    # a killed run's temporary files (marked as embedcache's) are its own, replaced under the lock, not foreign
    ours = owned | {p.name for job in jobs for path in job.files for p in partials_of(path)}
    for job in jobs:  # before any work: refused whole, not one input among others
        _check_output(job, owned)
        if any(kind != "nifti" for kind, _ in job.outputs):
            check_no_other_object(Path(out_dir), job.image, series_uid=config.series, owned=ours)
    return jobs, errors


def check_dicom_source(image: Path, kinds, series: str | None) -> None:
    """DICOM output (``kinds`` other than nifti) needs the source series (a folder) with one frame of reference and
    its slices' classes, and for an RT Structure Set a folder of that series only: all checked before the first
    file is written."""
    kinds = [kind for kind in kinds if kind != "nifti"]
    if not kinds:
        return
    if not Path(image).is_dir():
        raise EmbedcacheError(f"{image}: a NIfTI file; --output-type {kinds[0]} writes a DICOM object that references "
                              "its source series: segment the DICOM series folder")
    check_source_series(Path(image), series)
    if "rtstruct" in kinds:
        check_only_series(Path(image), series)


def written_before(out_dir: Path) -> set[str]:
    """The names of the label volumes earlier runs of predict wrote into ``out_dir`` (its ``predict.json``);
    a ``predict.json`` that predict did not write is refused: the folder is someone else's."""
    record = out_dir / CONFIG
    if not record.exists():
        return set()
    saved = read_json(record, what="predict record", fix="choose another --out")
    if not isinstance(saved, dict) or set(saved) - {"label_map"} != {"config", "written"} \
            or not isinstance(saved["written"], list) \
            or not all(isinstance(n, str) for n in saved["written"]):
        raise EmbedcacheError(f"{record}: not a record predict wrote; choose another --out")
    return set(saved["written"])


def check_out_outside_inputs(out_dir: Path, inputs) -> None:
    """Refuse an ``--out`` that is an input folder (a DICOM series, a folder of volumes or of labels) or lies inside
    one, or that is the folder an input file lies in, however a link spells it: predict would write among its
    inputs, and the folder would no longer read as one."""
    out = Path(os.path.realpath(out_dir))
    for given in map(Path, inputs):
        folder = Path(os.path.realpath(given if given.is_dir() else given.parent))
        if given.exists() and (out == folder or (given.is_dir() and folder in out.parents)):
            where = "lies inside the input" if given.is_dir() else "is the folder of the input"
            raise UsageError(f"--out {out_dir}: {where} {given}; predict never writes among its inputs: choose a "
                             "folder outside it")


def _check_output(job: Job, owned: set[str]) -> None:
    """Never write over an input, the labels the prompts come from, or a file predict did not write."""
    if same_file(job.out, job.image):
        raise EmbedcacheError(f"{job.out}: is the input image itself; choose another --out (predict never writes "
                              "over its inputs)")
    if job.label_file is not None and same_file(job.out, job.label_file):
        raise EmbedcacheError(f"{job.out}: is the label volume the prompts come from; choose another --out")
    for path in job.files:
        if path.exists() and path.name not in owned:
            raise EmbedcacheError(f"{path}: exists and predict did not write it; choose another --out or move the file")


class OnTheFly:
    """A volume's slices, encoded when first asked for: the :class:`~embedcache.evaluation.segmenter.SliceEmbeddings`
    predict's segmenter decodes; the slices a walk
    says it will ask for next (:meth:`ahead`) are encoded ahead of it, beside the decoding, as many at once as a
    graph engine runs together (its streams). :meth:`close` drops what is still waiting.

    Embeddings are rounded to ``embedding_dtype`` (the cache's, float16 by default) before decoding,
    as cached ones are: the same box gives the same mask here and in ``score``."""

    def __init__(self, hu_zyx: np.ndarray, encoder, preprocess: PreprocessConfig, *, on_encode=None):
        self.hu, self.encoder, self.preprocess = hu_zyx, encoder, preprocess
        self.encoded: dict[int, object] = {}  # slice → its embedding
        self.on_encode = on_encode  # called after each slice is encoded (a progress bar's advance)
        self._coming: dict[int, object] = {}  # slice → the Future encoding it ahead
        self._pool = None

    def _image(self, z: int) -> np.ndarray:
        pre = self.preprocess
        return slice_to_model(self.hu[z], width_hu=pre.window_width_hu, level_hu=pre.window_level_hu,
                              slice_size=pre.slice_size)

    def _encode(self, z: int):
        embedding = self.encoder(self._image(z)[None])[0]
        if self.on_encode:
            self.on_encode()
        return embedding

    def ahead(self, zs) -> None:
        """Encode slices ``zs`` (in this order) before they are asked for; those told before and not yet begun that
        are not among them are dropped. Only a graph engine encodes ahead: eager torch beside the eager decoder
        made predict slower on a CPU (their thread pools contend), so torch encodes when asked."""
        if not self.encoder.streams:  # 0: eager torch, which encodes when asked (Encoder.streams)
            return
        wanted = set(zs)
        for z in [z for z in self._coming if z not in wanted]:
            if self._coming[z].cancel():
                del self._coming[z]
        if self._pool is None and zs:
            self._pool = ThreadPoolExecutor(self.encoder.streams, thread_name_prefix="embedcache-ahead")
        for z in zs:
            if z not in self.encoded and z not in self._coming and 0 <= z < len(self.hu):
                self._coming[z] = self._pool.submit(self._encode, z)

    def embedding(self, z: int):
        if z not in self.encoded:
            coming = self._coming.pop(z, None)
            self.encoded[z] = coming.result() if coming is not None else self._encode(z)  # cancelled ones are gone
        return self.encoded[z]

    def close(self) -> None:
        """Drop the slices still waiting to be encoded ahead, and wait for the ones being encoded."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._coming.clear()

    @property
    def shape_yx(self) -> tuple[int, int]:
        return tuple(self.hu.shape[1:])

    def embeddings(self, zs):
        """``(len(zs), 256, 64, 64)`` float32: each slice's embedding, encoded now unless it was already."""
        import torch

        return torch.stack([self.embedding(int(z)) for z in zs]).float()

    def pixels(self, zs) -> np.ndarray:
        """``(len(zs), S, S)`` uint8: the slices as the encoder sees them, as a cache's ``pixels`` holds them (what a
        refinement head reads)."""
        return to_pixels(np.stack([self._image(int(z)) for z in zs])) if len(zs) else \
            np.zeros((0, self.preprocess.slice_size, self.preprocess.slice_size), np.uint8)

    def segment_with(self, prompt_encoder, mask_decoder, *, input_size: int, decode=None) -> Segmenter:
        """This volume's :class:`~embedcache.evaluation.segmenter.Segmenter` through the given decoder (``decode``:
        an exported graph in its place, see :func:`~embedcache.model.decoder.segment_boxes`)."""
        return Segmenter(self, Decoder(prompt_encoder, mask_decoder, input_size, self.preprocess.slice_size, decode))


@dataclass
class PredictResult:
    """What ``predict`` did: the files written, the errors of the inputs that failed, and how long the
    segmenting took (from reading an input to its last file written, model loading apart)."""

    written: list[Path]
    errors: list[str]
    engine: str = ""  # what ran the image encoder, and at what precision: "openvino fp32"
    cases: int = 0  # inputs segmented
    glands: int = 0
    slices_encoded: int = 0
    seconds: float = 0.0
    note: str = ""  # said once at the end: the label map fell back to FLARE22's ids

    def pace(self) -> str:
        """``12.3 s per case, 6.1 s per gland (openvino fp32, 40 slices encoded)``, or "" before any case."""
        if not self.cases:
            return ""
        per_gland = f", {self.seconds / self.glands:.1f} s per gland" if self.glands else ""
        return (f"{self.seconds / self.cases:.1f} s per case{per_gland} ({self.engine}, {self.slices_encoded} slices "
                "encoded)")


def predict(inputs: list[Path], out_dir: Path, config: PredictConfig, *, progress=None) -> PredictResult:
    """Write ``out_dir/CASE.nii.gz`` for each input; returns the files written, the errors of those that failed and
    the pace."""
    if config.boxes is None and config.from_labels is None:
        raise UsageError("give either --boxes BOXES.json or --from-labels LABELS")
    decoder = checkpoint_file(Path(config.run or config.decoder)) if config.run or config.decoder else None
    trained_on = read_signature(decoder) if decoder else None  # the header alone: the inputs come first
    zoom = zoom_decoder_file(config.zoom, decoder)  # auto: the run's own, if finetune made one
    if zoom is not None:
        check_zoom_decoder(read_signature(zoom), zoom, trained_on, decoder)
    labels = trained_on.labels if trained_on else None
    label_map, note = predict_label_map(config, trained_on, decoder)
    check_out_outside_inputs(Path(out_dir), [*inputs, *([config.from_labels] if config.from_labels else [])])
    owned = written_before(Path(out_dir))
    jobs, errors = plan(expand_inputs(inputs), out_dir, config, labels=labels, label_map=label_map, owned=owned)
    if not jobs:
        return PredictResult([], errors, note=note)

    # what can be refused without the model is refused before OUT is made: no empty folder is left behind
    check_engine(config.engine, pick_device(config.device).type, config.precision, config.streams)
    trained = load_trained_decoder(decoder) if decoder else None
    zoomed = load_trained_decoder(zoom) if zoom else None
    # the first input is read while the model loads, the next while this one is encoded (NIfTI's gzip and DICOM
    # decoding run beside the engine)
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedcache-predict-reader")
    read = partial(read_image, series_uid=config.series)
    coming = reader.submit(read, jobs[0].image)
    held = ExitStack()
    try:
        with timing_waits_for(partial(wait, [coming])):  # a measurement, if one runs, times a quiet CPU
            model = load_predict_model(trained, config, zoom=zoomed)
        make_output_folder(out_dir)  # once the model is in hand: a refused model leaves no empty folder behind
        held.enter_context(WriterLock(Path(out_dir) / LOCK, what=str(out_dir)))  # one predict writes here at a time
        owned = written_before(Path(out_dir))  # what another predict wrote here since the checks counts too
        for job in jobs:
            _check_output(job, owned)
        for job in jobs:  # a killed run's temporary files of this run's own outputs, marked as embedcache's
            for leftover in (p for path in job.files for p in partials_of(path)):
                if leftover.is_file():
                    leftover.unlink()

        made_by = f"sha256 {file_sha256(decoder)[:16]}" if decoder else f"vanilla {config.model}"
        # Recorded before they are written: an interrupted run's outputs are still known as predict's own.
        names = sorted(owned | {path.name for job in jobs for path in job.files})
        used = replace(config, zoom=str(zoom) if zoom is not None else ZOOM_OFF)  # what --zoom auto found
        atomic_write_text(Path(out_dir) / CONFIG, json.dumps({"config": asdict(used), "written": names,
                                                               "label_map": label_map.to_dict()}, indent=2) + "\n")
        result_of = PredictResult([], errors, engine=model.engines, note=note)
        written = result_of.written
        task = bar = None
        if progress:
            task = progress.add_task("predicting", total=len(jobs))
            # how many slices a 3-D box's propagation asks for is known only at its end: a count, no total
            bar = progress.add_task("slices encoded", total=None)

        counting = threading.Lock()  # slices are encoded ahead in other threads too

        def encoded(n=1):
            with counting:
                result_of.slices_encoded += n
            if progress:
                progress.advance(bar, n)

        for number, job in enumerate(jobs):
            if progress:
                progress.update(task, description=f"predicting {case_name(job.image)}")
            started = time.perf_counter()
            try:
                pending = coming
                coming = reader.submit(read, jobs[number + 1].image) if number + 1 < len(jobs) else None
                image = pending.result()
                volume = OnTheFly(image.array, model.encoder, model.preprocess, on_encode=encoded)
                segment = volume.segment_with(model.prompt_encoder, model.mask_decoder, input_size=model.input_size,
                                              decode=model.decode)
                zoom = ZoomedGlands(model, image, segment, on_encode=encoded) if model.zoom is not None else None
                try:
                    predictions = _segment_job(job, segment, image, prompts=config.prompts, settings=config.protocol,
                                               labels=labels or label_map.adrenals(), zoom=zoom)
                finally:  # an error or an interrupt leaves no encoding running ahead
                    volume.close()
                    if zoom is not None:
                        zoom.close()
                result = label_volume(image.array.shape, predictions)
                dicom = [kind for kind, _ in job.outputs if kind != "nifti"]
                if dicom and not result.any():  # checked before the first file: none is written for this input
                    raise EmbedcacheError(f"{job.image}: the prediction is empty, so there is no segment to write "
                                          f"as --output-type {dicom[0]}; nothing was written for it: check its boxes")
                for kind, path in job.outputs:
                    write_output(kind, path, result, image, job.image, series=config.series,
                                 labels=list(dict.fromkeys(l for l, _ in predictions)), label_map=label_map,
                                 made_by=made_by)
                look = write_review(job.review, predictions, image.geometry, threshold=config.review_iou,
                                    label_map=label_map)
                written.extend(path for _, path in job.outputs)
                seconds = time.perf_counter() - started
                result_of.cases += 1
                result_of.glands += len(predictions)
                result_of.seconds += seconds
                logger.info(f"{', '.join(p.name for _, p in job.outputs)}: {len(predictions)} gland(s), "
                    f"{sum(len(p.boxes) for _, p in predictions)} slices decoded in {seconds:.1f} s"
                    + (f"; {look} with predicted IoU below {config.review_iou:g}: see {job.review.name}" if look else ""))
            except EmbedcacheError as exc:
                errors.append(str(exc))
                logger.error(str(exc))
            if progress:
                progress.advance(task)
    finally:  # an interrupt leaves no read running behind it
        reader.shutdown(cancel_futures=True)
        held.close()
    return result_of


def gland_zone(gland: np.ndarray | None, request: Request | None, image, *, margin_mm: float, size: int
               ) -> GlandRegion | None:
    """Where ``--zoom`` draws a gland again: the region of its label volume's ``gland`` (bool, ``--from-labels``, as
    ``encode --zoom`` makes it) or of its ``request``'s box (``--boxes``); None for a prompt of clicks alone (no box
    says where the gland is) and where the region would be no finer than the slice."""
    spacing_yx = image.geometry.spacing_mm[1:]
    if request is None:
        where = gland_region(gland, spacing_yx, margin_mm=margin_mm, size=size, zpad=len(image.array))
    elif request.points_only:
        return None
    else:
        where = region_of_box(request.box.box, request.box.z0, request.box.z1, spacing_yx, margin_mm=margin_mm,
                              size=size)
    return where if where.region.pixel_mm < min(spacing_yx) else None


class ZoomedGlands:
    """``predict --zoom`` on one volume: each gland's region (:func:`gland_zone`) encoded on the fly as the whole
    slices are, and seen through :class:`~embedcache.evaluation.zoom.BothViews` with the whole-slice ``segment``.
    :meth:`close` drops what is still being encoded ahead."""

    def __init__(self, model: "PredictModel", image, segment, *, on_encode=None):
        self.model, self.image, self.segment, self.on_encode = model, image, segment, on_encode
        self.spacing_yx = image.geometry.spacing_mm[1:]
        self._open: list[OnTheFly] = []

    def views(self, request: Request | None, gland: np.ndarray | None = None) -> BothViews | None:
        """Both views of the gland of ``request`` (its box and clicks) or, without one, of the label volume's
        ``gland`` (bool); None where it has no region (the whole slice alone draws it)."""
        zoom, model = self.model.zoom, self.model
        where = gland_zone(gland, request, self.image, margin_mm=zoom.margin_mm, size=model.preprocess.slice_size)
        if where is None:
            return None
        slices = OnTheFly(ZoomedSlices(self.image.array, where.region, self.spacing_yx), model.encoder,
                          model.preprocess, on_encode=self.on_encode)
        self._open.append(slices)
        zoomed = slices.segment_with(zoom.prompt_encoder, zoom.mask_decoder, input_size=model.input_size,
                                     decode=zoom.decode)
        return BothViews(self.segment, zoomed, where, self.spacing_yx, self.image.array.shape[1:])

    def close(self) -> None:
        for slices in self._open:
            slices.close()
        self._open.clear()


def _drawn_again(prediction: Prediction, both: BothViews | None) -> Prediction:
    """``prediction`` with its slices drawn again through ``both``
    (:func:`~embedcache.evaluation.zoom.redraw_prediction`); itself where there is no region."""
    return prediction if both is None else redraw_prediction(prediction, both)


def label_volume(shape_zyx, predictions) -> np.ndarray:
    """The ``(z, y, x)`` uint8 label volume of ``(label, prediction)`` pairs: a later label over an earlier one where
    two overlap."""
    result = np.zeros(shape_zyx, np.uint8)
    for label, prediction in predictions:
        result[prediction.mask] = label
    return result


def write_output(kind: str, path: Path, result: np.ndarray, image, source: Path, *, series: str | None, labels,
                 label_map: LabelMap, made_by: str) -> None:
    """One result file of ``--output-type`` ``kind``: the label NIfTI, or a DICOM object referencing the series
    ``source`` (a folder; ``series`` picks one), built beside ``path``, then moved into place."""
    if kind == "nifti":
        write_nifti(result, image.geometry, path)
        return

    voxels = image.geometry.to_source(result)
    with atomic_path(path, keep_suffix=True) as tmp:  # rt-utils adds .dcm to a name without it
        if kind == "dicom-seg":
            write_seg(tmp, source, voxels, series_uid=series, label_ids=labels, label_map=label_map,
                      decoder=made_by, semiautomatic=True)  # box-prompted: a person gave the boxes
        else:
            write_rtstruct(tmp, source, voxels, series_uid=series, label_ids=labels, label_map=label_map)


def write_review(path: Path, predictions: list[tuple[int, Prediction]], geometry: Geometry, *, threshold: float,
                 label_map: LabelMap) -> int:
    """``CASE.review.json``: per gland, every decoded slice (the file's own slice index and axis, the box,
    the mask's voxels, the decoder's predicted IoU), and the slices whose predicted IoU is below
    ``threshold``, lowest first: where a person should look. Returns how many slices that is."""
    glands, low = [], 0
    for label, prediction in predictions:
        slices = []
        for z in sorted(prediction.boxes):
            axis, index = geometry.source_slice(z)
            slices.append({"slice": index, "axis": axis, "predicted_iou": round(prediction.iou.get(z, float("nan")), 4),
                           "voxels": int(prediction.mask[z].sum()), "box_xyxy": [round(float(v), 2) for v in prediction.boxes[z]]})
        look = sorted((s for s in slices if s["predicted_iou"] < threshold), key=lambda s: s["predicted_iou"])
        low += len(look)
        # the clicks as a boxes file takes them: the file's voxel indices, 1 on the gland, 0 off it
        points = [[*map(int, geometry.source_index([[c.x, c.y, c.z]])[0]), int(c.positive)] for c in prediction.clicks]
        glands.append({"label": int(label), "name": label_map.name(label), "look_at": [s["slice"] for s in look],
                       "slices": slices, **({"points": points} if points else {})})
    atomic_write_text(path, json.dumps({"threshold": threshold, "glands": glands}, indent=1) + "\n")
    return low


def predict_label_map(config: PredictConfig, trained_on, decoder: Path | None) -> tuple[LabelMap, str]:
    """What the ids mean: the trained decoder's map, else ``--label-map``, a ``dataset.json`` beside
    ``--from-labels``, a preset, or FLARE22's ids; and the note to say where it fell back to them (else "").
    With a decoder, a map given or found beside ``--from-labels`` must agree with it on its labels: label volumes
    in another convention would prompt one organ with another's outline."""
    folders = beside(Path(config.from_labels)) if config.from_labels else ()
    label_map, fallback = resolve_label_map(path=Path(config.label_map) if config.label_map else None,
                                            preset_name=config.label_preset, folders=folders)
    if trained_on is None:
        return label_map, fallback_note(label_map.adrenals()) if fallback else ""
    clash = None if fallback else trained_on.label_map.disagreement(label_map, trained_on.labels)
    if clash:
        raise UsageError(f"{decoder} and {label_map.source} disagree ({clash}); give labels in the ids the decoder "
                         "was trained on, or drop a --label-map/--label-preset that does not describe them")
    return trained_on.label_map, ""


def _segment_job(job: Job, segment, image, *, prompts: str, settings: ProtocolSettings, labels,
                 zoom: ZoomedGlands | None = None) -> list:
    """Each gland of ``job``: from its label volume under protocol ``prompts``, or from its request (box, clicks).
    With ``zoom``, each gland's slices are drawn again in its region, and its clicks go through both views."""
    shape, spacing = image.array.shape, image.geometry.spacing_mm
    if job.label_file is not None:  # the glands of a label volume, under the chosen protocol
        truth = read_label(job.label_file).array
        out = []
        for label in labels:
            gt = truth == label
            if not gt.any():
                continue
            run = partial(protocols.run, segment=segment, truth=gt, spacing_mm=spacing, settings=settings,
                          case=case_name(job.image), label=label)
            both = zoom.views(None, gt) if zoom is not None else None
            if both is None:
                out.append((label, run(prompts)))
            elif prompts == "clicks":  # the clicks correct the box3d mask drawn again, each through both views
                out.append((label, run("clicks", segment=both, start=_drawn_again(run("box3d"), both))))
            else:
                out.append((label, _drawn_again(run(prompts), both)))
        return out
    return [(request.label, segment_request(request, segment, shape, spacing, settings,
                                            both=zoom.views(request) if zoom is not None else None))
            for request in job.requests]


def segment_request(request: Request, segment, shape_zyx, spacing_mm, settings: ProtocolSettings, *,
                    both: BothViews | None = None) -> Prediction:
    """One gland of a boxes file (or of a person's box and clicks, :mod:`embedcache.segment.annotate`): its 3-D box
    propagated (``box3d``), or its one slice, then its clicks applied in order as the clicks protocol applies them.
    With ``both`` (``predict --zoom``), the box's slices are drawn again in the gland's region before the clicks, and
    each click is decoded through both views."""
    prediction = Prediction(np.zeros(shape_zyx, bool))
    z = request.box.z0
    if request.points_only:  # the clicks alone prompt their slice (SAM adds its padding point)
        prediction.clicks = list(request.clicks)
        masks, iou = segment(np.array([z]), np.full((1, 4), np.nan, np.float32),
                             points=[np.array([c.point() for c in request.clicks], np.float32)])
        prediction.mask[z], prediction.iou[z] = masks[0], float(iou[0])
        prediction.boxes[z] = request.box.box
        return prediction
    if request.single_slice:
        masks, iou = segment(np.array([z]), np.array([request.box.box], np.float32))
        prediction.mask[z], prediction.boxes[z], prediction.iou[z] = masks[0], request.box.box, float(iou[0])
    else:
        prediction = protocols.propagate(request.box, segment, shape_zyx, grow_px=protocols.grow_px(settings, spacing_mm),
                                         walk=settings.walk, min_iou=settings.min_iou,
                                         multimask=settings.middle == "multimask")
    prediction = _drawn_again(prediction, both)
    for click in request.clicks:  # in the file's order, as the clicks protocol places them
        add_click(prediction, request, click, both or segment, spacing_mm, settings)
    return prediction


def add_click(prediction: Prediction, request: Request, click, segment, spacing_mm, settings: ProtocolSettings) -> None:
    """Apply one more click of ``request`` to its ``prediction``, in place (:func:`~embedcache.evaluation.protocols.refine`
    with the protocol settings predict uses)."""
    protocols.refine(prediction, request.box, click, segment, grow_px=protocols.grow_px(settings, spacing_mm),
                     walk=settings.walk, min_iou=settings.min_iou, rule=settings.refine, reach=settings.reach)


@dataclass
class PredictModel:
    """What segments on the fly: the image encoder, the prompt encoder and the (fine-tuned) mask decoder
    on the device, the encoder's input size and the preprocessing the decoder was trained with."""

    encoder: object  # embedcache.model.encoder.ImageEncoder or embedcache.model.engines.GraphEncoder
    prompt_encoder: object  # None where ``decode`` decodes
    mask_decoder: object
    input_size: int
    preprocess: PreprocessConfig
    decode: object = None  # embedcache.model.engines.GraphDecoder: the decoder as a graph, on a CPU engine
    backbone: str = ""  # what made the embeddings, as a cache's signature records it: the backbone's name,
    weights_sha256: str = ""  # its weights' sha256
    embedding_dtype: str = "float16"  # and the type they are rounded to
    zoom: "ZoomDecoder | None" = None  # --zoom: the decoder of the glands' regions

    @property
    def engines(self) -> str:
        """What runs the encoder (and how many slices at once, where more than one), and the decoder where a graph
        does (and its precision where not fp32): ``openvino fp32 2 at once, decoder openvino``."""
        streams = self.encoder.streams or 1
        label = f"{self.encoder.engine} {self.encoder.precision}" + (f" {streams} at once" if streams > 1 else "")
        if self.decode:
            label += f", decoder {self.decode.engine}"
            if self.decode.precision != "fp32":
                label += f" {self.decode.precision}"
        return label


@dataclass
class ZoomDecoder:
    """``predict --zoom``'s second decoder, fine-tuned on regions grown ``margin_mm`` around the glands: eager
    (``prompt_encoder``, ``mask_decoder``) or, on a CPU graph engine, ``decode``."""

    prompt_encoder: object
    mask_decoder: object
    decode: object
    margin_mm: float


def load_predict_model(trained, config: PredictConfig, *, zoom=None) -> PredictModel:
    """The model of ``config`` (the trained decoder's backbone and preprocessing, where there is one). With a CPU
    graph engine the encoder and the decoder run as exported graphs, and the eager model is loaded only to export
    them (once per weights) or to decode a prompt with clicks: a graph engine's predict spends no time building it."""
    import torch

    from embedcache.model.backbones import Weights
    from embedcache.model.refine import has_refiner

    preprocess, dtype, name = PreprocessConfig(), "float16", config.model
    if trained is not None:
        name, preprocess, dtype = trained.signature.backbone, trained.signature.preprocess, trained.signature.embedding_dtype
    dev = pick_device(config.device)
    checkpoint = Path(config.checkpoint) if config.checkpoint else None
    weights = Weights.of(name, checkpoint or (trained.checkpoint if trained else None))
    backbone, sha = weights.backbone, weights.sha256
    if trained is not None:
        weights.require(trained.signature.checkpoint_sha256, given=checkpoint, made=f"the decoder {trained.source}")

    @cache
    def model():  # the weights are checked above
        return load_model(name, trained=trained, checkpoint=weights.path, device=dev, vanilla=False)

    @cache
    def zoom_model():  # the same weights (predict checked the two decoders' signatures agree)
        return load_model(name, trained=zoom, checkpoint=weights.path, device=dev, vanilla=False)

    def eager_for_refiner(decoder, loaded):  # a refinement head runs eagerly after a graph's decoder (model.refine)
        return loaded().decoder if decoder is not None and has_refiner(decoder.state) else None

    engine, streams = resolve_engine(config.engine, backbone, lambda: model().parts.image_encoder, sha, device=dev,
                                     streams=config.streams)
    encoder = build_encoder(engine, backbone, lambda: model().parts.image_encoder, sha, device=dev,
                            out_dtype=torch.float16 if dtype == "float16" else torch.float32,
                            precision=config.precision, streams=streams)
    graph = engine in GRAPH_ENGINES  # the decoders run where the encoder does, at its precision
    second = None
    if zoom is not None and graph:
        second = ZoomDecoder(None, eager_for_refiner(zoom, zoom_model),
                             GraphDecoder(engine, backbone, lambda: (zoom_model().parts.prompt_encoder,
                                                                     zoom_model().decoder),
                                          sha, file_sha256(zoom.source), precision=config.precision),
                             zoom.signature.zoom_mm)
    elif zoom is not None:
        second = ZoomDecoder(zoom_model().parts.prompt_encoder, zoom_model().decoder, None, zoom.signature.zoom_mm)
    if graph:
        decode = GraphDecoder(engine, backbone, lambda: (model().parts.prompt_encoder, model().decoder), sha,
                              file_sha256(trained.source) if trained else "vanilla", precision=config.precision)
        return PredictModel(encoder=encoder, prompt_encoder=None, mask_decoder=eager_for_refiner(trained, model),
                            input_size=backbone.input_size,
                            preprocess=preprocess, decode=decode, backbone=backbone.name, weights_sha256=sha,
                            embedding_dtype=dtype, zoom=second)
    return PredictModel(encoder=encoder, prompt_encoder=model().parts.prompt_encoder, mask_decoder=model().decoder,
                        input_size=backbone.input_size, preprocess=preprocess, backbone=backbone.name,
                        weights_sha256=sha, embedding_dtype=dtype, zoom=second)
