"""A person's segmentation of one CT, with no window in it: the core a viewer drives (box, clicks, undo, save).

An :class:`Annotation` holds one volume, encoded slice by slice as the walks ask for it (predict's
:class:`~embedcache.segment.predict.OnTheFly`), one decoder, and per label the 3-D box and the clicks a person gave.
Each step goes through the code ``predict --boxes`` runs (:func:`~embedcache.segment.predict.segment_request`), so
a box and clicks give here the voxels predict writes for the same box and points in a boxes file. Coordinates are
the canonical volume's: slice ``z``, row ``y``, column ``x`` (:mod:`embedcache.io.geometry`), as a viewer shows
``Volume.array``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from embedcache.config import PredictConfig
from embedcache.errors import EmbedcacheError, UsageError
from embedcache.evaluation.protocols import Box3D, Prediction
from embedcache.io.labels import LabelMap
from embedcache.io.nifti import write_nifti
from embedcache.io.volumes import Volume, read_image
from embedcache.model.clicks import Click
from embedcache.segment.predict import (
    OnTheFly,
    PredictModel,
    add_click,
    label_volume,
    load_predict_model,
    predict_label_map,
    segment_request,
)
from embedcache.segment.prompt_file import Request
from embedcache.train.checkpoint import checkpoint_file, read_signature
from embedcache.train.decoders import load_trained_decoder


@dataclass(frozen=True)
class _Step:
    """What one step changed: the label's request and prediction before it (None: the label had none)."""

    label: int
    request: Request | None
    prediction: Prediction | None


class Annotation:
    """One CT being segmented gland by gland: :meth:`box` (a 3-D box, propagated), :meth:`click` (a corrective
    click, positive on the gland or negative off it), :meth:`undo`, :meth:`labels` and :meth:`save`.

    ``labels``: the ids a box may be given for (the decoder's; a vanilla decoder: the map's adrenal glands).
    A bad step is refused with a :class:`~embedcache.errors.UsageError` and changes nothing."""

    def __init__(self, image: Volume, model: PredictModel, config: PredictConfig, *, labels: tuple[int, ...],
                 label_map: LabelMap):
        self.image, self.config, self.label_map = image, config, label_map
        self.allowed = tuple(labels)
        self.volume = OnTheFly(image.array, model.encoder, model.preprocess)
        self.segment = self.volume.segment_with(model.prompt_encoder, model.mask_decoder,
                                                input_size=model.input_size, decode=model.decode)
        self.requests: dict[int, Request] = {}
        self.predictions: dict[int, Prediction] = {}
        self._history: list[_Step] = []
        self._saved: set[Path] = set()

    @classmethod
    def open(cls, image: Path, config: PredictConfig) -> Annotation:
        """The CT at ``image`` (a NIfTI file or a DICOM series folder; ``config.series`` picks one) with the decoder
        ``config`` names (``run`` or ``decoder``; neither: vanilla) on its engine, as predict loads them."""
        decoder = checkpoint_file(Path(config.run or config.decoder)) if config.run or config.decoder else None
        trained_on = read_signature(decoder) if decoder else None
        label_map, _ = predict_label_map(config, trained_on, decoder)
        volume = read_image(Path(image), series_uid=config.series)
        trained = load_trained_decoder(decoder) if decoder else None
        labels = trained_on.labels if trained_on else label_map.adrenals()
        return cls(volume, load_predict_model(trained, config), config, labels=labels, label_map=label_map)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(z, y, x)`` of the canonical volume."""
        return tuple(self.image.array.shape)

    def box(self, label: int, z0: int, z1: int, xyxy) -> Prediction:
        """Segment gland ``label`` in the 3-D box of slices ``z0..z1`` (inclusive) and in-plane pixel edges
        ``xyxy`` = ``(x0, y0, x1, y1)``; a box given again for a label replaces its box and clicks."""
        self._check_label(label)
        box = Box3D(int(z0), int(z1), tuple(float(v) for v in xyxy))
        box.check(self.shape, f"the box of {self.label_map.name(label)}")
        request = Request(label=label, box=box.clipped(self.shape))
        prediction = segment_request(request, self.segment, self.shape, self.image.geometry.spacing_mm,
                                     self.config.protocol)
        return self._step(label, request, prediction)

    def click(self, label: int, z: int, y: int, x: int, *, positive: bool = True) -> Prediction:
        """One more click on voxel ``(z, y, x)`` for gland ``label``: positive on the gland where the mask missed it,
        negative where the mask holds what is not the gland; its slice is decoded again with all its clicks and the
        change walks up and down as the clicks protocol walks."""
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
        prediction = self.predictions[label].copy()
        add_click(prediction, request, click, self.segment, self.image.geometry.spacing_mm, self.config.protocol)
        return self._step(label, replace(request, clicks=(*request.clicks, click)), prediction)

    def undo(self) -> int | None:
        """Take back the last box or click; returns the label it changed (None: nothing to undo)."""
        if not self._history:
            return None
        step = self._history.pop()
        for held, before in ((self.requests, step.request), (self.predictions, step.prediction)):
            if before is None:
                held.pop(step.label, None)
            else:
                held[step.label] = before
        return step.label

    def labels(self) -> np.ndarray:
        """The ``(z, y, x)`` uint8 label volume of every gland segmented so far (a later label over an earlier one
        where they overlap, as predict writes them)."""
        return label_volume(self.shape, self.predictions.items())

    def save(self, path: Path) -> Path:
        """Write the label volume as NIfTI on the input's own grid and affine; never over a file this annotation
        did not write."""
        path = Path(path)
        if path.exists() and path not in self._saved:
            raise EmbedcacheError(f"{path}: exists and this annotation did not write it; choose another name")
        if not self.predictions:
            raise UsageError("nothing to save yet: draw a box first")
        write_nifti(self.labels(), self.image.geometry, path)
        self._saved.add(path)
        return path

    def close(self) -> None:
        """Stop encoding ahead."""
        self.volume.close()

    def _check_label(self, label: int) -> None:
        if label not in self.allowed:
            raise UsageError(f"label {label}: the decoder segments {', '.join(map(str, self.allowed))} "
                             f"({', '.join(self.label_map.name(l) for l in self.allowed)}); choose one of them")

    def _step(self, label: int, request: Request, prediction: Prediction) -> Prediction:
        self._history.append(_Step(label, self.requests.get(label), self.predictions.get(label)))
        self.requests[label], self.predictions[label] = request, prediction
        return prediction
