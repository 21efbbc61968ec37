"""The classic end-to-end check of a detector: YOLOv5n overfits 16 fixed scenes.

Target assignment, the loss, box decoding, NMS, the letterbox round trip and
COCO evaluation must all be right, and agree with each other, for a model to
reach a train-set mAP@0.5 near 1: a swapped axis or an offset grid in either
the assignment or the decoding, NMS suppressing the wrong boxes, or boxes
mapped back to the wrong frame each keep it far below. Everything runs
through the library's own code: the scenes pipeline (`data.train_iterator`,
every augmentation off so the images are fixed), the pure train step jitted as
the driver jits it, and `Evaluator` (YOLOv5 validation's NMS settings) on the
same 16 scenes. BatchNorm statistics are re-estimated for the final weights
before scoring (`jaxspec.train.batchnorm`): after 100 Adam steps from scratch
the running averages still describe much earlier weights (measured: mAP@0.5
0.01 with them, 0.98 re-estimated), which would make the check slow without
testing anything about detection.

Also here: the driver's BatchNorm re-estimation (`phase.reestimate_bn`) reads every batch of
detection scenes, not only the first.
"""

import types

import jax
import numpy as np
import pytest
from flax import nnx

from configs import common, detect_animals
from jaxspec import sharding
from jaxspec.detection import data
from jaxspec.detection import train as dtrain
from jaxspec.detection.task import Detection
from jaxspec.models.yolov5 import yolov5
from jaxspec.train import batchnorm, driver, steps
from jaxspec.train.state import create_state
from tests.synthetic_embedded import on_fixture, write_fixture

NUM_SCENES, SIZE, STEPS, LR = 16, 64, 100, 3e-3


class First:
    """The first `n` scenes of a detection source."""

    def __init__(self, source, n: int):
        self._source, self._n, self.info = source, n, source.info

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int):
        if not 0 <= index < self._n:
            raise IndexError(index)
        return self._source[index]

    @property
    def box_labels(self):
        return self._source.box_labels[: self._n]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_fixture(str(tmp_path_factory.mktemp("raw")), per_class=20)


def _fixed_scenes_config(manifest):
    config = on_fixture(detect_animals.get_config("tiny"), manifest)
    config.data.update(
        image_size=SIZE,
        mosaic=0.0,
        fliplr=0.0,
        hsv_h=0.0,
        hsv_s=0.0,
        hsv_v=0.0,
        degrees=0.0,
        translate=0.0,
        scale=0.0,
        shear=0.0,
    )
    config.eval = detect_animals.evaluation(batch_size=NUM_SCENES, max_nms=3000)  # YOLOv5 validation's NMS
    return config, First(data.get_source(config.data, "train"), NUM_SCENES)


def test_yolov5n_overfits_sixteen_scenes(manifest):
    config, source = _fixed_scenes_config(manifest)
    info, nc = source.info, source.info.num_classes
    num_boxes = sum(len(labels) for labels in source.box_labels)
    # One batch is all 16 scenes; with augmentation off it is the same letterboxed images every epoch.
    batch = next(iter(data.train_iterator(source, config.data, batch_size=NUM_SCENES, seed=0)))
    assert int(batch["mask"].sum()) == num_boxes >= 2 * NUM_SCENES  # no box dropped, several per scene

    mesh = sharding.make_mesh(jax.devices()[:1])
    phase = detect_animals.phase(steps=STEPS, batch_size=NUM_SCENES, optim=common.optimizer(optimizer="adam", lr=LR))
    model = yolov5("n", nc, rngs=nnx.Rngs(0))
    tx, schedule = dtrain.make_optimizer(phase, nnx.state(model, nnx.Param), steps_per_epoch=1)
    modeldef, state = create_state(model, tx, 0)
    state = sharding.place_state(state, mesh)
    step = steps.jit_train_step(
        dtrain.make_train_step(
            modeldef,
            tx,
            schedule,
            image_size=SIZE,
            mean=info.mean,
            std=info.std,
            hyp=dtrain.phase_hyp(config.hyp, num_classes=nc, image_size=SIZE),
            label_index=np.arange(nc),
            class_mask=np.ones(nc, bool),
        ),
        mesh,
    )
    evaluate = dtrain.Evaluator(
        modeldef,
        mesh=mesh,
        data_cfg=config.data,
        batch_size=NUM_SCENES,
        mean=info.mean,
        std=info.std,
        eval_cfg=config.eval,
    )

    before = evaluate(state, source, classes=tuple(range(nc)))
    on_device = sharding.put_batch(batch, mesh)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, on_device)
        losses.append(metrics["loss"])
    losses = np.asarray(jax.device_get(losses))
    state = batchnorm.reestimate(modeldef, state, [{"image": batch["image"]}], mesh=mesh, mean=info.mean, std=info.std)
    after = evaluate(state, source, classes=tuple(range(nc)))
    print(
        f"\n{NUM_SCENES} scenes, {num_boxes} boxes, {STEPS} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
        f"train-set mAP@0.5 {before['mAP50']:.4f} -> {after['mAP50']:.4f}, "
        f"mAP@0.5:0.95 {before['mAP50_95']:.4f} -> {after['mAP50_95']:.4f}"
    )
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
    assert before["mAP50"] < 0.1 and after["boxes"] == num_boxes and after["images"] == NUM_SCENES
    assert after["mAP50"] >= 0.9, after
    assert after["mAP50_95"] >= 0.5, after


def test_bn_reestimation_reads_every_batch_of_scenes(manifest):
    """A detection batch's `mask` marks box rows; the task's eval_iterator gives re-estimation per-image masks."""
    config, source = _fixed_scenes_config(manifest)
    model = yolov5("n", source.info.num_classes, rngs=nnx.Rngs(0))
    phase = detect_animals.phase(steps=1, batch_size=NUM_SCENES // 2, optim=common.optimizer())
    phase.reestimate_bn = True
    mesh = sharding.make_mesh(jax.devices()[:1])
    modeldef, state = create_state(
        model, dtrain.make_optimizer(phase, nnx.state(model, nnx.Param), steps_per_epoch=1)[0], 0
    )
    ctx = types.SimpleNamespace(config=config, mesh=mesh, info=source.info)
    got = driver.final_bn_stats(ctx, Detection(), modeldef, state, source, phase)
    halves = [{"image": b["image"]} for b in data.eval_iterator(source, config.data, batch_size=phase.batch_size)]
    assert len(halves) == 2
    want = batchnorm.reestimate(modeldef, state, halves, mesh=mesh, mean=source.info.mean, std=source.info.std)
    first = batchnorm.reestimate(modeldef, state, halves[:1], mesh=mesh, mean=source.info.mean, std=source.info.std)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got.batch_stats, want.batch_stats)
    assert not all(
        np.allclose(a, b) for a, b in zip(jax.tree.leaves(want.batch_stats), jax.tree.leaves(first.batch_stats))
    )
