"""SKD: small specialists distilled from a larger generalist (see `jaxspec.experiments.skd`).

Embedded data (30 classes): the student is MobileNetV3-Small at width 0.5,
the teacher the same family at width 1.0, both generalists trained with the
recipe of `configs/animals.py`; S is drawn at random by seed with 5, 10, 15
or 20 classes. SKD matches blocks 2 and 7 and the last conv layer
(β = 2, λ = 1, normalized terms, 20 power iterations).

  python -m jaxspec.experiments --config=configs/experiments/skd.py --workdir=/tmp/skd
  configs/experiments/skd.py:tiny            seconds-long phases on the synthetic test fixture
  configs/experiments/skd.py:sizes=5+20,scale=0.5,gen_scale=0.25,seeds=1
                                             only those subset sizes; the students' phases (scratch, fine-tuning,
                                             SKD) at half their steps, the student-size generalist's at a quarter
  configs/experiments/skd.py:data=cifar100   the SKD paper's 20/40/60/80-class subsets of CIFAR-100 with a
                                             MobileNetV3-Large teacher and a -Small student (tfds data needed)
"""

from __future__ import annotations

import ml_collections

from configs.experiments import base

NUM_CLASSES = {"cifar100": 100, "imagenet": 1000}


def _scale_phases(config: ml_collections.ConfigDict, scale: float, gen_scale: float) -> None:
    """Shortens the students' phases by `scale` and the student-size generalist's by `gen_scale` (warm-ups too).

    The teacher keeps its recipe (`skd.teacher_phase` is copied before this).
    """
    for name, f in (("scale", scale), ("gen_scale", gen_scale)):
        if not 0 < f <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {f}")
    for phase, f in ((config.generalist, gen_scale), (config.scratch, scale), (config.specialize, scale)):
        phase.steps = max(1, round(phase.steps * f))
        phase.optim.warmup_steps = round(phase.optim.warmup_steps * f)
    config.specialize.head_steps = max(1, round(config.specialize.head_steps * scale))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, arg = base.classification(arg, sizes="", scale=1.0, gen_scale=0.0)
    if arg.data == "embedded":
        config.model.width_multiplier = 0.25 if arg.tiny else 0.5
        teacher = {"name": "mobilenet_v3_small", "width_multiplier": 0.5 if arg.tiny else 1.0}
        teacher["num_blocks"] = config.model.num_blocks  # the smoke run's depth, else all
        layers, sizes = "block2,block7,last_conv", [5, 10, 15, 20]
    else:
        teacher = {"name": "mobilenet_v3_large", "width_multiplier": 1.0, "num_blocks": None}
        # Large reaches 1/8 and 1/16 resolution at blocks 5 and 11, Small at blocks 2 and 7.
        layers = "block5:block2,block11:block7,last_conv"
        sizes = [NUM_CLASSES[arg.data] * k // 5 for k in (1, 2, 3, 4)]
    if arg.sizes:
        sizes = [int(k) for k in arg.sizes.split("+")]
    config.skd = {
        "teacher": teacher,
        "teacher_phase": ml_collections.ConfigDict(config.generalist.to_dict()),  # as defined, whatever `scale`
        "layers": layers,  # 'teacher_layer:student_layer' or a name both share, in forward order
        "lam": 1.0,
        "beta": 2.0,  # > 1: earlier matched layers weigh more
        "power_iters": 20,
        "normalize": True,  # divide each term by the map's size (its root for the spectral norm)
    }
    gen_scale = arg.gen_scale or arg.scale  # 0: as `scale`
    if (arg.scale, gen_scale) != (1.0, 1.0):
        _scale_phases(config, arg.scale, gen_scale)
    config.experiment = {
        "kind": "skd",
        "title": "SKD: specialists distilled from a larger generalist",
        "description": (
            f"Student {config.model.name} (width {config.model.width_multiplier}), teacher {teacher['name']} "
            f"(width {teacher['width_multiplier']}); S: subset_size random classes drawn by seed; test top-1 on S. "
            "teacher / generalist: the large / student-size generalist restricted to S; scratch: trained on D_S; "
            "finetuned: extracted from the student-size generalist and fine-tuned; skd: scratch + SKD loss."
            + (
                f" Shortened: student-size generalist {config.generalist.steps} steps, scratch and SKD "
                f"{config.scratch.steps}, fine-tuning {config.specialize.steps}."
                if (arg.scale, gen_scale) != (1.0, 1.0)
                else ""
            )
        ),
        "grid": {
            "subset_size": sizes,
            "student": ["teacher", "generalist", "scratch", "finetuned", "skd"],
            "seed": list(range(1 if arg.tiny else arg.seeds)),
        },
        "columns": ["top1", "top2", "params"],
        "generalist_per_seed": True,  # a teacher and a student-size generalist per seed (reproduction C9)
    }
    if arg.tiny:
        config.skd.layers = "block2,last_conv"
        config.checkpoint_every = 1000  # only the final save of each phase
        config.experiment.grid.subset_size = [4]
        config.experiment.grid.student = ["scratch", "finetuned", "skd"]
    return config
