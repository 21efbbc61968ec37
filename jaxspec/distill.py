"""SKD: specialization by knowledge distillation from a larger, frozen generalist.

The student specialist (|S| outputs, trained on D_S) minimizes

    CE + (λ/2) Σ_i β^(L-1-i) (‖FM_T^i − FM_S^i‖² + | ‖TM_T^i‖_σ − ‖TM_S^i‖_σ |)

over L matched layers i = 0..L-1 in forward order, β > 1 weighting the early
ones most. FM^i are the feature maps at the matched layer names; the
student's pass through a trainable 1x1 adapter where channel counts differ
and a bilinear resize where spatial sizes differ, so both terms compare maps
of the teacher's shape. TM^i is a map as a channels x positions matrix and
‖·‖_σ its spectral norm, found by power iteration. Each term is computed
per example and averaged over the batch; with `normalize` (the default) it is
also divided by the map's size (the square root of it for the norm term), so
λ means the same at every layer and resolution.

The teacher runs in eval mode (BatchNorm running averages, no dropout) under
`stop_gradient` and its parameters are never differentiated. It travels in the
train state (`DistillState`) rather than in a closure, because jit embeds
closed-over arrays into the compiled program as constants.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxspec.classification import Classification
from jaxspec.data import pipeline
from jaxspec.models import layers
from jaxspec.train import freeze, optimizers, steps, workdir
from jaxspec.train.state import ModelDef, TrainState, create_state
from jaxspec.train.task import Outputs

Pairs = tuple[tuple[str, str], ...]  # (teacher layer, student layer) in forward order


def spectral_norm(m: jax.Array, num_iters: int = 20) -> jax.Array:
    """Largest singular value of each matrix in `m` [..., R, C] by power iteration.

    Iterates on the smaller Gram matrix. The iterate is held constant under
    differentiation, so the gradient is u vᵀ at the estimate: the exact
    gradient once the iteration has converged.
    """
    a = m if m.shape[-1] <= m.shape[-2] else jnp.swapaxes(m, -1, -2)  # [..., big, small]
    gram = jax.lax.stop_gradient(jnp.swapaxes(a, -1, -2) @ a)
    start = jax.random.normal(jax.random.key(0), (a.shape[-1],), a.dtype)

    def step(_, v):
        v = jnp.einsum("...ij,...j->...i", gram, v)
        return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-30)

    v = jax.lax.fori_loop(0, num_iters, step, jnp.broadcast_to(start, a.shape[:-2] + start.shape))
    return jnp.linalg.norm(jnp.einsum("...ij,...j->...i", a, jax.lax.stop_gradient(v)), axis=-1)


def distill_loss(
    teacher_feats: Sequence[jax.Array],
    student_feats: Sequence[jax.Array],
    *,
    beta: float,
    num_iters: int = 20,
    normalize: bool = True,
) -> jax.Array:
    """Σ_i β^(L-1-i) (FM term + spectral-norm term), batch-averaged; the sum that λ/2 multiplies.

    Feature maps are [N, ..., C] in forward order, the student's already in
    the teacher's shape; the teacher's get no gradient.
    """
    if beta <= 1:
        raise ValueError(f"SKD needs beta > 1, got {beta}")
    if len(teacher_feats) != len(student_feats) or not teacher_feats:
        raise ValueError(f"Need the same non-zero number of maps, got {len(teacher_feats)} and {len(student_feats)}")
    num = len(teacher_feats)
    total = jnp.zeros((), jnp.float32)
    for i, (t, s) in enumerate(zip(teacher_feats, student_feats)):
        if t.shape != s.shape:
            raise ValueError(f"Matched layer {i}: teacher map {t.shape} vs student map {s.shape}")
        t = jax.lax.stop_gradient(t).reshape(t.shape[0], -1, t.shape[-1])  # [N, positions, channels]
        s = s.reshape(t.shape)
        fm = jnp.sum(jnp.square(t - s), axis=(1, 2))
        sn = jnp.abs(spectral_norm(t, num_iters) - spectral_norm(s, num_iters))
        if normalize:
            size = t.shape[1] * t.shape[2]
            fm, sn = fm / size, sn / math.sqrt(size)
        total = total + beta ** (num - 1 - i) * jnp.mean(fm + sn)
    return total


def parse_pairs(spec: str | Sequence[str]) -> Pairs:
    """'block2,block11:block7,last_conv' -> ((block2, block2), (block11, block7), (last_conv, last_conv))."""
    items = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    pairs = tuple((t.strip(), (s or t).strip()) for t, _, s in (p.partition(":") for p in items if p))
    if not pairs:
        raise ValueError(f"No layers to distil in {spec!r}; write 'teacher_layer:student_layer,...' or shared names")
    return pairs


def _check_layers(model: nnx.Module, names: Sequence[str], role: str) -> None:
    valid = [n for n in model.layer_names if n != "logits"]
    for n in names:
        if n not in valid:
            raise ValueError(f"Unknown {role} layer {n!r} to distil; valid: {valid}")
    order = [valid.index(n) for n in names]
    if order != sorted(order):
        raise ValueError(f"{role} layers {list(names)} are not in forward order (β weights layers by position)")


class DistillStudent(nnx.Module):
    """The student plus its adapters. Called like the student (logits), so evaluators take it as it is."""

    def __init__(self, model: nnx.Module, pairs: Pairs, adapters: dict[str, layers.Conv1x1]):
        self.model = model
        self.pairs = pairs
        self.adapters = nnx.Dict(adapters)  # by student layer name; absent where channel counts match

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.model(x, rngs=rngs)

    def matched(self, x: jax.Array, shapes: Sequence[tuple[int, ...]], *, rngs: nnx.Rngs | None = None):
        """(logits, student maps brought to the teacher's per-example `shapes`)."""
        names = [s for _, s in self.pairs]
        out = self.model.intermediates(x, [*names, "logits"], rngs=rngs)
        feats = []
        for (t, s), shape in zip(self.pairs, shapes):
            f = self.adapters[f"{s}>{t}"](out[s]) if f"{s}>{t}" in self.adapters else out[s]
            if f.shape[1:] != tuple(shape):
                f = jax.image.resize(f, (f.shape[0], *shape), "bilinear")
            feats.append(f)
        return out["logits"], feats


def make_student(
    model: nnx.Module, teacher: nnx.Module, pairs: Pairs, *, image_size: int, rngs: nnx.Rngs, in_channels: int = 3
) -> DistillStudent:
    """Wraps `model` with a 1x1 adapter (with bias) for every matched layer whose channel count differs."""
    _check_layers(teacher, [t for t, _ in pairs], "teacher")
    _check_layers(model, [s for _, s in pairs], "student")
    x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)

    def shapes(m, names):
        graphdef, state = nnx.split(m)

        def run(state, x):
            net = nnx.merge(graphdef, state, copy=True)
            net.eval()
            return net.intermediates(x, names)

        return {k: v.shape for k, v in jax.eval_shape(run, state, x).items()}

    t_shapes = shapes(teacher, [t for t, _ in pairs])
    s_shapes = shapes(model, [s for _, s in pairs])
    adapters = {
        f"{s}>{t}": layers.Conv1x1(s_shapes[s][-1], t_shapes[t][-1], use_bias=True, rngs=rngs)
        for t, s in pairs
        if s_shapes[s][-1] != t_shapes[t][-1]
    }
    return DistillStudent(model, tuple(pairs), adapters)


