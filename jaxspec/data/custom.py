"""Own data as `Source`s: an image folder, a NumPy `.npz`, or any tfds dataset by name.

`data.name` says which (docs/data.md has the details and every error):

- `folder:DIR`: one sub-folder per class holding images Pillow reads (in sub-folders too; hidden files
  such as `.DS_Store` are skipped). Class names are the sorted folder names, as in torchvision's
  `ImageFolder`. DIR may instead hold `train/`, `val/` and `test/`, each with the same class folders.
- `npz:FILE`, or a path ending in `.npz`: `images` (uint8 [N, H, W] or [N, H, W, C], C 1 or 3) and
  `labels` (integers in 0..K-1), optional `class_names` (K strings; else "0".."K-1"), or per split
  `train_images`, `train_labels`, `val_...`, `test_...`.
- `tfds:NAME`: a tfds dataset prepared in `data.data_dir`, its image and class-label features named by
  `data.image_key` and `data.label_key`; its splits are tfds' (`train`, `test[:50%]`, ...).

Folder and npz data have the parts train, val and test (the config's split `validation` is `val`). A part
with its own folder or arrays is used as it is; the others are drawn from the pool (`train/` or the
`train_` arrays, else all the data), per class, in proportion to `data.split_fractions`: each class's
items are ordered by the SHA-256 of their key (path in the folder, row in the .npz) and cut by count, so
the split needs no random state and a new file moves few others.

Images keep their size: the `imagenet` transform resizes and crops any size, `small` pads up to
`data.image_size` (`jaxspec.validate` refuses a bigger image before training). They have one channel when
every image is grayscale, else three (RGB, alpha dropped). mean/std are measured per channel on up to
`STATS_SAMPLE` evenly spaced training images, which fits normalization to the data without a pass over all
of it (for natural photos they come out close to ImageNet's).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from jaxspec.data.sources import ArraySource, DatasetInfo, TfdsSource

KINDS = ("folder:DIR", "npz:FILE", "tfds:NAME")
PARTS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
# The data config keys own data added, at the values that change nothing for the built-in datasets.
DEFAULTS = {"groups_file": "", "image_key": "image", "label_key": "label", "split_fractions": SPLIT_FRACTIONS}
STATS_SAMPLE = 256
_GRAY_MODES = ("1", "L", "LA")
_SPLIT_PARTS = {"train": "train", "validation": "val", "val": "val", "test": "test"}


class DataError(ValueError):
    """Own data that cannot be read as configured: one line naming the file.

    `key` is the config key to fix (`data.name`, `data.groups_file`, ...); None means the split being opened.
    """

    def __init__(self, key: str | None, message: str):
        super().__init__(message)
        self.key = key


def is_own(name: str) -> bool:
    return name.startswith(("folder:", "npz:", "tfds:")) or name.endswith(".npz")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


class FolderSource:
    """Image files as a `Source`, decoded on access.

    Decoding on access rather than up front keeps memory at a few batches whatever the folder's size
    (photos rarely fit in RAM decoded), and grain's threads decode while the model trains; a small image
    decodes about as fast as it is augmented, so an in-memory path for small folders would gain little.
    """

    def __init__(self, paths: Sequence[str], labels: np.ndarray, sizes: np.ndarray, mode: str, info: DatasetInfo):
        self.paths, self._labels, self._mode, self.info = tuple(paths), np.asarray(labels, np.int32), mode, info
        self.sizes = sizes  # (height, width) of each image, from its header

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": _decode(self.paths[index], self._mode), "label": self._labels[index]}

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __repr__(self) -> str:
        return f"FolderSource({self.info.name}, n={len(self)})"


def image_array(image: Image.Image, mode: str) -> np.ndarray:
    """A Pillow image as uint8 HWC in `mode` ('L' or 'RGB'), turned upright by its EXIF orientation: how
    training reads a file, and so how `jaxspec.predict` reads one."""
    array = np.asarray(ImageOps.exif_transpose(image).convert(mode))
    return array[..., None] if array.ndim == 2 else array


def _decode(path: str, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return image_array(im, mode)
    except (OSError, ValueError) as e:  # Pillow's errors for truncated or corrupt files
        raise DataError("data.name", f"{path}: unreadable image ({_one_line(e)})") from None


def _header(path: str) -> tuple[str, int, int]:
    """(mode, height, width) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.mode, im.height, im.width
    except UnidentifiedImageError:
        raise DataError("data.name", f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError) as e:
        raise DataError("data.name", f"{path}: unreadable image ({_one_line(e)})") from None


