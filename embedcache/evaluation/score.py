"""Scoring on the cache: vanilla against fine-tuned decoder, under each prompt protocol, in 3-D.

Read top to bottom: choose the cases (held-out test cases when there are any), then for every
case, gland, protocol and model run the protocol (:mod:`embedcache.evaluation.protocols`) on the cached
embeddings, and compare the 3-D prediction with the label volume on its own voxels: FLARE22's
Dice and NSD, and the mean 2-D Dice of the slices holding the gland. The report
(:mod:`embedcache.evaluation.report`) says which cases, which prompts and which checkpoint made each number.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from embedcache.io import labels as flare
from embedcache.evaluation import protocols
from embedcache.model.backbones import get_backbone, load_backbone, require_weights
from embedcache.cache.store import Cache, CaseRecord, open_cache
from embedcache.model.decoder import segment_boxes
from embedcache.runtime.devices import pick_device
from embedcache.errors import EmbedcacheError, UsageError
from embedcache.io.files import make_output_folder
from embedcache.evaluation.metrics import dice, gland_metrics
from embedcache.evaluation.protocols import ProtocolSettings
from embedcache.evaluation.report import Overlay, write_report
from embedcache.train.runs import LOG, RunFolder, load_trained_decoder
from embedcache.io.datasets import discover_cases
from embedcache.io.volumes import read_image, read_label, source_digest

CASE_SETS = ("test", "val", "train", "all")


def choose_cases(cache: Cache, split: dict | None, wanted: str | None) -> tuple[str, list[str], str]:
    """The case set to score, its cases, and a sentence on what it is worth.

    By default the held-out test cases (the run's split, or the cache's ``imagesTs/`` cases), else
    the validation cases, which chose the checkpoint, else every case."""
    encoded = [c.name for c in cache.cases if c.n_rows > 0]
    test = split.get("test") if split and "test" in split else [c.name for c in cache.cases if c.subset == "test"]
    sets = {"test": test, "all": encoded}
    if split:
        sets.update(train=split["train"], val=split["val"])
    if wanted is None:
        wanted = "test" if [n for n in test if n in encoded] else ("val" if split else "all")
    if wanted not in sets:
        raise UsageError(f"--cases {wanted} needs --run RUN_DIR (its split.json); or use --cases test or all")
    names = [n for n in encoded if n in sets[wanted]]
    if not names:
        raise EmbedcacheError(f"{cache.path}: no {wanted} cases to score; encode a test set (imagesTs/) or choose --cases")
    notes = {
        "test": "held out: no training or checkpoint choice saw them",
        "val": "these validation cases chose the checkpoint (best validation Dice): an optimistic estimate",
        "train": "the decoder was trained on these cases: not an estimate of accuracy on new scans",
        "all": "every case in the cache, the training cases included" if split else
               "every case in the cache; none is marked as held out (no imagesTs/ cases)",
    }
    return wanted, names, notes[wanted]


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
    """One case's cached embeddings, decodable as a :data:`protocols.Segment` for any mask decoder."""

    def __init__(self, cache: Cache, case: CaseRecord, *, device: torch.device):
        self.case, self.device = case, device
        self.row_of_z = {int(z): i for i, z in enumerate(cache.read("slice_index", case.rows))}
        self.embeddings = torch.from_numpy(cache.read("embeddings", case.rows)).to(device)
        self.cache_path = cache.path

    def rows(self, zs: np.ndarray) -> list[int]:
        """The case's rows of slices ``zs``; a slice that was not cached is an error saying how to cache it."""
        missing = [int(z) for z in zs if int(z) not in self.row_of_z]
        if missing:
            raise EmbedcacheError(
                f"{self.cache_path}: case {self.case.name} has no embedding of slice {missing[0]}, which its prompts "
                f"need; encode with --margin-slices of at least the box margin (the cache has {self.case.margin_slices})"
            )
        return [self.row_of_z[int(z)] for z in zs]

    def segmenter(self, prompt_encoder, mask_decoder, *, input_size: int, slice_size: int) -> protocols.Segment:
        shape_yx = tuple(self.case.shape_zyx[1:])

        @torch.no_grad()
        def segment(zs: np.ndarray, boxes: np.ndarray) -> np.ndarray:
            index = torch.tensor(self.rows(zs), device=self.device)
            masks = segment_boxes(prompt_encoder, mask_decoder, self.embeddings[index].float(),
                                  torch.as_tensor(boxes, dtype=torch.float32, device=self.device),
                                  input_size=input_size, slice_size=slice_size, shape_yx=shape_yx)
            return masks.cpu().numpy()

        return segment


