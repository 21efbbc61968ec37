"""Random-access image-classification sources behind one interface.

Every dataset (the embedded default, tfds `cifar100`, tfds `imagenet2012`, and
own data: an image folder, an `.npz`, any tfds dataset, see `jaxspec.data.custom`)
is a `Source`: `len()`, `source[i] -> {'image': uint8 HWC, 'label': int}`, all
labels as one array (domain constraining needs them up front), and an
`info` with class names and named groups. grain, the domain filter and every
later feature read data through this single code path.

A source may also have `get_batch(indices)`, a faster read of many records at
once (see `read_batch`); the training pipeline reads whole batches that way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from jaxspec.data import wordnet

_PKG_DATA = pathlib.Path(__file__).parent


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


def read_batch(source: Source, indices: np.ndarray) -> dict[str, Any]:
    """The records of `source` at `indices`: `{'image', 'label': int32 [B]}`.

    Uses the source's `get_batch` when it has one (then `image` is one NHWC
    array); otherwise reads record by record and `image` is a list of HWC
    arrays, which may differ in size.
    """
    indices = np.asarray(indices, np.int64)
    if hasattr(source, "get_batch"):
        return source.get_batch(indices)
    records = [source[int(i)] for i in indices]
    return {"image": [r["image"] for r in records], "label": np.asarray([r["label"] for r in records], np.int32)}


class TfdsSource:
    """A `tfds.data_source` (ArrayRecord, random access) as a `Source`.

    Labels are read once with image decoding skipped, which is what makes
    index-based domain constraining cheap even on ImageNet. `image_key` and
    `label_key` name the features that are the image and the class.
    """

    def __init__(self, name: str, split: str, info: DatasetInfo, data_dir: str | None, *,
                 image_key: str = "image", label_key: str = "label"):
        import tensorflow_datasets as tfds  # heavy; only when a tfds source is used

        self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        self._label_source = tfds.data_source(
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

    @functools.cached_property
    def labels(self) -> np.ndarray:
        return np.fromiter((r[self._label_key] for r in self._label_source), np.int32, len(self._label_source))

    def __repr__(self) -> str:
        return f"TfdsSource({self._name}[{self._split}], n={len(self)})"


def _embedded_info() -> DatasetInfo:
    from jaxspec.data import embedded

    return DatasetInfo(
        name="embedded",
        class_names=tuple(embedded.CLASS_NAMES),
        groups=dict(embedded.GROUPS),
        mean=(0.230,),  # measured over the whole dataset
        std=(0.365,),
    )


def _cifar100_info() -> DatasetInfo:
    # tfds only learns CIFAR-100's names when it downloads the archive, so ship them.
    meta = json.loads((_PKG_DATA / "cifar100_labels.json").read_text())
    fine_to_coarse = np.asarray(meta["fine_to_coarse"])
    groups = {
        coarse: tuple(int(i) for i in np.flatnonzero(fine_to_coarse == c))
        for c, coarse in enumerate(meta["coarse_label_names"])
    }
    animal_coarse = [
        "aquatic_mammals", "fish", "insects", "large_carnivores", "large_omnivores_and_herbivores",
        "medium_mammals", "non-insect_invertebrates", "reptiles", "small_mammals",
    ]
    groups["animals"] = tuple(sorted(i for c in animal_coarse for i in groups[c]))
    return DatasetInfo(
        name="cifar100",
        class_names=tuple(meta["fine_label_names"]),
        groups=groups,
        mean=(0.507, 0.487, 0.441),
        std=(0.267, 0.256, 0.276),
    )


def _imagenet_info() -> DatasetInfo:
    import tensorflow_datasets as tfds


    wnids = tuple(tfds.builder("imagenet2012").info.features["label"].names)
    # WordNet's animals/artifacts/miscellaneous (398/522/80; animals are classes 0-397)
    # and its 9 finer groups; the names do not collide.
    groups = {**wordnet.groups("coarse"), **wordnet.groups("fine"), "non_animals": tuple(range(398, 1000))}
    return DatasetInfo(
        name="imagenet2012",
        class_names=wnids,
        groups=groups,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )


_TFDS = {"cifar100": _cifar100_info, "imagenet2012": _imagenet_info}
SOURCES = ("embedded", *_TFDS)  # besides own data: folder:DIR, npz:FILE, tfds:NAME (jaxspec.data.custom)


def get_info(name: str, *, data_dir: str | None = None, groups_file: str = "", **own) -> DatasetInfo:
    """The label space of dataset `name`, with the groups of `groups_file` (JSON) added.

    `own` holds own data's options (`jaxspec.data.custom.get_info`).
    """
    from jaxspec.data import custom  # it imports this module

    if custom.is_own(name):
        return custom.get_info(name, data_dir=data_dir, groups_file=groups_file, **own)
    if name == "embedded":
        info = _embedded_info()
    elif name in _TFDS:
        info = _TFDS[name]()
    else:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {list(SOURCES)} or own data "
                         f"({', '.join(custom.KINDS)})")
    return custom.with_groups(info, groups_file) if groups_file else info


def get_source(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    manifest: str | None = None,
    groups_file: str = "",
    **own,
) -> Source:
    """Opens split `split` of dataset `name` (`SOURCES`, or own data: see `jaxspec.data.custom`).

    `groups_file` adds named groups; `own` holds own data's options (image_key, label_key, split_fractions).
    """
    from jaxspec.data import custom

    if custom.is_own(name):
        return custom.get_source(name, split, data_dir=data_dir, groups_file=groups_file, **own)
    info = get_info(name, groups_file=groups_file)
    if name == "embedded":
        from jaxspec.data import embedded

        images, labels = embedded.load(split, data_dir=data_dir or None, manifest=manifest or None)
        return ArraySource(images, labels, info)
    return TfdsSource(name, split, info, data_dir or None)


def open_split(data_cfg, split: str) -> Source:
    """Split `split` of the data a config's `data` section describes.

    A section saved before a key existed (an older run's results.json) reads that key's default.
    """
    from jaxspec.data import custom

    own = {key: data_cfg.get(key, default) for key, default in custom.DEFAULTS.items()}
    own["split_fractions"] = tuple(own["split_fractions"])
    return get_source(data_cfg.name, split, data_dir=data_cfg.get("data_dir") or None,
                      manifest=data_cfg.get("manifest") or None, **own)
