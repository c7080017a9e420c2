"""What a label id means: one :class:`LabelMap` record, read from the data, never assumed.

Every data set numbers its organs its own way: the adrenal glands are 7/8 in FLARE22, 8/9 in
TotalSegmentator v2, 11/12 in AMOS, 12/13 in BTCV and one class (12) in WORD; a user's own data
names them in an nnU-Net ``dataset.json``. A map is built (:func:`resolve_label_map`) from, in this
order: a file given with ``--label-map`` (nnU-Net v2 or Medical Segmentation Decathlon
``dataset.json``, or a small JSON or TSV of id → name), a ``dataset.json`` found beside the data, a
built-in ``--label-preset``, and FLARE22's ids only when nothing else is given (the CLI says so).

Names resolve to organs through one lookup (:func:`organ_of`: ``adrenal_gland_right``, ``right
adrenal gland``, ``Adrenal gland right``, ``RAG`` ...), and an organ gives everything else: the name
reports show, the SNOMED CT code and laterality of DICOM output, the NSD tolerance, the left-right
partner a mirrored copy takes (``encode --augment flip``) and FLARE22's rule of scoring the tubes on
their labelled slices only. A name the lookup does not know keeps its own words in reports and is
refused by DICOM output and flips, never given another organ's code or side.

NSD tolerances (mm) are those of FLARE22's evaluation script
(``FLARE22/Evaluation/FLARE22_DSC_NSD_Eval.py`` in github.com/JunMa11/FLARE), which also scores the
aorta, IVC and oesophagus only on the axial slices that the ground truth labels; organs FLARE22
does not score take the adrenals' 2 mm.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from embedcache.errors import EmbedcacheError, UsageError
from embedcache.io.files import atomic_write_text, read_json

#: DICOM's coding scheme of SNOMED CT, and the segmented property category of every segment (CID 7150).
SCT = "SCT"
ANATOMICAL_STRUCTURE = ("123037004", "Anatomical Structure")
#: Laterality modifiers (CID 244).
SIDES = {"right": ("24028007", "Right"), "left": ("7771000", "Left")}
#: The file nnU-Net and the Decathlon keep beside a data set's folders.
DATASET_JSON = "dataset.json"
#: NSD tolerance of an organ FLARE22 does not score (mm): the adrenals' 2 mm.
DEFAULT_TOLERANCE_MM = 2.0


@dataclass(frozen=True)
class Organ:
    """One anatomical structure: the words reports use, its SNOMED CT code (CID 7150/7151), FLARE22's NSD
    tolerance (mm), whether FLARE22 scores it on its labelled slices only (the tubes), and whether it comes
    in a left and a right one (a label of it without a side holds both)."""

    display: str
    code: str
    meaning: str
    tolerance_mm: float = DEFAULT_TOLERANCE_MM
    labelled_slices_only: bool = False
    paired: bool = False


#: The organs the name lookup knows, by key. Codes: SNOMED CT, as DICOM CID 7150/7151 list them.
ORGANS = {
    "adrenal gland": Organ("adrenal", "23451007", "Adrenal gland", 2.0, paired=True),
    "kidney": Organ("kidney", "64033007", "Kidney", 3.0, paired=True),
    "liver": Organ("liver", "10200004", "Liver", 5.0),
    "spleen": Organ("spleen", "78961009", "Spleen", 3.0),
    "pancreas": Organ("pancreas", "15776009", "Pancreas", 5.0),
    "aorta": Organ("aorta", "15825003", "Aorta", 2.0, labelled_slices_only=True),
    "inferior vena cava": Organ("inferior vena cava", "64131007", "Inferior vena cava", 2.0,
                                labelled_slices_only=True),
    "gallbladder": Organ("gallbladder", "28231008", "Gallbladder", 2.0),
    "esophagus": Organ("esophagus", "32849002", "Esophagus", 3.0, labelled_slices_only=True),
    "stomach": Organ("stomach", "69695003", "Stomach", 5.0),
    "duodenum": Organ("duodenum", "38848004", "Duodenum", 7.0),
    "urinary bladder": Organ("urinary bladder", "89837001", "Urinary bladder"),
    "prostate": Organ("prostate", "41216001", "Prostate"),
    "uterus": Organ("uterus", "35039007", "Uterus"),
    "colon": Organ("colon", "71854001", "Colon"),
    "small intestine": Organ("small intestine", "30315005", "Small intestine"),
    "rectum": Organ("rectum", "34402009", "Rectum"),
    "heart": Organ("heart", "80891009", "Heart"),
    "trachea": Organ("trachea", "44567001", "Trachea"),
    "thyroid gland": Organ("thyroid", "69748006", "Thyroid gland"),
    "lung": Organ("lung", "39607008", "Lung", paired=True),
    "portal vein": Organ("portal vein", "32764006", "Portal vein"),
    "splenic vein": Organ("splenic vein", "35819009", "Splenic vein"),
    "femur": Organ("femur", "71341001", "Femur", paired=True),
}
# The category "Anatomical Structure" is coded 123037004 as TotalSegmentator's and dcmqi's SEGs code it (DICOM
# 2024c's CID 7150 lists 91723000 for it); segments' types and sides as CID 7151 and CID 244 list them.

#: Words a data set may call an organ, after :func:`_words` (lower case, the side and "gland" removed).
SYNONYMS = {
    "adrenal": "adrenal gland", "suprarenal": "adrenal gland", "ag": "adrenal gland",
    "kidney": "kidney", "kid": "kidney", "renal": "kidney",
    "liver": "liver", "hepar": "liver", "spleen": "spleen", "pancreas": "pancreas", "aorta": "aorta",
    "arota": "aorta",  # AMOS's dataset.json spells it so
    "inferior vena cava": "inferior vena cava", "vena cava inferior": "inferior vena cava",
    "ivc": "inferior vena cava", "postcava": "inferior vena cava", "infrahepatic vena cava": "inferior vena cava",
    "gallbladder": "gallbladder", "gall bladder": "gallbladder", "gall": "gallbladder",
    "esophagus": "esophagus", "oesophagus": "esophagus",
    "stomach": "stomach", "duodenum": "duodenum",
    "urinary bladder": "urinary bladder", "bladder": "urinary bladder",
    "prostate": "prostate", "uterus": "uterus", "colon": "colon",
    "small bowel": "small intestine", "small intestine": "small intestine",
    "intestine": "small intestine",  # WORD's: beside its colon, duodenum and rectum
    "rectum": "rectum", "heart": "heart", "trachea": "trachea", "thyroid": "thyroid gland",
    "lung": "lung", "portal vein": "portal vein", "splenic vein": "splenic vein",
    "femur": "femur",
}
#: Abbreviations that carry their side: ``RAG`` is the right adrenal gland.
_SIDED_ABBREVIATIONS = {"rag": ("adrenal gland", "right"), "lag": ("adrenal gland", "left"),
                        "rk": ("kidney", "right"), "lk": ("kidney", "left"),
                        "rkid": ("kidney", "right"), "lkid": ("kidney", "left"),
                        "rad": ("adrenal gland", "right"), "lad": ("adrenal gland", "left")}
_SIDE_WORDS = {"right": "right", "r": "right", "rt": "right", "dexter": "right",
               "left": "left", "l": "left", "lt": "left", "sinister": "left"}


def _words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", str(name))  # AdrenalGlandRight
    return [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]


def organ_of(name: str) -> tuple[str, str | None] | None:
    """The organ key (of :data:`ORGANS`) and side (``right``, ``left`` or None) a data set's name for a
    label means, or None where the name is no organ this lookup knows (``adrenal_gland_right`` →
    ``("adrenal gland", "right")``; ``adrenal`` → ``("adrenal gland", None)``: both glands in one label)."""
    words = _words(name)
    if len(words) == 1 and words[0] in _SIDED_ABBREVIATIONS:
        return _SIDED_ABBREVIATIONS[words[0]]
    sides = {_SIDE_WORDS[w] for w in words if w in _SIDE_WORDS}
    if len(sides) > 1:
        return None
    rest = [w for w in words if w not in _SIDE_WORDS and w not in ("gland", "glands", "the")]
    key = SYNONYMS.get(" ".join(rest))
    if key is None:
        return None
    side = next(iter(sides), None)
    if side is not None and not ORGANS[key].paired:
        return None  # a "left liver" is not the liver
    return key, side


@dataclass(frozen=True)
class Label:
    """One id of a label volume: the name the data gives it and, where :func:`organ_of` knows the name,
    its organ and side."""

    id: int
    name: str
    organ: str | None = None
    laterality: str | None = None  # right | left | None (unpaired organ, or both sides in one label)

    @classmethod
    def named(cls, label_id: int, name: str) -> "Label":
        found = organ_of(name)
        organ, side = found if found else (None, None)
        return cls(int(label_id), str(name), organ, side)

    @property
    def display(self) -> str:
        """What reports call it: ``right adrenal``; the data's own name for an organ the lookup does not know."""
        if self.organ is None:
            return self.name
        word = ORGANS[self.organ].display
        return f"{self.laterality} {word}" if self.laterality else word

    @property
    def meaning(self) -> tuple[str | None, str | None]:
        """(organ, side), or (the name in lower case, None) for a name the lookup does not know: what two
        maps must share for one id to mean the same."""
        return (self.organ, self.laterality) if self.organ else (" ".join(_words(self.name)), None)


