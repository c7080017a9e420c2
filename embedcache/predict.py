"""Segment new CT with box prompts: encode on the fly, decode, write a label NIfTI on the input's grid.

Boxes come from a JSON file or from an existing label volume. In the JSON file, each input (by
its file or folder name, or its case name without ``_0000`` and suffix) maps to a list of prompts::

    {"CASE": [{"slice": 41, "label": 7, "box": [212, 230, 241, 262]}, ...]}

``slice`` is the axial slice index and ``box`` is ``(x0, y0, x1, y1)`` in that slice's pixel
edges, both in embedcache's canonical orientation (x toward the patient's left, y toward
posterior, z toward superior; see the README), at the image's own resolution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embedcache.backbones import get_backbone, load_backbone, require_weights
from embedcache.config import EncodeConfig, PreprocessConfig
from embedcache.decoder import decode_boxes, masks_on_grid
from embedcache.devices import pick_device
from embedcache.encoder import ImageEncoder
from embedcache.errors import EmbedcacheError
from embedcache.preprocess import slice_to_model
from embedcache.prompts import box_present, boxes_for_labels
from embedcache.runs import load_trained_decoder
from embedcache.volumes import case_name, check_same_grid, read_image, read_label, write_nifti


@dataclass(frozen=True)
class BoxPrompt:
    """One box on one axial slice, asking for one label."""

    slice: int
    label: int
    box: tuple[float, float, float, float]  # canonical slice pixels, (x0, y0, x1, y1)


def prompts_from_json(boxes_file: Path, image: Path) -> list[BoxPrompt]:
    try:
        table = json.loads(Path(boxes_file).read_text())
    except (OSError, ValueError) as exc:
        raise EmbedcacheError(f"{boxes_file}: not a readable JSON file ({exc}); see the boxes schema in the README")
    entries = table.get(Path(image).name, table.get(case_name(image)))
    if entries is None:
        raise EmbedcacheError(f"{boxes_file}: no boxes for {image.name} (key '{case_name(image)}'); add them")
    try:
        return [BoxPrompt(int(e["slice"]), int(e["label"]), tuple(float(v) for v in e["box"])) for e in entries]
    except (KeyError, TypeError, ValueError):
        raise EmbedcacheError(f"{boxes_file}: entries for {case_name(image)} need slice, label and box [x0, y0, x1, y1]")


def prompts_from_labels(label_path: Path, image_geometry, image: Path, labels: tuple[int, ...]) -> list[BoxPrompt]:
    label = read_label(label_path)
    check_same_grid(image_geometry, label.geometry, image_path=image, label_path=label_path)
    prompts = []
    for z in np.flatnonzero(np.isin(label.array, labels).any(axis=(1, 2))):
        boxes = boxes_for_labels(label.array[z], labels)
        for j in np.flatnonzero(box_present(boxes)):
            prompts.append(BoxPrompt(int(z), labels[j], tuple(float(v) for v in boxes[j])))
    return prompts


def check_prompts(prompts: list[BoxPrompt], shape_zyx, source: str) -> None:
    depth, height, width = shape_zyx
    for p in prompts:
        x0, y0, x1, y1 = p.box
        if not 0 <= p.slice < depth:
            raise EmbedcacheError(f"{source}: box on slice {p.slice}, but the volume has slices 0..{depth - 1}")
        if x1 <= x0 or y1 <= y0:
            raise EmbedcacheError(f"{source}: box {list(p.box)} on slice {p.slice} has x1 <= x0 or y1 <= y0")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise EmbedcacheError(
                f"{source}: box {list(p.box)} on slice {p.slice} lies outside the {width}×{height} px slice"
            )


class Segmenter:
    """Image encoder + prompt encoder + a (fine-tuned) mask decoder, for new images."""

    def __init__(self, *, backbone: str, checkpoint: Path | None, decoder_state: dict | None, device: str,
                 preprocess: PreprocessConfig):
        self.backbone = get_backbone(backbone)
        self.device = pick_device(device)
        self.preprocess = preprocess
        parts, self.checkpoint_sha256 = load_backbone(self.backbone, checkpoint)
        if decoder_state is not None:
            parts.mask_decoder.load_state_dict(decoder_state)
        self.encoder = ImageEncoder(self.backbone, parts.image_encoder, device=self.device, out_dtype=torch.float32)
        self.prompt_encoder = parts.prompt_encoder.to(self.device).eval()
        self.mask_decoder = parts.mask_decoder.to(self.device).eval()

    @torch.no_grad()
    def segment(self, hu_zyx: np.ndarray, prompts: list[BoxPrompt]) -> np.ndarray:
        """A ``(z, y, x)`` uint8 label volume: each prompt's mask painted with its label."""
        out = np.zeros(hu_zyx.shape, np.uint8)
        pre, size = self.preprocess, self.preprocess.slice_size
        height, width = hu_zyx.shape[1:]
        scale = np.array([size / width, size / height] * 2) * self.backbone.box_scale(size)
        for z in sorted({p.slice for p in prompts}):
            mine = [p for p in prompts if p.slice == z]
            image = slice_to_model(hu_zyx[z], width_hu=pre.window_width_hu, level_hu=pre.window_level_hu, slice_size=size)
            embedding = self.encoder(image[None])
            boxes = torch.tensor(np.array([p.box for p in mine]) * scale, dtype=torch.float32, device=self.device)
            low, _ = decode_boxes(self.prompt_encoder, self.mask_decoder, embedding.expand(len(mine), -1, -1, -1), boxes)
            masks = masks_on_grid(low, input_size=self.backbone.input_size, slice_size=size,
                                  shape_yx=(height, width)).cpu().numpy()
            for p, mask in zip(mine, masks):
                out[z][mask] = p.label
        return out


