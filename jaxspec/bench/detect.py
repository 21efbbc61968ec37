"""The detector's time: YOLOv5's train step against its input pipeline (mosaic, affine, HSV, flip) on scenes.

Issue 15 asks where a detection run's time goes. Both rows use the default
detection run's settings (`configs/detect_animals.py`: YOLOv5n, 96 px, batch
32, the embedded scenes' recipe), on scenes composed here from the embedded
train images when they are cached (synthetic 28x28 images otherwise, never
fetched). The pipeline row's ratio is pipeline ÷ train-step images/s: above 1
the step, not the data, bounds training.
"""

from __future__ import annotations

import os

import numpy as np
import optax
from flax import nnx

from jaxspec import models, sharding
from jaxspec.bench.benchmarks import embedded_cached
from jaxspec.bench.core import Settings, _compile, _rounds, _row, _timed, register
from jaxspec.data import embedded
from jaxspec.detection import data, scenes
from jaxspec.detection import train as dtrain
from jaxspec.detection.loss import DEFAULT_HYP
from jaxspec.train import steps
from jaxspec.train.state import create_state


class _Scenes:
    """Scenes composed in memory, as `scenes.SceneSource` serves them."""

    def __init__(self, composed: list[scenes.Scene]):
        self._scenes = composed
        self.info = scenes.scenes_info()

    def __len__(self) -> int:
        return len(self._scenes)

    def __getitem__(self, index: int) -> dict:
        s = self._scenes[index]
        return {"image": s.image, "boxes": s.boxes, "labels": s.labels}


def _scenes(quick: bool) -> tuple[_Scenes, str]:
    cfg = scenes.SceneConfig(canvas=(72, 120), scale=(12, 48))  # the default run's recipe
    if embedded_cached() and not quick:
        images, labels = embedded.load("train")
        what = "scenes of the embedded train images"
    else:
        rng = np.random.default_rng(0)
        images, labels = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8), np.arange(300) % 30
        what = "scenes of synthetic 28x28 images (embedded data not cached)"
    count = 64 if quick else 512
    return _Scenes([scenes.compose(images, labels, scenes.scene_rng(cfg, "train", i), cfg) for i in range(count)]), what


@register("detect")
def bench_detect(s: Settings) -> list[dict]:
    """YOLOv5n train step (loss, target assignment, Adam) vs the detection input pipeline, default run settings."""
    size, batch = (64, 8) if s.quick else (96, 32)
    source, what = _scenes(s.quick)
    cfg = data.default_config(image_size=size, max_boxes=32, num_threads=2, prefetch=8)
    mesh = sharding.make_mesh()
    it = data.train_iterator(source, cfg, batch_size=batch, seed=0)
    example = next(it)
    model = models.get_model("yolov5n", 30, rngs=nnx.Rngs(0), dtype=s.dtype)
    schedule = optax.constant_schedule(1e-3)  # the default generalist's Adam (its cosine costs nothing more)
    tx = optax.adam(schedule)
    modeldef, state = create_state(model, tx, 0)
    state = sharding.replicate(state, mesh)
    step = dtrain.make_train_step(
        modeldef,
        tx,
        schedule,
        image_size=size,
        hyp=dtrain.phase_hyp(DEFAULT_HYP, num_classes=30, image_size=size),
        mean=source.info.mean,
        std=source.info.std,
        label_index=np.arange(30),
        class_mask=np.ones(30, bool),
    )
    on_device = sharding.put_batch({k: example[k] for k in ("image", "boxes", "labels", "mask")}, mesh)
    compiled, compile_s, temp = _compile(steps.jit_train_step(step, mesh), state, on_device)
    holder = [state]

    def one():
        holder[0], metrics = compiled(holder[0], on_device)
        return metrics

    train = _rounds(s, _timed(one), None)
    # Rounds long against the batches made ahead (`prefetch`), after draining them: a sustained rate.
    per_round = max(s.steps, 2 * cfg.prefetch)
    _timed(lambda: next(it))(cfg.prefetch + s.warmup)
    rounds = [_timed(lambda: next(it))(per_round) / per_round for _ in range(s.repeats)]
    pipe = {"seconds": float(np.median(rounds)), "rounds": rounds}
    setting = f"YOLOv5n, {size}px, batch {batch}, 30 classes"
    step_rate = batch / train["seconds"]
    return [
        _row(
            "detect",
            setting,
            batch,
            train,
            compile_seconds=compile_s,
            xla_temp_mib=None if temp is None else temp / 2**20,
        ),
        _row(
            "pipeline",
            f"{setting}: detection input pipeline, mosaic {cfg.mosaic} + affine + HSV + flip, {what}",
            batch,
            pipe,
            ratio=batch / pipe["seconds"] / step_rate,
            train_step_img_s=step_rate,
            threads=cfg.num_threads,
            host_cores=os.cpu_count(),
        ),
    ]
