"""Shared fixtures: tiny seeded synthetic CT, the tiny test backbone, pydicom's bundled DICOM files."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from embedcache.model import backbones
from embedcache.synth.phantom import PhantomConfig, limit_target_slices, write_phantom

import tiny

# Two threads in one process; one in each of bin/test's worker processes (pytest-xdist), which share the cores. The
# CPU engines (ONNX Runtime, OpenVINO) and the processes a test starts follow OMP_NUM_THREADS (runtime/cpu.py):
# with two threads each, a worker's engine spun on the core the other worker was using.
TEST_THREADS = os.environ.get("EMBEDCACHE_TEST_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")
torch.set_num_threads(int(TEST_THREADS))
os.environ["OMP_NUM_THREADS"] = TEST_THREADS


@pytest.fixture(scope="session", autouse=True)
def engine_cache_folder(tmp_path_factory):
    """Exported encoders and --engine auto's measurements of this test session, never the user's cache folder.

    LiteMedSAM's ``--engine auto`` answers torch here, from a record this fixture writes where the measurement
    would keep its own: the measurement (two graph exports, three engines timed at one and two slices at once) took
    three minutes of the suite on a 2-core CPU, paid by whichever test first encoded with LiteMedSAM, and the tests
    that are not about engines were written against eager torch. tests/model/test_engines.py measures auto in its
    own cache folders (on the tiny backbone), and runs the graph engines by name."""
    from embedcache.io.files import file_sha256
    from embedcache.model.backbones import get_backbone, resolve_checkpoint

    previous = os.environ.get("EMBEDCACHE_CACHE")
    os.environ["EMBEDCACHE_CACHE"] = str(tmp_path_factory.mktemp("engine-cache"))
    backbone = get_backbone("litemedsam")
    auto_answers_torch(backbone, file_sha256(resolve_checkpoint(backbone, None)))
    yield Path(os.environ["EMBEDCACHE_CACHE"])
    if previous is None:
        os.environ.pop("EMBEDCACHE_CACHE", None)
    else:
        os.environ["EMBEDCACHE_CACHE"] = previous

#: Small phantom: 128² slices of 3.2 mm, the glands still a few voxels wide.
SMALL_PHANTOM = PhantomConfig(size=128, pixel_mm=3.2, slice_mm=2.5, extent_mm=60.0)


def auto_answers_torch(backbone, checkpoint_sha256: str) -> None:
    """``--engine auto`` on ``backbone`` with these weights answers torch in this session's cache folder, as a
    measurement would have recorded it: what auto chose (and when the suite paid for measuring it) then no longer
    depends on the machine the suite runs on."""
    import json

    from embedcache.model.engines import auto_record

    auto_record(backbone, checkpoint_sha256).write_text(json.dumps(
        {"backbone": backbone.name, "checkpoint_sha256": checkpoint_sha256, "chosen": "torch",
         "written_by": "tests/conftest.py"}) + "\n")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, engine_cache_folder) -> Path:
    """The tiny backbone's weights; its ``--engine auto`` answers torch, as LiteMedSAM's does (its measurement took
    9 s of the first tiny encode, and chose by machine). tests/model/test_engines.py measures auto in a cache folder
    of its own."""
    from embedcache.io.files import file_sha256

    path = tiny.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pth")
    auto_answers_torch(tiny.tiny_backbone(path), file_sha256(path))
    return path


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
    """A tiny-backbone cache of 3 cases × 2 slices, whole slices alone: a training epoch takes seconds on 2 cores."""
    from embedcache.cache.encode import encode
    from embedcache.config import EncodeConfig
    from embedcache.io.datasets import discover_cases

    root = tmp_path_factory.mktemp("small_cache")
    write_phantom(root / "data", cases=3, seed=11, config=SMALL_PHANTOM)
    limit_target_slices(root / "data", per_case=2)
    with tiny.registered(tiny_checkpoint):
        encode(discover_cases(root / "data"), root / "cache.h5", EncodeConfig(backbone="tiny", device="cpu", zoom_mm=0.0),
               progress=None)
    return root / "cache.h5"


@pytest.fixture(scope="session")
def small_zoom_cache(small_cache, tiny_checkpoint) -> Path:
    """small_cache's cases encoded with ``--zoom 10``: their whole slices and a case ``CASE@LABEL`` per gland."""
    from embedcache.cache.encode import encode
    from embedcache.config import EncodeConfig
    from embedcache.io.datasets import discover_cases

    out = small_cache.parent / "zoom.h5"
    with tiny.registered(tiny_checkpoint):
        encode(discover_cases(small_cache.parent / "data"), out,
               EncodeConfig(backbone="tiny", device="cpu", zoom_mm=10.0), progress=None)
    return out


@pytest.fixture
def data(phantom_dir, tmp_path) -> Path:
    """A copy of the small phantom with one target slice per case: encodes in seconds."""
    out = tmp_path / "data"
    shutil.copytree(phantom_dir, out)
    limit_target_slices(out, per_case=1)
    return out


