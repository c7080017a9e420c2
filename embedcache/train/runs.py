"""A fine-tune run's folder: its file names, the epoch log, the split it trains on, and what may
change when it resumes. Every read and write of a run folder goes through here; the checkpoint
schema is :mod:`embedcache.train.checkpoint`.

    RUN_DIR/config.json          the FinetuneConfig that made the run
    RUN_DIR/split.json           train / val / test case names and the seed
    RUN_DIR/decoder.safetensors  the best decoder (by validation Dice): weights, cache signature, config, epoch
    RUN_DIR/last.safetensors     the state after the last finished epoch (epoch 0: the vanilla decoder):
                                 the above plus optimizer, schedule and run state, all ``--resume`` needs
    RUN_DIR/log.csv              one row per epoch (epoch 0: the vanilla decoder)
    RUN_DIR/tensorboard/         the same scalars, when TensorBoard is installed
    RUN_DIR/zoom/                a cache holding the glands' regions beside whole slices (encode --zoom) trains
                                 two decoders: RUN_DIR's on the whole slices, and this run folder's on the regions
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from embedcache.config import FinetuneConfig, flag, load_config, save_config
from embedcache.errors import EmbedcacheError, UsageError
from embedcache.io.files import atomic_write_text, is_partial, read_json, same_file
from embedcache.train.cases import Split
from embedcache.train.checkpoint import BEST

logger = logging.getLogger(__name__)

CONFIG, SPLIT, LAST, LOG, ZOOM = "config.json", "split.json", "last.safetensors", "log.csv", "zoom"
RUN_FILES = (CONFIG, SPLIT, BEST, LAST, LOG, "tensorboard", ZOOM)
#: Settings that may change on ``--resume``; any other must equal the run's.
RESUMABLE = ("epochs", "device", "patience", "cache", "resident", "compile")
#: Settings finetune records itself when a run starts (what it started from): kept from the run on ``--resume``,
#: never compared (the file ``--from`` named may have changed since; the run has its own weights by then).
RECORDED = ("start_from_sha256",)


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


class RunFolder:
    """The files of one fine-tune run."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def zoom(self) -> "RunFolder":
        """The run of the glands' regions inside this one (:data:`ZOOM`)."""
        return RunFolder(self.path / ZOOM)

    def _files(self) -> list[Path]:
        """What the folder holds, unfinished ``.partial`` writes aside."""
        if not self.path.is_dir():
            return []
        return [p for p in self.path.iterdir() if not is_partial(p.name)]

    def check_start(self, *, resume: bool, keep=()) -> bool:
        """Whether this run resumes. A new run needs a new (or empty) folder; ``--resume`` of a folder
        that holds no checkpoint yet (the first one was never written) starts the run again, clearing the
        files a start of finetune wrote there, which its config.json says it did; ``keep`` (the ``--split``
        file) is never one of them."""
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
        if self.file(BEST).is_file():  # trained, but the state to resume from is gone: never train it away
            raise EmbedcacheError(f"{self.file(LAST)}: missing, but the run holds a trained {BEST}; restore "
                                  f"{LAST} to resume, or start a new run in another --out (the decoder is kept)")
        ours = [p for p in self._files() if p.name in RUN_FILES]
        if ours and not self.file(CONFIG).is_file():
            raise EmbedcacheError(f"{self.path}: holds {ours[0].name} but no {CONFIG} of a finetune start, so not a run "
                                  "folder; choose another --out (its files are kept)")
        if ours:
            self.config()  # a config.json that finetune did not write is refused, naming it, before anything goes
        given = [Path(k) for k in keep if k]
        for path in ours:
            if any(same_file(path, k) for k in given):
                raise EmbedcacheError(f"{path}: is the --split file; keep it outside the run folder --out (the run "
                                      "writes its own split.json there)")
        logger.info(f"{self.path}: no checkpoint yet ({LAST}); starting the run from the beginning")
        for path in self.path.iterdir():
            if path.is_file() and (path.name in RUN_FILES or is_partial(path.name)):
                path.unlink(missing_ok=True)  # under torchrun every rank clears the same files
        return False

    def create(self, config: FinetuneConfig, split: Split) -> None:
        """Write the run's settings and split (with the seed and split file that made it); the folder
        must be new or empty."""
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(config, self.file(CONFIG))
        saved = {**split.to_dict(), "seed": config.seed, "split_file": config.split}
        atomic_write_text(self.file(SPLIT), json.dumps(saved, indent=2) + "\n")

    def split(self) -> Split:
        """The run's own train, val and test cases, as it saved them when it started."""
        saved = read_json(self.file(SPLIT), what="split file", fix="the run folder is damaged; start a new run")
        names = lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)  # noqa: E731
        if not isinstance(saved, dict) or not all(names(saved.get(k)) for k in ("train", "val")) \
                or not names(saved.get("test", [])):
            raise EmbedcacheError(f"{self.file(SPLIT)}: not a split that finetune wrote; start a new run")
        test = tuple(saved["test"]) if "test" in saved else None  # as the --split file had it
        return Split(tuple(saved["train"]), tuple(saved["val"]), test)

    def config(self) -> FinetuneConfig:
        """The settings the run was started with."""
        return load_config(FinetuneConfig, self.file(CONFIG))

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


def resumed_config(given: FinetuneConfig, saved: FinetuneConfig, *, path: Path,
                   given_fields: frozenset[str] | None = None) -> FinetuneConfig:
    """The run's own settings, with the :data:`RESUMABLE` ones taken from ``given``; refuse a ``given``
    that asks for a different run. ``given_fields`` names the fields the user set (the options typed
    on the command line); None means all of them, as for a library call with a whole config."""
    names = {f.name for f in fields(FinetuneConfig)}
    chosen = names if given_fields is None else names & set(given_fields)
    for name in sorted(chosen - set(RESUMABLE) - set(RECORDED)):
        value, theirs = getattr(given, name), getattr(saved, name)
        if value != theirs:
            raise UsageError(f"{flag(FinetuneConfig, name)} {value} differs from the run's "
                             f"{theirs} ({path}); --resume continues that run: drop the option or start a new run")
    return replace(saved, **{k: getattr(given, k) for k in RESUMABLE if k in chosen or k == "cache"})

