"""grain input pipelines: source -> shard -> shuffle -> repeat -> batch -> augment.

Training works on whole batches: grain's iterator walks batch numbers, and each
batch's example indices (a per-epoch permutation of this process's shard) are
read and augmented in one call, because grain's per-element machinery costs
more than a 32px image's whole augmentation and a batch read from an in-memory
source is one NumPy gather. Batches stay uint8 on the host (4x less to move)
and are normalized on the device by `normalize`. Each process reads its own
shard of the source, so a multi-host run sees every example once per epoch;
the iterator's state is saved with the model so a resumed run continues with
the same data order.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.data import augment
from jaxspec.data.sources import Source, read_batch

TRANSFORMS = ("small", "imagenet")
EVAL_CROP_FRACTION = 0.875  # `imagenet` eval: resize the shorter side to image_size / this, then center-crop
MODEL_CHANNELS = 3  # what every model's stem takes; grayscale data is repeated to it by `normalize`


def pad_to(image: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads an HWC image (or NHWC batch) smaller than size x size to exactly that (centered).

    One already of that size is returned as is.
    """
    if image.ndim not in (3, 4):
        raise ValueError(f"Expected an HWC image or NHWC batch, got shape {image.shape}")
    h, w = image.shape[-3:-1]
    if h > size or w > size:
        raise ValueError(f"Image of {h}x{w} is larger than image_size={size}")
    if h == w == size:
        return image
    top, left = (size - h) // 2, (size - w) // 2
    pad = ((0, 0),) * (image.ndim - 3) + ((top, size - h - top), (left, size - w - left), (0, 0))
    return np.pad(image, pad)


def _stack_padded(images, size: int) -> np.ndarray:
    """An NHWC batch of `size` x `size` images from a batch array or a list of HWC images of any sizes."""
    if isinstance(images, np.ndarray):
        return pad_to(images, size)
    return np.stack([pad_to(im, size) for im in images])


def _train_map(name: str, size: int, cfg) -> Callable[[Any, np.random.Generator], np.ndarray]:
    """The augmentation of a batch of images (one NHWC array, or a list of HWC images of any sizes)."""
    if name == "small":
        return lambda images, rng: augment.pad_crop_flip_batch(_stack_padded(images, size), rng,
                                                               pad=cfg.crop_padding, flip=cfg.flip)

    def imagenet(im, rng):
        im = augment.random_resized_crop(im, rng, size=size)
        if cfg.flip:
            im = augment.horizontal_flip(im, rng)
        if cfg.randaugment_ops:
            im = augment.rand_augment(im, rng, num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude)
        if cfg.erasing_prob:
            im = augment.random_erasing(im, rng, p=cfg.erasing_prob)
        return im

    return lambda images, rng: np.stack([imagenet(im, rng) for im in images])


def _eval_map(name: str, size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> Callable[[Any], np.ndarray]:
    if name == "small":
        return functools.partial(_stack_padded, size=size)
    return lambda images: np.stack([augment.resize_center_crop(im, size=size, crop_fraction=crop_fraction)
                                    for im in images])


def preprocess_record(cfg, info) -> dict:
    """How evaluation fed a model, for its model.json: what `eval_batch` and `normalize` need, so a user
    (`jaxspec.predict`, an exported graph, an app) feeds new images exactly as the test split was fed.

    `small` zero-pads each image, centred, to image_size (larger ones are refused); `imagenet` resizes the
    shorter side to image_size / crop_fraction (bilinear) and crops the centre. `channels` is the data's
    channel count (1: grayscale, repeated to `model_channels` by `normalize`).
    """
    _check_transform(cfg.transform)
    record = {"transform": cfg.transform, "image_size": int(cfg.image_size), "channels": len(info.mean),
              "model_channels": MODEL_CHANNELS, "mean": list(info.mean), "std": list(info.std)}
    if cfg.transform == "imagenet":
        record["crop_fraction"] = EVAL_CROP_FRACTION
    return record


def eval_batch(images, record: dict) -> np.ndarray:
    """uint8 HWC images (a list of any sizes, or one NHWC array) -> the uint8 NHWC batch evaluation feeds
    a model whose `preprocess_record` is `record`."""
    _check_transform(record["transform"])
    return _eval_map(record["transform"], record["image_size"],
                     record.get("crop_fraction", EVAL_CROP_FRACTION))(images)


def _check_transform(name: str) -> None:
    if name not in TRANSFORMS:
        raise ValueError(f"Unknown data.transform {name!r}; choose one of {list(TRANSFORMS)}")


def _local_batch_size(global_batch_size: int) -> int:
    n = jax.process_count()
    if global_batch_size % n:
        raise ValueError(f"Batch size {global_batch_size} is not divisible by {n} processes")
    if global_batch_size % jax.device_count():
        raise ValueError(
            f"Batch size {global_batch_size} is not divisible by {jax.device_count()} devices"
        )
    return global_batch_size // n


def _read_options(cfg) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)


