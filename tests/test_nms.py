"""Batched jittable NMS against a plain NumPy transcription of YOLOv5's non_max_suppression."""

import functools

import jax
import numpy as np
import pytest

from jaxspec.detection.nms import non_max_suppression


def _iou_np(box, boxes):
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: np.prod(b[..., 2:] - b[..., :2], axis=-1)
    return inter / (area(box) + area(boxes) - inter)


def reference_nms(boxes, obj, cls, *, conf_thres, iou_thres, max_det, max_nms, multi_label, agnostic, class_mask=None):
    """One image, YOLOv5 style: candidate rows (box, score, class) -> sort -> greedy per class."""
    cls = cls * obj[:, None]
    if class_mask is not None:
        cls = cls * class_mask
    keep = obj > conf_thres
    boxes, cls = boxes[keep], cls[keep]
    if multi_label:
        i, j = np.nonzero(cls > conf_thres)
        rows = [(boxes[a], cls[a, b], b) for a, b in zip(i, j)]
    else:
        j = cls.argmax(1)
        rows = [(boxes[a], cls[a, j[a]], j[a]) for a in range(len(boxes)) if cls[a, j[a]] > conf_thres]
    rows.sort(key=lambda r: -r[1])
    rows = rows[:max_nms]
    kept = []
    suppressed = np.zeros(len(rows), bool)
    all_boxes = np.array([r[0] for r in rows]).reshape(-1, 4)
    all_classes = np.array([r[2] for r in rows])
    for a in range(len(rows)):
        if suppressed[a]:
            continue
        kept.append(rows[a])
        hit = _iou_np(all_boxes[a], all_boxes) > iou_thres
        if not agnostic:
            hit &= all_classes == all_classes[a]
        suppressed |= hit
    return kept[:max_det]


def _random_batch(seed, b=3, n=400, c=4):
    """Boxes clustered around a few centres, so NMS has plenty to suppress."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(20, 180, (b, 6, 2))
    pick = rng.integers(0, 6, (b, n))
    xy = np.take_along_axis(centres, pick[..., None], axis=1) + rng.normal(0, 6, (b, n, 2))
    wh = rng.uniform(8, 40, (b, n, 2))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], -1).astype(np.float32)
    obj = rng.uniform(0, 1, (b, n)).astype(np.float32)
    cls = rng.uniform(0, 1, (b, n, c)).astype(np.float32)
    return boxes, obj, cls


@pytest.mark.parametrize("multi_label", [True, False])
@pytest.mark.parametrize("agnostic", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_reference(seed, multi_label, agnostic):
    boxes, obj, cls = _random_batch(seed)
    kw = {
        "conf_thres": 0.2,
        "iou_thres": 0.45,
        "max_det": 40,
        "max_nms": 300,
        "multi_label": multi_label,
        "agnostic": agnostic,
    }
    class_mask = np.array([True, False, True, True]) if seed == 1 else None
    run = jax.jit(functools.partial(non_max_suppression, **kw))
    out = jax.device_get(run(boxes, obj, cls, class_mask=class_mask))
    saw_truncation = False
    for b in range(len(boxes)):
        ref = reference_nms(
            boxes[b], obj[b], cls[b], **kw, class_mask=None if class_mask is None else class_mask.astype(np.float32)
        )
        n = int(out.valid[b].sum())
        assert n == len(ref) and out.valid[b, :n].all() and not out.valid[b, n:].any()
        saw_truncation |= n == kw["max_det"]
        np.testing.assert_allclose(out.boxes[b, :n], np.array([r[0] for r in ref]).reshape(-1, 4), rtol=1e-6)
        np.testing.assert_allclose(out.scores[b, :n], [r[1] for r in ref], rtol=1e-6)
        np.testing.assert_array_equal(out.classes[b, :n], [r[2] for r in ref])
        assert (out.classes[b, n:] == -1).all() and (out.scores[b, n:] == 0).all()
        if class_mask is not None:
            assert not np.isin(out.classes[b, :n], np.flatnonzero(~class_mask)).any()
    if multi_label and not agnostic:
        assert saw_truncation  # the fixture is big enough that max_det binds somewhere


def test_yolov5_val_defaults_and_max_nms_preselection():
    """max_nms keeps only the best candidates; with a generous max_nms nothing changes."""
    boxes, obj, cls = _random_batch(2, b=2, n=600, c=3)
    kw = {"conf_thres": 0.001, "iou_thres": 0.6, "max_det": 300, "multi_label": True, "agnostic": False}
    for max_nms in (50, 30000):
        out = jax.device_get(non_max_suppression(boxes, obj, cls, max_nms=max_nms))
        for b in range(2):
            ref = reference_nms(boxes[b], obj[b], cls[b], max_nms=max_nms, **kw)
            n = int(out.valid[b].sum())
            assert n == len(ref)
            np.testing.assert_allclose(out.scores[b, :n], [r[1] for r in ref], rtol=1e-6)


@pytest.mark.parametrize("multi_label", [True, False])
def test_class_mask_equals_slicing_the_classes(multi_label):
    """Output suppression (full head + class_mask) predicts exactly what the head sliced to S does."""
    boxes, obj, cls = _random_batch(4, c=6)
    subset = np.array([1, 2, 5])
    mask = np.isin(np.arange(6), subset)
    full = non_max_suppression(
        boxes, obj, cls, conf_thres=0.1, iou_thres=0.5, max_det=50, multi_label=multi_label, class_mask=mask
    )
    sliced = non_max_suppression(
        boxes, obj, cls[..., subset], conf_thres=0.1, iou_thres=0.5, max_det=50, multi_label=multi_label
    )
    np.testing.assert_array_equal(full.valid, sliced.valid)
    np.testing.assert_array_equal(full.boxes, sliced.boxes)
    np.testing.assert_array_equal(full.scores, sliced.scores)
    np.testing.assert_array_equal(full.classes[full.valid], subset[sliced.classes[sliced.valid]])


def test_empty_and_bad_input():
    boxes, obj, cls = _random_batch(3, b=1, n=10, c=2)
    out = non_max_suppression(boxes, obj * 0, cls, max_det=5)
    assert out.boxes.shape == (1, 5, 4) and not out.valid.any()
    with pytest.raises(ValueError, match=r"class_mask must have shape \(2,\)"):
        non_max_suppression(boxes, obj, cls, class_mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="boxes must be"):
        non_max_suppression(boxes[0], obj, cls)
    with pytest.raises(ValueError, match="iou_thres=1.5"):
        non_max_suppression(boxes, obj, cls, iou_thres=1.5)