@dataclass(frozen=True)
class LabelMap:
    """The labels of a data set by id, and where the map came from (``source``: a file, a preset)."""

    labels: tuple[Label, ...]
    source: str

    def __post_init__(self):
        ids = [entry.id for entry in self.labels]
        if len(set(ids)) != len(ids):
            raise EmbedcacheError(f"{self.source}: label {sorted(i for i in ids if ids.count(i) > 1)[0]} is named twice")
        seen: dict[tuple, int] = {}
        for entry in self.labels:  # two ids of one organ and side: reports, flips and DICOM codes could not tell them
            if entry.organ is None:
                continue
            key = (entry.organ, entry.laterality)
            if key in seen:
                raise EmbedcacheError(f"{self.source}: labels {seen[key]} and {entry.id} both name the "
                                      f"{entry.display}; give each organ and side one id")
            seen[key] = entry.id

    def get(self, label: int) -> Label | None:
        return next((entry for entry in self.labels if entry.id == int(label)), None)

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(entry.id for entry in self.labels)

    def name(self, label: int) -> str:
        """The name reports give ``label``: the organ (``right adrenal``), the data's own name, or ``label N``
        for an id the map does not hold (never another organ's name)."""
        entry = self.get(label)
        return entry.display if entry else f"label {int(label)}"

    def organ(self, label: int) -> Organ | None:
        entry = self.get(label)
        return ORGANS[entry.organ] if entry and entry.organ else None

    def tolerance_mm(self, label: int) -> float:
        """FLARE22's NSD tolerance for the organ ``label`` holds; 2 mm for one FLARE22 does not score."""
        organ = self.organ(label)
        return organ.tolerance_mm if organ else DEFAULT_TOLERANCE_MM

    def labelled_slices_only(self, label: int) -> bool:
        """FLARE22 scores the aorta, IVC and oesophagus on the slices the ground truth labels only."""
        organ = self.organ(label)
        return bool(organ and organ.labelled_slices_only)

    def code(self, label: int) -> tuple[str, str, tuple[str, str] | None] | None:
        """``(SNOMED code, meaning, laterality modifier or None)`` of ``label``, or None where its organ is unknown."""
        entry, organ = self.get(label), self.organ(label)
        if organ is None:
            return None
        return organ.code, organ.meaning, SIDES[entry.laterality] if entry.laterality else None

    def adrenals(self) -> tuple[int, ...]:
        """The adrenal glands' ids, right before left (one id where both share a label): the default targets."""
        order = {"right": 0, "left": 1, None: 2}
        found = [e for e in self.labels if e.organ == "adrenal gland"]
        return tuple(e.id for e in sorted(found, key=lambda e: order[e.laterality]))

    def mirrored(self, targets) -> dict[int, int]:
        """What each id becomes when the image is mirrored left to right (``encode --augment flip``): every pair
        of one organ's right and left labels swaps; labels without a side keep their ids. A target whose organ
        is unknown, or which has a side but no partner in the map, is refused: its copy would teach a guess."""
        swap: dict[int, int] = {}
        for entry in self.labels:
            if entry.laterality:
                partner = [o for o in self.labels if o.organ == entry.organ and o.laterality
                           and o.laterality != entry.laterality]
                if len(partner) == 1:
                    swap[entry.id] = partner[0].id
        for label in targets:
            entry = self.get(label)
            if entry is None or entry.organ is None:
                raise UsageError(f"--augment flip: label {int(label)} ({self.name(label)}) is no organ whose side is "
                                 f"known in {self.source}; name it in a --label-map (e.g. adrenal_gland_right) or drop "
                                 "flip")
            if entry.laterality and int(label) not in swap:
                raise UsageError(f"--augment flip: label {int(label)} ({self.name(label)}) has no {_other(entry.laterality)} "
                                 f"partner in {self.source}, so a mirrored copy has no id for it; drop flip")
        return swap

    def only(self, ids) -> "LabelMap":
        """This map cut to ``ids`` (those it holds), as a cache records its targets."""
        keep = {int(i) for i in ids}
        return LabelMap(tuple(e for e in self.labels if e.id in keep), self.source)

    def disagreement(self, other: "LabelMap", ids) -> str | None:
        """``label 8: right adrenal (SOURCE), not gallbladder (OTHER)`` for the first of ``ids`` the two maps give
        another meaning, else None."""
        for label in ids:
            mine, theirs = self.get(label), other.get(label)
            if (mine.meaning if mine else None) != (theirs.meaning if theirs else None):
                return (f"label {int(label)}: {self.name(label)} ({self.source}), not {other.name(label)} "
                        f"({other.source})")
        return None

    def to_dict(self) -> dict:
        return {"source": self.source,
                "labels": [{"id": e.id, "name": e.name, "organ": e.organ, "laterality": e.laterality}
                           for e in self.labels]}

    @classmethod
    def from_dict(cls, values, *, source) -> "LabelMap":
        """A map read from ``source`` (a file, named in the error), every field checked."""
        def bad(what):
            return EmbedcacheError(f"{source}: label map {what}; it was not written by this embedcache: encode it again")

        if not isinstance(values, dict) or set(values) != {"source", "labels"} or not isinstance(values["source"], str) \
                or not isinstance(values["labels"], list):
            raise bad("is not one")
        entries = []
        for item in values["labels"]:
            if not isinstance(item, dict) or set(item) != {"id", "name", "organ", "laterality"} \
                    or not _is_id(item["id"]) or not isinstance(item["name"], str) \
                    or not (item["organ"] is None or item["organ"] in ORGANS) \
                    or item["laterality"] not in (None, "right", "left"):
                raise bad(f"entry {str(item)[:60]} is not one")
            entries.append(Label(item["id"], item["name"], item["organ"], item["laterality"]))
        try:
            return cls(tuple(entries), values["source"])
        except EmbedcacheError as exc:
            raise bad(str(exc)) from None


