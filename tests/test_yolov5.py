"""YOLOv5 architecture: parameter counts, shapes, layer-index paths, head init, decode."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspec import models
from jaxspec.models.yolov5 import (
    ANCHORS,
    SCALES,
    STRIDES,
    decode,
    make_divisible,
    scaled_depth,
    yolov5,
)

# (`jaxspec.models.yolov5` is the factory function, so the module's names come by `from ... import`.)

# ultralytics' model summaries at 80 classes: training ("YOLOv5s summary: 214
# layers, 7235389 parameters") and after fusing BatchNorm into the convolutions
# ("Fusing layers... 7225885 parameters"), which its README table rounds to
# 0.1M (YOLOv5n's 1.87M reads 1.9M there, 1.7% away; the exact counts are the test).
_TORCH_COUNTS = {"n": 1_872_157, "s": 7_235_389, "m": 21_190_557, "l": 46_563_709, "x": 86_749_405}
_FUSED_COUNTS = {"n": 1_867_405, "s": 7_225_885, "m": 21_172_173, "l": 46_533_693, "x": 86_705_005}
_PUBLISHED = {"n": 1.9e6, "s": 7.2e6, "m": 21.2e6, "l": 46.5e6, "x": 86.7e6}
_PARAMLESS = {11, 12, 15, 16, 19, 22}  # Upsample and Concat


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _paths(model) -> dict[str, tuple[int, ...]]:
    return {"/".join(map(str, path)): v.shape for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def tiny():
    """YOLOv5n with 3 classes, built once for the tests that need real values."""
    return yolov5("n", 3, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("scale", list(SCALES))
def test_parameter_count_matches_yolov5(scale):
    model = nnx.eval_shape(lambda: yolov5(scale, 80, rngs=nnx.Rngs(0)))
    count = _count(nnx.state(model, nnx.Param))
    assert count == _TORCH_COUNTS[scale]
    # Fusing replaces each BatchNorm's scale and bias (2 per channel) by a conv bias (1).
    bn_channels = sum(
        v.shape[0]
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if path[-2] == "bn" and path[-1] == "scale"
    )
    fused = count - bn_channels
    assert fused == _FUSED_COUNTS[scale]
    assert round(fused / 1e6, 1) == _PUBLISHED[scale] / 1e6


def test_get_model_and_bad_arguments():
    model = nnx.eval_shape(lambda: models.get_model("yolov5s", 80, rngs=nnx.Rngs(0)))
    assert _count(nnx.state(model, nnx.Param)) == _TORCH_COUNTS["s"]
    with pytest.raises(ValueError, match="'q'"):
        yolov5("q", 80, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_classes"):
        yolov5("n", 0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "value, divisor, expected",
    [(64 * 0.25, 8, 16), (1024 * 0.75, 8, 768), (1024 * 1.25, 8, 1280), (100, 8, 104), (3, 8, 8)],
)
def test_make_divisible_rounds_up(value, divisor, expected):
    assert make_divisible(value, divisor) == expected


@pytest.mark.parametrize(
    "repeats, depth, expected",
    [(1, 0.33, 1), (3, 0.33, 1), (6, 0.33, 2), (9, 0.33, 3), (3, 0.67, 2), (9, 0.67, 6), (3, 1.33, 4), (9, 1.33, 12)],
)
def test_scaled_depth(repeats, depth, expected):
    assert scaled_depth(repeats, depth) == expected


def test_output_shapes(tiny):
    forward = nnx.jit(lambda m, x: m(x))
    outs = forward(tiny, jax.random.normal(jax.random.key(0), (2, 64, 64, 3)))
    assert [o.shape for o in outs] == [(2, 8, 8, 3, 8), (2, 4, 4, 3, 8), (2, 2, 2, 3, 8)]
    assert all(bool(jnp.all(jnp.isfinite(o))) for o in outs)
    shapes = nnx.eval_shape(lambda m, x: m(x), tiny, jnp.zeros((1, 96, 128, 3)))
    assert [o.shape for o in shapes] == [(1, 12, 16, 3, 8), (1, 6, 8, 3, 8), (1, 3, 4, 3, 8)]
    with pytest.raises(ValueError, match="80x64"):
        tiny(jnp.zeros((1, 80, 64, 3)))


def test_layer_index_paths():
    model = nnx.eval_shape(lambda: yolov5("n", 80, rngs=nnx.Rngs(0)))
    paths = _paths(model)
    index = {int(re.match(r"layers/(\d+)/", p).group(1)) for p in paths}
    assert index == set(range(25)) - _PARAMLESS
    # Widths of yolov5n.yaml (width 0.25): stem 64 -> 16, SPPF 1024 -> 256, neck conv 10 512 -> 128.
    assert paths["layers/0/conv/kernel"] == (6, 6, 3, 16)
    assert paths["layers/9/cv2/conv/kernel"] == (1, 1, 4 * 128, 256)
    assert paths["layers/10/conv/kernel"] == (1, 1, 256, 128)
    # Layer 13's C3 reads the concat of upsampled layer 10 (128) and layer 6 (128).
    assert paths["layers/13/cv1/conv/kernel"] == (1, 1, 256, 64)
    for i, cin in zip(range(3), (64, 128, 256)):  # Detect reads layers 17, 20, 23
        assert paths[f"layers/24/m/{i}/kernel"] == (1, 1, cin, 3 * 85)
    # "Freeze layers 10-12" selects the neck's first Conv and nothing else.
    frozen = {p for p in paths if re.match(r"^layers/(10|11|12)/", p)}
    assert frozen == {"layers/10/conv/kernel", "layers/10/bn/scale", "layers/10/bn/bias"}
    # Anchors and strides are static metadata: the state is parameters and BatchNorm statistics only.
    assert len(jax.tree.leaves(nnx.state(model))) == len(jax.tree.leaves(nnx.state(model, nnx.Param, nnx.BatchStat)))
    # C3 repeats of yolov5n: 1, 2, 3, 1 in the backbone.
    assert [len(model.layers[i].m) for i in (2, 4, 6, 8)] == [1, 2, 3, 1]


def test_head_bias_priors(tiny):
    for head, stride in zip(tiny.layers[24].m, STRIDES):
        bias = np.asarray(head.bias[...]).reshape(3, 8)
        bound = 1 / math.sqrt(head.kernel.shape[2])  # torch's default uniform init around the prior
        np.testing.assert_array_less(np.abs(bias[:, 4] - math.log(8 / (640 / stride) ** 2)), bound)
        np.testing.assert_array_less(np.abs(bias[:, 5:] - math.log(0.6 / (3 - 0.99999))), bound)
        np.testing.assert_array_less(np.abs(bias[:, :4]), bound)


def test_batchnorm_uses_yolov5_momentum(tiny):
    conv = tiny.layers[0]
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    y = conv.conv(x)
    before = np.asarray(conv.bn.mean[...])
    conv.bn(y)
    np.testing.assert_allclose(
        conv.bn.mean[...], 0.97 * before + 0.03 * np.mean(np.asarray(y), axis=(0, 1, 2)), rtol=1e-5, atol=1e-6
    )
    assert conv.bn.epsilon == 1e-3


def test_decode_matches_closed_form():
    rng = np.random.default_rng(0)
    nc = 2
    outputs = [rng.normal(size=(2, h, w, 3, 5 + nc)).astype(np.float32) for h, w in ((4, 6), (2, 3), (1, 2))]
    boxes, obj, cls = jax.jit(decode)([jnp.asarray(o) for o in outputs], ANCHORS, STRIDES)
    sig = lambda v: 1 / (1 + math.exp(-v))
    n = 0
    for out, anchors, stride in zip(outputs, ANCHORS, STRIDES):
        for row in range(out.shape[1]):
            for col in range(out.shape[2]):
                for a in range(3):
                    for b in range(2):
                        t = out[b, row, col, a]
                        expected = [
                            (2 * sig(t[0]) - 0.5 + col) * stride,
                            (2 * sig(t[1]) - 0.5 + row) * stride,
                            4 * sig(t[2]) ** 2 * anchors[a][0],
                            4 * sig(t[3]) ** 2 * anchors[a][1],
                        ]
                        np.testing.assert_allclose(boxes[b, n], expected, rtol=1e-5)
                        np.testing.assert_allclose(obj[b, n], sig(t[4]), rtol=1e-5)
                        np.testing.assert_allclose(cls[b, n], [sig(v) for v in t[5:]], rtol=1e-5)
                    n += 1
    assert boxes.shape == (2, n, 4)


def test_decode_zero_logits_give_cell_centre_and_anchor():
    outputs = [jnp.zeros((1, h, h, 3, 6)) for h in (4, 2, 1)]
    boxes, obj, _ = jax.jit(decode)(outputs)
    # Last P5 entry: the only cell (centre 16, 16), anchor 2 (373 x 326).
    np.testing.assert_allclose(boxes[0, -1], [16, 16, 373, 326])
    # First P3 entry: cell (0, 0) of stride 8, anchor 0 (10 x 13).
    np.testing.assert_allclose(boxes[0, 0], [4, 4, 10, 13])
    np.testing.assert_allclose(obj, 0.5)
