"""The cache's records: its :class:`Signature` (what made the embeddings) and a :class:`CaseRecord`
per source case. Both are frozen, written as JSON by :meth:`to_dict` and read back, checked, by
:meth:`from_dict`, so a damaged or crafted file is one line naming it, never a ``KeyError`` later.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from embedcache import __version__
from embedcache.config import EMBEDDING_DTYPES, PreprocessConfig
from embedcache.errors import CacheMismatchError, EmbedcacheError, UsageError
from embedcache.io.labels import FLARE22, LabelMap

logger = logging.getLogger(__name__)

SCHEMA = 1
#: Signature fields that must match for two caches (or a cache and a model) to mix.
MODEL_KEYS = ("schema", "backbone", "checkpoint_sha256", "input_size", "preprocess", "labels", "embedding_dtype",
              "precision", "zoom_mm", "whole_slices")
#: Signature fields a trained decoder must share with the cache it decodes: the embeddings' maker and
#: meaning (the storage type may differ). Which views it knows is checked apart (``train.decoders``).
DECODER_KEYS = ("backbone", "checkpoint_sha256", "input_size", "preprocess", "labels")
#: The sets a cached case can belong to: ``train`` (training or validation, as the fine-tune's split
#: decides), ``test`` (an ``imagesTs/`` case, never trained on) and ``augment`` (an augmented copy of a
#: ``train`` case, ``NAME~KIND``: trained on with its source, never validated or scored; see
#: :mod:`embedcache.cache.augment`).
CACHED_SUBSETS = ("train", "test", "augment")


def _bad(source, what: str) -> EmbedcacheError:
    return EmbedcacheError(f"{source}: {what}; it was not written by this embedcache: encode it again")


def _check_fields(cls, values, *, source, what: str) -> None:
    """``values`` is a JSON object with exactly the fields of the dataclass ``cls``."""
    if not isinstance(values, dict) or set(values) != {f.name for f in fields(cls)}:
        got = sorted(values) if isinstance(values, dict) else type(values).__name__
        raise _bad(source, f"{what} is not one (fields {got})")


@dataclass(frozen=True)
class Signature:
    """What made a cache's embeddings: backbone, its weights' sha256, its input size (px), the
    preprocessing, the target labels, the stored type and the embedcache version."""

    backbone: str
    checkpoint_sha256: str
    input_size: int
    preprocess: PreprocessConfig
    labels: tuple[int, ...]
    embedding_dtype: str = "float16"
    embedcache_version: str = __version__
    schema: int = SCHEMA
    engine: str = "torch"  # what ran the encoder (encode --engine); fp32 engines agree within 1e-4, so not compared
    precision: str = "fp32"  # the encoder's arithmetic (encode --encoder-precision): caches of two precisions do not mix
    # what the target labels mean (io.labels), cut to them; None: FLARE22's, as every cache before label maps
    label_map: LabelMap | None = None
    # encode --zoom: each gland's region grown by this many mm (cache.regions); 0: no regions, as every cache before
    zoom_mm: float = 0.0
    # whether the cache holds whole slices: caches since encode wrote both views, and all before --zoom; not the
    # regions-only caches encode --zoom first wrote
    whole_slices: bool = True
    # whether the cache holds each row's slice pixels (the windowed slice the encoder saw, uint8): caches since the
    # refinement head (finetune --refine-head reads them), not those before
    pixels: bool = False

    def __post_init__(self):
        if self.label_map is None:
            object.__setattr__(self, "label_map", _flare22_before_maps(self.labels))

    @property
    def views(self) -> tuple[str, ...]:
        """What the cache holds: ``whole`` slices, the glands' ``regions`` (``encode --zoom``), or both."""
        return ("whole",) * self.whole_slices + ("regions",) * bool(self.zoom_mm)

    def of_view(self, view: str | None) -> "Signature":
        """The embeddings a decoder trained on one view of this cache saw: its ``whole`` slices, or its glands'
        ``regions``; None: all of it. What that decoder's checkpoints record."""
        if view not in self.views and view is not None:
            raise ValueError(f"a cache of {'+'.join(self.views)} has no view {view}")
        if view == "whole":
            return replace(self, zoom_mm=0.0, whole_slices=True)
        return replace(self, whole_slices=False) if view == "regions" else self

    @property
    def slice_size(self) -> int:
        """Side of the square slices the embeddings were made from (px)."""
        return self.preprocess.slice_size

    def to_dict(self) -> dict:
        """The JSON object stored in the cache, its shards and every checkpoint trained on it."""
        return {"schema": self.schema, "backbone": self.backbone, "checkpoint_sha256": self.checkpoint_sha256,
                "input_size": self.input_size, "preprocess": asdict(self.preprocess), "labels": list(self.labels),
                "embedding_dtype": self.embedding_dtype, "embedcache_version": self.embedcache_version,
                "engine": self.engine, "precision": self.precision, "label_map": self.label_map.to_dict(),
                "zoom_mm": self.zoom_mm, "whole_slices": self.whole_slices, "pixels": self.pixels}

    @classmethod
    def from_dict(cls, values, *, source) -> "Signature":
        """A signature read from ``source`` (a file, named in the error), every field's type checked."""
        if isinstance(values, dict):  # caches and checkpoints from before --engine, --encoder-precision and label maps
            values = {"engine": "torch", "precision": "fp32", "label_map": None, "zoom_mm": 0.0, **values}
            values.setdefault("whole_slices", not values["zoom_mm"])  # encode --zoom's first caches: regions only
            values.setdefault("pixels", False)  # caches before the refinement head
        _check_fields(cls, values, source=source, what="signature")
        text = ("backbone", "checkpoint_sha256", "embedding_dtype", "embedcache_version", "engine",
                "precision")
        if not all(isinstance(values[k], str) for k in text) or not all(_is_int(values[k]) for k in ("input_size", "schema")):
            raise _bad(source, "signature has a field of the wrong type")
        labels = values["labels"]
        if not isinstance(labels, list) or not labels or not all(_is_int(v) and 0 < v < 256 for v in labels):
            raise _bad(source, f"signature labels {_short(labels)} are not label ids")
        if not _floats([values["zoom_mm"]], 1) or not 0 <= values["zoom_mm"] <= 200:
            raise _bad(source, f"signature zoom_mm {_short(values['zoom_mm'])} is not a margin in mm")
        if not isinstance(values["whole_slices"], bool) or not (values["whole_slices"] or values["zoom_mm"]):
            raise _bad(source, f"signature whole_slices {_short(values['whole_slices'])} is not true or false, or "
                               "leaves the cache no view")
        if not isinstance(values["pixels"], bool):
            raise _bad(source, f"signature pixels {_short(values['pixels'])} is not true or false")
        if values["embedding_dtype"] not in EMBEDDING_DTYPES:
            raise _bad(source, f"signature embedding_dtype {_short(values['embedding_dtype'])} is not float16 or float32")
        pre = values["preprocess"]
        if not isinstance(pre, dict) or set(pre) != {f.name for f in fields(PreprocessConfig)} \
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pre.values()):
            raise _bad(source, f"signature preprocess {_short(pre)} is not one")
        try:
            preprocess = PreprocessConfig(**pre)
        except UsageError as exc:
            raise _bad(source, f"signature preprocess out of range ({exc})") from None
        label_map = None if values["label_map"] is None else LabelMap.from_dict(values["label_map"], source=source)
        return cls(**{**values, "preprocess": preprocess, "labels": tuple(labels), "label_map": label_map})

    def difference(self, other: "Signature", keys: tuple[str, ...] = MODEL_KEYS) -> str | None:
        """``key=MINE, not OTHER`` for the first of ``keys`` on which the two differ, else None; with ``labels``
        among them, also where the two label maps give a target label another meaning."""
        difference = first_difference(self.to_dict(), other.to_dict(), keys)
        if difference is None and "labels" in keys:
            difference = self.label_map.disagreement(other.label_map, self.labels)
        return difference

    def check_matches(self, expected: "Signature", *, path: Path) -> None:
        """Refuse a cache made by another model, checkpoint, preprocessing or label set; warn on version."""
        difference = self.difference(expected, MODEL_KEYS)
        if difference:
            raise CacheMismatchError(
                f"{path}: cache was made with {difference}; encode into a new file or use the settings it was made with"
            )
        if self.embedcache_version != expected.embedcache_version:
            logger.warning(f"{path}: written by embedcache {self.embedcache_version}, this is "
                           f"{expected.embedcache_version}")


