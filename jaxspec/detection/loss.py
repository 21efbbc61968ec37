"""YOLOv5's training loss (ultralytics `utils/loss.py`, `ComputeLoss`), jittable.

Every image carries a fixed number M of target rows so shapes stay static:
`targets [B, M, 5]` rows are (class, x, y, w, h) with the box centre and size
normalized by the image width and height (YOLOv5's label format, so the loss
needs no image size), and `mask [B, M]` is True for real boxes; padded rows
are ignored whatever they hold.

Each target is matched to every anchor whose width and height ratios to the
box stay below `anchor_t` (the same box may train several anchors and
scales), in its own grid cell and the two neighbouring cells nearest its
centre. Those predictions get the CIoU box loss and the class BCE; the
objectness target is the prediction's detached CIoU (clamped at 0) there and
0 everywhere else. Where two targets claim the same cell and anchor, torch
keeps whichever write lands last; here the larger CIoU wins (YOLOv5's
`sort_obj_iou=True`), which makes the result deterministic.
"""

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.detection.boxes import xywh_to_xyxy
from jaxspec.models.yolov5 import ANCHORS, STRIDES

# hyp.scratch-low.yaml; `scale_hyp` adapts box/obj/cls to the model and image size.
DEFAULT_HYP = {
    "box": 0.05,
    "obj": 1.0,
    "cls": 0.5,
    "cls_pw": 1.0,
    "obj_pw": 1.0,  # BCE positive weights
    "anchor_t": 4.0,
    "label_smoothing": 0.0,
    "fl_gamma": 0.0,  # focal loss is not implemented; kept so YOLOv5 hyp files pass
}
# YOLOv5's per-scale objectness weights (P3..P5 for three scales, P3..P7 otherwise).
_BALANCE = {3: (4.0, 1.0, 0.4)}
_BALANCE_OTHER = (4.0, 1.0, 0.25, 0.06, 0.02)
# Cell offsets times g = 0.5: own cell, then left, up, right, down neighbours.
_OFFSETS = np.array([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], np.float32) * 0.5


def scale_hyp(hyp: Mapping[str, float], *, num_classes: int, image_size: int, num_layers: int = 3) -> dict[str, float]:
    """YOLOv5 train.py's gain scaling: box *= 3/nl, cls *= nc/80 * 3/nl, obj *= (imgsz/640)^2 * 3/nl."""
    out = dict(hyp)
    out["box"] = hyp["box"] * 3 / num_layers
    out["cls"] = hyp["cls"] * num_classes / 80 * 3 / num_layers
    out["obj"] = hyp["obj"] * (image_size / 640) ** 2 * 3 / num_layers
    return out


def ciou(box1: jax.Array, box2: jax.Array, eps: float = 1e-7) -> jax.Array:
    """Elementwise complete IoU of xywh boxes: IoU - rho^2 / c^2 - alpha v.

    rho is the centre distance, c the diagonal of the smallest enclosing box,
    v the aspect-ratio term; alpha is a constant weight (no gradient), as in
    the CIoU paper and YOLOv5.
    """
    (x1, y1, w1, h1), (x2, y2, w2, h2) = jnp.moveaxis(box1, -1, 0), jnp.moveaxis(box2, -1, 0)
    corners1, corners2 = xywh_to_xyxy(box1), xywh_to_xyxy(box2)
    inner = jnp.clip(
        jnp.minimum(corners1[..., 2:], corners2[..., 2:]) - jnp.maximum(corners1[..., :2], corners2[..., :2]), 0
    )
    inter = inner[..., 0] * inner[..., 1]
    iou = inter / (w1 * h1 + w2 * h2 - inter + eps)
    outer = jnp.maximum(corners1[..., 2:], corners2[..., 2:]) - jnp.minimum(corners1[..., :2], corners2[..., :2])
    c2 = jnp.sum(outer**2, axis=-1) + eps  # squared diagonal of the enclosing box
    rho2 = (x2 - x1) ** 2 + (y2 - y1) ** 2
    v = (4 / math.pi**2) * (jnp.arctan(w2 / h2) - jnp.arctan(w1 / h1)) ** 2
    alpha = jax.lax.stop_gradient(v / (v - iou + (1 + eps)))
    return iou - (rho2 / c2 + alpha * v)