def skd_objective(
    student: DistillStudent,
    teacher: nnx.Module,
    x: jax.Array,
    labels: jax.Array,
    *,
    lam: float,
    beta: float,
    label_smoothing: float = 0.0,
    num_iters: int = 20,
    normalize: bool = True,
    rngs: nnx.Rngs | None = None,
):
    """CE + (λ/2)·distill_loss for modules in whatever mode the caller set; returns (loss, (logits, ce, kd))."""
    t_names = [t for t, _ in student.pairs]
    t_out = teacher.intermediates(x, t_names)
    t_feats = [jax.lax.stop_gradient(t_out[n]) for n in t_names]
    logits, s_feats = student.matched(x, [f.shape[1:] for f in t_feats], rngs=rngs)
    ce = steps.cross_entropy(logits, labels, label_smoothing).mean()
    kd = distill_loss(t_feats, s_feats, beta=beta, num_iters=num_iters, normalize=normalize)
    return ce + 0.5 * lam * kd, (logits, ce, kd)


@flax.struct.dataclass
class DistillState(TrainState):
    """A student's train state carrying the frozen teacher (never updated by a step)."""

    teacher_params: nnx.State
    teacher_stats: nnx.State


def create_distill_state(
    student: DistillStudent,
    teacher_def: ModelDef,
    teacher_state: TrainState,
    tx: optax.GradientTransformation,
    seed: int,
) -> tuple[ModelDef, DistillState]:
    """A fresh (step 0) state for `student` with the teacher's parameters and statistics alongside."""
    student_def, s = create_state(student, tx, seed)
    state = DistillState(
        step=s.step,
        params=s.params,
        batch_stats=s.batch_stats,
        opt_state=s.opt_state,
        rng=s.rng,
        teacher_params=teacher_state.params,
        teacher_stats=teacher_state.batch_stats,
    )
    return student_def, state


