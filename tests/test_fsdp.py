"""FSDP on 8 fake CPU devices: the state split over `fsdp`, the same training as pure data parallel."""

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs.common import optimizer as optimizer_config
from jaxspec import models, sharding
from jaxspec.train import driver, optimizers, steps
from jaxspec.train.state import create_state


@pytest.mark.parametrize(
    "shape, n, want",
    [
        ((3, 3, 16, 64), 8, P(None, None, None, "fsdp")),  # the largest axis
        ((64, 64), 8, P(None, "fsdp")),  # ties: the last
        ((96, 40), 8, P("fsdp")),  # 96 = 12 x 8, 40 = 5 x 8: the larger one
        ((100, 36), 8, P()),  # no axis divisible by 8
        ((12, 256), 8, P(None, "fsdp")),
        ((16,), 8, P()),  # small: stays whole
        ((), 8, P()),
        ((512, 512), 1, P()),  # no fsdp axis
    ],
)
def test_fsdp_spec(shape, n, want):
    assert sharding.fsdp_spec(shape, n) == want


@pytest.mark.parametrize("n,devices,want", [(1, 8, 8), (8, 8, 8), (9, 8, 16), (500, 8, 504), (7, 1, 7)])
def test_fill_devices_rounds_up_to_whole_device_slices(n, devices, want):
    assert sharding.fill_devices(n, devices) == want


def test_make_mesh_axes_and_errors():
    assert sharding.make_mesh().shape == {"data": 8}
    assert sharding.make_mesh(fsdp=4).shape == {"data": 2, "fsdp": 4}
    assert sharding.make_mesh(fsdp=-1).shape == {"data": 1, "fsdp": 8}
    for bad in (3, 0, -2, 16):
        with pytest.raises(ValueError, match=f"fsdp={bad}"):
            sharding.make_mesh(fsdp=bad)


def test_run_mesh_takes_every_device_or_the_first_n():
    from configs.common import sharding as sharding_config

    assert sharding.run_mesh(sharding_config()).shape == {"data": 8}
    two = sharding.run_mesh(sharding_config(devices=2, fsdp=2))
    assert two.shape == {"data": 1, "fsdp": 2} and list(two.devices.flat) == jax.devices()[:2]
    assert list(sharding.run_mesh(sharding_config(devices=1)).devices.flat) == jax.devices()[:1]
    for bad in (9, -1, 2.0):
        with pytest.raises(ValueError, match=rf"sharding.devices={bad!r} must be 0 \(every device\) or 1..8"):
            sharding.run_mesh(ml_collections.ConfigDict({"fsdp": 1, "devices": bad}))
    with pytest.raises(ValueError, match="sharding.fsdp=4 must be -1 .* divisor of the 2 devices"):
        sharding.run_mesh(sharding_config(devices=2, fsdp=4))


def test_batch_split_over_every_device():
    mesh = sharding.make_mesh(fsdp=4)
    batch = sharding.put_batch({"x": np.arange(16)}, mesh)["x"]
    rows = sorted(tuple(np.asarray(s.data)) for s in batch.addressable_shards)
    assert rows == [(2 * i, 2 * i + 1) for i in range(8)]


def small_state(tx):
    model = models.mobilenet_v3_small(5, rngs=nnx.Rngs(0), width_multiplier=0.25, depthwise="conv")
    return create_state(model, tx, seed=0)


def test_state_split_cuts_memory_per_device():
    tx, _ = optimizers.make_optimizer(optimizer_config(optimizer="adam", lr=1e-3), 10)
    _, state = small_state(tx)
    mesh = sharding.make_mesh(fsdp=8)
    placed = sharding.place_state(state, mesh)
    leaves = jax.tree.leaves(placed)
    split = [x for x in leaves if not x.sharding.is_fully_replicated]
    assert all(x.size >= sharding.FSDP_MIN_SIZE for x in split)
    assert sum(x.nbytes for x in split) > 0.75 * sum(x.nbytes for x in leaves)
    for x in leaves:  # each device holds 1/8 of a split array, all of the others
        assert {s.data.nbytes for s in x.addressable_shards} == {
            x.nbytes if x.sharding.is_fully_replicated else x.nbytes // 8
        }
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state, placed)