class Assignment(NamedTuple):
    """Candidate (target, anchor, cell) matches of one scale, each [B, M, A, 5].

    The last axis is the cell: own, left, up, right, down. `row`/`col` are
    clamped into the grid; `box` [..., 4] is the target in grid units, centre
    relative to the (unclamped) cell's corner, as YOLOv5's `tbox`.
    """

    image: jax.Array
    anchor: jax.Array
    row: jax.Array
    col: jax.Array
    box: jax.Array
    cls: jax.Array
    valid: jax.Array


def assign_targets(
    grid_hw: tuple[int, int], targets: jax.Array, mask: jax.Array, anchors: jax.Array, anchor_t: float
) -> Assignment:
    """YOLOv5's `build_targets` for one scale of `grid_hw` cells.

    `targets` [B, M, 5] normalized as above, `mask` [B, M] bool, `anchors` [A, 2] in grid units.
    """
    h, w = grid_hw
    b, m = targets.shape[:2]
    a = anchors.shape[0]
    size = jnp.array([w, h], jnp.float32)
    gxy = targets[..., 1:3] * size
    gwh = targets[..., 3:5] * size
    ratio = gwh[:, :, None, :] / anchors
    ratio_ok = jnp.max(jnp.maximum(ratio, 1 / ratio), axis=-1) < anchor_t
    rest = size - gxy
    near = (gxy % 1 < 0.5) & (gxy > 1)  # left / up neighbour is the nearer one
    far = (rest % 1 < 0.5) & (rest > 1)  # right / down
    use = jnp.concatenate([jnp.ones_like(near[..., :1]), near, far], axis=-1)
    valid = mask[:, :, None, None] & ratio_ok[..., None] & use[:, :, None, :]
    cell = jnp.floor(gxy[:, :, None, :] - _OFFSETS)  # [B, M, 5, 2]; gxy >= 0, so floor is torch's .long()
    box = jnp.concatenate([gxy[:, :, None, :] - cell, jnp.broadcast_to(gwh[:, :, None, :], cell.shape)], -1)
    shape = (b, m, a, len(_OFFSETS))
    return Assignment(
        image=jnp.broadcast_to(jnp.arange(b)[:, None, None, None], shape),
        anchor=jnp.broadcast_to(jnp.arange(a)[None, None, :, None], shape),
        row=jnp.broadcast_to(jnp.clip(cell[..., 1], 0, h - 1).astype(jnp.int32)[:, :, None, :], shape),
        col=jnp.broadcast_to(jnp.clip(cell[..., 0], 0, w - 1).astype(jnp.int32)[:, :, None, :], shape),
        box=jnp.broadcast_to(box[:, :, None], (*shape, 4)),
        cls=jnp.broadcast_to(targets[..., 0].astype(jnp.int32)[:, :, None, None], shape),
        valid=valid,
    )


def _bce(logits: jax.Array, target: jax.Array, pos_weight: float) -> jax.Array:
    """torch's BCEWithLogitsLoss(pos_weight), elementwise."""
    return pos_weight * target * jax.nn.softplus(-logits) + (1 - target) * jax.nn.softplus(logits)


def _check(outputs, targets, mask, anchors, strides, class_mask):
    if len(outputs) != len(anchors) or len(outputs) != len(strides):
        raise ValueError(f"{len(outputs)} output scales but {len(anchors)} anchor sets and {len(strides)} strides.")
    if targets.ndim != 3 or targets.shape[-1] != 5:
        raise ValueError(f"targets must be [B, M, 5] (class, x, y, w, h), got shape {targets.shape}.")
    if mask.shape != targets.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match targets {targets.shape[:2]}.")
    num_classes = outputs[0].shape[-1] - 5
    if class_mask is not None and jnp.shape(class_mask) != (num_classes,):
        raise ValueError(f"class_mask must have shape ({num_classes},), got {jnp.shape(class_mask)}.")


