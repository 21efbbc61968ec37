"""Loading torchvision weights reproduces torchvision's logits.

The golden files come from tests/fixtures/make_torchvision_golden.py; torch
itself is not needed here.
"""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxspec import models

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
# (arch, width the fixture was made with)
GOLDEN = (("mobilenet_v3_small", 1.0), ("mobilenet_v3_large", 0.5))


def _golden(arch: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    path = os.path.join(FIXTURES, f"torchvision_{arch}.npz")
    with np.load(path) as data:
        state = {k.removeprefix("state/"): data[k] for k in data.files if k.startswith("state/")}
        return state, data["input"], data["logits"]


def _eval_logits(model: nnx.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, x))


def _rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("depthwise", ["conv", "shift"])
@pytest.mark.parametrize("arch, width", GOLDEN)
def test_logits_match_torchvision(arch, width, depthwise):
    state, x, want = _golden(arch)
    model = models.from_torchvision(state, arch, depthwise=depthwise)
    assert model.num_classes == 10
    assert model.width_multiplier == width
    assert model.arch == arch
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(nnx.state(model)))
    assert _rel_error(_eval_logits(model, x), want) < 1e-4


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_load_torchvision_file(tmp_path, suffix):
    state, x, want = _golden("mobilenet_v3_large")
    path = tmp_path / f"weights{suffix}"
    if suffix == ".npz":
        np.savez(path, **state)
    else:
        safetensors_numpy = pytest.importorskip("safetensors.numpy")
        safetensors_numpy.save_file(state, str(path))
    model = models.load_torchvision_file(path, "mobilenet_v3_large")
    assert model.width_multiplier == 0.5
    assert _rel_error(_eval_logits(model, x), want) < 1e-4


def test_load_rejects_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match=".ckpt"):
        models.load_torchvision_file(tmp_path / "w.ckpt", "mobilenet_v3_small")


def test_pth_without_torch_explains_conversion(tmp_path):
    try:
        import torch  # noqa: F401

        pytest.skip("torch is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="npz"):
        models.load_torchvision_file(tmp_path / "w.pth", "mobilenet_v3_small")


def test_unknown_arch_lists_choices():
    state, _, _ = _golden("mobilenet_v3_large")
    with pytest.raises(ValueError, match="'mobilenet_v2'.*mobilenet_v3_small"):
        models.from_torchvision(state, "mobilenet_v2")


def test_renamed_key_is_reported():
    state, _, _ = _golden("mobilenet_v3_large")
    state["features.3.block.0.0.kernel"] = state.pop("features.3.block.0.0.weight")
    with pytest.raises(ValueError) as info:
        models.from_torchvision(state, "mobilenet_v3_large")
    message = str(info.value)
    assert "missing ['features.3.block.0.0.weight']" in message
    assert "unexpected ['features.3.block.0.0.kernel']" in message


def test_missing_classifier_is_reported():
    state, _, _ = _golden("mobilenet_v3_large")
    del state["classifier.3.weight"]
    with pytest.raises(ValueError, match="classifier.3.weight"):
        models.from_torchvision(state, "mobilenet_v3_large")


def test_wrong_arch_is_reported():
    state, _, _ = _golden("mobilenet_v3_large")
    with pytest.raises(ValueError, match="does not match"):
        models.from_torchvision(state, "mobilenet_v3_small")


def test_bad_shape_is_reported():
    state, _, _ = _golden("mobilenet_v3_large")
    state["features.2.block.1.1.running_var"] = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"features\.2\.block\.1\.1\.running_var"):
        models.from_torchvision(state, "mobilenet_v3_large")
