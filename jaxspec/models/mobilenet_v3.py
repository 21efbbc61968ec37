"""MobileNetV3-Small and -Large in Flax NNX, layer for layer torchvision's.

Channel widths, squeeze-excite sizes, activations, BatchNorm settings and the
classifier follow `torchvision.models.mobilenet_v3_{small,large}`, so
parameter counts match and torchvision weights load without loss
(see `jaxspec.models.torchvision`).
"""

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspec.models import layers

ARCHS = ("mobilenet_v3_small", "mobilenet_v3_large")


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds a channel count to a multiple of `divisor` as torchvision does.

    Never goes below `divisor` or more than 10% below `value`.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One inverted-residual block, channels already scaled by width."""

    in_channels: int
    kernel_size: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    use_hardswish: bool
    stride: int


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    blocks: tuple[BlockConfig, ...]
    last_channel: int  # width of the hidden classifier layer

    @property
    def stem_channels(self) -> int:
        return self.blocks[0].in_channels

    @property
    def last_conv_channels(self) -> int:
        return 6 * self.blocks[-1].out_channels


# (in, kernel, expanded, out, squeeze-excite, hard-swish, stride), from the
# MobileNetV3 paper's tables 1 and 2 as torchvision encodes them.
_SMALL = (
    (16, 3, 16, 16, True, False, 2),
    (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1),
    (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1),
)
_LARGE = (
    (16, 3, 16, 16, False, False, 1),
    (16, 3, 64, 24, False, False, 2),
    (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2),
    (40, 5, 120, 40, True, False, 1),
    (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2),
    (80, 3, 200, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 480, 112, True, True, 1),
    (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2),
    (160, 5, 960, 160, True, True, 1),
    (160, 5, 960, 160, True, True, 1),
)
_TABLES = {
    "mobilenet_v3_small": (_SMALL, 1024),
    "mobilenet_v3_large": (_LARGE, 1280),
}


def check_arch(arch: str) -> None:
    if arch not in _TABLES:
        raise ValueError(f"Unknown architecture {arch!r}; choose from {ARCHS}.")


def block_count(arch: str) -> int:
    """How many inverted-residual blocks the reference `arch` has."""
    check_arch(arch)
    return len(_TABLES[arch][0])


def check_num_blocks(arch: str, num_blocks: int | None) -> None:
    n = block_count(arch)
    if num_blocks is not None and not (type(num_blocks) is int and 1 <= num_blocks <= n):
        raise ValueError(f"num_blocks={num_blocks!r}: {arch} has {n} blocks; use 1..{n}, or None for all")


def arch_config(arch: str, width_multiplier: float = 1.0, num_blocks: int | None = None) -> ArchConfig:
    """Scales the reference table of `arch` by `width_multiplier`, keeping its first `num_blocks` blocks
    (None: all of them, the reference network)."""
    check_num_blocks(arch, num_blocks)
    table, last_channel = _TABLES[arch]
    table = table[:num_blocks]

    def scale(channels: int) -> int:
        return make_divisible(channels * width_multiplier)

    blocks = tuple(
        BlockConfig(scale(cin), k, scale(exp), scale(cout), se, hs, s) for cin, k, exp, cout, se, hs, s in table
    )
    return ArchConfig(blocks, scale(last_channel))


class InvertedResidual(nnx.Module):
    """Expand (1x1) -> depthwise -> squeeze-excite -> project (1x1) block."""

    def __init__(self, cfg: BlockConfig, *, depthwise: layers.DepthwiseImpl, rngs: nnx.Rngs):
        act = jax.nn.hard_swish if cfg.use_hardswish else jax.nn.relu
        cin, cout = cfg.in_channels, cfg.out_channels
        exp = cfg.expanded_channels
        self.expand = layers.ConvBN(layers.Conv1x1(cin, exp, rngs=rngs), exp, act) if exp != cin else None
        self.depthwise = layers.ConvBN(
            layers.DepthwiseConv(exp, cfg.kernel_size, cfg.stride, impl=depthwise, rngs=rngs), exp, act
        )
        self.se = layers.SqueezeExcite(exp, make_divisible(exp // 4), rngs=rngs) if cfg.use_se else None
        self.project = layers.ConvBN(layers.Conv1x1(exp, cout, rngs=rngs), cout, None)
        self.use_residual = cfg.stride == 1 and cin == cout

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x if self.expand is None else self.expand(x)
        y = self.depthwise(y)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.use_residual else y


class MobileNetV3(nnx.Module):
    """MobileNetV3 classifier on NHWC float inputs of any size >= 32 px.

    `model.train()` / `model.eval()` switch BatchNorm statistics and dropout.
    Layer names for `intermediates` are in `layer_names`. `num_blocks` keeps
    only the first inverted-residual blocks: a shallow network that compiles
    in a third of the time, for smoke runs and tests. `dtype` is the
    convolutional trunk's activation dtype (`layers.compute_dtype`); the
    pooled features, the classifier and the logits are always float32, so
    losses and extracted specialists see the same logits either way.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        *,
        rngs: nnx.Rngs,
        width_multiplier: float = 1.0,
        num_blocks: int | None = None,
        dropout_rate: float = 0.2,
        depthwise: layers.DepthwiseImpl = "auto",
        in_channels: int = 3,
        dtype="float32",
    ):
        cfg = arch_config(arch, width_multiplier, num_blocks)
        self.dtype = layers.compute_dtype(dtype)
        self.arch = arch
        self.num_classes = num_classes
        self.width_multiplier = width_multiplier
        self.num_blocks = len(cfg.blocks)
        stem = cfg.stem_channels
        self.stem = layers.ConvBN(layers.PatchConv(in_channels, stem, 3, stride=2, rngs=rngs), stem, jax.nn.hard_swish)
        self.blocks = nnx.List([InvertedResidual(b, depthwise=depthwise, rngs=rngs) for b in cfg.blocks])
        last = cfg.last_conv_channels
        self.last_conv = layers.ConvBN(
            layers.Conv1x1(cfg.blocks[-1].out_channels, last, rngs=rngs), last, jax.nn.hard_swish
        )
        self.hidden = nnx.Linear(last, cfg.last_channel, kernel_init=layers.linear_init, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.head = nnx.Linear(cfg.last_channel, num_classes, kernel_init=layers.linear_init, rngs=rngs)
        self.layer_names = (
            "stem",
            *(f"block{i}" for i in range(len(cfg.blocks))),
            "last_conv",
            "pool",
            "pre_logits",
            "logits",
        )

    def _forward(self, x: jax.Array, rngs: nnx.Rngs | None) -> Iterator[tuple[str, jax.Array]]:
        """Yields `(name, activation)` in forward order; stop early at will."""
        x = self.stem(x.astype(self.dtype))
        yield "stem", x
        for i, block in enumerate(self.blocks):
            x = block(x)
            yield f"block{i}", x
        x = self.last_conv(x)
        yield "last_conv", x
        x = jnp.mean(x, axis=(1, 2), dtype=jnp.float32)
        yield "pool", x
        x = jax.nn.hard_swish(self.hidden(x))
        yield "pre_logits", x
        yield "logits", self.head(self.dropout(x, rngs=rngs))

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Logits. `rngs` overrides the construction-time dropout stream."""
        *_, (_, logits) = self._forward(x, rngs)
        return logits

    def features(self, x: jax.Array) -> jax.Array:
        """Penultimate features: hidden linear + hard-swish, before dropout."""
        return self.intermediates(x, ["pre_logits"])["pre_logits"]

    def intermediates(
        self, x: jax.Array, names: Sequence[str] | None = None, *, rngs: nnx.Rngs | None = None
    ) -> dict[str, jax.Array]:
        """Activations by layer name in forward order, e.g. for CKA; float32
        whatever the model's dtype, for analyses and distillation losses.

        Only runs the network as far as the last requested layer.
        """
        wanted = set(self.layer_names if names is None else names)
        unknown = wanted.difference(self.layer_names)
        if unknown:
            raise ValueError(f"Unknown layer names {sorted(unknown)}; valid names are {list(self.layer_names)}.")
        out = {}
        for name, value in self._forward(x, rngs):
            if name in wanted:
                out[name] = value.astype(jnp.float32)
                if len(out) == len(wanted):
                    break
        return out


def mobilenet_v3_small(
    num_classes: int,
    *,
    rngs: nnx.Rngs,
    width_multiplier: float = 1.0,
    num_blocks: int | None = None,
    dropout_rate: float = 0.2,
    depthwise: layers.DepthwiseImpl = "auto",
    in_channels: int = 3,
    dtype="float32",
) -> MobileNetV3:
    """MobileNetV3-Small; 2,542,856 parameters at 1000 classes, width 1."""
    return MobileNetV3(
        "mobilenet_v3_small",
        num_classes,
        rngs=rngs,
        width_multiplier=width_multiplier,
        num_blocks=num_blocks,
        dropout_rate=dropout_rate,
        depthwise=depthwise,
        in_channels=in_channels,
        dtype=dtype,
    )


def mobilenet_v3_large(
    num_classes: int,
    *,
    rngs: nnx.Rngs,
    width_multiplier: float = 1.0,
    num_blocks: int | None = None,
    dropout_rate: float = 0.2,
    depthwise: layers.DepthwiseImpl = "auto",
    in_channels: int = 3,
    dtype="float32",
) -> MobileNetV3:
    """MobileNetV3-Large; 5,483,032 parameters at 1000 classes, width 1."""
    return MobileNetV3(
        "mobilenet_v3_large",
        num_classes,
        rngs=rngs,
        width_multiplier=width_multiplier,
        num_blocks=num_blocks,
        dropout_rate=dropout_rate,
        depthwise=depthwise,
        in_channels=in_channels,
        dtype=dtype,
    )
