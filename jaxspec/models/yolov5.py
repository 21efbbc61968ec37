"""YOLOv5 detectors (ultralytics v6.0+ architecture) in Flax NNX.

Layer for layer `models/yolov5{n,s,m,l,x}.yaml`: a Conv(k6, s2, p2) stem, a CSP
backbone of C3 blocks ending in SPPF, a PAN neck and a Detect head with three
anchors at strides 8, 16 and 32. Channel widths, block repeats, BatchNorm
settings and initialisation follow ultralytics, so parameter counts equal
torch's and YOLOv5's training recipe applies unchanged.

Parameter paths keep YOLOv5's layer index: `layers/<i>/...` is `model.<i>.`
in torch (`layers/0/conv/kernel` is `model.0.conv.weight`, `layers/24/m/0/bias`
is the P3 head bias), so "freeze layers 10-12" is the regex
`^layers/(10|11|12)/`. Layers 11, 12, 15, 16, 19 and 22 (upsample, concat) have
no parameters; layer 24 is Detect.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.models import layers

# (depth multiple, width multiple) per scale, from the yolov5{n,s,m,l,x}.yaml files.
SCALES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25)}
STRIDES = (8, 16, 32)
# Default anchors in pixels, (scale, anchor, wh); tuples, so a module holds them as static metadata.
ANCHORS = (((10, 13), (16, 30), (33, 23)), ((30, 61), (62, 45), (59, 119)), ((116, 90), (156, 198), (373, 326)))
NUM_OUTPUTS_PER_ANCHOR = 5  # x, y, w, h, objectness; class logits follow.

# (from, repeats, module, args) with channels before width scaling, as in the
# yaml; the comment is the YOLOv5 layer index.
_ARCH = (
    (-1, 1, "Conv", (64, 6, 2, 2)),  # 0  P1/2
    (-1, 1, "Conv", (128, 3, 2)),  # 1  P2/4
    (-1, 3, "C3", (128,)),  # 2
    (-1, 1, "Conv", (256, 3, 2)),  # 3  P3/8
    (-1, 6, "C3", (256,)),  # 4
    (-1, 1, "Conv", (512, 3, 2)),  # 5  P4/16
    (-1, 9, "C3", (512,)),  # 6
    (-1, 1, "Conv", (1024, 3, 2)),  # 7  P5/32
    (-1, 3, "C3", (1024,)),  # 8
    (-1, 1, "SPPF", (1024, 5)),  # 9
    (-1, 1, "Conv", (512, 1, 1)),  # 10 neck
    (-1, 1, "Upsample", ()),  # 11
    ((-1, 6), 1, "Concat", ()),  # 12
    (-1, 3, "C3", (512, False)),  # 13
    (-1, 1, "Conv", (256, 1, 1)),  # 14
    (-1, 1, "Upsample", ()),  # 15
    ((-1, 4), 1, "Concat", ()),  # 16
    (-1, 3, "C3", (256, False)),  # 17 P3 out
    (-1, 1, "Conv", (256, 3, 2)),  # 18
    ((-1, 14), 1, "Concat", ()),  # 19
    (-1, 3, "C3", (512, False)),  # 20 P4 out
    (-1, 1, "Conv", (512, 3, 2)),  # 21
    ((-1, 10), 1, "Concat", ()),  # 22
    (-1, 3, "C3", (1024, False)),  # 23 P5 out
    ((17, 20, 23), 1, "Detect", ()),  # 24
)
NUM_LAYERS = len(_ARCH)

# YOLOv5 leaves torch's default init: U(+-1/sqrt(fan_in)) for kernels and biases.
torch_default_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds channels up to a multiple of `divisor`, as YOLOv5's parse_model."""
    return math.ceil(value / divisor) * divisor


def scaled_depth(repeats: int, depth_multiple: float) -> int:
    """Block repeats after depth scaling; single blocks are never scaled."""
    return max(round(repeats * depth_multiple), 1) if repeats > 1 else repeats


