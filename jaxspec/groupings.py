"""How label subsets are formed: the groupings the paper compares.

Each generator returns an ordered `{name: sorted class indices}` dict, ready
to be the `S` of a specialist:

- `lexicographic`: K contiguous splits of the class index order (Table 1).
- `random_groups`: disjoint groups of given sizes, seeded (Table 3's control);
  `random_like`: one group of a named group's size from the same source.
- `semantic`: the dataset's own hierarchy as a partition (WordNet for ImageNet).
- `confusion_groups`: Hinton-style clusters of the classes a generalist confuses.

`make_groups` picks one from a config section, so experiments can sweep them.
"""

from __future__ import annotations

import json
import pathlib
import zlib
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np

from jaxspec.data import wordnet
from jaxspec.data.sources import DatasetInfo

_PKG_DATA = pathlib.Path(__file__).parent / "data"
KINDS = ("lexicographic", "random", "semantic", "confusion")
# The embedded groups that partition its classes (embedded.GROUPS also holds
# overlapping finer ones such as `livestock`).
_EMBEDDED_PARTITION = ("animals", "clothing", "digits")

_MAX_SEED = 2**32 - 1  # what scikit-learn accepts as a random_state
Groups = dict[str, tuple[int, ...]]


def _check_count(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def _check_partition(groups: Mapping[str, Sequence[int]], num_classes: int, what: str) -> None:
    flat = sorted(i for g in groups.values() for i in g)
    if flat != list(range(num_classes)):
        raise ValueError(f"{what} do not partition the {num_classes} classes exactly once each")


def lexicographic(num_classes: int, k: int) -> Groups:
    """K contiguous splits of 0..num_classes-1 named "lex0".."lex{k-1}".

    When K does not divide num_classes, the first `num_classes % k` groups get
    one class more, so sizes differ by at most one (as `np.array_split`).
    """
    num_classes = _check_count("num_classes", num_classes, 1, np.iinfo(np.int32).max)
    k = _check_count("k (number of lexicographic groups)", k, 1, num_classes)
    parts = np.array_split(np.arange(num_classes), k)
    return {f"lex{i}": tuple(int(c) for c in p) for i, p in enumerate(parts)}


def random_groups(num_classes: int, sizes: Sequence[int], seed: int) -> Groups:
    """Disjoint random groups of `sizes` named "random0"..., drawn without replacement.

    One permutation from `np.random.default_rng(seed)` is cut into consecutive
    pieces, so a seed fixes every group; indices within a group are sorted.
    Classes left over when sum(sizes) < num_classes belong to no group.
    """
    num_classes = _check_count("num_classes", num_classes, 1, np.iinfo(np.int32).max)
    sizes = [_check_count(f"sizes[{i}]", s, 1, num_classes) for i, s in enumerate(sizes)]
    if not sizes:
        raise ValueError("random_groups needs at least one group size")
    if sum(sizes) > num_classes:
        raise ValueError(f"Group sizes {sizes} sum to {sum(sizes)} > {num_classes} classes")
    seed = _check_count("seed", seed, 0, _MAX_SEED)
    perm = np.random.default_rng(seed).permutation(num_classes)
    pieces = np.split(perm, np.cumsum(sizes))[: len(sizes)]
    return {f"random{i}": tuple(int(c) for c in np.sort(p)) for i, p in enumerate(pieces)}


def random_like(info: DatasetInfo, group: str, seed: int) -> tuple[int, ...]:
    """A random group of `group`'s size from the same source: drawn by `seed` and `group`'s name (so that two
    groups of one size and source get different draws) from the classes of the semantic partition group holding
    all of `group`'s classes (`tops` -> `clothing`), or from all classes if none does (Table 3's control, inside
    one source so that it differs from `group` in meaning, not in origin)."""
    if group not in info.groups:
        raise ValueError(f"unknown group {group!r}; known: {sorted(info.groups)}")
    members = set(info.groups[group])
    try:
        parents = [tuple(g) for g in semantic(info).values() if members <= set(g)]
    except ValueError:  # no semantic partition for this dataset
        parents = []
    pool = np.array(min(parents, key=len) if parents else range(info.num_classes))
    seed = _check_count("seed", seed, 0, _MAX_SEED)
    rng = np.random.default_rng([seed, zlib.crc32(group.encode())])
    return tuple(sorted(int(c) for c in rng.choice(pool, len(members), replace=False)))


def _cifar100_superclasses(info: DatasetInfo) -> Groups:
    coarse = json.loads((_PKG_DATA / "cifar100_labels.json").read_text())["coarse_label_names"]
    return {name: tuple(sorted(info.groups[name])) for name in coarse}


def semantic(info: DatasetInfo, *, level: str | None = None) -> Groups:
    """The dataset's own class hierarchy as a partition of its classes.

    embedded: animals / clothing / digits; cifar100: its 20 superclasses;
    imagenet2012: WordNet's animals / artifacts / miscellaneous, or with
    `level="fine"` the 9 WordNet groups; own data: the groups of its
    `data.groups_file`, which must then partition the classes. `level` is None (or "coarse") except
    for ImageNet, the only dataset here with a second level.
    """
    if level not in (None, "coarse", "fine"):
        raise ValueError(f"Unknown semantic level {level!r}; choose None, 'coarse' or 'fine'")
    if level == "fine" and info.name != "imagenet2012":
        raise ValueError(f"level='fine' exists only for imagenet2012, not {info.name!r}")
    if info.name == "embedded":
        groups = {g: tuple(sorted(info.groups[g])) for g in _EMBEDDED_PARTITION}
    elif info.name == "cifar100":
        groups = _cifar100_superclasses(info)
    elif info.name == "imagenet2012":
        wnids = tuple(wordnet.table()["classes"])
        if tuple(info.class_names) != wnids:
            raise ValueError("imagenet2012's class names are not the 1000 sorted wnids of the WordNet table")
        groups = wordnet.groups(level or "coarse")
    elif info.groups:  # own data: the groups of its data.groups_file
        groups = dict(info.groups)
    else:
        raise ValueError(
            f"No semantic grouping for dataset {info.name!r}: give it a data.groups_file whose groups "
            "partition its classes (built in for embedded, cifar100, imagenet2012)"
        )
    _check_partition(groups, info.num_classes, f"The semantic groups of {info.name!r}")
    return groups


def _affinity(matrix: np.ndarray, kind: str) -> np.ndarray:
    """Symmetric, non-negative class affinity with a zero diagonal.

    A confusion matrix is first turned into rates (each row divided by its
    total) so frequent classes do not dominate; a covariance into a
    correlation. Negative values (anti-correlated predictions) mean no
    affinity.
    """
    if kind == "confusion":
        if (matrix < 0).any():
            raise ValueError("A confusion matrix cannot have negative entries; pass matrix='covariance' for one")
        totals = matrix.sum(1, keepdims=True)
        scaled = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    elif kind == "covariance":
        scale = np.sqrt(np.clip(np.diag(matrix), 0, None))
        outer = np.outer(scale, scale)
        scaled = np.divide(matrix, outer, out=np.zeros_like(matrix), where=outer > 0)
    else:
        raise ValueError(f"Unknown matrix kind {kind!r}; choose 'confusion' or 'covariance'")
    affinity = np.clip((scaled + scaled.T) / 2, 0, None)
    np.fill_diagonal(affinity, 0)
    return affinity


def confusion_groups(confusion: np.ndarray, k: int, seed: int, *, matrix: str = "confusion") -> Groups:
    """K groups of classes the generalist confuses with each other (Hinton et al., 2015).

    `confusion` is C x C: a confusion matrix (rows true class, columns
    predicted; `sklearn.metrics.confusion_matrix`) or, with
    `matrix="covariance"`, the covariance of the predicted probabilities over
    held-out examples. Classes are clustered by spectral clustering on the
    symmetrized affinity (see `_affinity`): it cuts the graph where little
    confusion flows, unlike k-means on rows, and takes the affinity as given.
    Classes never confused with any other carry no signal; each joins the
    currently smallest group (ties: the one with the lowest class), in class
    order. Groups are named in order of their smallest class, so names do not
    depend on the labels the clustering happens to assign. Every class is in
    exactly one group; the same seed gives the same groups.
    """
    from sklearn.cluster import SpectralClustering  # heavy import, only here

    confusion = np.asarray(confusion, np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"Expected a square C x C matrix, got shape {confusion.shape}")
    if not np.isfinite(confusion).all():
        raise ValueError("The confusion/covariance matrix has NaN or infinite entries")
    num_classes = confusion.shape[0]
    k = _check_count("k (number of confusion groups)", k, 1, num_classes)
    seed = _check_count("seed", seed, 0, _MAX_SEED)
    affinity = _affinity(confusion, matrix)
    active = np.flatnonzero(affinity.sum(1) > 0)
    if len(active) < k:
        raise ValueError(
            f"Only {len(active)} classes are ever confused with another; cannot form k={k} confusion groups"
        )
    if k == 1:
        labels = np.zeros(len(active), int)
    else:
        clustering = SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed)
        labels = clustering.fit_predict(affinity[np.ix_(active, active)])
    clusters = [list(active[labels == c]) for c in range(k)]
    if any(not c for c in clusters):
        raise ValueError(f"Spectral clustering left a group empty for k={k}; try a smaller k")
    clusters.sort(key=min)
    for c in sorted(set(range(num_classes)) - set(active.tolist())):
        min(clusters, key=len).append(c)
    clusters.sort(key=min)
    groups = {f"confusion{i}": tuple(sorted(int(c) for c in g)) for i, g in enumerate(clusters)}
    _check_partition(groups, num_classes, "Confusion groups")
    return groups


