"""Random-access image-classification sources behind one interface.

Every dataset (the embedded default, tfds `cifar100`, tfds `imagenet2012`, and
own data: an image folder, an `.npz`, any tfds dataset, see `jaxspec.data.custom`;
`jaxspec.data.datasets` opens one by name) is a `Source`: `len()`,
`source[i] -> {'image': uint8 HWC, 'label': int}`, all
labels as one array (domain constraining needs them up front), and an
`info` with class names and named groups. grain, the domain filter and every
later feature read data through this single code path.

A source may also have `get_batch(indices)`, a faster read of many records at
once (see `read_batch`); the training pipeline reads whole batches that way.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a source knows about its label space."""

    name: str
    class_names: tuple[str, ...]
    groups: Mapping[str, tuple[int, ...]]
    mean: tuple[float, ...]  # per-channel, in [0, 1] units, for normalization
    std: tuple[float, ...]
    # Own data: a digest of its files' paths, sizes and mtimes, so a workdir notices changed files.
    digest: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class Source(Protocol):
    info: DatasetInfo

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @property
    def labels(self) -> np.ndarray: ...


class ArraySource:
    """An in-memory source over (images, labels) arrays."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, info: DatasetInfo):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if images.ndim == 3:  # grayscale N,H,W -> N,H,W,1
            images = images[..., None]
        self._images = images
        self._labels = np.asarray(labels, np.int32)
        self.info = info

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self._images[index], "label": self._labels[index]}

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The records at `indices` as one NHWC image array (a single copy)."""
        return {"image": self._images[indices], "label": self._labels[indices]}

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __repr__(self) -> str:
        return f"ArraySource({self.info.name}, n={len(self)})"


def read_batch(source: Source, indices: np.ndarray, *, encoded: bool = False) -> dict[str, Any]:
    """The records of `source` at `indices`: `{'image', 'label': int32 [B]}`.

    Uses the source's `get_batch` when it has one (then `image` is one NHWC
    array); otherwise reads record by record and `image` is a list of HWC
    arrays, which may differ in size. With `encoded`, a source that keeps its
    images as files (`get_encoded`) gives a list of their bytes instead, for a
    transform that decodes them itself.
    """
    indices = np.asarray(indices, np.int64)
    if encoded and hasattr(source, "get_encoded"):
        return source.get_encoded(indices)
    if hasattr(source, "get_batch"):
        return source.get_batch(indices)
    records = [source[int(i)] for i in indices]
    return {"image": [r["image"] for r in records], "label": np.asarray([r["label"] for r in records], np.int32)}


class TfdsSource:
    """A `tfds.data_source` (ArrayRecord, random access) as a `Source`.

    Labels are read once with image decoding skipped, which is what makes
    index-based domain constraining cheap even on ImageNet. The same undecoded
    records give the image files' bytes (`get_encoded`), which the ImageNet
    transform decodes itself. `image_key` and `label_key` name the features
    that are the image and the class.
    """

    def __init__(
        self,
        name: str,
        split: str,
        info: DatasetInfo,
        data_dir: str | None,
        *,
        image_key: str = "image",
        label_key: str = "label",
    ):
        import tensorflow_datasets as tfds  # heavy; only when a tfds source is used

        self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        self._encoded = tfds.data_source(
            name,
            split=split,
            data_dir=data_dir,
            download=False,
            decoders={image_key: tfds.decode.SkipDecoding()},
        )
        self.info = info
        self._name, self._split = name, split
        self._image_key, self._label_key = image_key, label_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        return {"image": np.asarray(record[self._image_key]), "label": np.int32(record[self._label_key])}

    def get_encoded(self, indices: np.ndarray) -> dict[str, Any]:
        """The records at `indices` with `image` the files' bytes (JPEG for ImageNet), not decoded."""
        records = [self._encoded[int(i)] for i in indices]  # per record: tfds' mock sources lack a batch read
        return {
            "image": [r[self._image_key] for r in records],
            "label": np.asarray([r[self._label_key] for r in records], np.int32),
        }

    @functools.cached_property
    def labels(self) -> np.ndarray:
        return np.fromiter((r[self._label_key] for r in self._encoded), np.int32, len(self._encoded))

    def __repr__(self) -> str:
        return f"TfdsSource({self._name}[{self._split}], n={len(self)})"