def make_skd_train_step(
    student_def: ModelDef,
    teacher_def: ModelDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    lam: float,
    beta: float,
    label_smoothing: float = 0.0,
    num_iters: int = 20,
    normalize: bool = True,
):
    """`train_step(state: DistillState, batch) -> (state, metrics)`; jit it with `steps.jit_train_step`.

    Gradients are taken with respect to the student's and adapters'
    parameters only; the teacher's parameters and statistics pass through unchanged.
    """

    def train_step(state: DistillState, batch):
        x = pipeline.normalize(batch["image"], mean, std)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        teacher = teacher_def.merge(state.teacher_params, state.teacher_stats)
        teacher.eval()

        def loss_fn(params):
            student = student_def.merge(params, state.batch_stats)
            student.train()
            loss, aux = skd_objective(
                student,
                teacher,
                x,
                batch["label"],
                lam=lam,
                beta=beta,
                label_smoothing=label_smoothing,
                num_iters=num_iters,
                normalize=normalize,
                rngs=nnx.Rngs(dropout=key),
            )
            return loss, (aux, nnx.state(student, nnx.BatchStat))

        (loss, ((logits, ce, kd), batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return steps.apply_gradients(
            state,
            tx,
            schedule,
            grads,
            batch_stats,
            loss=loss,
            ce=ce,
            distill=kd,
            accuracy=steps.accuracy(logits, batch["label"]),
        )

    return train_step


class Distillation(Classification):
    """The SKD task: a classification student trained with the loss above against a frozen teacher.

    The driver trains it like any phase (`phase.freeze`, `sharding.fsdp`,
    checkpoints and resume, `phase.reestimate_bn`); the student gains its
    adapters in `wrap`, the teacher rides in the state (`DistillState`), and
    the fingerprint adds the SKD settings and the teacher's weights.
    `skd` holds layers, lam, beta, power_iters, normalize.
    """

    def __init__(self, teacher_def: ModelDef, teacher_state: TrainState, skd):
        self.teacher_def, self.teacher_state, self.skd = teacher_def, teacher_state, skd

    def wrap(self, ctx, model, seed):
        teacher = self.teacher_def.merge(self.teacher_state.params, self.teacher_state.batch_stats)
        return make_student(
            model, teacher, parse_pairs(self.skd.layers), image_size=ctx.config.data.image_size, rngs=nnx.Rngs(seed)
        )

    def optimizer(self, ctx, phase, model, source):
        """`phase.freeze` names the student's parameters as in any phase; the adapters always train."""
        tx, schedule = optimizers.make_optimizer(phase.optim, phase.steps)
        patterns = [freeze.under("model", p) for p in freeze.parse_patterns(phase.get("freeze", ""))]
        return freeze.freeze(tx, nnx.state(model, nnx.Param), patterns), schedule

    def init_state(self, ctx, model, tx, seed):
        return create_distill_state(model, self.teacher_def, self.teacher_state, tx, seed)

    def train_step(self, ctx, modeldef, tx, schedule, phase, outputs: Outputs):
        if outputs.columns is not None:
            raise ValueError("SKD students have |S| outputs; output suppression does not apply")
        skd = self.skd
        return make_skd_train_step(
            modeldef,
            self.teacher_def,
            tx,
            schedule,
            mean=ctx.info.mean,
            std=ctx.info.std,
            lam=skd.lam,
            beta=skd.beta,
            label_smoothing=phase.label_smoothing,
            num_iters=skd.power_iters,
            normalize=skd.normalize,
        )

    def fingerprint(self, ctx, phase, outputs: Outputs) -> dict:
        teacher = self.teacher_def.merge(self.teacher_state.params, self.teacher_state.batch_stats)
        return {
            "extendable": optimizers.length_free(phase.optim),
            "skd": self.skd.to_dict(),
            "teacher_weights": workdir.weights_digest(teacher),
        }


def student_params(model: nnx.Module) -> int:
    """Parameter count of the deployed network (a `DistillStudent`'s adapters are for training only)."""
    net = model.model if isinstance(model, DistillStudent) else model
    return int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(net, nnx.Param))))
