"""Detection steps: sharded == 1-device, layer freezing, suppression == slicing, YOLOv5's optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common
from configs.coco_animals import yolov5_sgd as yolov5_sgd_config
from configs.detect_animals import phase as detection_phase
from jaxspec import sharding
from jaxspec.data.constrain import label_map
from jaxspec.detection import data, nms
from jaxspec.detection import specialize as dspec
from jaxspec.detection import train as dtrain
from jaxspec.detection.boxes import xywh_to_xyxy
from jaxspec.detection.loss import DEFAULT_HYP, yolo_loss
from jaxspec.models.yolov5 import decode, yolov5
from jaxspec.train import steps
from jaxspec.train.state import create_state

NC, SIZE, B, M = 6, 64, 8, 5
SUBSET = (4, 1, 2)  # unsorted on purpose: slicing must keep S's order


@pytest.fixture(scope="module")
def model():
    return yolov5("n", NC, rngs=nnx.Rngs(0))


def random_batch(seed: int, labels_from=tuple(range(NC))) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    centre, size = rng.uniform(12, SIZE - 12, (B, M, 2)), rng.uniform(6, 24, (B, M, 2))
    return {
        "image": rng.integers(0, 256, (B, SIZE, SIZE, 1), dtype=np.uint8),
        "boxes": np.concatenate([centre - size / 2, centre + size / 2], -1).astype(np.float32),
        "labels": rng.choice(labels_from, (B, M)).astype(np.int32),
        "mask": rng.random((B, M)) < 0.8,
    }


def _flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(tree)}


def test_sharded_step_equals_single_device_step_and_frozen_layers_stay(model):
    assert jax.device_count() == 8
    phase = detection_phase(steps=10, batch_size=B, optim=common.optimizer(optimizer="sgd", lr=0.02, momentum=0.9))
    phase.freeze = "layers:10-12"
    params0 = _flat(nnx.state(model, nnx.Param))
    results = []
    for devices, fsdp in ((jax.devices()[:1], 1), (jax.devices(), 1), (jax.devices(), 4)):  # 1 device, DP, FSDP
        mesh = sharding.make_mesh(devices, fsdp=fsdp)
        tx, schedule = dtrain.make_optimizer(phase, nnx.state(model, nnx.Param), steps_per_epoch=10)
        modeldef, state = create_state(model, tx, 0)
        state = sharding.place_state(state, mesh)
        step = dtrain.make_train_step(
            modeldef,
            tx,
            schedule,
            image_size=SIZE,
            mean=(0.0,),
            std=(1.0,),
            hyp=dtrain.phase_hyp(DEFAULT_HYP, num_classes=NC, image_size=SIZE),
            label_index=np.arange(NC),
            class_mask=np.ones(NC, bool),
        )
        step = steps.jit_train_step(step, mesh, sharding.state_shardings(state, mesh))
        for seed in range(2):
            state, metrics = step(state, sharding.put_batch(random_batch(seed), mesh))
        results.append(jax.device_get((state.params, state.batch_stats, metrics)))
    # SGD's update is linear in the gradient, so cross-device summation order stays at float level.
    for other in results[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), results[0], other)
    assert 0 < results[0][2]["loss"] < 10 and 0 <= results[0][2]["accuracy"] <= 1
    params = _flat(results[0][0])
    frozen = [p for p in params if p.startswith("layers/10/")]
    assert frozen and not any(p.startswith(("layers/11/", "layers/12/")) for p in params)  # no parameters there
    for p in params:
        same = np.array_equal(params[p], params0[p])
        assert same == p.startswith("layers/10/"), p


def _forward_loss_nms(model, x, targets, mask, hyp, class_mask=None):
    """Raw outputs, YOLOv5 loss and NMS detections of `model`, in one compiled call."""

    @jax.jit
    def run(state):
        outputs = nnx.merge(nnx.graphdef(model), state)(x)
        loss = yolo_loss(outputs, targets, mask, hyp=hyp, class_mask=class_mask)
        boxes, obj, cls = decode(outputs)
        det = nms.non_max_suppression(
            xywh_to_xyxy(boxes), obj, cls, conf_thres=1e-4, max_det=40, max_nms=400, class_mask=class_mask
        )
        return outputs, loss, det

    return jax.device_get(run(nnx.state(model)))


def test_sliced_head_predicts_and_scores_as_the_suppressed_full_head(model):
    """Slicing keeps the 5 box/objectness and S's class channels per anchor: same outputs, loss and detections."""
    sliced = dspec.slice_head(model, SUBSET)
    assert sliced.num_classes == len(SUBSET) and model.num_classes == NC  # the parent is left unchanged
    batch = random_batch(3, labels_from=SUBSET)  # domain constrained: only boxes of S
    x = jnp.asarray(batch["image"], jnp.float32).repeat(3, -1) / 255
    hyp = dtrain.phase_hyp(DEFAULT_HYP, num_classes=len(SUBSET), image_size=SIZE)  # |S| classes are scored
    sliced_labels = label_map(NC, SUBSET)[batch["labels"]]
    full_out, (full_loss, full_parts), full_det = _forward_loss_nms(
        model,
        x,
        data.to_targets(batch["boxes"], batch["labels"], batch["mask"], SIZE),
        batch["mask"],
        hyp,
        dspec.class_mask(NC, SUBSET),
    )
    sliced_out, (sliced_loss, sliced_parts), sliced_det = _forward_loss_nms(
        sliced, x, data.to_targets(batch["boxes"], sliced_labels, batch["mask"], SIZE), batch["mask"], hyp
    )

    keep = np.r_[0:5, 5 + np.array(SUBSET)]
    for f, s in zip(full_out, sliced_out, strict=True):
        assert s.shape == (*f.shape[:-1], 5 + len(SUBSET))
        np.testing.assert_allclose(s, f[..., keep], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(full_loss, sliced_loss, rtol=1e-5)
    for k in ("box", "obj", "cls"):
        np.testing.assert_allclose(full_parts[k], sliced_parts[k], rtol=1e-5, atol=1e-8)
    assert float(full_parts["cls"]) > 0
    assert int(sliced_det.valid.sum()) > 0
    np.testing.assert_array_equal(full_det.valid, sliced_det.valid)
    v = full_det.valid
    np.testing.assert_array_equal(full_det.classes[v], np.array(SUBSET)[sliced_det.classes[v]])
    np.testing.assert_allclose(full_det.scores[v], sliced_det.scores[v], rtol=1e-5)
    np.testing.assert_allclose(full_det.boxes[v], sliced_det.boxes[v], rtol=1e-5, atol=1e-4)


def test_slicing_and_masks_reject_bad_positions(model):
    with pytest.raises(ValueError, match=r"out of range for 6 outputs"):
        dspec.slice_head(model, [0, 6])
    with pytest.raises(ValueError, match="duplicates"):
        dspec.class_mask(NC, [1, 1])
    np.testing.assert_array_equal(dspec.head_channels(3, [2], 2), [0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 15])


def _torch_sgd_reference(params, grads_per_batch, cfg, *, batch_size, steps_per_epoch, total_batches):
    """YOLOv5's train.py loop in NumPy: param groups, warm-up interpolation, linear lr, nbs accumulation,
    torch's Nesterov SGD with coupled weight decay on kernels."""
    nbs = cfg.nbs
    accumulate = max(round(nbs / batch_size), 1)
    wd = cfg.weight_decay * batch_size * accumulate / nbs
    epochs = total_batches / steps_per_epoch
    warmup = max(round(cfg.warmup_epochs * steps_per_epoch), 100)
    group = {k: ("bias" if k.endswith("bias") else "bn" if k.endswith("bn/scale") else "w") for k in params}
    p = {k: v.astype(np.float64).copy() for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    acc = {k: np.zeros_like(v) for k, v in p.items()}
    last_opt = -1
    for ni, grads in enumerate(grads_per_batch):
        for k in p:
            acc[k] += grads[k]
        if ni - last_opt < accumulate:
            continue
        lf = (1 - (ni // steps_per_epoch) / epochs) * (1 - cfg.lrf) + cfg.lrf
        momentum = cfg.momentum
        lrs = {g: cfg.lr * lf for g in ("bias", "bn", "w")}
        if ni <= warmup:
            lrs = {
                g: np.interp(ni, [0, warmup], [cfg.warmup_bias_lr if g == "bias" else 0.0, cfg.lr * lf]) for g in lrs
            }
            momentum = np.interp(ni, [0, warmup], [cfg.warmup_momentum, cfg.momentum])
        for k, value in p.items():
            d = acc[k] + (wd * value if group[k] == "w" else 0)
            buf[k] = momentum * buf[k] + d
            p[k] = value - lrs[group[k]] * (d + momentum * buf[k])
            acc[k] = np.zeros_like(acc[k])
        last_opt = ni
    return p


def test_yolov5_sgd_matches_a_numpy_transcription_of_yolov5s_loop():
    rng = np.random.default_rng(0)
    params = {
        "layers": {
            "0": {
                "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
                "bn": {"scale": rng.normal(size=4).astype(np.float32), "bias": rng.normal(size=4).astype(np.float32)},
            },
            "24": {
                "m": {
                    "0": {
                        "kernel": rng.normal(size=(1, 1, 4, 9)).astype(np.float32),
                        "bias": rng.normal(size=9).astype(np.float32),
                    }
                }
            },
        }
    }
    cfg = yolov5_sgd_config(warmup_epochs=0.5)
    batch_size, steps_per_epoch, total = 16, 40, 240  # accumulate 4; warm-up max(20, 100) = 100 batches
    tx, schedule = dtrain.yolov5_sgd(
        cfg, params, batch_size=batch_size, steps_per_epoch=steps_per_epoch, total_steps=total
    )
    flat = lambda tree: {
        "/".join(str(k.key) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(tree)
    }
    grads = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params) for _ in range(total)]
    update = jax.jit(tx.update)
    state, p = tx.init(params), params
    for g in grads:
        u, state = update(g, state, p)
        p = jax.tree.map(lambda a, b: a + b, p, u)
    expected = _torch_sgd_reference(
        flat(params),
        [flat(g) for g in grads],
        cfg,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        total_batches=total,
    )
    for k, v in flat(p).items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # The logged rate of batch 0 is that of its update (batch 3, in warm-up); batch 200's is epoch 5's.
    np.testing.assert_allclose(float(schedule(0)), np.interp(3, [0, 100], [0, cfg.lr]), rtol=1e-6)
    np.testing.assert_allclose(float(schedule(200)), cfg.lr * ((1 - 5 / 6) * (1 - cfg.lrf) + cfg.lrf), rtol=1e-6)
