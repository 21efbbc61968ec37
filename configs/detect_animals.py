"""The default detection run: the paper's Table 4 in miniature, offline.

Embedded detection scenes (`jaxspec.detection.scenes`: 3000 training scenes,
72-120 px canvases with 1-8 of the 30 embedded classes at 12-48 px, letterboxed
to 96 px, no mosaic), a YOLOv5n generalist on all 30 classes: its backbone
pre-trained 3 epochs as a classifier, then 23 epochs of detection (Adam, peak
3e-3, cosine); then the `animals` specialist (the same 10 classes as COCO's
animal superclass) by domain constraining + output suppression, fine-tuned for
2 epochs with Adam at 1e-4. Sized to finish in under 10 minutes on 2 CPU cores
(BENCHMARKS.md, "Detection", has the A/B behind each choice);
`specialize.scratch=True` adds a YOLOv5n trained from scratch on the animal
scenes (Table 4's third row).

  python -m jaxspec.main --config=configs/detect_animals.py --workdir=/tmp/detect
  python -m jaxspec.main --config=configs/detect_animals.py:full --workdir=/tmp/d   # the results recipe, ~80 min
  python -m jaxspec.main --config=configs/detect_animals.py:tiny --workdir=/tmp/t   # seconds, for tests
"""

from __future__ import annotations

import ml_collections

from configs import common
from jaxspec.detection import data
from jaxspec.detection.loss import DEFAULT_HYP


def phase(*, batch_size: int, optim, epochs: float = 0.0, steps: int = 0) -> ml_collections.ConfigDict:
    """A detection training phase of `epochs` over its data (counted when the data are known), or of `steps`
    when epochs is 0. `freeze`: YOLOv5 layer ranges (`layers:10-12`) or regexes on parameter paths;
    `freeze_bn_stats`: BatchNorm uses (and keeps) its running statistics; `reestimate_bn`: BatchNorm statistics
    recomputed for the final weights; `ema_decay` > 0: a moving average of the weights is validated, evaluated and
    exported (YOLOv5's ModelEMA: 0.9999, ramped up over `ema_tau` steps)."""
    return ml_collections.ConfigDict(
        {
            "epochs": float(epochs),
            "steps": steps,
            "batch_size": batch_size,
            "optim": optim,
            "freeze": "",
            "freeze_bn_stats": False,
            "reestimate_bn": False,
            "ema_decay": 0.0,
            "ema_tau": 2000.0,
        }
    )


def evaluation(**overrides) -> ml_collections.ConfigDict:
    """Eval section: YOLOv5 validation's NMS (conf 0.001, IoU 0.6) and COCOeval's 100 detections per image."""
    cfg = ml_collections.ConfigDict(
        {
            "batch_size": 64,
            "every_steps": 0,
            "conf_thres": 0.001,
            "iou_thres": 0.6,
            "max_det": 300,
            "max_nms": 30000,
            "coco_max_dets": 100,
        }
    )
    cfg.update(overrides)
    return cfg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, tiny=False, full=False, seed=0)
    config = ml_collections.ConfigDict()
    config.task = "detect"
    config.seed = arg.seed
    config.model = {"name": "yolov5n", "dtype": "float32"}
    config.data = data.default_config(
        name="scenes", image_size=96, max_boxes=32, mosaic=0.0, num_threads=2, prefetch=8
    )  # mosaic shrinks the 12-48 px objects to half in training, unlike the test scenes
    config.data.scenes.num_scenes = (3000, 500, 1000)
    config.data.scenes.canvas = (72, 120)
    config.data.scenes.scale = (12, 48)
    config.hyp = dict(DEFAULT_HYP)

    batch = 32
    config.generalist = phase(
        epochs=23,
        batch_size=batch,
        optim=common.optimizer(optimizer="adam", lr=3e-3, schedule="cosine", warmup_steps=50),
    )
    config.specialize = phase(epochs=2, batch_size=batch, optim=common.optimizer(optimizer="adam", lr=1e-4))
    config.specialize.subset = "animals"  # group names, class names or indices; 'animals>horse' is gradual
    config.specialize.method = "suppress"  # suppress | slice (see jaxspec.detection.specialize)
    config.specialize.scratch = False  # also train a detector from scratch on D_S (config.scratch; Table 4)
    config.specialize.control = False  # experiments: also the `continued` control (jaxspec.experiments.detect)
    # The backbone pre-trained as a 30-class classifier on the images the scenes are made of, at about the
    # objects' size (jaxspec.detection.backbone); epochs > 0 starts every new detector from it.
    config.backbone = common.phase(
        steps=0,
        batch_size=128,
        label_smoothing=0.1,
        optim=common.optimizer(optimizer="adam", lr=1e-3, schedule="cosine", warmup_steps=100),
    )
    config.backbone.epochs = 3.0
    config.backbone.data = common.data(image_size=32, num_threads=2, prefetch=8)
    config.backbone.eval_batch_size = 256
    # The generalist's recipe and epochs, on the animal scenes only.
    config.scratch = ml_collections.ConfigDict(config.generalist.to_dict())

    # max_nms 3000 instead of YOLOv5's 30000: a 96 px image has only 567 boxes x 30 classes.
    config.eval = evaluation(max_nms=3000)
    config.sharding = common.sharding()
    config.log_every = 20
    config.checkpoint_every = 200
    config.overwrite = False  # True: move a workdir's phases made with other settings aside, then rerun
    config.smoke = arg.tiny  # a plumbing check: the run says its near-chance numbers are expected

    if arg.full:
        full(config)
    if arg.tiny:  # seconds-long steps on the synthetic fixture, for tests
        shrink(config)
        config.data.scenes.num_scenes = (48, 16, 16)
        config.data.scenes.canvas = (64, 96)
        config.data.scenes.scale = (16, 40)
        config.specialize.scratch = True
    return config


def full(config: ml_collections.ConfigDict) -> None:
    """The results config (`:full`): a generalist that detects, about 75 minutes on 2 CPU cores (issue 15;
    BENCHMARKS.md, "Detection", has the A/B behind each choice): twice the training scenes, no mosaic, the
    backbone pre-trained 10 epochs, 100 epochs of detection, the weights' moving average evaluated and
    exported; the scratch detector gets the same recipe, the specialist the paper's."""
    config.data.scenes.num_scenes = (6000, 500, 1000)  # the same validation and test scenes
    config.backbone.epochs = 10.0
    config.generalist.update(epochs=100.0, ema_decay=0.9999)
    config.scratch = ml_collections.ConfigDict(config.generalist.to_dict())
    config.eval.every_steps = 20 * 6000 // config.generalist.batch_size  # every 20 epochs


def shrink(config: ml_collections.ConfigDict) -> None:
    """A detection config's `tiny` setting: 64 px, 4 steps of 8 images a phase, in-process data."""
    config.data.update(image_size=64, max_boxes=16, num_workers=0, num_threads=1, prefetch=2)
    for p in (config.generalist, config.specialize, config.scratch):
        p.epochs, p.steps, p.batch_size = 0.0, 4, 8
    if "backbone" in config:  # tests/test_detection_backbone.py turns it on
        config.backbone.epochs = 0.0
    config.generalist.optim.warmup_steps = config.scratch.optim.warmup_steps = 1
    # Untrained detectors score about 1e-3 x 1/30 and place boxes at random: a low threshold and many
    # detections per image make their mAP small but not zero, so the tests compare real numbers.
    config.eval = evaluation(batch_size=16, conf_thres=1e-5, max_det=300, max_nms=3000, coco_max_dets=300)
    config.log_every = 2
    config.checkpoint_every = 2
