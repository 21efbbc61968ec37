"""Sharded step == 1-device step; checkpoints resume at the right step and data."""

import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from configs.common import data as data_config
from configs.common import optimizer as optimizer_config
from jaxspec import models, sharding
from jaxspec.data import pipeline
from jaxspec.data.sources import ArraySource, DatasetInfo
from jaxspec.train import checkpoint, loop, optimizers, steps
from jaxspec.train.state import create_state

INFO = DatasetInfo("toy", tuple(f"c{i}" for i in range(5)), {}, (0.5,), (0.5,))


def toy_source(n=64, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n).astype(np.int32)
    images = (rng.random((n, 32, 32)) * 60 + labels[:, None, None] * 40).astype(np.uint8)
    return ArraySource(images, labels, INFO)


def make(mesh, lr=1e-3, seed=0, optimizer="adam"):
    model = models.mobilenet_v3_small(5, rngs=nnx.Rngs(seed), width_multiplier=0.25, num_blocks=4)
    tx, schedule = optimizers.make_optimizer(optimizer_config(optimizer=optimizer, lr=lr), 10)
    modeldef, state = create_state(model, tx, seed)
    state = sharding.replicate(state, mesh)
    step = steps.make_train_step(modeldef, tx, schedule, mean=(0.5,), std=(0.5,), label_smoothing=0.1)
    return state, steps.jit_train_step(step, mesh)


def test_sharded_step_equals_single_device_step():
    assert jax.device_count() == 8
    src = toy_source()
    cfg = data_config(image_size=32, flip=False, crop_padding=0)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.make_mesh(devices)
        # SGD: its update is linear in the gradient, so float-level differences in the
        # cross-device reductions stay float-level (Adam's first steps are ~sign(g)).
        state, train_step = make(mesh, lr=0.05, optimizer="sgd")
        it = pipeline.train_iterator(src, cfg, batch_size=16, seed=0)
        for _ in range(3):
            state, metrics = train_step(state, sharding.put_batch(next(it), mesh))
        results.append(jax.device_get((state.params, state.batch_stats, metrics)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), *results)


class _NullWriter:
    def write_scalars(self, step, scalars):
        pass

    def flush(self):
        pass


def test_checkpoint_resume_continues_at_same_step_and_data(tmp_path):
    mesh = sharding.make_mesh(jax.devices()[:1])
    src = toy_source()
    cfg = data_config(image_size=32)

    def run(num_steps):
        state, train_step = make(mesh)
        it = pipeline.train_iterator(src, cfg, batch_size=16, seed=1)
        ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
        if ckpt.latest_step() is not None:
            state = ckpt.restore(checkpoint.abstract_like(state), it)
        state = loop.fit(
            "t",
            state,
            train_step,
            it,
            num_steps=num_steps,
            batch_size=16,
            mesh=mesh,
            ckpt=ckpt,
            writer=_NullWriter(),
            log_every=2,
            checkpoint_every=3,
        )
        ckpt.close()
        return state, next(it)

    straight, straight_next = run(6)
    shutil.rmtree(tmp_path / "ckpt")
    first, _ = run(4)  # saves at step 3 and 4
    assert checkpoint.Checkpointer(tmp_path / "ckpt").latest_step() == 4
    resumed, resumed_next = run(6)
    assert int(resumed.step) == 6
    np.testing.assert_array_equal(straight_next["image"], resumed_next["image"])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        jax.device_get(straight.params),
        jax.device_get(resumed.params),
    )


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    mesh = sharding.make_mesh(jax.devices()[:1])
    state, train_step = make(mesh, lr=1e-3)
    it = pipeline.train_iterator(toy_source(), data_config(image_size=32), batch_size=16, seed=0)
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
    state = loop.fit(
        "t",
        state,
        train_step,
        it,
        num_steps=2,
        batch_size=16,
        mesh=mesh,
        ckpt=ckpt,
        writer=_NullWriter(),
        log_every=1,
        checkpoint_every=2,
    )
    poisoned = state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
    with pytest.raises(FloatingPointError, match="Non-finite.*at step 3.*step 2 verified"):
        loop.fit(
            "t",
            poisoned,
            train_step,
            it,
            num_steps=6,
            batch_size=16,
            mesh=mesh,
            ckpt=ckpt,
            writer=_NullWriter(),
            log_every=1,
            checkpoint_every=1,
        )
    ckpt.close()
    assert checkpoint.Checkpointer(tmp_path / "ckpt").latest_step() == 2


@pytest.mark.parametrize("name, message", [("lion", "Unknown optimizer 'lion'"), ("adam", "Unknown schedule 'wavy'")])
def test_optimizer_config_errors(name, message):
    cfg = optimizer_config(optimizer=name, schedule="wavy" if name == "adam" else "constant")
    with pytest.raises(ValueError, match=message):
        optimizers.make_optimizer(cfg, 10)


def test_step_schedule_with_warmup_and_noise_is_deterministic():
    cfg = optimizer_config(lr=0.1, schedule="step", warmup_steps=5, decay_every=10, decay_rate=0.5)
    _, lr = optimizers.make_optimizer(cfg, 100)
    np.testing.assert_allclose(
        [float(lr(s)) for s in (0, 5, 14, 15, 24, 25)], [0.0, 0.1, 0.1, 0.05, 0.05, 0.025], rtol=1e-6
    )
    cfg.noise_std = 0.1
    _, noisy = optimizers.make_optimizer(cfg, 100)
    a = [float(noisy(s)) for s in range(5, 40)]
    assert a == [float(noisy(s)) for s in range(5, 40)]
    assert a[0] == a[9] != 0.1  # constant within an interval, perturbed
    assert 0.5 < a[0] / 0.1 < 2.0
