"""Which dataset a `data.name` means, and opening its splits as `Source`s.

Built in: `embedded` (the default, shipped through the package registries), tfds `cifar100` and tfds
`imagenet2012`, with their class names and named groups; own data (`folder:DIR`, `npz:FILE`,
`tfds:NAME`) is `jaxspec.data.custom`. Everything that reads data goes through `open_split` or
`get_source`.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from jaxspec.data import custom, wordnet
from jaxspec.data.sources import ArraySource, DatasetInfo, Source, TfdsSource

_PKG_DATA = pathlib.Path(__file__).parent


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
        "aquatic_mammals",
        "fish",
        "insects",
        "large_carnivores",
        "large_omnivores_and_herbivores",
        "medium_mammals",
        "non-insect_invertebrates",
        "reptiles",
        "small_mammals",
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
    if custom.is_own(name):
        return custom.get_info(name, data_dir=data_dir, groups_file=groups_file, **own)
    if name == "embedded":
        info = _embedded_info()
    elif name in _TFDS:
        info = _TFDS[name]()
    else:
        raise ValueError(
            f"Unknown dataset {name!r}; choose one of {list(SOURCES)} or own data ({', '.join(custom.KINDS)})"
        )
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
    own = {key: data_cfg.get(key, default) for key, default in custom.DEFAULTS.items()}
    own["split_fractions"] = tuple(own["split_fractions"])
    return get_source(
        data_cfg.name,
        split,
        data_dir=data_cfg.get("data_dir") or None,
        manifest=data_cfg.get("manifest") or None,
        **own,
    )
