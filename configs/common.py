"""Config sections shared by every experiment config."""

from __future__ import annotations

import ml_collections


def optimizer(**overrides) -> ml_collections.ConfigDict:
    """An optimizer + schedule section (see `jaxspec.train.optimizers`)."""
    cfg = ml_collections.ConfigDict(
        dict(
            optimizer="adam",  # adam | adamw | rmsprop | sgd
            lr=1e-4,
            schedule="constant",  # constant | cosine | step
            warmup_steps=0,
            decay_every=0,  # step schedule: steps per decay
            decay_rate=1.0,
            noise_std=0.0,  # step schedule: lognormal lr noise per decay interval
            noise_seed=0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            momentum=0.0,
            rms_decay=0.9,
            nesterov=False,
            grad_clip=0.0,
        )
    )
    cfg.update(overrides)
    return cfg


def data(**overrides) -> ml_collections.ConfigDict:
    """A data section (see `jaxspec.data.pipeline`)."""
    cfg = ml_collections.ConfigDict(
        dict(
            name="embedded",  # embedded | cifar100 | imagenet2012
            data_dir="",  # tfds data_dir, or the embedded data's cache dir
            manifest="",  # embedded only: JSON naming local raw files and their hashes
            train_split="train",
            val_split="validation",
            test_split="test",
            transform="small",  # small (pad-crop-flip) | imagenet (RRC, RandAugment, erasing)
            image_size=32,
            crop_padding=4,
            flip=True,
            randaugment_ops=0,
            randaugment_magnitude=9,
            erasing_prob=0.0,
            num_threads=4,
            prefetch=256,
        )
    )
    cfg.update(overrides)
    return cfg


def phase(*, steps: int, batch_size: int, label_smoothing: float, optim) -> ml_collections.ConfigDict:
    """A training phase (generalist or specialist)."""
    return ml_collections.ConfigDict(
        dict(steps=steps, batch_size=batch_size, label_smoothing=label_smoothing, optim=optim)
    )


def steps_for(epochs: float, num_examples: int, batch_size: int) -> int:
    return max(1, round(epochs * num_examples / batch_size))


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses `key=value,flag` config-path arguments (big_vision style)."""
    out = ml_collections.ConfigDict(defaults)
    for token in (arg or "").split(","):
        if not token.strip():
            continue
        key, _, value = token.partition("=")
        key = key.strip()
        if key not in out:
            raise ValueError(f"Unknown config argument {key!r}; valid: {sorted(out)}")
        default = defaults[key]
        if isinstance(default, bool):
            out[key] = value.lower() in ("", "1", "true", "yes")
        else:
            out[key] = type(default)(value)
    return out
