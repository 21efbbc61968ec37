"""Tests for jaxspec.data.augment against NumPy closed forms."""

import io
import math
import re

import numpy as np
import pytest
from PIL import Image

from jaxspec.data import augment


def _image(height=32, width=32, channels=3, seed=0, low=0, high=256):
    rng = np.random.default_rng(seed)
    return rng.integers(low, high, (height, width, channels), dtype=np.uint8)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _one_op(image, op, magnitude, seed=0):
    return augment.rand_augment(image, _rng(seed), num_ops=1, magnitude=magnitude, ops=(op,))


def _shift_x(image, pixels):
    """Content moved right by `pixels` (left if negative), zero fill."""
    out = np.zeros_like(image)
    if pixels >= 0:
        out[:, pixels:] = image[:, : image.shape[1] - pixels]
    else:
        out[:, :pixels] = image[:, -pixels:]
    return out


_RANDOM_TRANSFORMS = {
    "pad_crop_flip": lambda im, rng: augment.pad_crop_flip(im, rng),
    "horizontal_flip": lambda im, rng: augment.horizontal_flip(im, rng),
    "random_resized_crop": lambda im, rng: augment.random_resized_crop(im, rng, size=24),
    "rand_augment": lambda im, rng: augment.rand_augment(im, rng),
    "random_erasing": lambda im, rng: augment.random_erasing(im, rng, p=1.0),
}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("shape", [(32, 32), (37, 53), (53, 37)])
def test_shapes_and_dtypes(shape, channels):
    image = _image(*shape, channels)
    same = [
        augment.pad_crop_flip(image, _rng()),
        augment.horizontal_flip(image, _rng()),
        augment.rand_augment(image, _rng(), num_ops=3),
        augment.random_erasing(image, _rng(), p=1.0),
    ]
    square = [
        augment.random_resized_crop(image, _rng(), size=24),
        augment.resize_center_crop(image, size=24),
    ]
    for out in same:
        assert out.shape == image.shape and out.dtype == np.uint8
    for out in square:
        assert out.shape == (24, 24, channels) and out.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(_RANDOM_TRANSFORMS))
def test_deterministic_by_seed_and_input_untouched(name):
    transform = _RANDOM_TRANSFORMS[name]
    image = _image(40, 48)
    original = image.copy()
    outputs = [transform(image, _rng(seed)) for seed in range(8)]
    for seed, out in enumerate(outputs):
        np.testing.assert_array_equal(transform(image, _rng(seed)), out)
    distinct = {out.tobytes() for out in outputs}
    assert len(distinct) > 1
    np.testing.assert_array_equal(image, original)


def _find_crops(out, image, pad):
    """All (top, left, flipped) with out == flip(crop of zero-padded image)."""
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    height, width = image.shape[:2]
    found = []
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            crop = padded[top : top + height, left : left + width]
            for flipped in (False, True):
                if np.array_equal(out, crop[:, ::-1] if flipped else crop):
                    found.append((top, left, flipped))
    return found


@pytest.mark.parametrize("shape,pad", [((9, 11, 2), 3), ((32, 32, 3), 4), ((5, 4, 1), 7)])
def test_pad_crop_flip_is_a_crop_of_the_padded_image(shape, pad):
    image = _image(*shape, low=1)  # No zeros: padding is recognisable.
    seen = set()
    for seed in range(60):
        found = _find_crops(augment.pad_crop_flip(image, _rng(seed), pad=pad), image, pad)
        assert found, seed
        seen.update(found if len(found) == 1 else ())  # Unambiguous only.
    assert {flipped for _, _, flipped in seen} == {False, True}
    assert len({(top, left) for top, left, _ in seen}) > 10


def test_pad_crop_flip_without_pad_or_flip_is_identity():
    image = _image()
    out = augment.pad_crop_flip(image, _rng(), pad=0, flip=False)
    np.testing.assert_array_equal(out, image)
    assert out is not image


