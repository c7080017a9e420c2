"""Dataset layouts: FLARE22 / nnU-Net folders of images and labels, and the case each pair makes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from embedcache.errors import EmbedcacheError
from embedcache.io.nifti import is_nifti, nifti_stem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseSource:
    """One case: a CT image (NIfTI file or DICOM series folder) and its label volume.

    ``subset`` is ``test`` for cases of a test folder (``imagesTs/``), else ``train`` (training or
    validation, as the fine-tune's split decides). ``gland``: the one target label whose zoomed region
    this case is (``encode --zoom``, :mod:`embedcache.cache.regions`), named ``CASE@LABEL``."""

    name: str
    image: Path
    label: Path
    series_uid: str | None = None
    subset: str = "train"
    gland: int | None = None



def case_name(path: Path) -> str:
    """FLARE22 case name of an image file or DICOM folder: ``CASE_0000.nii.gz`` and ``CASE_0000/`` → ``CASE``."""
    path = Path(path)
    stem = path.name if path.is_dir() else nifti_stem(path)
    return stem[: -len("_0000")] if stem.endswith("_0000") else stem



_LAYOUTS = (("imagesTr", "labelsTr", "train"), ("images", "labels", "train"), ("imagesTs", "labelsTs", "test"))


def discover_cases(root: Path) -> list[CaseSource]:
    """Find (image, label) pairs in a FLARE22-style folder.

    Layouts: ``images/`` + ``labels/``, ``imagesTr/`` + ``labelsTr/`` (training and validation
    cases) and ``imagesTs/`` + ``labelsTs/`` (test cases, as nnU-Net lays them out). An image
    ``CASE_0000.nii.gz`` (or a DICOM series folder ``CASE_0000/`` or ``CASE/``) pairs with the label
    ``CASE.nii.gz``. Images without a label are skipped with a warning.
    """
    root = Path(root)
    if not root.is_dir():
        raise EmbedcacheError(f"{root}: no such folder; give a dataset folder or --image/--label pairs")
    cases: list[CaseSource] = []
    found_layout = False
    for images_name, labels_name, subset in _LAYOUTS:
        images, labels = root / images_name, root / labels_name
        if not (images.is_dir() and labels.is_dir()):
            continue
        found_layout = True
        label_by_case = {nifti_stem(p): p for p in labels.iterdir() if is_nifti(p)}
        for image in sorted(images.iterdir()):
            if not (image.is_dir() or is_nifti(image)):
                continue
            case = case_name(image)
            label = label_by_case.get(case)
            if label is None:
                logger.warning(f"{image}: no label {case}.nii.gz in {labels}; case skipped")
                continue
            cases.append(CaseSource(name=case, image=image, label=label, subset=subset))
    if not found_layout:
        if root.name in {name for layout in _LAYOUTS for name in layout[:2]}:
            raise EmbedcacheError(f"{root}: an images or labels folder itself; give the folder that holds it "
                                  f"({root.resolve().parent})")
        raise EmbedcacheError(
            f"{root}: no images/ + labels/ (or imagesTr/ + labelsTr/) folders; lay the data out as FLARE22 does"
        )
    if not cases:
        raise EmbedcacheError(f"{root}: no image has a matching label; expected CASE_0000.nii.gz ↔ CASE.nii.gz")
    names = [c.name for c in cases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EmbedcacheError(f"{root}: case {dupes[0]} appears in more than one images folder; keep one copy")
    return cases
