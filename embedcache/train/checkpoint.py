"""The checkpoint schema: what ``decoder.safetensors`` and ``last.safetensors`` hold, written and read.

Checkpoints are safetensors files: tensors and a JSON header, nothing that can run code when read
(a pickle file, such as a ``torch.save`` checkpoint, is refused unread). The mask decoder's
weights are stored under segment-anything's own names (``mask_decoder.*``), so
``sam.load_state_dict(safetensors.torch.load_file(path), strict=False)`` loads them directly;
everything else (signature, config, optimizer and schedule state) sits in the header's
``embedcache`` entry, with the optimizer's tensors under ``optimizer/…``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from embedcache.cache.records import Signature
from embedcache.errors import EmbedcacheError
from embedcache.io.files import atomic_path, is_pickle

CHECKPOINT_FORMAT = "embedcache-checkpoint-1"
DECODER_PREFIX = "mask_decoder."
#: The file a run keeps its best decoder in, named in the fixes this module suggests.
BEST = "decoder.safetensors"


@dataclass
class Checkpoint:
    """What ``decoder.safetensors`` and ``last.safetensors`` hold; ``optimizer``, ``scheduler`` and ``state``
    only in the latter."""

    decoder: dict  # the mask decoder's state dict (names without the ``mask_decoder.`` prefix)
    signature: Signature  # of the cache it was trained on
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
    rest["signature"] = checkpoint.signature.to_dict()
    header = _to_header(rest, "run", tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT, "embedcache": json.dumps(header)})


def checkpoint_file(run_or_file: Path) -> Path:
    """The decoder a run folder holds (its best), or the decoder file given."""
    run_or_file = Path(run_or_file)
    return run_or_file / BEST if run_or_file.is_dir() else run_or_file


def load_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint written by :func:`save_checkpoint`; anything else is refused with one line, unread
    beyond its header (a pickle file is never unpickled)."""
    from safetensors import safe_open

    path = _readable(path)
    try:
        with safe_open(str(path), framework="pt") as tensors:
            rest = _from_header(_header(path, tensors.metadata()), tensors)
            decoder = {k[len(DECODER_PREFIX):]: tensors.get_tensor(k) for k in tensors.keys() if k.startswith(DECODER_PREFIX)}
        _check_complete(path, rest, has_decoder=bool(decoder))
        return _checked(path, decoder, rest)
    except EmbedcacheError:
        raise
    except Exception as exc:  # safetensors and json raise several types for a damaged file
        raise _corrupt(path, exc) from None


def read_signature(path: Path) -> Signature:
    """The cache signature a checkpoint was trained on, from its header alone: no tensor read, no torch
    imported, so a decoder that does not fit the cache or the labels asked for costs a second."""
    return read_header(path).signature


@dataclass(frozen=True)
class Header:
    """What a checkpoint's header says, read without its tensors: the cache signature, the FinetuneConfig (a dict)
    and the names of the decoder's tensors (without the ``mask_decoder.`` prefix)."""

    signature: Signature
    config: dict
    decoder_keys: tuple[str, ...]


def read_header(path: Path) -> Header:
    """:class:`Header` of a checkpoint: no tensor read, no torch imported (see :func:`read_signature`)."""
    from safetensors import safe_open

    path = _readable(path)
    try:
        with safe_open(str(path), framework="numpy") as tensors:
            header = _header(path, tensors.metadata())
            keys = tuple(k[len(DECODER_PREFIX):] for k in tensors.keys() if k.startswith(DECODER_PREFIX))
        entries = dict(header["dict"])
        _check_complete(path, entries, has_decoder=bool(keys))
        signature = _from_header(entries["signature"], None)
        config = _from_header(entries["config"], None)
    except EmbedcacheError:
        raise
    except Exception as exc:
        raise _corrupt(path, exc) from None
    if not isinstance(config, dict):
        raise EmbedcacheError(f"{path}: checkpoint header is not one that finetune wrote; pass RUN_DIR/{BEST}")
    return Header(Signature.from_dict(signature, source=path), config, keys)


def _readable(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise EmbedcacheError(f"{path}: no checkpoint; train first (embedcache finetune) or check the run folder")
    if is_pickle(path):
        raise EmbedcacheError(
            f"{path}: a pickle file (torch.save); embedcache reads only safetensors checkpoints, which cannot run "
            f"code when loaded: pass RUN_DIR/{BEST} from a run of this version"
        )
    return path


def _header(path: Path, meta: dict | None) -> dict:
    """The ``embedcache`` entry of a safetensors header, refused when the file is not a checkpoint of ours."""
    meta = meta or {}
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise EmbedcacheError(f"{path}: a safetensors file, but not an embedcache checkpoint; pass RUN_DIR/{BEST}")
    return json.loads(meta["embedcache"])


def _check_complete(path: Path, entries: dict, *, has_decoder: bool) -> None:
    missing = sorted({"signature", "config", "epoch", "val_dice"} - set(entries)) + ([] if has_decoder else ["decoder"])
    if missing:
        raise EmbedcacheError(f"{path}: checkpoint lacks {', '.join(missing)}; pass RUN_DIR/{BEST} as finetune wrote it")


def _corrupt(path: Path, exc: Exception) -> EmbedcacheError:
    return EmbedcacheError(f"{path}: checkpoint is corrupt or truncated ({type(exc).__name__}); delete it and train again")


def _checked(path: Path, decoder: dict, rest: dict) -> Checkpoint:
    """The header's fields, each of the type the schema gives it."""
    epoch, val_dice = rest["epoch"], rest["val_dice"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise EmbedcacheError(f"{path}: checkpoint epoch {epoch!r} is not an epoch; pass RUN_DIR/{BEST} as finetune wrote it")
    if isinstance(val_dice, bool) or not isinstance(val_dice, (int, float)) or not (math.isnan(val_dice) or 0 <= val_dice <= 1):
        raise EmbedcacheError(f"{path}: checkpoint val_dice {val_dice!r} is not a Dice; pass RUN_DIR/{BEST} as finetune "
                              "wrote it")
    if not isinstance(rest["config"], dict) or not all(isinstance(rest.get(k, {}), dict) for k in ("state", "data")):
        raise EmbedcacheError(f"{path}: checkpoint header is not one that finetune wrote; pass RUN_DIR/{BEST}")
    values = {k: v for k, v in rest.items() if k in {f.name for f in fields(Checkpoint)}}
    return Checkpoint(decoder=decoder, **{**values, "signature": Signature.from_dict(rest["signature"], source=path)})