def _flare22_before_maps(labels) -> LabelMap:
    return LabelMap(FLARE22.only(labels).labels, "FLARE22's ids (made before label maps)")


def first_difference(found: dict, expected: dict, keys: tuple[str, ...]) -> str | None:
    """``key=FOUND, not EXPECTED`` for the first of ``keys`` on which two signature dicts differ, else None."""
    for key in keys:
        if found.get(key) != expected.get(key):
            return f"{key}={_short(found.get(key))}, not {_short(expected.get(key))}"
    return None


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 80 else text[:16] + "…"


def _region(value) -> bool:
    keys = {"cx", "cy", "side_mm", "size", "z0", "z1", "label", "source"}
    return (isinstance(value, dict) and set(value) == keys and _floats([value[k] for k in ("cx", "cy", "side_mm")], 3)
            and value["side_mm"] > 0 and all(_is_int(value[k]) and value[k] >= 0 for k in ("size", "z0", "z1", "label"))
            and value["size"] > 0 and value["z0"] <= value["z1"] and isinstance(value["source"], str))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(value, n: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == n and all(_is_int(v) and v >= 0 for v in value)


def _floats(value, n: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == n and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)


@dataclass(frozen=True)
class CaseRecord:
    """One source case in a cache; ``first_row``/``n_rows`` locate its slices."""

    name: str
    image: str
    label: str
    digest: str
    first_row: int
    n_rows: int
    shape_zyx: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    source_shape: tuple[int, int, int]
    source_affine: tuple[tuple[float, ...], ...]
    subset: str = "train"  # "test" for a test folder's cases (imagesTs/), never trained on; "augment" for a copy
    margin_slices: int = 0  # slices cached beyond each end of the glands (no boxes), for 3-D box prompts
    series_uid: str | None = None  # the DICOM series read from an image folder that holds several
    # encode --zoom: the gland's region (cache.regions.GlandRegion's fields, its "label" and its "source" case); its
    # rows are the region's slices z0..z1 at shape_zyx[1:] = (size, size) of spacing_mm[1:] = side_mm / size
    region: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj, *, source) -> "CaseRecord":
        """A record read from ``source`` (a file, named in the error), every field's type checked."""
        if isinstance(obj, dict):  # records from before encode --zoom
            obj = {"region": None, **obj}
        _check_fields(cls, obj, source=source, what="a case record")
        name = obj["name"]
        ok = (all(isinstance(obj[k], str) for k in ("name", "image", "label", "digest"))
              and all(_is_int(obj[k]) and obj[k] >= 0 for k in ("first_row", "n_rows", "margin_slices"))
              and _ints(obj["shape_zyx"], 3) and _ints(obj["source_shape"], 3) and _floats(obj["spacing_mm"], 3)
              and isinstance(obj["source_affine"], (list, tuple)) and len(obj["source_affine"]) == 4
              and all(_floats(row, 4) for row in obj["source_affine"])
              and obj["subset"] in CACHED_SUBSETS and (obj["series_uid"] is None or isinstance(obj["series_uid"], str))
              and (obj["region"] is None or _region(obj["region"])))
        if not ok:
            raise _bad(source, f"case record {_short(name)} has a field of the wrong type or out of range")
        return cls(**{**obj, "shape_zyx": tuple(obj["shape_zyx"]), "spacing_mm": tuple(obj["spacing_mm"]),
                      "source_shape": tuple(obj["source_shape"]),
                      "source_affine": tuple(tuple(row) for row in obj["source_affine"])})

    @property
    def rows(self) -> slice:
        """This case's rows of the cache, for h5py reads."""
        return slice(self.first_row, self.first_row + self.n_rows)

    @property
    def row_index(self) -> np.ndarray:
        """This case's rows of the cache as indices."""
        return np.arange(self.first_row, self.first_row + self.n_rows)


def check_case_rows(records: list[CaseRecord], n_rows: int, *, source) -> None:
    """Every case's rows lie inside the ``n_rows`` rows of the datasets, no two overlap, no name twice."""
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise _bad(source, f"case {sorted(n for n in names if names.count(n) > 1)[0]} is recorded twice")
    end = 0
    for record in sorted(records, key=lambda r: r.first_row):
        if record.n_rows and (record.first_row < end or record.first_row + record.n_rows > n_rows):
            raise _bad(source, f"case {record.name}'s rows {record.first_row}..{record.first_row + record.n_rows - 1} "
                               f"overlap another case or lie beyond the {n_rows} rows")
        end = max(end, record.first_row + record.n_rows)
