"""Image classifiers (loadable from torchvision weights) and YOLOv5 detectors in Flax NNX."""

import functools

from flax import nnx

from jaxspec.models.mobilenet_v3 import (
    MobileNetV3,
    block_count,
    mobilenet_v3_large,
    mobilenet_v3_small,
)
from jaxspec.models.torchvision import from_torchvision, load_torchvision_file
from jaxspec.models.yolov5 import YOLOv5, YOLOv5Classifier, yolov5

_FACTORIES = {
    "mobilenet_v3_small": mobilenet_v3_small,
    "mobilenet_v3_large": mobilenet_v3_large,
    **{f"yolov5{s}": functools.partial(yolov5, s) for s in "nsmlx"},
    **{f"yolov5{s}-cls": functools.partial(YOLOv5Classifier, s) for s in "nsmlx"},
}


def get_model(name: str, num_classes: int, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    """Builds a model by name, e.g. from a config string."""
    if name not in _FACTORIES:
        raise ValueError(f"Unknown model {name!r}; choose from {sorted(_FACTORIES)}.")
    return _FACTORIES[name](num_classes, rngs=rngs, **kwargs)


def describe(model: nnx.Module) -> dict:
    """The constructor arguments that rebuild `model`'s structure (see `from_spec`), read off the model itself."""
    if isinstance(model, MobileNetV3):
        # The head's width, not `num_classes`: an extracted specialist keeps its generalist's attribute.
        spec = {
            "name": model.arch,
            "num_classes": model.head.out_features,
            "width_multiplier": model.width_multiplier,
            "dropout_rate": model.dropout.rate,
        }
        # Only a truncated network says so: the whole one's spec (and every checkpoint fingerprint) is unchanged.
        if model.num_blocks != block_count(model.arch):
            spec["num_blocks"] = model.num_blocks
        return spec
    if isinstance(model, YOLOv5):
        return {"name": f"yolov5{model.scale}", "num_classes": model.num_classes}
    if isinstance(model, YOLOv5Classifier):
        return {"name": f"yolov5{model.scale}-cls", "num_classes": model.head.out_features}
    raise TypeError(f"Cannot describe a {type(model).__name__}; expected a MobileNetV3 or a YOLOv5 (classifier)")


def from_spec(spec: dict, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    """A freshly initialized model of the structure `describe` recorded in `spec`."""
    args = {k: spec[k] for k in ("width_multiplier", "num_blocks", "dropout_rate") if k in spec}
    return get_model(spec["name"], spec["num_classes"], rngs=rngs, **args, **kwargs)


__all__ = [
    "MobileNetV3",
    "YOLOv5",
    "YOLOv5Classifier",
    "describe",
    "from_spec",
    "from_torchvision",
    "get_model",
    "load_torchvision_file",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "yolov5",
]
