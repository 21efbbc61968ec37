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

from jaxspec import sharding, specialize
from jaxspec.data.constrain import ConstrainedSource
from jaxspec.train import freeze, multi
from jaxspec.train.state import ModelDef, TrainState, create_state, to_model

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


def frozen(r, model: nnx.Module, classes: Sequence[int], columns=None) -> Trained:
    """Wraps an untrained model (e.g. the untuned extracted specialist) for evaluation."""
    modeldef, state = create_state(model, optax.identity(), 0)
    return Trained(modeldef, sharding.replicate(state, r.mesh), tuple(classes), columns)


def evaluate_on(r, trained: Trained, source: ConstrainedSource, per_example: bool = False) -> dict:
    """top-1/top-2/loss/per-class accuracy on `source` (labels are S's positions); `per_example` adds
    `hits`, each example's top-1 outcome in `source`'s order."""
    ev = r.evaluator(trained.modeldef, trained.num_scored, columns=trained.columns, per_example=per_example)
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


def specialize_from(r, parent: Trained, subset: Sequence[int], method: str, *, seed: int, name: str,
                    phase: ml_collections.ConfigDict | None = None) -> Trained:
    """Trains the `method` model for `subset` (global class indices) from `parent`.

    Checkpoints go under `name`, so calling again with the same name resumes
    or, when finished, only restores.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown specialization method {method!r}; choose one of {list(METHODS)}")
    phase = phase or r.config.specialize
    subset = tuple(int(c) for c in subset)
    pos = specialize.compose_subsets(parent.classes, subset)
    train_s, val_s = ConstrainedSource(r.train, subset), ConstrainedSource(r.val, subset)
    model = parent.model

    if method == "continued":
        home = ConstrainedSource(r.train, [c for c in parent.classes if c >= 0])
        val_home = ConstrainedSource(r.val, home.subset)
        d, s = r.train_phase(name, model, home, val_home, phase, seed)
        return Trained(d, s, parent.classes, tuple(pos))
    if method == "suppress":
        d, s = r.train_phase(name, model, train_s, val_s, phase, seed, columns=pos)
        return Trained(d, s, parent.classes, tuple(pos))
    if method == "dustbin":
        start = specialize.add_dustbin(model, pos)
        data = ConstrainedSource(r.train, subset, dustbin=phase.dustbin_fraction, seed=seed)
        d, s = r.train_phase(name, start, data, val_s, phase, seed)
        return Trained(d, s, (*subset, -1))
    start, phase = _start(r, parent, pos, train_s, val_s, method, seed, phase, name)
    d, s = r.train_phase(name, start, train_s, val_s, phase, seed)
    return Trained(d, s, subset)


def _start(r, parent: Trained, pos: Sequence[int], train_s: ConstrainedSource, val_s: ConstrainedSource,
           method: str, seed: int, phase, name: str):
    """The model that `extract`, `fresh_head`, `head_then_full` and `scratch` fine-tune, and their phase.

    `pos` are S's outputs in `parent`; `train_s`/`val_s` are D_S (the head-only phase trains on them)."""
    if method == "extract":
        return specialize.extract(parent.model, pos), phase
    if method == "scratch":
        return r.new_model(len(pos), seed), r.config.scratch
    start = specialize.fresh_head(parent.model, len(pos), rngs=nnx.Rngs(seed))
    if method == "head_then_full":
        d, s = r.train_phase(f"{name}-head", start, train_s, val_s, _head_phase(phase), seed)
        start = to_model(d, s)
    return start, phase


@dataclasses.dataclass(frozen=True)
class Job:
    """One specialist `specialize_from(r, parent, subset, method, seed=seed, name=name, phase=phase)` would train."""

    subset: tuple[int, ...]
    method: str
    seed: int
    name: str
    phase: ml_collections.ConfigDict


VMAPPABLE = ("extract", "fresh_head", "scratch")


def train_together(r, parent: Trained, jobs: Sequence[Job], max_k: int = 8) -> list[str]:
    """Trains not-yet-started jobs that share a method, phase and |S| in one vmapped step, up to `max_k` at once.

    Each lands in the checkpoint `specialize_from` would write under its name
    (equal to training it alone, `jaxspec.train.multi`), so a later
    `specialize_from` call only restores it. A job already under way is left
    to resume alone. Returns the names trained here.
    """
    batches: dict[tuple, list[Job]] = {}
    for job in {j.name: j for j in jobs}.values():
        ckpt_dir = r.workdir / "checkpoints" / job.name
        if job.method in VMAPPABLE and not (ckpt_dir.is_dir() and any(ckpt_dir.iterdir())):
            phase = r.config.scratch if job.method == "scratch" else job.phase
            key = (job.method, phase.to_json(sort_keys=True), len(job.subset))
            batches.setdefault(key, []).append(job)
    trained = []
    for group in batches.values():
        for i in range(0, len(group) if max_k > 1 else 0, max_k):
            chunk = group[i:i + max_k]
            if len(chunk) < 2:
                continue
            trains = [ConstrainedSource(r.train, j.subset) for j in chunk]
            vals = [ConstrainedSource(r.val, j.subset) for j in chunk]
            starts = [_start(r, parent, specialize.compose_subsets(parent.classes, j.subset), t, v, j.method, j.seed,
                             j.phase, j.name) for j, t, v in zip(chunk, trains, vals)]
            multi.train_specialists(r, [m for m, _ in starts], trains, vals, starts[0][1], [j.seed for j in chunk],
                                    [j.name for j in chunk])
            trained += [j.name for j in chunk]
    return trained


def restricted(trained: Trained, subset) -> Trained:
    """`trained` scored on `subset` only: the argmax over S's outputs."""
    return dataclasses.replace(trained, columns=tuple(specialize.compose_subsets(trained.classes, subset)))
