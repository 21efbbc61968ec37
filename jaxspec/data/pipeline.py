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

`data.num_workers` > 0 prepares batches in that many worker processes (grain's
`mp_prefetch`; -1: one per core this process may use), each with
`data.num_threads` threads: the ImageNet transform is Python and Pillow per
image, which one process's threads cannot spread over many cores. Batch k is
the same whichever process makes it (its randomness is seeded by k), and the
state saved is k alone, so a run may resume with another number of workers.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

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
        return lambda images, rng: augment.pad_crop_flip_batch(
            _stack_padded(images, size), rng, pad=cfg.crop_padding, flip=cfg.flip
        )

    imagenet = functools.partial(
        augment.inception_train,
        size=size,
        flip=cfg.flip,
        randaugment_ops=cfg.randaugment_ops,
        randaugment_magnitude=cfg.randaugment_magnitude,
        erasing_prob=cfg.erasing_prob,
    )
    return lambda images, rng: np.stack([imagenet(im, rng) for im in images])


def _eval_map(name: str, size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> Callable[[Any], np.ndarray]:
    if name == "small":
        return functools.partial(_stack_padded, size=size)
    return lambda images: np.stack(
        [augment.resize_center_crop(im, size=size, crop_fraction=crop_fraction) for im in images]
    )


def preprocess_record(cfg, info) -> dict:
    """How evaluation fed a model, for its model.json: what `eval_batch` and `normalize` need, so a user
    (`jaxspec.predict`, an exported graph, an app) feeds new images exactly as the test split was fed.

    `small` zero-pads each image, centred, to image_size (larger ones are refused); `imagenet` resizes the
    shorter side to image_size / crop_fraction (bilinear) and crops the centre. `channels` is the data's
    channel count (1: grayscale, repeated to `model_channels` by `normalize`).
    """
    _check_transform(cfg.transform)
    record = {
        "transform": cfg.transform,
        "image_size": int(cfg.image_size),
        "channels": len(info.mean),
        "model_channels": MODEL_CHANNELS,
        "mean": list(info.mean),
        "std": list(info.std),
    }
    if cfg.transform == "imagenet":
        record["crop_fraction"] = EVAL_CROP_FRACTION
    return record


def eval_batch(images, record: dict) -> np.ndarray:
    """uint8 HWC images (a list of any sizes, or one NHWC array) -> the uint8 NHWC batch evaluation feeds
    a model whose `preprocess_record` is `record`."""
    _check_transform(record["transform"])
    return _eval_map(record["transform"], record["image_size"], record.get("crop_fraction", EVAL_CROP_FRACTION))(images)


def _check_transform(name: str) -> None:
    if name not in TRANSFORMS:
        raise ValueError(f"Unknown data.transform {name!r}; choose one of {list(TRANSFORMS)}")


def _local_batch_size(global_batch_size: int) -> int:
    n = jax.process_count()
    if global_batch_size % n:
        raise ValueError(f"Batch size {global_batch_size} is not divisible by {n} processes")
    if global_batch_size % jax.device_count():
        raise ValueError(f"Batch size {global_batch_size} is not divisible by {jax.device_count()} devices")
    return global_batch_size // n


def _read_options(cfg) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)


def num_workers(cfg) -> int:
    """Worker processes for the `data` section `cfg`: `num_workers`, with -1 one per usable core."""
    n = cfg.get("num_workers", 0)
    return len(os.sched_getaffinity(0)) if n == -1 else n


def iterate(ds: grain.MapDataset, cfg) -> grain.DatasetIterator:
    """An iterator over `ds`, read ahead by `cfg.num_threads` threads in each of `num_workers(cfg)`
    worker processes (in this process when 0)."""
    it = ds.to_iter_dataset(_read_options(cfg))
    workers = num_workers(cfg)
    if not workers:
        return iter(it)
    if not flags.FLAGS.is_parsed():  # grain's mp_prefetch reads an absl flag; outside an absl app: the defaults
        flags.FLAGS.mark_as_parsed()
    return iter(it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))


class BatchIterator(grain.DatasetIterator):
    """Iterates `ds` (element k: batch k, its randomness seeded by k) as `iterate` does, with the
    position as all its state, `{'next_index': k}` as grain's in-process iterator saves it: a run
    resumes whatever `num_workers` made its batches before, and from checkpoints of either."""

    def __init__(self, ds: grain.MapDataset, cfg):
        super().__init__()
        self._ds, self._cfg, self._next, self._it = ds, cfg, 0, None

    def __next__(self):
        if self._it is None:  # started on first use, so restoring a state first starts no workers twice
            self._it = iterate(self._ds[self._next :], self._cfg)
        batch = next(self._it)
        self._next += 1
        return batch

    def get_state(self) -> dict:
        return {"next_index": self._next}

    def set_state(self, state: dict) -> None:
        self._stop()
        self._next = int(state["next_index"])

    def close(self) -> None:
        self._stop()
        self._closed = True

    def _stop(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None


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

    def __reduce__(self):  # to worker processes without the cache, which does not pickle
        return _EpochOrder, (self._shard, self._seed)

    def _permute(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self._seed, epoch)).permutation(self._shard)

    def __call__(self, start: int, stop: int) -> np.ndarray:
        m = len(self._shard)
        return np.concatenate(
            [
                self._epoch(e)[max(start - e * m, 0) : min(stop - e * m, m)]
                for e in range(start // m, (stop - 1) // m + 1)
            ]
        )


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
    # The ImageNet transform decodes file bytes itself (to RGB), where a source keeps them (see `read_batch`);
    # a grayscale source's images stay one channel, decoded by the source.
    encoded = cfg.transform == "imagenet" and len(source.info.mean) == 3

    def load(step: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        batch = read_batch(source, order(step * local, (step + 1) * local), encoded=encoded)
        return {"image": fn(batch["image"], rng), "label": batch["label"]}

    # Element k is local batch k, its randomness seeded by k: the iterator's checkpointed state is just k.
    return BatchIterator(grain.MapDataset.range(sys.maxsize).random_map(load, seed=seed), cfg)


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

    return iterate(grain.MapDataset.range(len(positions) // local).map(load), cfg)


def normalize(images: jax.Array, mean, std, channels: int = MODEL_CHANNELS) -> jax.Array:
    """uint8 NHWC -> float32, standardized; grayscale is repeated to `channels`."""
    x = (images.astype(jnp.float32) / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    if x.shape[-1] != channels:
        x = jnp.broadcast_to(x, (*x.shape[:-1], channels))
    return x
