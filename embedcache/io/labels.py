"""FLARE22's label ids, names and NSD tolerances: defined here once.

Tolerances (mm) are those of the challenge's own evaluation script
(``FLARE22/Evaluation/FLARE22_DSC_NSD_Eval.py`` in github.com/JunMa11/FLARE), which also scores
the aorta, IVC and oesophagus only on the axial slices that the ground truth labels.
"""

from __future__ import annotations

LIVER, RIGHT_KIDNEY, SPLEEN, PANCREAS, AORTA, IVC, RIGHT_ADRENAL, LEFT_ADRENAL = 1, 2, 3, 4, 5, 6, 7, 8
GALLBLADDER, ESOPHAGUS, STOMACH, DUODENUM, LEFT_KIDNEY = 9, 10, 11, 12, 13

#: The default targets of embedcache.
ADRENALS = (RIGHT_ADRENAL, LEFT_ADRENAL)

NAMES = {
    LIVER: "liver", RIGHT_KIDNEY: "right kidney", SPLEEN: "spleen", PANCREAS: "pancreas", AORTA: "aorta",
    IVC: "inferior vena cava", RIGHT_ADRENAL: "right adrenal", LEFT_ADRENAL: "left adrenal",
    GALLBLADDER: "gallbladder", ESOPHAGUS: "esophagus", STOMACH: "stomach", DUODENUM: "duodenum",
    LEFT_KIDNEY: "left kidney",
}

#: Left-right pairs: what a mirrored image's labels become (encode --augment flip).
MIRRORED = {RIGHT_ADRENAL: LEFT_ADRENAL, LEFT_ADRENAL: RIGHT_ADRENAL, RIGHT_KIDNEY: LEFT_KIDNEY, LEFT_KIDNEY: RIGHT_KIDNEY}

#: NSD tolerance per label, in mm (FLARE22).
NSD_TOLERANCE_MM = {
    LIVER: 5.0, RIGHT_KIDNEY: 3.0, SPLEEN: 3.0, PANCREAS: 5.0, AORTA: 2.0, IVC: 2.0, RIGHT_ADRENAL: 2.0,
    LEFT_ADRENAL: 2.0, GALLBLADDER: 2.0, ESOPHAGUS: 3.0, STOMACH: 5.0, DUODENUM: 7.0, LEFT_KIDNEY: 3.0,
}

#: Tubes whose labelled length varies between scans: FLARE22 scores them on the labelled slices only.
SCORED_ON_LABELLED_SLICES = (AORTA, IVC, ESOPHAGUS)


#: SNOMED CT codes per label, as DICOM Segmentation and RT Structure Set objects name them (DICOM
#: CID 7150/7151): ``(code, meaning, laterality)``, laterality a modifier code (CID 244) or None.
SCT = "SCT"
ANATOMICAL_STRUCTURE = ("123037004", "Anatomical Structure")  # the segmented property category
RIGHT, LEFT = ("24028007", "Right"), ("7771000", "Left")
SNOMED = {
    LIVER: ("10200004", "Liver", None), RIGHT_KIDNEY: ("64033007", "Kidney", RIGHT), SPLEEN: ("78961009", "Spleen", None),
    PANCREAS: ("15776009", "Pancreas", None), AORTA: ("15825003", "Aorta", None),
    IVC: ("64131007", "Inferior vena cava", None), RIGHT_ADRENAL: ("23451007", "Adrenal gland", RIGHT),
    LEFT_ADRENAL: ("23451007", "Adrenal gland", LEFT), GALLBLADDER: ("28231008", "Gallbladder", None),
    ESOPHAGUS: ("32849002", "Esophagus", None), STOMACH: ("69695003", "Stomach", None),
    DUODENUM: ("38848004", "Duodenum", None), LEFT_KIDNEY: ("64033007", "Kidney", LEFT),
}


def name(label: int) -> str:
    return NAMES.get(int(label), f"label {int(label)}")


def tolerance_mm(label: int) -> float:
    """FLARE22's NSD tolerance for ``label``; 2 mm (the adrenals') for ids FLARE22 does not define."""
    return NSD_TOLERANCE_MM.get(int(label), 2.0)
