"""An offline detection dataset: scenes composed from the embedded 30-class images.

No real detection dataset ships in a package we can reach, so each scene is a grayscale canvas
(96-160 px a side by default) holding 1-8 embedded images (animals, clothing, digits) at random
scales, stretches and positions, over an optional textured background. An object is its image's
pixels above `threshold`; later objects occlude earlier ones, an object left with less than
`min_visible` of its pixels is dropped (and not drawn, so nothing unlabelled stays on the canvas), and
each box is the tight box of the object's *visible* pixels. Scene i of a split depends only on
(seed, split, i) and only on that split's embedded images, so train scenes never show a test image.

Each split is cached as `{split}.npz` (pixels and boxes) beside `{split}.json` in COCO format
(image ids = source indices, category_id = class + 1, supercategory = animals / clothing / digits,
area = visible pixel count), which pycocotools reads as ground truth. `python -m
jaxspec.detection.scenes --directory DIR` writes all splits.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from jaxspec import files
from jaxspec.data import embedded, embedded_files
from jaxspec.data.sources import DatasetInfo

RECIPE_VERSION = 1  # part of the cache key; bump when the composition changes
_TOP_GROUPS = ("animals", "clothing", "digits")


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """How scenes are composed. Ranges are inclusive (low, high)."""

    num_scenes: tuple[int, int, int] = (6000, 1000, 2000)  # train, validation, test
    canvas: tuple[int, int] = (96, 160)  # height and width, drawn independently
    objects: tuple[int, int] = (1, 8)
    scale: tuple[int, int] = (16, 64)  # side of the pasted 28x28 image, log-uniform
    stretch: float = 1.25  # width/height ratio drawn log-uniformly in [1/stretch, stretch]
    clutter: float = 0.5  # probability of a smooth-noise background instead of black
    overlap: bool = True  # False: objects are placed (up to 20 tries) where they overlap nothing
    min_visible: float = 0.5
    threshold: int = 32
    seed: int = 0

    def __post_init__(self):
        problems = []
        if len(self.num_scenes) != len(embedded.SPLITS) or min(self.num_scenes) < 1:
            problems.append(f"num_scenes={self.num_scenes} needs a positive count per split {embedded.SPLITS}")
        for name in ("canvas", "objects", "scale"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                problems.append(f"{name}={(lo, hi)} must satisfy 1 <= low <= high")
        if round(self.scale[1] * self.stretch**0.5) > self.canvas[0]:
            problems.append(f"scale={self.scale} with stretch={self.stretch} does not fit canvas={self.canvas}")
        if self.stretch < 1 or not 0 <= self.clutter <= 1 or not 0 < self.min_visible <= 1:
            problems.append(
                f"need stretch >= 1, clutter in [0, 1], min_visible in (0, 1]; got {self.stretch}, "
                f"{self.clutter}, {self.min_visible}"
            )
        if not 0 <= self.threshold < 255:
            problems.append(f"threshold={self.threshold} must lie in [0, 255)")
        if problems:
            raise ValueError("Bad SceneConfig: " + "; ".join(problems))


class Scene(NamedTuple):
    image: np.ndarray  # uint8 [H, W, 1]
    boxes: np.ndarray  # float32 [n, 4] xyxy pixels: a pixel (r, c) covers [c, c+1) x [r, r+1)
    labels: np.ndarray  # int32 [n]
    owner: np.ndarray  # int32 [H, W]: the object (row of boxes) visible at each pixel, -1 for background


def _background(rng: np.random.Generator, h: int, w: int, clutter: float) -> np.ndarray:
    if rng.uniform() >= clutter:
        return np.zeros((h, w), np.uint8)
    level = rng.uniform(20, 70)
    coarse = rng.uniform(0, level, (rng.integers(2, 9), rng.integers(2, 9))).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))
    speckle = rng.uniform(0, level / 3, (h, w))
    return np.clip(smooth + speckle, 0, 255).astype(np.uint8)


def _paint(shape, placed, values=None) -> np.ndarray:
    """Paints the objects' masks in order (later on top): their index, or their pixels with `values`."""
    out = np.full(shape, -1, np.int32) if values is None else values.copy()
    for j, (_, top, left, patch, mask) in enumerate(placed):
        region = out[top : top + mask.shape[0], left : left + mask.shape[1]]
        region[mask] = j if values is None else patch[mask]
    return out