def test_fsdp_step_equals_data_parallel_step():
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, 5, 16).astype(np.int32),
        }
        for _ in range(3)
    ]
    # SGD: its update is linear in the gradient, so float-level differences in reductions stay float-level.
    tx, schedule = optimizers.make_optimizer(optimizer_config(optimizer="sgd", lr=0.05, momentum=0.9), 10)
    modeldef, state0 = small_state(tx)
    step = steps.make_train_step(modeldef, tx, schedule, mean=(0.5,), std=(0.5,), label_smoothing=0.1)
    eval_step = steps.make_eval_step(modeldef, mean=(0.5,), std=(0.5,), num_classes=5)
    test = {**batches[0], "mask": np.ones(16, bool)}
    results = {}
    for fsdp in (1, 4):  # (8,) data parallel; (2, 4): batch over both axes, state split 4 ways
        mesh = sharding.make_mesh(fsdp=fsdp)
        state = sharding.place_state(state0, mesh)
        shardings = sharding.state_shardings(state, mesh)
        train_step = steps.jit_train_step(step, mesh, shardings)
        for batch in batches:
            state, metrics = train_step(state, sharding.put_batch(batch, mesh))
        # the step keeps the state where it was: split arrays stay split, with no gather to one device
        jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding.spec, s.spec), state, shardings)
        # evaluated where it lies (jit_eval_step's default), split or not
        results[fsdp] = jax.device_get(
            (state, metrics, steps.jit_eval_step(eval_step, mesh)(state, sharding.put_batch(test, mesh)))
        )
    assert sum(s.spec != P() for s in jax.tree.leaves(shardings)) > 20
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), results[1], results[4])
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), results[4][0].params, jax.device_get(state0.params))
    assert max(jax.tree.leaves(moved)) > 1e-2


# config.sharding.fsdp through open_run and the driver is also the SKD test's below (default suite), and the
# classification step split over 'fsdp' is test_fsdp_step_equals_data_parallel_step's.
@pytest.mark.slow
def test_runner_trains_the_same_with_config_sharding_fsdp(tmp_path):
    """`config.sharding.fsdp` reaches the run: the state stays split through training and checkpointing."""
    from configs import animals
    from jaxspec import run
    from jaxspec.data.constrain import ConstrainedSource
    from tests.synthetic_embedded import use_fixture

    out = {}
    for fsdp in (1, 4):
        config = use_fixture(animals.get_config("tiny"), str(tmp_path / "raw"), per_class=8)
        config.sharding.update(fsdp=fsdp, devices=0)  # every fake device: this is the sharded path
        config.specialize.steps, config.specialize.optim.optimizer = 3, "sgd"
        r = run.open_run(config, str(tmp_path / f"w{fsdp}"))
        assert r.mesh.shape == ({"data": 8} if fsdp == 1 else {"data": 2, "fsdp": 4})
        model = r.task.new_model(r, r.info.num_classes, 0)
        src = ConstrainedSource(r.train, range(r.info.num_classes))
        _, state = driver.train_phase(r, "p", model, src, None, config.specialize, 0)
        split = [x for x in jax.tree.leaves(state.params) if not x.sharding.is_fully_replicated]
        assert bool(split) == (fsdp > 1)
        out[fsdp] = jax.device_get(state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), out[1], out[4])


def test_skd_students_train_through_the_driver_under_fsdp_and_freeze(tmp_path):
    """An SKD student is a phase like any other: `sharding.fsdp` splits its state (teacher included) with the
    same result, and `phase.freeze` (named as for the plain student) keeps those parameters exactly."""
    from configs.experiments import skd as skd_config
    from jaxspec import distill, run
    from jaxspec.data.constrain import ConstrainedSource
    from tests.synthetic_embedded import use_fixture

    out = {}
    for fsdp in (1, 4):
        config = use_fixture(skd_config.get_config("tiny"), str(tmp_path / "raw"), per_class=8)
        config.sharding.update(fsdp=fsdp, devices=0)  # every fake device: this is the sharded path
        phase = config.scratch
        phase.steps, phase.batch_size, phase.optim.optimizer = 3, 16, "sgd"
        phase.freeze, phase.reestimate_bn = "blocks:0-1", False
        ctx = run.open_run(config, str(tmp_path / f"w{fsdp}"))
        t = config.skd.teacher
        teacher = models.get_model(t.name, ctx.info.num_classes, rngs=nnx.Rngs(5), width_multiplier=t.width_multiplier)
        teacher_def, teacher_state = create_state(teacher, optax.identity(), 5)
        subset = (0, 1, 2, 3)
        student = ctx.task.new_model(ctx, len(subset), 0)
        start = jax.device_get(nnx.state(student, nnx.Param))
        _, state = driver.train_phase(
            ctx,
            "student",
            student,
            ConstrainedSource(ctx.train, subset),
            None,
            phase,
            0,
            task=distill.Distillation(teacher_def, teacher_state, config.skd),
        )
        split = [x for x in jax.tree.leaves((state.params, state.teacher_params)) if not x.sharding.is_fully_replicated]
        assert bool(split) == (fsdp > 1)
        params = jax.device_get(state.params)
        for block in (0, 1):
            jax.tree.map(np.testing.assert_array_equal, params["model"]["blocks"][block], start["blocks"][block])
        assert not np.array_equal(
            params["model"]["blocks"][2]["project"]["conv"]["kernel"], start["blocks"][2]["project"]["conv"]["kernel"]
        )
        out[fsdp] = params
        ctx.writer.close()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), out[1], out[4])