def predict(
    inputs: list[Path], out_dir: Path, *, run_dir: Path | None = None, decoder_file: Path | None = None,
    boxes_file: Path | None = None, from_labels: Path | None = None, model: str = "litemedsam",
    checkpoint: Path | None = None, device: str = "auto", log=print,
) -> tuple[list[Path], list[str]]:
    """Write ``out_dir/CASE.nii.gz`` for each input; returns the files written and the errors of those that failed."""
    if (boxes_file is None) == (from_labels is None):
        raise EmbedcacheError("give either --boxes BOXES.json or --from-labels LABELS")
    trained, preprocess, labels = None, PreprocessConfig(), EncodeConfig().labels
    if run_dir or decoder_file:
        trained = load_trained_decoder(run_dir or decoder_file)
        model = trained.signature["backbone"]
        preprocess = PreprocessConfig(**trained.signature["preprocess"])
        labels = tuple(trained.signature["labels"])
        checkpoint = checkpoint or trained.checkpoint
    segmenter = Segmenter(backbone=model, checkpoint=checkpoint, decoder_state=trained.state if trained else None,
                          device=device, preprocess=preprocess)
    if trained is not None:
        require_weights(segmenter.checkpoint_sha256, trained.signature["checkpoint_sha256"], path=checkpoint,
                        made=f"the decoder {trained.source}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, errors = [], []
    for image_path in inputs:
        image_path = Path(image_path)
        try:
            image = read_image(image_path)
            if boxes_file is not None:
                prompts = prompts_from_json(boxes_file, image_path)
                source = f"{boxes_file} [{case_name(image_path)}]"
            else:
                label_path = Path(from_labels)
                if label_path.is_dir():
                    label_path = label_path / f"{case_name(image_path)}.nii.gz"
                prompts = prompts_from_labels(label_path, image.geometry, image_path, labels)
                source = str(label_path)
            check_prompts(prompts, image.array.shape, source)
            result = segmenter.segment(image.array, prompts)
            path = out_dir / f"{case_name(image_path)}.nii.gz"
            write_nifti(result, image.geometry, path)
            written.append(path)
            log(f"{path}: {len(prompts)} boxes on {len({p.slice for p in prompts})} slices")
        except EmbedcacheError as exc:
            errors.append(str(exc))
            log(f"error: {exc}")
    return written, errors
