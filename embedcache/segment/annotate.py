"""A person's segmentation of one CT, with no window in it: the core a viewer drives (box, clicks, an accepted slice,
undo, save, add to training).

An :class:`Annotation` holds one volume, encoded slice by slice as the walks ask for it (predict's
:class:`~embedcache.segment.predict.OnTheFly`), one decoder, and per label the 3-D box and the clicks a person gave.
Each step goes through the code ``predict --boxes`` runs (:func:`~embedcache.segment.predict.segment_request`), so
a box and clicks give here the voxels predict writes for the same box and points in a boxes file. Coordinates are
the canonical volume's: slice ``z``, row ``y``, column ``x`` (:mod:`embedcache.io.geometry`), as a viewer shows
``Volume.array``.

With a cache (``--cache CACHE.h5``, the project's HDF5 format, its signature the model's), the slices it holds of this
CT are not encoded again, and :meth:`Annotation.add_to_training` writes the corrected label volume beside the image
and appends the case to that cache as a ``train`` case, its embeddings the ones already computed here: ``finetune``
on the cache then trains on it without a second encode.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from embedcache.cache.merge import merge
from embedcache.cache.pipeline import case_record, masks_and_boxes
from embedcache.cache.plan import gland_name, gland_rows, target_slices
from embedcache.cache.records import CaseRecord, Signature
from embedcache.cache.regions import ZoomedSlices
from embedcache.cache.store import ShardWriter, open_cache
from embedcache.config import OUTPUT_TYPES, EncodeConfig, PredictConfig
from embedcache.errors import EmbedcacheError, UsageError
from embedcache.evaluation.protocols import Box3D, Prediction
from embedcache.evaluation.zoom import BothViews, check_zoom_decoder
from embedcache.io.datasets import CaseSource, case_name
from embedcache.io.dicom_out import check_labels
from embedcache.io.files import file_sha256, same_file, write_error, writer_lock
from embedcache.io.labels import LabelMap
from embedcache.io.nifti import nifti_description, write_nifti
from embedcache.io.volumes import Volume, read_image, source_digest
from embedcache.model.clicks import Click
from embedcache.segment.predict import (
    OnTheFly,
    PredictModel,
    ZoomedGlands,
    add_click,
    check_dicom_source,
    label_volume,
    load_predict_model,
    predict_label_map,
    segment_request,
    write_output,
)
from embedcache.segment.prompt_file import Request
from embedcache.train.checkpoint import checkpoint_file, read_signature
from embedcache.train.decoders import load_trained_decoder, zoom_decoder_file

logger = logging.getLogger(__name__)

#: The ``descrip`` of every label volume an annotation writes: a later annotation may replace a file with it.
MARK = "embedcache annotate"
#: Beside the image (a NIfTI file or a DICOM folder), CASE + this: the label volume "add to training" writes.
ADDED_LABELS = ".annotated.nii.gz"


@dataclass(frozen=True)
class _Step:
    """What one step changed: the label's request, prediction and accepted slices before it (None: it had none)."""

    label: int
    request: Request | None
    prediction: Prediction | None
    accepted: frozenset[int]


@dataclass(frozen=True)
class Added:
    """What :meth:`Annotation.add_to_training` did: the label volume it wrote, the cache it grew, the case's name
    and its rows (slices) there, and whether it replaced an earlier version of the case."""

    labels: Path
    cache: Path
    case: str
    rows: int
    replaced: bool
    encoded: int  # slices encoded for it that had not been encoded before


