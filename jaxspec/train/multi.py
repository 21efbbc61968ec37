"""K specialists trained in one jitted step.

Specialists extracted from one generalist for subsets of equal size share an
architecture, so their train states stack along a new leading axis and
`jax.vmap` turns the ordinary single-model step (`steps.make_train_step`)
into one step over all K: one compilation and one dispatch per step instead
of K. Each specialist keeps its own data stream (its `ConstrainedSource`
through `pipeline.train_iterator`), seed, dropout keys and checkpoint
directory, so the result equals K separate runs with the same seeds, and each
checkpoint is an ordinary single-specialist checkpoint (a run can resume
either way).

Mesh: `spec_mesh` lays the devices out as ('spec', 'data'). The leading K
axis of states and batches is split over 'spec' (each device group holds
K / |spec| specialists), and every specialist's batch over 'data'. Subsets of
different sizes give different head shapes: `group_by_structure` splits the
models into groups that can be stacked; training one group per call is
cheaper than padding heads to the largest subset.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxspec import sharding
from jaxspec.data import pipeline
from jaxspec.models import describe
from jaxspec.train import checkpoint, freeze, loop, optimizers, steps, workdir
from jaxspec.train.state import ModelDef, TrainState, create_state

AXES = ("spec", "data")
log = logging.getLogger(__name__)


def spec_mesh(num_specialists: int, devices=None) -> jax.sharding.Mesh:
    """A ('spec', 'data') mesh with the largest 'spec' that divides both K and the device count.

    Multi-process runs keep 'spec' at 1 (every process feeds its shard of
    every specialist's batch), so process-local batches stay the layout
    `jax.make_array_from_process_local_data` expects.
    """
    devices = jax.devices() if devices is None else list(devices)
    spec = math.gcd(num_specialists, len(devices)) if jax.process_count() == 1 else 1
    # Auto axes: under vmap a batched kernel turns convolutions into grouped ones, whose reshapes
    # explicit sharding types cannot express; the compiler propagates from the jit's shardings.
    return jax.make_mesh((spec, len(devices) // spec), AXES, devices=devices, axis_types=(AxisType.Auto,) * 2)


def state_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("spec"))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("spec", "data"))


def stack(trees: Sequence):
    """Stacks equally shaped pytrees along a new leading axis."""
    return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *trees)


def unstack(tree, index: int):
    """Member `index` of a stacked pytree."""
    return jax.tree.map(lambda x: x[index], tree)


def group_by_structure(models: Sequence[nnx.Module]) -> list[list[int]]:
    """Indices of `models` grouped by identical structure (graph and shapes), in first-seen order."""
    groups: dict = {}
    for i, model in enumerate(models):
        graphdef, state = nnx.split(model)
        key = (graphdef, tuple((str(p), x.shape, x.dtype) for p, x in jax.tree.leaves_with_path(state)))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _check_stackable(models: Sequence[nnx.Module], names: Sequence[str]) -> None:
    groups = group_by_structure(models)
    if len(groups) > 1:
        detail = "; ".join(
            f"{[names[i] for i in g]}: {getattr(getattr(models[g[0]], 'head', None), 'out_features', '?')} outputs"
            for g in groups)
        raise ValueError(
            "Specialists trained together must share one architecture and head size; got groups "
            f"{detail}. Train each group separately (see group_by_structure).")


def make_multi_train_step(train_step: Callable) -> Callable:
    """`train_step` over stacked states and [K, B, ...] batches; metrics come back with a leading K axis."""
    return jax.vmap(train_step)


def jit_multi_train_step(multi_step: Callable, mesh: jax.sharding.Mesh) -> Callable:
    """Compiles `multi_step`: states split over 'spec' (and donated), batches over ('spec', 'data')."""
    st = state_sharding(mesh)
    return jax.jit(multi_step, in_shardings=(st, batch_sharding(mesh)), out_shardings=(st, st), donate_argnums=0)


def put_batches(batches: Sequence[dict[str, np.ndarray]], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This process's K batches -> global [K, B, ...] arrays."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.stack([b[k] for b in batches])) for k in batches[0]}


class _Specialists:
    """Per-specialist data iterators and checkpointers of one vmapped run."""

    def __init__(self, runner, names, models, sources, phase, seeds):
        self.names = list(names)
        self.iters = [pipeline.train_iterator(s, runner.config.data, batch_size=phase.batch_size, seed=seed)
                      for s, seed in zip(sources, seeds)]
        self.ckpts = [
            checkpoint.Checkpointer(runner.workdir / "checkpoints" / n,
                                    overwrite=runner.config.get("overwrite", False),
                                    fingerprint=workdir.phase_fingerprint(
                                        phase=phase, seed=seed, data_cfg=runner.config.data, source=s, start=m,
                                        spec=describe(m), columns=None,
                                        extendable=optimizers.length_free(phase.optim)))
            for n, m, s, seed in zip(self.names, models, sources, seeds)]

    def restore(self, states: list[TrainState]) -> list[TrainState]:
        """Restores every specialist at the newest step all of them have (or keeps `states`)."""
        latest = [c.latest_step() for c in self.ckpts]
        if any(s is None for s in latest):
            return states
        step = min(latest)
        restored = []
        for name, c, s, it in zip(self.names, self.ckpts, states, self.iters):
            try:
                restored.append(c.restore(checkpoint.abstract_like(s), it, step=step))
            except FileNotFoundError:
                raise ValueError(
                    f"Cannot resume the specialists together: {name!r} has no checkpoint at step {step} "
                    f"(latest steps {dict(zip(self.names, latest))}); they were trained apart since. "
                    "Continue them separately or remove the newer checkpoints.") from None
        log.info("%s: resumed from step %d", self.names, step)
        return restored

    def save(self, stacked: TrainState, force: bool) -> None:
        for i, (c, it) in enumerate(zip(self.ckpts, self.iters)):
            c.save(unstack(stacked, i), it, force=force)

    def close(self) -> None:
        for c in self.ckpts:
            c.close()


def train_specialists(runner, models: Sequence[nnx.Module], sources: Sequence, vals: Sequence | None,
                      phase, seeds: Sequence[int], names: Sequence[str]) -> list[tuple[ModelDef, TrainState]]:
    """Trains K same-shaped specialists together, as K `Runner.train_phase` calls would.

    `models[i]` trains on `sources[i]` with seed `seeds[i]` (parameters' RNG
    and data order), validating on `vals[i]` every `config.eval.every_steps`,
    checkpointing into `workdir/checkpoints/names[i]`. Returns one
    `(ModelDef, TrainState)` per specialist, replicated on `runner.mesh`.
    `phase.freeze` and `phase.freeze_bn_stats` apply as in `train_phase`;
    output suppression (`columns`) differs per specialist and is not offered.
    """
    k = len(models)
    if not k or not len(sources) == len(seeds) == len(names) == k or (vals is not None and len(vals) != k):
        raise ValueError(f"Need one source, seed and name (and val) per model; got {k} models, {len(sources)} "
                         f"sources, {len(seeds)} seeds, {len(names)} names, {None if vals is None else len(vals)} vals")
    if len(set(names)) != k:
        raise ValueError(f"Specialist names must be distinct (they name checkpoint dirs); got {list(names)}")
    _check_stackable(models, names)
    cfg = runner.config
    tx, schedule = optimizers.make_optimizer(phase.optim, phase.steps)
    tx = freeze.freeze(tx, nnx.state(models[0], nnx.Param), freeze.parse_patterns(phase.get("freeze", "")))
    created = [create_state(m, tx, seed) for m, seed in zip(models, seeds)]
    modeldef = created[0][0]
    states = [sharding.replicate(s, runner.mesh) for _, s in created]
    spec = _Specialists(runner, names, models, sources, phase, seeds)
    states = spec.restore(states)
    mesh = spec_mesh(k, runner.mesh.devices.flat)
    stacked = jax.device_put(stack(states), state_sharding(mesh))
    if int(states[0].step) < phase.steps:
        train_step = steps.make_train_step(modeldef, tx, schedule, mean=runner.info.mean, std=runner.info.std,
                                           label_smoothing=phase.label_smoothing,
                                           freeze_bn_stats=phase.get("freeze_bn_stats", False))
        multi_step = jit_multi_train_step(make_multi_train_step(train_step), mesh)
        eval_fn = None
        if vals is not None and cfg.eval.every_steps:
            def eval_fn(st):
                out = {}
                for i, (name, val) in enumerate(zip(names, vals)):
                    single = sharding.replicate(unstack(st, i), runner.mesh)
                    out[f"{name}/val_top1"] = runner.evaluator(modeldef, val.info.num_classes)(single, val)["top1"]
                return out
        stacked = fit(stacked, multi_step, spec, mesh, num_steps=phase.steps, batch_size=phase.batch_size,
                      writer=runner.writer, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                      eval_every=cfg.eval.every_steps, eval_fn=eval_fn)
    spec.close()
    return [(modeldef, sharding.replicate(unstack(stacked, i), runner.mesh)) for i in range(k)]


def _check_finite(step: int, metrics: dict[str, np.ndarray], spec: _Specialists) -> None:
    bad = [n for i, n in enumerate(spec.names)
           if not (np.isfinite(metrics["loss"][i]) and np.isfinite(metrics["grad_norm"][i]))]
    if bad:
        raise FloatingPointError(f"Non-finite loss or gradient for specialists {bad} at step {step}; stopping "
                                 f"({loop.last_good(spec.ckpts)}).")


def fit(stacked: TrainState, multi_step: Callable, spec: _Specialists, mesh: jax.sharding.Mesh, *,
        num_steps: int, batch_size: int, writer, log_every: int, checkpoint_every: int,
        eval_every: int = 0, eval_fn: Callable | None = None) -> TrainState:
    """`loop.fit` for K stacked specialists: one progress line (total images/s, mean loss and accuracy),
    per-specialist scalars, NaN guard naming the specialist, K checkpoints per save."""
    step = int(jax.device_get(stacked.step)[0])
    k = len(spec.names)
    label = f"{k} specialists"
    progress = loop.Progress(label, num_steps, step, batch_size * k)
    pending = None  # (step, metrics on device, dispatch time)

    def flush():
        nonlocal pending
        if pending is None:
            return
        at, metrics, t = pending
        metrics = {key: np.asarray(v) for key, v in jax.device_get(metrics).items()}
        pending = None
        _check_finite(at, metrics, spec)
        for i, name in enumerate(spec.names):
            writer.write_scalars(at, {f"{name}/train_{key}": float(v[i]) for key, v in metrics.items()})
        writer.write_scalars(at, {f"{label}/images_per_sec": progress.rate(at, t)})
        progress.update(at, t, {"loss": metrics["loss"].mean(), "acc": metrics["accuracy"].mean()})

    while step < num_steps:
        stacked, metrics = multi_step(stacked, put_batches([next(it) for it in spec.iters], mesh))
        step += 1
        save = step % checkpoint_every == 0 or step == num_steps
        if save or step % log_every == 0:
            flush()
            pending = (step, metrics, time.perf_counter())
        if save:
            flush()  # never checkpoint a state not known to be finite
            spec.save(stacked, force=step == num_steps)
            writer.flush()
        if eval_fn is not None and eval_every and (step % eval_every == 0 or step == num_steps):
            values = eval_fn(stacked)
            writer.write_scalars(step, values)
            progress.note(step, values)
    flush()
    progress.close()
    writer.flush()
    return stacked
