"""The one training driver: every phase of every task, alone or K at a time, is trained here.

A phase is: the task's optimizer (with `phase.freeze`), a fresh state placed
on the mesh (replicated, or split over 'fsdp'), the task's data iterator, a
checkpointer whose fingerprint says what the phase is, a restore when the
phase was started before, the task's pure step jitted with explicit
shardings, `loop.fit` with the task's validation, and, with
`phase.reestimate_bn`, BatchNorm statistics recomputed for the final weights.
With `phase.ema_decay` > 0 the step also keeps a moving average of the
weights (`jaxspec.train.ema`), which validation and the returned state (hence
evaluation, export, the next phase and BatchNorm re-estimation) use.

K members of equal architecture and phase (specialists of one parent) train
together: their states stack along a new leading axis and `jax.vmap` turns
the task's single-model step into one step over all K (one compilation, one
dispatch), on a ('spec', 'data') mesh (`sharding.spec_mesh`). Each member
keeps its own data stream, seed and checkpoint directory, so the result
equals K separate phases with the same seeds, and either way resumes the other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
from flax import nnx

from jaxspec import models, sharding
from jaxspec.train import batchnorm, checkpoint, ema, loop, steps, workdir
from jaxspec.train.context import RunContext
from jaxspec.train.state import ModelDef, TrainState, stack, unstack
from jaxspec.train.task import Outputs, Task


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of a phase: its checkpoint name, start, training and validation data, seed."""

    name: str
    model: nnx.Module
    source: object
    val: object | None
    seed: int


def train_phase(
    ctx: RunContext,
    name: str,
    model: nnx.Module,
    source,
    val,
    phase,
    seed: int,
    *,
    outputs: Outputs = Outputs(),
    task: Task | None = None,
    extra_eval: Callable[[TrainState], dict] | None = None,
) -> tuple[ModelDef, TrainState]:
    """Trains `model` on `source` for `phase.steps` (validating on `val` every `eval.every_steps`),
    checkpointing under workdir/checkpoints/<name>: a started phase resumes, a finished one only restores.

    `outputs` says which outputs are scored (output suppression); `task`
    defaults to the run's. `extra_eval(state) -> {name: value}` adds values to each validation.
    """
    return train_together(
        ctx, [Member(name, model, source, val, seed)], phase, outputs=outputs, task=task, extra_eval=extra_eval
    )[0]


def train_together(
    ctx: RunContext,
    members: Sequence[Member],
    phase,
    *,
    outputs: Outputs = Outputs(),
    task: Task | None = None,
    extra_eval: Callable | None = None,
) -> list[tuple[ModelDef, TrainState]]:
    """`train_phase` for each member, all K in one vmapped step when K > 1; one (ModelDef, state) per member,
    replicated on `ctx.mesh` (or placed as `sharding.fsdp` says, for K = 1)."""
    task = task or ctx.task
    _check_members(members)
    if extra_eval is not None and len(members) > 1:
        raise ValueError("extra_eval is for a single model's phase")
    cfg, first = ctx.config, members[0]
    phase = task.resolve(phase, first.source)
    wrapped = [task.wrap(ctx, m.model, m.seed) for m in members]
    tx, schedule = task.optimizer(ctx, phase, wrapped[0], first.source)
    created = [task.init_state(ctx, w, tx, m.seed) for w, m in zip(wrapped, members)]
    modeldef = created[0][0]
    decay = float(phase.get("ema_decay", 0.0))
    if decay:
        created = [(d, ema.init(s)) for d, s in created]
    place = sharding.place_state if len(members) == 1 else sharding.replicate
    states = [place(s, ctx.mesh) for _, s in created]
    iters = [task.train_iterator(ctx, m.source, phase.batch_size, m.seed) for m in members]
    ckpts = [
        checkpoint.Checkpointer(
            ctx.workdir / "checkpoints" / m.name,
            overwrite=cfg.get("overwrite", False),
            fingerprint=workdir.phase_fingerprint(
                phase=phase,
                seed=m.seed,
                data_cfg=cfg.data,
                source=m.source,
                start=w,
                spec=models.describe(m.model),
                **task.fingerprint(ctx, phase, outputs),
            ),
        )
        for m, w in zip(members, wrapped)
    ]
    states = _restore(members, ckpts, states, iters, phase.steps)
    if int(states[0].step) < phase.steps:
        step_fn = task.train_step(ctx, modeldef, tx, schedule, phase, outputs)
        if decay:
            step_fn = ema.with_ema(step_fn, decay, float(phase.get("ema_tau", ema.TAU)))
        scores = task.validator(ctx, modeldef, outputs)

        def validate(state, source):
            return scores(ema.averaged(state), source)

        evals = cfg.eval.every_steps if any(m.val is not None for m in members) else 0
        common = dict(
            num_steps=phase.steps,
            batch_size=phase.batch_size,
            writer=ctx.writer,
            log_every=cfg.log_every,
            checkpoint_every=cfg.checkpoint_every,
            eval_every=evals,
        )
        if len(members) == 1:
            jitted = steps.jit_train_step(step_fn, ctx.mesh, sharding.state_shardings(states[0], ctx.mesh))

            def eval_fn(s):
                return {**validate(s, first.val), **(extra_eval(s) if extra_eval else {})}

            states = [
                loop.fit(
                    first.name, states[0], jitted, iters[0], mesh=ctx.mesh, ckpt=ckpts[0], eval_fn=eval_fn, **common
                )
            ]
        else:
            smesh = sharding.spec_mesh(len(members), ctx.mesh.devices.flat)
            st = sharding.stacked_sharding(smesh)
            jitted = steps.jit_stacked_train_step(step_fn, smesh)

            def eval_fn(s):
                return [validate(sharding.replicate(unstack(s, i), ctx.mesh), m.val) for i, m in enumerate(members)]

            stacked = loop.fit(
                f"{len(members)} specialists",
                jax.device_put(stack(states), st),
                jitted,
                iters,
                mesh=smesh,
                ckpt=ckpts,
                eval_fn=eval_fn,
                members=[m.name for m in members],
                **common,
            )
            states = [sharding.replicate(unstack(stacked, i), ctx.mesh) for i in range(len(members))]
    for c in ckpts:
        c.close()
    states = [ema.averaged(s) for s in states]
    return [(modeldef, final_bn_stats(ctx, task, modeldef, s, m.source, phase)) for s, m in zip(states, members)]


