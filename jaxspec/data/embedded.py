"""jaxspec's default dataset: 30 classes of 28x28 grayscale images.

Classes 0-9 are animal silhouettes (animal-mnist), 10-19 Fashion-MNIST
clothing and 20-29 MNIST digits, 1,000 images per class, split 70/10/20 into
train/validation/test. Everything comes from registry packages (see
embedded_files), so it works without internet beyond the registries. The
assembled splits are cached as one .npz per recipe so later loads are instant.

All three parts are white on black, like MNIST; the animals are filled
silhouettes, so they are brighter on average (mean pixel 70 vs. 34 for
digits and 73 for clothing), a cue a model can use to tell the parts apart.
"""

import hashlib
import json
import os
import sys
import uuid

import numpy as np

from jaxspec.data import embedded_files

_ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
_CLOTHING = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
_DIGITS = tuple(f"digit_{d}" for d in range(10))

CLASS_NAMES: tuple[str, ...] = _ANIMALS + _CLOTHING + _DIGITS


def _ids(*names: str) -> tuple[int, ...]:
    return tuple(sorted(CLASS_NAMES.index(n) for n in names))


GROUPS: dict[str, tuple[int, ...]] = {
    "animals": tuple(range(10)),
    "clothing": tuple(range(10, 20)),
    "digits": tuple(range(20, 30)),
    # Fashion-MNIST's classic confusions: upper-body garments look alike.
    "tops": _ids("tshirt_top", "pullover", "coat", "shirt"),
    "footwear": _ids("sandal", "sneaker", "ankle_boot"),
    # Four-legged side views whose silhouettes are easy to mix up.
    "livestock": _ids("cow", "horse", "sheep"),
    "wildlife": _ids("bear", "elephant", "giraffe", "zebra"),
    # Handwritten digits by shape: open curves, and a straight stroke with a bar or bowl on top.
    "curved_digits": _ids("digit_3", "digit_5", "digit_8"),
    "stroke_digits": _ids("digit_4", "digit_7", "digit_9"),
}

SPLITS = ("train", "validation", "test")
# Fractions rather than counts, so a small fixture splits the same way.
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
PER_CLASS = 1000
SEED = 0
# Bump when the assembly code changes in a way the parameters do not show;
# it is part of the cache key, so old caches are then ignored.
RECIPE_VERSION = 1

# (images role, labels role) for the class blocks 0-9, 10-19 and 20-29; the
# labels of each source are 0-9 in the order of the matching names above.
_SOURCES = (
    ("animal_data", "animal_labels"),
    ("fashion_train_images", "fashion_train_labels"),
    ("mnist_train_images", "mnist_train_labels"),
)


def load(split: str, *, data_dir: str | None = None, manifest: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [N, 28, 28], labels int32 [N]) of one split.

    Args:
      split: one of SPLITS.
      data_dir: cache for downloads and assembled arrays; defaults to
        $JAXSPEC_DATA_DIR, else ~/.cache/jaxspec/embedded.
      manifest: optional JSON file mapping raw-file roles (see
        embedded_files.RAW_FILES) to {"path": ..., "sha256": ...}; those
        files are used instead of the registry packages.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {SPLITS}")
    data_dir = data_dir or embedded_files.default_data_dir()
    entries = embedded_files.read_manifest(manifest) if manifest else {}
    path = os.path.join(data_dir, f"embedded-{cache_key(entries)}.npz")
    if not os.path.exists(path):
        print(f"jaxspec: assembling the embedded dataset into {path}", file=sys.stderr, flush=True)
        _save_atomically(path, _assemble(data_dir, entries))
    with np.load(path) as arrays:
        return arrays[f"{split}_images"], arrays[f"{split}_labels"]


def cache_key(manifest: dict[str, embedded_files.ManifestEntry]) -> str:
    """Hashes everything the assembled arrays depend on."""
    recipe = {
        "version": RECIPE_VERSION,
        "classes": CLASS_NAMES,
        "per_class": PER_CLASS,
        "fractions": SPLIT_FRACTIONS,
        "seed": SEED,
        "files": {role: embedded_files.declared_sha256(role, manifest) for pair in _SOURCES for role in pair},
    }
    blob = json.dumps(recipe, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def hash_order(n: int, *key: int) -> np.ndarray:
    """A keyed permutation of range(n).

    Used instead of np.random because NumPy does not promise that Generator
    streams stay the same across versions, and the split must never change.
    """
    h = np.arange(n, dtype=np.uint64)
    for k in key:
        h = _splitmix64(h ^ _splitmix64(np.array([k], np.uint64)))
    return np.argsort(h, kind="stable")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _read_source(
    images_role: str, labels_role: str, data_dir: str, manifest: dict[str, embedded_files.ManifestEntry]
) -> tuple[np.ndarray, np.ndarray]:
    images = embedded_files.read(images_role, data_dir, manifest)
    labels = embedded_files.read(labels_role, data_dir, manifest)
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
        raise ValueError(f"{images_role}: expected uint8 [N, 28, 28] images, got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1] or labels.dtype.kind not in "iu":
        raise ValueError(f"{labels_role}: expected {len(images)} integer labels, got {labels.dtype} {labels.shape}")
    if labels.size and not 0 <= labels.min() <= labels.max() <= 9:
        raise ValueError(f"{labels_role}: labels must lie in 0..9")
    return images, labels


def _assemble(data_dir: str, manifest: dict[str, embedded_files.ManifestEntry]) -> dict[str, np.ndarray]:
    """Selects a balanced, seeded subset per class and splits it.

    Per class, a keyed hash orders the images, the first `per_class` are
    kept, exact copies move to the front, and the list is cut by
    SPLIT_FRACTIONS. Each split is then shuffled so classes interleave.
    """
    sources = [_read_source(*roles, data_dir, manifest) for roles in _SOURCES]
    smallest = min(np.bincount(labels, minlength=10).min() for _, labels in sources)
    if smallest == 0:
        raise ValueError("every class needs at least one image")
    per_class = min(PER_CLASS, int(smallest))
    cuts = np.round(np.cumsum(SPLIT_FRACTIONS)[:-1] * per_class).astype(int)
    parts = {split: [] for split in SPLITS}
    for block, (images, labels) in enumerate(sources):
        for label in range(10):
            cls = 10 * block + label
            index = np.flatnonzero(labels == label)
            index = index[hash_order(len(index), SEED, cls)[:per_class]]
            index = index[_copies_first(images[index])]
            chunks = np.split(index, cuts)
            for split, chunk in zip(SPLITS, chunks, strict=True):
                parts[split].append((images[chunk], cls))
    arrays = {}
    for i, split in enumerate(SPLITS):
        images = np.concatenate([x for x, _ in parts[split]])
        labels = np.concatenate([np.full(len(x), c, np.int32) for x, c in parts[split]])
        order = hash_order(len(labels), SEED, len(CLASS_NAMES) + i)
        arrays[f"{split}_images"] = images[order]
        arrays[f"{split}_labels"] = labels[order]
    return arrays


def _copies_first(images: np.ndarray) -> np.ndarray:
    """A stable order that puts images occurring more than once first.

    animal-mnist repeats some images verbatim (376 of its 1,000 birds come
    in identical pairs). Listed first, every copy lands in train (they fit:
    train takes 70%), so none leaks into validation or test, and the
    per-class counts stay exact.
    """
    flat = images.reshape(len(images), -1)
    _, inverse, counts = np.unique(flat, axis=0, return_inverse=True, return_counts=True)
    return np.argsort(counts[inverse.reshape(-1)] == 1, kind="stable")


def _save_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Writes to a temp file first, so no reader ever sees half a cache."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
