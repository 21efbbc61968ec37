"""The moving average of the weights (`phase.ema_decay`): YOLOv5's ramp, the driver's use of it, resumption."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.common import optimizer as optimizer_config
from configs.common import phase as phase_config
from jaxspec import validate
from jaxspec.train import checkpoint, driver, ema
from jaxspec.train.state import TrainState
from tests.test_multi import EPS, _context, specialists, toy_source


def _raw_state(value: float) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params={"w": jnp.full((3,), value)},
        batch_stats={"mean": jnp.full((2,), value)},
        opt_state=(),
        rng=jnp.zeros((2,), jnp.uint32),
    )


def _reference(values, decay, tau):
    """YOLOv5's ModelEMA.update written out: updates += 1, d = decay (1 - exp(-updates / tau)), v = d v + (1 - d) x."""
    v = values[0]
    for updates, x in enumerate(values[1:], start=1):
        d = decay * (1 - np.exp(-updates / tau))
        v = d * v + (1 - d) * x
    return v


def test_the_average_follows_yolov5s_ramp_over_params_and_statistics():
    rng = np.random.default_rng(0)
    targets = rng.normal(size=6).astype(np.float32)

    def step(state, batch):  # a "training step" that jumps to the batch's value
        return state.replace(
            step=state.step + 1, params={"w": jnp.full((3,), batch)}, batch_stats={"mean": jnp.full((2,), batch)}
        ), {}

    state = ema.init(_raw_state(1.5))
    stepped = jax.jit(ema.with_ema(step, 0.9, 2.0))
    for t in targets:
        state, _ = stepped(state, t)
    want = _reference([1.5, *targets], 0.9, 2.0)
    np.testing.assert_allclose(state.ema["params"]["w"], want, rtol=1e-6)
    np.testing.assert_allclose(state.ema["batch_stats"]["mean"], want, rtol=1e-6)
    np.testing.assert_allclose(state.params["w"], targets[-1])  # training goes on from the raw weights
    out = ema.averaged(state)
    assert out.ema is None and np.allclose(out.params["w"], want) and np.allclose(out.batch_stats["mean"], want)
    assert ema.averaged(_raw_state(2.0)).params["w"][0] == 2.0  # no average: unchanged


def _phase(steps, decay):
    phase = phase_config(steps=steps, batch_size=16, label_smoothing=0.1, optim=optimizer_config(lr=1e-2, eps=EPS))
    phase.ema_decay, phase.ema_tau = decay, 2.0
    return phase


def _train(workdir, phase, extra_eval=None):
    src, val = toy_source(), toy_source(48, seed=1)
    ctx = _context(workdir, jax.devices()[:1])  # one device: the average, not the sharding, is under test
    ctx.config.eval.every_steps = 1
    return driver.train_phase(ctx, "m", specialists()[0], src, val, phase, 1, extra_eval=extra_eval)[1]


def test_the_driver_returns_the_average_and_resumes_it(tmp_path):
    raw = []  # the raw weights after each step, as validation sees the state

    def capture(state):
        raw.append(jax.device_get(state.params))
        return {}

    whole = jax.device_get(_train(tmp_path / "whole", _phase(3, 0.9), capture))
    assert whole.ema is None and int(whole.step) == 3 and len(raw) == 3
    # The returned weights are the ramped average of the raw trajectory, not the raw weights.
    init_params = jax.device_get(nnx.state(specialists()[0], nnx.Param))
    want = jax.tree.map(lambda *xs: _reference(list(xs), 0.9, 2.0), init_params, *raw)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), whole.params, want)
    assert not np.allclose(jax.tree.leaves(whole.params)[0], jax.tree.leaves(raw[-1])[0])
    # Stopped after step 2 and resumed: the average was checkpointed beside the raw weights.
    _train(tmp_path / "resumed", _phase(2, 0.9))
    resumed = jax.device_get(_train(tmp_path / "resumed", _phase(3, 0.9)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), resumed.params, whole.params)


def test_a_checkpoint_written_before_the_average_existed_restores(tmp_path, monkeypatch):
    phase = _phase(2, 0.0)
    # The layout of checkpoints written before `TrainState.ema`: the dataclass itself was saved.
    monkeypatch.setattr(checkpoint, "_fields", _old)
    before = jax.device_get(_train(tmp_path, phase))
    monkeypatch.undo()
    again = jax.device_get(_train(tmp_path, phase))  # restores the finished phase
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), again, before)


@flax.struct.dataclass
class OldTrainState:
    step: jax.Array
    params: object
    batch_stats: object
    opt_state: object
    rng: jax.Array


def _old(state):
    return OldTrainState(state.step, state.params, state.batch_stats, state.opt_state, state.rng)


@pytest.mark.parametrize("bad", [1.0, -0.1])
def test_a_decay_outside_0_1_is_a_config_error(bad):
    phase = _phase(2, bad)
    with pytest.raises(validate.ConfigError, match="ema_decay"):
        validate.check_phase("generalist", phase)