def _other(side: str) -> str:
    return "left" if side == "right" else "right"


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def from_names(names: dict[int, str], source: str) -> LabelMap:
    """A map of ``{id: name}``, each name resolved to its organ."""
    return LabelMap(tuple(Label.named(i, n) for i, n in sorted(names.items())), source)


# The presets: each data set's own ids and names, as its release lists them.
PRESETS: dict[str, dict[int, str]] = {
    # FLARE22: the challenge's label table (github.com/JunMa11/FLARE, FLARE22 README).
    "flare22": {1: "liver", 2: "right kidney", 3: "spleen", 4: "pancreas", 5: "aorta", 6: "inferior vena cava",
                7: "right adrenal gland", 8: "left adrenal gland", 9: "gallbladder", 10: "esophagus", 11: "stomach",
                12: "duodenum", 13: "left kidney"},
    # AMOS 2022 (CT): its dataset.json's "labels", verbatim (github.com/JiYuanFeng/AMOS, splits/dataset_ct.json).
    "amos": {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gall bladder", 5: "esophagus", 6: "liver",
             7: "stomach", 8: "arota", 9: "postcava", 10: "pancreas", 11: "right adrenal gland",
             12: "left adrenal gland", 13: "duodenum", 14: "bladder", 15: "prostate/uterus"},
    # BTCV (Synapse multi-organ, "Multi-Atlas Labeling Beyond the Cranial Vault"): its 13 organs, as its
    # label files and MONAI's BTCV tutorial number them.
    "btcv": {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
             7: "stomach", 8: "aorta", 9: "inferior vena cava", 10: "portal vein and splenic vein", 11: "pancreas",
             12: "right adrenal gland", 13: "left adrenal gland"},
    # WORD (github.com/HiLab-git/WORD; names as its label lists give them, checked against its test labels):
    # one adrenal class for both glands; the left kidney before the right.
    "word": {1: "liver", 2: "spleen", 3: "left kidney", 4: "right kidney", 5: "stomach", 6: "gallbladder",
             7: "esophagus", 8: "pancreas", 9: "duodenum", 10: "colon", 11: "intestine", 12: "adrenal",
             13: "rectum", 14: "bladder", 15: "Head_of_femur_L", 16: "Head_of_femur_R"},
    # TotalSegmentator v2, task "total": class_map["total"] in totalsegmentator/map_to_binary.py
    # (github.com/wasserth/TotalSegmentator), v2.2.0 and later (v2.0.x numbered the ribs 92-115 otherwise).
    "totalsegmentator": {
        1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "pancreas",
        8: "adrenal_gland_right", 9: "adrenal_gland_left", 10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left",
        12: "lung_upper_lobe_right", 13: "lung_middle_lobe_right", 14: "lung_lower_lobe_right", 15: "esophagus",
        16: "trachea", 17: "thyroid_gland", 18: "small_bowel", 19: "duodenum", 20: "colon", 21: "urinary_bladder",
        22: "prostate", 23: "kidney_cyst_left", 24: "kidney_cyst_right", 25: "sacrum", 26: "vertebrae_S1",
        27: "vertebrae_L5", 28: "vertebrae_L4", 29: "vertebrae_L3", 30: "vertebrae_L2", 31: "vertebrae_L1",
        32: "vertebrae_T12", 33: "vertebrae_T11", 34: "vertebrae_T10", 35: "vertebrae_T9", 36: "vertebrae_T8",
        37: "vertebrae_T7", 38: "vertebrae_T6", 39: "vertebrae_T5", 40: "vertebrae_T4", 41: "vertebrae_T3",
        42: "vertebrae_T2", 43: "vertebrae_T1", 44: "vertebrae_C7", 45: "vertebrae_C6", 46: "vertebrae_C5",
        47: "vertebrae_C4", 48: "vertebrae_C3", 49: "vertebrae_C2", 50: "vertebrae_C1", 51: "heart", 52: "aorta",
        53: "pulmonary_vein", 54: "brachiocephalic_trunk", 55: "subclavian_artery_right",
        56: "subclavian_artery_left", 57: "common_carotid_artery_right", 58: "common_carotid_artery_left",
        59: "brachiocephalic_vein_left", 60: "brachiocephalic_vein_right", 61: "atrial_appendage_left",
        62: "superior_vena_cava", 63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein",
        65: "iliac_artery_left", 66: "iliac_artery_right", 67: "iliac_vena_left", 68: "iliac_vena_right",
        69: "humerus_left", 70: "humerus_right", 71: "scapula_left", 72: "scapula_right", 73: "clavicula_left",
        74: "clavicula_right", 75: "femur_left", 76: "femur_right", 77: "hip_left", 78: "hip_right",
        79: "spinal_cord", 80: "gluteus_maximus_left", 81: "gluteus_maximus_right", 82: "gluteus_medius_left",
        83: "gluteus_medius_right", 84: "gluteus_minimus_left", 85: "gluteus_minimus_right",
        86: "autochthon_left", 87: "autochthon_right", 88: "iliopsoas_left", 89: "iliopsoas_right", 90: "brain",
        91: "skull", 92: "rib_left_1", 93: "rib_left_2", 94: "rib_left_3", 95: "rib_left_4", 96: "rib_left_5",
        97: "rib_left_6", 98: "rib_left_7", 99: "rib_left_8", 100: "rib_left_9", 101: "rib_left_10",
        102: "rib_left_11", 103: "rib_left_12", 104: "rib_right_1", 105: "rib_right_2", 106: "rib_right_3",
        107: "rib_right_4", 108: "rib_right_5", 109: "rib_right_6", 110: "rib_right_7", 111: "rib_right_8",
        112: "rib_right_9", 113: "rib_right_10", 114: "rib_right_11", 115: "rib_right_12", 116: "sternum",
        117: "costal_cartilages"},
}


