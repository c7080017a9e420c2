"""The README's picture of the annotate window (docs/img/annotate.png): a box per gland and a corrective click on a
realistic-anatomy case (CT painted around a FLARE22 label map, as ``phantom --anatomy`` paints), under Xvfb.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/annotate_screenshot.py \
        LABELS.nii.gz docs/img/annotate.png WORK [RUN_DIR]

WORK keeps the painted CT (``LABEL_0000.nii.gz``, painted with seed 99 unless it is there already); RUN_DIR: the
decoder (none: vanilla LiteMedSAM). Prints each gland's Dice against the label map after the box and the click."""
import sys
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from embedcache.config import PredictConfig
from embedcache.evaluation.protocols import box3d_from_label
from embedcache.io.nifti import write_nifti
from embedcache.io.volumes import read_label
from embedcache.segment.annotate import Annotation
from embedcache.synth.anatomy import paint_ct
from embedcache.viewer.annotator import open_window

labels, out, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
run = sys.argv[4] if len(sys.argv) > 4 else None
volume = read_label(labels)
image = work / (labels.name.replace(".nii.gz", "_0000.nii.gz"))
if not image.exists():
    write_nifti(paint_ct(volume.array, volume.spacing_mm, seed=99), volume.geometry, image)
annotation = Annotation.open(image, PredictConfig(device="cpu", run=run))
viewer = napari.Viewer(title="embedcache annotate", show=True)
viewer.window._qt_window.resize(1500, 900)
viewer, widget = open_window(annotation, viewer=viewer)
app = QApplication.instance()

def settle():
    while widget.busy:
        app.processEvents(); time.sleep(0.05)
    for _ in range(20):
        app.processEvents(); time.sleep(0.02)

for label in (7, 8):
    gland = volume.array == label
    box = box3d_from_label(gland, volume.spacing_mm, margin_mm=3.0, margin_slices=1)
    widget.gland.setCurrentIndex(widget.gland.findData(label))
    widget.z0.setValue(box.z0); widget.z1.setValue(box.z1)
    zs = np.flatnonzero(gland.any(axis=(1, 2)))
    z = int(zs[len(zs) // 2])
    x0, y0, x1, y1 = box.box
    widget.boxes[label].add_rectangles(np.array([[z, y0-.5, x0-.5], [z, y0-.5, x1-.5], [z, y1-.5, x1-.5], [z, y1-.5, x0-.5]]))
    settle()
from embedcache.model.clicks import corrective_click

gland = volume.array == 7
widget.gland.setCurrentIndex(widget.gland.findData(7))
click = corrective_click(annotation.predictions[7].mask, gland, volume.spacing_mm)
if click is not None:  # the first corrective click on the right gland, where a person would put it
    widget.negative.setChecked(not click.positive)
    widget.clicks.add(np.array([[click.z, click.y, click.x]], float))
    settle()
zs = np.flatnonzero(gland.any(axis=(1, 2)))
z = widget.drawn_on[7]  # the slice the box was drawn on, where its rectangle shows
widget.go_to(z)
both = (volume.array == 7) | (volume.array == 8)
ys, xs = np.nonzero(both.any(axis=0))
sp = volume.spacing_mm
viewer.camera.center = (z * sp[0], (ys.mean()) * sp[1], xs.mean() * sp[2])
viewer.camera.zoom = 4.0
viewer.layers.selection.active = widget.boxes[7]
settle()
from embedcache.evaluation.metrics import dice

for label in (7, 8):
    print(label, "dice", round(float(dice(annotation.predictions[label].mask, volume.array == label)), 3))
img = viewer.screenshot(canvas_only=False, flash=False)
import imageio.v3 as iio

iio.imwrite(out, img)
print(out, img.shape)
widget.close(); viewer.close()