def _channel_stats(images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std, in [0, 1] units, over every pixel of `images` (HWC uint8 arrays)."""
    total = squares = 0.0
    count = 0
    for im in images:
        x = im.reshape(-1, im.shape[-1]).astype(np.float64) / 255.0
        total, squares, count = total + x.sum(0), squares + (x * x).sum(0), count + len(x)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    # A constant channel would divide by zero; 1/255 is one grey level.
    return tuple(round(float(m), 4) for m in mean), tuple(round(max(float(s), 1 / 255), 4) for s in std)


def _sample(n: int) -> np.ndarray:
    """Up to STATS_SAMPLE evenly spaced positions of n (every class when the items are grouped by class)."""
    return np.unique(np.linspace(0, n - 1, min(n, STATS_SAMPLE)).round().astype(np.int64))


def _draw(keys: Sequence[str], labels: np.ndarray, fractions: dict[str, float]) -> dict[str, np.ndarray]:
    """Positions of each part drawn from a pool: per class, items ordered by the SHA-256 of their key, then
    cut by count in proportion to `fractions` (rounded half up; train takes the remainder)."""
    total = sum(fractions.values())
    out: dict[str, list[int]] = {p: [] for p in fractions}
    for c in np.unique(labels):
        members = sorted(np.flatnonzero(labels == c), key=lambda i: hashlib.sha256(keys[i].encode()).digest())
        start = 0
        for part in [p for p in fractions if p != "train"]:
            count = int(np.floor(len(members) * fractions[part] / total + 0.5))
            out[part] += members[start : start + count]
            start += count
        if "train" in fractions:
            out["train"] += members[start:]
    return {p: np.sort(np.asarray(v, np.int64)) for p, v in out.items()}


def _part(split: str) -> str:
    if split not in _SPLIT_PARTS:
        raise DataError(None, f"folder and npz data have the splits train, validation (or val) and test, not {split!r}")
    return _SPLIT_PARTS[split]


def _fractions(drawn: Sequence[str], split_fractions: Sequence[float]) -> dict[str, float]:
    return {p: float(f) for p, f in zip(PARTS, split_fractions) if p in drawn}


def _check_drawn(where: str, parts: dict[str, np.ndarray], split_fractions) -> None:
    for part, positions in parts.items():
        if not len(positions):
            raise DataError(
                "data.split_fractions",
                f"{where}: data.split_fractions={tuple(split_fractions)} leaves the {part} part no examples",
            )


# --- folders ---------------------------------------------------------------------------------------------


def _visible(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))


def _files(class_dir: pathlib.Path) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime_ns) of every visible file under `class_dir`, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith("."):
                path = os.path.join(dirpath, f)
                st = os.stat(path)
                out.append((path, st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


def _layout(root: pathlib.Path) -> tuple[tuple[str, str, tuple[tuple[str, int, int], ...]], ...]:
    """((part or '' without split folders, class, files), ...): what the folder holds, by stat alone."""
    if not root.is_dir():
        raise DataError("data.name", f"{root}: no such folder")
    top = _visible(root)
    splits = [p for p in top if p.is_dir() and p.name in PARTS]
    if splits:
        stray = [p for p in top if p not in splits]
        if stray:
            raise DataError(
                "data.name",
                f"{stray[0]}: beside the split folders {[p.name for p in splits]} {root} may hold nothing else",
            )
        if "train" not in [p.name for p in splits]:
            raise DataError("data.name", f"{root}: split folders without train/ (val/ and test/ are optional)")
    out = []
    for part, directory in [(p.name, p) for p in splits] or [("", root)]:
        entries = _visible(directory)
        if not entries:
            raise DataError("data.name", f"{directory}: no class folders")
        loose = [p for p in entries if not p.is_dir()]
        if loose:
            raise DataError(
                "data.name", f"{loose[0]}: a file outside any class folder ({directory} holds one sub-folder per class)"
            )
        for class_dir in entries:
            files = _files(class_dir)
            if not files:
                raise DataError("data.name", f"{class_dir}: an empty class folder (every class needs an image)")
            out.append((part, class_dir.name, files))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class _Loaded:
    """Own data split into its parts: per part the source's arguments, and the dataset's `DatasetInfo`."""

    parts: dict[str, tuple]
    info: DatasetInfo


@functools.lru_cache(maxsize=4)
def _load_folder(name: str, layout: tuple, split_fractions: tuple) -> _Loaded:
    """Reads every header (once per process and folder state), then splits and measures the folder."""
    root = name.removeprefix("folder:")
    by_part: dict[str, list[tuple[str, tuple]]] = {}
    for part, cls, files in layout:
        by_part.setdefault(part, []).append((cls, files))
    class_names = tuple(cls for cls, _ in by_part["train" if "train" in by_part else ""])
    for part, classes in by_part.items():
        here = [cls for cls, _ in classes]
        if tuple(here) != class_names:
            missing = sorted(set(class_names) - set(here)) or sorted(set(here) - set(class_names))
            raise DataError(
                "data.name",
                f"{os.path.join(root, part)}: its class folders differ from "
                f"{os.path.join(root, 'train')}'s (not in both: {missing[:5]})",
            )
    items = {}
    for part, classes in by_part.items():
        paths = [f[0] for _, files in classes for f in files]
        labels = np.asarray([c for c, (_, files) in enumerate(classes) for _ in files], np.int32)
        headers = [_header(p) for p in paths]
        items[part or "train"] = (paths, labels, headers)
    modes = {h[0] for _, _, headers in items.values() for h in headers}
    mode = "L" if modes <= set(_GRAY_MODES) else "RGB"

    parts = {}
    drawn = [p for p in PARTS if p not in items or p == "train"]
    paths, labels, headers = items["train"]
    keys = [os.path.relpath(p, root) for p in paths]
    for part, pos in _draw(keys, labels, _fractions(drawn, split_fractions)).items():
        items[part] = ([paths[i] for i in pos], labels[pos], [headers[i] for i in pos])
    _check_drawn(root, {p: items[p][1] for p in drawn}, split_fractions)
    for part in PARTS:
        paths, labels, headers = items[part]
        parts[part] = (paths, labels, np.asarray([h[1:] for h in headers], np.int64).reshape(-1, 2), mode)
    train_paths = parts["train"][0]
    mean, std = _channel_stats(_decode(train_paths[i], mode) for i in _sample(len(train_paths)))
    digest = hashlib.sha256(json.dumps(layout).encode()).hexdigest()
    info = DatasetInfo(name=name, class_names=class_names, groups={}, mean=mean, std=std, digest=digest)
    return _Loaded(parts, info)


# --- npz -------------------------------------------------------------------------------------------------


def _npz_keys(part: str) -> tuple[str, str]:
    return f"{part}_images", f"{part}_labels"


@functools.lru_cache(maxsize=1)
def _load_npz(name: str, stat: tuple[int, int], split_fractions: tuple) -> _Loaded:
    """Reads and checks every array (once per process and file state), then splits and measures them."""
    path = name.removeprefix("npz:")

    def bad(message: str) -> DataError:
        return DataError("data.name", f"{path}: {message}")

    if not zipfile.is_zipfile(path):
        raise bad("not an .npz (a zip of .npy arrays, as np.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise bad(f"not a readable .npz ({_one_line(e)})") from None
    known = {"images", "labels", "class_names", *(k for p in PARTS for k in _npz_keys(p))}
    unknown = sorted(set(arrays) - known)
    if unknown:
        raise bad(
            f"unknown array {unknown[0]!r}; allowed: images, labels, class_names, and train_, val_, test_ "
            "images and labels"
        )
    if "images" in arrays and "train_images" in arrays:
        raise bad("has both 'images' and 'train_images'; the pool to draw splits from must be one of them")
    pool = "train" if "train_images" in arrays else ""
    given = {}  # part -> (images NHWC, labels, the labels' key)
    for part in (pool, *(p for p in PARTS if p != "train")):
        im_key, lab_key = _npz_keys(part) if part else ("images", "labels")
        if part != pool and im_key not in arrays and lab_key not in arrays:
            continue  # drawn from the pool
        for key in (im_key, lab_key):
            if key not in arrays:
                raise bad(f"no {key!r} array (its arrays: {sorted(arrays)})")
        images, labels = arrays[im_key], arrays[lab_key]
        channels = images.shape[-1] if images.ndim == 4 else 1
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or channels not in (1, 3):
            raise bad(
                f"{im_key!r} must be uint8 [N, H, W] or [N, H, W, 1 or 3], not {images.dtype} {list(images.shape)}"
            )
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise bad(f"{lab_key!r} must be integers [N], not {labels.dtype} {list(labels.shape)}")
        if len(images) != len(labels):
            raise bad(f"{im_key!r} has {len(images)} images but {lab_key!r} {len(labels)} labels")
        if not len(labels):
            raise bad(f"{im_key!r} is empty")
        if labels.min() < 0:
            raise bad(f"{lab_key!r} holds {int(labels.min())}; labels are class indices >= 0")
        given[part or "train"] = (images if images.ndim == 4 else images[..., None], labels.astype(np.int32), lab_key)
    channels = {images.shape[-1] for images, _, _ in given.values()}
    if len(channels) > 1:
        raise bad(f"its image arrays differ in channels ({sorted(channels)})")
    top, top_key = max((int(labels.max()), key) for _, labels, key in given.values())
    if "class_names" in arrays:
        names = arrays["class_names"]
        if names.ndim != 1 or names.dtype.kind != "U" or len(set(names.tolist())) != len(names):
            raise bad("'class_names' must be distinct strings [K] (np.array(['cat', 'dog', ...]))")
        class_names = tuple(names.tolist())
        if top >= len(class_names):
            raise bad(
                f"{top_key!r} holds {top}; with {len(class_names)} class_names labels lie in 0..{len(class_names) - 1}"
            )
    else:
        class_names = tuple(str(c) for c in range(top + 1))

    images, labels, _ = given["train"]
    drawn = [p for p in PARTS if p not in given or p == "train"]
    parts = {p: given[p][:2] for p in given if p != "train"}
    for part, pos in _draw([str(i) for i in range(len(labels))], labels, _fractions(drawn, split_fractions)).items():
        parts[part] = (images[pos], labels[pos])
    _check_drawn(path, {p: parts[p][1] for p in drawn}, split_fractions)
    train = parts["train"][0]
    mean, std = _channel_stats(train[i] for i in _sample(len(train)))
    digest = hashlib.sha256(json.dumps(stat).encode()).hexdigest()
    info = DatasetInfo(name=name, class_names=class_names, groups={}, mean=mean, std=std, digest=digest)
    return _Loaded(parts, info)


# --- tfds ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)  # a prepared tfds dataset does not change; each split's opening asks
def _tfds_info(name: str, data_dir: str | None, image_key: str, label_key: str) -> DatasetInfo:
    """Class names from the label feature; mean/std from tfds' `train` split (its first without one)."""
    import tensorflow_datasets as tfds  # heavy; only when a tfds dataset is used

    dataset = name.removeprefix("tfds:")
    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 -- tfds raises many kinds; each is the user's name or data_dir
        raise DataError("data.name", f"tfds has no dataset {dataset!r} ({_one_line(e)})") from None
    features = builder.info.features
    for key, value in (("data.image_key", image_key), ("data.label_key", label_key)):
        if value not in features:
            raise DataError(key, f"tfds dataset {dataset!r} has no feature {value!r}; its features: {sorted(features)}")
    if not isinstance(features[image_key], tfds.features.Image):
        raise DataError("data.image_key", f"feature {image_key!r} of tfds dataset {dataset!r} is not an image")
    names = getattr(features[label_key], "names", None)
    if not names:
        raise DataError("data.label_key", f"feature {label_key!r} of tfds dataset {dataset!r} is not a class label")
    splits = list(builder.info.splits)
    split = "train" if "train" in splits or not splits else splits[0]
    try:
        records = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001 -- as above
        raise DataError(
            "data.name", f"tfds dataset {dataset!r} is not prepared in data.data_dir={data_dir!r} ({_one_line(e)})"
        ) from None
    mean, std = _channel_stats(np.asarray(records[int(i)][image_key]) for i in _sample(len(records)))
    return DatasetInfo(name=name, class_names=tuple(names), groups={}, mean=mean, std=std)


# --- entry points ----------------------------------------------------------------------------------------


def _loaded(name: str, split_fractions: Sequence[float]) -> _Loaded:
    if name.startswith("folder:"):
        return _load_folder(name, _layout(pathlib.Path(name.removeprefix("folder:"))), tuple(split_fractions))
    path = name.removeprefix("npz:")
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError("data.name", f"{path}: no such .npz file ({e.strerror})") from None
    return _load_npz(name, (st.st_size, st.st_mtime_ns), tuple(split_fractions))


def get_info(
    name: str,
    *,
    data_dir: str | None = None,
    groups_file: str = "",
    image_key: str = "image",
    label_key: str = "label",
    split_fractions: Sequence[float] = SPLIT_FRACTIONS,
) -> DatasetInfo:
    """The label space of own data `name` (see the module doc), with the groups of `groups_file`."""
    if name.startswith("tfds:"):
        info = _tfds_info(name, data_dir or None, image_key, label_key)
    else:
        info = _loaded(name, split_fractions).info
    return with_groups(info, groups_file) if groups_file else info


def get_source(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    groups_file: str = "",
    image_key: str = "image",
    label_key: str = "label",
    split_fractions: Sequence[float] = SPLIT_FRACTIONS,
):
    """Split `split` of own data `name`: a `FolderSource`, an `ArraySource` (npz) or a `TfdsSource`."""
    info = get_info(
        name,
        data_dir=data_dir,
        groups_file=groups_file,
        image_key=image_key,
        label_key=label_key,
        split_fractions=split_fractions,
    )
    if name.startswith("tfds:"):
        try:
            return TfdsSource(
                name.removeprefix("tfds:"), split, info, data_dir or None, image_key=image_key, label_key=label_key
            )
        except Exception as e:  # noqa: BLE001 -- tfds' error for a split it does not have
            raise DataError(
                None, f"tfds dataset {name.removeprefix('tfds:')!r} cannot open split {split!r} ({_one_line(e)})"
            ) from None
    arguments = _loaded(name, split_fractions).parts[_part(split)]
    if name.startswith("folder:"):
        return FolderSource(*arguments, info=info)
    return ArraySource(*arguments, info)


def with_groups(info: DatasetInfo, path: str) -> DatasetInfo:
    """`info` with the groups of a JSON file `{"group": ["class name", ...]}` added (`data.groups_file`).

    Groups are sorted class indices, as the built-in ones; a name that `specialize.subset` could not tell
    from a class or parse (a class name, a number, commas, '>') is refused.
    """

    def bad(message: str) -> DataError:
        return DataError("data.groups_file", f"{path}: {message}")

    try:
        table = json.loads(pathlib.Path(path).read_text())
    except FileNotFoundError:
        raise bad("no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"not readable JSON ({_one_line(e)})") from None
    if not isinstance(table, dict) or not table:
        raise bad('must be a JSON object {"group name": ["class name", ...], ...}')
    index = {n: i for i, n in enumerate(info.class_names)}
    groups = dict(info.groups)
    for group, members in table.items():
        if group in info.groups or group in index:
            raise bad(f"group {group!r} is already a {'group' if group in info.groups else 'class'} of {info.name}")
        if not group or group.strip() != group or any(c in group for c in ",>") or group.lstrip("-").isdigit():
            raise bad(
                f"group name {group!r} cannot be written in specialize.subset (no commas, '>', bare numbers "
                "or outer spaces)"
            )
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            raise bad(f"group {group!r} must be a non-empty list of class names")
        unknown = [m for m in members if m not in index]
        if unknown:
            shown = ", ".join(info.class_names[:20]) + (", ..." if info.num_classes > 20 else "")
            raise bad(f"group {group!r} names {unknown[0]!r}, not a class of {info.name} ({shown})")
        if len(set(members)) < len(members):
            raise bad(f"group {group!r} names a class twice")
        groups[group] = tuple(sorted(index[m] for m in members))
    return dataclasses.replace(info, groups=groups)


def oversized(source, size: int) -> str | None:
    """The first image of a folder or npz source larger than size x size, described; else None."""
    if isinstance(source, FolderSource):
        big = np.flatnonzero(source.sizes.max(1) > size)
        return f"{source.paths[big[0]]} is {source.sizes[big[0], 1]}x{source.sizes[big[0], 0]}" if len(big) else None
    if isinstance(source, ArraySource) and len(source):
        h, w = source[0]["image"].shape[:2]
        return f"{source.info.name.removeprefix('npz:')} holds {w}x{h} images" if max(h, w) > size else None
    return None
