"""The detection task: YOLOv5 trained with its own loss, optimizer and scene pipeline.

Implements `jaxspec.train.task.Task`. Detection sources keep global labels:
`Outputs.classes[j]` is the global class of output j, and `Outputs.columns`
the outputs that are scored (output suppression), so one model can be
trained on a constrained source without relabelling its boxes.
"""

from __future__ import annotations

import ml_collections
from flax import nnx

from jaxspec import models, tables
from jaxspec.data.constrain import label_map
from jaxspec.detection import backbone, data
from jaxspec.detection import specialize as dspec
from jaxspec.detection import train as dtrain
from jaxspec.train.context import RunContext
from jaxspec.train.state import ModelDef
from jaxspec.train.task import Defaults, Outputs


def with_steps(phase, num_images: int) -> ml_collections.ConfigDict:
    """`phase` with `steps` set from `epochs` over `num_images` when `epochs` > 0 (D_S's size is known only here)."""
    epochs = phase.get("epochs", 0)
    if epochs <= 0 and phase.steps <= 0:
        raise ValueError(f"a training phase needs steps > 0 or epochs > 0; got steps={phase.steps}, epochs={epochs}")
    if epochs <= 0:
        return phase
    out = ml_collections.ConfigDict(phase.to_dict())
    out.steps = max(1, round(epochs * num_images / phase.batch_size))
    return out


def evaluator(ctx: RunContext, modeldef: ModelDef) -> dtrain.Evaluator:
    """One compiled eval step per model structure; suppression is an argument, not a recompile."""
    key = ("detection evaluator", modeldef.graphdef)
    if key not in ctx.cache:
        ctx.cache[key] = dtrain.Evaluator(
            modeldef,
            mesh=ctx.mesh,
            data_cfg=ctx.config.data,
            batch_size=ctx.config.eval.batch_size,
            mean=ctx.info.mean,
            std=ctx.info.std,
            eval_cfg=ctx.config.eval,
        )
    return ctx.cache[key]


def _classes(ctx, outputs: Outputs) -> tuple[int, ...]:
    return outputs.classes if outputs.classes is not None else tuple(range(ctx.info.num_classes))


class Detection(Defaults):
    """YOLOv5 detection scored by F = 0.1 mAP@0.5 + 0.9 mAP@0.5:0.95."""

    score_names = tables.DETECTION_SCORES

    def open_split(self, data_cfg, split: str):
        return data.get_source(data_cfg, split)

    def new_model(self, ctx: RunContext, num_classes: int, seed: int) -> nnx.Module:
        """A YOLOv5 at random init, or with the backbone pre-trained on the scenes' images (`config.backbone`)."""
        model = models.get_model(ctx.config.model.name, num_classes, rngs=nnx.Rngs(seed), dtype=ctx.config.model.dtype)
        return backbone.start(ctx, model, seed)

    def resolve(self, phase, source):
        return with_steps(phase, len(source))

    def optimizer(self, ctx, phase, model, source):
        return dtrain.make_optimizer(
            phase, nnx.state(model, nnx.Param), steps_per_epoch=len(source) // phase.batch_size
        )

    def train_iterator(self, ctx, source, batch_size, seed):
        return data.train_iterator(source, ctx.config.data, batch_size=batch_size, seed=seed)

    def eval_iterator(self, ctx, source, batch_size):
        """Letterboxed images with the contract's per-image `mask` (False for padding images). A detection
        batch's own `mask` marks real box rows [B, M], which `batchnorm.reestimate` would read as padding
        images and skip nearly every batch; its evaluation reads `data.eval_iterator` directly."""
        for batch in data.eval_iterator(source, ctx.config.data, batch_size=batch_size):
            yield {"image": batch["image"], "mask": batch["valid"]}

    def train_step(self, ctx, modeldef, tx, schedule, phase, outputs: Outputs):
        cfg, classes = ctx.config, _classes(ctx, outputs)
        scored = len(classes) if outputs.columns is None else len(outputs.columns)
        return dtrain.make_train_step(
            modeldef,
            tx,
            schedule,
            image_size=cfg.data.image_size,
            hyp=dtrain.phase_hyp(cfg.hyp, num_classes=scored, image_size=cfg.data.image_size),
            mean=ctx.info.mean,
            std=ctx.info.std,
            label_index=label_map(ctx.info.num_classes, classes),
            class_mask=dspec.class_mask(len(classes), outputs.columns),
            freeze_bn_stats=phase.get("freeze_bn_stats", False),
        )

    def validator(self, ctx, modeldef, outputs: Outputs):
        classes = _classes(ctx, outputs)

        def validate(state, source):
            m = evaluator(ctx, modeldef)(state, source, classes=classes, columns=outputs.columns)
            return {f"val_{k}": m[k] for k in tables.DETECTION_SCORES}

        return validate

    def fingerprint(self, ctx, phase, outputs: Outputs) -> dict:
        return {
            "classes": list(_classes(ctx, outputs)),
            "columns": None if outputs.columns is None else list(outputs.columns),
            "hyp": ctx.config.hyp.to_dict(),
        }

    def results_table(self, rows, title: str) -> str:
        return tables.detection(rows, title)

    def preprocess(self, ctx) -> dict:
        return data.preprocess_record(ctx.config.data, ctx.info)
