"""An exponential moving average of the weights, as a pure transform of a train step (YOLOv5's ModelEMA).

After every step the average moves towards the new weights by 1 - d(t),
d(t) = decay * (1 - exp(-t / tau)) for update t: small at first, so the
average forgets its random start quickly, then `decay`. Parameters and
BatchNorm running statistics are both averaged (YOLOv5 averages every
floating-point entry of the state dict). Evaluation, export and the next
phase use the average (`averaged`); training continues from the raw weights,
which the checkpoint keeps beside it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxspec.train.state import TrainState

TAU = 2000.0  # YOLOv5's ramp: d(t) reaches 63% of `decay` after 2,000 updates


def init(state: TrainState) -> TrainState:
    """`state` with an average that starts at its weights."""
    return state.replace(ema={"params": state.params, "batch_stats": state.batch_stats})


def decay_at(step: jax.Array, decay: float, tau: float) -> jax.Array:
    """d(t): the weight of the old average after update `step` (1-based)."""
    return decay * (1.0 - jnp.exp(-step.astype(jnp.float32) / tau))


def with_ema(train_step: Callable, decay: float, tau: float) -> Callable:
    """`train_step` that also moves `state.ema` towards the new weights (see the module docstring)."""

    def step(state: TrainState, batch):
        new, metrics = train_step(state, batch)
        d = decay_at(new.step, decay, tau)
        target = {"params": new.params, "batch_stats": new.batch_stats}
        ema = jax.tree.map(lambda e, x: (d * e + (1.0 - d) * x).astype(e.dtype), state.ema, target)
        return new.replace(ema=ema), metrics

    return step


def averaged(state: TrainState) -> TrainState:
    """The state to evaluate and export: the average as its weights (unchanged without an average)."""
    if state.ema is None:
        return state
    return state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"], ema=None)
