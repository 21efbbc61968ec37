"""grain input pipelines: source -> shard -> shuffle -> repeat -> augment -> batch.

Batches stay uint8 on the host (4x less to move) and are normalized on the
device by `normalize`. Each process reads its own shard of the source, so a
multi-host run sees every example once per epoch; the iterator's state is
saved with the model so a resumed run continues with the same data order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.data import augment
from jaxspec.data.sources import Source

TRANSFORMS = ("small", "imagenet")


def pad_to(image: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads an image smaller than size x size to exactly that (centered)."""
    h, w = image.shape[:2]
    if h > size or w > size:
        raise ValueError(f"Image of {h}x{w} is larger than image_size={size}")
    top, left = (size - h) // 2, (size - w) // 2
    pad = ((top, size - h - top), (left, size - w - left)) + ((0, 0),) * (image.ndim - 2)
    return np.pad(image, pad)


def _train_map(name: str, size: int, cfg) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    if name == "small":
        return lambda im, rng: augment.pad_crop_flip(pad_to(im, size), rng, pad=cfg.crop_padding, flip=cfg.flip)

    def imagenet(im, rng):
        im = augment.random_resized_crop(im, rng, size=size)
        if cfg.flip:
            im = augment.horizontal_flip(im, rng)
        if cfg.randaugment_ops:
            im = augment.rand_augment(im, rng, num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude)
        if cfg.erasing_prob:
            im = augment.random_erasing(im, rng, p=cfg.erasing_prob)
        return im

    return imagenet


def _eval_map(name: str, size: int) -> Callable[[np.ndarray], np.ndarray]:
    if name == "small":
        return functools.partial(pad_to, size=size)
    return functools.partial(augment.resize_center_crop, size=size)


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


def train_iterator(source: Source, cfg, *, batch_size: int, seed: int) -> grain.DatasetIterator:
    """An endless, per-epoch reshuffled iterator of augmented uint8 batches.

    `cfg` is the `data` config section (transform, image_size, augmentation).
    """
    _check_transform(cfg.transform)
    if len(source) < batch_size:
        raise ValueError(f"Only {len(source)} training examples for batch size {batch_size}")
    fn = _train_map(cfg.transform, cfg.image_size, cfg)
    ds = grain.MapDataset.source(source)[jax.process_index() :: jax.process_count()]
    ds = (
        ds.shuffle(seed=seed)
        .repeat()
        .random_map(lambda ex, rng: {"image": fn(ex["image"], rng), "label": ex["label"]}, seed=seed)
        .batch(_local_batch_size(batch_size), drop_remainder=True)
    )
    return iter(ds.to_iter_dataset(_read_options(cfg)))


class _PadToMultiple:
    """`source` padded by repeating its last example up to a multiple of `k`,
    with a `mask` saying which examples are real, so eval sees every example."""

    def __init__(self, source: Source, k: int):
        self._source, self._n = source, len(source)
        self._len = max(1, math.ceil(self._n / k)) * k

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[min(index, self._n - 1)]
        return {"image": record["image"], "label": record["label"], "mask": index < self._n}


def eval_iterator(source: Source, cfg, *, batch_size: int):
    """One pass over every example in order, padded to full batches (see `mask`)."""
    _check_transform(cfg.transform)
    fn = _eval_map(cfg.transform, cfg.image_size)
    local = _local_batch_size(batch_size)
    ds = grain.MapDataset.source(_PadToMultiple(source, batch_size))
    ds = ds[jax.process_index() :: jax.process_count()]
    ds = ds.map(lambda ex: {**ex, "image": fn(ex["image"])}).batch(local)
    return iter(ds.to_iter_dataset(_read_options(cfg)))


def normalize(images: jax.Array, mean, std, channels: int = 3) -> jax.Array:
    """uint8 NHWC -> float32, standardized; grayscale is repeated to `channels`."""
    x = (images.astype(jnp.float32) / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    if x.shape[-1] != channels:
        x = jnp.broadcast_to(x, (*x.shape[:-1], channels))
    return x