def make_groups(cfg: ml_collections.ConfigDict, info: DatasetInfo, confusion: np.ndarray | None = None) -> Groups:
    """Builds the groups a config section asks for.

    `cfg`: kind ("lexicographic" | "random" | "semantic" | "confusion"), k,
    sizes, seed, level and, for confusion, matrix ("confusion" |
    "covariance"). `kind="random"` with empty sizes draws groups of the
    semantic groups' sizes (Table 3's control); `confusion` is the C x C
    matrix that `kind="confusion"` clusters.
    """
    kind = cfg.get("kind")
    seed = cfg.get("seed", 0)
    if kind == "lexicographic":
        return lexicographic(info.num_classes, cfg.get("k"))
    if kind == "random":
        sizes = tuple(cfg.get("sizes") or ())
        if not sizes:
            sizes = tuple(len(g) for g in semantic(info, level=cfg.get("level")).values())
        return random_groups(info.num_classes, sizes, seed)
    if kind == "semantic":
        return semantic(info, level=cfg.get("level"))
    if kind == "confusion":
        if confusion is None:
            raise ValueError("kind='confusion' needs the generalist's confusion matrix (make_groups(..., confusion=))")
        if np.shape(confusion) != (info.num_classes, info.num_classes):
            raise ValueError(
                f"The confusion matrix has shape {np.shape(confusion)}, expected {(info.num_classes,) * 2} "
                f"for {info.name!r}"
            )
        return confusion_groups(confusion, cfg.get("k"), seed, matrix=cfg.get("matrix", "confusion"))
    raise ValueError(f"Unknown grouping kind {kind!r}; choose one of {list(KINDS)}")
