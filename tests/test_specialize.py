"""Extraction is exact; suppression never predicts an irrelevant class."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspec import models, specialize


def small_model(num_classes=20, seed=0):
    model = models.mobilenet_v3_small(num_classes, rngs=nnx.Rngs(seed), width_multiplier=0.25)
    model.eval()
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extracted_logits_equal_generalist_logits_at_subset(seed):
    rng = np.random.default_rng(seed)
    generalist = small_model(seed=seed)
    subset = [int(c) for c in rng.choice(20, size=rng.integers(1, 20), replace=False)]
    x = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
    before = jax.tree.map(np.asarray, nnx.state(generalist, nnx.Param, nnx.BatchStat))
    specialist = specialize.extract(generalist, subset)
    want = np.asarray(generalist(x))[:, subset]
    got = np.asarray(specialist(x))
    assert got.shape == (4, len(subset))
    # A different output width may change the matmul's summation order: allow 1e-5 relative.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert specialist.head.out_features == len(subset)
    # the generalist is untouched
    after = jax.tree.map(np.asarray, nnx.state(generalist, nnx.Param, nnx.BatchStat))
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_extract_params_on_conv_head():
    state = nnx.State(
        {"head": {"kernel": nnx.Param(jnp.arange(2 * 5.0).reshape(1, 1, 2, 5)), "bias": nnx.Param(jnp.arange(5.0))}}
    )
    out = specialize.extract_params(state, [4, 1])
    np.testing.assert_array_equal(out["head"]["kernel"][...], np.arange(10.0).reshape(1, 1, 2, 5)[..., [4, 1]])
    np.testing.assert_array_equal(out["head"]["bias"][...], [4.0, 1.0])
    assert state["head"]["kernel"][...].shape == (1, 1, 2, 5)  # pure: input unchanged


@pytest.mark.parametrize("subset, message", [([], "non-empty"), ([0, 20], "out of range"), ([1, 1], "duplicates")])
def test_extract_rejects_bad_subsets(subset, message):
    with pytest.raises(ValueError, match=message):
        specialize.extract(small_model(), subset)


def test_suppress_logits_never_predicts_irrelevant_class():
    logits = jax.random.normal(jax.random.key(0), (256, 10)) * 5
    subset = [2, 7, 3]
    out = specialize.suppress_logits(logits, subset)
    assert set(np.asarray(out.argmax(-1)).tolist()) <= set(subset)
    np.testing.assert_array_equal(out[:, subset], logits[:, subset])
    assert np.all(np.asarray(jax.nn.softmax(out))[:, [0, 1, 4, 5, 6, 8, 9]] == 0)
