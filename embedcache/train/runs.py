"""A fine-tune run's folder: its file names, the checkpoint schema, the epoch log, loading a trained
decoder and exporting it. Every read and write of a run folder goes through here.

    RUN_DIR/config.json          the FinetuneConfig that made the run
    RUN_DIR/split.json           train / val case names and the seed
    RUN_DIR/decoder.safetensors  the best decoder (by validation Dice): weights, cache signature, config, epoch
    RUN_DIR/last.safetensors     the state after the last finished epoch (epoch 0: the vanilla decoder):
                                 the above plus optimizer, schedule and run state, all ``--resume`` needs
    RUN_DIR/log.csv              one row per epoch (epoch 0: the vanilla decoder)
    RUN_DIR/tensorboard/         the same scalars, when TensorBoard is installed

Checkpoints are safetensors files: tensors and a JSON header, nothing that can run code when read
(a pickle file, such as a ``torch.save`` checkpoint, is refused unread). The mask decoder's
weights are stored under segment-anything's own names (``mask_decoder.*``), so
``sam.load_state_dict(safetensors.torch.load_file(path), strict=False)`` loads them directly;
everything else (signature, config, optimizer and schedule state) sits in the header's
``embedcache`` entry, with the optimizer's tensors under ``optimizer/…``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from embedcache.cache.store import DECODER_KEYS, first_difference
from embedcache.config import FinetuneConfig, save_config
from embedcache.errors import EmbedcacheError
from embedcache.io.files import PARTIAL, atomic_path, atomic_write_text, check_writable_folder, is_pickle, read_json

CONFIG, SPLIT, BEST, LAST, LOG = "config.json", "split.json", "decoder.safetensors", "last.safetensors", "log.csv"
RUN_FILES = (CONFIG, SPLIT, BEST, LAST, LOG, "tensorboard")
CHECKPOINT_FORMAT = "embedcache-checkpoint-1"
DECODER_PREFIX = "mask_decoder."


@dataclass
class EpochRecord:
    """One row of ``log.csv``."""

    epoch: int
    train_loss: float
    val_loss: float
    val_dice: float
    lr: float
    seconds: float
    prompts_per_s: float
    best: bool = False


@dataclass
class Checkpoint:
    """What ``decoder.safetensors`` and ``last.safetensors`` hold; ``optimizer``, ``scheduler`` and ``state``
    only in the latter."""

    decoder: dict  # the mask decoder's state dict (names without the ``mask_decoder.`` prefix)
    signature: dict  # of the cache it was trained on
    config: dict  # the FinetuneConfig, as a dict
    epoch: int
    val_dice: float
    optimizer: dict | None = None
    scheduler: dict | None = None
    state: dict = field(default_factory=dict)  # the loop's run state (train.RunState.to_dict())
    data: dict = field(default_factory=dict)  # the cache signature and {case: digest} of each set, checked on resume


def _to_header(value, name: str, tensors: dict):
    """``value`` as JSON, its tensors moved to ``tensors`` under ``name/…``; dict keys keep their type
    (the optimizer's state is keyed by int)."""
    import torch

    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        return {"dict": [[k, _to_header(v, f"{name}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_to_header(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
    return value


def _from_header(value, tensors):
    if isinstance(value, dict) and "tensor" in value:
        return tensors.get_tensor(value["tensor"])
    if isinstance(value, dict):
        return {k: _from_header(v, tensors) for k, v in value["dict"]}
    if isinstance(value, list):
        return [_from_header(v, tensors) for v in value]
    return value


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {DECODER_PREFIX + k: v.detach().cpu().contiguous() for k, v in checkpoint.decoder.items()}
    rest = {f.name: getattr(checkpoint, f.name) for f in fields(Checkpoint) if f.name != "decoder"}
    header = _to_header(rest, "run", tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT, "embedcache": json.dumps(header)})


def load_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint written by :func:`save_checkpoint`; anything else is refused with one line, unread
    beyond its header (a pickle file is never unpickled)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EmbedcacheError(f"{path}: no checkpoint; train first (embedcache finetune) or check the run folder")
    if is_pickle(path):
        raise EmbedcacheError(
            f"{path}: a pickle file (torch.save); embedcache reads only safetensors checkpoints, which cannot run "
            f"code when loaded: pass RUN_DIR/{BEST} from a run of this version"
        )
    try:
        with safe_open(str(path), framework="pt") as tensors:
            meta = tensors.metadata() or {}
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise EmbedcacheError(f"{path}: a safetensors file, but not an embedcache checkpoint; pass RUN_DIR/{BEST}")
            rest = _from_header(json.loads(meta["embedcache"]), tensors)
            decoder = {k[len(DECODER_PREFIX):]: tensors.get_tensor(k) for k in tensors.keys() if k.startswith(DECODER_PREFIX)}
        missing = sorted({"signature", "config", "epoch", "val_dice"} - set(rest)) + ([] if decoder else ["decoder"])
        if missing:
            raise EmbedcacheError(f"{path}: checkpoint lacks {', '.join(missing)}; pass RUN_DIR/{BEST} as finetune wrote it")
        return Checkpoint(decoder=decoder, **{k: v for k, v in rest.items() if k in {f.name for f in fields(Checkpoint)}})
    except EmbedcacheError:
        raise
    except Exception as exc:  # safetensors and json raise several types for a damaged file
        raise EmbedcacheError(
            f"{path}: checkpoint is corrupt or truncated ({type(exc).__name__}); delete it and train again"
        ) from None


class RunFolder:
    """The files of one fine-tune run."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def _files(self) -> list[Path]:
        """What the folder holds, unfinished ``.partial`` writes aside."""
        if not self.path.is_dir():
            return []
        return [p for p in self.path.iterdir() if not p.name.endswith(PARTIAL)]

    def check_start(self, *, resume: bool, log=print) -> bool:
        """Whether this run resumes. A new run needs a new (or empty) folder; ``--resume`` of a folder
        that holds no checkpoint yet (the first one was never written) starts the run again."""
        if self.path.exists() and not self.path.is_dir():
            raise EmbedcacheError(f"{self.path}: is a file; --out names the run folder to create")
        if not resume:
            if self._files():
                raise EmbedcacheError(f"{self.path}: run folder exists; pass --resume to continue it or choose a new --out")
            return False
        if self.file(LAST).is_file():
            return True
        if not self.path.is_dir():
            raise EmbedcacheError(f"{self.path}: no such run folder to resume; check the path or start without --resume")
        strangers = sorted(p.name for p in self._files() if p.name not in RUN_FILES)
        if strangers:
            raise EmbedcacheError(f"{self.path}: not a run folder (it holds {strangers[0]}); choose another --out")
        log(f"{self.path}: no checkpoint yet ({LAST}); starting the run from the beginning")
        for path in self.path.iterdir():
            if path.is_file() and (path.name in RUN_FILES or path.name.endswith(PARTIAL)):
                path.unlink(missing_ok=True)  # under torchrun every rank clears the same files
        return False

    def create(self, config: FinetuneConfig, split: dict) -> None:
        """Write the run's settings and split; the folder must be new or empty."""
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(config, self.file(CONFIG))
        atomic_write_text(self.file(SPLIT), json.dumps(split, indent=2) + "\n")

    def split(self) -> dict[str, list[str]]:
        """The run's own train, val and test cases, as it saved them when it started."""
        saved = read_json(self.file(SPLIT), what="split file", fix="the run folder is damaged; start a new run")
        if not isinstance(saved, dict) or not all(isinstance(saved.get(k), list) for k in ("train", "val")) \
                or not isinstance(saved.get("test", []), list):
            raise EmbedcacheError(f"{self.file(SPLIT)}: not a split that finetune wrote; start a new run")
        return {k: saved[k] for k in ("train", "val", "test") if k in saved}  # test: as the --split file had it

    def append_log(self, record: EpochRecord, board=None) -> None:
        """Add ``record`` to ``log.csv`` and, given a TensorBoard writer, to its scalars."""
        path = self.file(LOG)
        new = not path.exists()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(asdict(record)))
            if new:
                writer.writeheader()
            writer.writerow(asdict(record))
        if board is not None:
            for key in ("train_loss", "val_loss", "val_dice", "lr", "prompts_per_s"):
                board.add_scalar(key, getattr(record, key), record.epoch)
            board.flush()

    def tensorboard(self):
        """A TensorBoard writer in ``RUN_DIR/tensorboard`` when tensorboard is installed, else None."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(log_dir=str(self.file("tensorboard")))


@dataclass(frozen=True)
class TrainedDecoder:
    """A fine-tuned mask decoder: its weights, the cache signature it was trained on, the file it came
    from and the backbone weights the run started from (None: bundled)."""

    state: dict
    signature: dict
    source: Path
    checkpoint: Path | None
    epoch: int = 0
    val_dice: float = float("nan")

    def describe(self) -> dict:
        """What a report says about the decoder it scored."""
        return {"decoder": str(self.source), "epoch": self.epoch,
                "validation Dice (2-D, the validation cases)": round(float(self.val_dice), 4)}

    def check_fits(self, signature: dict, *, path: Path) -> None:
        """Refuse to decode embeddings (of the cache ``path``) that another backbone or preprocessing made."""
        difference = first_difference(self.signature, signature, DECODER_KEYS)
        if difference:
            raise EmbedcacheError(
                f"{self.source}: decoder was trained on a cache with {difference} as {path}; "
                "use it with the cache (and model) it was trained on"
            )


def load_trained_decoder(run_or_file: Path, *, expect: dict | None = None, expect_path: Path | None = None) -> TrainedDecoder:
    """The best decoder of a run folder, or a decoder file; with ``expect``, checked against that cache signature."""
    run_or_file = Path(run_or_file)
    path = run_or_file / BEST if run_or_file.is_dir() else run_or_file
    checkpoint = load_checkpoint(path)
    weights = checkpoint.config.get("checkpoint")
    trained = TrainedDecoder(checkpoint.decoder, checkpoint.signature, path, Path(weights) if weights else None,
                             epoch=checkpoint.epoch, val_dice=checkpoint.val_dice)
    if expect is not None:
        trained.check_fits(expect, path=expect_path or path)
    return trained


def export_run(run_dir: Path, out: Path, *, checkpoint: Path | None = None) -> Path:
    """Write a full checkpoint in the backbone's own layout: its original image encoder and prompt
    encoder with the run's best mask decoder. Meta SAM / MedSAM files load with
    ``segment_anything.sam_model_registry[...](checkpoint=out)``; LiteMedSAM files keep LiteMedSAM's
    state-dict layout (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).
    """
    import torch

    from embedcache.model.backbones import file_sha256, get_backbone, read_state_dict, require_weights, resolve_checkpoint

    out, run_dir = Path(out), Path(run_dir)
    if run_dir.is_file():
        raise EmbedcacheError(f"{run_dir}: a file; export takes the run folder that finetune --out wrote")
    trained = load_trained_decoder(run_dir / BEST)
    backbone = get_backbone(trained.signature["backbone"])
    weights = resolve_checkpoint(backbone, checkpoint or trained.checkpoint)
    require_weights(file_sha256(weights), trained.signature["checkpoint_sha256"], path=weights, made=f"the run in {run_dir}")
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
