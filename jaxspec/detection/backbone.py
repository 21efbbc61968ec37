"""A detector's backbone pre-trained as a classifier on the images its scenes are made of.

The paper's detectors start from an ImageNet-pretrained backbone. Here the
analogue is YOLOv5's backbone (layers 0-9) trained as a classifier
(`models.YOLOv5Classifier`) on the classification dataset the scenes paste
their objects from (the embedded train split, labels of the same classes),
at about the objects' size in the scenes. `config.backbone.epochs` > 0 turns
it on: every new detector of the run (the generalist, and the detectors
trained from scratch on D_S) then starts from the classifier's layers 0-9, so
"from scratch" keeps meaning "without the generalist". The classifier trains
through the one driver (`jaxspec.train.driver`) as the classification task,
checkpointed under the phase name `backbone`, once per seed.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from flax import nnx

from jaxspec.classification import Classification
from jaxspec.data import datasets
from jaxspec.models.yolov5 import YOLOv5, YOLOv5Classifier, transplant_backbone
from jaxspec.train import driver
from jaxspec.train.context import RunContext
from jaxspec.train.task import Outputs


def enabled(config: ml_collections.ConfigDict) -> bool:
    return config.get("backbone") is not None and config.backbone.epochs > 0


def classification_context(ctx: RunContext) -> RunContext:
    """The run's context for the classifier: the scenes' own classification data (same files, same classes),
    normalized as the detector normalizes its scenes, with the detection run's workdir, mesh and writer."""
    cfg, bb = ctx.config, ctx.config.backbone
    data = ml_collections.ConfigDict(bb.data.to_dict())
    data.update(name="embedded", data_dir=cfg.data.data_dir, manifest=cfg.data.manifest)
    train, val = (datasets.open_split(data, split) for split in (data.train_split, data.val_split))
    if tuple(train.info.class_names) != tuple(ctx.info.class_names):
        raise ValueError(
            f"backbone: the classification data's classes {train.info.class_names[:3]}... are not the scenes' "
            f"{ctx.info.class_names[:3]}...; pre-training needs the images the scenes are made of"
        )
    config = ml_collections.ConfigDict(
        {
            "data": data,
            "eval": {"batch_size": bb.eval_batch_size, "every_steps": cfg.eval.every_steps},
            "log_every": cfg.log_every,
            "checkpoint_every": cfg.checkpoint_every,
            "overwrite": cfg.get("overwrite", False),
        }
    )
    info = dataclasses.replace(train.info, mean=ctx.info.mean, std=ctx.info.std)
    return dataclasses.replace(ctx, config=config, task=Classification(), train=train, val=val, test=None, info=info)


def pretrained(ctx: RunContext, seed: int) -> YOLOv5Classifier:
    """The backbone classifier of `seed`, trained here (resuming) on the first use, then cached."""
    key = ("backbone", seed)
    if key not in ctx.cache:
        bb, cls = ctx.config.backbone, classification_context(ctx)
        phase = ml_collections.ConfigDict(bb.to_dict())
        for k in ("epochs", "data", "eval_batch_size"):
            del phase[k]
        phase.steps = max(1, round(bb.epochs * len(cls.train) / bb.batch_size))
        scale = ctx.config.model.name.removeprefix("yolov5")
        model = YOLOv5Classifier(scale, cls.info.num_classes, rngs=nnx.Rngs(seed), dtype=ctx.config.model.dtype)
        name = "backbone" if seed == ctx.config.seed else f"backbone-seed{seed}"
        modeldef, state = driver.train_phase(
            cls, name, model, cls.train, cls.val, phase, seed, outputs=Outputs.of(range(cls.info.num_classes))
        )
        ctx.cache[key] = modeldef.merge(state.params, state.batch_stats)
    return ctx.cache[key]


def start(ctx: RunContext, detector: YOLOv5, seed: int) -> YOLOv5:
    """`detector` with the pre-trained backbone of `seed` when `config.backbone` is on; unchanged otherwise."""
    if not enabled(ctx.config):
        return detector
    return transplant_backbone(detector, pretrained(ctx, seed))
