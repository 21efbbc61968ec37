"""Image augmentation for host-side (grain) input pipelines.

Every function takes one `uint8` HWC NumPy image and returns a new `uint8`
HWC image, except `pad_crop_flip_batch`, which does the same to an NHWC
batch; the input is never modified. All randomness comes from the
`np.random.Generator` passed in, so a pipeline seeded per example (or per
batch) is deterministic and its state can be checkpointed.

CIFAR-style augmentation (`pad_crop_flip_batch`) is one NumPy gather per
batch, with no Python work per image, because grain's and Python's per-image
costs exceed a 32px image's whole augmentation. Everything that resamples
pixels (resizing, RandAugment) goes through Pillow: it is well kept, fast, and
it is what torchvision's PIL path uses, so these transforms match torchvision's
semantics (Inception crop, RandAugment, random erasing) without re-deriving
interpolation or colour maths.

`inception_train` is the ImageNet training recipe in one pass: it takes a
decoded image or the JPEG/PNG file's bytes, keeps the image in Pillow from
decoding to the last RandAugment op, and makes the same random draws as the
functions above composed, so its output is theirs. It saves their NumPy <->
Pillow copies of the full-size image and the strided flip copy: 1.17-1.27x
their images/s on 500x375 JPEGs (two A/B runs on one core of a loaded machine).
"""

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# Inception crop and random erasing give up after this many rejected samples.
_MAX_ATTEMPTS = 10
# torchvision's defaults: RandomResizedCrop's area and aspect ranges,
# RandomErasing's, and RandAugment's number of magnitude bins.
_CROP_SCALE, _CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
_ERASE_SCALE, _ERASE_RATIO = (0.02, 0.33), (0.3, 3.3)
_BINS = 31


def _check_image(image: np.ndarray, *, uint8: bool = False, pil: bool = False) -> None:
    """Checks for HWC; uint8 if `uint8`; uint8 with 1 or 3 channels if `pil`."""
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        raise ValueError(f"Expected an HWC image array, got shape {np.shape(image)}.")
    if (uint8 or pil) and image.dtype != np.uint8:
        raise ValueError(f"Expected a uint8 image, got dtype {image.dtype}.")
    if pil and image.shape[-1] not in (1, 3):
        raise ValueError(f"Expected 1 or 3 channels, got image shape {image.shape}.")


def _check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}.")


def _check_range(name: str, value: Sequence[float], upper: float) -> None:
    """Checks that `value` is an ordered (low, high) in (0, upper]."""
    if len(value) != 2 or not 0.0 < value[0] <= value[1] <= upper:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= {upper}, got {value}.")


def _check_pad(pad: int) -> None:
    if not isinstance(pad, (int, np.integer)) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}.")


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}.")


def _to_pil(image: np.ndarray) -> Image.Image:
    # Pillow has no (H, W, 1) layout: grayscale is mode 'L' on an HW array.
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(image: Image.Image) -> np.ndarray:
    array = np.array(image)  # Not asarray: that one is read-only.
    return array[..., None] if array.ndim == 2 else array


