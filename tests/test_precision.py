"""bfloat16 activations (`dtype='bfloat16'`): same parameters, float32 statistics and outputs, results
close to float32's, and the low-precision arithmetic really happens."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxspec import models
from jaxspec.models import layers
from jaxspec.train import steps
from jaxspec.train.state import create_state

DTYPES = ("float32", "bfloat16")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _dot_operand_dtypes(fn, *args) -> set[tuple[str, ...]]:
    """The operand dtypes of every matmul in `fn`'s jaxpr, nested jaxprs included."""
    seen = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                seen.add(tuple(str(v.aval.dtype) for v in eqn.invars))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        walk(sub.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return seen


def _mobilenets():
    return {d: models.mobilenet_v3_small(5, rngs=nnx.Rngs(0), width_multiplier=0.25, dtype=d) for d in DTYPES}


def test_dtype_is_validated():
    with pytest.raises(ValueError, match="float16"):
        models.mobilenet_v3_small(5, rngs=nnx.Rngs(0), dtype="float16")
    with pytest.raises(ValueError, match="int8"):
        models.get_model("yolov5n", 2, rngs=nnx.Rngs(0), dtype=jnp.int8)
    assert layers.compute_dtype(jnp.bfloat16) == jnp.dtype("bfloat16")


def test_mobilenet_in_bfloat16_keeps_float32_parameters_and_matches_float32():
    nets = _mobilenets()
    # The dtype is a compute choice: the same seed gives the same float32 parameters (and checkpoints).
    same = jax.tree.map(np.array_equal, *(nnx.state(n, nnx.Param, nnx.BatchStat) for n in nets.values()))
    assert all(jax.tree.leaves(same))
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    out = {}
    for d, net in nets.items():
        net.eval()
        out[d] = nnx.jit(lambda m, x: m.intermediates(x, ["stem", "block5", "last_conv", "logits"]))(net, x)
    for name, act in out["bfloat16"].items():
        assert act.dtype == jnp.float32, name  # analyses and losses always see float32
        assert _rel(act, out["float32"][name]) < 0.05, name
    assert _rel(out["bfloat16"]["stem"], out["float32"]["stem"]) > 1e-4  # ...but were computed in bfloat16
    assert _dot_operand_dtypes(nets["float32"], x) == {("float32", "float32")}
    bf16_dots = _dot_operand_dtypes(nets["bfloat16"], x)
    assert ("bfloat16", "bfloat16") in bf16_dots and ("float32", "float32") in bf16_dots  # trunk, classifier


def test_bfloat16_training_tracks_float32():
    """Two SGD steps: the same losses and update direction; parameters, optimizer state and BatchNorm
    statistics stay float32.

    Per tensor, early layers' gradients differ by up to ~30% at initialisation: every activation gradient
    is rounded to bfloat16's 8 bits, and train-mode BatchNorm's backward subtracts the gradient's mean and
    its projection on the normalised input, which leaves a small difference of large, rounded terms. So the
    check is on the whole update, as training sees it.
    """
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), "label": np.arange(8) % 5}
    nets = _mobilenets()
    start = jax.tree.leaves(nnx.state(nets["float32"], nnx.Param))
    losses, moved = {}, {}
    for d, net in nets.items():
        tx = optax.sgd(0.1)
        modeldef, state = create_state(net, tx, 0)
        step = jax.jit(
            steps.make_train_step(modeldef, tx, optax.constant_schedule(0.1), mean=(0.5,) * 3, std=(0.25,) * 3)
        )
        losses[d] = []
        for _ in range(2):
            state, metrics = step(state, batch)
            losses[d].append(float(metrics["loss"]))
        moved[d] = np.concatenate([np.ravel(p - p0) for p, p0 in zip(jax.tree.leaves(state.params), start)])
        dtypes = {
            x.dtype
            for x in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)
        }
        assert dtypes == {jnp.dtype("float32")}, d
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=1e-2)
    assert losses["bfloat16"][1] < losses["bfloat16"][0]
    b, f = moved["bfloat16"], moved["float32"]
    assert b @ f / np.linalg.norm(b) / np.linalg.norm(f) > 0.99
    assert np.linalg.norm(b) == pytest.approx(np.linalg.norm(f), rel=0.05)


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_gradients_in_bfloat16(stride):
    """The custom VJP returns the input gradient in bfloat16 and the kernel gradient in float32, summed in float32."""
    x = jax.random.normal(jax.random.key(0), (6, 9, 9, 4))
    k = jax.random.normal(jax.random.key(1), (3, 3, 1, 4))
    dy = jax.random.normal(jax.random.key(2), (6, 5 if stride == 2 else 9, 5 if stride == 2 else 9, 4))
    ref = jax.vjp(lambda x, k: layers._depthwise_conv(x, k, stride, 1), x, k)
    got = jax.vjp(lambda x, k: layers._depthwise_shift(x, k, stride, 1), x.astype(jnp.bfloat16), k)
    assert got[0].dtype == jnp.bfloat16 and _rel(got[0], ref[0]) < 0.01
    dx, dk = got[1](dy.astype(jnp.bfloat16))
    rdx, rdk = ref[1](dy)
    assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.float32
    assert _rel(dx, rdx) < 0.01 and _rel(dk, rdk) < 0.01


def test_yolov5_in_bfloat16_gives_float32_outputs_close_to_float32():
    x = jax.random.uniform(jax.random.key(0), (1, 64, 64, 3))
    out = {}
    for d in DTYPES:
        net = models.get_model("yolov5n", 2, rngs=nnx.Rngs(0), dtype=d)
        net.eval()
        out[d] = nnx.jit(lambda m, x: m(x))(net, x)
    for b, f in zip(out["bfloat16"], out["float32"], strict=True):
        assert b.dtype == jnp.float32 and _rel(b, f) < 0.05


def test_config_dtype_reaches_the_model(tmp_path):
    from configs import animals
    from jaxspec import run
    from tests.synthetic_embedded import use_fixture

    config = use_fixture(animals.get_config("tiny"), str(tmp_path / "raw"), per_class=2)
    assert config.model.dtype == "float32"
    config.model.dtype = "bfloat16"
    ctx = run.open_run(config, str(tmp_path / "w"))
    model = ctx.task.new_model(ctx, 4, 0)
    assert model.dtype == jnp.bfloat16
