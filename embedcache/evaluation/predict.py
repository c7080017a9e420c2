"""Segment new CT from what a person gives: a 3-D box per gland, a box on one slice, or a label
volume to draw them from. The image encoder runs on the fly; the output is a label NIfTI on the
input's own grid.

Boxes come from a JSON file that maps each input (by its file or folder name, or its case name
without ``_0000`` and suffix) to a list of prompts::

    {"CASE": [{"label": 7, "box3d": [i0, j0, k0, i1, j1, k1]},
              {"label": 8, "box3d": [x0, y0, z0, x1, y1, z1], "space": "world"},
              {"label": 7, "slice": 41, "box": [i0, j0, i1, j1]}]}

Coordinates are the input file's own voxel indices ``(i, j, k)`` as 3D Slicer and ITK-SNAP show
them, and a box's two corners are its first and last voxel, both inside the box. ``"space":
"world"`` takes RAS+ millimetres instead (3D Slicer's), ``"space": "lps"`` LPS millimetres
(DICOM's and ITK's); a corner then stands for the voxel whose centre is nearest. A ``box3d`` is
segmented by the ``box3d`` protocol (middle slice, then propagation slice by slice; see
:mod:`embedcache.evaluation.protocols`); a ``box`` on ``slice`` k segments that slice only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from embedcache.evaluation import protocols
from embedcache.config import PreprocessConfig
from embedcache.errors import EmbedcacheError, UsageError
from embedcache.io.files import make_output_folder, read_json
from embedcache.io.labels import ADRENALS
from embedcache.evaluation.protocols import Box3D, Prediction, ProtocolSettings
from embedcache.io.datasets import case_name
from embedcache.io.geometry import Geometry
from embedcache.io.nifti import write_nifti
from embedcache.io.volumes import check_same_grid, read_geometry, read_image, read_label

SPACES = ("voxel", "world", "lps")


@dataclass(frozen=True)
class Request:
    """One gland to segment: a 3-D box (propagated) or, with ``single_slice``, a box on one slice."""

    label: int
    box: Box3D  # canonical slices and pixel edges
    single_slice: bool = False


@dataclass(frozen=True)
class Job:
    """One input, checked: where it is, what to segment, where the result goes."""

    image: Path
    out: Path
    geometry: Geometry
    requests: tuple[Request, ...] = ()
    label_file: Path | None = None  # --from-labels: the requests come from this volume's glands


def _number_list(value, n: int, what: str) -> list[float]:
    if not isinstance(value, list) or len(value) != n:
        raise TypeError(f"{what} needs {n} numbers")
    numbers = [float(v) for v in value]  # a string or None raises here
    if not np.isfinite(numbers).all():
        raise ValueError(f"{what} has a NaN or infinite value")
    return numbers


def read_boxes_file(boxes_file: Path) -> dict:
    """The JSON boxes table: an object mapping case names to lists of prompts."""
    table = read_json(boxes_file, fix="see the boxes schema in the README")
    if not isinstance(table, dict) or not all(isinstance(v, list) for v in table.values()):
        raise EmbedcacheError(f"{boxes_file}: expected an object {{\"CASE\": [prompts, ...]}}; see the boxes schema in the README")
    return table


def requests_from_json(table: dict, boxes_file: Path, image: Path, geometry: Geometry, labels) -> tuple[Request, ...]:
    """The prompts of ``image`` in ``table``, in canonical coordinates, checked against the volume and ``labels``."""
    key = image.name if image.name in table else case_name(image)
    if key not in table:
        raise EmbedcacheError(f"{boxes_file}: no boxes for {image.name} (key '{case_name(image)}'); add them")
    requests = []
    for n, entry in enumerate(table[key]):
        where = f"{boxes_file} [{key}][{n}]"
        try:
            if not isinstance(entry, dict):
                raise TypeError("a prompt is an object")
            label = entry["label"]
            if isinstance(label, bool) or not isinstance(label, int):
                raise TypeError("label must be an integer")
            space = entry.get("space", "voxel")
            if space not in SPACES:
                raise ValueError(f"space must be one of {', '.join(SPACES)}")
            if "box3d" in entry:
                corners = np.array(_number_list(entry["box3d"], 6, "box3d")).reshape(2, 3)
                single = False
            else:
                i0, j0, i1, j1 = _number_list(entry["box"], 4, "box")
                k = float(entry["slice"])
                corners = np.array([[i0, j0, k], [i1, j1, k]])
                single = True
        except (KeyError, TypeError, ValueError) as exc:
            raise EmbedcacheError(
                f"{where}: {exc if not isinstance(exc, KeyError) else f'missing {exc}'}; a prompt is "
                '{"label": 7, "box3d": [i0, j0, k0, i1, j1, k1]} or {"label": 7, "slice": k, "box": [i0, j0, i1, j1]}'
            ) from None
        if labels is not None and label not in labels:
            raise UsageError(f"{where}: label {label} is not one the decoder was trained for ({', '.join(map(str, labels))})")
        if not 0 < label < 256:
            raise UsageError(f"{where}: label {label} must lie in 1..255")
        try:
            box = _canonical_box(corners, geometry, space)
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None
        if single and box.z0 != box.z1:
            raise UsageError(f"{where}: slice {entry['slice']} of this file is not an axial slice; give a box3d instead")
        box.check(geometry.shape_zyx, where)
        requests.append(Request(label=label, box=box.clipped(geometry.shape_zyx), single_slice=single))
    return tuple(requests)


def _canonical_box(corners: np.ndarray, geometry: Geometry, space: str) -> Box3D:
    """Two inclusive corner voxels (or points) → canonical slices and in-plane pixel edges."""
    if np.any(corners[1] < corners[0]):
        raise UsageError(f"box is inverted: {corners[1].tolist()} lies before {corners[0].tolist()} on some axis; "
                         "give the first corner, then the last")
    xyz = geometry.canonical_index(corners, space=space)
    if space == "voxel" and np.any(np.abs(xyz - np.rint(xyz)) > 1e-3):
        raise UsageError(f"voxel corners {corners.tolist()} must be whole voxel indices")
    low, high = np.rint(xyz.min(axis=0)).astype(int), np.rint(xyz.max(axis=0)).astype(int)
    return Box3D(int(low[2]), int(high[2]), (float(low[0]), float(low[1]), float(high[0] + 1), float(high[1] + 1)))


def plan(inputs: list[Path], out_dir: Path, *, boxes_file: Path | None, from_labels: Path | None, labels,
         series: str | None, log=print) -> tuple[list[Job], list[str]]:
    """Check every input before any model is loaded; returns the jobs to run and the errors of the rest."""
    if (boxes_file is None) == (from_labels is None):
        raise UsageError("give either --boxes BOXES.json or --from-labels LABELS")
    names = [case_name(Path(i)) for i in inputs]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        same = [str(i) for i, n in zip(inputs, names) if n == clash[0]]
        raise UsageError(f"{' and '.join(same)} would both be written to {Path(out_dir) / (clash[0] + '.nii.gz')}; "
                         "rename one or predict them into different folders")
    table = read_boxes_file(boxes_file) if boxes_file is not None else None
    jobs, errors = [], []
    for image in map(Path, inputs):
        try:
            geometry = read_geometry(image, series_uid=series)
            out = Path(out_dir) / f"{case_name(image)}.nii.gz"
            if table is not None:
                jobs.append(Job(image, out, geometry, requests_from_json(table, boxes_file, image, geometry, labels)))
                continue
            label_file = Path(from_labels)
            if label_file.is_dir():
                label_file = label_file / f"{case_name(image)}.nii.gz"
            check_same_grid(geometry, read_geometry(label_file), image_path=image, label_path=label_file)
            jobs.append(Job(image, out, geometry, label_file=label_file))
        except EmbedcacheError as exc:
            errors.append(str(exc))
            log(f"error: {exc}")
    return jobs, errors


class OnTheFly:
    """A volume's slices, encoded when first asked for, decodable as a :data:`protocols.Segment`.

    Embeddings are rounded to ``embedding_dtype`` (the cache's, float16 by default) before decoding,
    as cached ones are: the same box gives the same mask here and in ``score``."""

    def __init__(self, hu_zyx: np.ndarray, encoder, preprocess: PreprocessConfig, *, on_encode=None):
        self.hu, self.encoder, self.preprocess = hu_zyx, encoder, preprocess
        self.embeddings: dict[int, object] = {}
        self.on_encode = on_encode  # called after each slice is encoded (a progress bar's advance)

    def embedding(self, z: int):
        from embedcache.cache.preprocess import slice_to_model

        if z not in self.embeddings:
            pre = self.preprocess
            image = slice_to_model(self.hu[z], width_hu=pre.window_width_hu, level_hu=pre.window_level_hu,
                                   slice_size=pre.slice_size)
            self.embeddings[z] = self.encoder(image[None])[0]
            if self.on_encode:
                self.on_encode()
        return self.embeddings[z]

    def segmenter(self, prompt_encoder, mask_decoder, *, input_size: int) -> protocols.Segment:
        import torch

        from embedcache.model.decoder import segment_boxes

        @torch.no_grad()
        def segment(zs: np.ndarray, boxes: np.ndarray) -> np.ndarray:
            embeddings = torch.stack([self.embedding(int(z)) for z in zs]).float()
            masks = segment_boxes(prompt_encoder, mask_decoder, embeddings,
                                  torch.as_tensor(boxes, dtype=torch.float32, device=embeddings.device),
                                  input_size=input_size, slice_size=self.preprocess.slice_size,
                                  shape_yx=self.hu.shape[1:])
            return masks.cpu().numpy()

        return segment


def predict(
    inputs: list[Path], out_dir: Path, *, run_dir: Path | None = None, decoder_file: Path | None = None,
    boxes_file: Path | None = None, from_labels: Path | None = None, prompts: str = "box3d",
    settings: ProtocolSettings = ProtocolSettings(), model: str = "litemedsam", checkpoint: Path | None = None,
    series: str | None = None, device: str = "auto", progress=None, log=print,
) -> tuple[list[Path], list[str]]:
    """Write ``out_dir/CASE.nii.gz`` for each input; returns the files written and the errors of those that failed."""
    if prompts not in protocols.PROTOCOLS:
        raise UsageError(f"--prompts {prompts}: choose one of {', '.join(protocols.PROTOCOLS)}")
    trained = None
    if run_dir or decoder_file:
        from embedcache.train.runs import load_trained_decoder

        trained = load_trained_decoder(run_dir or decoder_file)
    labels = tuple(trained.signature["labels"]) if trained else None
    jobs, errors = plan(inputs, out_dir, boxes_file=boxes_file, from_labels=from_labels, labels=labels, series=series,
                        log=log)
    if not jobs:
        return [], errors
    make_output_folder(out_dir)
    segmenter = _segmenter(trained, model=model, checkpoint=checkpoint, device=device)
    written = []
    task = encoded = None
    if progress:
        task = progress.add_task("predicting", total=len(jobs))
        # how many slices a 3-D box's propagation asks for is known only at its end: a count, no total
        encoded = partial(progress.advance, progress.add_task("slices encoded", total=None))
    for job in jobs:
        if progress:
            progress.update(task, description=f"predicting {case_name(job.image)}")
        try:
            image = read_image(job.image, series_uid=series)
            volume = OnTheFly(image.array, segmenter["encoder"], segmenter["preprocess"], on_encode=encoded)
            segment = volume.segmenter(segmenter["prompt_encoder"], segmenter["mask_decoder"],
                                       input_size=segmenter["input_size"])
            predictions = _segment_job(job, segment, image, prompts=prompts, settings=settings,
                                       labels=labels or ADRENALS)
            result = np.zeros(image.array.shape, np.uint8)
            for label, prediction in predictions:
                result[prediction.mask] = label
            write_nifti(result, image.geometry, job.out)
            written.append(job.out)
            log(f"{job.out}: {len(predictions)} gland(s), {sum(len(p.boxes) for _, p in predictions)} slices decoded")
        except EmbedcacheError as exc:
            errors.append(str(exc))
            log(f"error: {exc}")
        if progress:
            progress.advance(task)
    return written, errors


def _segment_job(job: Job, segment, image, *, prompts: str, settings: ProtocolSettings, labels) -> list:
    shape, spacing = image.array.shape, image.geometry.spacing_mm
    if job.label_file is not None:  # the glands of a label volume, under the chosen protocol
        truth = read_label(job.label_file).array
        return [(label, protocols.run(prompts, segment, truth=truth == label, spacing_mm=spacing, settings=settings,
                                      case=case_name(job.image), label=label))
                for label in labels if (truth == label).any()]
    results = []
    for request in job.requests:
        if request.single_slice:
            prediction = Prediction(np.zeros(shape, bool))
            z = request.box.z0
            prediction.mask[z] = segment(np.array([z]), np.array([request.box.box], np.float32))[0]
            prediction.boxes[z] = request.box.box
        else:
            prediction = protocols.propagate(request.box, segment, shape, grow_px=protocols.grow_px(settings, spacing))
        results.append((request.label, prediction))
    return results


def _segmenter(trained, *, model: str, checkpoint: Path | None, device: str) -> dict:
    """Image encoder, prompt encoder and (fine-tuned) mask decoder on the device, with the preprocessing
    the decoder was trained with."""
    import torch

    from embedcache.model.backbones import get_backbone, load_backbone, require_weights
    from embedcache.runtime.devices import pick_device
    from embedcache.model.encoder import ImageEncoder

    preprocess, dtype = PreprocessConfig(), "float16"
    if trained is not None:
        model = trained.signature["backbone"]
        preprocess = PreprocessConfig(**trained.signature["preprocess"])
        dtype = trained.signature.get("embedding_dtype", "float16")
        checkpoint = checkpoint or trained.checkpoint
    backbone = get_backbone(model)
    dev = pick_device(device)
    parts, sha = load_backbone(backbone, checkpoint)
    if trained is not None:
        require_weights(sha, trained.signature["checkpoint_sha256"], path=checkpoint, made=f"the decoder {trained.source}")
        parts.mask_decoder.load_state_dict(trained.state)
    out_dtype = torch.float16 if dtype == "float16" else torch.float32
    return {
        "encoder": ImageEncoder(backbone, parts.image_encoder, device=dev, out_dtype=out_dtype),
        "prompt_encoder": parts.prompt_encoder.to(dev).eval(),
        "mask_decoder": parts.mask_decoder.to(dev).eval(),
        "input_size": backbone.input_size,
        "preprocess": preprocess,
    }
