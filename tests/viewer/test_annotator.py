"""The annotate window driven as a person drives it (layers edited, buttons pressed): a box and two clicks give the
voxels predict --boxes writes for the same box and points; save writes them; "add to training" grows the cache and a
fine-tune trains on the new case; a refused step is one line in the status bar and changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from embedcache.config import PredictConfig
from embedcache.evaluation.protocols import box3d_from_label
from embedcache.io.datasets import discover_cases
from embedcache.io.volumes import read_geometry, read_label
from embedcache.model.clicks import corrective_click
from embedcache.segment.annotate import Annotation

from conftest import cli, file_corners

WAIT_MS = 120_000
# The annotate window's tests need napari (the napari extra) and a screen napari can draw on with OpenGL: the
# ``DISPLAY`` given, else an Xvfb of their own. Without them they are skipped, naming what is missing, except where
# ``EMBEDCACHE_REQUIRE_VIEWER=1`` (CI) asks that they run.
REQUIRED = os.environ.get("EMBEDCACHE_REQUIRE_VIEWER") == "1"


def _missing(why: str):
    if REQUIRED:
        pytest.fail(f"{why} (EMBEDCACHE_REQUIRE_VIEWER=1)")
    pytest.skip(why)


@pytest.fixture(scope="session")
def screen():
    """A display for Qt: the one given, else an Xvfb started for this test process."""
    for module in ("napari", "pytestqt"):
        try:
            __import__(module)
        except ImportError:
            _missing(f"{module} is not installed: pip install 'embedcache[napari]' pytest-qt")
    from embedcache.viewer.annotator import qt_without_opencv

    qt_without_opencv()  # an earlier test in this process may have imported OpenCV (RT Structure Sets)
    if os.environ.get("DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
        return os.environ["DISPLAY"]
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        _missing("no DISPLAY and no Xvfb to draw napari on: apt-get install xvfb (.ci/run lists the packages)")
    read, write = os.pipe()
    # Xvfb ends with this process (Linux's parent-death signal), not before: Qt ends a process whose X server goes
    server = subprocess.Popen([xvfb, "-displayfd", str(write), "-screen", "0", "1400x900x24", "-nolisten", "tcp"],
                              pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=_die_with_parent)
    os.close(write)
    with os.fdopen(read) as answer:
        number = answer.readline().strip()
    if not number:
        server.kill()
        _missing("Xvfb did not start")
    os.environ["DISPLAY"], os.environ["QT_QPA_PLATFORM"] = f":{number}", "xcb"
    return os.environ["DISPLAY"]


def _die_with_parent():
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@pytest.fixture
def viewer(screen, qtbot):
    import napari

    viewer = napari.Viewer(show=False)
    yield viewer
    viewer.close()



@pytest.fixture
def window(viewer, qtbot, phantom_dir, tiny_model, tmp_path):
    from embedcache.viewer.annotator import open_window

    case = discover_cases(phantom_dir)[0]
    image = tmp_path / "ct" / "MINE_0000.nii.gz"  # a name the small cache's phantom cases do not have
    image.parent.mkdir()
    shutil.copy(case.image, image)
    annotation = Annotation.open(image, PredictConfig(model="tiny", device="cpu"), cache=tmp_path / "cache.h5")
    _, widget = open_window(annotation, viewer=viewer, save_to=tmp_path / "saved.nii.gz")
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    yield case, image, widget
    widget.close()


def _corners(z, x0, y0, x1, y1) -> np.ndarray:
    """A rectangle on slice ``z`` as napari's Shapes layer takes one in 3-D: its four corners."""
    return np.array([[z, y0, x0], [z, y0, x1], [z, y1, x1], [z, y1, x0]], float)


def _settle(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)