def score(
    cache_path: Path, out_dir: Path, *, run_dir: Path | None = None, decoder_file: Path | None = None,
    cases: str | None = None, prompts: tuple[str, ...] = protocols.PROTOCOLS,
    settings: ProtocolSettings = ProtocolSettings(), checkpoint: Path | None = None, device: str = "auto",
    data: Path | None = None, progress=None, log=print,
) -> dict:
    """Score the vanilla decoder (and the fine-tuned one when given) on a case set of ``cache_path``
    under each of ``prompts``; write the report to ``out_dir`` and return it."""
    out_dir, cache_path = Path(out_dir), Path(cache_path)
    if cases is not None and cases not in CASE_SETS:
        raise UsageError(f"--cases {cases}: choose {', '.join(CASE_SETS)}")
    make_output_folder(out_dir)
    dev = pick_device(device)
    with open_cache(cache_path) as cache:
        trained = None
        if run_dir or decoder_file:
            trained = load_trained_decoder(run_dir or decoder_file, expect=cache.signature, expect_path=cache_path)
        split = RunFolder(run_dir).split() if run_dir else None
        case_set, names, note = choose_cases(cache, split, cases)
        scored = [c for c in cache.cases if c.name in names]
        sources = case_sources(scored, data)
        for case in scored:
            if sources[case.name][0] is None:
                log(f"{case.image}: not there; the pictures of case {case.name} show its masks without the CT")
        backbone = get_backbone(cache.signature["backbone"])
        parts, sha = load_backbone(backbone, checkpoint or (trained.checkpoint if trained else None))
        require_weights(sha, cache.signature["checkpoint_sha256"], path=checkpoint, made=f"the cache {cache_path}")
        parts = parts.to(dev).eval()
        decoders = {"vanilla": parts.mask_decoder}
        if trained is not None:
            tuned = copy.deepcopy(parts.mask_decoder)  # the decoder alone: no second image encoder to build
            tuned.load_state_dict(trained.state)
            decoders["finetuned"] = tuned.eval()
        size = {"input_size": backbone.input_size, "slice_size": cache.signature["preprocess"]["slice_size"]}
        results: dict = {p: {} for p in prompts}
        shown = prompts[-1] if "box3d" not in prompts else "box3d"  # the overlays show the realistic protocol
        picks: dict = {}
        task = progress.add_task("scoring", total=len(names) * len(cache.labels)) if progress else None
        for case in scored:
            image_path, label_path = sources[case.name]
            truth = read_label(label_path).array
            if tuple(truth.shape) != tuple(case.shape_zyx):
                raise EmbedcacheError(f"{label_path}: label volume changed since encoding; encode again")
            cached = CachedCase(cache, case, device=dev)
            segmenters = {m: cached.segmenter(parts.prompt_encoder, d, **size) for m, d in decoders.items()}
            for label in cache.labels:
                gt = truth == label
                for protocol in prompts:
                    predictions = {m: protocols.run(protocol, segment, truth=gt, spacing_mm=case.spacing_mm,
                                                    settings=settings, case=case.name, label=label)
                                   for m, segment in segmenters.items()}
                    results[protocol].setdefault(case.name, {})[str(label)] = {
                        m: gland_metrics(p.mask, gt, spacing_mm=case.spacing_mm, label=label) for m, p in predictions.items()
                    }
                    if protocol == shown:
                        _keep_extremes(picks, case, image_path, label, protocol, gt, predictions)
                if progress:
                    progress.advance(task)
        overlays = _overlays(picks)
    report = {
        "kind": "score", "case_set": case_set, "case_set_note": note, "case_names": names,
        "made_by": {"cache": str(cache_path), "run": str(run_dir) if run_dir else None,
                    **(trained.describe() if trained else {"decoder": "vanilla only"}),
                    "protocol settings": asdict(settings)},
        "prompts": {p: protocols.DESCRIPTIONS[p] for p in prompts}, "protocol_settings": asdict(settings),
        "models": list(decoders), "labels": {str(k): flare.name(k) for k in cache.labels},
        "nsd_tolerance_mm": {str(k): flare.tolerance_mm(k) for k in cache.labels}, "cases": results,
    }
    return write_report(out_dir, report, overlays=overlays, log_csv=Path(run_dir) / LOG if run_dir else None)


def _keep_extremes(picks: dict, case: CaseRecord, image: Path | None, label: int, protocol: str, gt: np.ndarray,
                   predictions: dict) -> None:
    """Remember the best and the worst slice of this gland so far (by the last model's 2-D Dice)."""
    key_model = list(predictions)[-1]
    for z in np.flatnonzero(gt.any(axis=(1, 2))):
        scores = {m: dice(p.mask[z], gt[z]) for m, p in predictions.items()}
        for tag, better in (("best", np.greater), ("worst", np.less)):
            held = picks.get((label, tag))
            if held is None or better(scores[key_model], held["dice"][key_model]):
                boxes = predictions[key_model].boxes
                picks[(label, tag)] = dict(case=case, image=image, label=label, z=int(z), protocol=protocol, tag=tag,
                                           dice=scores, truth=gt[z].copy(),
                                           masks={m: p.mask[z].copy() for m, p in predictions.items()},
                                           box=boxes.get(int(z)))


def _overlays(picks: dict) -> list[Overlay]:
    images: dict = {}
    shown = []
    for pick in sorted(picks.values(), key=lambda p: (p["label"], p["tag"] != "best")):
        case, image = pick.pop("case"), pick.pop("image")
        if case.name not in images:  # air where the CT is gone (deleted after encoding, say)
            images[case.name] = np.full(case.shape_zyx, -1000, np.float32) if image is None \
                else read_image(image, series_uid=case.series_uid).array
        shown.append(Overlay(case=case.name, hu=images[case.name][pick["z"]], **pick))
    return shown
