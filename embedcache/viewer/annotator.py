"""The annotate window: the CT in the mediastinal window, a Shapes layer per gland for its box, a Points layer for
clicks, a Labels layer with the result, and a dock widget (gland, box slices, run, accept slice, undo, save, add to
training, the slices to look at, progress).

Every step runs on one worker thread, in order, through an :class:`~embedcache.segment.annotate.Annotation`: the
window never waits for an encode or a decode. Between steps the worker encodes ahead of the person, one slice at a
time, nearest the slice they look at first (and a box's slices once there is one), so a person's step waits for one
slice's encode at most. A refused step is one line in the status bar (and on stderr); nothing changes.

Coordinates: the layers hold the canonical volume's voxel indices ``(z, y, x)`` and are scaled by its spacing, so the
anatomy looks as it is; a pixel ``i`` of a layer spans ``i - 0.5 .. i + 0.5`` where the core's boxes have pixel
edges ``i .. i + 1``.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import napari
import numpy as np
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from embedcache.errors import EmbedcacheError
from embedcache.segment.annotate import Annotation

logger = logging.getLogger(__name__)

#: Slices on each side of the one a person looks at that the worker encodes ahead while it is idle.
AHEAD = 8
#: A new box spans this far above and below the slice it was drawn on (mm) until the person sets its ends.
BOX_REACH_MM = 20.0
POSITIVE, NEGATIVE = "#2ecc40", "#ff4136"


class _Results(QObject):
    """Carries a worker's result back to the window's thread (a queued signal)."""

    done = Signal(object)


class Worker:
    """One thread that runs the annotation's steps in order, and encodes ahead between them."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="embedcache-annotate")
        self._results = _Results()
        self._results.done.connect(lambda call: call())
        self.pending = 0  # steps submitted and not yet handed back
        self.closed = False

    def submit(self, work, then, failed) -> None:
        """Run ``work()`` on the worker; ``then(result)`` or ``failed(error)`` in the window's thread after (nothing
        once the window closes)."""
        if self.closed:
            return
        self.pending += 1

        def run():
            try:
                result = work()
            except EmbedcacheError as exc:
                self._results.done.emit(lambda error=exc: self._finish(failed, error))
            except Exception as exc:  # a bug, not bad input: its traceback on stderr, and the window goes on
                logger.exception("annotate: a step failed")
                self._results.done.emit(lambda error=exc: self._finish(failed, f"a step failed ({error!r}); "
                                                                               "see the terminal"))
            else:
                self._results.done.emit(lambda: self._finish(then, result))

        self._pool.submit(run)

    def _finish(self, call, value) -> None:
        self.pending -= 1
        call(value)

    def close(self) -> None:
        self.closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)


