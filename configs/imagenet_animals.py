"""ImageNet (tfds `imagenet2012`) with the paper's recipe: MobileNetV3-Small
generalist on 1000 classes, specialist for the 398 WordNet animal classes.

Generalist: RMSprop (decay 0.9, momentum 0.9, eps 0.0316), L2 1e-5, label
smoothing 0.1, linear warm-up then x0.973 every 2 epochs, 600 epochs at batch
512 (lr scaled linearly from torchvision's 0.064 at 1024), RandAugment and
random erasing. Specialist: Adam at 1e-4. To start from torchvision's ImageNet
weights instead of training 600 epochs, set
`--config.generalist.init=/path/mobilenet_v3_small-047dcff4.pth`.

Needs ImageNet prepared in tfds' data_dir (manual download). CI runs
`imagenet_animals.py:tiny` end to end on a small real `imagenet2012` of JPEGs
(`jaxspec.data.synthetic_tfds`), and the full recipe's input pipeline on it.

Batches are made in one worker process per core (`data.num_workers=-1`): each
image is a JPEG decoded and augmented in Python and Pillow, ~3 ms of one core
at 224 px, so a host feeding an accelerator needs all its cores (see
BENCHMARKS.md).
"""

from __future__ import annotations

import ml_collections

from configs import common

TRAIN_EXAMPLES = 1_281_167
SUBSET_EXAMPLES = 510_530  # training images of classes 0-397


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, seed=0, epochs=600, spec_epochs=10, tiny=False)
    config = ml_collections.ConfigDict()
    config.seed = arg.seed
    config.model = common.model()
    config.data = common.data(
        name="imagenet2012",
        train_split="train[:99%]",  # 1% of train held out for model selection
        val_split="train[99%:]",
        test_split="validation",
        transform="imagenet",
        image_size=224,
        randaugment_ops=2,
        randaugment_magnitude=9,
        erasing_prob=0.2,
        num_workers=-1,  # one per core
        num_threads=2,  # per worker: one reads records while one decodes (Pillow releases the GIL)
        prefetch=2,  # batches per worker: 2 x 77 MB at batch 512
    )
    batch = 512
    epoch = TRAIN_EXAMPLES // batch
    config.generalist = common.phase(
        steps=arg.epochs * epoch,
        batch_size=batch,
        label_smoothing=0.1,
        optim=common.optimizer(
            optimizer="rmsprop",
            lr=0.064 * batch / 1024,
            schedule="step",
            warmup_steps=5 * epoch,
            decay_every=2 * epoch,
            decay_rate=0.973,
            eps=0.0316,
            rms_decay=0.9,
            momentum=0.9,
            weight_decay=1e-5,
        ),
    )
    config.generalist.init = ""
    config.specialize = common.specialize(
        subset="animals",
        steps=common.steps_for(arg.spec_epochs, SUBSET_EXAMPLES, batch),
        batch_size=batch,
        label_smoothing=0.1,
        optim=common.optimizer(optimizer="adam", lr=1e-4),
        head_steps=common.steps_for(1, SUBSET_EXAMPLES, batch),
    )
    # method=scratch: the generalist's recipe on the animal classes only.
    config.scratch = ml_collections.ConfigDict(config.generalist.to_dict())
    del config.scratch["init"]
    config.scratch.reestimate_bn = True  # trained from random init: running statistics trail the weights
    sub_epoch = SUBSET_EXAMPLES // batch
    config.scratch.steps = arg.epochs * sub_epoch
    config.scratch.optim.warmup_steps = 5 * sub_epoch
    config.scratch.optim.decay_every = 2 * sub_epoch
    config.eval = dict(batch_size=1000, every_steps=5 * epoch)
    config.sharding = common.sharding()
    config.log_every = 500
    config.checkpoint_every = 5000
    config.overwrite = False  # True: move a workdir's phases made with other settings aside, then rerun

    if arg.tiny:  # seconds-long steps on a small real JPEG dataset (`jaxspec.data.synthetic_tfds`), for tests
        config.model.width_multiplier = 0.25
        config.model.num_blocks = 4  # a third of the compile time; blocks of every kind stay
        config.data.image_size = 64  # crops of the 300-500 px JPEGs, so decoding costs what it costs at 224
        config.data.update(num_workers=0, num_threads=1, prefetch=2)  # worker start-up would dominate
        for phase in (config.generalist, config.specialize, config.scratch):
            phase.steps, phase.batch_size = 4, 8
            phase.optim.warmup_steps, phase.optim.decay_every = 1, 2
        config.specialize.head_steps = 2
        config.specialize.control = False
        config.eval = dict(batch_size=16, every_steps=0)
        config.log_every = 2
        config.checkpoint_every = 2
    return config
