"""Pictures of runs: training curves, per-class accuracy change on S, routing examples, boxes.

Figures are built as `matplotlib.figure.Figure` objects and rendered by Agg
when saved, never through pyplot: nothing here needs a display, and importing
this module leaves a notebook's own matplotlib backend alone. Each `*_figure`
function returns the figure, so a notebook can show it and `save` writes it.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

History = Mapping[str, Sequence[tuple[int, float]]]  # `jaxspec.train.history.read_history`'s result

# Panels of one phase's row: (title, y label, [(metric, legend label)], shown in %, y axis from 0).
PANELS = (
    ("loss", "cross-entropy", [("train_loss", "train batches")], False, False),
    ("accuracy", "top-1 (%)", [("train_accuracy", "train batches"), ("val_top1", "validation")], True, False),
    ("learning rate", "learning rate", [("train_learning_rate", "")], False, True),
)
# The detection job's (`jaxspec.detection.run`): YOLOv5's loss, validation F and mAP, learning rate.
DETECTION_PANELS = (
    ("loss", "box + objectness + class", [("train_loss", "train batches")], False, False),
    ("validation", "%", [("val_fitness", "F"), ("val_mAP50", "mAP@0.5"), ("val_mAP50_95", "mAP@0.5:0.95")], True, True),
    PANELS[2],
)
DRAWN_SCORE = 0.25  # detections drawn: those scoring at least this (YOLOv5 detect.py's default confidence)
MAX_NAMED_CLASSES = 40  # beyond this, class names on the axis are unreadable: bars are sorted instead


def phases(hist: History, panels=PANELS) -> list[str]:
    """Phases with a curve of `panels` in `hist` (`'generalist'`, `'specialist'`, ...), in the order logged."""
    wanted = {metric for _, _, series, _, _ in panels for metric, _ in series}
    out: list[str] = []
    for key in hist:
        phase, _, metric = key.rpartition("/")
        if phase and metric in wanted and hist[key] and phase not in out:
            out.append(phase)
    return out


def curves_figure(hist: History, names: Sequence[str], panels=PANELS) -> Figure:
    """One row per phase, one panel of `panels` each, vs step: by default training loss, accuracy
    (train batches and validation) and learning rate.

    A metric the phase did not log (validation off, say) leaves a note in its panel instead of a line.
    """
    if not names:
        raise ValueError("curves_figure needs at least one phase; `phases(hist)` lists those with curves")
    fig = Figure(figsize=(13, 2.7 * len(names) + 0.3), layout="constrained")
    axes = fig.subplots(len(names), len(panels), squeeze=False)
    for row, phase in zip(axes, names, strict=True):
        for ax, (title, ylabel, series, percent, from_zero) in zip(row, panels, strict=True):
            drawn = 0
            for metric, label in series:
                points = hist.get(f"{phase}/{metric}", ())
                if not points:
                    continue
                steps, values = np.asarray(points, np.float64).T
                ax.plot(
                    steps,
                    100 * values if percent else values,
                    marker="." if len(steps) < 30 else None,
                    label=label or None,
                )
                drawn += 1
            if drawn == 0:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", color="grey", transform=ax.transAxes)
            elif drawn > 1:
                ax.legend(fontsize=8)
            if drawn and from_zero:
                ax.set_ylim(bottom=0.0)
            ax.set_title(f"{phase}: {title}", fontsize=10)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    return fig


def class_change_figure(
    class_names: Sequence[str],
    before: Sequence[float],
    after: Mapping[str, Sequence[float]],
    *,
    title: str = "",
    metric: str = "top-1",
) -> Figure:
    """Bars of the per-class change of `metric` (points) of each model in `after` relative to `before`.

    `before` and every `after[name]` hold one accuracy in [0, 1] per class of
    `class_names` (NaN where the class has no test images: no bar). Up to
    `MAX_NAMED_CLASSES` classes keep their order and names; more are sorted by
    the first model's change.
    """
    before = np.asarray(before, np.float64)
    n = len(class_names)
    if before.shape != (n,):
        raise ValueError(f"{len(before)} 'before' accuracies for {n} class names")
    if not after:
        raise ValueError("class_change_figure needs at least one model in `after`")
    changes = {}
    for name, acc in after.items():
        acc = np.asarray(acc, np.float64)
        if acc.shape != (n,):
            raise ValueError(f"{len(acc)} accuracies of {name!r} for {n} class names")
        changes[name] = 100 * (acc - before)
    named = n <= MAX_NAMED_CLASSES
    first = next(iter(changes.values()))
    order = np.arange(n) if named else np.argsort(-np.nan_to_num(first, nan=-np.inf), kind="stable")
    width = 0.8 / len(changes)
    wide = min(16.0, max(6.0, 2.0 + 0.25 * n * (len(changes) + 1))) if named else 10.0
    fig = Figure(figsize=(wide, 4.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(n)
    for i, (name, change) in enumerate(changes.items()):
        ax.bar(
            x + (i - (len(changes) - 1) / 2) * width,
            change[order],
            width,
            label=f"{name} (mean {np.nanmean(change):+.2f})",
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    if named:
        ax.set_xticks(x, [class_names[c] for c in order], rotation=45, ha="right")
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"the {n} classes of S, sorted by the change of {next(iter(changes))!r}")
    ax.set_ylabel(f"change in {metric} (points)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def save(fig: Figure, path: str | pathlib.Path, *, dpi: int = 110) -> pathlib.Path:
    """Writes `fig` as an image (format from the suffix) and returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def routing_examples(labels, generalist_pred, final_pred, *, per_kind: int = 4, mask=None) -> dict[str, np.ndarray]:
    """Indices of up to `per_kind` examples of each outcome of routing, in order of appearance.

    Kinds: the specialist corrected the generalist, made it wrong, or neither
    (right either way, wrong either way). `mask` (an eval batch's) leaves out padding.
    """
    labels, gen, final = (np.asarray(a) for a in (labels, generalist_pred, final_pred))
    mask = np.ones(labels.shape, bool) if mask is None else np.asarray(mask, bool)
    if not labels.shape == gen.shape == final.shape == mask.shape:
        raise ValueError(
            f"labels {labels.shape}, generalist {gen.shape} and final {final.shape} predictions "
            f"and mask {mask.shape} differ in shape"
        )
    kinds = {
        "corrected by the specialist": (gen != labels) & (final == labels),
        "made wrong by the specialist": (gen == labels) & (final != labels),
        "right either way": (gen == labels) & (final == labels),
        "wrong either way": (gen != labels) & (final != labels),
    }
    return {kind: np.flatnonzero(hit & mask)[:per_kind] for kind, hit in kinds.items()}


