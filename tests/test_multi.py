"""K vmapped specialists == K separate runs (Adam, dropout, own data streams, own seeds), through the one driver."""

import pathlib
import shutil

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs.common import data as data_config
from configs.common import optimizer as optimizer_config
from configs.common import phase as phase_config
from jaxspec import models, sharding, specialize
from jaxspec.classification import Classification
from jaxspec.data import pipeline
from jaxspec.data.constrain import ConstrainedSource
from jaxspec.data.sources import ArraySource, DatasetInfo
from jaxspec.train import driver, steps
from jaxspec.train.context import RunContext
from jaxspec.train.state import create_state, stack, unstack

INFO = DatasetInfo("toy", tuple(f"c{i}" for i in range(6)), {}, (0.5,), (0.5,))
SUBSETS = ([0, 1, 2], [5, 3, 1])  # equal sizes, overlapping, out of order


def toy_source(n=96, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, n).astype(np.int32)
    images = (rng.random((n, 32, 32)) * 60 + labels[:, None, None] * 30).astype(np.uint8)
    return ArraySource(images, labels, INFO)


def specialists():
    # One generalist per specialist (same seed, same values): extracted specialists share the
    # generalist's arrays, and a donated replica on 8 devices can alias them.
    return [
        specialize.extract(
            models.mobilenet_v3_small(6, rngs=nnx.Rngs(0), width_multiplier=0.25, num_blocks=4, dropout_rate=0.5), s
        )
        for s in SUBSETS
    ]


# Adam with eps far above float32 noise: several parameters (a BatchNorm bias followed by another
# BatchNorm) have gradients that are exactly 0 in exact arithmetic and ~1e-9 in float32, which Adam's
# default eps=1e-8 would amplify to +-lr steps whose sign is set by summation order.
EPS = 1e-4


def close(a, b):
    # Different device layouts sum in different orders: float32-level differences only.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6), a, b)


@pytest.mark.slow  # step by step what test_train_specialists_equals_train_phase_and_resumes checks end to end
def test_vmapped_step_equals_separate_steps():
    src = toy_source()
    cfg = data_config(image_size=32)
    tx = optax.adam(1e-3, eps=EPS)
    seeds = (3, 11)
    one = sharding.make_mesh(jax.devices()[:1])
    singles, iters = [], []
    for model, subset, seed in zip(specialists(), SUBSETS, seeds):
        modeldef, state = create_state(model, tx, seed)
        step = steps.make_train_step(
            modeldef, tx, optax.constant_schedule(1e-3), mean=(0.5,), std=(0.5,), label_smoothing=0.1
        )
        singles.append([sharding.replicate(state, one), steps.jit_train_step(step, one)])
        iters.append(pipeline.train_iterator(ConstrainedSource(src, subset), cfg, batch_size=16, seed=seed))
    # The same streams again for the vmapped run.
    iters2 = [
        pipeline.train_iterator(ConstrainedSource(src, s), cfg, batch_size=16, seed=seed)
        for s, seed in zip(SUBSETS, seeds)
    ]
    mesh = sharding.spec_mesh(2)
    assert dict(mesh.shape) == {"spec": 2, "data": 4}
    stacked = jax.device_put(stack([s for s, _ in singles]), sharding.stacked_sharding(mesh))
    multi_step = steps.jit_stacked_train_step(step, mesh)
    for _ in range(3):
        batches = [next(it) for it in iters]
        for i, (s, fn) in enumerate(singles):
            singles[i][0], m_single = fn(s, sharding.put_batch(batches[i], one))
        stacked, m_multi = multi_step(stacked, sharding.put_batches([next(it) for it in iters2], mesh))
        np.testing.assert_allclose(m_multi["loss"][1], m_single["loss"], rtol=1e-5)
    assert np.asarray(stacked.step).tolist() == [3, 3]
    for i, (s, _) in enumerate(singles):
        close(jax.device_get(unstack(stacked, i)), jax.device_get(s))
    # Dropout and data differ per specialist: the two really trained differently.
    assert not np.allclose(
        np.asarray(stacked.params["head"]["bias"][...][0]), np.asarray(stacked.params["head"]["bias"][...][1])
    )