def compose(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, cfg: SceneConfig) -> Scene:
    """One scene from a split's images [N, 28, 28] and labels [N]."""
    h, w = (int(v) for v in rng.integers(cfg.canvas[0], cfg.canvas[1] + 1, 2))
    placed, rects = [], []
    for index in rng.integers(0, len(images), rng.integers(cfg.objects[0], cfg.objects[1] + 1)):
        side = np.exp(rng.uniform(np.log(cfg.scale[0]), np.log(cfg.scale[1])))
        ratio = np.exp(rng.uniform(-np.log(cfg.stretch), np.log(cfg.stretch))) ** 0.5
        ph, pw = min(h, max(4, round(side / ratio))), min(w, max(4, round(side * ratio)))
        patch = np.asarray(Image.fromarray(images[index]).resize((pw, ph), Image.Resampling.BILINEAR))
        mask = patch > cfg.threshold
        for _ in range(1 if cfg.overlap else 20):
            top, left = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
            if cfg.overlap or all(top >= b or top + ph <= t or left >= r or left + pw <= lt for t, lt, b, r in rects):
                break
        else:
            continue
        if mask.any():
            placed.append((int(labels[index]), top, left, patch, mask))
            rects.append((top, left, top + ph, left + pw))
    visible = np.bincount(_paint((h, w), placed).ravel() + 1, minlength=len(placed) + 1)[1:]
    placed = [p for p, v in zip(placed, visible) if v >= cfg.min_visible * p[4].sum()]
    owner = _paint((h, w), placed)  # dropping objects only uncovers the others
    image = _paint((h, w), placed, values=_background(rng, h, w, cfg.clutter))
    boxes = np.zeros((len(placed), 4), np.float32)
    for j in range(len(placed)):
        rows, cols = np.nonzero(owner == j)
        boxes[j] = cols.min(), rows.min(), cols.max() + 1, rows.max() + 1
    return Scene(image[..., None], boxes, np.array([p[0] for p in placed], np.int32).reshape(-1), owner)


def scene_rng(cfg: SceneConfig, split: str, index: int) -> np.random.Generator:
    """Scene `index` of `split` depends on nothing else, so any scene can be regenerated alone."""
    return np.random.default_rng([cfg.seed, embedded.SPLITS.index(split), index])


def scenes_info() -> DatasetInfo:
    """The embedded classes and groups; mean 0 / std 1 because YOLOv5 feeds pixels / 255."""
    return DatasetInfo(
        name="embedded_scenes", class_names=embedded.CLASS_NAMES, groups=dict(embedded.GROUPS), mean=(0.0,), std=(1.0,)
    )


