"""The contract between the one training driver (`jaxspec.train.driver`) and a kind of model.

Classification (`jaxspec.classification`), detection (`jaxspec.detection.task`)
and distillation (`jaxspec.distill`) each implement `Task` once; the driver
does the rest the same way for all of them: optimizer, state placement,
data iterator, checkpointing and resume, the jitted (or vmapped) step, the
loop, validation, and BatchNorm re-estimation.

Every method gets the run's `RunContext` (`jaxspec.train.context`): a task
keeps no state of its own beyond what it is made with (a teacher, for SKD).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import ml_collections
import optax
from flax import nnx

from jaxspec.train.state import ModelDef, TrainState, create_state

TrainStep = Callable[[TrainState, dict], tuple[TrainState, dict]]


@dataclasses.dataclass(frozen=True)
class Outputs:
    """How a model's outputs map to the run's classes.

    `classes[j]` is the global class of output j (None: the labels of the
    source already index the outputs); `columns`, when set, are the outputs
    that compete and are scored (output suppression: the others get no loss
    and no probability).
    """

    classes: tuple[int, ...] | None = None
    columns: tuple[int, ...] | None = None

    @staticmethod
    def of(classes: Sequence[int] | None = None, columns: Sequence[int] | None = None) -> Outputs:
        return Outputs(
            None if classes is None else tuple(int(c) for c in classes),
            None if columns is None else tuple(int(c) for c in columns),
        )


class Task(Protocol):
    """What a kind of model brings to the driver. `ctx` is always the run's `RunContext`."""

    score_names: tuple[str, ...]  # the validation/test scores, in table order (e.g. top1, or F and mAPs)

    def open_split(self, data_cfg: ml_collections.ConfigDict, split: str) -> Any:
        """The source of one split of `data_cfg`'s dataset."""

    def new_model(self, ctx, num_classes: int, seed: int) -> nnx.Module:
        """A freshly initialized model of the configured architecture."""

    def resolve(self, phase: ml_collections.ConfigDict, source) -> ml_collections.ConfigDict:
        """`phase` with whatever depends on the data filled in (e.g. steps from epochs)."""

    def wrap(self, ctx, model: nnx.Module, seed: int) -> nnx.Module:
        """The module that trains (the model itself, or the model with training-only parts)."""

    def optimizer(self, ctx, phase, model: nnx.Module, source) -> tuple[optax.GradientTransformation, optax.Schedule]:
        """The phase's optimizer (with `phase.freeze` applied) and its learning-rate schedule."""

    def init_state(self, ctx, model: nnx.Module, tx, seed: int) -> tuple[ModelDef, TrainState]:
        """A fresh (step 0) train state for `model`."""

    def train_iterator(self, ctx, source, batch_size: int, seed: int) -> Iterator[dict]:
        """Endless, checkpointable shuffled batches of `source`."""

    def eval_iterator(self, ctx, source, batch_size: int) -> Iterator[dict]:
        """One pass over `source` in order (validation, BatchNorm re-estimation)."""

    def train_step(self, ctx, modeldef: ModelDef, tx, schedule, phase, outputs: Outputs) -> TrainStep:
        """The pure step `(state, batch) -> (state, metrics)`; metrics include loss, accuracy, grad_norm."""

    def validator(self, ctx, modeldef: ModelDef, outputs: Outputs) -> Callable[[TrainState, Any], dict[str, float]]:
        """`(state, source) -> {'val_<score>': value}` for the scores shown during training."""

    def fingerprint(self, ctx, phase, outputs: Outputs) -> dict:
        """What else, beyond phase, seed, data and start weights, determines a phase of this task."""

    def results_table(self, rows: Sequence[tuple[str, dict]], title: str) -> str:
        """The end-of-run table of `(row label, scores)`."""

    def preprocess(self, ctx) -> dict:
        """How an exported model's inputs are prepared (`model.json`'s `preprocess`)."""


class Defaults:
    """What most tasks share: phases as configured, the model trains as it is, a plain `TrainState`."""

    def resolve(self, phase, source):
        return phase

    def wrap(self, ctx, model, seed):
        return model

    def init_state(self, ctx, model, tx, seed):
        return create_state(model, tx, seed)
