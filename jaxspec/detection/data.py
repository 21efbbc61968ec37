"""Detection data: sources (embedded scenes, tfds `coco/2017`), domain constraining, grain pipelines.

A detection source is random access, `source[i] -> {'image': uint8 HWC, 'boxes': float32 [n, 4] xyxy
pixels, 'labels': int32 [n]}` plus optional `'crowd': bool [n]`, with an `info` (a
`jaxspec.data.sources.DatasetInfo`) and `box_labels` (every image's labels, read without decoding
pixels, which domain constraining needs up front).

Batches have static shapes: a fixed number M = `max_boxes` of box rows per image,

    image  uint8 [B, S, S, C]      letterboxed (eval) or augmented (train) to S = image_size
    boxes  float32 [B, M, 4]       xyxy pixels in that S x S frame; padding rows are 0
    labels int32 [B, M]            padding rows are 0
    mask   bool [B, M]             True for real boxes

and eval batches also `valid [B]` (False for the padding images of the last batch), `index [B]`
(position in the source), `crowd [B, M]`, and `scale`, `pad`, `size` [B, 2] to map boxes back to the
original image (`augment.unletterbox`). `to_targets` gives the loss's [B, M, 5] rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxspec.data.constrain import label_map, subset_info
from jaxspec.data.pipeline import MODEL_CHANNELS, BatchIterator, _local_batch_size, iterate
from jaxspec.data.sources import DatasetInfo
from jaxspec.detection import augment, scenes
from jaxspec.detection.boxes import xyxy_to_xywh

COCO_CLASSES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)  # tfds `coco/2017` label order (= YOLOv5's 80-class order); tfds only learns names when it downloads
# The 12 official supercategories; in this order each is a contiguous range of labels.
COCO_SUPERCATEGORIES = {
    "person": (0, 0),
    "vehicle": (1, 8),
    "outdoor": (9, 13),
    "animal": (14, 23),
    "accessory": (24, 28),
    "sports": (29, 38),
    "kitchen": (39, 45),
    "food": (46, 55),
    "furniture": (56, 61),
    "electronic": (62, 67),
    "appliance": (68, 72),
    "indoor": (73, 79),
}
SOURCES = ("scenes", "coco/2017")


def default_config(**overrides) -> ml_collections.ConfigDict:
    """A detection `data` section with YOLOv5's hyp.scratch-low augmentation."""
    cfg = ml_collections.ConfigDict(
        {
            "name": "scenes",  # scenes | coco/2017
            "data_dir": "",  # tfds data_dir, or the embedded cache (scenes are cached beside it)
            "manifest": "",  # scenes only: the embedded raw-file manifest
            "scenes": dataclasses.asdict(scenes.SceneConfig()),
            "train_split": "train",
            "val_split": "validation",
            "test_split": "test",
            "image_size": 640,
            "max_boxes": 100,
            "mosaic": 1.0,  # probability of a 4-image mosaic
            "hsv_h": 0.015,
            "hsv_s": 0.7,
            "hsv_v": 0.4,
            "degrees": 0.0,
            "translate": 0.1,
            "scale": 0.5,
            "shear": 0.0,
            "fliplr": 0.5,
            "num_threads": 4,
            "prefetch": 64,
            "num_workers": 0,  # worker processes making batches (see `jaxspec.data.pipeline`); -1: one per core
        }
    )
    cfg.update(overrides)
    return cfg


def coco_info() -> DatasetInfo:
    groups = {g: tuple(range(lo, hi + 1)) for g, (lo, hi) in COCO_SUPERCATEGORIES.items()}
    return DatasetInfo(name="coco/2017", class_names=COCO_CLASSES, groups=groups, mean=(0.0,) * 3, std=(1.0,) * 3)


class CocoSource:
    """tfds `coco/2017` (ArrayRecord, random access); tfds boxes are normalized (ymin, xmin, ymax, xmax)."""

    def __init__(self, split: str, data_dir: str | None = None, name: str = "coco/2017"):
        import tensorflow_datasets as tfds  # heavy; only when COCO is used

        self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        self._label_source = tfds.data_source(
            name, split=split, data_dir=data_dir, download=False, decoders={"image": tfds.decode.SkipDecoding()}
        )
        self.info = coco_info()
        self._name, self._split = name, split

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        image, objects = np.asarray(record["image"]), record["objects"]
        h, w = image.shape[:2]
        ymin, xmin, ymax, xmax = np.asarray(objects["bbox"], np.float32).reshape(-1, 4).T
        boxes = np.stack([xmin * w, ymin * h, xmax * w, ymax * h], axis=1)
        return {
            "image": image,
            "boxes": boxes,
            "labels": np.asarray(objects["label"], np.int32),
            "crowd": np.asarray(objects["is_crowd"], bool),
        }

    @functools.cached_property
    def box_labels(self) -> list[np.ndarray]:
        return [np.asarray(r["objects"]["label"], np.int32) for r in self._label_source]

    def __repr__(self) -> str:
        return f"CocoSource({self._name}[{self._split}], n={len(self)})"


