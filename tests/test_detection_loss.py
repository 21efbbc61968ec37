"""YOLOv5 loss: CIoU, target assignment and the full loss against a per-target NumPy loop."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.detection import loss as yl
from jaxspec.models.yolov5 import ANCHORS, STRIDES

_SIZES = ((8, 12), (4, 6), (2, 3))  # grids of a 64x96 image


def _ciou_np(b1, b2, alpha=None):
    """Closed form: IoU - rho^2 / c^2 - alpha v, alpha = v / (1 - IoU + v) unless given."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = b1, b2
    iw = max(0.0, min(x1 + w1 / 2, x2 + w2 / 2) - max(x1 - w1 / 2, x2 - w2 / 2))
    ih = max(0.0, min(y1 + h1 / 2, y2 + h2 / 2) - max(y1 - h1 / 2, y2 - h2 / 2))
    iou = iw * ih / (w1 * h1 + w2 * h2 - iw * ih)
    cw = max(x1 + w1 / 2, x2 + w2 / 2) - min(x1 - w1 / 2, x2 - w2 / 2)
    ch = max(y1 + h1 / 2, y2 + h2 / 2) - min(y1 - h1 / 2, y2 - h2 / 2)
    v = 4 / math.pi**2 * (math.atan(w2 / h2) - math.atan(w1 / h1)) ** 2
    alpha = v / (1 - iou + v) if alpha is None else alpha
    return iou - ((x1 - x2) ** 2 + (y1 - y2) ** 2) / (cw**2 + ch**2) - alpha * v


def _bce_np(x, t, pw=1.0):
    return pw * t * np.logaddexp(0, -x) + (1 - t) * np.logaddexp(0, x)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _reference_loss(outputs, targets, mask, hyp, class_mask=None):
    """YOLOv5's ComputeLoss written target by target, anchor by anchor, cell by cell."""
    outputs = [np.asarray(o, np.float64) for o in outputs]
    nc = outputs[0].shape[-1] - 5
    kept = np.ones(nc, bool) if class_mask is None else np.asarray(class_mask)
    cp, cn = 1 - 0.5 * hyp["label_smoothing"], 0.5 * hyp["label_smoothing"]
    lbox = lobj = lcls = 0.0
    for out, anchors, stride, balance in zip(outputs, ANCHORS, STRIDES, (4.0, 1.0, 0.4)):
        _, h, w, na, _ = out.shape
        anchors = np.asarray(anchors) / stride
        tobj = np.zeros(out.shape[:4])
        box_terms, cls_terms = [], []
        for b, t in zip(*np.nonzero(mask)):
            c, gx, gy, gw, gh = targets[b, t] * [1, w, h, w, h]
            cells = [(0.0, 0.0)]  # offsets subtracted from the centre: own, left, up, right, down
            cells += [(0.5, 0.0)] if gx % 1 < 0.5 and gx > 1 else []
            cells += [(0.0, 0.5)] if gy % 1 < 0.5 and gy > 1 else []
            cells += [(-0.5, 0.0)] if (w - gx) % 1 < 0.5 and w - gx > 1 else []
            cells += [(0.0, -0.5)] if (h - gy) % 1 < 0.5 and h - gy > 1 else []
            for a in range(na):
                r = np.array([gw, gh]) / anchors[a]
                if max(r.max(), (1 / r).max()) >= hyp["anchor_t"]:
                    continue
                for ox, oy in cells:
                    gi, gj = math.floor(gx - ox), math.floor(gy - oy)
                    col, row = min(max(gi, 0), w - 1), min(max(gj, 0), h - 1)
                    p = out[b, row, col, a]
                    pxy = _sigmoid(p[:2]) * 2 - 0.5
                    pwh = (_sigmoid(p[2:4]) * 2) ** 2 * anchors[a]
                    iou = _ciou_np([*pxy, *pwh], [gx - gi, gy - gj, gw, gh])
                    box_terms.append(1 - iou)
                    tobj[b, row, col, a] = max(tobj[b, row, col, a], iou, 0.0)
                    tc = np.where(np.arange(nc) == int(c), cp, cn)
                    cls_terms.extend(_bce_np(p[5:], tc, hyp["cls_pw"])[kept])
        lbox += np.mean(box_terms) if box_terms else 0.0
        lobj += np.mean(_bce_np(out[..., 4], tobj, hyp["obj_pw"])) * balance
        lcls += np.mean(cls_terms) if cls_terms and kept.sum() > 1 else 0.0
    parts = {"box": lbox * hyp["box"], "obj": lobj * hyp["obj"], "cls": lcls * hyp["cls"]}
    return sum(parts.values()) * len(targets), parts


