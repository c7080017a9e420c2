"""The report's pictures and page: Dice plot, learning curve, best and worst slices, ``index.html``.

Each function takes the :class:`~embedcache.evaluation.report.Report` it draws (``report``); the report module
writes through this one, never the other way round."""

from __future__ import annotations

import csv
import html
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedcache.cache.preprocess import window_hu
from embedcache.io.files import atomic_path

COLOURS = {"vanilla": "#d62728", "finetuned": "#e6b800", "zoomed": "#9467bd", "prediction": "#1f77b4"}
MODEL_NAMES = {"vanilla": "vanilla", "finetuned": "fine-tuned", "zoomed": "fine-tuned + zoom", "prediction": "prediction"}


@dataclass
class Overlay:
    """One slice to show: the CT (HU), the ground truth and each model's mask, the box the slice was given."""

    case: str
    label: int
    z: int
    protocol: str
    tag: str  # best | worst
    hu: np.ndarray  # (y, x)
    truth: np.ndarray  # (y, x) bool
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    box: tuple[float, float, float, float] | None = None
    dice: dict[str, float] = field(default_factory=dict)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def dice_plot(report, path: Path) -> Path:
    """One panel per protocol; per gland, one column of points (cases) per model with the mean as a bar."""
    plt = _pyplot()
    protocols, models, labels = list(report.cases), report.models, list(report.labels)
    fig, axes = plt.subplots(1, len(protocols), figsize=(3.2 * len(protocols) + 0.8, 3.6), sharey=True, squeeze=False)
    rng = np.random.default_rng(0)
    for ax, protocol in zip(axes[0], protocols):
        for g, label in enumerate(labels):
            for m, model in enumerate(models):
                x = g * (len(models) + 1) + m
                values = [by_label[label][model]["dice"] for by_label in report.cases[protocol].values()
                          if label in by_label and model in by_label[label]]  # older reports: no zoomed clicks
                if not values:
                    continue
                ax.scatter(x + rng.uniform(-0.15, 0.15, len(values)), values, s=14, color=COLOURS.get(model, "k"),
                           alpha=0.8, label=MODEL_NAMES.get(model, model) if g == 0 else None, zorder=3)
                ax.hlines(np.mean(values), x - 0.35, x + 0.35, color=COLOURS.get(model, "k"), linewidth=2.5, zorder=4)
        ax.set_xticks([g * (len(models) + 1) + (len(models) - 1) / 2 for g in range(len(labels))])
        ax.set_xticklabels([report.labels[label] for label in labels], fontsize=8)
        ax.set_title(protocol, fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("Dice (3-D, per case)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{report.case_set} cases: {len(next(iter(report.cases.values()), {}))}", fontsize=10)
    return _save(fig, path, dpi=110)


def clicks_plot(report, path: Path) -> Path:
    """One panel per gland: mean Dice (± sd over cases) after 0..N corrective clicks, one line per model."""
    plt = _pyplot()
    counts, labels = click_counts(report.summary), list(report.summary["clicks"])
    fig, axes = plt.subplots(1, len(labels), figsize=(3.6 * len(labels) + 0.6, 3.4), sharey=True, squeeze=False)
    for ax, label in zip(axes[0], labels):
        for model, values in report.summary["clicks"][label].items():
            mean = np.array([values[f"dice@{k}"]["mean"] for k in counts])
            sd = np.array([values[f"dice@{k}"]["sd"] for k in counts])
            colour = COLOURS.get(model, "k")
            ax.plot(counts, mean, "o-", color=colour, label=f"{MODEL_NAMES.get(model, model)} "
                    f"(AUC {values['dice_auc']['mean']:.3f})")
            ax.fill_between(counts, mean - sd, mean + sd, color=colour, alpha=0.15, linewidth=0)
        ax.set_title(report.labels[label], fontsize=10)
        ax.set_xlabel("corrective clicks after the 3-D box")
        ax.set_xticks(counts)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0][0].set_ylabel("Dice (3-D), mean ± sd over cases")
    n = len(report.cases["clicks"])
    fig.suptitle(f"clicks: {report.case_set} cases ({n})", fontsize=10)
    return _save(fig, path, dpi=110)


