"""BatchNorm re-estimation: the running statistics become the final weights' batch statistics."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs.common import optimizer
from jaxspec import models, sharding
from jaxspec.data.pipeline import normalize
from jaxspec.train import batchnorm, optimizers, steps
from jaxspec.train.state import create_state, to_model

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n).astype(np.int32)
    images = rng.integers(0, 120, (n, 32, 32, 3)) + 25 * labels[:, None, None, None]  # learnable
    return images.astype(np.uint8), labels


def _trained(mesh, images, labels, num_steps=5):
    model = models.mobilenet_v3_small(5, rngs=nnx.Rngs(0), width_multiplier=0.25, num_blocks=4, dropout_rate=0.0)
    tx, schedule = optimizers.make_optimizer(optimizer(lr=3e-2), num_steps)
    modeldef, state = create_state(model, tx, 0)
    state = sharding.replicate(state, mesh)
    step = steps.jit_train_step(steps.make_train_step(modeldef, tx, schedule, mean=MEAN, std=STD), mesh)
    batch = sharding.put_batch({"image": images, "label": labels}, mesh)
    for _ in range(num_steps):
        state, _ = step(state, batch)
    return modeldef, state


@pytest.fixture(scope="module")
def trained():
    """A model trained 5 steps on one batch, its running statistics still far from the batch's."""
    mesh = sharding.make_mesh()
    images, labels = _data()
    modeldef, state = _trained(mesh, images, labels)
    return mesh, images, modeldef, state


@nnx.jit
def _forward(model, x):  # one compile per mode, where eager calls compile every op
    return model(x)


def test_a_model_trained_from_scratch_scores_with_reestimated_statistics_as_with_batch_statistics(trained):
    mesh, images, modeldef, state = trained
    x = normalize(images, MEAN, STD)

    batch_mode = to_model(modeldef, state)
    batch_mode.train()  # statistics of this (large) batch
    want = np.asarray(_forward(batch_mode, x))
    stale = to_model(modeldef, state)
    stale.eval()
    before = np.abs(np.asarray(_forward(stale, x)) - want).max()

    fixed = batchnorm.reestimate(modeldef, state, [{"image": images}], mesh=mesh, mean=MEAN, std=STD)
    model = to_model(modeldef, fixed)
    model.eval()
    got = np.asarray(_forward(model, x))
    # Equal up to the running variance's unbiased n / (n - 1), which matters only for 1x1 maps (n = 64).
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05 * np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95
    assert np.abs(got - want).max() < before / 10  # the running averages really were stale
    assert jax.tree.leaves(fixed.params)[0] is jax.tree.leaves(state.params)[0]  # weights untouched


def test_several_batches_give_the_mean_of_their_statistics_and_padded_batches_are_skipped(trained):
    mesh, images, modeldef, state = trained
    a, b = images[:32], images[32:]
    one = [
        batchnorm.reestimate(modeldef, state, [{"image": x}], mesh=mesh, mean=MEAN, std=STD).batch_stats for x in (a, b)
    ]
    padded = {"image": a, "mask": np.arange(32) < 20}
    both = batchnorm.reestimate(
        modeldef, state, [{"image": a}, padded, {"image": b}], mesh=mesh, mean=MEAN, std=STD
    ).batch_stats
    for got, x, y in zip(jax.tree.leaves(both), jax.tree.leaves(one[0]), jax.tree.leaves(one[1])):
        np.testing.assert_allclose(got, (np.asarray(x) + np.asarray(y)) / 2, rtol=1e-5, atol=1e-6)


def test_a_mask_that_is_not_one_flag_per_image_is_an_error():
    mesh = sharding.make_mesh()
    images, labels = _data(32)
    modeldef, state = _trained(mesh, images, labels, num_steps=1)
    boxes = {"image": images, "mask": np.ones((32, 8), bool)}  # a detection batch's box rows
    with pytest.raises(ValueError, match="one flag per image"):
        batchnorm.reestimate(modeldef, state, [boxes], mesh=mesh, mean=MEAN, std=STD)
