"""Unit lesioning: exact silencing, ranking, held lesions under optimizers, and the experiment end to end."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import common
from configs.experiments import lesion as lesion_config
from jaxspec import methods, models, sharding
from jaxspec.analysis import lesion
from jaxspec.data.sources import ArraySource, DatasetInfo
from jaxspec.experiments import lesion as lesion_exp
from jaxspec.models import layers
from jaxspec.run import open_run
from jaxspec.train import optimizers, steps
from jaxspec.train.state import create_state, to_model
from tests.synthetic_embedded import use_fixture

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class Toy(nnx.Module):
    """Conv+BatchNorm units, mean pool, linear head: compiles in a second."""

    def __init__(self, units: int = 8, num_classes: int = 3, *, rngs: nnx.Rngs):
        self.conv = layers.ConvBN(layers.Conv1x1(3, units, rngs=rngs), units, jax.nn.hard_swish)
        self.head = nnx.Linear(units, num_classes, rngs=rngs)

    def features(self, x):
        return self.conv(x).mean(axis=(1, 2))

    def __call__(self, x, *, rngs=None):
        return self.head(self.features(x))


def _images(n, seed=0, size=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _normalized(images):
    return (images / 255.0 - np.asarray(MEAN)) / np.asarray(STD)


def _lesion_eval(model, columns, mesh, chunk=4):
    modeldef, state = create_state(model, optax.identity(), 0)
    data_cfg = common.data(image_size=8, num_threads=1, prefetch=2)
    ev = lesion.LesionEval(
        modeldef,
        state.params,
        path="conv",
        columns=columns,
        mesh=mesh,
        data_cfg=data_cfg,
        batch_size=16,
        mean=MEAN,
        std=STD,
        chunk=chunk,
    )
    return ev, sharding.replicate(state, mesh)


def test_ranking_finds_the_planted_unit_and_matches_a_direct_reference():
    planted, units = 5, 8
    model = Toy(units, rngs=nnx.Rngs(0))
    model.eval()
    images = _images(64)
    feats = np.asarray(model.features(jnp.asarray(_normalized(images), jnp.float32)))
    # Task = outputs (0, 1). Every unit gets a small random weight; the planted one a large,
    # opposite-signed pair, and the labels are the planted model's own predictions.
    w = np.random.default_rng(1).normal(0, 0.05, (units, 3)).astype(np.float32)
    w[planted, :2] = (4.0, -4.0)
    t = np.median(feats[:, planted])
    b = np.array([-4 * t, 4 * t, -100], np.float32)
    model.head.kernel.value, model.head.bias.value = jnp.asarray(w), jnp.asarray(b)
    labels = np.argmax(feats @ w[:, :2] + b[:2], -1)
    assert 20 < labels.sum() < 44  # both classes present
    info = DatasetInfo("toy", ("a", "b"), {}, MEAN, STD)
    source = ArraySource(images, labels, info)

    ev, state = _lesion_eval(model, (0, 1), sharding.make_mesh())
    intact, drops = lesion.lesion_impact(ev, state, source)

    def balanced(pred):
        return np.mean([np.mean(pred[labels == c] == c) for c in (0, 1)])

    assert intact == 1.0
    # Reference: silence unit u's pooled feature directly and apply the head in NumPy.
    for u in range(units):
        f = feats.copy()
        f[:, u] = 0.0
        assert drops[u] == pytest.approx(1.0 - balanced(np.argmax(f @ w[:, :2] + b[:2], -1)), abs=1e-9)
    assert drops[planted] > 0.3
    np.testing.assert_array_equal(lesion.top_units(drops, 1 / units), [planted])


LAYERS = ("stem", "block1", "last_conv", "pool", "pre_logits")


def _jit_intermediates(model, names):
    """(params, train: bool) -> activations at `names`, on a fixed input: one compile per mode."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))

    @functools.partial(jax.jit, static_argnums=1)
    def acts(params, train):
        m = nnx.merge(graphdef, params, rest, copy=True)
        m.train() if train else m.eval()
        return m.intermediates(x, names)

    return acts, params


