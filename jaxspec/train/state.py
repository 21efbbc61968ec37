"""The train state: plain pytrees split off an NNX model.

The jitted steps never see an `nnx.Module`; they get parameters and
BatchNorm statistics as `nnx.State` pytrees and rebuild the module inside the
trace with `nnx.merge`. Everything that changes during training lives in
`TrainState` and is checkpointed; the model's graph and its (unused) RNG
streams do not change and stay in `ModelDef`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key; per-step keys are fold_in(rng, step)
    # {'params', 'batch_stats'}: their moving average (`jaxspec.train.ema`), or None (off: not checkpointed)
    ema: Any = flax.struct.field(default=None, kw_only=True)


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of a split model."""

    graphdef: Any
    rest: nnx.State  # RNG streams etc.: carried along, never updated by a step

    def merge(self, params: nnx.State, batch_stats: nnx.State) -> nnx.Module:
        # copy=True: merging inside jax.grad under jit must not alias traced state.
        return nnx.merge(self.graphdef, params, batch_stats, self.rest, copy=True)


def split_model(model: nnx.Module) -> tuple[ModelDef, nnx.State, nnx.State]:
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return ModelDef(graphdef, rest), params, batch_stats


def create_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> tuple[ModelDef, TrainState]:
    """Splits `model` and builds a fresh train state (step 0) around it."""
    modeldef, params, batch_stats = split_model(model)
    state = TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
    return modeldef, state


def to_model(modeldef: ModelDef, state: TrainState) -> nnx.Module:
    """The model a state describes, in eval mode, for analysis and export."""
    model = modeldef.merge(state.params, state.batch_stats)
    model.eval()
    return model


def stack(trees):
    """Equally shaped pytrees stacked along a new leading axis (K specialists trained or run as one)."""
    return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *trees)


def unstack(tree, index: int):
    """Member `index` of a stacked pytree."""
    return jax.tree.map(lambda x: x[index], tree)
