"""Specializing a YOLOv5 detector to a label subset S: output suppression and head slicing.

Both start from the parent's weights and train on D_S (images with an object
of S, boxes of S only; `jaxspec.detection.data.ConstrainedDetectionSource`).

- Suppression keeps the full head: `class_mask` marks S's class channels;
  the loss ignores the others (`yolo_loss(class_mask=...)`) and NMS never
  predicts them (`non_max_suppression(class_mask=...)`).
- Slicing (the detector's specialist extraction) keeps, per anchor, the 5
  box/objectness channels and S's class channels: 5 + |S| outputs instead of
  5 + |C|. The sliced head's outputs are the full head's at those channels,
  so its detections and loss equal the suppressed full head's exactly (up to
  float summation order); tests check it.

Gradual specialization (animals -> horse) chains either by giving positions
in the parent's outputs, `jaxspec.specialize.compose_subsets(parent.classes, S)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flax import nnx

from jaxspec.models.yolov5 import NUM_OUTPUTS_PER_ANCHOR, YOLOv5
from jaxspec.specialize import _check_subset

DETECT = 24  # YOLOv5's layer index of the Detect head


def class_mask(num_outputs: int, positions: Sequence[int] | None) -> np.ndarray:
    """Output suppression as a [num_outputs] bool mask over class channels; None keeps them all."""
    if positions is None:
        return np.ones(num_outputs, bool)
    keep = np.zeros(num_outputs, bool)
    keep[_check_subset(positions, num_outputs)] = True
    return keep


def head_channels(num_classes: int, positions: Sequence[int], num_anchors: int) -> np.ndarray:
    """Indices into a head conv's `num_anchors * (5 + num_classes)` channels that slicing keeps, anchor-major."""
    s = _check_subset(positions, num_classes)
    per_anchor = np.concatenate([np.arange(NUM_OUTPUTS_PER_ANCHOR), NUM_OUTPUTS_PER_ANCHOR + s])
    return (np.arange(num_anchors)[:, None] * (NUM_OUTPUTS_PER_ANCHOR + num_classes) + per_anchor).reshape(-1)


def slice_head(model: YOLOv5, positions: Sequence[int]) -> YOLOv5:
    """A new detector whose head predicts only the classes at `positions` of `model`'s, in that order.

    `model` is left unchanged; the backbone, neck and BatchNorm statistics are copied as they are.
    """
    new = nnx.merge(*nnx.split(model), copy=True)
    detect = new.layers[DETECT]
    keep = head_channels(detect.num_classes, positions, detect.num_anchors)
    for conv in detect.m:
        conv.kernel.value = conv.kernel[...][..., keep]
        conv.bias.value = conv.bias[...][keep]
    detect.num_classes = new.num_classes = len(positions)
    return new
