"""Batched, jittable non-maximum suppression with YOLOv5's semantics.

YOLOv5's `non_max_suppression` works on ragged lists; here every image keeps a fixed `max_det` slots
(padding + `valid` mask) so the whole thing jits and vmaps. Per image:

1. candidates are (box, class) pairs with objectness > conf_thres and score = objectness * class
   probability > conf_thres; every class above threshold (`multi_label=True`, as YOLOv5 validation)
   or only the best class per box;
2. at most `max_nms` candidates, the highest scoring, go on (YOLOv5's max_nms pre-selection, here a
   `top_k`, which also sorts them);
3. greedy NMS in score order, per class (a box suppresses only boxes of its own class unless
   `agnostic`), suppressing IoU > iou_thres, stopping after `max_det` kept boxes.

Step 3 runs as a loop of at most `max_det` rounds, each costing O(max_nms), instead of building the
max_nms x max_nms IoU matrix: memory stays linear in the number of candidates.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxspec.detection.boxes import box_area


class Detections(NamedTuple):
    """NMS output; rows beyond an image's detections are padding with `valid=False`.

    boxes [B, max_det, 4] xyxy (zeros when padding), scores [B, max_det] (0), classes [B, max_det]
    int32 (-1), valid [B, max_det] bool. Valid rows come first, in descending score order.
    """

    boxes: jax.Array
    scores: jax.Array
    classes: jax.Array
    valid: jax.Array


def _candidates(objectness, class_probs, conf_thres, multi_label, class_mask, k):
    """Top-k (score, box index, class) candidates of one image; score -inf marks no candidate."""
    num_classes = class_probs.shape[-1]
    scores = objectness[:, None] * class_probs
    if class_mask is not None:
        scores = jnp.where(class_mask, scores, 0.0)
    above = (objectness[:, None] > conf_thres) & (scores > conf_thres)
    if multi_label and num_classes > 1:
        flat = jnp.where(above, scores, -jnp.inf).reshape(-1)
        top, idx = jax.lax.top_k(flat, min(k, flat.shape[0]))
        return top, idx // num_classes, idx % num_classes
    best_class = jnp.argmax(scores, axis=-1)
    best = jnp.take_along_axis(scores, best_class[:, None], axis=-1)[:, 0]
    ok = jnp.take_along_axis(above, best_class[:, None], axis=-1)[:, 0]
    top, idx = jax.lax.top_k(jnp.where(ok, best, -jnp.inf), min(k, best.shape[0]))
    return top, idx, best_class[idx]


def _nms_one(
    boxes, objectness, class_probs, class_mask, *, conf_thres, iou_thres, max_det, max_nms, multi_label, agnostic
):
    scores, box_idx, classes = _candidates(objectness, class_probs, conf_thres, multi_label, class_mask, max_nms)
    cand = boxes[box_idx].astype(jnp.float32)
    area = box_area(cand)
    classes = classes.astype(jnp.int32)

    def pick(remaining):
        i = jnp.argmax(remaining)  # candidates are sorted, so ties go to the higher-ranked one
        return i, remaining[i] > -jnp.inf

    def cond(state):
        _, _, n, _, left = state
        return (n < max_det) & left

    def body(state):
        remaining, kept, n, i, _ = state
        wh = jnp.clip(jnp.minimum(cand[i, 2:], cand[:, 2:]) - jnp.maximum(cand[i, :2], cand[:, :2]), 0)
        inter = wh[:, 0] * wh[:, 1]
        hit = inter > iou_thres * (area[i] + area - inter)  # IoU > iou_thres without a division
        if not agnostic:
            hit &= classes == classes[i]
        remaining = jnp.where(hit, -jnp.inf, remaining).at[i].set(-jnp.inf)
        return (remaining, kept.at[n].set(i), n + 1, *pick(remaining))

    kept = jnp.zeros(max_det, jnp.int32)
    _, kept, n, _, _ = jax.lax.while_loop(cond, body, (scores, kept, jnp.int32(0), *pick(scores)))
    valid = jnp.arange(max_det) < n
    return Detections(
        boxes=jnp.where(valid[:, None], cand[kept], 0.0),
        scores=jnp.where(valid, scores[kept], 0.0),
        classes=jnp.where(valid, classes[kept], -1),
        valid=valid,
    )


def non_max_suppression(
    boxes: jax.Array,
    objectness: jax.Array,
    class_probs: jax.Array,
    *,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
    max_nms: int = 30000,
    multi_label: bool = True,
    agnostic: bool = False,
    class_mask: jax.Array | None = None,
) -> Detections:
    """Class-aware NMS of a batch: boxes [B, N, 4] xyxy, objectness [B, N], class_probs [B, N, C].

    Defaults are YOLOv5 validation's (conf 0.001, IoU 0.6, multi-label, 300 detections); its
    detect.py uses conf 0.25, IoU 0.45, multi_label=False. `class_mask` ([C] bool) is output
    suppression: the probabilities of classes outside it are zeroed before anything else, so those
    classes are never predicted and, in single-label mode, a box takes its best class inside the
    mask. Jit with the keyword arguments static (all but `class_mask`).
    """
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B, N, 4], got shape {boxes.shape}")
    if objectness.shape != boxes.shape[:2] or class_probs.shape[:2] != boxes.shape[:2]:
        raise ValueError(
            f"objectness {objectness.shape} and class_probs {class_probs.shape} must match "
            f"boxes {boxes.shape} in [B, N]"
        )
    if class_mask is not None and jnp.shape(class_mask) != (class_probs.shape[-1],):
        raise ValueError(f"class_mask must have shape ({class_probs.shape[-1]},), got {jnp.shape(class_mask)}")
    if not 0.0 <= conf_thres <= 1.0 or not 0.0 <= iou_thres <= 1.0:
        raise ValueError(f"conf_thres={conf_thres} and iou_thres={iou_thres} must lie in [0, 1]")
    if max_det < 1 or max_nms < 1:
        raise ValueError(f"max_det={max_det} and max_nms={max_nms} must be positive")
    one = functools.partial(
        _nms_one,
        conf_thres=conf_thres,
        iou_thres=iou_thres,
        max_det=max_det,
        max_nms=max_nms,
        multi_label=multi_label,
        agnostic=agnostic,
    )
    mask = None if class_mask is None else jnp.asarray(class_mask, bool)
    return jax.vmap(one, in_axes=(0, 0, 0, None))(boxes, objectness, class_probs, mask)
