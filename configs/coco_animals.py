"""COCO 2017 (tfds `coco/2017`) with the paper's detector recipe: YOLOv5m generalist on the 80
classes, specialist for the 10 classes of the `animal` supercategory.

YOLOv5's `hyp.scratch-low` training: 640 px, batch 16 (gradients summed to a
nominal batch of 64), 300 epochs of Nesterov SGD (lr 0.01 decaying linearly to
0.0001, momentum 0.937, weight decay 5e-4 on kernels only; 3 warm-up epochs
from momentum 0.8 and bias lr 0.1), mosaic, HSV, translate 0.1, scale 0.5,
left-right flips. The specialist keeps that optimizer with its own schedule
over `spec_epochs` on the animal images (domain constraining + output
suppression); the scratch specialist trains 300 epochs on them.

Needs COCO prepared in tfds' data_dir (`--config.data.data_dir=...`; about 25
GB). CI runs `coco_animals.py:tiny` (YOLOv5n at 64 px, 4 steps a phase) end to
end on a small real `coco/2017` of JPEGs (`jaxspec.data.synthetic_tfds`).
Batches are made in one worker process per core (`data.num_workers=-1`).
"""

from __future__ import annotations

import ml_collections

from configs import common, detect_animals
from jaxspec.detection import data
from jaxspec.detection.loss import DEFAULT_HYP

TRAIN_IMAGES = 118_287  # coco/2017 train


def yolov5_sgd(**overrides) -> ml_collections.ConfigDict:
    """YOLOv5's optimizer (`jaxspec.detection.train.yolov5_sgd`), hyp.scratch-low values."""
    cfg = ml_collections.ConfigDict(
        {
            "optimizer": "yolov5_sgd",
            "lr": 0.01,
            "lrf": 0.01,
            "momentum": 0.937,
            "weight_decay": 5e-4,
            "warmup_epochs": 3.0,
            "warmup_momentum": 0.8,
            "warmup_bias_lr": 0.1,
            "nbs": 64,
        }
    )
    cfg.update(overrides)
    return cfg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, seed=0, epochs=300, spec_epochs=30, scale="m", tiny=False)
    config = ml_collections.ConfigDict()
    config.task = "detect"
    config.seed = arg.seed
    config.model = {"name": f"yolov5{arg.scale}", "dtype": "float32"}
    config.data = data.default_config(
        name="coco/2017",
        train_split="train",
        val_split="validation",
        test_split="validation",
        image_size=640,
        max_boxes=300,
        num_workers=-1,
        num_threads=2,
        prefetch=4,
    )  # 4 x 20 MB per worker
    config.hyp = dict(DEFAULT_HYP)
    batch = 16
    config.generalist = detect_animals.phase(epochs=arg.epochs, batch_size=batch, optim=yolov5_sgd())
    config.specialize = detect_animals.phase(epochs=arg.spec_epochs, batch_size=batch, optim=yolov5_sgd())
    config.specialize.subset = "animal"
    config.specialize.method = "suppress"
    config.specialize.scratch = False
    config.scratch = detect_animals.phase(epochs=arg.epochs, batch_size=batch, optim=yolov5_sgd())
    # YOLOv5 (and the paper) report val2017; nothing is selected on it (the last checkpoint is scored).
    config.eval = detect_animals.evaluation(batch_size=32, every_steps=10 * (TRAIN_IMAGES // batch))
    config.sharding = common.sharding()  # fsdp=-1 on a pod: YOLOv5l/x params and optimizer state split
    config.log_every = 100
    config.checkpoint_every = 2000
    config.overwrite = False  # True: move a workdir's phases made with other settings aside, then rerun

    if arg.tiny:  # seconds-long steps on a small real JPEG dataset (`jaxspec.data.synthetic_tfds`), for tests
        config.model.name = "yolov5n"
        detect_animals.shrink(config)
    return config