class ConvKernel(nnx.Module):
    """Bias-free k x k convolution with PyTorch's symmetric padding `pad`.

    1x1 stride-1 kernels run as a matmul, faster than a convolution on
    XLA:CPU (see `layers.Conv1x1`); both read the same HWIO `kernel`.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, stride: int, pad: int, *, rngs: nnx.Rngs):
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(torch_default_init(rngs.params(), shape))
        self.stride = stride
        self.pad = pad

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        if kernel.shape[0] == 1 and self.stride == 1 and self.pad == 0:
            return layers.dot(x, kernel[0, 0])
        return layers.conv(x, kernel, self.stride, self.pad)


class Conv(nnx.Module):
    """YOLOv5's Conv: convolution, BatchNorm (eps 1e-3, torch momentum 0.03), SiLU."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int = 1,
        stride: int = 1,
        pad: int | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        pad = kernel_size // 2 if pad is None else pad
        self.conv = ConvKernel(in_features, out_features, kernel_size, stride, pad, rngs=rngs)
        self.bn = layers.BatchNorm(out_features, momentum=0.97, epsilon=1e-3)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.silu(self.bn(self.conv(x)))


class Bottleneck(nnx.Module):
    """1x1 then 3x3 Conv, with a residual when `shortcut` and shapes allow."""

    def __init__(self, in_features: int, out_features: int, shortcut: bool, *, rngs: nnx.Rngs):
        self.cv1 = Conv(in_features, out_features, 1, rngs=rngs)
        self.cv2 = Conv(out_features, out_features, 3, rngs=rngs)
        self.add = shortcut and in_features == out_features

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nnx.Module):
    """CSP block: Bottlenecks on one half-width branch, concat with a 1x1 branch."""

    def __init__(self, in_features: int, out_features: int, repeats: int, shortcut: bool = True, *, rngs: nnx.Rngs):
        hidden = out_features // 2
        self.cv1 = Conv(in_features, hidden, 1, rngs=rngs)
        self.cv2 = Conv(in_features, hidden, 1, rngs=rngs)
        self.cv3 = Conv(2 * hidden, out_features, 1, rngs=rngs)
        self.m = nnx.List([Bottleneck(hidden, hidden, shortcut, rngs=rngs) for _ in range(repeats)])

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.cv1(x)
        for block in self.m:
            y = block(y)
        return self.cv3(jnp.concatenate([y, self.cv2(x)], axis=-1))


def _max_pool_same(x: jax.Array, k: int) -> jax.Array:
    p = k // 2
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, 1, 1, 1), ((0, 0), (p, p), (p, p), (0, 0)))


class SPPF(nnx.Module):
    """Spatial pyramid pooling, fast: three chained k x k max-pools, concatenated."""

    def __init__(self, in_features: int, out_features: int, k: int = 5, *, rngs: nnx.Rngs):
        hidden = in_features // 2
        self.cv1 = Conv(in_features, hidden, 1, rngs=rngs)
        self.cv2 = Conv(4 * hidden, out_features, 1, rngs=rngs)
        self.k = k

    def __call__(self, x: jax.Array) -> jax.Array:
        pooled = [self.cv1(x)]
        for _ in range(3):
            pooled.append(_max_pool_same(pooled[-1], self.k))
        return self.cv2(jnp.concatenate(pooled, axis=-1))


class Upsample(nnx.Module):
    """Nearest-neighbour 2x upsampling."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Concat(nnx.Module):
    """Channel concatenation of the layer's inputs."""

    def __call__(self, xs: list[jax.Array]) -> jax.Array:
        return jnp.concatenate(xs, axis=-1)


