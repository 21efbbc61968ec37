"""MobileNetV3 architecture, API and depthwise-path equivalence."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspec import models, sharding
from jaxspec.models import layers
from jaxspec.models import mobilenet_v3 as mnv3


def _abstract(arch: str, num_classes: int = 1000, **kwargs):
    return nnx.eval_shape(lambda: models.get_model(arch, num_classes, rngs=nnx.Rngs(0), **kwargs))


def _count(model, kind=nnx.Param) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, kind)))


def _images(n: int, size: int, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def _small(**kwargs) -> mnv3.MobileNetV3:
    """A tiny Small; tests share its shapes so init compiles only once."""
    return mnv3.mobilenet_v3_small(5, rngs=nnx.Rngs(0), width_multiplier=0.25, **kwargs)


# Eager NNX runs op by op, compiling each new shape; jit once instead.
_forward = nnx.jit(lambda model, x, rngs=None: model(x, rngs=rngs))
_features = nnx.jit(lambda model, x: model.features(x))
_intermediates = nnx.jit(lambda model, x: model.intermediates(x))


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("mobilenet_v3_small", 2_542_856),
        ("mobilenet_v3_large", 5_483_032),
    ],
)
def test_parameter_count_matches_torchvision(arch, expected):
    assert _count(_abstract(arch)) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        (16 * 0.5, 8),
        (16 * 0.75, 16),
        (1024 * 0.35, 360),
        (72 * 0.25, 24),
        (3.0, 8),
    ],
)
def test_make_divisible(value, expected):
    assert mnv3.make_divisible(value) == expected


@pytest.mark.parametrize("arch, hidden", [("mobilenet_v3_small", 1024), ("mobilenet_v3_large", 1280)])
def test_shapes_at_224(arch, hidden):
    model = _abstract(arch)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    logits = nnx.eval_shape(lambda m, x: m(x), model, x)
    features = nnx.eval_shape(lambda m, x: m.features(x), model, x)
    assert logits.shape == (2, 1000)
    assert features.shape == (2, hidden)


def test_forward_at_32():
    model = _small()
    model.eval()
    logits = _forward(model, _images(2, 32))
    assert logits.shape == (2, 5)
    assert np.isfinite(np.asarray(logits)).all()
    large = _abstract("mobilenet_v3_large", 7, in_channels=1)
    x = jax.ShapeDtypeStruct((2, 32, 32, 1), jnp.float32)
    assert nnx.eval_shape(lambda m, x: m(x), large, x).shape == (2, 7)


def test_width_scales_classifier():
    model = _abstract("mobilenet_v3_small", 10, width_multiplier=0.5)
    assert model.hidden.kernel.shape == (576 // 2, 512)
    assert model.head.kernel.shape == (512, 10)
    assert model.width_multiplier == 0.5


def test_a_truncated_network_is_the_references_first_blocks_and_rebuilds_from_its_spec():
    full = _abstract("mobilenet_v3_small", 10, width_multiplier=0.25)
    short = _abstract("mobilenet_v3_small", 10, width_multiplier=0.25, num_blocks=4)
    assert short.num_blocks == 4 and full.num_blocks == 11 and len(short.blocks) == 4
    assert short.layer_names[1:-4] == ("block0", "block1", "block2", "block3")
    shapes = lambda m: jax.tree.map(jnp.shape, nnx.state(m.blocks))  # noqa: E731
    assert shapes(short) == jax.tree.map(jnp.shape, nnx.state(nnx.List(list(full.blocks)[:4])))
    # The last 1x1 conv widens the last kept block's output six-fold, as the reference does its own.
    assert short.last_conv.conv.kernel.shape[-2:] == (16, 96)
    spec = models.describe(short)
    assert spec["num_blocks"] == 4
    assert "num_blocks" not in models.describe(full)  # the whole network's spec is what it was before
    rebuilt = nnx.eval_shape(lambda: models.from_spec(spec, rngs=nnx.Rngs(0)))
    assert jax.tree.map(jnp.shape, nnx.state(rebuilt)) == jax.tree.map(jnp.shape, nnx.state(short))
    # A spec written before `num_blocks` existed is the whole network.
    del spec["num_blocks"]
    assert nnx.eval_shape(lambda: models.from_spec(spec, rngs=nnx.Rngs(0))).num_blocks == 11
    for bad in (0, 12, 2.0):
        with pytest.raises(ValueError, match=f"num_blocks={bad!r}: mobilenet_v3_small has 11 blocks"):
            mnv3.arch_config("mobilenet_v3_small", num_blocks=bad)


def test_intermediates_names_and_shapes():
    model = _small()
    model.eval()
    x = _images(2, 32)
    names = model.layer_names
    assert names[0] == "stem" and names[-4:] == ("last_conv", "pool", "pre_logits", "logits")
    assert names[1:-4] == tuple(f"block{i}" for i in range(11))

    order = []  # jit returns dicts key-sorted; check order while tracing
    nnx.eval_shape(lambda m, x: order.extend(m.intermediates(x)), model, x)
    assert tuple(order) == names
    acts = _intermediates(model, x)
    assert acts["stem"].shape == (2, 16, 16, 8)
    assert acts["block0"].shape == (2, 8, 8, 8)
    assert acts["block10"].shape == (2, 1, 1, 24)
    assert acts["last_conv"].shape == (2, 1, 1, 144)
    assert acts["pool"].shape == (2, 144)
    assert acts["pre_logits"].shape == (2, 256)
    np.testing.assert_allclose(acts["logits"], _forward(model, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acts["pre_logits"], _features(model, x), rtol=1e-5, atol=1e-6)

    order.clear()
    nnx.eval_shape(lambda m, x: order.extend(m.intermediates(x, ["pool", "block3"])), model, x)
    assert order == ["block3", "pool"]
    with pytest.raises(ValueError, match="'nope'.*valid names.*'stem'"):
        model.intermediates(x, ["nope", "stem"])


def test_dropout_only_in_train_mode():
    model = _small()
    x = _images(4, 32)
    model.train()
    assert not np.allclose(_forward(model, x), _forward(model, x))
    # An explicit stream overrides the construction-time one.
    np.testing.assert_array_equal(_forward(model, x, nnx.Rngs(dropout=3)), _forward(model, x, nnx.Rngs(dropout=3)))
    np.testing.assert_array_equal(_features(model, x), _features(model, x))
    model.eval()
    np.testing.assert_array_equal(_forward(model, x), _forward(model, x))


def test_batch_stats_update_only_in_train_mode():
    model = _small()
    x = _images(4, 32)

    def stats():
        return [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]

    before = stats()
    model.eval()
    _forward(model, x)
    assert all(np.array_equal(a, b) for a, b in zip(before, stats()))
    model.train()
    _forward(model, x)
    assert not any(np.array_equal(a, b) for a, b in zip(before, stats()))


def test_batch_norm_matches_torch_semantics():
    bn = layers.BatchNorm(3)
    scale, bias = np.array([1.0, 2.0, 0.5]), np.array([0.0, 1.0, -1.0])
    bn.scale.value, bn.bias.value = jnp.asarray(scale), jnp.asarray(bias)
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 3)) * 3 + 2
    flat = np.asarray(x).reshape(-1, 3)
    y = np.asarray(bn(x)).reshape(-1, 3)
    # Training normalises with the biased batch variance...
    np.testing.assert_allclose(y.mean(0), bias, atol=1e-4)
    np.testing.assert_allclose(y.std(0), scale * np.sqrt(flat.var(0) / (flat.var(0) + 1e-3)), rtol=1e-4)
    # ...and, like torch, tracks the unbiased one with weight 0.01.
    np.testing.assert_allclose(bn.mean.value, 0.01 * flat.mean(0), rtol=1e-4)
    np.testing.assert_allclose(bn.var.value, 0.99 + 0.01 * flat.var(0, ddof=1), rtol=1e-4)
    bn.eval()
    mean, var = np.asarray(bn.mean.value), np.asarray(bn.var.value)
    np.testing.assert_allclose(
        np.asarray(bn(x)).reshape(-1, 3), (flat - mean) / np.sqrt(var + 1e-3) * scale + bias, rtol=1e-4, atol=1e-4
    )


def test_get_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="resnet.*mobilenet_v3_large"):
        models.get_model("resnet", 10, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Unknown architecture"):
        mnv3.MobileNetV3("mobilenet_v4", 10, rngs=nnx.Rngs(0))


def test_depthwise_auto_and_validation():
    expected = "shift" if jax.default_backend() == "cpu" else "conv"
    assert layers.resolve_depthwise("auto") == expected
    with pytest.raises(ValueError, match="depthwise"):
        layers.resolve_depthwise("fft")


@functools.partial(jax.jit, static_argnums=3)
def _outputs_and_grads(x, kernel, cotangent, stride):
    """(y, dx, dkernel) from each depthwise path."""
    pad = (kernel.shape[0] - 1) // 2

    def run(impl):
        y, vjp = jax.vjp(lambda x, k: impl(x, k, stride, pad), x, kernel)
        return (y, *vjp(cotangent))

    return run(layers._depthwise_conv), run(layers._depthwise_shift)


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("batch", [7, 12])  # kernel-gradient loop: 7 steps of 1, 6 of 2 images
def test_depthwise_paths_agree(kernel_size, stride, size, batch):
    conv = layers.DepthwiseConv(6, kernel_size, stride, impl="conv", rngs=nnx.Rngs(0))
    shift = layers.DepthwiseConv(6, kernel_size, stride, impl="shift", rngs=nnx.Rngs(0))
    assert conv.kernel.shape == (kernel_size, kernel_size, 1, 6)
    np.testing.assert_array_equal(conv.kernel.value, shift.kernel.value)
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 6))
    # torch: out = floor((n + 2 * ((k - 1) // 2) - k) / s) + 1
    out = (size + 2 * ((kernel_size - 1) // 2) - kernel_size) // stride + 1
    cotangent = jax.random.normal(jax.random.key(2), (batch, out, out, 6))
    from_conv, from_shift = _outputs_and_grads(x, conv.kernel.value, cotangent, stride)
    assert from_shift[0].shape == (batch, out, out, 6)
    np.testing.assert_allclose(shift(x), conv(x), rtol=1e-5, atol=1e-5)
    for a, b in zip(from_shift, from_conv):  # y, dx, dkernel
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_depthwise_kernel_gradient_loop_stays_on_each_device():
    """On a batch-sharded mesh the loop sums per device; one cross-device sum comes after it."""
    mesh = sharding.make_mesh()
    x = jax.random.normal(jax.random.key(1), (8 * len(mesh.devices.flat), 9, 9, 6))
    kernel = jax.random.normal(jax.random.key(2), (5, 5, 1, 6))
    cotangent = jax.random.normal(jax.random.key(3), x.shape)
    grads = jax.jit(lambda x, k, ct: jax.vjp(lambda k: layers._depthwise_shift(x, k, 1, 2), k)[1](ct)[0])
    x_sharded, ct_sharded = (jax.device_put(a, sharding.batch_sharding(mesh)) for a in (x, cotangent))
    hlo = grads.lower(x_sharded, kernel, ct_sharded).compile().as_text()
    bodies = re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo)
    assert bodies  # the loop is there
    for body in bodies:
        text = re.search(r"\n%?" + re.escape(body) + r" .*?\{(.*?)\n\}", hlo, re.S).group(1)
        assert "all-reduce" not in text and "all-gather" not in text, body
    np.testing.assert_allclose(grads(x_sharded, kernel, ct_sharded), grads(x, kernel, cotangent), rtol=1e-5, atol=1e-4)


def test_dot_gradients_equal_autodiff_also_on_a_sharded_batch():
    """`layers.dot`'s custom VJP (the kernel gradient as one contraction over rows) matches `jnp.dot`'s."""
    x = jax.random.normal(jax.random.key(0), (16, 5, 3, 7))
    kernel = jax.random.normal(jax.random.key(1), (7, 4))
    ct = jax.random.normal(jax.random.key(2), (16, 5, 3, 4))

    def vjp(f):
        return jax.jit(lambda x, k, ct: jax.vjp(f, x, k)[1](ct))

    want = vjp(jnp.dot)(x, kernel, ct)
    x_sharded, ct_sharded = (jax.device_put(a, sharding.batch_sharding(sharding.make_mesh())) for a in (x, ct))
    for args in ((x, kernel, ct), (x_sharded, kernel, ct_sharded)):
        np.testing.assert_allclose(layers.dot(*args[:2]), jnp.dot(x, kernel), rtol=1e-5, atol=1e-5)
        for got, ref in zip(vjp(layers.dot)(*args), want, strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_depthwise_paths_share_parameters_and_outputs():
    conv, shift = _small(depthwise="conv"), _small(depthwise="shift")
    conv_state, shift_state = (nnx.state(m, (nnx.Param, nnx.BatchStat)) for m in (conv, shift))
    assert jax.tree.structure(conv_state) == jax.tree.structure(shift_state)
    for a, b in zip(jax.tree.leaves(conv_state), jax.tree.leaves(shift_state)):
        np.testing.assert_array_equal(a, b)
    x = _images(2, 33)
    for mode in ("train", "eval"):
        getattr(conv, mode)()
        getattr(shift, mode)()
        np.testing.assert_allclose(_features(shift, x), _features(conv, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kernel_size, stride, size", [(3, 2, 9), (3, 2, 8), (3, 1, 7), (5, 2, 11), (6, 2, 12), (3, 3, 10)]
)
def test_patch_conv_equals_a_torch_padded_convolution(kernel_size, stride, size):
    conv = layers.PatchConv(3, 5, kernel_size, stride=stride, rngs=nnx.Rngs(0))
    assert conv.kernel.shape == (kernel_size, kernel_size, 3, 5)  # nnx.Conv's HWIO layout
    x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    pad = (kernel_size - 1) // 2
    ref = jax.lax.conv_general_dilated(
        x, conv.kernel[...], (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(conv(x), ref, rtol=1e-5, atol=1e-5)
    # the kernel's gradient too (the training path), against the convolution's
    cot = jax.random.normal(jax.random.key(2), ref.shape)
    dk = jax.grad(lambda k: jnp.sum(layers.PatchConv.__call__(_with_kernel(conv, k), x) * cot))(conv.kernel[...])
    dk_ref = jax.grad(
        lambda k: jnp.sum(
            jax.lax.conv_general_dilated(
                x, k, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            * cot
        )
    )(conv.kernel[...])
    np.testing.assert_allclose(dk, dk_ref, rtol=1e-4, atol=1e-4)


def _with_kernel(conv, kernel):
    clone = nnx.clone(conv)
    clone.kernel = nnx.Param(kernel)
    return clone