def get_source(cfg, split: str):
    """The detection source named by the `data` config section `cfg` (see `default_config`)."""
    if cfg.name == "scenes":
        scene_cfg = scenes.SceneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.scenes.items()})
        return scenes.load(split, scene_cfg, data_dir=cfg.data_dir or None, manifest=cfg.manifest or None)
    if cfg.name == "coco/2017":
        return CocoSource(split, cfg.data_dir or None)
    raise ValueError(f"Unknown detection dataset {cfg.name!r}; choose one of {list(SOURCES)}")


class ConstrainedDetectionSource:
    """Domain constraining for detection: only images with an object of S, only the boxes of S.

    `remap=True` relabels S to 0..|S|-1 in the order given (the head-sliced or extracted specialist);
    `remap=False` keeps the original class ids (output suppression keeps the full head).
    """

    def __init__(self, source, subset: Sequence[int], *, remap: bool = True):
        num_classes = source.info.num_classes
        bad = [c for c in subset if not 0 <= c < num_classes]
        if bad or not subset:
            raise ValueError(f"subset {list(subset)}: need classes in 0..{num_classes - 1}, bad ones {bad}")
        self._map = label_map(num_classes, subset)
        self._indices = np.flatnonzero([(self._map[labels] >= 0).any() for labels in source.box_labels])
        self._source, self.remap, self.subset = source, remap, tuple(int(c) for c in subset)
        self.info = subset_info(source.info, subset) if remap else source.info

    def __len__(self) -> int:
        return len(self._indices)

    def _select(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = self._map[labels] >= 0
        return keep, (self._map[labels[keep]] if self.remap else labels[keep])

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = dict(self._source[int(self._indices[index])])
        keep, record["labels"] = self._select(np.asarray(record["labels"]))
        record["boxes"] = record["boxes"][keep]
        if "crowd" in record:
            record["crowd"] = record["crowd"][keep]
        return record

    @property
    def box_labels(self) -> list[np.ndarray]:
        all_labels = self._source.box_labels
        return [self._select(np.asarray(all_labels[i]))[1] for i in self._indices]

    @property
    def source_indices(self) -> np.ndarray:
        return self._indices

    def __repr__(self) -> str:
        return f"ConstrainedDetectionSource({self._source!r}, |S|={len(self.subset)}, n={len(self)})"


def constrain_tf(dataset, subset: Sequence[int], num_classes: int, *, remap: bool = True):
    """The same constraining for a tf.data.Dataset of tfds `coco/2017`-style examples ('objects' dict)."""
    import tensorflow as tf

    table = tf.constant(label_map(num_classes, subset))

    def in_s(example):
        return tf.gather(table, tf.cast(example["objects"]["label"], tf.int32)) >= 0

    def select(example):
        keep = in_s(example)
        objects = {k: tf.boolean_mask(v, keep) for k, v in example["objects"].items()}
        if remap:
            objects["label"] = tf.cast(
                tf.gather(table, tf.cast(objects["label"], tf.int32)), example["objects"]["label"].dtype
            )
        return {**example, "objects": objects}

    return dataset.filter(lambda ex: tf.reduce_any(in_s(ex))).map(select)


def pack(
    image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, max_boxes: int, *, crowd=None, truncate: bool = False
) -> dict[str, np.ndarray]:
    """One example with exactly `max_boxes` box rows (see the module docstring)."""
    n = len(labels)
    if n > max_boxes and not truncate:
        raise ValueError(f"An image has {n} boxes, more than max_boxes={max_boxes}; raise data.max_boxes")
    n = min(n, max_boxes)
    out = {
        "image": image,
        "boxes": np.zeros((max_boxes, 4), np.float32),
        "labels": np.zeros(max_boxes, np.int32),
        "mask": np.arange(max_boxes) < n,
    }
    out["boxes"][:n], out["labels"][:n] = boxes[:n], labels[:n]
    if crowd is not None:
        out["crowd"] = np.zeros(max_boxes, bool)
        out["crowd"][:n] = crowd[:n]
    return out


def to_targets(boxes: jax.Array, labels: jax.Array, mask: jax.Array, image_size: int) -> jax.Array:
    """Batch boxes [B, M, 4] xyxy pixels -> loss targets [B, M, 5] = (class, cx, cy, w, h) / image_size.

    `jaxspec.detection.loss` reads these rows with `mask`; padding rows come out as zeros. jnp, for
    use inside the jitted step.
    """
    xywh = xyxy_to_xywh(jnp.asarray(boxes, jnp.float32)) / image_size
    return jnp.concatenate([jnp.asarray(labels, jnp.float32)[..., None], xywh], axis=-1) * mask[..., None]


def _drop_crowd(record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keep = ~record["crowd"] if "crowd" in record else np.ones(len(record["labels"]), bool)
    return record["image"], np.asarray(record["boxes"], np.float32)[keep], np.asarray(record["labels"])[keep]


def train_example(record: dict[str, Any], rng: np.random.Generator, cfg, others=None) -> dict[str, np.ndarray]:
    """YOLOv5's training transform of one record (crowd boxes dropped).

    With `others` (3 more records) it is a mosaic, else a letterbox; then random affine, HSV and a
    horizontal flip with probability cfg.fliplr. Boxes beyond cfg.max_boxes are dropped.
    """
    size = cfg.image_size
    affine = {"degrees": cfg.degrees, "translate": cfg.translate, "scale": cfg.scale, "shear": cfg.shear}
    if others:
        parts = [_drop_crowd(r) for r in (record, *others)]
        image, boxes = augment.mosaic([p[0] for p in parts], [p[1] for p in parts], rng, size)
        labels = np.concatenate([p[2] for p in parts])
        image, boxes, kept = augment.random_affine(image, boxes, rng, border=(-size // 2, -size // 2), **affine)
    else:
        image, boxes, labels = _drop_crowd(record)
        image, boxes, _, _ = augment.letterbox(image, boxes, size)
        image, boxes, kept = augment.random_affine(image, boxes, rng, **affine)
    labels = labels[kept]
    image = augment.augment_hsv(image, rng, hgain=cfg.hsv_h, sgain=cfg.hsv_s, vgain=cfg.hsv_v)
    if rng.uniform() < cfg.fliplr:
        image, boxes = augment.horizontal_flip(image, boxes)
    return pack(image, boxes, labels, cfg.max_boxes, truncate=True)


def train_iterator(source, cfg, *, batch_size: int, seed: int) -> grain.DatasetIterator:
    """An endless, per-epoch reshuffled iterator of augmented batches; each process reads its own shard."""
    if len(source) < batch_size:
        raise ValueError(f"Only {len(source)} training images for batch size {batch_size}")
    local = grain.MapDataset.source(source)[jax.process_index() :: jax.process_count()]

    def transform(record, rng):
        others = None
        if rng.uniform() < cfg.mosaic:
            others = [local[int(i)] for i in rng.integers(0, len(local), 3)]
        return train_example(record, rng, cfg, others)

    ds = local.shuffle(seed=seed).repeat().random_map(transform, seed=seed)
    return BatchIterator(ds.batch(_local_batch_size(batch_size), drop_remainder=True), cfg)


class _PadToMultiple:
    """`source` padded by repeating its last image up to a multiple of `k`; `valid` marks the real ones."""

    def __init__(self, source, k: int):
        self._source, self._n = source, len(source)
        self._len = max(1, math.ceil(self._n / k)) * k

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self._source[min(index, self._n - 1)], "valid": index < self._n, "index": index}


def preprocess_record(cfg, info: DatasetInfo) -> dict:
    """How evaluation fed a detector, for its model.json: letterbox to image_size (long side scaled to it,
    bilinear, then centred on `fill` gray; `augment.unletterbox` maps boxes back), then `normalize`."""
    return {
        "transform": "letterbox",
        "image_size": int(cfg.image_size),
        "fill": augment.FILL,
        "channels": len(info.mean),
        "model_channels": MODEL_CHANNELS,
        "mean": list(info.mean),
        "std": list(info.std),
    }


def eval_example(record: dict[str, Any], cfg) -> dict[str, np.ndarray]:
    """Letterbox only; every box is kept (crowd ones flagged), more than cfg.max_boxes is an error."""
    size = record["image"].shape[:2]
    image, boxes, scale, pad = augment.letterbox(record["image"], record["boxes"], cfg.image_size)
    crowd = record.get("crowd", np.zeros(len(record["labels"]), bool))
    out = pack(image, boxes, np.asarray(record["labels"]), cfg.max_boxes, crowd=crowd)
    out.update(
        valid=record["valid"],
        index=np.int32(record["index"]),
        size=np.array(size, np.int32),
        scale=np.array(scale, np.float32),
        pad=np.array(pad, np.float32),
    )
    return out


def eval_iterator(source, cfg, *, batch_size: int):
    """One pass over every image in order, padded to full batches (see `valid`)."""
    ds = grain.MapDataset.source(_PadToMultiple(source, batch_size))
    ds = ds[jax.process_index() :: jax.process_count()]
    ds = ds.map(functools.partial(eval_example, cfg=cfg)).batch(_local_batch_size(batch_size))
    return iterate(ds, cfg)