def folder_state(folder: Path) -> dict:
    """Every file under ``folder``: its size and modification time (what a test that changed it would change)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_only(folder: Path) -> Iterator[Path]:
    """Yields ``folder`` to the session's tests and fails at the session's end if one of them changed it: the runs
    below are shared by every module (a run per module cost the suite a training each), so a test that writes into
    one must copy it first."""
    before = folder_state(folder)
    yield folder
    assert folder_state(folder) == before, f"a test changed the shared {folder}: copy it before changing it"


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, small_cache, tiny_checkpoint) -> Iterator[Path]:
    """A one-epoch run on the small cache, shared by the session (read-only: copy before changing)."""
    run = tmp_path_factory.mktemp("run") / "run"
    with tiny.registered(tiny_checkpoint):
        result = cli("finetune", small_cache, "--out", run, "--epochs", "1", "--batch-size", "2", "--val-fraction",
                     "0.34", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    yield from read_only(run)


@pytest.fixture(scope="session")
def refined_run(tmp_path_factory, small_cache, tiny_checkpoint) -> Iterator[Path]:
    """A one-epoch run on the small cache with a refinement head (finetune --refine-head) (read-only)."""
    run = tmp_path_factory.mktemp("refined-run") / "run"
    with tiny.registered(tiny_checkpoint):
        result = cli("finetune", small_cache, "--out", run, "--epochs", "1", "--batch-size", "2", "--val-fraction",
                     "0.34", "--device", "cpu", "--refine-head", "--no-progress")
    assert result.exit_code == 0, result.output
    yield from read_only(run)


@pytest.fixture(scope="session")
def zoom_run(tmp_path_factory, small_zoom_cache, run_dir, tiny_checkpoint) -> Iterator[Path]:
    """A one-epoch run on small_zoom_cache, on run_dir's split (which names the cases, not their glands): a decoder
    of the whole slices in the run folder, one of the glands' regions in its ``zoom`` (read-only)."""
    run = tmp_path_factory.mktemp("zoom-run") / "run"
    with tiny.registered(tiny_checkpoint):
        result = cli("finetune", small_zoom_cache, "--out", run, "--epochs", "1", "--batch-size", "2", "--split",
                     run_dir / "split.json", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    yield from read_only(run)


# ---------------------------------------------------------------------------------- the command line


def cli(*args):
    """``embedcache ARGS`` in this process (click's runner); every argument as a string."""
    from click.testing import CliRunner

    from embedcache.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def file_corners(geometry, z0, z1, box):
    """Canonical slices z0..z1 and pixel edges → the file's inclusive voxel corners, through the file's own layout."""
    mask = np.zeros(geometry.shape_zyx, bool)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    mask[z0 : z1 + 1, y0:y1, x0:x1] = True
    ijk = np.argwhere(geometry.to_source(mask))
    return ijk.min(axis=0), ijk.max(axis=0)


def export_graphs(backbone, folder: Path) -> Path:
    """``backbone``'s encoder and vanilla decoder exported as graphs into ``folder`` (ONNX Runtime's where it is
    installed, else OpenVINO's), as a graph engine's first run exports them."""
    import importlib.util

    from embedcache.model.backbones import load_backbone
    from embedcache.model.decoder import AllMasks
    from embedcache.model.engines import exported_decoder, exported_encoder

    engine = "onnxruntime" if importlib.util.find_spec("onnxruntime") else "openvino"
    parts, sha = load_backbone(backbone)
    exported_encoder(backbone, parts.image_encoder, sha, engine=engine, folder=folder)
    exported_decoder(backbone, AllMasks(parts.prompt_encoder, parts.mask_decoder), sha, "vanilla", engine=engine,
                     folder=folder)
    return folder


def one_line(result, *fragments, code: int = 1) -> str:
    """The result failed with ``code``, its last line the one error line (after any progress notes),
    holding every fragment; no traceback."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert result.exit_code == code, result.output
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (AssertionError, TypeError))
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def only_line_error(result, *fragments) -> None:
    """The result failed and printed exactly one line, the error, holding every fragment; no traceback."""
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------------- phase two


#: Keyword arguments that silence a library call's progress bars and notes.
QUIET = dict(progress=None)


class _Notes(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def notes():
    """What the ``embedcache`` logger says during the test (INFO and above): a list that fills as it speaks."""
    logger, handler = logging.getLogger("embedcache"), _Notes()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def finetune_config(cache, **changes):
    """A fine-tune of the small cache that takes seconds: 2 epochs of batch 2, one case in three validates."""
    from embedcache.config import FinetuneConfig

    base = dict(cache=str(cache), epochs=2, batch_size=2, val_fraction=0.34, device="cpu", lr=3e-4)
    return FinetuneConfig(**{**base, **changes})


def decoder_weights(path: Path) -> dict:
    """The mask decoder's state dict in a checkpoint file."""
    from embedcache.train.checkpoint import load_checkpoint

    return load_checkpoint(path).decoder


def small_batch(backbone, cache_path: Path, *, pixels: bool = False, resident: str = "device"):
    """The first three slices of the small cache as one training batch, and the prompt index they come from."""
    from embedcache.cache.store import open_cache
    from embedcache.train.data import case_sets

    with open_cache(cache_path) as cache:
        everything = case_sets(cache, {"all": [c.name for c in cache.cases]}, box_scale=backbone.box_scale(512),
                               device=torch.device("cpu"), resident=resident, pixels=pixels)["all"]
        batch = everything.batch(np.array([0, 1, 2]))
    return batch, everything.prompts
