"""The whole config checked before any data is read, any step compiled or any phase trained.

A bad value found after a generalist has trained for an hour costs that hour;
a bad value found inside a jitted step costs a traceback. Each check raises
`ConfigError` with one line: the key, the value, and what is allowed.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import zipfile

import jax
import ml_collections
import numpy as np

from jaxspec import methods, models
from jaxspec.data import custom, datasets, embedded_files
from jaxspec.data.subsets import resolve_subset
from jaxspec.models import mobilenet_v3, torchvision
from jaxspec.train import checkpoint, optimizers

DTYPES = ("float32", "bfloat16")
DETECTION_METHODS = ("suppress", "slice")  # a scratch detector is specialize.scratch=True
DETECTION_OPTIMIZERS = ("yolov5_sgd",)  # `jaxspec.detection.train`'s own, with its own schedule


class ConfigError(ValueError):
    """A config value that cannot run; the message is one line."""


def fail(key: str, value, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _int_at_least(key: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        fail(key, value, f"an integer >= {low}")


def _number_in(key: str, value, low: float, high: float, *, closed_high: bool = False) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and low <= value
        and (value <= high if closed_high else value < high)
    )
    if not ok:
        fail(key, value, f"a number in [{low}, {high}{']' if closed_high else ')'}")


def _phases(config: ml_collections.ConfigDict, prefix: str = ""):
    """(key, section) of every training phase: a section with `steps` and `batch_size`."""
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            if "steps" in v and "batch_size" in v:
                yield prefix + k, v
            yield from _phases(v, f"{prefix}{k}.")


def check_backbone(config: ml_collections.ConfigDict) -> None:
    """The detector's backbone pre-training (`jaxspec.detection.backbone`): a classifier on the scenes' images."""
    bb = config.backbone
    if config.data.name != "scenes":
        fail("backbone.epochs", bb.epochs, "0 unless data.name='scenes' (pre-training reads the scenes' images)")
    if bb.optim.optimizer not in optimizers.OPTIMIZERS:
        fail("backbone.optim.optimizer", bb.optim.optimizer, f"one of {list(optimizers.OPTIMIZERS)}")
    size = bb.data.image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 32 or size % 32:
        fail("backbone.data.image_size", size, "a multiple of 32 (YOLOv5's largest stride)")


def check_phase(key: str, phase: ml_collections.ConfigDict, *, detect: bool = False) -> None:
    epochs = phase.get("epochs", 0)
    if epochs:
        _number_in(f"{key}.epochs", epochs, 0, 1e9)
        _int_at_least(f"{key}.steps", phase.steps, 0)
    else:
        _int_at_least(f"{key}.steps", phase.steps, 1)
    _int_at_least(f"{key}.batch_size", phase.batch_size, 1)
    shards = jax.device_count()
    if phase.batch_size % shards:
        fail(f"{key}.batch_size", phase.batch_size, f"a multiple of the {shards} devices the batch is split over")
    if phase.batch_size % jax.process_count():
        fail(f"{key}.batch_size", phase.batch_size, f"a multiple of the {jax.process_count()} processes")
    if "label_smoothing" in phase:
        _number_in(f"{key}.label_smoothing", phase.label_smoothing, 0.0, 1.0)
    if "ema_decay" in phase:
        _number_in(f"{key}.ema_decay", phase.ema_decay, 0.0, 1.0)
        _number_in(f"{key}.ema_tau", phase.get("ema_tau", 2000.0), 1.0, math.inf)
    optim = phase.get("optim")
    if optim is not None:
        allowed = optimizers.OPTIMIZERS + (DETECTION_OPTIMIZERS if detect else ())
        if optim.optimizer not in allowed:
            fail(f"{key}.optim.optimizer", optim.optimizer, f"one of {list(allowed)}")
        if not (isinstance(optim.lr, int | float) and math.isfinite(optim.lr) and optim.lr > 0):
            fail(f"{key}.optim.lr", optim.lr, "a finite number > 0")
        if optim.optimizer not in DETECTION_OPTIMIZERS:
            if optim.schedule not in optimizers.SCHEDULES:
                fail(f"{key}.optim.schedule", optim.schedule, f"one of {list(optimizers.SCHEDULES)}")
            _int_at_least(f"{key}.optim.warmup_steps", optim.warmup_steps, 0)
            if optim.schedule == "step":
                _int_at_least(f"{key}.optim.decay_every", optim.decay_every, 1)
    for pattern in str(phase.get("freeze", "") or "").split(","):
        if pattern.strip() and not re.fullmatch(r"blocks:\d+-\d+", pattern.strip()):
            try:
                re.compile(pattern.strip())
            except re.error as e:
                fail(f"{key}.freeze", phase.freeze, f"comma-separated regexes or block ranges ({e})")


def check_init(key: str, init: str) -> None:
    """`init` names a readable exported model or weights file."""
    path = pathlib.Path(init)
    if init.endswith(torchvision.SUFFIXES):
        if not path.is_file():
            fail(key, init, "an existing weights file (.pth, .pt, .safetensors, .npz) or an exported model dir")
        if init.endswith(".npz"):
            try:
                with np.load(path) as f:
                    for name in f.files:
                        f[name]  # noqa: B018 -- reads every array, so a truncated file fails here
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                fail(key, init, f"a readable .npz of weights ({type(e).__name__}: {str(e)[:80]})")
        elif path.stat().st_size == 0:
            fail(key, init, "a non-empty weights file")
        return
    if not path.is_dir():
        fail(key, init, "an exported model dir (model.json + weights/) or a weights file")
    problem = checkpoint.export_problem(path.absolute())
    if problem and problem != "model.json has no weights checksums (an older export)":
        fail(key, init, f"a complete exported model ({problem})")


def check_data(data: ml_collections.ConfigDict) -> None:
    if data.get("manifest"):
        if not os.path.isfile(data.manifest):
            fail("data.manifest", data.manifest, "an existing JSON file naming the raw files")
        try:
            embedded_files.read_manifest(data.manifest)
        except (OSError, ValueError, AttributeError, TypeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            fail("data.manifest", data.manifest, f"a JSON object {{role: {{path, sha256}}}} ({msg[:100]})")
    if "image_size" in data:
        _int_at_least("data.image_size", data.image_size, 8)
    for key in ("num_threads", "prefetch"):
        if key in data:
            _int_at_least(f"data.{key}", data[key], 1 if key == "num_threads" else 0)
    workers = data.get("num_workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int | np.integer) or workers < -1:
        fail(
            "data.num_workers",
            workers,
            "0 (batches made in this process), a number of worker processes, or -1 (one per core)",
        )


def _read(data: ml_collections.ConfigDict, split_key: str | None, read):
    """`read()`, with own data's `DataError` as a `ConfigError` on the key at fault (None: the split's)."""
    try:
        return read()
    except custom.DataError as e:
        key = e.key or f"data.{split_key}"
        fail(key, data.get(key.removeprefix("data.")), str(e))


def check_dataset(data: ml_collections.ConfigDict) -> None:
    """A classification dataset's name, and own data's files: each split the config names is opened.

    Opening an image folder reads every image's header and an `.npz` every array (`jaxspec.data.custom`),
    so an empty class folder, an unreadable image or bad labels stop the run here, named.
    """
    own = custom.is_own(data.name)
    if not own and data.name not in datasets.SOURCES:
        fail("data.name", data.name, f"one of {list(datasets.SOURCES)}, or own data: {', '.join(custom.KINDS)}")
    fractions = data.get("split_fractions", custom.SPLIT_FRACTIONS)
    if not (
        isinstance(fractions, tuple | list)
        and len(fractions) == 3
        and all(not isinstance(f, bool) and isinstance(f, int | float) and 0 <= f <= 1 for f in fractions)
        and fractions[0] > 0
        and math.isclose(sum(fractions), 1.0)
    ):
        fail("data.split_fractions", fractions, "three numbers in [0, 1] (train, val, test) summing to 1, train > 0")
    if not own:
        if data.get("groups_file"):
            _read(data, None, lambda: datasets.get_info(data.name, groups_file=data.groups_file))
        return
    for key in ("train_split", "val_split", "test_split"):
        source = _read(data, key, lambda: datasets.open_split(data, data[key]))  # noqa: B023 -- called at once
        big = custom.oversized(source, data.image_size) if data.transform == "small" else None
        if big:
            fail(
                "data.transform",
                data.transform,
                f"images up to data.image_size={data.image_size} (it pads, "
                f"never shrinks), but {big}; 'imagenet' resizes",
            )


def check_batches_fit(config: ml_collections.ConfigDict) -> None:
    """Each phase's batch fits the training examples it reads: all of them for the generalist, S's for a
    specialist. Own data may be small, and a specialist's batch found too big after the generalist
    trained would cost that training."""
    data = config.data
    train = datasets.open_split(data, data.train_split)
    if not config.generalist.get("init") and config.generalist.batch_size > len(train):
        fail(
            "generalist.batch_size",
            config.generalist.batch_size,
            f"at most the {len(train)} training examples of {data.name}",
        )
    spec = config.specialize
    phase = "scratch" if spec.method == "scratch" else "specialize"
    for part in str(spec.subset).split(">"):
        try:
            subset = resolve_subset(part, train.info)
        except ValueError as e:
            fail("specialize.subset", spec.subset, str(e))
        count = int(np.isin(train.labels, subset).sum())
        if config[phase].batch_size > count:
            fail(
                f"{phase}.batch_size",
                config[phase].batch_size,
                f"at most the {count} training examples of S={part!r} in {data.name}",
            )


def check(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` for the first value in `config` that cannot run."""
    _int_at_least("seed", config.get("seed", 0), 0)
    if not isinstance(config.get("overwrite", False), bool):
        fail("overwrite", config.overwrite, "True or False")
    for key in ("log_every", "checkpoint_every"):
        if key in config:
            _int_at_least(key, config[key], 1)
    if "eval" in config:
        _int_at_least("eval.batch_size", config.eval.batch_size, 1)
        _int_at_least("eval.every_steps", config.eval.every_steps, 0)
    m = config.model
    if m.name not in models._FACTORIES:
        fail("model.name", m.name, f"one of {sorted(models._FACTORIES)}")
    if m.get("dtype", "float32") not in DTYPES:
        fail("model.dtype", m.dtype, f"one of {list(DTYPES)} (float16 would need loss scaling)")
    if "width_multiplier" in m and not (isinstance(m.width_multiplier, int | float) and m.width_multiplier > 0):
        fail("model.width_multiplier", m.width_multiplier, "a number > 0")
    if "dropout_rate" in m:
        _number_in("model.dropout_rate", m.dropout_rate, 0.0, 1.0)
    if m.get("num_blocks") is not None:
        if m.name not in mobilenet_v3.ARCHS:
            fail("model.num_blocks", m.num_blocks, f"None: it truncates a MobileNetV3, and {m.name} is not one")
        n = mobilenet_v3.block_count(m.name)
        try:
            mobilenet_v3.check_num_blocks(m.name, m.num_blocks)
        except ValueError:
            fail("model.num_blocks", m.num_blocks, f"None (all {n} blocks of {m.name}) or an integer in 1..{n}")
    check_data(config.data)
    if config.get("task") != "detect":
        check_dataset(config.data)
        if custom.is_own(config.data.name):
            check_batches_fit(config)
    for key, phase in _phases(config):
        if key == "backbone" and not phase.get("epochs", 0):
            continue  # off
        check_phase(key, phase, detect=config.get("task") == "detect")
    if config.get("task") == "detect" and config.get("backbone") is not None and config.backbone.epochs:
        check_backbone(config)
    init = config.get("generalist", {}).get("init", "")
    if init:
        check_init("generalist.init", init)
    method = config.get("specialize", {}).get("method")
    allowed = DETECTION_METHODS if config.get("task") == "detect" else methods.METHODS
    if method is not None and method not in allowed:
        scratch = " (a scratch detector is specialize.scratch=True)" if allowed is DETECTION_METHODS else ""
        fail("specialize.method", method, f"one of {list(allowed)}{scratch}")