def _outputs(seed, nc=4, batch=2):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(batch, h, w, 3, 5 + nc)), jnp.float32) for h, w in _SIZES]


def _targets(seed, batch=2, boxes=5, nc=4):
    """Random normalized boxes (class, x, y, w, h), the first `boxes - 1` real per image, then padding."""
    rng = np.random.default_rng(seed)
    t = np.stack(
        [
            rng.integers(0, nc, (batch, boxes)),
            rng.uniform(0.02, 0.98, (batch, boxes)),
            rng.uniform(0.02, 0.98, (batch, boxes)),
            rng.uniform(0.02, 0.9, (batch, boxes)),
            rng.uniform(0.02, 0.9, (batch, boxes)),
        ],
        axis=-1,
    ).astype(np.float32)
    mask = np.ones((batch, boxes), bool)
    mask[:, -1] = False
    return t, mask


def _hyp(**kw):
    return {**yl.DEFAULT_HYP, **kw}


def _loss(outputs, targets, mask, hyp):
    """The loss jitted with `hyp` closed over, as a train step holds it."""
    return jax.jit(functools.partial(yl.yolo_loss, hyp=hyp))(outputs, targets, mask)


def test_ciou_known_values():
    boxes = jnp.array([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 2.0, 4.0]])
    others = jnp.array([[0.0, 0.0, 2.0, 2.0], [3.0, 0.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]])
    got = np.asarray(yl.ciou(boxes, others))
    # Identical; side by side (IoU 0, rho^2 9, enclosing 5 x 2); same centre, half the height
    # (IoU 1/2, v = 4/pi^2 (atan 1 - atan 1/2)^2).
    v = 4 / math.pi**2 * (math.atan(1) - math.atan(0.5)) ** 2
    np.testing.assert_allclose(got, [1.0, -9 / 29, 0.5 - v**2 / (0.5 + v)], rtol=1e-5, atol=1e-6)


def test_ciou_matches_closed_form_on_random_boxes():
    rng = np.random.default_rng(1)
    b1 = np.concatenate([rng.uniform(0, 4, (50, 2)), rng.uniform(0.2, 3, (50, 2))], -1)
    b2 = np.concatenate([rng.uniform(0, 4, (50, 2)), rng.uniform(0.2, 3, (50, 2))], -1)
    got = np.asarray(yl.ciou(jnp.asarray(b1, jnp.float32), jnp.asarray(b2, jnp.float32)))
    np.testing.assert_allclose(got, [_ciou_np(a, b) for a, b in zip(b1, b2)], rtol=1e-4, atol=1e-5)


def test_ciou_gradient_treats_alpha_as_constant():
    b1, b2 = np.array([1.0, 1.2, 2.0, 1.5]), np.array([1.5, 0.8, 1.0, 2.5])
    iw = min(b1[0] + b1[2] / 2, b2[0] + b2[2] / 2) - max(b1[0] - b1[2] / 2, b2[0] - b2[2] / 2)
    ih = min(b1[1] + b1[3] / 2, b2[1] + b2[3] / 2) - max(b1[1] - b1[3] / 2, b2[1] - b2[3] / 2)
    iou = iw * ih / (b1[2] * b1[3] + b2[2] * b2[3] - iw * ih)
    v = 4 / math.pi**2 * (math.atan(b2[2] / b2[3]) - math.atan(b1[2] / b1[3])) ** 2
    alpha = v / (1 - iou + v)
    eps = 1e-6
    numeric = [(_ciou_np(b1 + eps * e, b2, alpha) - _ciou_np(b1 - eps * e, b2, alpha)) / (2 * eps) for e in np.eye(4)]
    grad = jax.grad(lambda b: yl.ciou(b, jnp.asarray(b2, jnp.float32)))(jnp.asarray(b1, jnp.float32))
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)