def horizontal_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirrors left-right with probability `p`; returns a contiguous copy."""
    _check_image(image)
    _check_probability(p)
    if rng.random() < p:
        return np.ascontiguousarray(image[:, ::-1])
    return image.copy()


def pad_crop_flip(image: np.ndarray, rng: np.random.Generator, *, pad: int = 4, flip: bool = True) -> np.ndarray:
    """CIFAR augmentation: zero-pad by `pad`, crop back to HxW, flip (p=0.5).

    Zero padding (not reflect) follows He et al. 2016 and torchvision's
    `RandomCrop(padding=4)` default. One image is a batch of one: the
    training pipeline augments whole batches with `pad_crop_flip_batch`.
    """
    _check_image(image)
    return pad_crop_flip_batch(image[None], rng, pad=pad, flip=flip)[0]


def pad_crop_flip_batch(images: np.ndarray, rng: np.random.Generator, *, pad: int = 4, flip: bool = True) -> np.ndarray:
    """`pad_crop_flip` of every image of an NHWC batch, offsets drawn per image.

    The batch is zero-padded once and every image's window is picked from a
    strided view of all windows with one gather, then mirrored where drawn,
    so the cost does not grow with Python work per image. Works for any
    dtype, size and channel count.
    """
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise ValueError(f"Expected an NHWC batch array, got shape {np.shape(images)}.")
    _check_pad(pad)
    batch, height, width, channels = images.shape
    padded = np.zeros((batch, height + 2 * pad, width + 2 * pad, channels), images.dtype)
    padded[:, pad : pad + height, pad : pad + width] = images
    # Top-left corner of each crop window in padded coordinates, in [0, 2 pad].
    top, left = rng.integers(0, 2 * pad + 1, size=(2, batch))
    mirror = rng.random(batch) < 0.5 if flip else np.zeros(batch, bool)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (height, width), axis=(1, 2))  # B, 2p+1, 2p+1, C, H, W
    out = np.moveaxis(windows[np.arange(batch), top, left], 1, -1)
    return np.where(mirror[:, None, None, None], out[:, :, ::-1], out)


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    scale: tuple[float, float] = _CROP_SCALE,
    ratio: tuple[float, float] = _CROP_RATIO,
) -> np.ndarray:
    """Inception-style crop (Szegedy et al. 2015) resized to size x size.

    Follows torchvision's `RandomResizedCrop`: sample an area fraction in
    `scale` and a log-uniform aspect ratio (w/h) in `ratio`; after 10 samples
    that do not fit, fall back to the largest center crop whose aspect ratio
    is within `ratio`. Resizing is bilinear (Pillow, antialiased).
    """
    _check_image(image, pil=True)
    _check_size(size)
    _check_range("scale", scale, 1.0)
    _check_range("ratio", ratio, math.inf)
    return _from_pil(_resized_crop(_to_pil(image), rng, size, scale, ratio))


def _resized_crop(
    image: Image.Image,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    *,
    encoded: bool = False,
) -> Image.Image:
    """`random_resized_crop` on a Pillow image.

    `encoded`: `image` is a file opened but not yet decoded; it is decoded
    here, to RGB. A JPEG whose crop spans at least twice `size` on both
    sides is decoded at 1/2, 1/4 or 1/8 scale in the DCT (Pillow's `draft`:
    up to 64x fewer pixels decoded), the largest that keeps the crop at
    least `size` across; the box is drawn first, so the random stream is
    the same either way.
    """
    width, height = image.size
    # The 10 attempts are drawn at once: same distribution, fewer calls.
    areas = height * width * rng.uniform(scale[0], scale[1], _MAX_ATTEMPTS)
    aspects = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), _MAX_ATTEMPTS))
    widths = np.rint(np.sqrt(areas * aspects)).astype(int)
    heights = np.rint(np.sqrt(areas / aspects)).astype(int)
    fits = np.flatnonzero((widths > 0) & (widths <= width) & (heights > 0) & (heights <= height))
    if fits.size:
        h, w = heights[fits[0]], widths[fits[0]]
        top = rng.integers(0, height - h + 1)
        left = rng.integers(0, width - w + 1)
    else:
        h, w = height, width
        if width / height < ratio[0]:
            h = round(width / ratio[0])
        elif width / height > ratio[1]:
            w = round(height * ratio[1])
        top, left = (height - h) // 2, (width - w) // 2
    if encoded:
        if min(w, h) >= 2 * size:  # a no-op for formats without reduced decoding
            shrink = min(w, h) / size
            image.draft("RGB", (math.ceil(width / shrink), math.ceil(height / shrink)))
            sx, sy = width / image.size[0], height / image.size[1]
            left, top, w, h = left / sx, top / sy, w / sx, h / sy
        if image.mode != "RGB":
            image = image.convert("RGB")
    # Crop before resizing so the filter never reads pixels outside the crop.
    box = (round(left), round(top), round(left + w), round(top + h))
    return image.crop(box).resize((size, size), Image.Resampling.BILINEAR)


def resize_center_crop(image: np.ndarray, *, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """ImageNet eval transform: shorter side to size/crop_fraction, center crop.

    With the defaults at size 224 this is the classic resize-256/crop-224.
    The resize target is rounded (224 / 0.875 = 256) and the longer side is
    scaled to keep the aspect ratio, truncated as torchvision's `Resize` does.
    """
    _check_image(image, pil=True)
    _check_size(size)
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}.")
    height, width = image.shape[:2]
    short = round(size / crop_fraction)
    if height <= width:
        new_h, new_w = short, int(short * width / height)
    else:
        new_h, new_w = int(short * height / width), short
    resized = _to_pil(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    return _from_pil(resized)[top : top + size, left : left + size].copy()


def random_erasing(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    p: float = 0.25,
    scale: tuple[float, float] = _ERASE_SCALE,
    ratio: tuple[float, float] = _ERASE_RATIO,
    value: str | int | Sequence[int] = "random",
) -> np.ndarray:
    """Random erasing (Zhong et al. 2020) with torchvision's semantics.

    With probability `p`, fills one rectangle covering a `scale` fraction of
    the image with log-uniform aspect ratio (h/w) in `ratio`; gives up (no-op)
    after 10 samples that do not fit. torchvision runs this on normalized
    floats with N(0, 1) noise; on uint8 the analogue of 'random' is uniform
    uint8 noise per pixel and channel. An int or per-channel sequence fills
    with that constant; note `value=0` is black here, whereas torchvision's 0
    after normalization is the dataset mean.
    """
    _check_image(image, uint8=True)
    _check_probability(p)
    _check_range("scale", scale, 1.0)
    _check_range("ratio", ratio, math.inf)
    channels = image.shape[-1]
    if isinstance(value, str):
        if value != "random":
            raise ValueError(f"value must be 'random', an int or one int per channel, got {value!r}.")
    elif np.ndim(value) not in (0, 1) or np.size(value) not in (1, channels):
        raise ValueError(f"value must have 1 or {channels} entries, got {value!r}.")
    elif np.any((np.asarray(value) < 0) | (np.asarray(value) > 255)):
        raise ValueError(f"value must be in [0, 255], got {value!r}.")
    out = image.copy()
    _erase(out, rng, p, scale, ratio, value)
    return out


def _erase(
    image: np.ndarray,
    rng: np.random.Generator,
    p: float,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    value: str | int | Sequence[int],
) -> None:
    """`random_erasing` in place."""
    if rng.random() >= p:
        return
    height, width, channels = image.shape
    areas = height * width * rng.uniform(scale[0], scale[1], _MAX_ATTEMPTS)
    aspects = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), _MAX_ATTEMPTS))
    heights = np.rint(np.sqrt(areas * aspects)).astype(int)
    widths = np.rint(np.sqrt(areas / aspects)).astype(int)
    # Strict inequality as in torchvision: never erase a full row or column.
    fits = np.flatnonzero((heights < height) & (widths < width))
    if not fits.size:
        return
    h, w = heights[fits[0]], widths[fits[0]]
    top = rng.integers(0, height - h + 1)
    left = rng.integers(0, width - w + 1)
    if isinstance(value, str):
        image[top : top + h, left : left + w] = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    else:
        image[top : top + h, left : left + w] = np.asarray(value, dtype=image.dtype)


# RandAugment's ops and how bin `k` of `n` maps to a magnitude, as in
# torchvision's `RandAugment._augmentation_space`: most are linear from 0 at
# bin 0 to the listed strength at bin n-1. Translations are in fractions of
# the image width/height; Posterize (bits) and Solarize (threshold) are special.
_STRENGTH = {
    "Identity": 0.0,
    "ShearX": 0.3,
    "ShearY": 0.3,
    "TranslateX": 150 / 331,
    "TranslateY": 150 / 331,
    "Rotate": 30.0,
    "Brightness": 0.9,
    "Color": 0.9,
    "Contrast": 0.9,
    "Sharpness": 0.9,
    "Posterize": 4.0,
    "Solarize": 255.0,
    "AutoContrast": 0.0,
    "Equalize": 0.0,
}
# Ops whose magnitude is negated with probability 1/2.
_SIGNED = frozenset(
    {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}
)
RAND_AUGMENT_OPS = tuple(_STRENGTH)


def _magnitude(op: str, k: int, n: int, height: int, width: int) -> float:
    fraction = k / (n - 1)
    if op == "Posterize":  # Bits kept; the strength is the bits dropped.
        return 8 - round(_STRENGTH[op] * fraction)
    if op == "Solarize":  # Threshold: 255 at bin 0 (almost no-op) down to 0.
        return _STRENGTH[op] * (1 - fraction)
    if op == "TranslateX":
        return _STRENGTH[op] * fraction * width
    if op == "TranslateY":
        return _STRENGTH[op] * fraction * height
    return _STRENGTH[op] * fraction


def _affine(image: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
    # Pillow maps each output pixel (x, y) to the input pixel
    # (a x + b y + c, d x + e y + f); uncovered pixels are filled with 0.
    return image.transform(image.size, Image.Transform.AFFINE, coefficients, Image.Resampling.NEAREST)


# Each op takes (image, magnitude); signs follow torchvision: positive
# translations move content right/down, positive angles rotate
# counter-clockwise, shears are about the top-left corner.
_APPLY = {
    "Identity": lambda im, m: im,
    "ShearX": lambda im, m: _affine(im, (1, m, 0, 0, 1, 0)),
    "ShearY": lambda im, m: _affine(im, (1, 0, 0, m, 1, 0)),
    "TranslateX": lambda im, m: _affine(im, (1, 0, -int(m), 0, 1, 0)),
    "TranslateY": lambda im, m: _affine(im, (1, 0, 0, 0, 1, -int(m))),
    "Rotate": lambda im, m: im.rotate(m, Image.Resampling.NEAREST),
    "Brightness": lambda im, m: ImageEnhance.Brightness(im).enhance(1 + m),
    "Color": lambda im, m: ImageEnhance.Color(im).enhance(1 + m),
    "Contrast": lambda im, m: ImageEnhance.Contrast(im).enhance(1 + m),
    "Sharpness": lambda im, m: ImageEnhance.Sharpness(im).enhance(1 + m),
    "Posterize": lambda im, m: ImageOps.posterize(im, int(m)),
    "Solarize": lambda im, m: ImageOps.solarize(im, m),
    "AutoContrast": lambda im, m: ImageOps.autocontrast(im),
    "Equalize": lambda im, m: ImageOps.equalize(im),
}


def rand_augment(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    num_ops: int = 2,
    magnitude: int = 9,
    num_magnitude_bins: int = _BINS,
    ops: Sequence[str] = RAND_AUGMENT_OPS,
) -> np.ndarray:
    """RandAugment (Cubuk et al. 2020) with torchvision's `RandAugment` policy.

    Applies `num_ops` ops drawn uniformly with replacement from `ops` (all 14
    of `RAND_AUGMENT_OPS` by default), each at magnitude bin `magnitude` of
    `num_magnitude_bins`, negated with probability 1/2 for signed ops.
    Geometric ops use nearest sampling and fill with black, like torchvision's
    defaults. `ops` narrows the set, e.g. to drop colour ops for a domain where
    colour carries the label. Note that Solarize at bin 0 still inverts
    pixels equal to 255, as in torchvision.
    """
    _check_image(image, pil=True)
    _check_rand_augment(num_ops, magnitude, num_magnitude_bins, ops)
    return _from_pil(_rand_augment(_to_pil(image), rng, num_ops, magnitude, num_magnitude_bins, ops))


def _check_rand_augment(num_ops, magnitude, num_magnitude_bins, ops) -> None:
    if not isinstance(num_ops, (int, np.integer)) or num_ops < 0:
        raise ValueError(f"num_ops must be a non-negative int, got {num_ops!r}.")
    if not isinstance(num_magnitude_bins, (int, np.integer)) or (num_magnitude_bins < 2):
        raise ValueError(f"num_magnitude_bins must be an int >= 2, got {num_magnitude_bins!r}.")
    if not isinstance(magnitude, (int, np.integer)) or not 0 <= magnitude <= num_magnitude_bins - 1:
        raise ValueError(f"magnitude must be an int in [0, {num_magnitude_bins - 1}], got {magnitude}.")
    unknown = [op for op in ops if op not in _APPLY]
    if unknown or not ops:
        raise ValueError(f"ops must be a non-empty subset of {RAND_AUGMENT_OPS}, got {tuple(ops)}.")


def _rand_augment(
    image: Image.Image,
    rng: np.random.Generator,
    num_ops: int,
    magnitude: int,
    num_magnitude_bins: int,
    ops: Sequence[str],
) -> Image.Image:
    """`rand_augment` on a Pillow image."""
    width, height = image.size
    for _ in range(num_ops):
        op = ops[rng.integers(len(ops))]
        value = _magnitude(op, magnitude, num_magnitude_bins, height, width)
        if op in _SIGNED and rng.random() < 0.5:
            value = -value
        image = _APPLY[op](image, value)
    return image


def inception_train(
    image: np.ndarray | bytes,
    rng: np.random.Generator,
    *,
    size: int,
    flip: bool = True,
    randaugment_ops: int = 0,
    randaugment_magnitude: int = 9,
    erasing_prob: float = 0.0,
) -> np.ndarray:
    """The ImageNet training recipe: `random_resized_crop` to `size`, then
    `horizontal_flip` if `flip`, `rand_augment(num_ops=randaugment_ops,
    magnitude=randaugment_magnitude)` if `randaugment_ops`, and
    `random_erasing(p=erasing_prob)` if `erasing_prob`, each with its defaults.

    `image` is a uint8 HWC array (1 or 3 channels) or an image file's bytes,
    decoded here to RGB (as tfds decodes ImageNet's few grayscale and CMYK
    JPEGs), and a JPEG only at the scale its crop needs (`_resized_crop`).
    The random draws are the composed functions' draws, in their order, so
    the output equals theirs on the decoded image, except that a large crop
    of a JPEG is resized from the reduced decode.
    """
    _check_size(size)
    _check_rand_augment(randaugment_ops, randaugment_magnitude, _BINS, RAND_AUGMENT_OPS)
    _check_probability(erasing_prob)
    encoded = isinstance(image, bytes)
    if encoded:
        pil = Image.open(io.BytesIO(image))
    else:
        _check_image(image, pil=True)
        pil = _to_pil(image)
    pil = _resized_crop(pil, rng, size, _CROP_SCALE, _CROP_RATIO, encoded=encoded)
    if flip and rng.random() < 0.5:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if randaugment_ops:
        pil = _rand_augment(pil, rng, randaugment_ops, randaugment_magnitude, _BINS, RAND_AUGMENT_OPS)
    out = _from_pil(pil)
    if erasing_prob:
        _erase(out, rng, erasing_prob, _ERASE_SCALE, _ERASE_RATIO, "random")
    return out
