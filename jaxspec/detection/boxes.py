"""Box format conversions and pairwise IoU.

Formats: `xyxy` = (x1, y1, x2, y2) corners; `xywh` = (cx, cy, w, h) centre and size (YOLO's target
and decode format). Both work on jnp and np arrays of shape [..., 4] and are jittable.
"""

import jax.numpy as jnp


def xywh_to_xyxy(boxes):
    """(cx, cy, w, h) -> (x1, y1, x2, y2), on the last axis."""
    xy, wh = boxes[..., :2], boxes[..., 2:4]
    return jnp.concatenate([xy - wh / 2, xy + wh / 2], axis=-1)


def xyxy_to_xywh(boxes):
    """(x1, y1, x2, y2) -> (cx, cy, w, h), on the last axis."""
    p1, p2 = boxes[..., :2], boxes[..., 2:4]
    return jnp.concatenate([(p1 + p2) / 2, p2 - p1], axis=-1)


def box_area(boxes):
    """Area of xyxy boxes [..., 4] -> [...]; degenerate boxes have area 0."""
    wh = jnp.clip(boxes[..., 2:4] - boxes[..., :2], 0)
    return wh[..., 0] * wh[..., 1]


def box_iou(a, b, eps=1e-9):
    """Pairwise IoU of xyxy boxes: a [..., N, 4], b [..., M, 4] -> [..., N, M].

    Leading (batch) dimensions must broadcast. `eps` keeps 0/0 (two empty boxes) at 0.
    """
    lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = jnp.minimum(a[..., :, None, 2:4], b[..., None, :, 2:4])
    wh = jnp.clip(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return inter / (union + eps)
