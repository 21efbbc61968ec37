"""The default run: the paper's "animals" experiment in miniature, offline.

Embedded data (30 classes: 10 COCO animals, 10 clothing, 10 digits; 28x28
padded to 32x32), MobileNetV3-Small, generalist on all 30 classes, specialist
extracted for `animals` and fine-tuned with Adam at 1e-4.

  python -m jaxspec.main --config=configs/animals.py --workdir=/tmp/animals
  python -m jaxspec.main --config=configs/animals.py:tiny --workdir=/tmp/t   # seconds, for tests
"""

from __future__ import annotations

import ml_collections

from configs import common

TRAIN_EXAMPLES = 21_000  # 700 per class x 30 classes
SUBSET_EXAMPLES = 7_000  # 700 per class x 10 animal classes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, tiny=False, seed=0)
    config = ml_collections.ConfigDict()
    config.seed = arg.seed
    config.model = common.model()
    config.data = common.data(name="embedded")

    gen_batch, spec_batch = 128, 128
    config.generalist = common.phase(
        steps=common.steps_for(15, TRAIN_EXAMPLES, gen_batch),
        batch_size=gen_batch,
        label_smoothing=0.1,
        optim=common.optimizer(optimizer="adam", lr=2e-3, schedule="cosine", warmup_steps=200),
    )
    config.generalist.init = ""  # '' trains; else an orbax checkpoint dir or torchvision weights file
    config.specialize = common.specialize(
        subset="animals",
        steps=common.steps_for(10, SUBSET_EXAMPLES, spec_batch),
        batch_size=spec_batch,
        label_smoothing=0.1,
        optim=common.optimizer(optimizer="adam", lr=1e-4),
        head_steps=common.steps_for(2, SUBSET_EXAMPLES, spec_batch),
    )
    # method=scratch: the generalist's recipe and epochs, on D_S only.
    config.scratch = common.phase(
        steps=common.steps_for(15, SUBSET_EXAMPLES, gen_batch),
        batch_size=gen_batch,
        label_smoothing=0.1,
        optim=common.optimizer(optimizer="adam", lr=2e-3, schedule="cosine", warmup_steps=200),
        reestimate_bn=True,
    )

    config.eval = dict(batch_size=500, every_steps=500)
    config.sharding = common.sharding()
    config.log_every = 50
    config.checkpoint_every = 500
    config.overwrite = False  # True: move a workdir's phases made with other settings aside, then rerun
    config.smoke = arg.tiny  # a plumbing check: the run says its near-chance numbers are expected

    if arg.tiny:  # a seconds-long run on the synthetic fixture, for tests
        config.model.width_multiplier = 0.25
        config.model.num_blocks = 4  # a third of the compile time; blocks of every kind stay
        config.generalist.steps = 30
        config.generalist.batch_size = 32
        config.generalist.optim.warmup_steps = 5
        config.specialize.steps = 20
        config.specialize.batch_size = 32
        config.specialize.head_steps = 5
        config.scratch.steps = 20
        config.scratch.batch_size = 32
        config.scratch.optim.warmup_steps = 5
        config.eval.batch_size = 64
        config.eval.every_steps = 0
        config.log_every = 10
        config.checkpoint_every = 20
        config.data.num_threads = 1
        config.data.prefetch = 4
    return config