def _batch(size, height, width, channels, dtype=np.uint8, seed=0):
    """Random images with no zero pixel, so padding is recognisable."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, 200, (size, height, width, channels)).astype(dtype)


@pytest.mark.parametrize("shape,pad", [((9, 11, 2), 3), ((32, 32, 3), 4), ((5, 4, 1), 7)])
def test_pad_crop_flip_batch_crops_every_image_of_the_padded_batch(shape, pad):
    images = _batch(40, *shape)
    original = images.copy()
    seen = set()
    for seed in range(3):
        out = augment.pad_crop_flip_batch(images, _rng(seed), pad=pad)
        assert out.shape == images.shape and out.dtype == images.dtype
        for image, crop in zip(images, out):
            found = _find_crops(crop, image, pad)
            assert found, seed
            seen.update(found if len(found) == 1 else ())
    # Offsets and flips are drawn per image: both flip states, many windows.
    assert {flipped for _, _, flipped in seen} == {False, True}
    assert len({(top, left) for top, left, _ in seen}) > 10
    np.testing.assert_array_equal(images, original)


def test_pad_crop_flip_batch_matches_the_per_example_distribution():
    images = _batch(2000, 4, 4, 1)
    out = augment.pad_crop_flip_batch(images, _rng(), pad=1)
    # Padded by 1, a window's top is 0, 1 or 2 (a zero first row, no zero
    # row, a zero last row); column 1 is never padding, flipped or not.
    tops = np.where(out[:, 0, 1, 0] == 0, 0, np.where(out[:, -1, 1, 0] == 0, 2, 1))
    counts = np.bincount(tops, minlength=3)
    np.testing.assert_allclose(counts / len(images), 1 / 3, atol=0.05)
    mirrored = augment.pad_crop_flip_batch(images, _rng(), pad=0)
    flipped = (mirrored == images[:, :, ::-1]).all(axis=(1, 2, 3))
    assert ((mirrored == images).all(axis=(1, 2, 3)) | flipped).all()
    assert 0.45 < flipped.mean() < 0.55


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_pad_crop_flip_batch_without_pad_or_flip_is_identity(dtype, channels):
    images = _batch(6, 7, 5, channels, dtype)
    out = augment.pad_crop_flip_batch(images, _rng(), pad=0, flip=False)
    assert out.dtype == dtype and out is not images
    np.testing.assert_array_equal(out, images)


def test_pad_crop_flip_batch_is_deterministic_by_seed():
    images = _batch(16, 12, 12, 3)
    a, b, c = (augment.pad_crop_flip_batch(images, _rng(seed)) for seed in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_flips_mirror_left_right_about_half_the_time():
    image = _image(8, 9)
    np.testing.assert_array_equal(augment.horizontal_flip(image, _rng(), p=1.0), image[:, ::-1])
    np.testing.assert_array_equal(augment.horizontal_flip(image, _rng(), p=0.0), image)
    flips = [np.array_equal(augment.pad_crop_flip(image, _rng(s), pad=0), image[:, ::-1]) for s in range(400)]
    assert 0.4 < np.mean(flips) < 0.6


def test_random_resized_crop_without_resizing_is_a_crop():
    image = _image(64, 64)
    for seed in range(10):
        # Always a 32x32 crop: area 1/4, square.
        out = augment.random_resized_crop(image, _rng(seed), size=32, scale=(0.25, 0.25), ratio=(1, 1))
        matches = [
            (top, left)
            for top in range(33)
            for left in range(33)
            if np.array_equal(out, image[top : top + 32, left : left + 32])
        ]
        assert len(matches) == 1


def test_a_large_jpeg_crop_is_decoded_at_reduced_scale(monkeypatch):
    """A crop spanning >= 2 x size is cut from a 1/2..1/8-scale DCT decode: the
    same draws, nearly the same pixels, and only when the crop allows it."""
    y, x = np.mgrid[0:600, 0:800]
    smooth = (np.stack([np.sin(x / 37), np.cos(y / 23), np.sin((x + y) / 51)], -1) + 1) * 127
    jpeg = _jpeg(smooth.astype(np.uint8))
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    scales = []
    jpeg_file = type(Image.open(io.BytesIO(jpeg)))
    draft = jpeg_file.draft

    def spy(self, mode, size):
        out = draft(self, mode, size)
        scales.append(self.size)
        return out

    monkeypatch.setattr(jpeg_file, "draft", spy)
    for seed in range(6):
        rng, ref = _rng(seed), _rng(seed)
        got = augment.inception_train(jpeg, rng, size=64, flip=False)
        want = augment.random_resized_crop(decoded, ref, size=64)
        assert got.shape == want.shape and rng.random() == ref.random()
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 4
    assert scales and all(w < 800 and h < 600 for w, h in scales)  # some crops were decoded smaller
    scales.clear()
    augment.inception_train(jpeg, _rng(0), size=400, flip=False)  # no crop spans 800: decoded whole
    assert not scales


@pytest.mark.parametrize(
    "shape,window",
    [
        ((40, 60), np.s_[:, 10:50]),  # Too wide: center crop of full height.
        ((100, 40), np.s_[30:70, :]),  # Too tall: center crop of full width.
    ],
)
def test_random_resized_crop_falls_back_to_center_crop(shape, window):
    image = _image(*shape)
    # A full-area square never fits a non-square image: 10 failures.
    out = augment.random_resized_crop(image, _rng(), size=min(shape), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_array_equal(out, image[window])


def test_random_resized_crop_resizes_bilinearly():
    image = np.full((50, 70, 3), 90, np.uint8)
    out = augment.random_resized_crop(image, _rng(), size=17)
    np.testing.assert_array_equal(out, np.full((17, 17, 3), 90, np.uint8))


def _jpeg(image):
    out = io.BytesIO()
    Image.fromarray(image).save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"flip": False},
        {"randaugment_ops": 2, "erasing_prob": 0.5},
        {"randaugment_ops": 3, "randaugment_magnitude": 20, "erasing_prob": 1.0},
    ],
)
def test_inception_train_is_the_composed_transforms(kwargs, channels):
    """Same output and draws as the four functions composed, from an array
    or from its JPEG (decoded to RGB), also for a grayscale JPEG. At size 48
    no crop of a 90-pixel-high image spans 2 x 48, so the JPEG is decoded
    whole (the reduced decode has its own test)."""
    image = _image(90, 130, channels)
    jpeg = _jpeg(image[..., 0] if channels == 1 else image)
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    for seed in range(8):
        for source, want_input in ((image, image), (jpeg, decoded)):
            rng, ref = _rng(seed), _rng(seed)
            want = augment.random_resized_crop(want_input, ref, size=48)
            if kwargs.get("flip", True):
                want = augment.horizontal_flip(want, ref)
            if kwargs.get("randaugment_ops"):
                want = augment.rand_augment(
                    want, ref, num_ops=kwargs["randaugment_ops"], magnitude=kwargs.get("randaugment_magnitude", 9)
                )
            if kwargs.get("erasing_prob"):
                want = augment.random_erasing(want, ref, p=kwargs["erasing_prob"])
            got = augment.inception_train(source, rng, size=48, **kwargs)
            np.testing.assert_array_equal(got, want)
            assert rng.random() == ref.random()  # and the same draws


@pytest.mark.parametrize("shape,window", [((256, 340), np.s_[16:240, 58:282]), ((340, 256), np.s_[58:282, 16:240])])
def test_resize_center_crop_is_resize_256_crop_224(shape, window):
    # Shorter side already 224 / 0.875 = 256: only the center crop remains.
    image = _image(*shape)
    np.testing.assert_array_equal(augment.resize_center_crop(image, size=224), image[window])


def test_resize_center_crop_resizes_shorter_side():
    image = np.zeros((100, 150, 3), np.uint8)
    image[:, 75:] = 255  # Right half white: the crop straddles the edge.
    out = augment.resize_center_crop(image, size=28, crop_fraction=0.5)
    # Resized to 56x84, so the 28-wide center crop is half black, half white.
    assert (out[:, :13] == 0).all() and (out[:, 15:] == 255).all()


def _erased_box(out, image):
    """(top, left, height, width) of the bounding box of changed pixels."""
    rows, cols = np.nonzero((out != image).any(-1))
    if not rows.size:
        return None
    return (rows.min(), cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)


@pytest.mark.parametrize("scale", [(0.02, 0.33), (0.1, 0.1), (0.3, 0.5)])
def test_random_erasing_fills_one_rectangle_in_scale_range(scale):
    image = _image(64, 80, low=1)
    for seed in range(40):
        out = augment.random_erasing(image, _rng(seed), p=1.0, scale=scale, value=0)
        top, left, h, w = _erased_box(out, image)
        box = np.s_[top : top + h, left : left + w]
        assert (out[box] == 0).all()
        rest = out != image
        rest[box] = False
        assert not rest.any()
        # Rounding h and w to ints moves the area by at most (h + w) / 2.
        slack = (h + w) / 2 + 0.25
        area = 64 * 80
        assert scale[0] * area - slack <= h * w <= scale[1] * area + slack
        assert 0.3 - 0.1 <= h / w <= 3.3 + 0.6


def test_random_erasing_values():
    image = np.full((48, 48, 3), 77, np.uint8)
    out = augment.random_erasing(image, _rng(), p=1.0, value=(10, 20, 30))
    top, left, h, w = _erased_box(out, image)
    np.testing.assert_array_equal(out[top : top + h, left : left + w], np.broadcast_to([10, 20, 30], (h, w, 3)))
    out = augment.random_erasing(image, _rng(), p=1.0, value="random")
    top, left, h, w = _erased_box(out, image)
    noise = out[top : top + h, left : left + w]
    assert (noise != 77).mean() > 0.95 and noise.std() > 50


def test_random_erasing_probability_and_fallback():
    image = _image(low=1)
    erased = [not np.array_equal(augment.random_erasing(image, _rng(s), p=0.25, value=0), image) for s in range(400)]
    assert 0.18 < np.mean(erased) < 0.32
    # A full-image rectangle never fits (torchvision needs h < H, w < W).
    out = augment.random_erasing(image, _rng(), p=1.0, scale=(1.0, 1.0))
    np.testing.assert_array_equal(out, image)


_IDENTITY_AT_ZERO = tuple(op for op in augment.RAND_AUGMENT_OPS if op not in ("AutoContrast", "Equalize"))


@pytest.mark.parametrize("channels", [1, 3])
def test_rand_augment_at_magnitude_zero_is_identity(channels):
    # Zero shear/translation/rotation, enhance factor 1, 8 posterize bits and
    # a Solarize threshold of 255 all leave an image without 255s unchanged.
    image = _image(30, 34, channels, high=255)
    for seed in range(20):
        out = augment.rand_augment(image, _rng(seed), num_ops=4, magnitude=0, ops=_IDENTITY_AT_ZERO)
        np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(augment.rand_augment(_image(), _rng(), num_ops=0), _image())
    # torchvision quirk kept: Solarize at bin 0 still inverts 255.
    white = np.full((4, 4, channels), 255, np.uint8)
    assert (_one_op(white, "Solarize", 0) == 0).all()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("op", augment.RAND_AUGMENT_OPS)
def test_each_op_keeps_shape_and_changes_a_noisy_image(op, channels):
    image = _image(24, 28, channels, low=40, high=200)
    out = _one_op(image, op, 20)
    assert out.shape == image.shape and out.dtype == np.uint8
    if op == "Identity" or (op == "Color" and channels == 1):
        np.testing.assert_array_equal(out, image)
    else:
        assert not np.array_equal(out, image)


@pytest.mark.parametrize("magnitude", [0, 9, 20, 30])
def test_solarize_inverts_pixels_at_or_above_threshold(magnitude):
    image = _image()
    threshold = 255 * (1 - magnitude / 30)
    expected = np.where(image >= threshold, 255 - image, image)
    np.testing.assert_array_equal(_one_op(image, "Solarize", magnitude), expected)


@pytest.mark.parametrize("magnitude,mask", [(0, 0xFF), (9, 0xFE), (15, 0xFC), (30, 0xF0)])
def test_posterize_keeps_top_bits(magnitude, mask):
    image = _image()
    np.testing.assert_array_equal(_one_op(image, "Posterize", magnitude), image & mask)


@pytest.mark.parametrize("width,magnitude,pixels", [(32, 9, 4), (40, 30, 18), (32, 1, 0)])
def test_translate_shifts_by_the_binned_number_of_pixels(width, magnitude, pixels):
    # int(150 / 331 * width * magnitude / 30): 4.35 -> 4, 18.1 -> 18, 0.5 -> 0.
    image = _image(width, width, low=1)
    shifts = set()
    for seed in range(12):
        out_x = _one_op(image, "TranslateX", magnitude, seed)
        out_y = _one_op(image.transpose(1, 0, 2), "TranslateY", magnitude, seed).transpose(1, 0, 2)
        for out in (out_x, out_y):
            shift = [s for s in (pixels, -pixels) if np.array_equal(out, _shift_x(image, s))]
            assert shift, seed
            shifts.add(shift[0])
    assert shifts == {pixels, -pixels}


def test_shear_moves_pixels_within_rows_or_columns():
    # Row r has value 7 (r + 1): ShearX may only move pixels along the row.
    rows = np.repeat(7 * np.arange(1, 33, dtype=np.uint8)[:, None], 32, 1)
    image = rows[..., None]
    for seed in range(4):
        out = _one_op(image, "ShearX", 30, seed)[..., 0]
        for r in range(32):
            assert set(np.unique(out[r])) <= {0, 7 * (r + 1)}
            # Shear 0.3 about the top-left: row r loses about 0.3 r pixels.
            assert abs((out[r] == 0).sum() - 0.3 * r) <= 1
        out = _one_op(image.transpose(1, 0, 2), "ShearY", 30, seed)[..., 0]
        np.testing.assert_array_equal((out.T == 0).sum(1), (_one_op(image, "ShearX", 30, seed)[..., 0] == 0).sum(1))


def test_rotate_tilts_a_bar_by_the_binned_angle():
    image = np.zeros((65, 65, 1), np.uint8)
    image[32, :] = 255
    for seed in range(4):
        rows, cols = np.nonzero(_one_op(image, "Rotate", 9, seed)[..., 0])
        slope = np.polyfit(cols, rows, 1)[0]
        assert abs(abs(slope) - math.tan(math.radians(9))) < 0.02


def _either_factor(out, expected_for, tolerance):
    """Whether `out` matches expected_for(f) for f = 1 +- 0.27 (bin 9)."""
    return any(np.abs(out.astype(int) - expected_for(f)).max() <= tolerance for f in (1.27, 0.73))


def test_brightness_contrast_color_blend_with_a_degenerate_image():
    image = _image(low=30, high=220)
    gray = _image(channels=1, low=30, high=220)
    brightness = _one_op(image, "Brightness", 9)
    assert _either_factor(brightness, lambda f: np.clip(np.rint(image * f), 0, 255), 1)
    mean = int(gray.mean() + 0.5)
    contrast = _one_op(gray, "Contrast", 9)
    assert _either_factor(contrast, lambda f: np.clip(np.rint(mean + f * (gray - float(mean))), 0, 255), 1)
    luma = image @ np.array([0.299, 0.587, 0.114])
    color = _one_op(image, "Color", 9)
    assert _either_factor(color, lambda f: np.clip(np.rint(luma[..., None] + f * (image - luma[..., None])), 0, 255), 2)


def test_sharpness_blends_with_a_smoothed_image():
    image = _image(16, 16, 1)
    out = _one_op(image, "Sharpness", 9)[..., 0]
    x = image[..., 0].astype(float)
    # Pillow's SMOOTH kernel: centre 5, neighbours 1, over 13; border kept.
    smooth = x.copy()
    smooth[1:-1, 1:-1] = (
        sum(x[1 + dy : 15 + dy, 1 + dx : 15 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)) + 4 * x[1:-1, 1:-1]
    ) / 13
    assert _either_factor(out, lambda f: np.clip(np.rint(smooth + f * (x - smooth)), 0, 255), 2)
    flat = np.full((8, 8, 3), 100, np.uint8)
    np.testing.assert_array_equal(_one_op(flat, "Sharpness", 30), flat)


def test_autocontrast_and_equalize_stretch_the_range():
    image = _image(low=50, high=151)
    image[0, 0], image[0, 1] = 50, 150  # Exact per-channel range [50, 150].
    auto = _one_op(image, "AutoContrast", 0).astype(int)
    np.testing.assert_allclose(auto, (image - 50.0) * 255 / 100, atol=1)
    narrow = _image(channels=1, low=100, high=121)
    equalized = _one_op(narrow, "Equalize", 0)
    order = np.argsort(narrow.ravel(), kind="stable")
    assert (np.diff(equalized.ravel()[order].astype(int)) >= 0).all()
    assert equalized.max() == 255 and np.ptp(equalized) > 200


def _invalid_calls():
    image = _image()
    rng = _rng()
    return [
        (lambda: augment.pad_crop_flip(image, rng, pad=-1), "-1"),
        (lambda: augment.pad_crop_flip_batch(image[None], rng, pad=-3), "-3"),
        (lambda: augment.pad_crop_flip_batch(image[None], rng, pad=2.5), "2.5"),
        (lambda: augment.pad_crop_flip_batch(image, rng), "(32, 32, 3)"),
        (lambda: augment.horizontal_flip(image, rng, p=2.0), "2.0"),
        (lambda: augment.random_resized_crop(image, rng, size=0), "0"),
        (lambda: augment.random_resized_crop(image, rng, size=8, scale=(0.5, 0.1)), "(0.5, 0.1)"),
        (lambda: augment.random_resized_crop(image, rng, size=8, ratio=(2.0, 1.0)), "(2.0, 1.0)"),
        (lambda: augment.random_resized_crop(image.astype(np.float32), rng, size=8), "float32"),
        (lambda: augment.resize_center_crop(image, size=8, crop_fraction=1.5), "1.5"),
        (lambda: augment.rand_augment(image, rng, magnitude=31), "31"),
        (lambda: augment.rand_augment(image, rng, magnitude=-1), "-1"),
        (lambda: augment.rand_augment(image, rng, magnitude=5, num_magnitude_bins=5), "5"),
        (lambda: augment.rand_augment(image, rng, num_ops=-2), "-2"),
        (lambda: augment.rand_augment(image, rng, ops=("Invert",)), "Invert"),
        (lambda: augment.rand_augment(image[..., :2], rng), "(32, 32, 2)"),
        (lambda: augment.rand_augment(image[0], rng), "(32, 3)"),
        (lambda: augment.random_erasing(image, rng, p=1.5), "1.5"),
        (lambda: augment.random_erasing(image, rng, p=-0.1), "-0.1"),
        (lambda: augment.random_erasing(image, rng, scale=(0.4, 0.2)), "(0.4, 0.2)"),
        (lambda: augment.random_erasing(image, rng, value="noise"), "noise"),
        (lambda: augment.random_erasing(image, rng, value=(1, 2)), "(1, 2)"),
        (lambda: augment.random_erasing(image, rng, value=300), "300"),
        (lambda: augment.inception_train(image, rng, size=0), "0"),
        (lambda: augment.inception_train(image, rng, size=8, randaugment_magnitude=40), "40"),
        (lambda: augment.inception_train(image, rng, size=8, erasing_prob=2.0), "2.0"),
        (lambda: augment.inception_train(image[..., :2], rng, size=8), "(32, 32, 2)"),
    ]


@pytest.mark.parametrize("index", range(len(_invalid_calls())))
def test_bad_arguments_raise_naming_the_value(index):
    call, value = _invalid_calls()[index]
    with pytest.raises(ValueError, match=re.escape(value)):
        call()