def coco_json(scenes: list[Scene]) -> dict[str, Any]:
    """COCO ground truth of a list of scenes; image id = position, category_id = label + 1."""
    supercategory = {c: g for g in _TOP_GROUPS for c in embedded.GROUPS[g]}
    images, annotations = [], []
    for i, s in enumerate(scenes):
        images.append({"id": i, "file_name": f"{i:06d}.png", "height": s.image.shape[0], "width": s.image.shape[1]})
        area = np.bincount(s.owner.ravel() + 1, minlength=len(s.labels) + 1)[1:]
        for box, label, a in zip(s.boxes.tolist(), s.labels.tolist(), area.tolist()):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": label + 1,
                    "iscrowd": 0,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "area": a,
                }
            )
    categories = [
        {"id": c + 1, "name": n, "supercategory": supercategory[c]} for c, n in enumerate(embedded.CLASS_NAMES)
    ]
    return {
        "info": {"description": "jaxspec embedded detection scenes"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def cache_key(cfg: SceneConfig, manifest: str | None) -> str:
    entries = embedded_files.read_manifest(manifest) if manifest else {}
    blob = json.dumps(
        {"recipe": RECIPE_VERSION, "config": dataclasses.asdict(cfg), "embedded": embedded.cache_key(entries)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_split(
    directory: str, split: str, cfg: SceneConfig, *, data_dir: str | None = None, manifest: str | None = None
) -> str:
    """Generates one split into `directory/{split}.npz` + `{split}.json`; returns the npz path."""
    from jaxspec.train.loop import Progress  # loads jax; only needed while generating

    images, labels = embedded.load(split, data_dir=data_dir, manifest=manifest)
    n = cfg.num_scenes[embedded.SPLITS.index(split)]
    progress = Progress(f"scenes {split}", n, 0, 1)
    scenes = []
    for i in range(n):
        scenes.append(compose(images, labels, scene_rng(cfg, split, i), cfg))
        if (i + 1) % 1000 == 0 or i + 1 == n:
            progress.update(i + 1, time.perf_counter(), {})
    progress.close()
    counts = [len(s.labels) for s in scenes]
    arrays = {
        "pixels": np.concatenate([s.image.ravel() for s in scenes]),
        "shapes": np.array([s.image.shape for s in scenes], np.int32),
        "boxes": np.concatenate([s.boxes for s in scenes]),
        "labels": np.concatenate([s.labels for s in scenes]),
        "box_offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
    }
    os.makedirs(directory, exist_ok=True)
    json_path = os.path.join(directory, f"{split}.json")
    files.write_json(json_path, coco_json(scenes))
    npz_path = os.path.join(directory, f"{split}.npz")
    embedded._save_atomically(npz_path, arrays)  # written last: its presence marks a complete split
    return npz_path


class SceneSource:
    """Random access to a written split: `source[i] -> {'image', 'boxes', 'labels'}`."""

    def __init__(self, npz_path: str):
        with np.load(npz_path) as z:
            self._pixels, self._shapes = z["pixels"], z["shapes"]
            self._boxes, self._labels, self._box_offsets = z["boxes"], z["labels"], z["box_offsets"]
        self._offsets = np.concatenate([[0], np.cumsum(np.prod(self._shapes, axis=1))])
        self.info = scenes_info()
        self.coco_json_path = npz_path[: -len(".npz")] + ".json"

    def __len__(self) -> int:
        return len(self._shapes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"scene {index} out of range for {len(self)} scenes")
        index %= len(self)
        b0, b1 = self._box_offsets[index], self._box_offsets[index + 1]
        image = self._pixels[self._offsets[index] : self._offsets[index + 1]].reshape(self._shapes[index])
        return {"image": image, "boxes": self._boxes[b0:b1], "labels": self._labels[b0:b1]}

    @property
    def box_labels(self) -> list[np.ndarray]:
        """Every image's box labels, without touching pixels (domain constraining needs them up front)."""
        return np.split(self._labels, self._box_offsets[1:-1])

    def __repr__(self) -> str:
        return f"SceneSource(n={len(self)}, boxes={len(self._labels)})"


def load(
    split: str,
    cfg: SceneConfig = SceneConfig(),
    *,
    directory: str | None = None,
    data_dir: str | None = None,
    manifest: str | None = None,
) -> SceneSource:
    """The scenes of `split`, generated on first use into `directory` (default: a per-recipe folder in
    the embedded cache, `data_dir` or $JAXSPEC_DATA_DIR or ~/.cache/jaxspec/embedded)."""
    if split not in embedded.SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {embedded.SPLITS}")
    directory = directory or os.path.join(
        data_dir or embedded_files.default_data_dir(), f"scenes-{cache_key(cfg, manifest)}"
    )
    path = os.path.join(directory, f"{split}.npz")
    if not os.path.exists(path):
        write_split(directory, split, cfg, data_dir=data_dir, manifest=manifest)
    return SceneSource(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directory", required=True, help="where {split}.npz and {split}.json go")
    parser.add_argument("--data_dir", default=None, help="embedded dataset cache")
    parser.add_argument("--manifest", default=None, help="embedded raw-file manifest (see jaxspec.data.embedded)")
    parser.add_argument("--num_scenes", default="6000,1000,2000", help="train,validation,test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_overlap", action="store_true")
    args = parser.parse_args(argv)
    cfg = SceneConfig(
        num_scenes=tuple(int(n) for n in args.num_scenes.split(",")), seed=args.seed, overlap=not args.no_overlap
    )
    for split in embedded.SPLITS:
        print(write_split(args.directory, split, cfg, data_dir=args.data_dir, manifest=args.manifest))


if __name__ == "__main__":
    main()