def _save(fig, path: Path, *, dpi: int) -> Path:
    """Write a figure as PNG, atomically, and free it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    _pyplot().close(fig)
    return path


def learning_curve(log_csv: Path, path: Path) -> Path | None:
    rows = list(csv.DictReader(open(log_csv)))
    if not rows:
        return None
    plt = _pyplot()
    epoch = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(epoch[1:], [float(r["train_loss"]) for r in rows[1:]], "o-", label="train loss", color="#1f77b4")
    ax.plot(epoch, [float(r["val_loss"]) for r in rows], "s--", label="validation loss", color="#7f7f7f")
    ax.set_xlabel("epoch (0: the vanilla decoder)")
    ax.set_ylabel("DiceCE loss")
    right = ax.twinx()
    right.plot(epoch, [float(r["val_dice"]) for r in rows], "^-", color="#2ca02c", label="validation Dice (2-D)")
    right.set_ylabel("validation Dice")
    right.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")
    ax.set_title(f"learning curve ({log_csv.parent.name})", fontsize=10)
    return _save(fig, path, dpi=110)


def overlay_png(o: Overlay, out_dir: Path) -> Path:
    """The CT around the gland, ground truth (green), each model's contour and the box (white, dashed)."""
    plt = _pyplot()
    height, width = o.hu.shape
    ys, xs = np.nonzero(o.truth | np.any([m for m in o.masks.values()], axis=0))
    x0, y0, x1, y1 = o.box if o.box is not None else (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    pad = max(x1 - x0, y1 - y0) * 0.75 + 4
    cx0, cy0 = int(max(0, min(x0, xs.min(initial=x0)) - pad)), int(max(0, min(y0, ys.min(initial=y0)) - pad))
    cx1, cy1 = int(min(width, max(x1, xs.max(initial=x1) + 1) + pad)), int(min(height, max(y1, ys.max(initial=y1) + 1) + pad))
    crop = (slice(cy0, cy1), slice(cx0, cx1))
    fig, ax = plt.subplots(figsize=(3.6, 3.9))
    ax.imshow(window_hu(o.hu[crop]), cmap="gray", vmin=0, vmax=1, interpolation="nearest",
              extent=(cx0, cx1, cy1, cy0))
    layers = [("ground truth", o.truth, "#00dc00")] + [
        (MODEL_NAMES.get(m, m), mask, COLOURS.get(m, "c")) for m, mask in o.masks.items()]
    for name, mask, colour in layers:
        if mask[crop].any():
            ax.contour(np.arange(cx0, cx1) + 0.5, np.arange(cy0, cy1) + 0.5, mask[crop].astype(float), levels=[0.5],
                       colors=[colour], linewidths=1.4)
        ax.plot([], [], color=colour, label=name)
    if o.box is not None:
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linestyle="--", linewidth=1))
    ax.set_xlim(cx0, cx1)
    ax.set_ylim(cy1, cy0)
    ax.axis("off")
    ax.legend(fontsize=6, loc="lower left", framealpha=0.6)
    # each model's name and Dice kept whole (no-break spaces), the line broken between models (score --zoom's third)
    dice = " · ".join(f"{MODEL_NAMES.get(m, m)} {v:.2f}".replace(" ", "\u00a0") for m, v in o.dice.items())
    lines = [f"{o.case} · slice {o.z} · {o.protocol}", f"label {o.label} ({o.tag})",
             *textwrap.wrap(f"Dice {dice}", 52, break_on_hyphens=False)]
    ax.set_title("\n".join(lines), fontsize=7)
    return _save(fig, out_dir / f"overlay-{o.tag}-label{o.label}-{o.case}-z{o.z}.png", dpi=120)


def _fmt(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f}"


def _clicks_table(report) -> str:
    """The clicks protocol's mean Dice after 0..N clicks and its AUC, per gland and model ('' without it)."""
    counts, e = click_counts(report.summary), html.escape
    if not counts:
        return ""
    head = "".join(f"<th>{k}</th>" for k in counts)
    rows = "".join(
        f"<tr><td>{e(report.labels[label])}</td><td>{e(MODEL_NAMES.get(model, model))}</td>"
        + "".join(f"<td>{values[f'dice@{k}']['mean']:.3f}</td>" for k in counts)
        + f"<td>{values['dice_auc']['mean']:.3f}</td></tr>"
        for label, by_model in report.summary["clicks"].items() for model, values in by_model.items()
    )
    return (f"<h3>clicks: Dice after each corrective click</h3><table><tr><th>gland</th><th>model</th>{head}"
            f"<th>AUC</th></tr>{rows}</table>")