def preset(name: str) -> LabelMap:
    """The built-in map ``name`` (:data:`PRESETS`)."""
    check_options(None, name)
    return from_names(PRESETS[name], f"--label-preset {name}")


#: FLARE22's ids, for the code that writes FLARE22-labelled data (the phantom, the anatomy painter).
LIVER, RIGHT_KIDNEY, SPLEEN, PANCREAS, AORTA, IVC, RIGHT_ADRENAL, LEFT_ADRENAL = 1, 2, 3, 4, 5, 6, 7, 8
GALLBLADDER, ESOPHAGUS, STOMACH, DUODENUM, LEFT_KIDNEY = 9, 10, 11, 12, 13

#: What the commands fall back to when the data names no map: FLARE22's ids.
FLARE22 = from_names(PRESETS["flare22"], "FLARE22's ids (the default)")
#: FLARE22's adrenal glands: the targets when the data names no map.
ADRENALS = FLARE22.adrenals()


def write_dataset_json(folder: Path, *, training: int, name: str, label_map: LabelMap | None = None) -> Path:
    """``folder/dataset.json`` as nnU-Net v2 writes it, naming ``label_map``'s ids (FLARE22's by default): what
    embedcache writes beside the data it makes, so the data says what its ids mean."""
    label_map = label_map or FLARE22
    values = {"name": name, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": int(training),
              "labels": {"background": 0, **{entry.name: entry.id for entry in label_map.labels}}}
    path = Path(folder) / DATASET_JSON
    atomic_write_text(path, json.dumps(values, indent=2) + "\n")
    return path