def test_a_box_and_two_clicks_in_the_window_give_what_predict_boxes_writes(window, qtbot, tmp_path, small_cache):
    from qtpy.QtCore import Qt

    case, image, widget = window
    truth = read_label(case.label)
    gland = truth.array == 7
    box = box3d_from_label(gland, truth.spacing_mm, margin_mm=0.0, margin_slices=1)
    assert widget.label == 7
    widget.z0.setValue(box.z0)  # the box's ends first, as a person sets them with [ and ]
    widget.z1.setValue(box.z1)
    z = (box.z0 + box.z1) // 2
    x0, y0, x1, y1 = box.box
    widget.boxes[7].add_rectangles(_corners(z, x0 - 0.5, y0 - 0.5, x1 - 0.5, y1 - 0.5))  # a drawn rectangle
    _settle(qtbot, widget)
    assert widget.drawn_box(7) == pytest.approx(box.box)
    assert (widget.z0.value(), widget.z1.value()) == (box.z0, box.z1)
    np.testing.assert_array_equal(widget.result.data == 7, widget.annotation.predictions[7].mask)
    assert widget.result.data.any()

    clicks = []
    for _ in range(2):
        click = corrective_click(widget.annotation.predictions[7].mask, gland, truth.spacing_mm)
        widget.negative.setChecked(not click.positive)
        widget.clicks.add(np.array([[click.z, click.y, click.x]], float))
        _settle(qtbot, widget)
        clicks.append(click)
    assert widget.annotation.requests[7].clicks == tuple(clicks)
    assert list(widget.clicks.features["positive"]) == [c.positive for c in clicks]
    annotated = np.asarray(widget.result.data).copy()

    geometry = read_geometry(image)
    low, high = file_corners(geometry, box.z0, box.z1, box.box)
    points = [[*map(int, geometry.source_index([[c.x, c.y, c.z]])[0]), int(c.positive)] for c in clicks]
    (tmp_path / "b.json").write_text(json.dumps({"MINE": [{"label": 7, "box3d": [*map(int, low), *map(int, high)],
                                                               "points": points}]}))
    result = cli("predict", image, "--boxes", tmp_path / "b.json", "--out", tmp_path / "p", "--model", "tiny",
                 "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_label(tmp_path / "p" / "MINE.nii.gz").array, annotated)

    qtbot.mouseClick(widget.save_button, Qt.LeftButton)
    _settle(qtbot, widget)
    np.testing.assert_array_equal(read_label(tmp_path / "saved.nii.gz").array, annotated)

    qtbot.mouseClick(widget.add_button, Qt.LeftButton)
    _settle(qtbot, widget)
    assert "added" in widget.message, widget.message
    from embedcache.cache.store import open_cache

    with open_cache(tmp_path / "cache.h5") as cache:
        assert [c.name for c in cache.cases] == ["MINE", "MINE@7"]  # a new cache holds both views, as encode's
        new_rows = cache.cases[0].n_rows

    # the corrected case, appended to a cache of other cases, is trained on: every case of the cache but the
    # validation case is in the run's training set
    grown = tmp_path / "grown.h5"
    shutil.copy(small_cache, grown)
    widget.annotation.add_to_training(grown)
    with open_cache(grown) as cache:
        assert "MINE" in [c.name for c in cache.cases] and len(cache.cases) == 4
        assert cache.case("MINE").n_rows == new_rows
    others = [c.name for c in open_cache(small_cache).cases]
    (tmp_path / "split.json").write_text(json.dumps({"train": ["MINE", *others[1:]], "val": others[:1], "test": []}))
    run = tmp_path / "run"
    result = cli("finetune", grown, "--out", run, "--epochs", "1", "--batch-size", "2", "--split",
                 tmp_path / "split.json", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "MINE" in json.loads((run / "split.json").read_text())["train"]

    qtbot.mouseClick(widget.undo_button, Qt.LeftButton)  # the last click
    _settle(qtbot, widget)
    assert widget.annotation.requests[7].clicks == tuple(clicks[:1]) and len(widget.clicks.data) == 1


def test_a_refused_step_is_one_line_in_the_status_bar_and_the_window_goes_on(window, qtbot, notes):
    case, image, widget = window
    widget.clicks.add(np.array([[3, 10, 10]], float))  # a click before any box
    _settle(qtbot, widget)
    assert "has no box yet" in widget.message and "has no box yet" in widget.viewer.status
    assert len(widget.clicks.data) == 0 and not widget.result.data.any()  # nothing changed, the point is gone
    assert any("has no box yet" in line for line in notes)  # on stderr too
    widget.save()
    _settle(qtbot, widget)
    assert widget.message == "nothing to save yet: draw a box first"
    depth = widget.annotation.shape[0]
    widget.z0.setValue(depth - 1)
    widget.z1.setValue(depth - 1)
    widget.boxes[7].add_rectangles(_corners(depth - 1, 5, 5, 5, 5))  # a box of no size
    _settle(qtbot, widget)
    assert "inverted or empty" in widget.message
    assert widget.annotation.requests == {} and len(widget.boxes[7].data) == 0


def test_a_dicom_series_in_the_window_saves_an_rt_structure_set_and_a_seg(viewer, qtbot, tiny_model, tmp_path):
    """rt-utils brings OpenCV, whose own Qt must not meet the window's: the save runs inside the Qt process."""
    pytest.importorskip("rt_utils", reason="RT Structure Set output needs the dicom extra")
    from embedcache.io.dicom_out import read_seg
    from embedcache.io.labels import FLARE22
    from embedcache.viewer.annotator import open_window

    from conftest import pydicom_dir

    series = tmp_path / "CT5N_0000"
    shutil.copytree(pydicom_dir("dicomdirtests/98892001/CT5N"), series)
    annotation = Annotation.open(series, PredictConfig(model="tiny", device="cpu"))
    _, widget = open_window(annotation, viewer=viewer, save_to=tmp_path / "CT5N.rtstruct.dcm")
    try:
        z0, u = annotation.shape[0] // 2 - 1, annotation.shape[1] / 16  # the gland test_dicom_out draws
        widget.z0.setValue(z0)
        widget.z1.setValue(z0 + 2)
        widget.boxes[7].add_rectangles(_corners(z0 + 1, 2 * u - 0.5, 3 * u - 0.5, 8 * u - 0.5, 10 * u - 0.5))
        _settle(qtbot, widget)
        assert widget.result.data.any(), widget.message
        widget.save()
        _settle(qtbot, widget)
        widget.save_path.setText(str(tmp_path / "CT5N.seg.dcm"))
        widget.save()
        _settle(qtbot, widget)
        assert widget.message == f"saved {tmp_path / 'CT5N.seg.dcm'}", widget.message
        np.testing.assert_array_equal(read_seg(tmp_path / "CT5N.seg.dcm", read_geometry(series), label_map=FLARE22),
                                      widget.result.data)
        assert (tmp_path / "CT5N.rtstruct.dcm").stat().st_size > 0
    finally:
        widget.close()