def page(report, overlays: list[Overlay], pictures: list[Path]) -> str:
    models, e = report.models, html.escape
    blocks = []
    for protocol, by_label in report.summary.items():
        head = "".join(f"<th>{e(MODEL_NAMES.get(m, m))}</th>" for m in models)
        rows = []
        for label, by_model in by_label.items():
            for metric in ("dice", "nsd"):
                cells = "".join(f"<td>{_fmt(by_model[m][metric])}</td>" if m in by_model else "<td></td>" for m in models)
                diff = ""
                if len(models) == 2 and all(m in by_model for m in models):
                    diff = f"{by_model[models[1]][metric]['mean'] - by_model[models[0]][metric]['mean']:+.3f}"
                rows.append(f"<tr><td>{e(report.labels[label])}</td><td>{metric}</td>{cells}<td>{diff}</td></tr>")
        description = e(report.prompts.get(protocol, ""))
        blocks.append(f"<h3>{e(protocol)}</h3><p>{description}</p><table><tr><th>gland</th><th>metric</th>{head}"
                      f"<th>difference</th></tr>{''.join(rows)}</table>")
    clicks = _clicks_table(report)
    case_rows = []
    for protocol, by_case in report.cases.items():
        for case, by_label in by_case.items():
            for label, by_model in by_label.items():
                cells = "".join(f"<td>{by_model[m]['dice']:.3f}</td><td>{by_model[m]['nsd']:.3f}</td>"
                                if m in by_model else "<td></td><td></td>" for m in models)
                case_rows.append(f"<tr><td>{e(protocol)}</td><td>{e(case)}</td><td>{e(report.labels[label])}</td>{cells}</tr>")
    case_head = "".join(f"<th>{e(MODEL_NAMES.get(m, m))} Dice</th><th>{e(MODEL_NAMES.get(m, m))} NSD</th>" for m in models)
    figures = "".join(f'<figure class="{e(key)}"><img src="{e(name)}" alt="{e(key)}"></figure>'
                      for key, name in report.figures.items())
    shots = "".join(
        f'<figure><img src="{e(p.name)}" alt="{e(p.stem)}"><figcaption>{e(o.case)}, slice {o.z}, label {o.label} '
        f'({e(o.tag)}, {e(o.protocol)}): Dice ' + ", ".join(f"{e(MODEL_NAMES.get(m, m))} {v:.3f}" for m, v in o.dice.items())
        + "</figcaption></figure>"
        for o, p in zip(overlays, pictures)
    )
    errors = "".join(f"<li>{e(case)}: {e(msg)}</li>" for case, msg in (report.errors or {}).items())
    facts = "".join(f"<li><b>{e(k)}</b>: {e(str(v))}</li>" for k, v in report.made_by.items())
    tolerance = ", ".join(f"{e(report.labels[k])} {v:g} mm" for k, v in report.nsd_tolerance_mm.items())
    names = f" Label names from {e(report.label_map)}." if report.label_map else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>embedcache {e(report.kind)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin-bottom:1em}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
figure{{display:inline-block;margin:6px;vertical-align:top}}img{{max-width:560px}}figcaption{{font-size:12px;max-width:420px}}
figure.dice{{display:block}}figure.dice img{{max-width:100%}}
.note{{background:#fff6d5;padding:6px 10px;border-left:4px solid #e6b800}}</style></head><body>
<h1>embedcache {e(report.kind)}</h1>
<p class="note"><b>{e(report.case_set)} cases</b> ({len(report.case_names)}): {e(report.case_set_note)}</p>
<ul>{facts}</ul>
<p>Dice and NSD are 3-D, per case and gland, on the label volume's voxels (FLARE22 rules: both empty 1, one empty 0);
NSD tolerance: {tolerance}. Mean ± sd over cases.{names}</p>
<h2>Summary</h2>{''.join(blocks)}{clicks}
<h2>Plots</h2>{figures}
<h2>Per case</h2><table><tr><th>prompts</th><th>case</th><th>gland</th>{case_head}</tr>{''.join(case_rows)}</table>
{f'<h2>Not scored</h2><ul>{errors}</ul>' if errors else ''}
<h2>Best and worst slices</h2><p>Contours: ground truth green, vanilla red, fine-tuned yellow; the slice's box white, dashed.</p>
{shots}</body></html>
"""


def click_counts(summary: dict) -> list[int]:
    """The click counts 0..N a summary holds ``dice@k`` for (the ``clicks`` protocol's); [] without it."""
    metrics = {m for by_model in summary.get("clicks", {}).values() for values in by_model.values() for m in values}
    return sorted(int(m.split("@")[1]) for m in metrics if m.startswith("dice@"))