def read_label_map(path: Path) -> LabelMap:
    """The map in ``path``: an nnU-Net v2 ``dataset.json`` (``"labels": {"name": id}``), a Medical Segmentation
    Decathlon one (``"labels": {"id": "name"}``), a JSON object of id → name (or name → id), or a TSV/CSV of
    ``id<TAB>name`` lines. Background (0) is dropped; anything else is one line naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise EmbedcacheError(f"{path}: not a readable label map ({exc}); give a dataset.json or a TSV of id, name") \
            from None
    if path.suffix.lower() in (".tsv", ".csv", ".txt"):
        names = _table(text, path)
    else:
        values = read_json(path, what="label map", fix="give a dataset.json or a JSON object of id → name",
                           unique_keys=True)
        names = _names(values.get("labels") if isinstance(values, dict) and "labels" in values else values, path)
    names = {i: n for i, n in names.items() if i != 0}
    if not names:
        raise EmbedcacheError(f"{path}: names no label but the background; give each label id its name")
    return from_names(names, str(path))


def _names(labels, path: Path) -> dict[int, str]:
    """``{"name": id}`` (nnU-Net v2) or ``{"id": "name"}`` (MSD, a small map) → ``{id: name}``."""
    fix = "the labels must map names to ids (nnU-Net v2) or ids to names (Decathlon)"
    if not isinstance(labels, dict) or not labels:
        raise EmbedcacheError(f"{path}: holds no \"labels\" object; {fix}")
    out: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, list):
            raise EmbedcacheError(f"{path}: label {key!r} is a region of several ids {value}; embedcache scores one "
                                  "id per organ: give a map of single ids")
        if _is_id(value) or value == 0:
            label, name = value, key
        elif isinstance(value, str) and key.strip().isascii() and key.strip().isdigit():
            label, name = int(key), value
        else:
            raise EmbedcacheError(f"{path}: label entry {key!r}: {str(value)[:40]!r} is not an id and a name; {fix}")
        if not (label == 0 or _is_id(label)):
            raise EmbedcacheError(f"{path}: label id {label} lies outside 1..65535")
        if label in out:
            raise EmbedcacheError(f"{path}: label {label} is named twice ({out[label]!r}, {name!r})")
        out[label] = name
    return out


def _table(text: str, path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        label, _, name = (line.partition("\t") if "\t" in line else line.partition(","))
        if not (label.strip().isascii() and label.strip().isdigit()):
            if number == 1 and not out:
                continue  # a header
            raise EmbedcacheError(f"{path}:{number}: {line.strip()[:40]!r} is not 'id<TAB>name'")
        label = int(label)
        if not (label == 0 or _is_id(label)) or not name.strip():
            raise EmbedcacheError(f"{path}:{number}: give an id in 1..65535 and its name")
        if label in out:
            raise EmbedcacheError(f"{path}:{number}: label {label} is named twice")
        out[label] = name.strip().strip('"')
    return out


def find_dataset_json(*folders: Path) -> Path | None:
    """The first ``dataset.json`` with a ``"labels"`` object in ``folders``, in order."""
    for folder in folders:
        if folder is None:
            continue
        candidate = Path(folder) / DATASET_JSON
        if candidate.is_file():
            values = read_json(candidate, what="dataset.json", fix="mend it, or give --label-map", unique_keys=True)
            if isinstance(values, dict) and "labels" in values:
                return candidate
    return None


def beside(path: Path) -> tuple[Path, Path]:
    """Where a ``dataset.json`` for the labels in ``path`` (a label folder, or a file in one) may lie: that
    folder and the data set's folder above it (``labelsTr/..``)."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    return folder, folder.parent


