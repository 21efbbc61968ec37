"""Conv, BatchNorm and squeeze-excite blocks for the MobileNetV3 family.

All convolutions pad like PyTorch (`(k - 1) // 2` on every side) rather than
with XLA's `SAME`, which pads asymmetrically at stride 2 and would make
torchvision weights produce different numbers.

Kernels keep `nnx.Conv`'s HWIO layout so checkpoints do not depend on which
compute path a layer uses.

Every layer computes in its input's dtype (see `compute_dtype`): parameters
and BatchNorm statistics stay float32 and are cast on use, so a bfloat16
model reads the same checkpoints as a float32 one.
"""

import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspec import sharding

DepthwiseImpl = Literal["auto", "conv", "shift"]
COMPUTE_DTYPES = ("float32", "bfloat16")

# Steps of the depthwise kernel gradient's loop (see `_kernel_grad`): at 224
# px, batch 32, 8 steps of 4 images was fastest over the model's layers among
# 1, 2, 4, 8 and 32 images a step; a fixed count bounds the loop's overhead
# at small sizes and large batches.
_KGRAD_STEPS = 8

# torchvision initialises convolutions with kaiming-normal(fan_out), linears
# with N(0, 0.01) and every bias with zeros; we follow it.
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
linear_init = nnx.initializers.normal(0.01)


def compute_dtype(dtype) -> jnp.dtype:
    """Checks a model's activation dtype: float32, or bfloat16 for mixed
    precision on accelerators (no loss scaling needed, unlike float16)."""
    name = dtype if isinstance(dtype, str) else getattr(jnp.dtype(dtype), "name", None)
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")
    return jnp.dtype(name)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b.astype(a.dtype), preferred_element_type=jnp.float32)