class AnnotateWidget(QWidget):
    """The dock widget and the layers it keeps in step with an :class:`Annotation`."""

    def __init__(self, viewer: napari.Viewer, annotation: Annotation, *, save_to: Path | None = None):
        super().__init__()
        self.viewer, self.annotation = viewer, annotation
        self.worker = Worker()
        self._syncing = False
        self._ahead_running = False
        self.message = ""
        a = annotation
        spacing = tuple(float(s) for s in a.image.geometry.spacing_mm)
        self.spacing = spacing
        pre = a.model.preprocess
        low, high = pre.window_level_hu - pre.window_width_hu / 2, pre.window_level_hu + pre.window_width_hu / 2
        self.image = viewer.add_image(a.image.array, name=f"CT {a.name}", scale=spacing, contrast_limits=(low, high),
                                      colormap="gray")
        self.result = viewer.add_labels(np.zeros(a.shape, np.uint8), name="result", scale=spacing, opacity=0.6)
        self.boxes = {}
        for label in a.allowed:
            layer = viewer.add_shapes(name=f"box: {a.label_map.name(label)} ({label})", ndim=3, scale=spacing,
                                      edge_color="yellow", face_color="transparent", edge_width=1)
            layer.events.data.connect(lambda event, label=label: self._box_drawn(label, event))
            self.boxes[label] = layer
        self.clicks = viewer.add_points(ndim=3, name="clicks", scale=spacing, size=4,
                                        features={"positive": np.zeros(0, bool), "label": np.zeros(0, int)})
        self.clicks.feature_defaults = {"positive": True, "label": 0}
        self.clicks.current_face_color = POSITIVE
        self.clicks.events.data.connect(self._clicked)
        self.drawn_on: dict[int, int] = {}  # per gland, the slice its rectangle was drawn on

        self.gland = QComboBox()
        for label in a.allowed:
            self.gland.addItem(f"{a.label_map.name(label)} ({label})", label)
        self.gland.currentIndexChanged.connect(self._gland_changed)
        self.z0, self.z1 = QSpinBox(), QSpinBox()
        for box in (self.z0, self.z1):
            box.setRange(0, a.shape[0] - 1)
        self.negative = QCheckBox("negative click (n)")
        self.negative.toggled.connect(self._negative_toggled)
        self.run_button = QPushButton("run box")
        self.run_button.clicked.connect(self.run_box)
        self.accept_button = QPushButton("accept slice")
        self.accept_button.setToolTip("take this slice of the result, as painted, for the gland")
        self.accept_button.clicked.connect(self.accept_slice)
        self.undo_button = QPushButton("undo")
        self.undo_button.clicked.connect(self.undo)
        self.save_path = QLineEdit(str(save_to or Path.cwd() / f"{a.name}.nii.gz"))
        self.save_button = QPushButton("save")
        self.save_button.clicked.connect(self.save)
        self.add_button = QPushButton("add to training")
        self.add_button.setEnabled(a.cache is not None)
        self.add_button.setToolTip(f"append the case to {a.cache}" if a.cache else "open with --cache CACHE.h5 first")
        self.add_button.clicked.connect(self.add_to_training)
        self.look = QListWidget()
        self.look.itemClicked.connect(lambda item: self.go_to(int(item.data(256))))
        self.progress = QProgressBar()
        self.progress.setFormat("%v of %m slices encoded nearby")
        self.status = QLabel("draw a box around the gland on any slice")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("gland", self.gland)
        ends = QHBoxLayout()
        ends.addWidget(self.z0)
        ends.addWidget(QLabel("to"))
        ends.addWidget(self.z1)
        form.addRow("box slices ([ ])", ends)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        for row in ((self.run_button, self.accept_button, self.undo_button), (self.negative,)):
            line = QHBoxLayout()
            for widget in row:
                line.addWidget(widget)
            layout.addLayout(line)
        save = QHBoxLayout()
        save.addWidget(self.save_path)
        save.addWidget(self.save_button)
        layout.addLayout(save)
        layout.addWidget(self.add_button)
        layout.addWidget(QLabel("look at (predicted IoU below --review-iou):"))
        layout.addWidget(self.look)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)

        viewer.bind_key("[", lambda _: self.z0.setValue(self.current_slice()), overwrite=True)
        viewer.bind_key("]", lambda _: self.z1.setValue(self.current_slice()), overwrite=True)
        viewer.bind_key("n", lambda _: self.negative.toggle(), overwrite=True)
        viewer.dims.events.current_step.connect(lambda _: self.encode_ahead())
        self._gland_changed()
        self.go_to(a.shape[0] // 2)
        viewer.layers.selection.active = self.boxes[self.label]
        self.boxes[self.label].mode = "add_rectangle"

    # -- state ----------------------------------------------------------------------------------------------------

    @property
    def label(self) -> int:
        return int(self.gland.currentData())

    @property
    def busy(self) -> bool:
        """A step or an encode ahead is still running."""
        return self.worker.pending > 0

    def _gland(self, label: int) -> str:
        return self.annotation.label_map.name(label)

    def current_slice(self) -> int:
        return int(round(self.viewer.dims.point[0] / self.spacing[0]))

    def go_to(self, z: int) -> None:
        step = list(self.viewer.dims.current_step)
        step[0] = int(z)
        self.viewer.dims.current_step = tuple(step)

    def say(self, text: str, *, error: bool = False) -> None:
        """One line in the dock and the status bar (errors on stderr too)."""
        self.message = text
        self.status.setText(text)
        self.viewer.status = text
        if error:
            logger.error(text)

    def _negative_toggled(self, negative: bool) -> None:
        """The kind of the clicks to come (napari gives a new point the layer's defaults; a selected point's colour
        would change too, so none is selected: a click already given keeps its kind)."""
        self.clicks.selected_data = set()
        self.clicks.feature_defaults = {"positive": not negative, "label": self.label}
        self.clicks.current_face_color = NEGATIVE if negative else POSITIVE

    # -- steps ----------------------------------------------------------------------------------------------------

    def _box_drawn(self, label: int, event) -> None:
        if self._syncing or getattr(event, "action", "added") != "added":
            return
        layer = self.boxes[label]
        if not len(layer.data):
            return
        corners = np.asarray(layer.data[-1], float)
        z = int(round(corners[:, 0].mean()))
        self.drawn_on[label] = z
        if self.label != label:
            self.gland.setCurrentIndex(self.gland.findData(label))
        reach = int(round(BOX_REACH_MM / self.spacing[0]))
        if not self.z0.value() <= z <= self.z1.value() or self.z0.value() == self.z1.value():  # ends not set for it
            self.z0.setValue(max(0, z - reach))
            self.z1.setValue(min(self.annotation.shape[0] - 1, z + reach))
        self.run_box()

    def drawn_box(self, label: int):
        """The in-plane box of ``label``'s newest rectangle, as pixel edges ``(x0, y0, x1, y1)`` (None: none)."""
        layer = self.boxes[label]
        if not len(layer.data):
            return None
        corners = np.asarray(layer.data[-1], float)
        (y0, x0), (y1, x1) = corners[:, 1:].min(axis=0) + 0.5, corners[:, 1:].max(axis=0) + 0.5
        return (x0, y0, x1, y1)

    def run_box(self) -> None:
        label, xyxy = self.label, self.drawn_box(self.label)
        if xyxy is None:
            self.say("draw a box around the gland first", error=True)
            return
        z0, z1 = self.z0.value(), self.z1.value()
        self.say(f"segmenting {self.annotation.label_map.name(label)} in slices {z0}..{z1}…")
        self._run(lambda: self.annotation.box(label, z0, z1, xyxy), f"{self._gland(label)}: box of slices {z0}..{z1}")

    def _clicked(self, event) -> None:
        if self._syncing or getattr(event, "action", "added") != "added" or not len(self.clicks.data):
            return
        z, y, x = (int(round(v)) for v in self.clicks.data[-1])
        positive = bool(self.clicks.features["positive"].iloc[-1])
        self.clicks.features.loc[self.clicks.features.index[-1], "label"] = self.label
        label = self.label
        self._run(lambda: self.annotation.click(label, z, y, x, positive=positive),
                  f"{self._gland(label)}: {'positive' if positive else 'negative'} click on slice {z}")

    def accept_slice(self) -> None:
        z, label = self.current_slice(), self.label
        mask = np.asarray(self.result.data[z]) == label
        self._run(lambda: self.annotation.accept(label, z, mask), f"{self._gland(label)}: slice {z} accepted")

    def undo(self) -> None:
        self._run(self.annotation.undo, "undone")

    def save(self) -> None:
        path = Path(self.save_path.text()).expanduser()
        self.worker.submit(lambda: self.annotation.save(path), lambda saved: self.say(f"saved {saved}"),
                           self._refused)

    def add_to_training(self) -> None:
        def added(done) -> None:
            self.say(f"{'replaced' if done.replaced else 'added'} {done.case} ({done.rows} slices, {done.encoded} of "
                     f"them encoded for it) in {done.cache}, labels in {done.labels}; train on it: embedcache "
                     f"finetune {done.cache} --out RUN2 --from RUN")

        self.say("adding the case to the cache…")
        self.worker.submit(self.annotation.add_to_training, added, self._refused)

    def _run(self, step, what: str) -> None:
        """A step on the worker; the layers follow the core's state after it, whatever it did."""
        def done(_):
            self.sync()
            self.say(what)
            self.encode_ahead()

        def refused(error):
            self.sync()
            self._refused(error)

        self.worker.submit(step, done, refused)

    def _refused(self, error) -> None:
        self.say(str(error), error=True)

    # -- the layers follow the core -------------------------------------------------------------------------------

    def sync(self) -> None:
        """Result, boxes and clicks as the annotation holds them now (after a step, an undo or a refusal)."""
        a = self.annotation
        self._syncing = True
        try:
            self.result.data = a.labels()
            for label, layer in self.boxes.items():
                request = a.requests.get(label)
                layer.data = [] if request is None else [_rectangle(request.box, self.drawn_on.get(label))]
                if len(layer.data):
                    layer.edge_color = "yellow"
            clicks = [(c, label) for label, request in a.requests.items() for c in request.clicks]
            self.clicks.data = np.array([[c.z, c.y, c.x] for c, _ in clicks], float).reshape(-1, 3)
            self.clicks.features = {"positive": np.array([c.positive for c, _ in clicks], bool),
                                    "label": np.array([label for _, label in clicks], int)}
            if clicks:
                self.clicks.face_color = [POSITIVE if c.positive else NEGATIVE for c, _ in clicks]
            self._negative_toggled(self.negative.isChecked())  # new features reset the defaults a new point takes
        finally:
            self._syncing = False
        request = a.requests.get(self.label)
        if request is not None:
            self.z0.setValue(request.box.z0)
            self.z1.setValue(request.box.z1)
        self._show_look_at()

    def _gland_changed(self, *_) -> None:
        request = self.annotation.requests.get(self.label)
        # the gland's own box ends, or none set yet (a box drawn next spans BOX_REACH_MM around its slice)
        self.z0.setValue(request.box.z0 if request is not None else 0)
        self.z1.setValue(request.box.z1 if request is not None else 0)
        if self.label in self.boxes:
            self.viewer.layers.selection.active = self.boxes[self.label]
        self._show_look_at()

    def _show_look_at(self) -> None:
        self.look.clear()
        for z, iou in self.annotation.look_at(self.label):
            self.look.addItem(f"slice {z}: predicted IoU {iou:.2f}")
            self.look.item(self.look.count() - 1).setData(256, int(z))

    # -- encoding ahead -------------------------------------------------------------------------------------------

    def ahead_of(self) -> list[int]:
        """The slices to encode next, nearest first: the box's of the current gland, then around the current one."""
        depth = self.annotation.shape[0]
        z = self.current_slice()
        order = [z + d for k in range(AHEAD + 1) for d in ((k, -k) if k else (0,))]
        request = self.annotation.requests.get(self.label)
        if request is not None:
            order = list(range(request.box.z0, request.box.z1 + 1)) + order
        done = self.annotation.encoded()
        return [s for s in dict.fromkeys(order) if 0 <= s < depth and s not in done]

    def encode_ahead(self) -> None:
        """Encode the next slice ahead on the worker, and the next after it, until none is left or a step waits."""
        if self._ahead_running:
            return
        todo = self.ahead_of()
        wanted = AHEAD * 2 + 1
        self.progress.setRange(0, wanted)
        self.progress.setValue(max(0, wanted - len(todo)))
        if not todo or self.worker.pending:
            return
        self._ahead_running = True

        def next_one(_):
            self._ahead_running = False
            self.encode_ahead()

        def failed(error):
            self._ahead_running = False
            self._refused(error)

        self.worker.submit(lambda: self.annotation.encode(todo[:1]), next_one, failed)

    def close(self) -> None:
        self.worker.close()
        self.annotation.close()
        super().close()


def _rectangle(box, z: int | None) -> np.ndarray:
    """A core box's rectangle on slice ``z`` (None, or outside the box: its middle slice), as a Shapes layer's
    corners (pixel centres)."""
    x0, y0, x1, y1 = box.box
    z = z if z is not None and box.z0 <= z <= box.z1 else (box.z0 + box.z1) // 2
    return np.array([[z, y0 - 0.5, x0 - 0.5], [z, y0 - 0.5, x1 - 0.5], [z, y1 - 0.5, x1 - 0.5],
                     [z, y1 - 0.5, x0 - 0.5]], float)


def qt_without_opencv() -> None:
    """Forget the Qt plugin and font folders OpenCV points Qt to when it is imported (rt-utils, for RT Structure
    Sets, imports it): Qt would load OpenCV's own xcb plugin, which fails beside PyQt's, and end the process."""
    for name in ("QT_QPA_PLATFORM_PLUGIN_PATH", "QT_QPA_FONTDIR"):
        if "cv2" in Path(os.environ.get(name, "")).parts:
            del os.environ[name]


def open_window(annotation: Annotation, *, viewer: napari.Viewer | None = None,
                save_to: Path | None = None) -> tuple[napari.Viewer, AnnotateWidget]:
    """A napari viewer (a new one unless given) with the annotate layers and dock."""
    qt_without_opencv()
    viewer = viewer or napari.Viewer(title=f"embedcache annotate: {annotation.name}")
    widget = AnnotateWidget(viewer, annotation, save_to=save_to)
    viewer.window.add_dock_widget(widget, name="embedcache", area="right")
    return viewer, widget
