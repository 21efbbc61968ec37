"""Domain constraining: the specialist's data D_S = {(x, y) : y in S}.

The filter is built from precomputed indices over the random-access source
rather than with grain's element-wise `filter`, which leaves empty slots in a
`MapDataset` (and warns) when most examples are dropped. Labels are remapped
to 0..|S|-1 in the order S was given, which is the order `extract` keeps the
head's rows in. `constrain_tf` is the same step for tf.data users.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxspec.data.sources import DatasetInfo, Source, read_batch


def label_map(num_classes: int, subset: Sequence[int]) -> np.ndarray:
    """`m[y]` is y's index within S, or -1 when y is not in S."""
    m = np.full(num_classes, -1, np.int32)
    m[np.asarray(subset, np.int64)] = np.arange(len(subset), dtype=np.int32)
    return m


def subset_info(info: DatasetInfo, subset: Sequence[int]) -> DatasetInfo:
    """The label space of a specialist: S's names, and the groups inside S.

    Keeping the groups that lie wholly inside S (remapped) is what lets a
    specialist be the generalist of a narrower one (animals -> dogs).
    """
    m = label_map(info.num_classes, subset)
    groups = {
        g: tuple(int(m[c]) for c in members) for g, members in info.groups.items() if all(m[c] >= 0 for c in members)
    }
    return dataclasses.replace(
        info,
        name=f"{info.name}[{len(subset)} classes]",
        class_names=tuple(info.class_names[c] for c in subset),
        groups=groups,
    )


class ConstrainedSource:
    """The examples of `source` whose label is in S, labels remapped to 0..|S|-1.

    With `dustbin=f`, a seeded random fraction f of the other examples is kept
    too, all labelled |S| (Hinton et al.'s "everything else" class).
    """

    def __init__(self, source: Source, subset: Sequence[int], *, dustbin: float | None = None, seed: int = 0):
        info = source.info
        self._map = label_map(info.num_classes, subset)
        keep = self._map[source.labels] >= 0
        self.info = subset_info(info, subset)
        if dustbin is not None:
            if not 0.0 <= dustbin <= 1.0:
                raise ValueError(f"dustbin fraction must be in [0, 1], got {dustbin}")
            others = np.flatnonzero(~keep)
            chosen = np.random.default_rng(seed).choice(others, size=round(dustbin * len(others)), replace=False)
            keep[chosen] = True
            self._map = np.where(self._map >= 0, self._map, len(subset)).astype(np.int32)
            self.info = dataclasses.replace(self.info, class_names=(*self.info.class_names, "dustbin"))
        self._indices = np.flatnonzero(keep)
        self._labels = self._map[source.labels[self._indices]]
        self._source = source
        self.subset = tuple(int(c) for c in subset)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = dict(self._source[int(self._indices[index])])
        record["label"] = self._map[record["label"]]
        return record

    def get_batch(self, indices: np.ndarray) -> dict[str, Any]:
        """Records at `indices`, read in one batch from the source when it can."""
        return self._read(indices, encoded=False)

    def get_encoded(self, indices: np.ndarray) -> dict[str, Any]:
        """Records at `indices` with the image files' bytes where the source keeps them (see `read_batch`)."""
        return self._read(indices, encoded=True)

    def _read(self, indices: np.ndarray, encoded: bool) -> dict[str, Any]:
        batch = read_batch(self._source, self._indices[indices], encoded=encoded)
        return {"image": batch["image"], "label": self._map[batch["label"]]}

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def source_indices(self) -> np.ndarray:
        """Positions of the kept examples in the unconstrained source."""
        return self._indices

    def __repr__(self) -> str:
        return f"ConstrainedSource({self._source!r}, |S|={len(self.subset)}, n={len(self)})"


def constrain_tf(dataset, subset: Sequence[int], num_classes: int, label_key: str = "label"):
    """The same constraining for a `tf.data.Dataset` of dict examples."""
    import tensorflow as tf

    table = tf.constant(label_map(num_classes, subset))

    def keep(example):
        return tf.gather(table, tf.cast(example[label_key], tf.int32)) >= 0

    def remap(example):
        example = dict(example)
        example[label_key] = tf.gather(table, tf.cast(example[label_key], tf.int32))
        return example

    return dataset.filter(keep).map(remap)
