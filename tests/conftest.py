"""Shared fixtures: tiny seeded synthetic CT, the tiny test backbone, pydicom's bundled DICOM files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from embedcache.model import backbones
from embedcache.io.phantom import PhantomConfig, limit_target_slices, write_phantom

torch.set_num_threads(int(os.environ.get("EMBEDCACHE_TEST_THREADS", "2")))

#: Small phantom: 128² slices of 3.2 mm, the glands still a few voxels wide.
SMALL_PHANTOM = PhantomConfig(size=128, pixel_mm=3.2, slice_mm=2.5, extent_mm=60.0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return tiny.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pth")


@pytest.fixture
def tiny_model(tiny_checkpoint, monkeypatch) -> backbones.Backbone:
    """Registers the tiny backbone as model 'tiny' for one test."""
    backbone = tiny.tiny_backbone(tiny_checkpoint)
    monkeypatch.setitem(backbones.BACKBONES, "tiny", backbone)
    return backbone


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Three small synthetic cases in FLARE22 layout (read-only: copy before changing)."""
    out = tmp_path_factory.mktemp("phantom")
    write_phantom(out, cases=3, seed=7, config=SMALL_PHANTOM)
    return out


@pytest.fixture
def phantom_copy(phantom_dir, tmp_path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(phantom_dir, out)
    return out


def pydicom_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom does not ship {name}")
    return Path(path)


def pydicom_dir(relative: str) -> Path:
    root = Path(pydicom_file("CT_small.dcm")).parent
    path = root / relative
    if not path.is_dir():
        pytest.skip(f"pydicom does not ship {relative}")
    return path


@pytest.fixture
def series_dir(tmp_path) -> Path:
    """dicomdirtests' CT5N: 5 slices of 16² px whose InstanceNumber grows as z falls."""
    out = tmp_path / "CT5N"
    shutil.copytree(pydicom_dir("dicomdirtests/98892001/CT5N"), out)
    return out


def single_file_dir(tmp_path: Path, name: str) -> Path:
    out = tmp_path / Path(name).stem
    out.mkdir()
    shutil.copy(pydicom_file(name), out / name)
    return out


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory, tiny_checkpoint) -> Path:
    """A tiny-backbone cache of 3 cases × 2 slices: a training epoch takes seconds on 2 cores."""
    from embedcache.config import EncodeConfig
    from embedcache.cache.encode import encode
    from embedcache.io.datasets import discover_cases

    root = tmp_path_factory.mktemp("small_cache")
    write_phantom(root / "data", cases=3, seed=11, config=SMALL_PHANTOM)
    limit_target_slices(root / "data", per_case=2)
    previous = backbones.BACKBONES.get("tiny")
    backbones.BACKBONES["tiny"] = tiny.tiny_backbone(tiny_checkpoint)
    try:
        encode(discover_cases(root / "data"), root / "cache.h5", EncodeConfig(backbone="tiny", device="cpu"),
               progress=None, log=lambda m: None)
    finally:
        if previous is None:
            backbones.BACKBONES.pop("tiny")
    return root / "cache.h5"