def _show(ax, image) -> None:
    image = np.asarray(image)
    h, w = image.shape[:2]
    gray = image.ndim == 2 or image.shape[-1] == 1
    # extent puts pixel (r, c) on [c, c+1) x [r, r+1), the frame boxes are given in
    ax.imshow(
        image.reshape(h, w) if gray else image,
        cmap="gray" if gray else None,
        extent=(0, w, h, 0),
        vmin=0,
        vmax=255,
        interpolation="nearest",
    )
    ax.set_xticks([])
    ax.set_yticks([])


def routing_figure(
    images, labels, generalist_pred, final_pred, class_names: Sequence[str], *, per_kind: int = 4, mask=None
) -> Figure:
    """Example images per routing outcome (see `routing_examples`), titled with the true class,
    the generalist's pick and the routed system's final answer."""
    found = routing_examples(labels, generalist_pred, final_pred, per_kind=per_kind, mask=mask)
    picks = [(kind, idx) for kind, idx in found.items() if len(idx)]
    if not picks:
        raise ValueError("routing_figure got no examples")
    fig = Figure(figsize=(1.9 * per_kind, 2.5 * len(picks)), layout="constrained")
    for sub, (kind, idx) in zip(np.atleast_1d(fig.subfigures(len(picks), 1)), picks, strict=True):
        sub.suptitle(kind, fontsize=10, fontweight="bold")
        for j, ax in enumerate(sub.subplots(1, per_kind, squeeze=False)[0]):
            if j >= len(idx):
                ax.axis("off")
                continue
            i = idx[j]
            _show(ax, images[i])
            ax.set_title(
                f"true: {class_names[labels[i]]}\ngeneralist: {class_names[generalist_pred[i]]}\n"
                f"routed: {class_names[final_pred[i]]}",
                fontsize=7,
            )
    return fig