def check_options(path, preset_name: str | None) -> None:
    """``--label-map`` and ``--label-preset`` are exclusive, and the preset is one of :data:`PRESETS`."""
    if path is not None and preset_name is not None:
        raise UsageError("give --label-map or --label-preset, not both")
    if preset_name is not None and preset_name not in PRESETS:
        raise UsageError(f"--label-preset {preset_name}: choose from {', '.join(PRESETS)}")


def resolve_label_map(*, path: Path | None = None, preset_name: str | None = None,
                      folders: tuple = ()) -> tuple[LabelMap, bool]:
    """The map a command uses, and whether it is the FLARE22 fallback (the CLI then says so once):
    ``path`` (``--label-map``), else a ``dataset.json`` beside ``folders``, else ``preset_name``, else FLARE22.
    A preset that a found ``dataset.json`` contradicts on an id both name is refused, naming both."""
    check_options(path, preset_name)
    if path is not None:
        return read_label_map(path), False
    found = find_dataset_json(*folders)
    chosen = preset(preset_name) if preset_name is not None else None
    if found is not None:
        from_file = read_label_map(found)
        if chosen is not None:
            clash = from_file.disagreement(chosen, [i for i in from_file.ids if chosen.get(i)])
            if clash:
                raise UsageError(f"{found} and --label-preset {preset_name} disagree ({clash}); drop the preset, "
                                 "or give the map you mean with --label-map")
        return from_file, False
    if chosen is not None:
        return chosen, False
    return FLARE22, True


def fallback_note(targets) -> str:
    """What the CLI says once when no map was given."""
    names = ", ".join(f"{int(t)} = {FLARE22.name(t)}" for t in targets)
    return (f"labels: FLARE22's ids ({names}); for data labelled another way give --label-map dataset.json or "
            f"--label-preset {'|'.join(p for p in PRESETS if p != 'flare22')}")
