"""The tf.data reference for the JPEG input-pipeline benchmark: jaxspec's ImageNet recipe in TF ops.

The big_vision way: `decode_and_crop_jpeg` of an Inception crop sampled from the JPEG header's
shape, antialiased bilinear resize, random flip, then RandAugment (torchvision's 14 ops and
magnitudes, as `jaxspec.data.augment.rand_augment`) and random erasing (as
`augment.random_erasing`: uniform uint8 noise), mapped with `num_parallel_calls` and batched.
"""

from __future__ import annotations

import math

import tensorflow as tf

from jaxspec.data import augment


def _blend(degenerate, image, factor):
    """PIL's ImageEnhance: degenerate + factor (image - degenerate), clipped to uint8."""
    out = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def _gray(image):
    return tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))


def _sharpen(image, m):
    """PIL's SMOOTH kernel (1 1 1 / 1 5 1 / 1 1 1, / 13) blended as `ImageEnhance.Sharpness`; the border is kept."""
    x = tf.cast(image, tf.float32)[None]
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.round(tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "SAME"))[0]
    h, w = image.shape[0], image.shape[1]
    border = tf.pad(tf.zeros([h - 2, w - 2, 3], tf.bool), [[1, 1], [1, 1], [0, 0]], constant_values=True)
    return _blend(tf.where(border, x[0], smooth), image, 1.0 + m)


