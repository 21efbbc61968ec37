"""Loads torchvision MobileNetV3 weights into the NNX model.

Torch is optional: state dicts arrive as NumPy arrays, and only reading a
`.pth` file needs torch installed. Width multiplier, number of classes and
input channels are read off the weight shapes, so any torchvision
`mobilenet_v3_{small,large}(width_mult=..., num_classes=...)` round-trips.
"""

import os
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.models import layers
from jaxspec.models import mobilenet_v3 as mnv3

SUFFIXES = (".pth", ".pt", ".safetensors", ".npz")  # what `load_torchvision_file` reads
_REQUIRED = ("features.0.0.weight", "classifier.0.weight", "classifier.3.weight")

_Transform = Callable[[np.ndarray], np.ndarray]
_Entries = dict[str, tuple[nnx.Variable, _Transform]]


def _conv(w: np.ndarray) -> np.ndarray:
    """OIHW -> HWIO; depthwise (C, 1, k, k) -> (k, k, 1, C)."""
    return w.transpose(2, 3, 1, 0)


def _linear(w: np.ndarray) -> np.ndarray:
    """(out, in) -> (in, out)."""
    return w.T


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _bn_entries(prefix: str, bn: layers.BatchNorm) -> _Entries:
    return {
        f"{prefix}.weight": (bn.scale, _same),
        f"{prefix}.bias": (bn.bias, _same),
        f"{prefix}.running_mean": (bn.mean, _same),
        f"{prefix}.running_var": (bn.var, _same),
    }


def _conv_bn_entries(prefix: str, block: layers.ConvBN) -> _Entries:
    return {f"{prefix}.0.weight": (block.conv.kernel, _conv), **_bn_entries(f"{prefix}.1", block.bn)}


def _variable_map(model: mnv3.MobileNetV3) -> _Entries:
    """torchvision state-dict key -> (our variable, layout transform)."""
    entries = _conv_bn_entries("features.0", model.stem)
    for i, block in enumerate(model.blocks):
        # torchvision numbers only the sub-layers a block actually has.
        parts = [block.expand, block.depthwise, block.se, block.project]
        for j, part in enumerate(p for p in parts if p is not None):
            prefix = f"features.{i + 1}.block.{j}"
            if isinstance(part, layers.SqueezeExcite):
                for fc in ("fc1", "fc2"):
                    conv = getattr(part, fc)
                    entries[f"{prefix}.{fc}.weight"] = (conv.kernel, _conv)
                    entries[f"{prefix}.{fc}.bias"] = (conv.bias, _same)
            else:
                entries.update(_conv_bn_entries(prefix, part))
    entries.update(_conv_bn_entries(f"features.{len(model.blocks) + 1}", model.last_conv))
    for prefix, linear in (("classifier.0", model.hidden), ("classifier.3", model.head)):
        entries[f"{prefix}.weight"] = (linear.kernel, _linear)
        entries[f"{prefix}.bias"] = (linear.bias, _same)
    return entries


def _shape_mismatches(entries: _Entries, state_dict: Mapping[str, np.ndarray]) -> list[str]:
    out = []
    for key, (var, transform) in entries.items():
        want = var.value.shape
        # A zero-strided view: checks the layout without copying weights.
        view = np.broadcast_to(np.float32(0), state_dict[key].shape)
        got = transform(view).shape
        if got != want:
            out.append(f"{key}: expected {want} (our layout), got {got}")
    return out


def from_torchvision(
    state_dict: Mapping[str, np.ndarray],
    arch: str,
    *,
    rngs: nnx.Rngs | None = None,
    dropout_rate: float = 0.2,
    depthwise: layers.DepthwiseImpl = "auto",
    dtype="float32",
) -> mnv3.MobileNetV3:
    """Builds a `MobileNetV3` from a torchvision state dict of NumPy arrays.

    The model is returned in its constructed (train) mode, as torch does;
    call `.eval()` for inference. `rngs` seeds only dropout; `dtype` is the
    activation dtype (the weights stay float32).
    """
    mnv3.check_arch(arch)
    state = {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"State dict is not a torchvision {arch}: missing {missing}.")
    num_classes = state["classifier.3.weight"].shape[0]
    in_channels = state["features.0.0.weight"].shape[1]
    # The hidden classifier width is make_divisible(base * width), the finest
    # readout of the width; try the nearest multiple of 0.05 first since
    # that is how widths are usually chosen.
    base = mnv3.arch_config(arch).last_channel
    ratio = state["classifier.0.weight"].shape[0] / base
    kwargs = dict(dropout_rate=dropout_rate, depthwise=depthwise, in_channels=in_channels, dtype=dtype)
    widths = list(dict.fromkeys((round(ratio * 20) / 20, round(ratio, 4))))
    # Every parameter and statistic comes from the state dict, so build the
    # model abstractly (eager random init costs seconds) and fill it in.
    for width in widths:
        model = nnx.eval_shape(
            lambda width=width: mnv3.MobileNetV3(arch, num_classes, rngs=nnx.Rngs(0), width_multiplier=width, **kwargs)
        )
        entries = _variable_map(model)
        unexpected = sorted(set(state) - set(entries))
        missing = sorted(set(entries) - set(state))
        if unexpected or missing:
            raise ValueError(
                f"State dict does not match torchvision {arch}: missing {missing}, unexpected {unexpected}."
            )
        mismatches = _shape_mismatches(entries, state)
        if not mismatches:
            break
    else:
        raise ValueError(
            f"No width multiplier of {arch} fits these weights (tried "
            f"{widths}); mismatched shapes:\n  " + "\n  ".join(mismatches)
        )

    for key, (var, transform) in entries.items():
        var.value = jnp.asarray(transform(state[key]), jnp.float32)
    # Dropout's RNG stream is the only state left abstract.
    model.dropout = nnx.Dropout(dropout_rate, rngs=rngs or nnx.Rngs(0))
    return model


def _read_pth(path: str) -> dict[str, np.ndarray]:
    try:
        import torch  # optional dependency
    except ImportError as e:
        raise ImportError(
            f"Reading {path} needs torch, which is not installed. Convert it "
            'where torch is available, e.g.\n  python -c "import torch, numpy '
            "as np; sd = torch.load('in.pth', map_location='cpu'); "
            "np.savez('out.npz', **{k: v.numpy() for k, v in sd.items()})\"\n"
            "and load the .npz (or save a .safetensors) instead."
        ) from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in state.items()}


def load_torchvision_file(path: str | os.PathLike, arch: str, **kwargs) -> mnv3.MobileNetV3:
    """Reads a `.pth`, `.safetensors` or `.npz` state dict; see
    `from_torchvision` for `kwargs`."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pth", ".pt"):
        state = _read_pth(path)
    elif ext == ".safetensors":
        from safetensors import numpy as st_numpy  # optional dependency

        state = st_numpy.load_file(path)
    elif ext == ".npz":
        with np.load(path) as data:
            state = dict(data)
    else:
        raise ValueError(f"Unsupported weight file {path!r}: expected .pth, .pt, .safetensors or .npz.")
    return from_torchvision(state, arch, **kwargs)