def _assigned(asg):
    """Set of (anchor, row, col) over valid candidates, with their xywh targets."""
    valid = np.asarray(asg.valid)
    return {
        (int(a), int(r), int(c)): tuple(np.round(box, 4))
        for a, r, c, box in zip(
            np.asarray(asg.anchor)[valid],
            np.asarray(asg.row)[valid],
            np.asarray(asg.col)[valid],
            np.asarray(asg.box)[valid],
        )
    }


def test_assignment_cells_neighbours_and_ratio_filter():
    anchors = jnp.asarray(ANCHORS[0]) / STRIDES[0]  # P3 anchors in cells: 1.25x1.625, 2x3.75, 4.125x2.875
    grid = (16, 16)
    # Centre (5.3, 6.7) cells, size 0.6 x 0.8: width/height ratios to anchors 1 and 2 exceed 4.
    box = [1, 5.3 / 16, 6.7 / 16, 0.6 / 16, 0.8 / 16]
    # A box at (0.4, 0.6): no left neighbour (x < 1), down neighbour (fraction 0.6 -> 0.4 to the edge).
    corner = [2, 0.4 / 16, 0.6 / 16, 2.0 / 16, 3.5 / 16]
    targets = jnp.array([[box, corner, [0, 0.5, 0.5, 0.2, 0.2]]])
    asg = yl.assign_targets(grid, targets, jnp.array([[True, False, False]]), anchors, 4.0)
    assert _assigned(asg) == {
        (0, 6, 5): (0.3, 0.7, 0.6, 0.8),  # own cell
        (0, 6, 4): (1.3, 0.7, 0.6, 0.8),  # left: x fraction 0.3 < 0.5
        (0, 7, 5): (0.3, -0.3, 0.6, 0.8),  # down: y fraction 0.7 > 0.5
    }
    assert set(np.asarray(asg.cls)[np.asarray(asg.valid)]) == {1}
    asg = yl.assign_targets(grid, targets, jnp.array([[False, True, False]]), anchors, 4.0)
    # 2 x 3.5 fits anchor 0 (worst ratio 2.15), 1 (1.07) and 2 (1 / 0.485 = 2.06).
    assert set(_assigned(asg)) == {(a, r, 0) for a in range(3) for r in (0, 1)}
    asg = yl.assign_targets(grid, targets, jnp.array([[False, True, False]]), anchors, 2.1)
    assert set(_assigned(asg)) == {(a, r, 0) for a in (1, 2) for r in (0, 1)}  # anchor 0: 3.5 / 1.625 > 2.1


@pytest.mark.parametrize("hyp", [_hyp(), _hyp(label_smoothing=0.1, cls_pw=2.0, obj_pw=0.5, anchor_t=3.0)])
def test_loss_matches_per_target_reference(hyp):
    outputs = _outputs(0)  # about 1 in 5 assigned CIoUs is negative, so the clamp at 0 is exercised
    targets, mask = _targets(1, boxes=8)
    total, parts = _loss(outputs, targets, mask, hyp=hyp)
    ref_total, ref_parts = _reference_loss(outputs, targets, mask, hyp)
    for k in ("box", "obj", "cls"):
        np.testing.assert_allclose(parts[k], ref_parts[k], rtol=1e-4, err_msg=k)
        assert ref_parts[k] > 0
    np.testing.assert_allclose(total, ref_total, rtol=1e-4)


def test_zero_targets_give_only_objectness_loss():
    outputs = _outputs(2)
    targets, _ = _targets(3)
    total, parts = _loss(outputs, targets, np.zeros(targets.shape[:2], bool), hyp=_hyp())
    assert float(parts["box"]) == 0.0 and float(parts["cls"]) == 0.0
    expected = sum(b * np.mean(np.logaddexp(0, np.asarray(o[..., 4]))) for o, b in zip(outputs, (4.0, 1.0, 0.4)))
    np.testing.assert_allclose(parts["obj"], expected, rtol=1e-5)
    np.testing.assert_allclose(total, 2 * expected, rtol=1e-5)


