"""The classification task: MobileNetV3-style classifiers trained with softmax cross-entropy.

Implements `jaxspec.train.task.Task` for the driver, and holds the run's
compiled evaluators (one per model structure and scoring choice).
"""

from __future__ import annotations

from flax import nnx

from jaxspec import evaluate, models, tables
from jaxspec.data import datasets, pipeline
from jaxspec.train import freeze, optimizers, steps
from jaxspec.train.context import RunContext
from jaxspec.train.state import ModelDef
from jaxspec.train.task import Defaults, Outputs


def model_spec(config, num_classes: int) -> dict:
    """The architecture `models.get_model` builds for `config.model` with `num_classes` outputs."""
    return dict(
        name=config.model.name,
        num_classes=num_classes,
        width_multiplier=config.model.width_multiplier,
        num_blocks=config.model.get("num_blocks"),
        dropout_rate=config.model.dropout_rate,
    )


def evaluator(
    ctx: RunContext,
    modeldef: ModelDef,
    num_classes: int,
    columns=None,
    confusion: bool = False,
    per_example: bool = False,
) -> evaluate.Evaluator:
    """An `Evaluator` of `num_classes` scored classes, compiled once per model structure and column choice."""
    key = (
        "evaluator",
        modeldef.graphdef,
        num_classes,
        None if columns is None else tuple(columns),
        confusion,
        per_example,
    )
    if key not in ctx.cache:
        ctx.cache[key] = evaluate.Evaluator(
            modeldef,
            mesh=ctx.mesh,
            data_cfg=ctx.config.data,
            batch_size=ctx.config.eval.batch_size,
            mean=ctx.info.mean,
            std=ctx.info.std,
            num_classes=num_classes,
            columns=columns,
            confusion=confusion,
            per_example=per_example,
        )
    return ctx.cache[key]


class Classification(Defaults):
    """Softmax classification; `Outputs.columns` is output suppression, labels index the source's classes."""

    score_names = ("top1", "top2")

    def open_split(self, data_cfg, split: str):
        return datasets.open_split(data_cfg, split)

    def new_model(self, ctx: RunContext, num_classes: int, seed: int) -> nnx.Module:
        spec = model_spec(ctx.config, num_classes)
        return models.get_model(
            spec.pop("name"),
            spec.pop("num_classes"),
            rngs=nnx.Rngs(seed),
            depthwise=ctx.config.model.depthwise,
            dtype=ctx.config.model.dtype,
            **spec,
        )

    def optimizer(self, ctx, phase, model, source):
        tx, schedule = optimizers.make_optimizer(phase.optim, phase.steps)
        return freeze.freeze(tx, nnx.state(model, nnx.Param), freeze.parse_patterns(phase.get("freeze", ""))), schedule

    def train_iterator(self, ctx, source, batch_size, seed):
        return pipeline.train_iterator(source, ctx.config.data, batch_size=batch_size, seed=seed)

    def eval_iterator(self, ctx, source, batch_size):
        return pipeline.eval_iterator(source, ctx.config.data, batch_size=batch_size)

    def train_step(self, ctx, modeldef, tx, schedule, phase, outputs: Outputs):
        return steps.make_train_step(
            modeldef,
            tx,
            schedule,
            mean=ctx.info.mean,
            std=ctx.info.std,
            label_smoothing=phase.label_smoothing,
            columns=outputs.columns,
            freeze_bn_stats=phase.get("freeze_bn_stats", False),
        )

    def validator(self, ctx, modeldef, outputs: Outputs):
        columns = outputs.columns

        def validate(state, source):
            scored = source.info.num_classes if columns is None else len(columns)
            return {"val_top1": evaluator(ctx, modeldef, scored, columns)(state, source)["top1"]}

        return validate

    def fingerprint(self, ctx, phase, outputs: Outputs) -> dict:
        return {
            "extendable": optimizers.length_free(phase.optim),
            "columns": None if outputs.columns is None else list(outputs.columns),
        }

    def results_table(self, rows, title: str) -> str:
        return tables.classification(rows, title)

    def preprocess(self, ctx) -> dict:
        return pipeline.preprocess_record(ctx.config.data, ctx.info)