def yolo_loss(
    outputs: Sequence[jax.Array],
    targets: jax.Array,
    mask: jax.Array,
    *,
    anchors=ANCHORS,
    strides: Sequence[int] = STRIDES,
    hyp: Mapping[str, float] | None = None,
    class_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """YOLOv5's ComputeLoss on raw head outputs ([B, H, W, A, 5 + nc] per scale).

    Returns (total, parts): total = (box + obj + cls) * B as YOLOv5 returns it
    (so SGD sees YOLOv5's gradient scale); parts are the three gained terms.
    `anchors` are in pixels (scale, anchor, wh). `hyp` keys default to
    `DEFAULT_HYP` (apply `scale_hyp` first, as YOLOv5's train.py does); other
    keys are ignored. `class_mask` [nc] bool, output suppression: class logits
    outside it get no loss (and so no gradient), the class BCE is averaged over
    the kept classes only, and it is skipped when fewer than two are kept, just
    as YOLOv5 on a head sliced to those classes.
    """
    hyp = {**DEFAULT_HYP, **(hyp or {})}
    if hyp["fl_gamma"]:
        raise ValueError(f"fl_gamma={hyp['fl_gamma']}: focal loss is not implemented; use 0.")
    targets, mask = jnp.asarray(targets, jnp.float32), jnp.asarray(mask, bool)
    _check(outputs, targets, mask, anchors, strides, class_mask)
    num_classes = outputs[0].shape[-1] - 5
    class_mask = jnp.ones(num_classes, bool) if class_mask is None else jnp.asarray(class_mask, bool)
    num_kept = jnp.sum(class_mask)
    positive, negative = 1.0 - 0.5 * hyp["label_smoothing"], 0.5 * hyp["label_smoothing"]
    balance = _BALANCE.get(len(outputs), _BALANCE_OTHER)
    lbox = lobj = lcls = jnp.zeros((), jnp.float32)
    for i, out in enumerate(outputs):
        p = out.astype(jnp.float32)
        grid_anchors = jnp.asarray(anchors[i], jnp.float32) / strides[i]
        asg = assign_targets(p.shape[1:3], targets, mask, grid_anchors, hyp["anchor_t"])
        ps = p[asg.image, asg.row, asg.col, asg.anchor]  # [B, M, A, 5, 5 + nc]
        pxy = jax.nn.sigmoid(ps[..., :2]) * 2 - 0.5
        pwh = (jax.nn.sigmoid(ps[..., 2:4]) * 2) ** 2 * grid_anchors[asg.anchor]
        # A harmless stand-in box where invalid, so padding can never make NaNs (or NaN gradients).
        tbox = jnp.where(asg.valid[..., None], asg.box, jnp.array([0.5, 0.5, 1.0, 1.0]))
        iou = ciou(jnp.concatenate([pxy, pwh], -1), tbox)
        n = jnp.sum(asg.valid)
        lbox += jnp.sum(jnp.where(asg.valid, 1.0 - iou, 0.0)) / jnp.maximum(n, 1)

        # Max-scattering onto zeros also clamps negative CIoUs (and invalid candidates) at 0.
        obj_target = jnp.where(asg.valid, jax.lax.stop_gradient(iou), 0.0)
        tobj = jnp.zeros(p.shape[:4]).at[asg.image, asg.row, asg.col, asg.anchor].max(obj_target)
        lobj += jnp.mean(_bce(p[..., 4], tobj, hyp["obj_pw"])) * balance[i]

        tcls = jnp.where(jax.nn.one_hot(asg.cls, num_classes, dtype=bool), positive, negative)
        keep = asg.valid[..., None] & class_mask
        bce = jnp.where(keep, _bce(ps[..., 5:], tcls, hyp["cls_pw"]), 0.0)
        lcls += jnp.sum(bce) / jnp.maximum(n * num_kept, 1)
    lcls = jnp.where(num_kept > 1, lcls, 0.0)
    parts = {"box": lbox * hyp["box"], "obj": lobj * hyp["obj"], "cls": lcls * hyp["cls"]}
    return (parts["box"] + parts["obj"] + parts["cls"]) * targets.shape[0], parts
