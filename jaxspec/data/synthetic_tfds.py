"""Small real tfds datasets: `imagenet2012` and `coco/2017` written as ArrayRecord with JPEG images.

`tfds.testing.mock_data` hands out decoded arrays, so it skips the JPEG decoding a real run spends
its host time on. These builders subclass tfds' own `imagenet2012` and `coco/2017` builders and
replace only where the examples come from: features, version and file layout are the real ones, so
`tfds.data_source(name, data_dir=...)` and `tfds.builder(name, data_dir=...).info` read them
exactly as they read the prepared datasets. The tests run the ImageNet and COCO configs on them and
`python -m jaxspec.bench --only=pipeline` times the JPEG input pipeline on them.

Pixels are 1/f noise, the power spectrum of natural photographs (Field 1987), so each image
costs what a photograph costs to decode: at 500x375 and quality 90 about 100 KB (ImageNet's
training JPEGs average ~110 KB) and 1.1-1.4 ms with Pillow on one core of this project's machines.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from PIL import Image

IMAGENET = "imagenet2012"
COCO = "coco/2017"


def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uint8 RGB image of 1/f noise with correlated channels (random colour mixing)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(height, width)) ** 1.1
    phases = np.exp(2j * np.pi * rng.random((3, *amplitude.shape)))
    channels = np.fft.irfft2(amplitude * phases, s=(height, width))
    x = np.moveaxis(channels, 0, -1) @ (np.eye(3) + 0.3 * rng.normal(size=(3, 3)))
    return np.clip(128 + 50 * (x - x.mean()) / x.std(), 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray, quality: int) -> io.BytesIO:
    out = io.BytesIO()
    Image.fromarray(image).save(out, "JPEG", quality=quality)
    out.seek(0)
    return out  # tfds stores a file object's bytes as they are: no second encoding


def _shape(rng: np.random.Generator, long_side: tuple[int, int], aspect: tuple[float, float]) -> tuple[int, int]:
    """(height, width): the long side uniform in `long_side`, short/long in `aspect`, either orientation."""
    long = int(rng.integers(long_side[0], long_side[1] + 1))
    short = max(1, round(long * rng.uniform(*aspect)))
    return (long, short) if rng.random() < 0.5 else (short, long)


def build_imagenet(
    data_dir: str,
    splits: Mapping[str, int],
    *,
    classes=tuple(range(0, 1000, 50)),
    long_side=(300, 500),
    aspect=(0.6, 1.0),
    quality: int = 90,
    seed: int = 0,
) -> None:
    """Writes `imagenet2012` with `splits[name]` images per split, labels cycling through `classes`.

    The default classes (0, 50, ..., 950) put 8 of 20 among WordNet's 398 animal classes (0-397).
    """
    from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as real

    class Builder(real.Builder, skip_registration=True):
        name = IMAGENET
        url_infos = None  # nothing to download (tfds would look for checksums beside this module)

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(split, n) for split, n in splits.items()}

        def _generate_examples(self, split, n):
            rng = np.random.default_rng([seed, *split.encode()])
            for i in range(n):
                image = natural_image(rng, *_shape(rng, long_side, aspect))
                name = f"{split}_{i:06d}.JPEG"
                yield name, {"image": _jpeg(image, quality), "label": int(classes[i % len(classes)]), "file_name": name}

    _prepare(Builder(data_dir=data_dir))


def build_coco(
    data_dir: str,
    splits: Mapping[str, int],
    *,
    classes=tuple(range(80)),
    max_objects: int = 6,
    long_side=(480, 640),
    aspect=(0.6, 1.0),
    quality: int = 90,
    seed: int = 0,
) -> None:
    """Writes `coco/2017` with `splits[name]` images per split, each with 1-`max_objects` boxes.

    Objects are flat-coloured rectangles over the 1/f background, labels drawn from `classes`,
    every fifth object a crowd; boxes are stored as tfds stores COCO's (normalized ymin, xmin, ymax, xmax).
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.object_detection import coco as real

    from jaxspec.detection.data import COCO_CLASSES

    class Builder(real.Coco, skip_registration=True):
        name = "coco"
        url_infos = None

        def _split_generators(self, dl_manager):
            del dl_manager
            self.info.features["objects"]["label"].names = list(COCO_CLASSES)
            return {split: self._generate_examples(split, n) for split, n in splits.items()}

        def _generate_examples(self, split, n):
            rng = np.random.default_rng([seed, *split.encode()])
            for i in range(n):
                h, w = _shape(rng, long_side, aspect)
                image = natural_image(rng, h, w)
                objects = []
                for k in range(int(rng.integers(1, max_objects + 1))):
                    bh, bw = (int(rng.integers(s // 10, s // 2)) for s in (h, w))
                    y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
                    image[y : y + bh, x : x + bw] = rng.integers(0, 256, 3)
                    objects.append(
                        {
                            "id": 100 * i + k,
                            "area": bh * bw,
                            "is_crowd": k % 5 == 4,
                            "label": int(classes[rng.integers(len(classes))]),
                            "bbox": tfds.features.BBox(ymin=y / h, xmin=x / w, ymax=(y + bh) / h, xmax=(x + bw) / w),
                        }
                    )
                name = f"{split}_{i:012d}.jpg"
                yield name, {"image": _jpeg(image, quality), "image/filename": name, "image/id": i, "objects": objects}

    _prepare(Builder(data_dir=data_dir, config="2017"))


def _prepare(builder) -> None:
    import tensorflow_datasets as tfds

    builder.download_and_prepare(
        file_format="array_record", download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