def test_padded_boxes_change_nothing():
    outputs = _outputs(4)
    targets, mask = _targets(5, boxes=4)
    rng = np.random.default_rng(6)
    pad = np.concatenate([rng.uniform(-2, 5, (2, 3, 5)), np.zeros((2, 1, 5)), np.full((2, 1, 5), np.nan)], axis=1)
    padded = np.concatenate([targets, pad.astype(np.float32)], axis=1)
    padded_mask = np.concatenate([mask, np.zeros((2, 5), bool)], axis=1)
    grad = jax.jit(jax.value_and_grad(lambda o, t, m: yl.yolo_loss(o, t, m)[0]))
    value, g = grad(outputs, targets, mask)
    value_p, g_p = grad(outputs, padded, padded_mask)
    np.testing.assert_allclose(value_p, value, rtol=1e-6)
    for a, b in zip(g, g_p):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-9)
        assert np.all(np.isfinite(b))


def test_class_mask_equals_sliced_head_and_blocks_gradients():
    kept = np.array([False, True, False, True])
    outputs = _outputs(7)
    targets, mask = _targets(8, boxes=6)
    targets[..., 0] = np.where(targets[..., 0] < 2, 1, 3)  # domain-constrained data: classes of S only
    loss_fn = jax.jit(lambda o: yl.yolo_loss(o, targets, mask, class_mask=kept)[0])
    value, grads = jax.value_and_grad(loss_fn)(outputs)
    for g in grads:
        assert np.all(np.asarray(g)[..., 5:][..., ~kept] == 0)
        assert np.any(np.asarray(g)[..., 5:][..., kept] != 0)
    # A head sliced to S's two class channels, targets renumbered 1 -> 0, 3 -> 1.
    sliced = [jnp.concatenate([o[..., :5], o[..., 5:][..., kept]], -1) for o in outputs]
    renumbered = targets.copy()
    renumbered[..., 0] = (targets[..., 0] == 3).astype(np.float32)
    np.testing.assert_allclose(value, _loss(sliced, renumbered, mask, hyp=_hyp())[0], rtol=1e-6)
    ref_total, _ = _reference_loss(outputs, targets, mask, _hyp(), class_mask=kept)
    np.testing.assert_allclose(value, ref_total, rtol=1e-4)


def test_single_kept_class_has_no_class_loss():
    targets, mask = _targets(9)
    targets[..., 0] = 2
    _, parts = jax.jit(functools.partial(yl.yolo_loss, class_mask=np.arange(4) == 2))(_outputs(10), targets, mask)
    assert float(parts["cls"]) == 0.0 and float(parts["box"]) > 0


def test_jit_matches_eager():
    outputs = _outputs(11)
    targets, mask = _targets(12)
    eager, _ = yl.yolo_loss(outputs, targets, mask)
    np.testing.assert_allclose(_loss(outputs, targets, mask, hyp=_hyp())[0], eager, rtol=1e-6)


def test_scale_hyp():
    hyp = yl.scale_hyp(yl.DEFAULT_HYP, num_classes=10, image_size=128)
    assert hyp["box"] == pytest.approx(0.05)
    assert hyp["cls"] == pytest.approx(0.5 * 10 / 80)
    assert hyp["obj"] == pytest.approx((128 / 640) ** 2)
    assert yl.scale_hyp(yl.DEFAULT_HYP, num_classes=80, image_size=640, num_layers=4)["box"] == pytest.approx(0.0375)


def test_bad_inputs_name_the_problem():
    outputs = _outputs(13)
    targets, mask = _targets(14)
    with pytest.raises(ValueError, match="class_mask"):
        yl.yolo_loss(outputs, targets, mask, class_mask=np.ones(3, bool))
    with pytest.raises(ValueError, match=r"\[B, M, 5\]"):
        yl.yolo_loss(outputs, targets[..., :4], mask)
    with pytest.raises(ValueError, match="mask shape"):
        yl.yolo_loss(outputs, targets, mask[:, :2])
    with pytest.raises(ValueError, match="fl_gamma=1.5"):
        yl.yolo_loss(outputs, targets, mask, hyp={"fl_gamma": 1.5})
    with pytest.raises(ValueError, match="2 output scales"):
        yl.yolo_loss(outputs[:2], targets, mask)
