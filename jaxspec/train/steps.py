"""Pure train and eval steps, and their jitted, sharded forms.

`train_step(state, batch) -> (state, metrics)` and
`eval_step(state, batch) -> metrics` are plain functions of pytrees; `jit_*`
compiles them with explicit `NamedSharding`s: batch split over the `data`
axis, state replicated and donated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxspec import sharding
from jaxspec.data.pipeline import normalize
from jaxspec.train.state import ModelDef, TrainState

Batch = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy against smoothed one-hot labels."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def make_train_step(
    modeldef: ModelDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    label_smoothing: float = 0.0,
    columns: Sequence[int] | None = None,
    freeze_bn_stats: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The step for one phase of training.

    `columns` is output suppression: only those logits enter the softmax and
    labels index into `columns`. Gathering S's columns is the same softmax as
    setting every other logit to -inf, and it makes label smoothing spread
    its mass over S only: suppressed classes get no probability and no
    gradient. `freeze_bn_stats` runs BatchNorm on its running averages
    (and leaves them unchanged) while dropout stays in training mode.
    """
    cols = None if columns is None else np.asarray(columns, np.int32)

    def train_step(state: TrainState, batch: Batch):
        x = normalize(batch["image"], mean, std)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def loss_fn(params):
            model = modeldef.merge(params, state.batch_stats)
            model.train()
            if freeze_bn_stats:
                model.set_attributes(use_running_average=True, raise_if_not_found=False)
            logits = model(x, rngs=nnx.Rngs(dropout=key))
            if cols is not None:
                logits = logits[:, cols]
            loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
            return loss, (logits, nnx.state(model, nnx.BatchStat))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return apply_gradients(
            state, tx, schedule, grads, batch_stats, loss=loss, accuracy=accuracy(logits, batch["label"])
        )

    return train_step


def apply_gradients(
    state: TrainState, tx: optax.GradientTransformation, schedule: optax.Schedule, grads, batch_stats, **metrics
) -> tuple[TrainState, dict]:
    """What every train step ends with: the optimizer update, the new BatchNorm statistics, and `metrics`
    (loss, accuracy, ...) with the gradient norm and the learning rate added."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    return new_state, {**metrics, "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state.step)}


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def make_eval_step(
    modeldef: ModelDef,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    columns: Sequence[int] | None = None,
    confusion: bool = False,
    per_example: bool = False,
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """Sums of correct predictions over a batch (masked for padding).

    With `columns`, only those logits compete (a generalist restricted to S:
    argmax over S's logits only), and labels index into `columns`.
    `num_classes` is the size of the label space being scored, for per-class counts.
    `confusion` adds the [true, predicted] count matrix (for confusion groupings).
    `per_example` adds each example's top-1 hit and mask, for paired tests over images.
    """
    cols = None if columns is None else np.asarray(columns, np.int32)

    def eval_step(state: TrainState, batch: Batch):
        model = modeldef.merge(state.params, state.batch_stats)
        model.eval()
        logits = model(normalize(batch["image"], mean, std))
        if cols is not None:
            logits = logits[:, cols]
        labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
        _, top2 = jax.lax.top_k(logits, 2)
        top1_hit = (top2[:, 0] == labels).astype(jnp.float32) * mask
        top2_hit = jnp.any(top2 == labels[:, None], axis=-1).astype(jnp.float32) * mask
        onehot = jax.nn.one_hot(labels, num_classes) * mask[:, None]
        out = {
            "count": mask.sum(),
            "top1": top1_hit.sum(),
            "top2": top2_hit.sum(),
            "loss": (cross_entropy(logits, labels) * mask).sum(),
            "class_count": onehot.sum(0),
            "class_top1": (onehot * top1_hit[:, None]).sum(0),
        }
        if confusion:
            out["confusion"] = jnp.matmul(
                onehot.T, jax.nn.one_hot(top2[:, 0], logits.shape[-1]), out_sharding=sharding.summed_over_rows(onehot)
            )
        if per_example:
            out["hits"], out["mask"] = top1_hit > 0, mask > 0
        return out

    return eval_step


def jit_train_step(train_step, mesh: jax.sharding.Mesh, state_sharding=None):
    """Compiles `train_step`: batch split over the mesh, state donated and kept where it is.

    `state_sharding`: a sharding (or a tree of them, e.g. `sharding.state_shardings`
    for FSDP) for the state in and out; default replicated.
    """
    rep = sharding.replicated(mesh)
    state_sharding = rep if state_sharding is None else state_sharding
    return jax.jit(
        train_step,
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, rep),
        donate_argnums=0,
    )


def jit_stacked_train_step(train_step, mesh: jax.sharding.Mesh):
    """Compiles `train_step` vmapped over K stacked states and [K, B, ...] batches on a `sharding.spec_mesh`:
    states split over 'spec' (and donated), batches over ('spec', 'data'); metrics come back with a leading K."""
    st = sharding.stacked_sharding(mesh)
    return jax.jit(
        jax.vmap(train_step),
        in_shardings=(st, sharding.stacked_batch_sharding(mesh)),
        out_shardings=(st, st),
        donate_argnums=0,
    )


def jit_eval_step(eval_step, mesh: jax.sharding.Mesh, state_sharding=None):
    """Compiles `eval_step`: batch split over the mesh, replicated sums out.

    `state_sharding=None` evaluates the state where it was placed (replicated by
    `sharding.replicate`, split by `sharding.place_state`), so one evaluator
    serves states of any optimizer and layout without gathering them.
    """
    return jax.jit(
        eval_step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)), out_shardings=sharding.replicated(mesh)
    )