def test_lesion_silences_exactly_the_units_of_mobilenet_layers():
    model = models.mobilenet_v3_small(5, rngs=nnx.Rngs(0), width_multiplier=0.25)
    acts, params = _jit_intermediates(model, LAYERS)
    units = np.array([0, 3])
    for train in (True, False):  # BatchNorm on batch statistics, and on running averages
        intact = acts(params, train)
        for layer in LAYERS:
            a = acts(lesion.lesion(params, lesion.unit_layer(model, layer), units), train)
            assert jnp.all(a[layer][..., units] == 0) and jnp.any(a[layer] != 0), (layer, train)
            if layer == "stem":  # nothing upstream changed: the other units are untouched
                keep = np.setdiff1d(np.arange(a[layer].shape[-1]), units)
                np.testing.assert_array_equal(a[layer][..., keep], intact[layer][..., keep])
    lesion.lesion(params, "last_conv", [1])
    assert jnp.all(params["last_conv"]["bn"]["scale"][...] == model.last_conv.bn.scale[...])  # input unchanged
    assert jnp.all(model.last_conv.bn.scale[...] != 0)


def test_held_lesion_releases_to_the_same_function_on_a_depthwise_layer():
    model = models.mobilenet_v3_small(5, rngs=nnx.Rngs(0), width_multiplier=0.25)
    held = lesion.hold_lesion(model, "blocks/4/depthwise", [1, 2, 7])
    released = lesion.release_lesion(held, "blocks/4/depthwise")
    assert isinstance(held.blocks[4].depthwise, lesion.HeldLesion)
    assert not isinstance(released.blocks[4].depthwise, lesion.HeldLesion)
    runs = [_jit_intermediates(m, ["block4"]) for m in (held, released, model)]
    for train in (True, False):
        h, r, intact = (acts(params, train)["block4"] for acts, params in runs)
        # The same function up to XLA's fusion order, and far from the intact one.
        np.testing.assert_allclose(h, r, rtol=1e-5, atol=1e-6 * np.abs(r).max())
        assert np.abs(h - r).max() < 1e-2 * np.abs(r - intact).max()


def test_bad_layers_and_units_are_named():
    model = models.mobilenet_v3_small(5, rngs=nnx.Rngs(0), width_multiplier=0.25)
    with pytest.raises(ValueError, match="'block2' outputs its input plus 'blocks/2/project'"):
        lesion.unit_layer(model, "block2")
    with pytest.raises(ValueError, match="'blocks/2/foo' is not a layer with units"):
        lesion.unit_layer(model, "blocks/2/foo")
    with pytest.raises(ValueError, match=r"Unit indices \[8, -1\] are out of range for a layer of 8 units"):
        lesion.lesion(nnx.state(model, nnx.Param), "stem", [0, 8, -1])
    with pytest.raises(TypeError, match="holds no lesion"):
        lesion.release_lesion(model, "stem")


def test_top_units():
    drops = np.array([0.1, 0.5, 0.0, 0.5, 0.2])
    np.testing.assert_array_equal(lesion.top_units(drops, 0.4), [1, 3])  # ties: lower index first
    np.testing.assert_array_equal(lesion.top_units(drops, 0.4, candidates=[0, 2, 4]), [4, 0])
    assert len(lesion.top_units(drops, 0.01)) == 1
    with pytest.raises(ValueError, match="fraction must be in"):
        lesion.top_units(drops, 0.0)


@pytest.mark.parametrize(
    "optim",
    [
        {"optimizer": "adamw", "weight_decay": 0.1},  # decoupled decay
        {"optimizer": "adam", "weight_decay": 0.1},
    ],
)  # L2 added to the gradient
def test_held_units_stay_exactly_zero_under_adam_and_init_units_move(optim):
    units = [1, 4]
    model = Toy(rngs=nnx.Rngs(0))  # the reference; every training starts from an equal, fresh copy
    tx, schedule = optimizers.make_optimizer(common.optimizer(lr=1e-2, **optim), 10)
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(0)
    batch = sharding.put_batch({"image": _images(16), "label": rng.integers(0, 3, 16).astype(np.int32)}, mesh)
    x = jnp.asarray(_normalized(_images(8, seed=2)), jnp.float32)

    def train(start):
        modeldef, state = create_state(start, tx, 0)
        step = steps.jit_train_step(steps.make_train_step(modeldef, tx, schedule, mean=MEAN, std=STD), mesh)
        state = sharding.replicate(state, mesh)
        for _ in range(5):
            state, metrics = step(state, batch)
        assert math.isfinite(float(metrics["loss"]))
        return to_model(modeldef, state)

    held = train(lesion.hold_lesion(Toy(rngs=nnx.Rngs(0)), "conv", units))
    bn = held.conv.inner.bn
    assert jnp.all(bn.scale[...][np.array(units)] == 0) and jnp.all(bn.bias[...][np.array(units)] == 0)
    assert not jnp.allclose(bn.scale[...], model.conv.bn.scale[...])  # the other units did train
    held.train()
    assert jnp.all(held.conv(x)[..., units] == 0)
    released = lesion.release_lesion(held, "conv")
    held.eval(), released.eval()
    np.testing.assert_array_equal(held(x), released(x))

    init = train(lesion.lesion_model(Toy(rngs=nnx.Rngs(0)), "conv", units))
    assert jnp.all(init.conv.bn.scale[...][np.array(units)] != 0)
    init.eval()
    assert jnp.any(init.conv(x)[..., units] != 0)


