"""Config sections shared by every experiment config."""

from __future__ import annotations

import ml_collections

from jaxspec.data import custom


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


def model(**overrides) -> ml_collections.ConfigDict:
    """A classifier section (see `jaxspec.models`)."""
    cfg = ml_collections.ConfigDict(
        dict(
            name="mobilenet_v3_small",  # or mobilenet_v3_large
            width_multiplier=1.0,
            num_blocks=ml_collections.FieldReference(None, field_type=int),  # first N blocks; None: all
            dropout_rate=0.2,
            depthwise="auto",
            dtype="float32",  # activations; "bfloat16" is mixed precision for GPUs and TPUs (on CPU float32 is faster)
        )
    )
    cfg.update(overrides)
    return cfg


def data(**overrides) -> ml_collections.ConfigDict:
    """A data section (see `jaxspec.data.pipeline`; own data: `jaxspec.data.custom`, docs/data.md)."""
    cfg = ml_collections.ConfigDict(
        dict(
            name="embedded",  # embedded | cifar100 | imagenet2012 | folder:DIR | npz:FILE | tfds:NAME
            data_dir="",  # tfds data_dir, or the embedded data's cache dir
            manifest="",  # embedded only: JSON naming local raw files and their hashes
            groups_file=custom.DEFAULTS["groups_file"],  # JSON {"group": [class names]}: more named groups
            image_key=custom.DEFAULTS["image_key"],  # tfds:NAME: the image feature
            label_key=custom.DEFAULTS["label_key"],  # tfds:NAME: the class-label feature
            split_fractions=custom.DEFAULTS["split_fractions"],  # folder, npz: train/val/test shares drawn
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
            num_threads=4,  # per process making batches
            prefetch=8,  # batches prepared ahead (per worker process)
            # Worker processes making batches; 0: this process (32 px batches are one NumPy gather, which
            # worker processes would only add copies to); -1: one per core (per-image JPEG decoding).
            num_workers=0,
        )
    )
    cfg.update(overrides)
    return cfg


def phase(
    *, steps: int, batch_size: int, label_smoothing: float, optim, reestimate_bn: bool = False
) -> ml_collections.ConfigDict:
    """A training phase (generalist, specialist, scratch).

    `freeze`: comma-separated regexes on parameter paths ('blocks/0/.*') or
    block ranges ('blocks:0-5') whose parameters stay fixed;
    `freeze_bn_stats`: BatchNorm uses (and keeps) its running statistics;
    `reestimate_bn`: after training, BatchNorm's running statistics are
    recomputed for the final weights on the phase's data (on for models
    trained from random init, whose running averages trail their weights);
    `ema_decay` > 0: validate, evaluate and export a moving average of the
    weights (`jaxspec.train.ema`; YOLOv5 uses 0.9999), ramped up over `ema_tau` steps.
    """
    return ml_collections.ConfigDict(
        dict(
            steps=steps,
            batch_size=batch_size,
            label_smoothing=label_smoothing,
            optim=optim,
            freeze="",
            freeze_bn_stats=False,
            reestimate_bn=reestimate_bn,
            ema_decay=0.0,
            ema_tau=2000.0,
        )
    )


def specialize(
    *,
    subset: str,
    steps: int,
    batch_size: int,
    label_smoothing: float,
    optim,
    head_steps: int,
    dustbin_fraction: float = 0.1,
) -> ml_collections.ConfigDict:
    """The specialization phase and how the specialist is made (see `jaxspec.methods`)."""
    cfg = phase(steps=steps, batch_size=batch_size, label_smoothing=label_smoothing, optim=optim)
    cfg.subset = subset  # group names, class names or indices; 'a>b' for gradual specialization
    cfg.method = "extract"  # extract | fresh_head | head_then_full | scratch | suppress | dustbin | continued
    cfg.control = True  # also train the generalist further on all data (the `continued` control)
    cfg.head_steps = head_steps  # head_then_full: head-only steps before the full fine-tune
    cfg.head_lr = 1e-3
    cfg.dustbin_fraction = dustbin_fraction  # dustbin: share of non-S examples relabelled "everything else"
    return cfg


def sharding(**overrides) -> ml_collections.ConfigDict:
    """How a run spreads over devices (`jaxspec.sharding.run_mesh`). `fsdp` > 1 (or -1: all devices) splits
    params and optimizer state over an 'fsdp' mesh axis (large models); `devices` 0 uses every device, N the
    first N (one process only)."""
    cfg = ml_collections.ConfigDict({"fsdp": 1, "devices": 0})
    cfg.update(overrides)
    return cfg


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


def grouping(kind: str, **kw) -> ml_collections.ConfigDict:
    """A grouping section (see `jaxspec.groupings.make_groups`)."""
    return ml_collections.ConfigDict(
        dict(
            kind=kind,
            k=kw.pop("k", 0),
            sizes=kw.pop("sizes", ()),
            seed=kw.pop("seed", 0),
            level=kw.pop("level", "coarse"),
            **kw,
        )
    )