def _equalize(image):
    """PIL's `ImageOps.equalize` per channel."""

    def channel(c):
        hist = tf.histogram_fixed_width(tf.cast(c, tf.int32), [0, 255], nbins=256)
        last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
        step = (tf.reduce_sum(hist) - last) // 255
        lut = tf.clip_by_value((tf.cumsum(hist) - hist + step // 2) // tf.maximum(step, 1), 0, 255)
        return tf.where(step > 0, tf.gather(lut, tf.cast(c, tf.int32)), tf.cast(c, tf.int32))

    return tf.cast(tf.stack([channel(image[..., i]) for i in range(3)], -1), tf.uint8)


def _autocontrast(image):
    x = tf.cast(image, tf.float32)
    lo, hi = tf.reduce_min(x, [0, 1]), tf.reduce_max(x, [0, 1])
    scaled = (x - lo) * 255.0 / tf.maximum(hi - lo, 1.0)
    return tf.cast(tf.where(hi > lo, tf.round(scaled), x), tf.uint8)


def _warp(image, matrix):
    """Nearest-neighbour affine warp filled with black; `matrix` maps output (x, y) to input as PIL's.

    PIL maps pixel centres (x + 0.5, y + 0.5); TF maps (x, y) and rounds, hence the half-pixel shifts.
    """
    a, b, c, d, e, f = (tf.cast(v, tf.float32) for v in matrix)
    matrix = [a, b, c + (a + b - 1) / 2, d, e, f + (d + e - 1) / 2]
    transform = tf.concat([tf.stack(matrix), tf.zeros([2])], 0)[None]
    shape = tf.shape(image)[:2]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform,
        output_shape=shape,
        fill_value=0.0,
        interpolation="NEAREST",
        fill_mode="CONSTANT",
    )[0]


def _rotate(image, degrees):
    """Counter-clockwise about the centre, as PIL's `rotate`."""
    h, w = (tf.cast(s, tf.float32) for s in tf.unstack(tf.shape(image)[:2]))
    a = -degrees * math.pi / 180.0
    cos, sin = tf.cos(a), tf.sin(a)
    cx, cy = w / 2, h / 2
    return _warp(image, [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy])


def _posterize(image, bits):
    shift = tf.cast(8 - bits, tf.uint8)
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


# `augment._APPLY` in TF ops: (uint8 image, magnitude) -> uint8 image.
_APPLY = {
    "Identity": lambda im, m: im,
    "ShearX": lambda im, m: _warp(im, [1.0, m, 0.0, 0.0, 1.0, 0.0]),
    "ShearY": lambda im, m: _warp(im, [1.0, 0.0, 0.0, m, 1.0, 0.0]),
    "TranslateX": lambda im, m: _warp(im, [1.0, 0.0, -tf.round(m), 0.0, 1.0, 0.0]),
    "TranslateY": lambda im, m: _warp(im, [1.0, 0.0, 0.0, 0.0, 1.0, -tf.round(m)]),
    "Rotate": _rotate,
    "Brightness": lambda im, m: _blend(tf.zeros_like(im, tf.float32), im, 1.0 + m),
    "Color": lambda im, m: _blend(_gray(im), im, 1.0 + m),
    "Contrast": lambda im, m: _blend(tf.reduce_mean(_gray(im)), im, 1.0 + m),
    "Sharpness": _sharpen,
    "Posterize": _posterize,
    "Solarize": lambda im, m: tf.where(tf.cast(im, tf.float32) >= m, 255 - im, im),
    "AutoContrast": lambda im, m: _autocontrast(im),
    "Equalize": lambda im, m: _equalize(im),
}


def rand_augment(image, num_ops: int, magnitude: int, num_bins: int = 31):
    """`augment.rand_augment` in TF ops: `num_ops` ops drawn with replacement, signed ops negated half the time."""
    h, w = image.shape[0], image.shape[1]
    ops = augment.RAND_AUGMENT_OPS
    base = tf.constant([augment._magnitude(op, magnitude, num_bins, h, w) for op in ops], tf.float32)
    signed = tf.constant([op in augment._SIGNED for op in ops])
    for _ in range(num_ops):
        k = tf.random.uniform([], 0, len(ops), tf.int32)
        m = tf.where(signed[k] & (tf.random.uniform([]) < 0.5), -base[k], base[k])
        image = tf.switch_case(k, [lambda op=op, im=image, m=m: _APPLY[op](im, m) for op in ops])
        image.set_shape([h, w, 3])
    return image


def random_erasing(image, p: float, scale=(0.02, 0.33), ratio=(0.3, 3.3), attempts: int = 10):
    """`augment.random_erasing` in TF ops: the first of `attempts` rectangles that fits, filled with noise."""
    h, w = image.shape[0], image.shape[1]
    area = h * w * tf.random.uniform([attempts], *scale)
    aspect = tf.exp(tf.random.uniform([attempts], math.log(ratio[0]), math.log(ratio[1])))
    eh = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    ew = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    fits = (eh < h) & (ew < w)
    k = tf.argmax(tf.cast(fits, tf.int32))

    def erase():
        top = tf.random.uniform([], 0, h - eh[k] + 1, tf.int32)
        left = tf.random.uniform([], 0, w - ew[k] + 1, tf.int32)
        pad = [[top, h - top - eh[k]], [left, w - left - ew[k]], [0, 0]]
        noise = tf.cast(tf.random.uniform([eh[k], ew[k], 3], 0, 256, tf.int32), tf.uint8)
        inside = tf.pad(tf.ones([eh[k], ew[k], 3], tf.bool), pad)
        return tf.where(inside, tf.pad(noise, pad), image)

    return tf.cond((tf.random.uniform([]) < p) & tf.reduce_any(fits), erase, lambda: image)


def _resize(image, size: int):
    """Antialiased bilinear to size x size, as Pillow's BILINEAR."""
    image = tf.image.resize(image, [size, size], "bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def train_transform(size: int, num_ops: int, magnitude: int, erasing_prob: float):
    """JPEG bytes -> augmented uint8 [size, size, 3]: big_vision's Inception crop, then the recipe."""

    def fn(jpeg):
        begin, crop, _ = tf.image.sample_distorted_bounding_box(
            tf.io.extract_jpeg_shape(jpeg),
            tf.zeros([0, 0, 4]),
            area_range=(0.08, 1.0),
            aspect_ratio_range=(3 / 4, 4 / 3),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
        image = _resize(tf.io.decode_and_crop_jpeg(jpeg, window, channels=3), size)
        image = tf.image.random_flip_left_right(image)
        if num_ops:
            image = rand_augment(image, num_ops, magnitude)
        return random_erasing(image, erasing_prob) if erasing_prob else image

    return fn


def limit_threads(threads: int) -> None:
    """TF's op thread pools to `threads` threads; before TF runs anything (it cannot change them later)."""
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def pipeline(
    jpegs, *, batch: int, threads: int, size: int = 224, num_ops: int = 2, magnitude: int = 9, erasing_prob: float = 0.2
):
    """An endless iterator of augmented uint8 batches over `jpegs` (a list of JPEG bytes, held in memory):
    `threads` parallel map calls in a private pool of `threads` threads, each op on one thread."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    ds = (
        tf.data.Dataset.from_tensor_slices(jpegs)
        .repeat()
        .map(train_transform(size, num_ops, magnitude, erasing_prob), num_parallel_calls=threads, deterministic=False)
    )
    return iter(ds.batch(batch).prefetch(1).with_options(options).as_numpy_iterator())
