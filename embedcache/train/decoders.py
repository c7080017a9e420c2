"""A trained decoder outside its run: loading it, putting it beside its backbone on a device (the
one loader ``score``, ``predict`` and ``export`` share, with one check of the backbone's weights),
and exporting it as a full checkpoint in the backbone's own layout.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from embedcache.cache.records import DECODER_KEYS, Signature
from embedcache.errors import EmbedcacheError
from embedcache.io.files import atomic_path, check_writable_folder, same_file
from embedcache.train.checkpoint import BEST, checkpoint_file, load_checkpoint, read_header
from embedcache.train.runs import RunFolder

if TYPE_CHECKING:
    from embedcache.model.backbones import Backbone, SamParts


@dataclass(frozen=True)
class TrainedDecoder:
    """A fine-tuned mask decoder: its weights, the cache signature it was trained on, the file it came
    from and the backbone weights the run started from (None: bundled)."""

    state: dict
    signature: Signature
    source: Path
    checkpoint: Path | None
    epoch: int = 0
    val_dice: float = float("nan")
    mask_prompt: bool = False  # trained with its previous logits as SAM's mask prompt (finetune --prompts interactive)

    def describe(self) -> dict:
        """What a report says about the decoder it scored."""
        return {"decoder": str(self.source), "epoch": self.epoch,
                "validation Dice (2-D, the validation cases)": round(float(self.val_dice), 4)}

    def check_fits(self, signature: Signature, *, path: Path, view: str | None = "whole") -> None:
        """Refuse to decode embeddings (of the cache ``path``) that another backbone or preprocessing made, or a
        ``view`` of them it was not trained on (:func:`check_decoder_fits`)."""
        check_decoder_fits(self.signature, signature, source=self.source, path=path, view=view)


def check_decoder_fits(trained_on: Signature, signature: Signature, *, source: Path, path: Path,
                       view: str | None = "whole") -> None:
    """Refuse a decoder (``source``, trained on a cache of ``trained_on``) for the embeddings of the cache
    ``path``, which another backbone or preprocessing made; and for its ``view``: ``whole`` (its whole slices, as
    ``score`` walks them) from a decoder trained on the glands' regions alone, ``regions`` (``encode --zoom``) from
    one not trained on regions of the same margin. ``view`` None: any (``finetune --from`` starts from it)."""
    difference = trained_on.difference(signature, DECODER_KEYS)
    if difference:
        raise EmbedcacheError(f"{source}: decoder was trained on a cache with {difference} as {path}; "
                              "use it with the cache (and model) it was trained on")
    if view == "whole" and not trained_on.whole_slices:
        raise EmbedcacheError(f"{source}: decoder was trained on the glands' regions alone (a run's zoom/, or a "
                              "cache of regions alone); give it as --zoom, with a decoder trained on whole slices")
    if view == "regions" and trained_on.zoom_mm != signature.zoom_mm:
        had = f"regions grown {trained_on.zoom_mm:g} mm" if trained_on.zoom_mm else "whole slices alone"
        raise EmbedcacheError(f"{source}: decoder was trained on {had}, {path} holds regions grown "
                              f"{signature.zoom_mm:g} mm; fine-tune on a cache encoded with --zoom "
                              f"{signature.zoom_mm:g}")


#: ``--zoom``'s words: the whole run's own decoder of the glands' regions when it has one, or none.
ZOOM_AUTO, ZOOM_OFF = "auto", "off"


def zoom_decoder_file(zoom: str | None, whole: Path | None) -> Path | None:
    """The decoder of the glands' regions that ``score``, ``predict`` and ``annotate`` draw with beside the whole
    slices' ``whole`` (a run folder or decoder file; None: the vanilla decoder): ``--zoom``'s run folder or file;
    ``auto``: the one a fine-tune on a cache of both views trained beside ``whole`` (``RUN_DIR/zoom``), if any;
    ``off`` (or None): none."""
    if zoom in (None, ZOOM_OFF):
        return None
    if zoom != ZOOM_AUTO:
        return checkpoint_file(Path(zoom))
    if whole is None:
        return None
    whole = Path(whole)
    found = RunFolder(whole if whole.is_dir() else whole.parent).zoom.file(BEST)
    return found if found.is_file() else None


def load_trained_decoder(run_or_file: Path, *, expect: Signature | None = None,
                         expect_path: Path | None = None, view: str | None = "whole") -> TrainedDecoder:
    """The best decoder of a run folder, or a decoder file; with ``expect``, checked against that cache signature
    for ``view`` (:func:`check_decoder_fits`)."""
    path = checkpoint_file(run_or_file)
    checkpoint = load_checkpoint(path)
    weights = checkpoint.config.get("checkpoint")
    trained = TrainedDecoder(checkpoint.decoder, checkpoint.signature, path, Path(weights) if weights else None,
                             epoch=checkpoint.epoch, val_dice=checkpoint.val_dice,
                             mask_prompt=checkpoint.config.get("prompts") == "interactive")
    if expect is not None:
        trained.check_fits(expect, path=expect_path or path, view=view)
    return trained


#: Key prefix of an adapter's weights in a decoder (:data:`embedcache.model.adapter.PREFIX`; not imported: that
#: module imports torch, and :func:`check_start_decoder` runs before torch is imported).
_ADAPTER = "adapter."
_REFINER = "refiner."  # a refinement head's (embedcache.model.refine.PREFIX)


def check_start_decoder(run_or_file: Path, *, signature: Signature, cache: Path, adapter: bool,
                        interactive: bool, refine: bool = False) -> Path:
    """The decoder file ``finetune --from`` names (a run folder's best decoder, or a decoder file), refused in one
    line unless it is one trained on a cache of ``signature`` (the cache ``cache``'s) and the run would build the
    same decoder: with an adapter exactly when ``adapter``, a refinement head only when ``refine`` (a decoder without
    one starts a new head); trained with the mask prompt (``--prompts interactive``)
    only when ``interactive`` is. Its header alone is read: no tensor, no torch."""
    given = Path(run_or_file)
    path = checkpoint_file(given)
    if not given.exists():
        raise EmbedcacheError(f"{given}: no such run folder or decoder file; --from takes a finetune run folder "
                              f"(RUN_DIR, with its {BEST}) or a decoder file")
    if not path.is_file():
        raise EmbedcacheError(f"{given}: a folder without {BEST}, so not a run with a trained decoder; give --from a "
                              f"run folder that finished an epoch, or its {BEST}")
    header = read_header(path)
    difference = header.signature.difference(signature, DECODER_KEYS)
    if difference:
        raise EmbedcacheError(f"{path}: decoder was trained on a cache with {difference} as {cache}; --from needs a "
                              "decoder trained on a cache of the same model, weights, preprocessing and labels")
    trained_adapter = any(k.startswith(_ADAPTER) for k in header.decoder_keys)
    if trained_adapter != adapter:
        raise EmbedcacheError(f"{path}: decoder was trained {'with' if trained_adapter else 'without'} --adapter; "
                              f"{'give' if trained_adapter else 'drop'} --adapter to start from it")
    if any(k.startswith(_REFINER) for k in header.decoder_keys) and not refine:  # without one, a new head is added
        raise EmbedcacheError(f"{path}: decoder was trained with --refine-head; give --refine-head to start from it")
    if header.config.get("prompts") == "interactive" and not interactive:
        raise EmbedcacheError(f"{path}: decoder was trained with --prompts interactive (it takes its previous "
                              "logits as the mask prompt); give --prompts interactive to train it on, or start from "
                              "another decoder")
    return path


@dataclass
class Model:
    """A backbone's parts on a device, in eval mode, and the mask decoders to compare: ``vanilla``
    (the released weights) and, given a trained decoder, ``finetuned``."""

    backbone: Backbone
    parts: SamParts
    decoders: dict
    checkpoint_sha256: str = ""  # of the backbone weights the parts were loaded with

    @property
    def decoder(self):
        """The decoder to segment with: the fine-tuned one where there is one."""
        return self.decoders.get("finetuned", self.decoders.get("vanilla"))


def load_model(backbone: str, *, trained: TrainedDecoder | None, checkpoint: Path | None, device,
               expect_sha256: str | None = None, made: str = "", vanilla: bool = True) -> Model:
    """``backbone`` with its weights (``checkpoint``, else the run's, else bundled) on ``device``, and the
    trained decoder's state loaded into a decoder of its own. ``expect_sha256`` refuses weights other
    than those ``made`` (a cache, a decoder) was made with; ``vanilla`` keeps the released decoder too."""
    from embedcache.model.adapter import attach_adapter, has_adapter
    from embedcache.model.backbones import Weights
    from embedcache.model.refine import attach_refiner, has_refiner

    weights = Weights.of(backbone, checkpoint or (trained.checkpoint if trained else None))
    if expect_sha256 is not None:
        weights.require(expect_sha256, given=checkpoint, made=made)
    parts = weights.load().to(device).eval()
    decoders = {"vanilla": parts.mask_decoder} if vanilla or trained is None else {}
    if trained is not None:
        tuned = copy.deepcopy(parts.mask_decoder) if vanilla else parts.mask_decoder  # no second image encoder
        if has_adapter(trained.state):
            attach_adapter(tuned)
        if has_refiner(trained.state):
            attach_refiner(tuned)
        load_decoder_state(tuned, trained)
        tuned.mask_prompt = trained.mask_prompt  # the segmenter gives a slice's logits back only to a decoder trained so
        decoders["finetuned"] = tuned.eval()
    return Model(weights.backbone, parts, decoders, weights.sha256)


def load_decoder_state(decoder, trained: TrainedDecoder) -> None:
    """Load ``trained``'s weights into ``decoder``; a state dict that does not fit is one line naming the key."""
    expected = decoder.state_dict()
    missing, extra = sorted(set(expected) - set(trained.state)), sorted(set(trained.state) - set(expected))
    shapes = [k for k in expected if k in trained.state and tuple(trained.state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or shapes:
        what = (f"lacks {missing[0]}" if missing else f"has an extra tensor {extra[0]}" if extra else
                f"{shapes[0]} is {tuple(trained.state[shapes[0]].shape)}, not {tuple(expected[shapes[0]].shape)}")
        raise EmbedcacheError(f"{trained.source}: decoder does not fit model {trained.signature.backbone} ({what}); "
                              f"pass RUN_DIR/{BEST} as finetune wrote it")
    decoder.load_state_dict(trained.state)


def export_run(run_dir: Path, out: Path, *, checkpoint: Path | None = None, force: bool = False) -> Path:
    """Write a full checkpoint in the backbone's own layout: its original image encoder and prompt
    encoder with the run's best mask decoder. Meta SAM / MedSAM files load with
    ``segment_anything.sam_model_registry[...](checkpoint=out)``; LiteMedSAM files keep LiteMedSAM's
    state-dict layout (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).
    """
    import torch

    from embedcache.model.backbones import Weights, read_state_dict

    out, run_dir = Path(out), Path(run_dir)
    if run_dir.is_file():
        raise EmbedcacheError(f"{run_dir}: a file; export takes the run folder that finetune --out wrote")
    trained = load_trained_decoder(run_dir / BEST)
    given = Weights.of(trained.signature.backbone, checkpoint or trained.checkpoint)
    backbone, weights = given.backbone, given.path
    if same_file(out, weights) or any(same_file(out, p) for p in run_dir.iterdir()):
        raise EmbedcacheError(f"{out}: is {'the backbone weights' if same_file(out, weights) else 'a file of the run'}; "
                              "export never writes over its inputs: choose another --out")
    if out.exists() and not out.is_dir() and not force:
        raise EmbedcacheError(f"{out}: exists; pass --force to replace it, or choose another --out")
    given.require(trained.signature.checkpoint_sha256, given=weights, made=f"the run in {run_dir}")
    for prefix, option in ((_ADAPTER, "--adapter"), (_REFINER, "--refine-head")):
        if any(k.startswith(prefix) for k in trained.state):
            raise EmbedcacheError(f"{trained.source}: trained with {option}, which {backbone.name}'s own layout has no "
                                  "place for; use the run with embedcache score and predict")
    full = read_state_dict(weights)
    decoder_keys = {k for k in full if k.startswith("mask_decoder.")}
    if decoder_keys != {"mask_decoder." + k for k in trained.state}:
        raise EmbedcacheError(f"{trained.source}: decoder does not fit {weights}; was the run made with another model?")
    full.update({"mask_decoder." + k: v for k, v in trained.state.items()})
    if out.is_dir():
        raise EmbedcacheError(f"{out}: is a folder; --out names the checkpoint file to write, e.g. sam_finetuned.pth")
    check_writable_folder(out.parent)
    with atomic_path(out) as tmp:
        torch.save(full, tmp)
    return out
