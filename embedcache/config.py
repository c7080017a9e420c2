"""Frozen settings for each phase, saved beside every output so a result says what made it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from embedcache.errors import EmbedcacheError, UsageError
from embedcache.io.files import atomic_write_text, read_json
from embedcache.io.labels import ADRENALS, FLARE22, LabelMap, check_options


def setting(default, help: str, *, flag: str | None = None, choices=None, cli_range: tuple | None = None,
            path: bool = False, renamed_from: tuple[str, ...] = ()):
    """A field that a command-line option fills, with everything the option says written once here: its default, its
    help, its flag (``--FIELD-NAME`` unless given), its choices, the range the command line checks (``cli_range``),
    whether it names a file (``path``) and the flags it was spelled with before (``renamed_from``: still taken, with
    a note, for a release). :func:`embedcache.cli.options.option` builds the option from it, and a test holds every
    command's options to their fields."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "cli_range": cli_range,
                                            "path": path, "renamed_from": tuple(renamed_from)})


def flag(cls, name: str) -> str:
    """The command-line flag of ``cls``'s field ``name``: what a message about the field names."""
    found = next(f for f in fields(cls) if f.name == name)
    return found.metadata.get("flag") or "--" + name.replace("_", "-")


@dataclass(frozen=True)
class PreprocessConfig:
    """CT window (HU) and the square slice size (px) every slice is resampled to."""

    window_width_hu: float = setting(350.0, "CT window width (HU).", flag="--window-width")
    window_level_hu: float = setting(50.0, "CT window level (HU).", flag="--window-level")
    slice_size: int = setting(512, "Slices are resampled to this square size (px).")

    def __post_init__(self):
        if not self.window_width_hu > 0:  # also refuses NaN
            raise UsageError(f"--window-width must be a positive number of HU, got {self.window_width_hu}")
        if not -2000 <= self.window_level_hu <= 4000:
            raise UsageError(f"--window-level must be a CT value in -2000..4000 HU, got {self.window_level_hu}")
        if not 64 <= self.slice_size <= 2048:
            raise UsageError(f"--slice-size must lie in 64..2048 px, got {self.slice_size}")



@dataclass(frozen=True)
class PhantomConfig:
    """Size of each synthetic volume: ``size × size`` axial pixels of ``pixel_mm``, slices ``slice_mm`` apart."""

    size: int = setting(512, "Axial pixels per side.", cli_range=(64, 1024))
    pixel_mm: float = 0.8
    slice_mm: float = 2.5
    extent_mm: float = 90.0  # cranio-caudal length of the volume
    noise_hu: float = 12.0

#: ``phantom --anatomy --style``: how CT is painted around real label maps (:data:`embedcache.synth.anatomy.STYLES`).
PAINT_STYLES = {
    "portal": "portal-venous phase: the bed recipes are chosen on",
    "arterial": "late arterial phase, coarser texture, more noise, softer edges and thicker crura: for testing only",
    "varied": "each case its own style drawn around portal's (arterial's settings outside the ranges): for training",
}

#: Kinds of training-only copy ``encode --augment`` makes (see :mod:`embedcache.cache.augment`).
AUGMENTS = {
    "flip": "left-right mirror; each organ's right and left labels swap, their sides read from the label map",
    "rotate": "in-plane rotation by an angle drawn from -15..15 degrees",
    "scale": "in-plane zoom about the centre by a factor drawn from 0.85..1.15",
    "intensity": "HU scaled by 0.9..1.1 and shifted by -30..30 HU (window jitter)",
}


#: ``finetune --prompts``: what a training prompt carries besides (or instead of) its box (see train.data).
POINT_MODES = {
    "box": "the box alone",
    "box+points": "the box and 0..--max-points clicks (uniform), from the error of the decoder's own box-only mask",
    "mixed": "a third each: the box alone; the box and 1..--max-points clicks; 1..--max-points clicks on the gland "
             "and no box",
    "interactive": "SAM's interactive loop: --rounds decodes per prompt, the first with the box alone, each next one "
                   "with the box, one more click (the most interior pixel of the error of the round before: positive "
                   "in a miss, negative in a false positive) and the round before's logits as the mask prompt; the "
                   "last round (and one in the middle from 5 rounds) adds no click; loss on --round-loss rounds",
}

