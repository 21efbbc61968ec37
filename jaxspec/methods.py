"""Specialization methods: every way the paper (and its controls) turns a parent into a model for S.

All start from the same parent (the generalist, or a wider specialist for
gradual specialization) and differ in the model they start training from,
the data they see and the outputs that are scored:

- `extract`: the head's rows of S, fine-tuned on D_S (the paper's method).
- `fresh_head`: a new random |S|-way head, everything fine-tuned on D_S.
- `head_then_full`: a fresh head trained alone (body and BatchNorm statistics
  frozen) for `head_steps`, then everything.
- `scratch`: the same architecture from random init on D_S (`config.scratch`).
- `suppress`: all outputs kept; only S's logits enter the softmax (loss and
  prediction), so label smoothing never reaches suppressed classes.
- `dustbin`: S's rows plus an "everything else" output, trained on D_S plus a
  fraction `dustbin_fraction` of the other examples relabelled to it.
- `continued`: a control, not a specialist: the parent trained further on its
  own data with the specialist's steps and schedule, scored on S. It tells
  the gain of specialization from the gain of more training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import optax
from flax import nnx

from jaxspec import classification, models, sharding, specialize
from jaxspec.data.constrain import ConstrainedSource
from jaxspec.models import torchvision
from jaxspec.train import checkpoint, driver, freeze
from jaxspec.train.context import RunContext
from jaxspec.train.state import ModelDef, TrainState, create_state, to_model
from jaxspec.train.task import Outputs

METHODS = ("extract", "fresh_head", "head_then_full", "scratch", "suppress", "dustbin", "continued")


@dataclasses.dataclass(frozen=True)
class Trained:
    """A model and how to read its outputs.

    `classes[j]` is the global class of output j (-1 for a dustbin);
    `columns`, when set, are the outputs that compete on S (suppression).
    """

    modeldef: ModelDef
    state: TrainState
    classes: tuple[int, ...]
    columns: tuple[int, ...] | None = None

    @property
    def model(self) -> nnx.Module:
        return to_model(self.modeldef, self.state)

    @property
    def num_scored(self) -> int:
        return len(self.columns) if self.columns is not None else len(self.classes)


def frozen(ctx: RunContext, model: nnx.Module, classes: Sequence[int], columns=None) -> Trained:
    """Wraps an untrained model (e.g. the untuned extracted specialist) for evaluation."""
    modeldef, state = create_state(model, optax.identity(), 0)
    return Trained(modeldef, sharding.replicate(state, ctx.mesh), tuple(classes), columns)


def _load_generalist(config, num_classes: int) -> nnx.Module:
    """The generalist named by `config.generalist.init`: exported model or torchvision weights."""
    init = config.generalist.init
    if init.endswith(torchvision.SUFFIXES):
        model = models.load_torchvision_file(init, config.model.name, dtype=config.model.dtype)
    else:
        model, _ = checkpoint.load_model(init, dtype=config.model.dtype)
    got = model.head.out_features
    if got != num_classes:
        raise ValueError(
            f"generalist.init={init!r} has {got} classes but dataset {config.data.name!r} has {num_classes}"
        )
    return model


def generalist(ctx: RunContext, seed: int | None = None) -> Trained:
    """The generalist of `seed` (default `config.seed`), trained here (resuming) or loaded from
    `generalist.init` (the same for every seed); computed once per seed.

    Paired experiments train one per seed, so that seeds are independent
    replicates of the whole pipeline; `config.seed`'s is the phase `generalist`.
    """
    config, n = ctx.config, ctx.info.num_classes
    init = config.generalist.get("init", "")
    seed = config.seed if seed is None or init else int(seed)
    key = ("generalist", seed)
    if key not in ctx.cache:
        if init:
            ctx.cache[key] = frozen(ctx, _load_generalist(config, n), range(n))
        else:
            name = "generalist" if seed == config.seed else f"generalist-seed{seed}"
            d, s = driver.train_phase(
                ctx,
                name,
                ctx.task.new_model(ctx, n, seed),
                ctx.train,
                ctx.val,
                config.generalist,
                seed,
                outputs=Outputs.of(range(n)),
            )
            ctx.cache[key] = Trained(d, s, tuple(range(n)))
    return ctx.cache[key]


def evaluate_on(ctx: RunContext, trained: Trained, source: ConstrainedSource, per_example: bool = False) -> dict:
    """top-1/top-2/loss/per-class accuracy on `source` (labels are S's positions); `per_example` adds
    `hits`, each example's top-1 outcome in `source`'s order."""
    ev = classification.evaluator(
        ctx, trained.modeldef, trained.num_scored, columns=trained.columns, per_example=per_example
    )
    out = ev(trained.state, source)
    out["per_class_top1"] = out["per_class_top1"][: len(source.subset)]  # a dustbin is not a class of S
    return out


def _head_phase(phase: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    head = ml_collections.ConfigDict(phase.to_dict())
    head.steps = phase.head_steps
    head.optim.lr = phase.head_lr
    head.freeze = ",".join(freeze.HEAD_ONLY)
    head.freeze_bn_stats = True  # a frozen body includes its statistics
    return head


def specialize_from(
    ctx: RunContext,
    parent: Trained,
    subset: Sequence[int],
    method: str,
    *,
    seed: int,
    name: str,
    phase: ml_collections.ConfigDict | None = None,
) -> Trained:
    """Trains the `method` model for `subset` (global class indices) from `parent`.

    Checkpoints go under `name`, so calling again with the same name resumes
    or, when finished, only restores.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown specialization method {method!r}; choose one of {list(METHODS)}")
    phase = phase or ctx.config.specialize
    subset = tuple(int(c) for c in subset)
    pos = specialize.compose_subsets(parent.classes, subset)
    train_s, val_s = ConstrainedSource(ctx.train, subset), ConstrainedSource(ctx.val, subset)
    model = parent.model

    if method == "continued":
        home = ConstrainedSource(ctx.train, [c for c in parent.classes if c >= 0])
        val_home = ConstrainedSource(ctx.val, home.subset)
        d, s = driver.train_phase(ctx, name, model, home, val_home, phase, seed)
        return Trained(d, s, parent.classes, tuple(pos))
    if method == "suppress":
        d, s = driver.train_phase(ctx, name, model, train_s, val_s, phase, seed, outputs=Outputs.of(columns=pos))
        return Trained(d, s, parent.classes, tuple(pos))
    if method == "dustbin":
        start = specialize.add_dustbin(model, pos)
        data = ConstrainedSource(ctx.train, subset, dustbin=phase.dustbin_fraction, seed=seed)
        d, s = driver.train_phase(ctx, name, start, data, val_s, phase, seed)
        return Trained(d, s, (*subset, -1))
    start, phase = _start(ctx, parent, pos, train_s, val_s, method, seed, phase, name)
    d, s = driver.train_phase(ctx, name, start, train_s, val_s, phase, seed)
    return Trained(d, s, subset)


def _start(
    ctx: RunContext,
    parent: Trained,
    pos: Sequence[int],
    train_s: ConstrainedSource,
    val_s: ConstrainedSource,
    method: str,
    seed: int,
    phase,
    name: str,
):
    """The model that `extract`, `fresh_head`, `head_then_full` and `scratch` fine-tune, and their phase.

    `pos` are S's outputs in `parent`; `train_s`/`val_s` are D_S (the head-only phase trains on them)."""
    if method == "extract":
        return specialize.extract(parent.model, pos), phase
    if method == "scratch":
        return ctx.task.new_model(ctx, len(pos), seed), ctx.config.scratch
    start = specialize.fresh_head(parent.model, len(pos), rngs=nnx.Rngs(seed))
    if method == "head_then_full":
        d, s = driver.train_phase(ctx, f"{name}-head", start, train_s, val_s, _head_phase(phase), seed)
        start = to_model(d, s)
    return start, phase


@dataclasses.dataclass(frozen=True)
class Job:
    """One specialist `specialize_from(ctx, parent, subset, method, seed=seed, name=name, phase=phase)` would train."""

    subset: tuple[int, ...]
    method: str
    seed: int
    name: str
    phase: ml_collections.ConfigDict


VMAPPABLE = ("extract", "fresh_head", "scratch")


def train_together(ctx: RunContext, parent: Trained, jobs: Sequence[Job], max_k: int = 8) -> list[str]:
    """Trains not-yet-started jobs that share a method, phase and |S| in one vmapped step, up to `max_k` at once.

    Each lands in the checkpoint `specialize_from` would write under its name
    (equal to training it alone, `jaxspec.train.driver`), so a later
    `specialize_from` call only restores it. A job already under way is left
    to resume alone. Returns the names trained here.
    """
    batches: dict[tuple, list[Job]] = {}
    for job in {j.name: j for j in jobs}.values():
        ckpt_dir = ctx.workdir / "checkpoints" / job.name
        if job.method in VMAPPABLE and not (ckpt_dir.is_dir() and any(ckpt_dir.iterdir())):
            phase = ctx.config.scratch if job.method == "scratch" else job.phase
            key = (job.method, phase.to_json(sort_keys=True), len(job.subset))
            batches.setdefault(key, []).append(job)
    trained = []
    for group in batches.values():
        for i in range(0, len(group) if max_k > 1 else 0, max_k):
            chunk = group[i : i + max_k]
            if len(chunk) < 2:
                continue
            trains = [ConstrainedSource(ctx.train, j.subset) for j in chunk]
            vals = [ConstrainedSource(ctx.val, j.subset) for j in chunk]
            starts = [
                _start(
                    ctx,
                    parent,
                    specialize.compose_subsets(parent.classes, j.subset),
                    t,
                    v,
                    j.method,
                    j.seed,
                    j.phase,
                    j.name,
                )
                for j, t, v in zip(chunk, trains, vals)
            ]
            driver.train_together(
                ctx,
                [driver.Member(j.name, m, t, v, j.seed) for j, (m, _), t, v in zip(chunk, starts, trains, vals)],
                starts[0][1],
            )
            trained += [j.name for j in chunk]
    return trained


def restricted(trained: Trained, subset) -> Trained:
    """`trained` scored on `subset` only: the argmax over S's outputs."""
    return dataclasses.replace(trained, columns=tuple(specialize.compose_subsets(trained.classes, subset)))