class _EpochOrder:
    """Positions in one process's endless example stream -> indices into the source.

    Epoch e of the stream is a permutation of `shard` seeded by (seed, e), so
    every epoch is reshuffled and every example is seen once per epoch; batches
    run on across epoch boundaries. One NumPy permutation per epoch replaces
    grain's per-element `shuffle`, whose ~10-20 us per index costs more than
    reading and augmenting a 32px image.
    """

    def __init__(self, shard: np.ndarray, seed: int):
        self._shard, self._seed = shard, seed
        # Per instance; a batch needs at most two epochs (len(shard) >= batch size).
        self._epoch = functools.lru_cache(maxsize=2)(self._permute)

    def _permute(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self._seed, epoch)).permutation(self._shard)

    def __call__(self, start: int, stop: int) -> np.ndarray:
        m = len(self._shard)
        return np.concatenate([
            self._epoch(e)[max(start - e * m, 0) : min(stop - e * m, m)] for e in range(start // m, (stop - 1) // m + 1)
        ])


def train_iterator(source: Source, cfg, *, batch_size: int, seed: int) -> grain.DatasetIterator:
    """An endless, per-epoch reshuffled iterator of augmented uint8 batches.

    `cfg` is the `data` config section (transform, image_size, augmentation).
    Every batch is full: the example stream runs on across epoch boundaries.
    """
    _check_transform(cfg.transform)
    if len(source) < batch_size:
        raise ValueError(f"Only {len(source)} training examples for batch size {batch_size}")
    fn = _train_map(cfg.transform, cfg.image_size, cfg)
    local = _local_batch_size(batch_size)
    order = _EpochOrder(np.arange(len(source))[jax.process_index() :: jax.process_count()], seed)

    def load(step: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        batch = read_batch(source, order(step * local, (step + 1) * local))
        return {"image": fn(batch["image"], rng), "label": batch["label"]}

    # Element k is local batch k: the iterator's checkpointed state is just k.
    ds = grain.MapDataset.range(sys.maxsize).random_map(load, seed=seed)
    return iter(ds.to_iter_dataset(_read_options(cfg)))


def eval_iterator(source: Source, cfg, *, batch_size: int):
    """One pass over every example in order, padded to full batches by repeating the last
    example; `mask` says which examples are real, so metrics count each example once."""
    _check_transform(cfg.transform)
    n = len(source)
    if n == 0:
        raise ValueError("Cannot evaluate on an empty source")
    fn = _eval_map(cfg.transform, cfg.image_size)
    local = _local_batch_size(batch_size)
    positions = np.arange(math.ceil(n / batch_size) * batch_size)[jax.process_index() :: jax.process_count()]

    def load(k: int) -> dict[str, np.ndarray]:
        pos = positions[k * local : (k + 1) * local]
        batch = read_batch(source, np.minimum(pos, n - 1))
        return {"image": fn(batch["image"]), "label": batch["label"], "mask": pos < n}

    ds = grain.MapDataset.range(len(positions) // local).map(load)
    return iter(ds.to_iter_dataset(_read_options(cfg)))


def normalize(images: jax.Array, mean, std, channels: int = MODEL_CHANNELS) -> jax.Array:
    """uint8 NHWC -> float32, standardized; grayscale is repeated to `channels`."""
    x = (images.astype(jnp.float32) / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    if x.shape[-1] != channels:
        x = jnp.broadcast_to(x, (*x.shape[:-1], channels))
    return x
