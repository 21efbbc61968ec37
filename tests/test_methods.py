"""Specialization methods: construction, freezing, suppression's loss, dustbin data, and each method end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import animals
from jaxspec import methods, models, run, specialize
from jaxspec.data.constrain import ConstrainedSource
from jaxspec.data.sources import ArraySource, DatasetInfo
from jaxspec.train import driver, freeze, steps
from jaxspec.train.state import create_state
from tests.synthetic_embedded import use_fixture


def small_model(num_classes=12, seed=0):
    model = models.mobilenet_v3_small(num_classes, rngs=nnx.Rngs(seed), width_multiplier=0.25, num_blocks=4)
    model.eval()
    return model


@nnx.jit
def _jit_call(model, x, dropout_key=None):  # a model compiled whole: eager calls compile every op
    return model(x) if dropout_key is None else model(x, rngs=nnx.Rngs(dropout=dropout_key))


def body(model):
    params = nnx.state(model, nnx.Param)
    return {
        freeze.path_str(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(params)
        if not freeze.path_str(p).startswith("head/")
    }


def test_fresh_head_keeps_body_and_replaces_head():
    parent = small_model()
    new = specialize.fresh_head(parent, 5, rngs=nnx.Rngs(7))
    assert new.head.kernel.shape == (parent.head.in_features, 5) and new.head.out_features == 5
    b0, b1 = body(parent), body(new)
    assert b0.keys() == b1.keys() and all(np.array_equal(b0[k], b1[k]) for k in b0)
    assert parent.head.kernel.shape[-1] == 12  # the parent is untouched
    again = specialize.fresh_head(parent, 5, rngs=nnx.Rngs(7))
    np.testing.assert_array_equal(np.asarray(again.head.kernel[...]), np.asarray(new.head.kernel[...]))
    with pytest.raises(ValueError, match="num_outputs"):
        specialize.fresh_head(parent, 0, rngs=nnx.Rngs(0))


def test_dustbin_head_is_subset_rows_plus_closed_form_everything_else():
    parent = small_model()
    subset, rest = [3, 0, 7], [c for c in range(12) if c not in (3, 0, 7)]
    spec = specialize.add_dustbin(parent, subset)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
    got = np.asarray(_jit_call(spec, x))
    assert got.shape == (4, 4)
    np.testing.assert_allclose(got[:, :3], np.asarray(_jit_call(parent, x))[:, subset], rtol=1e-5, atol=1e-5)
    feats = np.asarray(nnx.jit(lambda m, x: m.features(x))(parent, x), np.float64)
    w, b = np.asarray(parent.head.kernel[...], np.float64), np.asarray(parent.head.bias[...], np.float64)
    want = feats @ w[:, rest].mean(1) + np.log(np.exp(b[rest]).sum())
    np.testing.assert_allclose(got[:, 3], want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="nothing to absorb"):
        specialize.add_dustbin(parent, list(range(12)))


def test_compose_subsets_for_gradual_specialization():
    assert specialize.compose_subsets([10, 4, 7, 2], [7, 10]) == [2, 0]
    with pytest.raises(ValueError, match=r"\[5\] are not in the wider subset"):
        specialize.compose_subsets([10, 4, 7], [7, 5])


def test_freeze_patterns_and_block_ranges():
    params = nnx.state(small_model(), nnx.Param)
    labels = jax.tree_util.tree_leaves_with_path(freeze.frozen_labels(params, ["blocks:0-1", "stem/.*"]))
    frozen = {freeze.path_str(p) for p, v in labels if v == "frozen"}
    assert frozen and all(p.startswith(("blocks/0/", "blocks/1/", "stem/")) for p in frozen)
    assert any(p.startswith("blocks/1/") for p in frozen) and not any(p.startswith("blocks/2/") for p in frozen)
    head_only = {
        freeze.path_str(p)
        for p, v in jax.tree_util.tree_leaves_with_path(freeze.frozen_labels(params, freeze.HEAD_ONLY))
        if v == "trainable"
    }
    assert head_only == {"head/kernel", "head/bias"}
    with pytest.raises(ValueError, match="'blokcs/.*' matches no parameter"):
        freeze.frozen_labels(params, ["blokcs/.*"])
    with pytest.raises(ValueError, match="Empty block range"):
        freeze.frozen_labels(params, ["blocks:3-1"])
    assert freeze.parse_patterns("blocks:0-2, stem/.*") == ("blocks:0-2", "stem/.*")
    assert freeze.parse_patterns("") == ()


def _batch(n=16, num_classes=12, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.integers(0, 255, (n, 32, 32, 3)), jnp.uint8),
        "label": jnp.asarray(rng.integers(0, 4, n), jnp.int32),
    }


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_frozen_parameters_and_statistics_stay_unchanged_after_steps(freeze_bn):
    model = small_model()
    tx = freeze.freeze(optax.adamw(1e-2, weight_decay=0.1), nnx.state(model, nnx.Param), ["blocks:0-3", "stem/.*"])
    modeldef, state = create_state(model, tx, 0)
    step = jax.jit(
        steps.make_train_step(
            modeldef, tx, optax.constant_schedule(1e-2), mean=(0.5,), std=(0.5,), freeze_bn_stats=freeze_bn
        )
    )
    start = state
    for i in range(3):
        state, _ = step(state, _batch(seed=i))
    flat0 = dict((freeze.path_str(p), v) for p, v in jax.tree_util.tree_leaves_with_path(start.params))
    flat1 = dict((freeze.path_str(p), v) for p, v in jax.tree_util.tree_leaves_with_path(state.params))
    for path in flat0:
        same = np.array_equal(np.asarray(flat0[path]), np.asarray(flat1[path]))
        assert same == path.startswith(("stem/", "blocks/0/", "blocks/1/", "blocks/2/", "blocks/3/")), path
    stats_same = jax.tree.leaves(
        jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), start.batch_stats, state.batch_stats)
    )
    assert all(stats_same) == freeze_bn and (any(stats_same) == freeze_bn)


def test_suppression_loss_is_softmax_over_s_with_smoothing_only_on_s():
    model = small_model()
    cols, ls = [5, 1, 9, 2], 0.2
    tx = optax.sgd(0.0)
    modeldef, state = create_state(model, tx, 0)
    batch = _batch()
    step = steps.make_train_step(
        modeldef, tx, optax.constant_schedule(0.0), mean=(0.5,), std=(0.5,), label_smoothing=ls, columns=cols
    )
    _, metrics = jax.jit(step)(state, batch)

    # Reference: full logits with every class outside S set to SUPPRESSED; smoothing over S only.
    m = modeldef.merge(state.params, state.batch_stats)
    m.train()
    x = (np.asarray(batch["image"], np.float32) / 255 - 0.5) / 0.5
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)
    logits = np.asarray(_jit_call(m, jnp.asarray(x), key), np.float64)
    sup = np.full_like(logits, specialize.SUPPRESSED)
    sup[:, cols] = logits[:, cols]
    logp = sup - sup.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    targets = np.zeros_like(sup)
    targets[:, cols] = ls / len(cols)
    targets[np.arange(len(x)), np.asarray(cols)[np.asarray(batch["label"])]] += 1 - ls
    want = -(targets * np.where(targets > 0, logp, 0)).sum(1).mean()
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)

    def loss(params):
        mm = modeldef.merge(params, state.batch_stats)
        out = mm(jnp.asarray(x), rngs=nnx.Rngs(dropout=0))[:, np.asarray(cols)]
        return steps.cross_entropy(out, batch["label"], ls).mean()

    grad_w = np.asarray(jax.jit(jax.grad(loss))(state.params)["head"]["kernel"][...])
    outside = [c for c in range(12) if c not in cols]
    assert np.all(grad_w[:, outside] == 0) and np.any(grad_w[:, cols] != 0)


def test_dustbin_source_relabels_a_seeded_fraction_of_the_rest():
    labels = np.repeat(np.arange(6), 50).astype(np.int32)
    info = DatasetInfo("toy", tuple(f"c{i}" for i in range(6)), {}, (0.5,), (0.5,))
    src = ArraySource(np.zeros((300, 4, 4), np.uint8), labels, info)
    d = ConstrainedSource(src, [4, 1], dustbin=0.25, seed=3)
    assert len(d) == 100 + 50 and d.info.class_names == ("c4", "c1", "dustbin")
    assert np.bincount(d.labels).tolist() == [50, 50, 50]
    assert [d[i]["label"] for i in range(len(d))] == d.labels.tolist()
    same = ConstrainedSource(src, [4, 1], dustbin=0.25, seed=3)
    other = ConstrainedSource(src, [4, 1], dustbin=0.25, seed=4)
    assert np.array_equal(same.source_indices, d.source_indices)
    assert not np.array_equal(other.source_indices, d.source_indices)
    with pytest.raises(ValueError, match="dustbin fraction must be in"):
        ConstrainedSource(src, [4, 1], dustbin=1.5)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    config = use_fixture(animals.get_config("tiny"), str(tmp_path_factory.mktemp("raw")))
    for phase in (config.generalist, config.specialize, config.scratch):
        phase.steps = 4
    config.specialize.head_steps = 3
    config.checkpoint_every = 4
    config.log_every = 2
    return run.open_run(config, str(tmp_path_factory.mktemp("work")))


# The tests on `runner` share its generalist: one worker (tests/conftest.py, SCHEDULE).
SHARES_RUNNER = pytest.mark.xdist_group("methods")


@SHARES_RUNNER
@pytest.mark.parametrize("method", methods.METHODS)
def test_each_method_trains_from_the_same_generalist(runner, method):
    gen = methods.generalist(runner)
    subset = runner.subset
    t = methods.specialize_from(runner, gen, subset, method, seed=1, name=f"t-{method}")
    width = {"suppress": 30, "continued": 30, "dustbin": 11}.get(method, 10)
    assert t.model.head.kernel.shape[-1] == width and len(t.classes) == width
    assert t.num_scored == (11 if method == "dustbin" else 10)
    assert int(t.state.step) == runner.config.scratch.steps if method == "scratch" else runner.config.specialize.steps
    out = methods.evaluate_on(runner, t, ConstrainedSource(runner.test, subset))
    assert out["count"] == 40 and len(out["per_class_top1"]) == 10 and 0 <= out["top1"] <= out["top2"] <= 1
    if method == "head_then_full":  # the head-only phase left the body as the generalist had it
        head_phase = runner.workdir / "checkpoints" / "t-head_then_full-head"
        assert head_phase.exists()
        d, s = driver.train_phase(  # finished: this only restores the checkpoint
            runner,
            "t-head_then_full-head",
            specialize.fresh_head(gen.model, 10, rngs=nnx.Rngs(1)),
            ConstrainedSource(runner.train, subset),
            ConstrainedSource(runner.val, subset),
            methods._head_phase(runner.config.specialize),
            1,
        )
        b_gen, b_head = body(gen.model), body(d.merge(s.params, s.batch_stats))
        assert all(np.array_equal(b_gen[k], b_head[k]) for k in b_gen)


@SHARES_RUNNER
def test_train_together_batches_equal_specialists_and_leaves_the_rest(runner, monkeypatch):
    calls = []
    monkeypatch.setattr(
        methods.driver,
        "train_together",
        lambda ctx, members, phase: calls.append(([m.name for m in members], [m.seed for m in members])),
    )
    spec = runner.config.specialize
    (runner.workdir / "checkpoints" / "started" / "4").mkdir(parents=True)  # a run already under way
    jobs = [
        methods.Job((0, 1), "extract", 0, "a", spec),
        methods.Job((2, 3), "extract", 1, "b", spec),
        methods.Job((4, 5), "extract", 0, "c", spec),
        methods.Job((0, 1), "extract", 0, "a", spec),
        methods.Job((6, 7, 8), "extract", 0, "wide", spec),
        methods.Job((6, 7), "dustbin", 0, "bin", spec),
        methods.Job((8, 9), "extract", 0, "started", spec),
        methods.Job((0, 1), "scratch", 0, "s0", spec),
        methods.Job((2, 3), "scratch", 0, "s1", spec),
    ]
    done = methods.train_together(runner, methods.generalist(runner), jobs, max_k=2)
    # extract pairs of |S|=2 in chunks of 2 (the lone 'c' trains by itself later), then the scratch pair.
    assert calls == [(["a", "b"], [0, 1]), (["s0", "s1"], [0, 0])] and done == ["a", "b", "s0", "s1"]
    assert methods.train_together(runner, methods.generalist(runner), jobs, max_k=1) == []


@SHARES_RUNNER
def test_specialists_trained_together_are_only_restored_later(runner):
    gen, spec = methods.generalist(runner), runner.config.specialize
    jobs = [methods.Job((0, 1, 2), "extract", s, f"together-{s}", spec) for s in (0, 1)]
    assert methods.train_together(runner, gen, jobs) == ["together-0", "together-1"]
    steps_before = (runner.workdir / "checkpoints" / "together-1").stat().st_mtime_ns
    t = methods.specialize_from(runner, gen, (0, 1, 2), "extract", seed=1, name="together-1")
    assert int(t.state.step) == spec.steps and len(t.classes) == 3
    assert (runner.workdir / "checkpoints" / "together-1").stat().st_mtime_ns == steps_before  # nothing saved