#: ``encode --dtype``: how the embeddings are stored.
EMBEDDING_DTYPES = ("float16", "float32")
#: ``--model`` choices (embedcache.model.backbones.BACKBONES holds each one's builder).
BACKBONE_NAMES = ("litemedsam", "vit_b", "vit_l", "vit_h", "medsam")

#: The most slices a graph engine encodes at once (``--streams``; a measurement's record is held to it too).
MAX_STREAMS = 256
#: ``--engine`` choices (``auto`` resolves to one of the others; see :mod:`embedcache.model.engines`).
ENGINES = ("auto", "torch", "onnxruntime", "openvino")
#: ``--encoder-precision`` choices of the image encoder: fp32 everywhere; bf16 through OpenVINO on a CPU with bf16 instructions.
PRECISIONS = ("fp32", "bf16")


def engine_setting():
    """``--engine``, as encode and predict take it (a new field each call: a field belongs to one class)."""
    return setting("auto", "What runs the image encoder: eager PyTorch, or ONNX Runtime or OpenVINO on the CPU (exported "
                           "once per model and weights; pip install 'embedcache[cpu-fast]'). auto: torch on CUDA; on a "
                           "CPU the fastest installed engine equal to torch within 1e-4, timed once per model, weights "
                           "and CPU. predict runs the mask decoder in the same engine.", choices=ENGINES)


def precision_setting():
    """``--encoder-precision`` of the image encoder, as encode and predict take it."""
    return setting("fp32", "The encoder's arithmetic. bf16 runs through --engine openvino on a CPU with bf16 "
                           "instructions; it changes the embeddings (see docs/cpu-engines.md for its measured Dice cost), so a cache "
                           "keeps one precision. predict runs its decoder graph in bf16 too.", choices=PRECISIONS,
                   flag="--encoder-precision", renamed_from=("--precision",))


def streams_setting():
    """``--streams`` of a graph engine, as encode and predict take it."""
    return setting(0, "Slices onnxruntime or openvino encodes at once, each on its share of the cores (the CPU's batch); "
                      "0: timed once per CPU and model (one at a time on every core, or several). predict encodes that "
                      "many ahead of its walk.", cli_range=(0, MAX_STREAMS))