def per_image(
    found: Mapping[str, np.ndarray], image_ids: Sequence[int], *, min_score: float = 0.0, top: int | None = None
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Flat detections -> (boxes, labels, scores) per image of `image_ids`, the lists `boxes_figure` takes.

    `found` holds `image_id`, `boxes`, `labels` and `scores` of all images in one
    array each (as `jaxspec.detection.metrics.Evaluator.detections()` returns them);
    per image, detections scoring at least `min_score` are kept, best first, at most `top`.
    """
    image, scores = np.asarray(found["image_id"]), np.asarray(found["scores"], np.float64)
    boxes, labels = np.asarray(found["boxes"]).reshape(-1, 4), np.asarray(found["labels"])
    if not len(image) == len(scores) == len(boxes) == len(labels):
        raise ValueError(
            f"{len(image)} image ids, {len(scores)} scores, {len(boxes)} boxes and {len(labels)} labels "
            "differ in number"
        )
    out: tuple[list, list, list] = ([], [], [])
    for i in image_ids:
        hit = np.flatnonzero((image == i) & (scores >= min_score))
        hit = hit[np.argsort(-scores[hit], kind="stable")][:top]
        for part, values in zip(out, (boxes, labels, scores), strict=True):
            part.append(values[hit])
    return out


def boxes_figure(
    images,
    boxes,
    labels,
    class_names: Sequence[str],
    *,
    scores=None,
    cols: int = 4,
    titles: Sequence[str] | None = None,
) -> Figure:
    """Images with their boxes (xyxy pixels) named by class, and scores when given (detections).

    Per image i: `boxes[i]` [n_i, 4], `labels[i]` [n_i], `scores[i]` [n_i] (None: not a detection); one colour
    per class.
    """
    if not len(images) == len(boxes) == len(labels):
        raise ValueError(f"{len(images)} images, {len(boxes)} box sets and {len(labels)} label sets differ")
    rows = -(-len(images) // cols)
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = [colormaps["tab20"](c % 20) for c in range(len(class_names))]
    for i, ax in enumerate(axes):
        if i >= len(images):
            ax.axis("off")
            continue
        _show(ax, images[i])
        for k, ((x1, y1, x2, y2), c) in enumerate(zip(np.asarray(boxes[i]).reshape(-1, 4), labels[i], strict=True)):
            color = colors[int(c)]
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.2))
            text = class_names[int(c)] + (
                f" {scores[i][k]:.2f}" if scores is not None and scores[i] is not None else ""
            )
            ax.text(
                x1,
                y1,
                text,
                fontsize=6,
                color="black",
                va="bottom",
                bbox={"facecolor": color, "edgecolor": "none", "pad": 0.5, "alpha": 0.85},
            )
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    return fig


def truth_and_detections_figure(
    records: Sequence[Mapping[str, np.ndarray]],
    found: Mapping[str, np.ndarray],
    output_classes: Sequence[int],
    class_names: Sequence[str],
    *,
    min_score: float = DRAWN_SCORE,
    top: int = 10,
    pairs_per_row: int = 2,
) -> Figure:
    """Each record's ground truth (global labels) beside a detector's detections on it.

    `records` are the first images of the source `found` was collected on (image ids 0, 1, ...); detection
    labels are output positions, named through `output_classes`; detections scoring at least `min_score`
    are drawn, best first, at most `top` per image.
    """
    boxes, labels, scores = per_image(found, range(len(records)), min_score=min_score, top=top)
    to_global = np.asarray(output_classes, np.int64)
    images, all_boxes, all_labels, all_scores, titles = [], [], [], [], []
    for i, record in enumerate(records):
        images += [record["image"], record["image"]]
        all_boxes += [record["boxes"], boxes[i]]
        all_labels += [record["labels"], to_global[labels[i]]]
        all_scores += [None, scores[i]]
        titles += [f"scene {i}: ground truth", f"scene {i}: {len(boxes[i])} detections ≥ {min_score:g}"]
    return boxes_figure(
        images, all_boxes, all_labels, class_names, scores=all_scores, cols=2 * pairs_per_row, titles=titles
    )
