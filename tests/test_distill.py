"""SKD: spectral norms, the distillation loss, teacher isolation, the sharded step and the experiment end to end."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs.experiments import skd as skd_config
from jaxspec import distill, models, sharding
from jaxspec.data import pipeline
from jaxspec.data.constrain import ConstrainedSource
from jaxspec.experiments import skd as skd_exp
from jaxspec.run import open_run
from jaxspec.train import batchnorm, driver, steps
from jaxspec.train.state import create_state, to_model
from tests.synthetic_embedded import use_fixture


@pytest.mark.parametrize("shape", [(3, 5, 7), (3, 9, 4), (2, 6, 6)])
def test_spectral_norm_and_its_gradient_match_numpy(shape):
    m = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    got = distill.spectral_norm(jnp.asarray(m), num_iters=300)
    np.testing.assert_allclose(got, np.linalg.norm(m, ord=2, axis=(-2, -1)), rtol=1e-5)
    # d sigma_1 / dM = u_1 v_1^T
    u, _, vt = np.linalg.svd(m)
    grad = jax.grad(lambda x: distill.spectral_norm(x, num_iters=300).sum())(jnp.asarray(m))
    np.testing.assert_allclose(grad, u[..., :, :1] * vt[..., :1, :], atol=1e-4)
    assert float(distill.spectral_norm(jnp.zeros((4, 3)))) == 0.0


def _reference(teacher, student, beta, normalize):
    """The loss written out with NumPy: per example, averaged over the batch."""
    total = 0.0
    for i, (t, s) in enumerate(zip(teacher, student)):
        n = t.shape[0]
        t, s = t.reshape(n, -1, t.shape[-1]), s.reshape(n, -1, s.shape[-1])
        fm = ((t - s) ** 2).sum(axis=(1, 2))
        sn = np.abs(np.linalg.norm(t, ord=2, axis=(1, 2)) - np.linalg.norm(s, ord=2, axis=(1, 2)))
        if normalize:
            size = t.shape[1] * t.shape[2]
            fm, sn = fm / size, sn / np.sqrt(size)
        total += beta ** (len(teacher) - 1 - i) * (fm + sn).mean()
    return total


@pytest.mark.parametrize("normalize", [True, False])
def test_distill_loss_matches_numpy_and_is_zero_for_identical_maps(normalize):
    rng = np.random.default_rng(1)
    teacher = [rng.normal(size=(4, 4, 4, 6)).astype(np.float32), rng.normal(size=(4, 8)).astype(np.float32)]
    student = [t + rng.normal(scale=0.3, size=t.shape).astype(np.float32) for t in teacher]
    got = distill.distill_loss(
        [jnp.asarray(t) for t in teacher],
        [jnp.asarray(s) for s in student],
        beta=3.0,
        num_iters=200,
        normalize=normalize,
    )
    assert float(got) == pytest.approx(_reference(teacher, student, 3.0, normalize), rel=1e-4)
    same = distill.distill_loss([jnp.asarray(t) for t in teacher], [jnp.asarray(t) for t in teacher], beta=3.0)
    assert float(same) == 0.0
    with pytest.raises(ValueError, match="beta > 1"):
        distill.distill_loss(teacher, student, beta=1.0)
    with pytest.raises(ValueError, match=r"teacher map \(4, 8\) vs student map \(4, 9\)"):
        distill.distill_loss(teacher[1:], [np.zeros((4, 9))], beta=2.0)


def test_layer_pairs_are_parsed_and_checked():
    assert distill.parse_pairs("block2, block11:block7,last_conv") == (
        ("block2", "block2"),
        ("block11", "block7"),
        ("last_conv", "last_conv"),
    )
    t = models.mobilenet_v3_small(4, rngs=nnx.Rngs(0), width_multiplier=0.5)
    s = models.mobilenet_v3_small(2, rngs=nnx.Rngs(1), width_multiplier=0.25)
    for spec, message in [
        ("block2,block7:block99", "Unknown student layer 'block99'"),
        ("logits", "Unknown teacher layer"),
        ("last_conv,block2", "not in forward order"),
    ]:
        with pytest.raises(ValueError, match=message):
            distill.make_student(s, t, distill.parse_pairs(spec), image_size=32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="No layers to distil"):
        distill.parse_pairs(" , ")


def _models():
    teacher = models.mobilenet_v3_small(6, rngs=nnx.Rngs(0), width_multiplier=0.5)
    model = models.mobilenet_v3_small(3, rngs=nnx.Rngs(1), width_multiplier=0.25)
    pairs = distill.parse_pairs("block2,last_conv,pre_logits")
    return teacher, distill.make_student(model, teacher, pairs, image_size=32, rngs=nnx.Rngs(2))


def test_gradient_reaches_only_the_student():
    teacher, student = _models()
    assert sorted(student.adapters) == ["block2>block2", "last_conv>last_conv", "pre_logits>pre_logits"]
    s_def, s_params, s_rest = nnx.split(student, nnx.Param, ...)
    t_def, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    labels = jnp.array([0, 1, 2, 0])

    @jax.jit
    def grads(sp, tp):
        def loss(sp, tp):
            s, t = nnx.merge(s_def, sp, s_rest, copy=True), nnx.merge(t_def, tp, t_rest, copy=True)
            s.eval(), t.eval()
            return distill.skd_objective(s, t, x, labels, lam=1.0, beta=2.0)[0]

        return jax.grad(loss, argnums=(0, 1))(sp, tp)

    g_student, g_teacher = grads(s_params, t_params)
    assert all(bool(jnp.all(g == 0)) for g in jax.tree.leaves(g_teacher))
    for part in ("model", "adapters"):
        assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(g_student[part])) > 0, part


def test_identical_teacher_and_student_have_zero_distillation_loss():
    teacher = models.mobilenet_v3_small(4, rngs=nnx.Rngs(0), width_multiplier=0.25)
    twin = nnx.merge(*nnx.split(teacher), copy=True)
    student = distill.make_student(
        twin, teacher, distill.parse_pairs("block2,last_conv"), image_size=32, rngs=nnx.Rngs(0)
    )
    assert len(student.adapters) == 0  # same widths: nothing to adapt
    student.eval(), teacher.eval()
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    _, (_, _, kd) = nnx.jit(lambda s, t: distill.skd_objective(s, t, x, jnp.zeros(4, jnp.int32), lam=1.0, beta=2.0))(
        student, teacher
    )
    assert float(kd) < 1e-20  # zero but for XLA fusing the two identical forward passes differently


def test_sharded_step_trains_the_student_and_leaves_the_teacher_alone():
    teacher, student = _models()
    t_def, t_state = create_state(teacher, optax.identity(), 0)
    tx = optax.adam(1e-2)
    s_def, state = distill.create_distill_state(student, t_def, t_state, tx, 0)
    mesh = sharding.make_mesh()
    state = sharding.replicate(state, mesh)
    step = steps.jit_train_step(
        distill.make_skd_train_step(
            s_def,
            t_def,
            tx,
            optax.constant_schedule(1e-2),
            mean=(0.5,),
            std=(0.25,),
            lam=1.0,
            beta=2.0,
            label_smoothing=0.1,
        ),
        mesh,
    )
    rng = np.random.default_rng(0)
    batch = sharding.put_batch(
        {
            "image": rng.integers(0, 256, (16, 32, 32, 1), dtype=np.uint8),
            "label": rng.integers(0, 3, 16).astype(np.int32),
        },
        mesh,
    )
    t_before = jax.device_get((state.teacher_params, state.teacher_stats))
    s_before = jax.device_get(state.params)
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        assert float(metrics["loss"]) == pytest.approx(float(metrics["ce"]) + 0.5 * float(metrics["distill"]), rel=1e-5)
    assert int(state.step) == 4 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert jax.tree.all(
        jax.tree.map(np.array_equal, t_before, jax.device_get((state.teacher_params, state.teacher_stats)))
    )
    assert not jax.tree.all(jax.tree.map(np.array_equal, s_before, jax.device_get(state.params)))
    assert distill.student_params(to_model(s_def, state)) == distill.student_params(_models()[1].model)


def test_draw_subset():
    a, b = skd_exp.draw_subset(30, 5, 0), skd_exp.draw_subset(30, 10, 0)
    assert len(a) == 5 and set(a) < set(b) and list(a) == sorted(a)  # one seed's subsets are nested
    assert skd_exp.draw_subset(30, 5, 1) != a
    with pytest.raises(ValueError, match="subset_size=31"):
        skd_exp.draw_subset(30, 31, 0)


@pytest.fixture(scope="module")
def tiny_runner(tmp_path_factory):
    config = use_fixture(skd_config.get_config("tiny"), str(tmp_path_factory.mktemp("raw")))
    return open_run(config, str(tmp_path_factory.mktemp("work"))), config


@pytest.mark.xdist_group("distill")  # with the next test, which restores the teacher this one trains
def test_skd_cell_end_to_end(tiny_runner, tmp_path):
    r, config = tiny_runner
    cell = {"subset_size": 4, "student": "skd", "seed": 0}
    m = skd_exp.run_cell(r, config, cell)
    hits = m.pop("model_hits")  # each test image's outcome, for comparing students image by image
    assert set(m) == {"top1", "top2", "loss", "params"} and hits.mean() == pytest.approx(m["top1"])
    assert 0 <= m["top1"] <= m["top2"] <= 1 and math.isfinite(m["loss"])
    assert m["params"] == distill.student_params(r.task.new_model(r, 4, 0))  # adapters are not deployed
    for name in ("teacher", "skd-skd-4-seed0"):
        assert (r.workdir / "checkpoints" / name).exists()
    again = skd_exp.run_cell(r, config, cell)  # finished: restored, same numbers
    assert (again.pop("model_hits") == hits).all() and again == m
    results = [{"cell": cell, "metrics": m}, {"cell": {**cell, "seed": 1}, "metrics": {**m, "top1": m["top1"] / 2}}]
    assert skd_exp.plots(r, config, results, tmp_path) == ["skd.png"] and (tmp_path / "skd.png").stat().st_size > 0
    with pytest.raises(ValueError, match="Unknown student 'giant'"):
        skd_exp.run_cell(r, config, {**cell, "student": "giant"})
    # A teacher per seed (`experiment.generalist_per_seed`), so that seeds replicate the whole pipeline.
    assert config.experiment.generalist_per_seed
    t0, t1 = (skd_exp.teacher(r, config, seed) for seed in (0, 1))
    assert (r.workdir / "checkpoints" / "teacher-seed1").exists() and skd_exp.teacher(r, config, 1) is t1
    assert not np.allclose(jax.tree.leaves(t0.state.params)[0], jax.tree.leaves(t1.state.params)[0])


@pytest.mark.xdist_group("distill")
def test_skd_students_trained_from_scratch_get_reestimated_batchnorm_statistics(tiny_runner):
    r, config = tiny_runner
    assert config.scratch.reestimate_bn  # on by default for models trained from scratch
    subset = skd_exp.draw_subset(r.info.num_classes, 4, 0)
    train, val = ConstrainedSource(r.train, subset), ConstrainedSource(r.val, subset)
    t = skd_exp.teacher(r, config, config.seed)
    raw_phase = ml_collections.ConfigDict({**config.scratch.to_dict(), "reestimate_bn": False})
    task = distill.Distillation(t.modeldef, t.state, config.skd)
    _, fixed = driver.train_phase(r, "bn-fixed", r.task.new_model(r, 4, 0), train, val, config.scratch, 0, task=task)
    student_def, raw = driver.train_phase(r, "bn-raw", r.task.new_model(r, 4, 0), train, val, raw_phase, 0, task=task)
    jax.tree.map(np.testing.assert_array_equal, fixed.params, raw.params)
    batches = pipeline.eval_iterator(train, config.data, batch_size=config.scratch.batch_size)
    expected = batchnorm.reestimate(student_def, raw, batches, mesh=r.mesh, mean=r.info.mean, std=r.info.std)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), fixed.batch_stats, expected.batch_stats
    )
    assert not all(
        np.allclose(a, b) for a, b in zip(jax.tree.leaves(fixed.batch_stats), jax.tree.leaves(raw.batch_stats))
    )


@pytest.mark.slow
def test_every_student_kind_runs(tiny_runner):
    r, config = tiny_runner
    out = {s: skd_exp.run_cell(r, config, {"subset_size": 4, "student": s, "seed": 0}) for s in skd_exp.STUDENTS}
    assert out["teacher"]["params"] > out["generalist"]["params"] > out["finetuned"]["params"]
    assert out["finetuned"]["params"] == out["scratch"]["params"] == out["skd_finetuned"]["params"]


def test_configs_build():
    for arg in ("", "tiny", "data=cifar100"):
        config = skd_config.get_config(arg)
        assert config.experiment.kind == "skd" and config.skd.beta > 1
        distill.parse_pairs(config.skd.layers)
    cifar = skd_config.get_config("data=cifar100")
    assert cifar.experiment.grid.subset_size == [20, 40, 60, 80] and cifar.skd.teacher.name == "mobilenet_v3_large"
    full, short = skd_config.get_config(""), skd_config.get_config("sizes=5+20,scale=0.5,gen_scale=0.25")
    assert short.experiment.grid.subset_size == [5, 20]
    assert short.scratch.steps == round(full.scratch.steps / 2) and short.generalist.steps == round(
        full.generalist.steps / 4
    )
    assert short.scratch.optim.warmup_steps == full.scratch.optim.warmup_steps // 2
    assert (
        short.skd.teacher_phase.steps == full.skd.teacher_phase.steps == full.generalist.steps
    )  # the teacher's recipe
    with pytest.raises(ValueError, match="gen_scale must be in"):
        skd_config.get_config("gen_scale=2")
