"""Detection augmentation that moves the boxes with the pixels (YOLOv5's `utils/augmentations.py`).

Every function takes a uint8 HWC image (1 or 3 channels) and float boxes [n, 4] xyxy in pixel
coordinates, where pixel (r, c) covers [c, c+1) x [r, r+1), and returns new arrays; inputs are
never modified. Randomness comes from the `np.random.Generator` passed in. Resampling goes through
Pillow, whose affine transform uses the same continuous pixel frame as the boxes, so a box and the
pixels it covers are mapped by the very same matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from jaxspec.data import augment as image_augment

FILL = 114  # YOLOv5's padding gray


def _checked(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    image_augment._check_image(image, pil=True)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4) if np.size(boxes) else np.zeros((0, 4), np.float32)
    return boxes


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image.copy()
    pil = image_augment._to_pil(image).resize((width, height), Image.Resampling.BILINEAR)
    return image_augment._from_pil(pil)


def resize_long_side(image: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Scales so the longer side is `size` (YOLOv5's load_image), keeping the aspect ratio."""
    boxes = _checked(image, boxes)
    h, w = image.shape[:2]
    r = size / max(h, w)
    nh, nw = max(1, round(h * r)), max(1, round(w * r))
    return _resize(image, nw, nh), boxes * np.array([nw / w, nh / h] * 2, np.float32)


def letterbox(
    image: np.ndarray, boxes: np.ndarray, size: int, *, fill: int = FILL
) -> tuple[np.ndarray, np.ndarray, tuple[float, float], tuple[int, int]]:
    """Resize keeping the aspect ratio (long side = size), then pad to size x size, centred.

    Returns (image, boxes, (scale_x, scale_y), (pad_x, pad_y)): a letterboxed point is
    original * scale + pad (the two scales differ only by the rounding of the resized size), which
    `unletterbox` undoes for predictions.
    """
    h, w = image.shape[:2]
    image, boxes = resize_long_side(image, boxes, size)
    nh, nw = image.shape[:2]
    top, left = (size - nh) // 2, (size - nw) // 2
    out = np.full((size, size, image.shape[2]), fill, np.uint8)
    out[top : top + nh, left : left + nw] = image
    return out, boxes + np.array([left, top, left, top], np.float32), (nw / w, nh / h), (left, top)


def unletterbox(boxes, scale, pad, size) -> np.ndarray:
    """Letterboxed xyxy boxes [n, 4] back to the original (height, width) = size image, clipped to it
    (YOLOv5's scale_boxes); `scale` and `pad` as `letterbox` returned them."""
    boxes = (np.asarray(boxes, np.float32) - np.tile(np.asarray(pad, np.float32), 2)) / np.tile(
        np.asarray(scale, np.float32), 2
    )
    h, w = size
    return np.clip(boxes, 0, np.array([w, h, w, h], np.float32))