def check_engine_names(engine: str, precision: str, streams: int = 0) -> None:
    """Refuse an ``--engine`` or ``--encoder-precision`` that is not one of :data:`ENGINES` / :data:`PRECISIONS`, and
    ``--streams`` below 0."""
    if streams < 0:
        raise UsageError(f"--streams must be at least 1 (or 0 to measure), got {streams}")
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine}: choose from {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise UsageError(f"--encoder-precision {precision}: choose from {', '.join(PRECISIONS)}")


def check_label_ids(labels) -> tuple[int, ...]:
    """The one check of target label ids, for every command: at least one, distinct, each in 1..255 (0 is the
    background; masks and predictions are stored as 8-bit label volumes)."""
    labels = tuple(labels)
    if not labels or any(isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 256 for v in labels) \
            or len(set(labels)) != len(labels):
        raise UsageError(f"--labels must be distinct ids in 1..255, got {','.join(map(str, labels)) or 'none'}")
    return labels


@dataclass(frozen=True)
class EncodeConfig:
    """Settings of phase one. ``checkpoint=None`` means the backbone's bundled weights."""

    backbone: str = setting("litemedsam", "Backbone: " + ", ".join(BACKBONE_NAMES) + ".", flag="--model")
    checkpoint: str | None = setting(None, "Weights file; required for all but litemedsam, whose weights are bundled.",
                                     path=True, flag="--weights", renamed_from=("--checkpoint",))
    labels: tuple[int, ...] = ADRENALS
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    embedding_dtype: str = setting("float16", "Storage type of the embeddings.", flag="--dtype",
                                   choices=EMBEDDING_DTYPES)
    device: str = setting("auto", "auto, cpu or cuda[:N].")
    # torch's slices per forward; 0: pick for the device (1 on CPU, where larger are slower; on CUDA what fits)
    batch_size: int = setting(0, "Slices per forward of --engine torch; 0 picks 1 on CPU, and on CUDA the most (up to "
                                 "32) that fit in half the free memory (onnxruntime and openvino: see --streams).",
                              cli_range=(0, 1024))
    margin_slices: int = setting(2, "Also encode this many slices beyond each end of a gland (no boxes): 3-D box prompts "
                                    "need them.")
    workers: int = setting(-1, "Processes preparing slices ahead of the encoder; -1: none on CPU, half the cores up to 8 "
                               "on CUDA.")
    augment: tuple[str, ...] = setting((), "Also encode training-only copies of every train case, a comma list of: "
                                       + "; ".join(f"{kind} ({what})" for kind, what in AUGMENTS.items())
                                       + ". Each kind costs one more encode of the training cases.",
                                       choices=tuple(AUGMENTS))
    engine: str = engine_setting()  # what runs the image encoder (model.engines)
    precision: str = precision_setting()  # the encoder's arithmetic: fp32, or bf16 through openvino
    streams: int = streams_setting()  # slices a graph engine encodes at once; 0: measured (model.engines)
    label_map: LabelMap = FLARE22  # what the ids mean (io.labels): the cache records it, flips read their pairs from it
    zoom_mm: float = setting(25.0, "Also encode each gland's region: its extent over all its slices grown by this many "
                                  "mm, square, resampled to --slice-size, a case CASE@LABEL per gland beside the whole "
                                  "slices; finetune then trains a second decoder on the regions, with which score, "
                                  "predict and annotate draw each gland again, finer. 0: whole slices alone.",
                             flag="--zoom", cli_range=(0.0, 200.0))

    def __post_init__(self):
        check_engine_names(self.engine, self.precision, self.streams)
        if self.zoom_mm and not 2.0 <= self.zoom_mm <= 200.0:
            raise UsageError(f"--zoom must be 0 (whole slices) or lie in 2..200 mm, got {self.zoom_mm:g}")
        if any(kind not in AUGMENTS for kind in self.augment) or len(set(self.augment)) != len(self.augment):
            raise UsageError(f"--augment {','.join(self.augment)}: choose distinct kinds from {', '.join(AUGMENTS)}")
        if self.workers < -1:
            raise UsageError(f"--workers must be -1 (automatic), 0 or more, got {self.workers}")
        if not 0 <= self.margin_slices <= 50:
            raise UsageError(f"--margin-slices must lie in 0..50, got {self.margin_slices}")
        if self.embedding_dtype not in EMBEDDING_DTYPES:
            raise UsageError(f"{flag(EncodeConfig, 'embedding_dtype')} must be {' or '.join(EMBEDDING_DTYPES)}, got "
                             f"{self.embedding_dtype}")
        if self.batch_size < 0:
            raise UsageError(f"--batch-size must be at least 1 (or 0 for automatic), got {self.batch_size}")
        check_label_ids(self.labels)
        if "flip" in self.augment:
            self.label_map.mirrored(self.labels)  # refused here, before any work, where a target has no known side


#: Kinds of training prompt ``finetune --train-boxes`` mixes (see :mod:`embedcache.train.data`).
TRAIN_PROMPTS = {
    "tight": "the tight box of the gland on its slice",
    "jitter": "the tight box, each edge moved by up to --box-jitter of the box's size",
    "medsam": "the tight box, each edge moved outward by 0-20 px at 1024 px (MedSAM's training boxes)",
    "loose": "the gland's 3-D box in-plane extent over all its slices, grown by 0..--loose-margin-mm (box3d's middle slice)",
    "propagated": "the box of a neighbouring slice's mask of the gland grown by --stop-grow-mm (box3d's walk)",
}


def parse_prompt_mix(text: str) -> dict[str, float]:
    """``"tight:1,loose:2"`` → ``{"tight": 1/3, "loose": 2/3}``; a kind without a weight weighs 1."""
    mix: dict[str, float] = {}
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        kind, _, weight = part.partition(":")
        kind = kind.strip()
        if kind not in TRAIN_PROMPTS or kind in mix:
            raise UsageError(f"--train-boxes {text}: {kind!r} is unknown or repeated; "
                             f"mix kinds from {', '.join(TRAIN_PROMPTS)} as KIND[:WEIGHT],...")
        try:
            mix[kind] = float(weight) if weight.strip() else 1.0
        except ValueError:
            mix[kind] = float("nan")
        if not 0 < mix[kind] < 1e6:
            raise UsageError(f"--train-boxes {text}: the weight of {kind} must be a positive number")
    if not mix:
        raise UsageError(f"--train-boxes {text!r}: name at least one kind from {', '.join(TRAIN_PROMPTS)}")
    total = sum(mix.values())
    return {kind: weight / total for kind, weight in mix.items()}


#: ``finetune --round-loss``: which rounds of ``--prompts interactive`` the loss is taken on.
ROUND_LOSSES = ("every", "last")
#: ``finetune --amp``: mixed precision of the training step.
TRAIN_PRECISIONS = ("auto", "fp32", "fp16", "bf16")
#: ``finetune --resident``: where the embeddings live during training.
RESIDENCES = ("auto", "device", "stream")


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of phase two. ``checkpoint=None``: the backbone's bundled weights."""

    cache: str = ""
    epochs: int = setting(30, "Epochs to train at most.", cli_range=(1, 100_000))
    lr: float = setting(1e-4, "Peak learning rate (AdamW).")
    weight_decay: float = 0.01
    batch_size: int = setting(8, "Slices per step; each brings all its box prompts.", cli_range=(1, 4096))
    val_fraction: float = setting(0.2, "Share of cases held out.")
    seed: int = setting(0, "Seed of the split and of the training prompts.")
    device: str = setting("auto", "auto, cpu or cuda[:N].")
    box_jitter: float = setting(0.1, "Each box edge moves up to this fraction of the box size per step.")
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0
    patience: int = setting(10, "Stop after this many epochs without a better validation Dice.",
                            cli_range=(1, 100_000))
    precision: str = setting("auto", "Mixed precision on CUDA (auto: bf16 where supported, else fp16); CPU runs fp32.",
                             choices=TRAIN_PRECISIONS, flag="--amp", renamed_from=("--precision",))
    compile: bool = setting(False, "torch.compile the decoder step (whether it pays on your device: see the benchmarks).")
    resident: str = setting("auto", "Keep the cache on the device (auto: when it fits) or stream it from HDF5.",
                            choices=RESIDENCES)
    micro_batch: int = setting(0, "Prompts per forward/backward within a step (same gradients); 0: all on CUDA, 4 on "
                                  "CPU.", cli_range=(0, 4096))
    model: str | None = setting(None, "Backbone the cache must have been made with (default: the cache's).")
    checkpoint: str | None = setting(None, "The backbone weights the cache was encoded with (default: bundled).",
                                     path=True, flag="--weights", renamed_from=("--checkpoint",))
    split: str | None = setting(None, 'A split file {"train": [...], "val": [...], "test": [...]} instead of '
                                      "--val-fraction.", path=True)
    stop_prompts: bool = setting(True, "Also train on the slices just beyond each gland, prompted with the neighbour's "
                                       "box (target: empty).")
    stop_grow_mm: float = setting(3.0, "Stop and propagated prompts: the neighbour's box grows by this much, as score's "
                                       "--grow-mm grows box3d's.")
    train_prompts: str = setting("jitter:1,loose:1,propagated:1",
                                 "Training boxes, a mix KIND[:WEIGHT],... of tight, jitter (--box-jitter), medsam (edges "
                                 "out 0-20 px at 1024 px), loose (the 3-D box's in-plane extent) and propagated (a "
                                 "neighbour slice's box, grown), e.g. jitter:2,loose:1,propagated:1.",
                                 flag="--train-boxes", renamed_from=("--train-prompts",))
    loose_margin_mm: float = setting(6.0, "Loose prompts: the gland's 3-D extent grows by a margin drawn from 0..this "
                                          "(mm).")
    iou_head: bool = setting(True, "Also train the IoU head (MSE against each mask's true IoU), so score --min-iou and "
                                   "predict's low-IoU slices can trust it.")
    adapter: bool = setting(False, "Also train a small residual adapter on the cached embeddings (1x1 down, depthwise "
                                   "3x3, 1x1 up), in front of the decoder; the cache stays valid.")
    refine_head: bool = setting(False, "Also train a refinement head that redraws each mask near its box from the slice's "
                                  "own pixels at 128 x 128 (finer than the decoder's 256 x 256 over the slice): the "
                                  "cache must hold its slices' pixels, as caches encoded since it do.")
    prompts: str = setting("box", "What a training prompt carries: its box; its box and 0..--max-points corrective "
                                  "clicks (from the error of the decoder's own mask); mixed: a third each box, box + "
                                  "clicks, clicks alone; or interactive: SAM's rounds of clicks from the error of the "
                                  "round before, fed its logits (--rounds, --round-loss).", choices=tuple(POINT_MODES))
    max_points: int = setting(5, "The most clicks a training prompt carries (--prompts box+points or mixed).",
                              cli_range=(1, 32))
    rounds: int = setting(8, "--prompts interactive: decodes per prompt and step (SAM's rounds): the box, then clicks "
                             "with the previous logits as the mask prompt.", cli_range=(2, 16))
    round_loss: str = setting("every", "--prompts interactive: the loss of every round (their mean; each round's "
                                       "gradient stops at its mask prompt) or of the last alone (the rounds before "
                                       "without gradients).", choices=ROUND_LOSSES)
    start_from: str | None = setting(None, "Start from this trained decoder instead of the backbone's own: a finetune "
                                           "run folder (its decoder.safetensors) or a decoder file, trained on a cache "
                                           "of the same model, weights, preprocessing and labels (e.g. to train on a "
                                           "corrected case for a few more epochs).", path=True, flag="--from")
    # sha256 of the decoder file start_from named when the run started: finetune fills it in, never a person
    start_from_sha256: str | None = None

    def __post_init__(self):
        if self.prompts not in POINT_MODES:
            raise UsageError(f"--prompts {self.prompts}: choose {', '.join(POINT_MODES)}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or not 2 <= self.rounds <= 16:
            raise UsageError(f"--rounds must be a whole number in 2..16, got {self.rounds}")
        if self.round_loss not in ROUND_LOSSES:
            raise UsageError(f"--round-loss {self.round_loss}: choose {' or '.join(ROUND_LOSSES)}")
        if not 1 <= self.max_points <= 32:
            raise UsageError(f"--max-points must lie in 1..32, got {self.max_points}")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"--val-fraction must lie between 0 and 1, got {self.val_fraction}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError("--epochs and --batch-size must be at least 1")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.box_jitter < 1:
            raise UsageError(f"--box-jitter must lie in [0, 1), got {self.box_jitter}")
        if self.precision not in TRAIN_PRECISIONS:
            raise UsageError(f"--amp must be {', '.join(TRAIN_PRECISIONS)}, got {self.precision}")
        if self.resident not in RESIDENCES:
            raise UsageError(f"--resident must be {', '.join(RESIDENCES)}, got {self.resident}")
        if not 0 <= self.stop_grow_mm <= 100:
            raise UsageError(f"--stop-grow-mm must lie in 0..100 mm, got {self.stop_grow_mm}")
        if not 0 <= self.loose_margin_mm <= 100:
            raise UsageError(f"--loose-margin-mm must lie in 0..100 mm, got {self.loose_margin_mm}")
        parse_prompt_mix(self.train_prompts)


#: The prompt protocols of score and predict (see :mod:`embedcache.evaluation.protocols`).
PROTOCOLS = ("oracle", "jitter", "box3d", "clicks")
#: What ``score`` runs unless ``--protocols`` says otherwise (clicks costs a few decodes per click: asked for).
DEFAULT_PROTOCOLS = ("oracle", "jitter", "box3d")
#: The most corrective clicks ``--clicks`` asks for (the CVPR 2025 challenge gives five).
MAX_CLICKS = 20
#: The sets ``score --cases`` can report on.
CASE_SETS = ("test", "val", "train", "all")


#: How ``box3d`` prompts the slices of a 3-D box beyond its middle one (see :mod:`embedcache.evaluation.protocols`).
WALKS = {
    "grow": "the previous slice's mask box grown by --grow-mm, inside the 3-D box; stops where the mask vanishes",
    "fallback": "as grow, but where the mask vanishes the next slice gets the 3-D box's extent (MedSAM, LiteMedSAM)",
    "extent": "every slice of the 3-D box prompted with its own in-plane extent: no walk",
    "bounded": "as grow, with the grow scaled by the slice spacing (--grow-mm per 2.5 mm) and the box never wider "
               "than the previous slice's box grown by as much: a mask that spills out of its box cannot pull the walk",
}


#: ``--middle``: what the 3-D box's own prompt decodes to.
MIDDLES = ("single", "multimask")
#: ``--refine``: how a click changes a ``box3d`` prediction (see :mod:`embedcache.evaluation.protocols`).
REFINES = {
    "local": "its slice decoded again with the box, its clicks and that slice's previous logits (SAM's mask prompt); "
             "the change spreads to at most --reach slices each way, only while each new mask touches the one "
             "before it and stays in the 3-D box",
    "walk": "its slice decoded again with the box and its clicks, the change walked up and down until a slice's mask "
            "comes out unchanged or empty (the rule before the mask prompt)",
}
#: The most slices ``--reach`` lets a click change on each side of its own.
MAX_REACH = 64


@dataclass(frozen=True)
class ProtocolSettings:
    """How the protocols draw their boxes; saved in every report."""

    jitter: float = setting(0.1, "jitter: each box edge moves up to this fraction of the box size.")
    seed: int = setting(0, "jitter: same seed, same boxes.")
    margin_mm: float = setting(3.0, "box3d from a label: the 3-D box is this much larger in-plane...",
                               flag="--box-margin-mm")
    margin_slices: int = setting(1, "...and this many slices longer at each end.", flag="--box-margin-slices")
    grow_mm: float = setting(3.0, "box3d: each next slice's box is the previous mask's, grown by this much.")
    walk: str = setting("grow", "box3d: grow (stop where the mask vanishes), fallback (there, prompt the 3-D box again, "
                                "as MedSAM does), extent (every slice gets the 3-D box: no walk) or bounded (grow scaled "
                                "by the slice spacing, each box within the last one grown as much).", choices=tuple(WALKS))
    min_iou: float = setting(0.0, "box3d: a mask whose predicted IoU is below this counts as vanished (needs a decoder "
                                  "trained with --iou-head; 0: off).")
    middle: str = setting("single", "box3d: the 3-D box's own prompt (the middle slice; every slice under --walk extent) "
                                    "gives one mask, or SAM's three with the best predicted IoU kept.",
                          choices=MIDDLES)
    clicks: int = setting(5, f"clicks: corrective clicks per gland after the 3-D box (0..{MAX_CLICKS}).")
    refine: str = setting("local", "clicks (and predict's points): local (the click's slice decoded again with its "
                                   "previous logits as SAM's mask prompt, the change spread at most --reach slices "
                                   "each way while the gland stays connected and in the 3-D box) or walk (the change "
                                   "walked until a slice comes out unchanged).", choices=tuple(REFINES))
    # 2: chosen on the realistic bed's val cases among 1, 2, 3, 5 (benchmarks/clicks.py --reaches), 17 % fewer decodes
    # a click than 3 at no loss on its test cases
    reach: int = setting(2, f"clicks, --refine local: the most slices a click changes on each side of its own "
                            f"(0..{MAX_REACH}).", cli_range=(0, MAX_REACH))

    def __post_init__(self):
        if self.refine not in REFINES:
            raise UsageError(f"--refine {self.refine}: choose {' or '.join(REFINES)}")
        if isinstance(self.reach, bool) or not isinstance(self.reach, int) or not 0 <= self.reach <= MAX_REACH:
            raise UsageError(f"--reach must be a whole number in 0..{MAX_REACH}, got {self.reach}")
        if isinstance(self.clicks, bool) or not isinstance(self.clicks, int) or not 0 <= self.clicks <= MAX_CLICKS:
            raise UsageError(f"--clicks must be a whole number in 0..{MAX_CLICKS}, got {self.clicks}")
        if not 0 <= self.min_iou <= 1:
            raise UsageError(f"--min-iou must lie in 0..1, got {self.min_iou}")
        if self.middle not in MIDDLES:
            raise UsageError(f"--middle {self.middle}: choose {' or '.join(MIDDLES)}")
        if self.walk not in WALKS:
            raise UsageError(f"--walk {self.walk}: choose from {', '.join(WALKS)}")
        if not 0 <= self.jitter < 1:
            raise UsageError(f"--jitter must lie in [0, 1), got {self.jitter}")
        if not (0 <= self.margin_mm <= 100 and 0 <= self.grow_mm <= 100):
            raise UsageError(f"{flag(ProtocolSettings, 'margin_mm')} and {flag(ProtocolSettings, 'grow_mm')} must lie "
                             "in 0..100 mm")
        if not 0 <= self.margin_slices <= 50:
            raise UsageError(f"{flag(ProtocolSettings, 'margin_slices')} must lie in 0..50, got {self.margin_slices}")


def check_protocols(names: tuple[str, ...], *, text: str | None = None) -> tuple[str, ...]:
    """Refuse an empty or unknown ``--protocols`` (``text``: as typed)."""
    if not names or any(p not in PROTOCOLS for p in names):
        raise UsageError(f"--protocols {','.join(names) if text is None else text}: choose from {', '.join(PROTOCOLS)} "
                         "(comma-separated)")
    return names


def _one_decoder(run: str | None, decoder: str | None) -> None:
    if run and decoder:
        raise UsageError("give --run or --decoder, not both")


@dataclass(frozen=True)
class ScoreConfig:
    """Settings of ``score``: which cache, decoder, cases and prompts; saved as the report's ``config.json``.
    ``run`` and ``decoder`` (a run folder or a decoder file) are exclusive; neither scores the vanilla
    decoder alone. ``cases`` None: the test cases if any, else val with a run, else all."""

    cache: str = ""
    run: str | None = None
    decoder: str | None = None
    cases: str | None = setting(None, "Which cases to score [default: test cases if any, else val with --run, else "
                                      "all].", choices=CASE_SETS)
    prompts: tuple[str, ...] = setting(DEFAULT_PROTOCOLS, f"Prompt protocols, comma-separated: {', '.join(PROTOCOLS)} "
                                       "(clicks: box3d and --clicks corrective clicks per gland, Dice after each).",
                                       choices=PROTOCOLS, flag="--protocols", renamed_from=("--prompts",))
    protocol: ProtocolSettings = field(default_factory=ProtocolSettings)
    checkpoint: str | None = setting(None, "The backbone weights the cache was encoded with (default: the run's, or "
                                           "bundled).", path=True, flag="--weights", renamed_from=("--checkpoint",))
    data: str | None = setting(None, "The dataset folder, if it moved since encoding: each case's label volume and "
                                     "image are taken from there by name, checked against the cache's sha256 of what "
                                     "was encoded.", path=True)
    device: str = setting("auto", "auto, cpu or cuda[:N].")
    zoom: str = setting("auto", "The decoder of the glands' regions, scored averaged with --run's as the model "
                                "fine-tuned + zoom (under clicks, each click decoded by both): auto (the one finetune "
                                "trained beside --run on a cache encoded with --zoom, if any), off, or a run folder or "
                                "its .safetensors.")
    zoom_cache: str | None = setting(None, "The same cases encoded with encode --zoom [default: the scored cache if it "
                                           "holds their regions, else the cache the zoom decoder was fine-tuned on].",
                                     path=True)

    def __post_init__(self):
        _one_decoder(self.run, self.decoder)
        if self.zoom_cache and self.zoom == "off":
            raise UsageError("--zoom-cache holds the regions a --zoom decoder draws in: drop --zoom off")
        if self.cases is not None and self.cases not in CASE_SETS:
            raise UsageError(f"--cases {self.cases}: choose {', '.join(CASE_SETS)}")
        check_protocols(self.prompts)


#: ``predict --output-type``: what it writes per input, and the suffix of each file (``CASE`` + suffix).
OUTPUT_TYPES = {"nifti": ".nii.gz", "dicom-seg": ".seg.dcm", "rtstruct": ".rtstruct.dcm"}


@dataclass(frozen=True)
class PredictConfig:
    """Settings of ``predict``: the decoder (``run`` or ``decoder``; neither: the vanilla one of
    ``model``), where the prompts come from (``boxes``, a JSON file, or ``from_labels``, a label
    volume or folder, under protocol ``prompts``; neither: a person gives them, :mod:`embedcache.segment.annotate`),
    and the image reader's ``series``; saved in ``OUT/predict.json`` (its ``config``, beside the names of the files
    predict wrote there)."""

    run: str | None = None
    decoder: str | None = None
    boxes: str | None = None
    from_labels: str | None = None
    prompts: str = setting("box3d", "With --from-labels: how the glands become prompts (see score; clicks: the label "
                                    "places them).", choices=PROTOCOLS, flag="--protocol", renamed_from=("--prompts",))
    protocol: ProtocolSettings = field(default_factory=ProtocolSettings)
    series: str | None = setting(None, "SeriesInstanceUID to read from DICOM folders holding several series.")
    model: str = setting("litemedsam", "Backbone when no run or decoder is given: " + ", ".join(BACKBONE_NAMES) + ".")
    checkpoint: str | None = setting(None, "Backbone weights (default: bundled).", path=True, flag="--weights",
                                     renamed_from=("--checkpoint",))
    device: str = setting("auto", "auto, cpu or cuda[:N].")
    review_iou: float = setting(0.5, "OUT/CASE.review.json lists the slices whose predicted IoU is below this: where "
                                     "to look.")
    output_types: tuple[str, ...] = setting(("nifti",), "What to write per input, comma-separated: nifti (CASE.nii.gz), "
                                            "dicom-seg (CASE.seg.dcm, a DICOM Segmentation) and rtstruct "
                                            "(CASE.rtstruct.dcm, an RT Structure Set); DICOM ones need a DICOM input.",
                                            choices=tuple(OUTPUT_TYPES), flag="--output-type")
    engine: str = engine_setting()  # what runs the image encoder (model.engines)
    precision: str = precision_setting()  # the encoder's arithmetic: fp32, or bf16 through openvino
    streams: int = streams_setting()  # slices a graph engine encodes at once; 0: measured (model.engines)
    label_map: str | None = None  # a label map file (io.labels); None: the decoder's, a dataset.json, the preset
    label_preset: str | None = None  # a built-in map (io.labels.PRESETS)
    zoom: str = setting("auto", "The decoder of the glands' regions: each gland is drawn again in the region of its "
                                "box, that decoder's logits averaged with --run's, and its clicks are decoded by both "
                                "(finer glands; 2.6 times the slices encoded on the realistic bed): auto (the one "
                                "finetune trained beside --run on a cache encoded with --zoom, if any), off, or a run "
                                "folder or its .safetensors.")

    def __post_init__(self):
        check_engine_names(self.engine, self.precision, self.streams)
        _one_decoder(self.run, self.decoder)
        check_options(self.label_map, self.label_preset)

        if not self.output_types or any(t not in OUTPUT_TYPES for t in self.output_types) \
                or len(set(self.output_types)) != len(self.output_types):
            raise UsageError(f"--output-type {','.join(self.output_types)}: choose from {', '.join(OUTPUT_TYPES)}")
        if not 0 <= self.review_iou <= 1:
            raise UsageError(f"--review-iou must lie in 0..1, got {self.review_iou}")
        if self.boxes is not None and self.from_labels is not None:
            raise UsageError("give either --boxes BOXES.json or --from-labels LABELS, not both")
        if self.prompts not in PROTOCOLS:
            raise UsageError(f"{flag(PredictConfig, 'prompts')} {self.prompts}: choose one of {', '.join(PROTOCOLS)}")


def to_json(config) -> str:
    return json.dumps(asdict(config), indent=2, sort_keys=True)


def save_config(config, path: Path) -> None:
    atomic_write_text(Path(path), to_json(config) + "\n")


def load_config(cls, path: Path):
    """A config saved by :func:`save_config`; a file that is not one is named with what is wrong."""
    path = Path(path)
    values = read_json(path, what="settings file", fix="delete the run folder and start again")
    known = {f.name for f in fields(cls)}
    if not isinstance(values, dict) or set(values) - known:
        unknown = sorted(set(values) - known) if isinstance(values, dict) else type(values).__name__
        raise EmbedcacheError(f"{path}: unknown settings {unknown}; was it written by another embedcache version?")
    try:
        return cls(**values)
    except UsageError as exc:
        raise EmbedcacheError(f"{path}: {exc}") from None