@jax.custom_vjp
def dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (..., C) @ kernel (C, D) in x's dtype, accumulated in float32.

    Low-precision products with a float32 accumulator are what tensor cores
    and CPU matrix units (AMX) run natively; a bfloat16 accumulator would
    also lose precision over long sums. The custom VJP states the kernel
    gradient as one (N, C) x (N, D) contraction: from autodiff's form XLA:CPU
    recomputed the gradient flowing in (a BatchNorm backward) a second time
    in a transposed layout for it: the 224 px train step took 0.47 s, not 0.38.
    """
    return _matmul(x, kernel).astype(x.dtype)


def _dot_fwd(x, kernel):
    return dot(x, kernel), (x, kernel)


def _dot_bwd(residuals, dy):
    x, kernel = residuals
    dx = _matmul(dy, kernel.T).astype(x.dtype)
    rows = x.reshape(-1, x.shape[-1])
    dk = jnp.einsum(
        "nc,nd->cd",
        rows,
        dy.reshape(-1, dy.shape[-1]),
        preferred_element_type=jnp.float32,
        out_sharding=sharding.summed_over_rows(rows),
    )
    return dx, dk.astype(kernel.dtype)


dot.defvjp(_dot_fwd, _dot_bwd)


def resolve_depthwise(impl: DepthwiseImpl) -> Literal["conv", "shift"]:
    """Maps `'auto'` to the faster depthwise path for the current backend.

    XLA:CPU lowers grouped convolutions to a slow generic loop, so on CPU a
    sum of k*k shifted multiply-adds wins by 5-15x; accelerators have fast
    native depthwise kernels.
    """
    if impl == "auto":
        return "shift" if jax.default_backend() == "cpu" else "conv"
    if impl not in ("conv", "shift"):
        raise ValueError(f"depthwise must be 'auto', 'conv' or 'shift', got {impl!r}")
    return impl


class BatchNorm(nnx.Module):
    """BatchNorm over NHWC channels with torchvision's MobileNetV3 settings.

    Same variables as `nnx.BatchNorm` (`scale`, `bias`, `mean`, `var`) and the
    same `use_running_average` switch, so `model.eval()`/`train()` work. It
    differs in two ways: statistics come from one pass (E[x], E[x^2]) with
    the affine folded into a single multiply-add, which made a 224 px CPU
    training step ~30% faster (no change at 32 px); and the running
    variance tracks torch's unbiased batch variance. torch's momentum 0.01
    weights the new batch, i.e. flax momentum 0.99.
    """

    def __init__(
        self, features: int, *, momentum: float = 0.99, epsilon: float = 1e-3, use_running_average: bool = False
    ):
        self.scale = nnx.Param(jnp.ones((features,)))
        self.bias = nnx.Param(jnp.zeros((features,)))
        self.mean = nnx.BatchStat(jnp.zeros((features,)))
        self.var = nnx.BatchStat(jnp.ones((features,)))
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axes, dtype=jnp.float32)
            var = jnp.maximum(jnp.mean(jnp.square(x.astype(jnp.float32)), axes) - mean**2, 0.0)
            n = x.size // x.shape[-1]
            m = self.momentum
            new_mean = m * self.mean[...] + (1 - m) * mean
            new_var = m * self.var[...] + (1 - m) * var * (n / max(n - 1, 1))
            # `set_value`, not `[...] =`: flax's indexed assignment asks the tracer for its sharding, and the
            # error it builds and catches walks the whole jaxpr traced so far (a third of tracing a YOLOv5 step).
            self.mean.set_value(jax.lax.stop_gradient(new_mean).astype(self.mean[...].dtype))
            self.var.set_value(jax.lax.stop_gradient(new_var).astype(self.var[...].dtype))
        gain = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
        return (x * gain + (self.bias[...] - mean * gain)).astype(x.dtype)


class Conv1x1(nnx.Module):
    """Pointwise convolution computed as a matmul over the channel axis.

    XLA:CPU runs a 1x1 convolution slower than the equivalent dot product
    (~10% of a CPU training step); on accelerators both are one kernel.
    `impl='conv'` computes it as a convolution (see `use_native_convolutions`).
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False, rngs: nnx.Rngs):
        self.kernel = nnx.Param(conv_init(rngs.params(), (1, 1, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None
        self.impl = "dot"

    def __call__(self, x: jax.Array) -> jax.Array:
        y = conv(x, self.kernel[...], 1, 0) if self.impl == "conv" else dot(x, self.kernel[0, 0])
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class PatchConv(nnx.Module):
    """A dense k x k convolution computed as a matmul over its k*k*C_in patches.

    Used for the 3-channel stem: it is as fast as XLA:CPU's convolution for
    one model, and under `vmap` over K stacked specialists it stays a batched
    matmul, where a convolution with batched weights becomes a grouped
    convolution that XLA:CPU runs several times slower. The input is the
    image, so the patches never need a gradient. `impl='conv'` computes it
    as a convolution (see `use_native_convolutions`).
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1, rngs: nnx.Rngs):
        self.kernel = nnx.Param(conv_init(rngs.params(), (kernel_size, kernel_size, in_features, out_features)))
        self.stride = stride
        self.impl = "dot"

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        k, s = kernel.shape[0], self.stride
        pad = (k - 1) // 2
        if self.impl == "conv":
            return conv(x, kernel, s, pad)
        ho, wo = _out_size(x.shape[1], k, s, pad), _out_size(x.shape[2], k, s, pad)
        x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        # (kh, kw, c) patch order, the order of the HWIO kernel's leading axes.
        patches = jnp.concatenate(_taps(x, k, s, (ho, wo)), axis=-1)
        return dot(patches, kernel.reshape(-1, kernel.shape[-1]))


def conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int, groups: int = 1) -> jax.Array:
    """XLA's NHWC/HWIO convolution with PyTorch's symmetric padding, in x's
    dtype and accumulated in float32 (as `dot`)."""
    return jax.lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        preferred_element_type=jnp.float32,
    ).astype(x.dtype)


def _depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    return conv(x, kernel, stride, pad, groups=x.shape[-1])


def _taps(x: jax.Array, k: int, stride: int, out_hw: tuple[int, int]) -> list[jax.Array]:
    """The k*k windows x[:, i + stride*h, j + stride*w, :] of a padded input, (i, j) row-major."""
    n, _, _, c = x.shape
    out_h, out_w = out_hw
    return [
        jax.lax.slice(
            x, (0, i, j, 0), (n, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, c), (1, stride, stride, 1)
        )
        for i in range(k)
        for j in range(k)
    ]


def _shift_sum(x: jax.Array, kernel: jax.Array, stride: int, out_hw: tuple[int, int]) -> jax.Array:
    """sum_ij x[:, i + stride*h, j + stride*w, :] * kernel[i, j, 0], summed in float32."""
    k = kernel.shape[0]
    out = None
    for tap, weight in zip(_taps(x, k, stride, out_hw), kernel.reshape(k * k, -1)):
        term = tap.astype(jnp.float32) * weight.astype(jnp.float32)
        out = term if out is None else out + term
    return out.astype(x.dtype)


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shift(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """Depthwise conv as a sum over taps of strided slices times weights.

    Autodiff would give each tap's input gradient its own full-size padded
    tensor, k*k passes over memory; the custom VJP computes it as one
    transposed shift-sum (~10% of a 224 px CPU training step).
    """
    k = kernel.shape[0]
    _, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return _shift_sum(x, kernel, stride, (_out_size(h, k, stride, pad), _out_size(w, k, stride, pad)))


def _depthwise_shift_fwd(x, kernel, stride, pad):
    return _depthwise_shift(x, kernel, stride, pad), (x, kernel)


def _depthwise_shift_bwd(stride, pad, residuals, dy):
    x, kernel = residuals
    k = kernel.shape[0]
    _, h, w, _ = x.shape
    # Input gradient: spread dy back to stride spacing (interior padding),
    # pad so every tap lands inside, and correlate with the flipped kernel.
    lo = k - 1 - pad
    dy_h, dy_w = dy.shape[1:3]
    spread = jax.lax.pad(
        dy,
        jnp.zeros((), dy.dtype),
        (
            (0, 0, 0),
            (lo, h + pad - (dy_h - 1) * stride - 1, stride - 1),
            (lo, w + pad - (dy_w - 1) * stride - 1, stride - 1),
            (0, 0, 0),
        ),
    )
    dx = _shift_sum(spread, kernel[::-1, ::-1], 1, (h, w))
    # The barrier stops XLA from merging the kernel gradient's slices with
    # the forward ones and materialising each tap.
    x = jax.lax.optimization_barrier(x)
    dk = _kernel_grad(x, dy, k, stride, pad).reshape(kernel.shape)
    return dx, dk.astype(kernel.dtype)


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


def _split_batch(x: jax.Array, steps: int) -> jax.Array:
    """(N, ...) -> (N / steps, steps, ...), the leading axis keeping x's sharding."""
    return x.reshape(x.shape[0] // steps, steps, *x.shape[1:], out_sharding=sharding.split_like_rows(x, x.ndim + 1))


def _kernel_grad(x: jax.Array, dy: jax.Array, k: int, stride: int, pad: int) -> jax.Array:
    """(k*k, C) sums over images and positions of each tap times dy.

    XLA:CPU computes each tap's reduction as its own pass over x and dy, so
    over the whole batch that is k*k trips through main memory; looping over
    a slice of the images at a time keeps those trips in cache (3x faster
    over the 224 px model's layers). Step i takes images i, i + steps, ...,
    and the step count leaves every slice a whole number of images per
    shard of an explicitly batch-sharded array, so each device loops over
    its own images.
    """
    n, shards = x.shape[0], sharding.row_shards(x)
    iters = max(d for d in range(1, _KGRAD_STEPS + 1) if n % (d * shards) == 0)
    xs, dys = _split_batch(x, iters), _split_batch(dy, iters)

    def tap_sums(i):
        """(images of slice i, k*k, C): per image, so no device sums across the mesh in the loop."""
        xi = jax.lax.dynamic_index_in_dim(xs, i, 1, keepdims=False)
        dyi = jax.lax.dynamic_index_in_dim(dys, i, 1, keepdims=False)
        xi = jnp.pad(xi, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        return jnp.stack(
            [jnp.sum(tap.astype(jnp.float32) * dyi, axis=(1, 2)) for tap in _taps(xi, k, stride, dy.shape[1:3])], axis=1
        )

    zeros = jnp.zeros((n // iters, k * k, x.shape[-1]), jnp.float32, out_sharding=sharding.split_like_rows(x, 3))
    total = jax.lax.fori_loop(0, iters, lambda i, total: total + tap_sums(i), zeros)
    return jnp.sum(total, axis=0)


class DepthwiseConv(nnx.Module):
    """k x k depthwise convolution (no bias) with two interchangeable paths.

    `impl='conv'` uses XLA's grouped convolution; `impl='shift'` sums shifted
    strided slices, which is much faster on XLA:CPU. Both read the same
    `(k, k, 1, C)` kernel, as `nnx.Conv(feature_group_count=C)` stores it.
    """

    def __init__(
        self, features: int, kernel_size: int, stride: int = 1, *, impl: DepthwiseImpl = "auto", rngs: nnx.Rngs
    ):
        self.kernel = nnx.Param(conv_init(rngs.params(), (kernel_size, kernel_size, 1, features)))
        self.stride = stride
        self.impl = resolve_depthwise(impl)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        pad = (kernel.shape[0] - 1) // 2
        fn = _depthwise_shift if self.impl == "shift" else _depthwise_conv
        return fn(x, kernel, self.stride, pad)


def use_native_convolutions(model: nnx.Module) -> nnx.Module:
    """Switches every convolution of `model` (in place) to XLA's convolution op and returns it.

    The dot and shift forms are XLA:CPU speedups; converters to mobile formats
    map the plain op to their own kernels (TFLite's CONV_2D and
    DEPTHWISE_CONV_2D), and TF 2.21's TFLite converter fails on a dot over
    [1, 1, 1, C] activations (squeeze-excite, a 1x1 feature map). Same
    parameters, same results up to float rounding.
    """
    for _, module in nnx.iter_modules(model):
        if isinstance(module, (Conv1x1, PatchConv, DepthwiseConv)):
            module.impl = "conv"
    return model


class ConvBN(nnx.Module):
    """Convolution, BatchNorm, then an optional activation.

    Mirrors torchvision's `Conv2dNormActivation`, whose sub-modules `0` and
    `1` map to `conv` and `bn` here.
    """

    def __init__(self, conv: nnx.Module, features: int, activation: Callable[[jax.Array], jax.Array] | None):
        self.conv = conv
        self.bn = BatchNorm(features)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.bn(self.conv(x))
        return x if self.activation is None else self.activation(x)


class SqueezeExcite(nnx.Module):
    """Channel gating: global pool, 1x1 ReLU bottleneck, hard-sigmoid scale."""

    def __init__(self, features: int, squeeze_features: int, *, rngs: nnx.Rngs):
        self.fc1 = Conv1x1(features, squeeze_features, use_bias=True, rngs=rngs)
        self.fc2 = Conv1x1(squeeze_features, features, use_bias=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        scale = jax.nn.relu(self.fc1(scale))
        return x * jax.nn.hard_sigmoid(self.fc2(scale))