class Annotation:
    """One CT being segmented gland by gland: :meth:`box` (a 3-D box, propagated), :meth:`click` (a corrective
    click, positive on the gland or negative off it), :meth:`accept` (a slice as the person drew it), :meth:`undo`,
    :meth:`labels`, :meth:`save` and :meth:`add_to_training`.

    ``labels``: the ids the decoder segments (a vanilla decoder: the map's adrenal glands), which a cache of its
    embeddings holds; ``only``: those of them a box may be given for (None: all). A bad step is refused with a
    :class:`~embedcache.errors.UsageError` and changes nothing."""

    def __init__(self, image: Volume, model: PredictModel, config: PredictConfig, *, labels: tuple[int, ...],
                 label_map: LabelMap, only: tuple[int, ...] | None = None, source: Path | None = None,
                 made_by: str = "vanilla"):
        self.image, self.model, self.config, self.label_map = image, model, config, label_map
        self.source, self.made_by = (Path(source) if source else None), made_by
        self.targets = tuple(labels)
        self.allowed = self.targets
        if only:
            self._check_label(*only)
            self.allowed = tuple(only)
        self.volume = OnTheFly(image.array, model.encoder, model.preprocess)
        self.segment = self.volume.segment_with(model.prompt_encoder, model.mask_decoder,
                                                input_size=model.input_size, decode=model.decode)
        # --zoom: each box's region encoded when the box is drawn, its slices and clicks decoded by both views
        self.zoom = ZoomedGlands(model, image, self.segment) if model.zoom is not None else None
        self._views: dict[tuple, BothViews | None] = {}  # per (label, box): both views, kept for its clicks and undo
        self.requests: dict[int, Request] = {}
        self.predictions: dict[int, Prediction] = {}
        self.accepted: dict[int, frozenset[int]] = {}  # per label, the slices the person drew (kept over decodes)
        self.cache: Path | None = None
        self._history: list[_Step] = []
        self._saved: set[Path] = set()

    @classmethod
    def open(cls, image: Path, config: PredictConfig, *, cache: Path | None = None,
             labels: tuple[int, ...] | None = None) -> Annotation:
        """The CT at ``image`` (a NIfTI file or a DICOM series folder; ``config.series`` picks one) with the decoder
        ``config`` names (``run`` or ``decoder``; neither: vanilla) on its engine, as predict loads them; with
        ``cache``, the slices it holds of this CT are taken from it (see :meth:`use_cache`); ``labels``: the
        glands to annotate, among the decoder's (None: all)."""
        decoder = checkpoint_file(Path(config.run or config.decoder)) if config.run or config.decoder else None
        trained_on = read_signature(decoder) if decoder else None
        zoom = zoom_decoder_file(config.zoom, decoder)  # auto: the run's own, if finetune made one
        if zoom is not None:
            check_zoom_decoder(read_signature(zoom), zoom, trained_on, decoder)
        label_map, _ = predict_label_map(config, trained_on, decoder)
        volume = read_image(Path(image), series_uid=config.series)
        trained = load_trained_decoder(decoder) if decoder else None
        targets = trained_on.labels if trained_on else label_map.adrenals()
        if not targets:
            raise UsageError(f"{label_map.source} names no adrenal gland, the vanilla decoder's targets; give the "
                             "label map that names them, or --run a decoder trained on your labels")
        made_by = f"sha256 {file_sha256(decoder)[:16]}" if decoder else f"vanilla {config.model}"
        if labels:
            cls._refuse_labels(labels, targets, label_map)  # before the model loads
        model = load_predict_model(trained, config, zoom=load_trained_decoder(zoom) if zoom else None)
        for graph in (model.decode, model.zoom.decode if model.zoom else None):
            if graph is not None:
                # Clicks decode with the eager heads, not the box graph: loaded now rather than on the first click,
                # and before a viewer makes its OpenGL context: torch's first eager load imports Triton, whose LLVM
                # and Mesa's (llvmpipe, under Xvfb) end the process with a segmentation fault when Triton comes second.
                graph.heads()
        annotation = cls(volume, model, config, labels=targets, label_map=label_map, only=labels, source=Path(image),
                         made_by=made_by)
        if cache is not None:
            try:
                annotation.use_cache(Path(cache))
            except BaseException:
                annotation.close()
                raise
        return annotation

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(z, y, x)`` of the canonical volume."""
        return tuple(self.image.array.shape)

    @property
    def name(self) -> str:
        """The case's name (FLARE22's rule: ``CASE_0000.nii.gz`` → ``CASE``)."""
        return case_name(self.source) if self.source else "case"

    # -- the cache ------------------------------------------------------------------------------------------------

    def signature(self) -> Signature:
        """The signature a cache of this annotation's embeddings carries: the model's backbone, weights, input size,
        preprocessing and labels, as ``encode`` would write it."""
        model = self.model
        return Signature(backbone=model.backbone, checkpoint_sha256=model.weights_sha256, input_size=model.input_size,
                         preprocess=model.preprocess, labels=self.targets, embedding_dtype=model.embedding_dtype,
                         engine=model.encoder.engine, precision=model.encoder.precision,
                         label_map=self.label_map.only(self.targets))

    def cache_signature(self, path: Path) -> Signature:
        """The signature the cache ``path`` carries, or will, to take this annotation's case: :meth:`signature` with
        the cache's views: a cache of both (``encode --zoom``, as encode makes by default) also takes each gland's
        region; a cache not made yet is made as ``encode`` makes one."""
        margin, pixels = EncodeConfig().zoom_mm, True
        if path.exists():
            with open_cache(path) as held:
                views = held.signature
            if "whole" not in views.views:
                raise EmbedcacheError(f"{path}: holds the glands' regions alone (an encode --zoom of an earlier "
                                      "version); add the case to a cache of whole slices")
            margin, pixels = views.zoom_mm, views.pixels
        return replace(self.signature(), zoom_mm=float(margin), pixels=pixels)

    def use_cache(self, path: Path) -> int:
        """Take ``path`` as this annotation's cache: one made with another model, weights, preprocessing or labels is
        refused now, before any work; the slices it holds of this CT (the same image file) are not encoded again.
        A cache that does not exist yet is made by the first :meth:`add_to_training`. Returns the slices taken."""
        path = Path(path)
        if path.exists():
            import torch

            with open_cache(path, expect=self.cache_signature(path)) as cache:
                record = self._cached_case(cache)
                if record is not None and tuple(record.shape_zyx) == self.shape and record.n_rows:
                    embeddings = cache.read("embeddings", record.rows)
                    device = self.model.encoder.device
                    for z, embedding in zip(cache.read("slice_index", record.rows), embeddings):
                        self.volume.encoded.setdefault(int(z), torch.from_numpy(embedding).to(device))
                taken = record.n_rows if record is not None else 0
        else:
            folder = path.parent if str(path.parent) else Path(".")
            if not folder.is_dir():
                raise EmbedcacheError(f"{path}: its folder does not exist; make it, or choose another --cache")
            taken = 0
        self.cache = path
        return taken

    def _cached_case(self, cache) -> CaseRecord | None:
        """This CT's case in an open cache: the one of its name made from the same image (None: there is none)."""
        for record in cache.cases:
            if record.name == self.name and self.source is not None and same_file(Path(record.image), self.source) \
                    and record.series_uid == self.config.series:
                return record
        return None

    def encoded(self) -> set[int]:
        """The slices encoded so far (or taken from the cache)."""
        return set(self.volume.encoded)

    def encode(self, zs, *, stop=None) -> int:
        """Encode slices ``zs`` in this order, those not encoded yet, checking ``stop()`` (if given) before each: a
        viewer encodes ahead of the person this way, and stops when they act. Returns how many were encoded."""
        done = 0
        for z in zs:
            if stop is not None and stop():
                break
            if 0 <= z < self.shape[0] and z not in self.volume.encoded:
                self.volume.embedding(int(z))
                done += 1
        return done

    # -- steps ----------------------------------------------------------------------------------------------------

    def box(self, label: int, z0: int, z1: int, xyxy) -> Prediction:
        """Segment gland ``label`` in the 3-D box of slices ``z0..z1`` (inclusive) and in-plane pixel edges
        ``xyxy`` = ``(x0, y0, x1, y1)``; a box given again for a label replaces its box, clicks and accepted
        slices."""
        self._check_label(label)
        box = Box3D(int(z0), int(z1), tuple(float(v) for v in xyxy))
        box.check(self.shape, f"the box of {self.label_map.name(label)}")
        request = Request(label=label, box=box.clipped(self.shape))
        prediction = segment_request(request, self.segment, self.shape, self.image.geometry.spacing_mm,
                                     self.config.protocol, both=self._both(request))
        return self._step(label, request, prediction, frozenset())

    def click(self, label: int, z: int, y: int, x: int, *, positive: bool = True) -> Prediction:
        """One more click on voxel ``(z, y, x)`` for gland ``label``: positive on the gland where the mask missed it,
        negative where the mask holds what is not the gland; its slice is decoded again with all its clicks and the
        change walks up and down as the clicks protocol walks. Slices the person accepted keep their mask."""
        self._check_label(label)
        request = self.requests.get(label)
        if request is None:
            raise UsageError(f"{self.label_map.name(label)} has no box yet: draw its 3-D box before clicking")
        depth, height, width = self.shape
        if not (0 <= y < height and 0 <= x < width and 0 <= z < depth):
            raise UsageError(f"click ({z}, {y}, {x}) lies outside the volume of {width}×{height}×{depth} voxels")
        if not request.box.z0 <= z <= request.box.z1:
            raise UsageError(f"click on slice {z} lies outside the box of {self.label_map.name(label)} (slices "
                             f"{request.box.z0}..{request.box.z1}): click inside it, or draw the box again")
        click = Click(int(z), int(y), int(x), bool(positive))
        before = self.predictions[label]
        prediction = before.copy()
        add_click(prediction, request, click, self._both(request) or self.segment, self.image.geometry.spacing_mm,
                  self.config.protocol)
        accepted = self.accepted.get(label, frozenset())
        for kept in accepted:
            prediction.mask[kept] = before.mask[kept]
        return self._step(label, replace(request, clicks=(*request.clicks, click)), prediction, accepted)

    def accept(self, label: int, z: int, mask: np.ndarray) -> Prediction:
        """Slice ``z`` of gland ``label`` as the person drew it (``mask``, ``(y, x)`` bool): it replaces the decoded
        mask there and later clicks leave it as it is; a gland with no box yet starts from this slice."""
        self._check_label(label)
        mask = np.asarray(mask, bool)
        if mask.shape != self.shape[1:]:
            raise UsageError(f"the accepted mask is {mask.shape[1]}×{mask.shape[0]} pixels, the slices "
                             f"{self.shape[2]}×{self.shape[1]}")
        if not 0 <= z < self.shape[0]:
            raise UsageError(f"slice {z} lies outside the volume's {self.shape[0]} slices")
        held = self.predictions.get(label)
        prediction = held.copy() if held is not None else Prediction(np.zeros(self.shape, bool))
        prediction.mask[z] = mask
        prediction.iou.pop(z, None)  # drawn by a person: no predicted IoU to look at
        accepted = self.accepted.get(label, frozenset()) | {int(z)}
        return self._step(label, self.requests.get(label), prediction, accepted)

    def undo(self) -> int | None:
        """Take back the last box, click or accepted slice; returns the label it changed (None: nothing to undo)."""
        if not self._history:
            return None
        step = self._history.pop()
        for held, before in ((self.requests, step.request), (self.predictions, step.prediction),
                             (self.accepted, step.accepted or None)):
            if before is None:
                held.pop(step.label, None)
            else:
                held[step.label] = before
        return step.label

    def look_at(self, label: int) -> list[tuple[int, float]]:
        """Where a person should look for gland ``label``: its decoded slices whose predicted IoU is below
        ``--review-iou``, lowest first (the review file's ``look_at``), as ``(z, iou)``."""
        prediction = self.predictions.get(label)
        if prediction is None:
            return []
        low = [(z, iou) for z, iou in prediction.iou.items() if iou < self.config.review_iou]
        return sorted(low, key=lambda item: item[1])

    def labels(self) -> np.ndarray:
        """The ``(z, y, x)`` uint8 label volume of every gland segmented so far (a later label over an earlier one
        where they overlap, as predict writes them)."""
        return label_volume(self.shape, self.predictions.items())

    # -- files ----------------------------------------------------------------------------------------------------

    def save(self, path: Path, kind: str | None = None) -> Path:
        """Write the label volume to ``path``, as ``kind`` (an ``--output-type``: nifti, dicom-seg, rtstruct; None:
        told by the name's ending, ``.nii.gz``, ``.seg.dcm``, ``.rtstruct.dcm``) on the input's own grid, through
        predict's writers; never over a file this annotation did not write, never into the DICOM input."""
        path = Path(path)
        kind = kind or _kind_of(path)
        result = self.labels()
        if not result.any():
            raise UsageError("nothing to save yet: draw a box first")
        self._check_writable(path)
        present = self._present(result)
        if kind != "nifti":
            check_dicom_source(self.source, [kind], self.config.series)
            if _inside(path, self.source):
                raise UsageError(f"{path}: lies inside the DICOM series it segments; save it outside {self.source}")
            check_labels(present, self.label_map)
        write_output(kind, path, result, self.image, self.source, series=self.config.series, labels=present,
                     label_map=self.label_map, made_by=self.made_by)
        self._saved.add(path)
        return path

    def add_to_training(self, cache: Path | None = None, *, labels_path: Path | None = None) -> Added:
        """Write the label volume beside the image (``CASE.annotated.nii.gz``, or ``labels_path``) and append the case
        to ``cache`` (None: the one given at :meth:`open`) as a ``train`` case: its slices that hold a target label
        and the cache's margin slices beyond them, their embeddings the ones computed here (a slice not encoded yet
        is encoded now). A case of this name made from this image is replaced (with its augmented copies); one
        made from another image, or a test case, is refused. The cache is replaced whole, as encode does."""
        cache = Path(cache) if cache is not None else self.cache
        if cache is None:
            raise UsageError("no cache to add the case to: open the annotation with --cache CACHE.h5")
        if cache != self.cache:
            self.use_cache(cache)
        result = self.labels()
        if not result.any():
            raise UsageError("nothing to add yet: draw a box first")
        labels_path = Path(labels_path) if labels_path is not None else self._beside_image()
        self._check_writable(labels_path)
        with writer_lock(cache):
            signature = self.cache_signature(cache)
            records, margin = [], EncodeConfig().margin_slices
            if cache.exists():
                with open_cache(cache, expect=signature) as held:
                    records, same = list(held.cases), self._cached_case(held)
                    margin = held.cases[0].margin_slices if held.cases else margin
            else:
                same = None
            clash = next((r for r in records if r.name == self.name), None)
            if clash is not None and (same is None or clash.subset != "train"):
                why = "a test case there: it is scored, never trained on" if clash.subset == "test" and same \
                    else f"made there from {clash.image}"
                raise EmbedcacheError(f"{cache}: already holds a case {self.name}, {why}; rename the image or use "
                                      "another cache")
            zs, slices = target_slices(result, signature.labels, margin)
            encoded = sum(int(z) not in self.volume.encoded for z in zs)
            embeddings = self.volume.embeddings(zs).to(_dtype(signature.embedding_dtype)).cpu().numpy()
            masks, boxes = masks_and_boxes(slices, signature.labels, signature.slice_size)
            glands = self._regions(result, margin, signature)  # a cache of both views: each gland's region too
            write_nifti(result, self.image.geometry, labels_path, description=MARK)
            self._saved.add(labels_path)
            source = CaseSource(self.name, self.source, labels_path, series_uid=self.config.series)
            record = case_record(source, self.image.geometry, digest=source_digest(self.source, labels_path),
                                 n_rows=len(zs), margin_slices=margin)
            regions = [(case_record(replace(source, name=gland_name(self.name, label), gland=label),
                                    self.image.geometry, digest=record.digest, n_rows=len(rows["slice_index"]),
                                    margin_slices=margin, region=where), rows) for label, where, rows in glands]
            for held, rows in regions:
                rows["spacing_mm"] = np.broadcast_to(np.float32(held.spacing_mm), (held.n_rows, 3))
            kept = [r for r in records if r.name != self.name and r.name.split("~", 1)[0] != self.name
                    and (r.region or {}).get("source") != self.name]  # its old version goes, its regions with it
            if any(r.name.split("~", 1)[0] == self.name and r.name != self.name for r in records):
                logger.warning(f"{cache}: the augmented copies of {self.name} were dropped (made from its old labels); "
                               "encode again with --augment to make them anew")
            try:
                with tempfile.TemporaryDirectory(dir=cache.parent, prefix=f".{cache.name}.add-") as folder:
                    writer = ShardWriter(Path(folder), signature=signature, case=record)
                    writer.write(embeddings=embeddings, masks=masks, boxes=boxes, slice_index=zs,
                                 spacing_mm=np.broadcast_to(np.float32(record.spacing_mm), (len(zs), 3)),
                                 pixels=self.volume.pixels(zs) if signature.pixels else None)
                    shards = [(writer.finish(), [record])]
                    for where, rows in regions:
                        writer = ShardWriter(Path(folder), signature=signature, case=where)
                        writer.write(**rows)
                        shards.append((writer.finish(), [where]))
                    merge(cache, signature=signature, sources=[*([(cache, kept)] if kept else []), *shards])
            except OSError as exc:
                raise write_error(exc, cache) from None
        return Added(labels=labels_path, cache=cache, case=self.name, rows=len(zs), replaced=same is not None,
                     encoded=encoded)

    def _regions(self, result: np.ndarray, margin: int, signature: Signature) -> list:
        """For a cache of both views: each gland of ``result`` as ``encode --zoom`` caches it (its region grown the
        cache's margin, encoded here), as ``(label, region, rows)``; none for a cache of whole slices."""
        if not signature.zoom_mm:
            return []
        spacing_yx, out = self.image.geometry.spacing_mm[1:], []
        for label in signature.labels:
            gland = result == label
            if not gland.any():
                continue
            where, zs, slices = gland_rows(gland, label, spacing_yx, margin_mm=signature.zoom_mm,
                                           size=signature.slice_size, zpad=margin)
            region = OnTheFly(ZoomedSlices(self.image.array, where.region, spacing_yx), self.model.encoder,
                              self.model.preprocess)
            embeddings = region.embeddings(zs).to(_dtype(signature.embedding_dtype)).cpu().numpy()
            masks, boxes = masks_and_boxes(slices, signature.labels, signature.slice_size)
            out.append((label, where, dict(embeddings=embeddings, masks=masks, boxes=boxes, slice_index=zs,
                                           pixels=region.pixels(zs) if signature.pixels else None)))
        return out

    def close(self) -> None:
        """Stop encoding ahead."""
        self.volume.close()
        if self.zoom is not None:
            self.zoom.close()

    def _both(self, request: Request) -> BothViews | None:
        """With ``--zoom``, both views of ``request``'s gland in its box's region (the same box: the same views and
        encoded region slices, after an undo too); else None."""
        if self.zoom is None:
            return None
        key = (request.label, request.box.z0, request.box.z1, tuple(request.box.box))
        if key not in self._views:
            self._views[key] = self.zoom.views(request)
        return self._views[key]

    # -- checks ---------------------------------------------------------------------------------------------------

    def _beside_image(self) -> Path:
        if self.source is None:
            raise UsageError("this annotation has no image file to write beside: give the labels' path")
        return self.source.parent / f"{self.name}{ADDED_LABELS}"

    def _check_writable(self, path: Path) -> None:
        """Never over the input, nor over a file that neither this annotation nor an earlier one wrote."""
        if self.source is not None and same_file(path, self.source):
            raise EmbedcacheError(f"{path}: is the image being annotated; choose another name")
        if path.exists() and path not in self._saved and nifti_description(path) != MARK:
            raise EmbedcacheError(f"{path}: exists and this annotation did not write it; choose another name")

    def _present(self, result: np.ndarray) -> list[int]:
        return [label for label in self.predictions if (result == label).any()]

    def _check_label(self, *labels: int) -> None:
        self._refuse_labels(labels, self.allowed, self.label_map)

    @staticmethod
    def _refuse_labels(labels, allowed, label_map: LabelMap) -> None:
        for label in labels:
            if label not in allowed:
                raise UsageError(f"label {label}: the decoder segments {', '.join(map(str, allowed))} "
                                 f"({', '.join(label_map.name(l) for l in allowed)}); choose one of them")

    def _step(self, label: int, request: Request | None, prediction: Prediction,
              accepted: frozenset[int]) -> Prediction:
        self._history.append(_Step(label, self.requests.get(label), self.predictions.get(label),
                                   self.accepted.get(label, frozenset())))
        if request is not None:
            self.requests[label] = request
        self.predictions[label], self.accepted[label] = prediction, accepted
        return prediction


def _kind_of(path: Path) -> str:
    """The ``--output-type`` a file name asks for by its ending."""
    name = path.name.lower()
    for kind, suffix in sorted(OUTPUT_TYPES.items(), key=lambda item: -len(item[1])):
        if name.endswith(suffix):
            return kind
    if name.endswith(".nii"):
        return "nifti"
    raise UsageError(f"{path}: name it CASE.nii.gz (NIfTI), CASE.seg.dcm (DICOM SEG) or CASE.rtstruct.dcm "
                     "(RT Structure Set)")


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None or not folder.is_dir():
        return False
    real = Path(os.path.realpath(path.parent))
    base = Path(os.path.realpath(folder))
    return real == base or base in real.parents


def _dtype(name: str):
    import torch

    return torch.float16 if name == "float16" else torch.float32