class HeadConv(nnx.Module):
    """1x1 convolution with bias; one per detection scale."""

    def __init__(self, in_features: int, out_features: int, bias_prior: np.ndarray, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(torch_default_init(rngs.params(), (1, 1, in_features, out_features)))
        bound = 1 / math.sqrt(in_features)
        noise = jax.random.uniform(rngs.params(), (out_features,), minval=-bound, maxval=bound)
        self.bias = nnx.Param(noise + jnp.asarray(bias_prior, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        # float32 out: box regression, objectness and class logits feed the losses.
        return jnp.dot(x, self.kernel[0, 0].astype(x.dtype), preferred_element_type=jnp.float32) + self.bias[...]


class Detect(nnx.Module):
    """Per-scale 1x1 heads giving, per anchor, (x, y, w, h, objectness, classes) logits.

    Biases start at YOLOv5's priors: objectness log(8 / (640 / stride)^2)
    (about 8 objects per 640 px image) and classes log(0.6 / (nc - 0.99999)).
    """

    def __init__(self, in_features: tuple[int, ...], num_classes: int, num_anchors: int, *, rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        no = NUM_OUTPUTS_PER_ANCHOR + num_classes
        heads = []
        for cin, stride in zip(in_features, STRIDES, strict=True):
            prior = np.zeros((num_anchors, no), np.float32)
            prior[:, 4] = math.log(8 / (640 / stride) ** 2)
            prior[:, 5:] = math.log(0.6 / (num_classes - 0.99999))
            heads.append(HeadConv(cin, num_anchors * no, prior.reshape(-1), rngs=rngs))
        self.m = nnx.List(heads)

    def __call__(self, xs: list[jax.Array]) -> list[jax.Array]:
        outs = []
        for head, x in zip(self.m, xs, strict=True):
            y = head(x)
            outs.append(y.reshape(*y.shape[:3], self.num_anchors, -1))
        return outs


def _build(scale: str, num_classes: int, count: int, rngs: nnx.Rngs) -> tuple[list, list, list[int]]:
    """The first `count` layers of YOLOv5`scale` as the yaml builds them: modules, their inputs, and the
    output channels of every layer (`channels[i + 1]` is layer i's)."""
    if scale not in SCALES:
        raise ValueError(f"Unknown YOLOv5 scale {scale!r}; choose from {list(SCALES)}.")
    depth, width = SCALES[scale]
    channels = [3]  # output channels per layer; channels[-1] is the running input
    built, sources = [], []
    for source, repeats, kind, args in _ARCH[:count]:
        cin = channels[-1]
        if kind == "Conv":
            cout = make_divisible(args[0] * width)
            module = Conv(cin, cout, *args[1:], rngs=rngs)
        elif kind == "C3":
            cout = make_divisible(args[0] * width)
            module = C3(cin, cout, scaled_depth(repeats, depth), *args[1:], rngs=rngs)
        elif kind == "SPPF":
            cout = make_divisible(args[0] * width)
            module = SPPF(cin, cout, args[1], rngs=rngs)
        elif kind == "Upsample":
            cout, module = cin, Upsample()
        elif kind == "Concat":
            cout = sum(channels[-1] if j == -1 else channels[j + 1] for j in source)
            module = Concat()
        else:  # Detect
            cout = None
            module = Detect(tuple(channels[j + 1] for j in source), num_classes, len(ANCHORS[0]), rngs=rngs)
        built.append(module)
        sources.append(source)
        channels.append(cout)
    return built, sources, channels


class YOLOv5(nnx.Module):
    """YOLOv5 detector on NHWC float images whose sides are multiples of 32.

    `__call__` returns the raw head outputs, one `[B, H/s, W/s, 3, 5 + nc]`
    array per stride s in (8, 16, 32); `decode` turns them into boxes.
    `model.train()` / `model.eval()` switch BatchNorm statistics. `dtype` is
    the activation dtype (`layers.compute_dtype`); head outputs are float32.
    """

    def __init__(self, scale: str, num_classes: int, *, rngs: nnx.Rngs, dtype="float32"):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        self.dtype = layers.compute_dtype(dtype)
        self.scale = scale
        self.num_classes = num_classes
        self.anchors = ANCHORS
        self.strides = STRIDES
        built, sources, _ = _build(scale, num_classes, NUM_LAYERS, rngs)
        self.layers = nnx.List(built)
        self.sources = tuple(sources)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        h, w = x.shape[1:3]
        if h % STRIDES[-1] or w % STRIDES[-1]:
            raise ValueError(f"Image sides must be multiples of {STRIDES[-1]}, got {h}x{w}.")
        x = x.astype(self.dtype)
        outputs = []
        for source, layer in zip(self.sources, self.layers):
            if isinstance(source, int):
                x = layer(x if source == -1 else outputs[source])
            else:
                x = layer([x if j == -1 else outputs[j] for j in source])
            outputs.append(x)
        return x


def yolov5(scale: str, num_classes: int, *, rngs: nnx.Rngs, dtype="float32") -> YOLOv5:
    """YOLOv5{n,s,m,l,x}; at 80 classes 1,872,157 / 7,235,389 / 21,190,557 /
    46,563,709 / 86,749,405 parameters, as torch counts them."""
    return YOLOv5(scale, num_classes, rngs=rngs, dtype=dtype)


BACKBONE = 10  # layers 0-9 (the CSP backbone through SPPF): what a classifier pre-trains for a detector


class YOLOv5Classifier(nnx.Module):
    """YOLOv5's backbone (layers 0-9, parameter paths as in `YOLOv5`) with global average pooling and a
    linear head: the classifier whose backbone a detector starts from (`transplant_backbone`), as the
    paper's detectors start from an ImageNet-pretrained one."""

    def __init__(self, scale: str, num_classes: int, *, rngs: nnx.Rngs, dtype="float32", dropout_rate: float = 0.0):
        self.dtype = layers.compute_dtype(dtype)
        self.scale = scale
        self.num_classes = num_classes
        built, _, channels = _build(scale, num_classes, BACKBONE, rngs)
        self.layers = nnx.List(built)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.head = nnx.Linear(channels[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        for layer in self.layers:  # every backbone layer reads the one before it
            x = layer(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return self.head(self.dropout(x, rngs=rngs))


def transplant_backbone(detector: YOLOv5, classifier: YOLOv5Classifier) -> YOLOv5:
    """`detector` with layers 0-9 (parameters and BatchNorm statistics) replaced by copies of `classifier`'s
    (copies: training donates the detector's buffers)."""
    if detector.scale != classifier.scale:
        raise ValueError(f"a yolov5{classifier.scale} backbone does not fit a yolov5{detector.scale} detector")
    for i in range(BACKBONE):
        nnx.update(detector.layers[i], jax.tree.map(jnp.copy, nnx.state(classifier.layers[i])))
    return detector


def decode(outputs: list[jax.Array], anchors=ANCHORS, strides=STRIDES) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Raw head outputs -> (boxes [B, N, 4] xywh pixels, objectness [B, N], class probabilities [B, N, nc]).

    YOLOv5's inference transform: sigmoid everywhere, centre
    (2 sigmoid - 0.5 + cell) * stride, size (2 sigmoid)^2 * anchor.
    N = sum over scales of H * W * 3, ordered (scale, row, column, anchor).
    Class probabilities are not yet multiplied by objectness.
    """
    anchors = jnp.asarray(anchors, jnp.float32)
    boxes, objectness, classes = [], [], []
    for out, anchor, stride in zip(outputs, anchors, strides, strict=True):
        b, h, w = out.shape[:3]
        p = jax.nn.sigmoid(out.astype(jnp.float32))
        rows, cols = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
        cell = jnp.stack([cols, rows], axis=-1)[None, :, :, None, :].astype(jnp.float32)
        xy = (p[..., :2] * 2 - 0.5 + cell) * stride
        wh = (p[..., 2:4] * 2) ** 2 * anchor
        boxes.append(jnp.concatenate([xy, wh], axis=-1).reshape(b, -1, 4))
        objectness.append(p[..., 4].reshape(b, -1))
        classes.append(p[..., 5:].reshape(b, -1, out.shape[-1] - 5))
    return (jnp.concatenate(boxes, axis=1), jnp.concatenate(objectness, axis=1), jnp.concatenate(classes, axis=1))
