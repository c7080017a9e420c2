"""A fine-tune run's folder: its file names, the checkpoint schema, the epoch log, loading a trained
decoder and exporting it. Every read and write of a run folder goes through here.

    RUN_DIR/config.json    the FinetuneConfig that made the run
    RUN_DIR/split.json     train / val case names and the seed
    RUN_DIR/decoder.pt     the best decoder (by validation Dice): weights, cache signature, config, epoch
    RUN_DIR/last.pt        the state after the last finished epoch: the above plus optimizer,
                           schedule and run state, everything ``--resume`` needs
    RUN_DIR/log.csv        one row per epoch (epoch 0: the vanilla decoder)
    RUN_DIR/tensorboard/   the same scalars, when TensorBoard is installed

Checkpoints hold tensors and plain containers only and are read with ``weights_only=True``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from embedcache.backbones import file_sha256, get_backbone, read_state_dict, require_weights, resolve_checkpoint
from embedcache.cache import DECODER_KEYS, first_difference
from embedcache.config import FinetuneConfig, save_config
from embedcache.errors import EmbedcacheError
from embedcache.files import atomic_path, atomic_write_text

CONFIG, SPLIT, BEST, LAST, LOG = "config.json", "split.json", "decoder.pt", "last.pt", "log.csv"


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
    """What ``decoder.pt`` and ``last.pt`` hold; ``optimizer``, ``scheduler`` and ``state`` only in ``last.pt``."""

    decoder: dict[str, torch.Tensor]  # the mask decoder's state dict
    signature: dict  # of the cache it was trained on
    config: dict  # the FinetuneConfig, as a dict
    epoch: int
    val_dice: float
    optimizer: dict | None = None
    scheduler: dict | None = None
    state: dict = field(default_factory=dict)  # the loop's run state (train.RunState.to_dict())


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(asdict(checkpoint), tmp)


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise EmbedcacheError(f"{path}: no checkpoint; train first (embedcache finetune) or check the run folder")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EmbedcacheError(
            f"{path}: checkpoint is corrupt or truncated ({type(exc).__name__}); delete it and train again"
        ) from None
    try:
        return Checkpoint(**raw)
    except TypeError:
        raise EmbedcacheError(f"{path}: not an embedcache decoder checkpoint; pass RUN_DIR/{BEST}") from None


class RunFolder:
    """The files of one fine-tune run."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def create(self, config: FinetuneConfig, split: dict) -> None:
        """Write the run's settings and split; the folder must be new or empty."""
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(config, self.file(CONFIG))
        atomic_write_text(self.file(SPLIT), json.dumps(split, indent=2) + "\n")

    def split(self) -> dict:
        return json.loads(self.file(SPLIT).read_text())

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
    trained = TrainedDecoder(checkpoint.decoder, checkpoint.signature, path, Path(weights) if weights else None)
    if expect is not None:
        trained.check_fits(expect, path=expect_path or path)
    return trained


def export_run(run_dir: Path, out: Path, *, checkpoint: Path | None = None) -> Path:
    """Write a full checkpoint in the backbone's own layout: its original image encoder and prompt
    encoder with the run's best mask decoder. Meta SAM / MedSAM files load with
    ``segment_anything.sam_model_registry[...](checkpoint=out)``; LiteMedSAM files keep LiteMedSAM's
    state-dict layout (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).
    """
    out = Path(out)
    trained = load_trained_decoder(Path(run_dir) / BEST)
    backbone = get_backbone(trained.signature["backbone"])
    weights = resolve_checkpoint(backbone, checkpoint or trained.checkpoint)
    require_weights(file_sha256(weights), trained.signature["checkpoint_sha256"], path=weights, made=f"the run in {run_dir}")
    full = read_state_dict(weights)
    decoder_keys = {k for k in full if k.startswith("mask_decoder.")}
    if decoder_keys != {"mask_decoder." + k for k in trained.state}:
        raise EmbedcacheError(f"{trained.source}: decoder does not fit {weights}; was the run made with another model?")
    full.update({"mask_decoder." + k: v for k, v in trained.state.items()})
    if not out.parent.exists():
        raise EmbedcacheError(f"{out.parent}: folder does not exist; create it or choose another --out")
    with atomic_path(out) as tmp:
        torch.save(full, tmp)
    return out