def final_bn_stats(ctx: RunContext, task: Task, modeldef: ModelDef, state: TrainState, source, phase) -> TrainState:
    """`state`, with BatchNorm statistics recomputed on `source` for its final weights if
    `phase.reestimate_bn` (models trained from scratch, whose running averages lag the weights)."""
    if not phase.get("reestimate_bn", False):
        return state
    return batchnorm.reestimate(
        modeldef,
        state,
        task.eval_iterator(ctx, source, phase.batch_size),
        mesh=ctx.mesh,
        mean=ctx.info.mean,
        std=ctx.info.std,
    )


def _check_members(members: Sequence[Member]) -> None:
    names = [m.name for m in members]
    if not members or len(set(names)) != len(names):
        raise ValueError(f"Members of a phase need distinct names (they name checkpoint dirs); got {names}")
    if len(members) > 1:
        groups = group_by_structure([m.model for m in members])
        if len(groups) > 1:
            detail = "; ".join(
                f"{[names[i] for i in g]}: "
                f"{getattr(getattr(members[g[0]].model, 'head', None), 'out_features', '?')} outputs"
                for g in groups
            )
            raise ValueError(
                "Specialists trained together must share one architecture and head size; got groups "
                f"{detail}. Train each group separately (see group_by_structure)."
            )


def group_by_structure(modules: Sequence[nnx.Module]) -> list[list[int]]:
    """Indices of `modules` grouped by identical structure (graph and shapes), in first-seen order."""
    groups: dict = {}
    for i, module in enumerate(modules):
        graphdef, state = nnx.split(module)
        key = (graphdef, tuple((str(p), x.shape, x.dtype) for p, x in jax.tree.leaves_with_path(state)))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _restore(members, ckpts, states, iters, total: int) -> list[TrainState]:
    """Every member restored at the newest step all of them have (or `states` when one has none)."""
    latest = [c.latest_step() for c in ckpts]
    if any(s is None for s in latest):
        return states
    step, restored = min(latest), []
    for m, c, s, it in zip(members, ckpts, states, iters):
        try:
            restored.append(c.restore(checkpoint.abstract_like(s), it, step=step))
        except FileNotFoundError:
            raise ValueError(
                f"Cannot resume the specialists together: {m.name!r} has no checkpoint at step {step} "
                f"(latest steps {dict(zip([m.name for m in members], latest))}); they were trained apart since. "
                "Continue them separately or remove the newer checkpoints."
            ) from None
        loop.announce_restore(m.name, step, total)
    return restored