def horizontal_flip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right: x -> W - x, so x1, x2 swap roles."""
    boxes = _checked(image, boxes)
    w = image.shape[1]
    return np.ascontiguousarray(image[:, ::-1]), np.stack(
        [w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1
    )


def augment_hsv(
    image: np.ndarray, rng: np.random.Generator, *, hgain: float = 0.015, sgain: float = 0.7, vgain: float = 0.4
) -> np.ndarray:
    """YOLOv5's HSV jitter: hue, saturation and value scaled by random gains in [1 - g, 1 + g].

    Hue turns around the colour circle (Pillow's 0-255 hue is the whole circle, as cv2's 0-180 is);
    grayscale images only get the value gain.
    """
    image_augment._check_image(image, pil=True)
    gains = rng.uniform(-1, 1, 3) * np.array([hgain, sgain, vgain]) + 1
    x = np.arange(256, dtype=np.float32)
    lut_v = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    if image.shape[2] == 1:
        return lut_v[image]
    hsv = np.array(Image.fromarray(image).convert("HSV"))
    hsv[..., 0] = ((x * gains[0]) % 256).astype(np.uint8)[hsv[..., 0]]
    hsv[..., 1] = np.clip(x * gains[1], 0, 255).astype(np.uint8)[hsv[..., 1]]
    hsv[..., 2] = lut_v[hsv[..., 2]]
    return np.array(Image.fromarray(hsv, "HSV").convert("RGB"))


def box_candidates(
    before: np.ndarray,
    after: np.ndarray,
    *,
    wh_thr: float = 2,
    ar_thr: float = 100,
    area_thr: float = 0.1,
    eps: float = 1e-16,
) -> np.ndarray:
    """Which transformed boxes to keep: wider and taller than wh_thr px, aspect ratio below ar_thr, and
    at least area_thr of their area before (YOLOv5's box_candidates)."""
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def random_affine(
    image: np.ndarray,
    boxes: np.ndarray,
    rng: np.random.Generator,
    *,
    degrees: float = 0.0,
    translate: float = 0.1,
    scale: float = 0.5,
    shear: float = 0.0,
    border: tuple[int, int] = (0, 0),
    fill: int = FILL,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """YOLOv5's random_perspective without the perspective term.

    About the image centre: rotate by U(-degrees, degrees) and scale by U(1 - scale, 1 + scale), shear
    both axes by U(-shear, shear) degrees, then move the centre to U(0.5 -+ translate) of the output,
    which is the input grown by `border` (negative for mosaic: a 2s canvas cropped to s). Each box
    becomes the bounding box of its four transformed corners, clipped to the output; boxes that
    `box_candidates` rejects are dropped. Returns (image, boxes, kept): `kept` indexes the input boxes.
    """
    boxes = _checked(image, boxes)
    h, w = image.shape[0] + 2 * border[0], image.shape[1] + 2 * border[1]
    centre = np.array([[1, 0, -image.shape[1] / 2], [0, 1, -image.shape[0] / 2], [0, 0, 1]])
    a, s = math.radians(rng.uniform(-degrees, degrees)), rng.uniform(1 - scale, 1 + scale)
    rotate = np.array([[s * math.cos(a), s * math.sin(a), 0], [-s * math.sin(a), s * math.cos(a), 0], [0, 0, 1]])
    shear_m = np.eye(3)
    shear_m[0, 1] = math.tan(math.radians(rng.uniform(-shear, shear)))
    shear_m[1, 0] = math.tan(math.radians(rng.uniform(-shear, shear)))
    move = np.eye(3)
    move[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * w
    move[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * h
    m = move @ shear_m @ rotate @ centre
    inverse = np.linalg.inv(m)[:2].ravel()  # Pillow maps each output point back to its source
    fillcolor = fill if image.shape[2] == 1 else (fill,) * 3
    pil = image_augment._to_pil(image).transform(
        (w, h), Image.Transform.AFFINE, tuple(inverse), Image.Resampling.BILINEAR, fillcolor=fillcolor
    )
    out = image_augment._from_pil(pil)
    corners = boxes[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 4, 2)
    moved = corners @ m[:2, :2].T + m[:2, 2]
    new = np.concatenate([moved.min(axis=1), moved.max(axis=1)], axis=1)
    new = np.clip(new, 0, np.array([w, h, w, h])).astype(np.float32)
    kept = np.flatnonzero(box_candidates(boxes * s, new))
    return out, new[kept], kept


def mosaic(
    images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], rng: np.random.Generator, size: int, *, fill: int = FILL
) -> tuple[np.ndarray, np.ndarray]:
    """YOLOv5's 4-image mosaic on a 2size x 2size canvas, before its random_affine with border -size/2.

    Each image is scaled to long side `size` and placed in one quadrant around a random centre in
    [size/2, 3size/2]^2; what falls outside the canvas is cut, and boxes are shifted and clipped the same
    way. Returns the canvas and all boxes concatenated in image order (degenerate ones included, so the
    caller can keep their labels aligned; random_affine's filter drops them).
    """
    if len(images) != 4 or len(boxes) != 4:
        raise ValueError(f"mosaic needs 4 images and 4 box arrays, got {len(images)} and {len(boxes)}")
    channels = images[0].shape[2]
    canvas = np.full((2 * size, 2 * size, channels), fill, np.uint8)
    yc, xc = (int(rng.uniform(size / 2, 1.5 * size)) for _ in range(2))
    out = []
    for k, (image, b) in enumerate(zip(images, boxes)):
        if image.shape[2] != channels:
            raise ValueError(f"mosaic image {k} has {image.shape[2]} channels, image 0 has {channels}")
        image, b = resize_long_side(image, b, size)
        h, w = image.shape[:2]
        # Canvas corner of the image's top-left pixel; quadrants 0-3: top-left, top-right, bottom-left, bottom-right.
        x0 = xc - w if k in (0, 2) else xc
        y0 = yc - h if k in (0, 1) else yc
        cx1, cy1, cx2, cy2 = max(x0, 0), max(y0, 0), min(x0 + w, 2 * size), min(y0 + h, 2 * size)
        canvas[cy1:cy2, cx1:cx2] = image[cy1 - y0 : cy2 - y0, cx1 - x0 : cx2 - x0]
        out.append(np.clip(b + np.array([x0, y0, x0, y0], np.float32), 0, 2 * size))
    return canvas, np.concatenate(out).astype(np.float32)
