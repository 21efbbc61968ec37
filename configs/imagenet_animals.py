"""ImageNet (tfds `imagenet2012`) with the paper's recipe: MobileNetV3-Small
generalist on 1000 classes, specialist for the 398 WordNet animal classes.

Generalist: RMSprop (decay 0.9, momentum 0.9, eps 0.0316), L2 1e-5, label
smoothing 0.1, linear warm-up then x0.973 every 2 epochs, 600 epochs at batch
512 (lr scaled linearly from torchvision's 0.064 at 1024), RandAugment and
random erasing. Specialist: Adam at 1e-4. To start from torchvision's ImageNet
weights instead of training 600 epochs, set
`--config.generalist.init=/path/mobilenet_v3_small-047dcff4.pth`.

Needs ImageNet prepared in tfds' data_dir (manual download). Not run in CI;
its input pipeline is built under `tfds.testing.mock_data` in the tests.
"""

from __future__ import annotations

import ml_collections

from configs import common

TRAIN_EXAMPLES = 1_281_167
SUBSET_EXAMPLES = 510_530  # training images of classes 0-397


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, seed=0, epochs=600, spec_epochs=10)
    config = ml_collections.ConfigDict()
    config.seed = arg.seed
    config.model = dict(name="mobilenet_v3_small", width_multiplier=1.0, dropout_rate=0.2, depthwise="auto",
                        dtype="float32")
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
        num_threads=32,
        prefetch=16,
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
    # fsdp > 1 (or -1: all devices) splits params and optimizer state over an 'fsdp' mesh axis.
    config.sharding = dict(fsdp=1)
    config.log_every = 500
    config.checkpoint_every = 5000
    config.overwrite = False  # True: move a workdir's phases made with other settings aside, then rerun
    return config