class _NullWriter:
    def write_scalars(self, step, scalars):
        pass

    def flush(self):
        pass


def _context(workdir, devices=None) -> RunContext:
    """A run context for training on the toy sources, without opening a dataset; on every device or on
    `devices`."""
    config = ml_collections.ConfigDict(
        {
            "data": data_config(image_size=32, num_threads=1, prefetch=2),
            "eval": {"batch_size": 16, "every_steps": 2},
            "log_every": 1,
            "checkpoint_every": 2,
        }
    )
    return RunContext(
        config=config,
        workdir=pathlib.Path(workdir),
        mesh=sharding.make_mesh(devices),
        writer=_NullWriter(),
        task=Classification(),
        train=None,
        val=None,
        test=None,
        info=INFO,
        stages=(),
        groups={},
        groupings={},
    )


def _together(workdir, models_, trains, vals, phase, seeds, names):
    members = [driver.Member(n, m, t, v, seed) for n, m, t, v, seed in zip(names, models_, trains, vals, seeds)]
    return driver.train_together(_context(workdir), members, phase)


def test_train_specialists_equals_train_phase_and_resumes(tmp_path):
    src, val = toy_source(), toy_source(48, seed=1)
    phase = phase_config(steps=3, batch_size=16, label_smoothing=0.1, optim=optimizer_config(lr=1e-3, eps=EPS))
    trains = [ConstrainedSource(src, s) for s in SUBSETS]
    vals = [ConstrainedSource(val, s) for s in SUBSETS]
    names, seeds = ["a", "b"], [1, 2]
    ref = _context(tmp_path / "ref")
    refs = [
        driver.train_phase(ref, n, m, t, v, phase, seed)
        for n, m, t, v, seed in zip(names, specialists(), trains, vals, seeds)
    ]
    got = _together(tmp_path / "multi", specialists(), trains, vals, phase, seeds, names)
    for (_, want), (_, have) in zip(refs, got):
        assert int(have.step) == 3
        close(jax.device_get(have), jax.device_get(want))
    # Its checkpoints are ordinary ones: a single run continues from them (to step 5) ...
    shutil.copytree(tmp_path / "multi", tmp_path / "multi2")
    phase.steps = 5
    cont = driver.train_phase(_context(tmp_path / "multi"), "a", specialists()[0], trains[0], vals[0], phase, 1)[1]
    # ... exactly as a vmapped continuation does for the same specialist.
    both = _together(tmp_path / "multi2", specialists(), trains, vals, phase, seeds, names)
    assert int(cont.step) == int(both[0][1].step) == 5
    close(jax.device_get(both[0][1]), jax.device_get(cont))
    # Specialists trained apart since their last common checkpoint cannot be resumed together.
    with pytest.raises(ValueError, match="'a' has no checkpoint at step 3"):
        _together(tmp_path / "multi", specialists(), trains, vals, phase, seeds, names)


def test_unequal_heads_are_grouped_and_rejected_together():
    generalist = models.mobilenet_v3_small(6, rngs=nnx.Rngs(0), width_multiplier=0.25, num_blocks=4)
    mixed = [specialize.extract(generalist, s) for s in ([0, 1], [2, 3, 4], [4, 5])]
    assert driver.group_by_structure(mixed) == [[0, 2], [1]]
    with pytest.raises(ValueError, match=r"share one architecture and head size.*\['x', 'z'\]: 2 outputs"):
        _together(
            "/nonexistent",
            mixed,
            [None] * 3,
            [None] * 3,
            phase_config(steps=1, batch_size=8, label_smoothing=0.0, optim=optimizer_config()),
            [0, 1, 2],
            ["x", "y", "z"],
        )


@pytest.mark.parametrize("k, shape", [(2, (2, 4)), (3, (1, 8)), (8, (8, 1)), (12, (4, 2))])
def test_spec_mesh_shape(k, shape):
    assert tuple(sharding.spec_mesh(k).shape.values()) == shape
