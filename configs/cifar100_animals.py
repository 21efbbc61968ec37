"""CIFAR-100 (tfds `cifar100`): generalist on 100 classes, specialist for the
45 classes of its 9 animal superclasses.

Needs the dataset prepared in tfds' data_dir (`tfds build cifar100` on a
machine with internet). Validation is the last 10% of the training split.

  python -m jaxspec.main --config=configs/cifar100_animals.py --workdir=DIR
"""

from __future__ import annotations

import ml_collections

from configs import common

TRAIN_EXAMPLES = 45_000
SUBSET_EXAMPLES = 45 * 450


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, seed=0)
    config = ml_collections.ConfigDict()
    config.seed = arg.seed
    config.model = common.model()
    config.data = common.data(name="cifar100", train_split="train[:90%]", val_split="train[90%:]", test_split="test")
    batch = 256
    config.generalist = common.phase(
        steps=common.steps_for(60, TRAIN_EXAMPLES, batch),
        batch_size=batch,
        label_smoothing=0.1,
        optim=common.optimizer(optimizer="adam", lr=2e-3, schedule="cosine", warmup_steps=500),
    )
    config.generalist.init = ""
    config.specialize = common.specialize(
        subset="animals",
        steps=common.steps_for(20, SUBSET_EXAMPLES, batch),
        batch_size=batch,
        label_smoothing=0.1,
        optim=common.optimizer(optimizer="adam", lr=1e-4),
        head_steps=common.steps_for(2, SUBSET_EXAMPLES, batch),
    )
    config.scratch = common.phase(
        steps=common.steps_for(60, SUBSET_EXAMPLES, batch),
        batch_size=batch,
        label_smoothing=0.1,
        optim=common.optimizer(optimizer="adam", lr=2e-3, schedule="cosine", warmup_steps=500),
        reestimate_bn=True,
    )
    config.eval = dict(batch_size=1000, every_steps=1000)
    config.sharding = common.sharding()
    config.log_every = 100
    config.checkpoint_every = 1000
    config.overwrite = False  # True: move a workdir's phases made with other settings aside, then rerun
    return config