@pytest.fixture(scope="module")
def tiny_runner(tmp_path_factory):
    config = use_fixture(lesion_config.get_config("tiny"), str(tmp_path_factory.mktemp("raw")))
    return open_run(config, str(tmp_path_factory.mktemp("work"))), config


def test_lesion_cell_end_to_end(tiny_runner, tmp_path):
    r, config = tiny_runner
    cell = {"mode": "always", "retrain": "both", "seed": 0}
    m = lesion_exp.run_cell(r, config, cell)
    assert all(math.isfinite(v) for v in m.values()), m
    for t in ("A", "B"):
        assert m[f"delta_top1_{t}"] == pytest.approx(m[f"top1_{t}"] - m[f"top1_{t}_before"], abs=1e-9)
        assert 0 <= m[f"top1_{t}"] <= 1
    assert m["overlap"] == 0.0  # held units are silent, so never re-ranked among A's units
    assert (r.workdir / "checkpoints" / "lesion-always-both-seed0").exists()
    # lesion.layer='auto': every candidate scored on validation, the costliest to A used
    names = lesion_exp.candidates(methods.generalist(r).model)
    assert names == ["stem", "block0", "block1", "block3", "last_conv", "pre_logits"]  # block2 adds its input
    impacts = {n: m[f"layer_impact_{n}"] for n in names}
    chosen = json.loads((r.workdir / "lesion" / "layers-seed0.json").read_text())
    assert chosen["chosen"] == max(impacts, key=impacts.get) and chosen["impacts"] == pytest.approx(impacts)
    assert len(list((r.workdir / "lesion").glob("impact-*.json"))) == len(names)  # one ranking per layer
    assert lesion_exp.run_cell(r, config, cell) == m  # finished: restored, same numbers
    results = [{"cell": cell, "metrics": m}, {"cell": {**cell, "seed": 1}, "metrics": {**m, "delta_top1_A": 0.01}}]
    assert lesion_exp.plots(r, config, results, tmp_path) == ["lesion.png"]
    assert (tmp_path / "lesion.png").stat().st_size > 0
    with pytest.raises(ValueError, match="Unknown lesion mode 'sometimes'"):
        lesion_exp.run_cell(r, config, {"mode": "sometimes", "retrain": "A", "seed": 0})


@pytest.mark.slow
def test_every_condition_shares_the_numbers_before_retraining(tiny_runner):
    r, config = tiny_runner
    out = [
        lesion_exp.run_cell(r, config, {"mode": m, "retrain": t, "seed": 0})
        for m, t in (("none", "A"), ("init", "B"), ("always", "both"))
    ]
    for k in ("top1_A_before", "top1_B_before", "impact_top1_A_before", "impact_top1_B_before"):
        assert out[0][k] == out[1][k] == out[2][k], k
    assert out[2]["overlap"] == 0.0 and all(0 <= m["overlap"] <= 1 for m in out)


def test_configs_build():
    config = lesion_config.get_config()
    assert config.experiment.kind == "lesion" and config.lesion.layer == "auto"
    assert set(config.experiment.grid) == {"mode", "retrain", "seed"}
    assert lesion_config.get_config("tiny").model.width_multiplier == 0.25
    assert lesion_config.get_config("epochs=1").lesion.retrain.steps == round(config.lesion.retrain.steps / 5)
