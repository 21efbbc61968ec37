"""Linear CKA: full batch against NumPy, invariances, unbiased minibatch HSIC, sharded model passes."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common
from jaxspec import models, sharding
from jaxspec.analysis import cka, features
from jaxspec.data.sources import ArraySource, DatasetInfo


def np_cka(x, y):
    """Kornblith et al.'s feature-space form, float64: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    x = np.asarray(x, np.float64) - np.mean(x, 0)
    y = np.asarray(y, np.float64) - np.mean(y, 0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def np_hsic1(x, y):
    """Song et al. 2012's unbiased HSIC of linear kernels, written out in NumPy."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    k, m = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0)
    np.fill_diagonal(m, 0)
    n, one = len(k), np.ones(len(k))
    return (
        np.trace(k @ m) + (one @ k @ one) * (one @ m @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ k @ m @ one
    ) / (n * (n - 3))


def u_statistic_hsic(x, y):
    """HSIC as the U-statistic over all ordered 4-tuples of distinct examples (brute force)."""
    k, m = x @ x.T, y @ y.T
    total = [
        k[i, j] * m[i, j] + k[i, j] * m[q, r] - 2 * k[i, j] * m[i, q]
        for i, j, q, r in itertools.permutations(range(len(x)), 4)
    ]
    return np.mean(total)


def correlated(rng, n, p=6, q=9, noise=1.0):
    x = rng.normal(size=(n, p))
    return x, x @ rng.normal(size=(p, q)) + noise * rng.normal(size=(n, q))


@pytest.mark.parametrize("n,p", [(40, 6), (12, 50)])  # more examples than features, and fewer
def test_full_batch_matches_numpy(n, p):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, p)) + 2.0
    y = np.tanh(x @ rng.normal(size=(p, 7))) + 0.3 * rng.normal(size=(n, 7))
    z = rng.normal(size=(n, 3))
    np.testing.assert_allclose(float(cka.linear_cka(x, y)), np_cka(x, y), rtol=1e-4)
    got = cka.cka_matrix([x, y], [y, z, x])
    want = [[np_cka(a, b) for b in (y, z, x)] for a in (x, y)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_invariances_and_self_similarity():
    rng = np.random.default_rng(1)
    x, y = correlated(rng, 50)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    base = float(cka.linear_cka(x, y))
    assert 0.1 < base < 0.99
    np.testing.assert_allclose(float(cka.linear_cka(x @ q, y)), base, rtol=1e-5)  # orthogonal
    np.testing.assert_allclose(float(cka.linear_cka(7.5 * x, 0.02 * y)), base, rtol=1e-5)  # isotropic scaling
    np.testing.assert_allclose(float(cka.linear_cka(x + 3.0, y)), base, rtol=1e-5)  # translation
    np.testing.assert_allclose(float(cka.linear_cka(x, x)), 1.0, rtol=1e-6)
    # ...but not invariant to anisotropic scaling, so the checks above can fail
    assert abs(float(cka.linear_cka(x * np.array([10.0, 1, 1, 1, 1, 0.1]), y)) - base) > 1e-2


def test_hsic1_is_the_unbiased_u_statistic_and_skips_padding():
    rng = np.random.default_rng(2)
    x, y = correlated(rng, 8, p=3, q=2)
    x += 4.0  # uncentered features: HSIC_1 must not depend on centering
    h = np.asarray(cka.hsic1([jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)]))
    np.testing.assert_allclose(h[0, 1], u_statistic_hsic(x, y), rtol=1e-4)
    np.testing.assert_allclose(h[0, 1], np_hsic1(x, y), rtol=1e-4)
    np.testing.assert_allclose(h[0, 0], np_hsic1(x, x), rtol=1e-4)
    np.testing.assert_allclose(h, h.T, rtol=1e-6)
    # padded rows (mask False) are left out exactly, whatever they hold
    xp = np.concatenate([x, 100 * rng.normal(size=(3, 3))])
    yp = np.concatenate([y, 100 * rng.normal(size=(3, 2))])
    mask = np.arange(11) < 8
    hp = np.asarray(cka.hsic1([jnp.asarray(xp, jnp.float32), jnp.asarray(yp, jnp.float32)], jnp.asarray(mask)))
    np.testing.assert_allclose(hp, h, rtol=1e-4)


def test_hsic_step_weights_batches_by_size_and_skips_tiny_ones():
    step = jax.jit(cka.make_hsic_step(lambda _, b: [[b["image"]], [jnp.tanh(b["image"][:, :2])]]))
    x = np.random.default_rng(4).normal(size=(8, 3)).astype(np.float32)
    for real in (5, 3):
        mask = np.arange(8) < real
        out = step(None, {"image": jnp.asarray(x), "mask": jnp.asarray(mask)})
        if real < cka.MIN_BATCH:
            assert float(out["count"]) == 0 and not np.asarray(out["hsic"]).any()
        else:
            assert float(out["count"]) == real
            want = real * np_hsic1(x[:real], np.tanh(x[:real, :2]))
            np.testing.assert_allclose(np.asarray(out["hsic"])[0, 1], want, rtol=1e-4)


def _minibatch_cka(xs, ys):
    """Nguyen et al.'s estimator over batches xs, ys [k, n, d] with the library's jitted HSIC_1."""
    h = jax.jit(jax.vmap(lambda a, b: cka.hsic1([a, b])))(jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.float32))
    return cka.cka_from_hsic(np.asarray(h).sum(0))[0, 1]


def test_minibatch_estimator_is_unbiased_and_converges():
    rng = np.random.default_rng(3)
    p, q, n = 5, 4, 10
    a = rng.normal(size=(p, q))
    # population values for x ~ N(0, I), y = x a + e, e ~ N(0, I): HSIC = ||a||_F^2
    hsic_true = np.sum(a**2)
    cka_true = hsic_true / (np.sqrt(p) * np.linalg.norm(a.T @ a + np.eye(q)))

    k = 2000
    x = rng.normal(size=(k, n, p))
    y = x @ a + rng.normal(size=(k, n, q))
    h = np.asarray(jax.vmap(lambda u, v: cka.hsic1([u, v]))(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
    per_batch = h[:, 0, 1]
    se = per_batch.std() / np.sqrt(k)
    assert abs(per_batch.mean() - hsic_true) < 4 * se  # unbiased at n = 10
    np.testing.assert_allclose(per_batch[:20], [np_hsic1(u, v) for u, v in zip(x[:20], y[:20])], rtol=1e-3)
    # the biased per-batch HSIC (Gretton's tr(KHLH)/(n-1)^2) is off by far more at this batch size
    biased = [np.sum(np.cov(u.T, v.T)[:p, p:] ** 2) for u, v in zip(x, y)]
    assert abs(np.mean(biased) - hsic_true) > 10 * se

    # More batches: minibatch CKA -> the population value and the full-batch CKA of all the data
    errors, gaps = [], []
    for m in (10, 100, 2000):
        mb = _minibatch_cka(x[:m], y[:m])
        full = np_cka(x[:m].reshape(-1, p), y[:m].reshape(-1, q))
        errors.append(abs(mb - cka_true))
        gaps.append(abs(mb - full))
    assert errors[-1] < 0.01 and gaps[-1] < 0.01
    assert errors[-1] < errors[0] and gaps[-1] < gaps[0]
    # whereas full-batch CKA of one small batch, averaged over batches, stays biased
    small = np.mean([np_cka(u, v) for u, v in zip(x[:500], y[:500])])
    assert abs(small - cka_true) > 5 * errors[-1]


INFO = DatasetInfo("toy", tuple(f"c{i}" for i in range(4)), {}, (0.5,), (0.25,))


@pytest.fixture(scope="module")
def toy():
    """Two tiny MobileNets and 70 random 32x32 grayscale images (batches of 32, 32 and a partial 6)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (70, 32, 32), dtype=np.uint8)
    source = ArraySource(images, rng.integers(0, 4, 70), INFO)
    a = models.mobilenet_v3_small(4, rngs=nnx.Rngs(0), width_multiplier=0.25)
    b = models.mobilenet_v3_small(3, rngs=nnx.Rngs(1), width_multiplier=0.25)
    data_cfg = common.data(num_threads=1, prefetch=4)
    return a, b, source, data_cfg


LAYERS = ["stem", "block2", "block7", "pool", "logits"]


def _kw(data_cfg, mesh, **extra):
    return dict(
        layers_a=LAYERS,
        layers_b=LAYERS[1:],
        mesh=mesh,
        data_cfg=data_cfg,
        batch_size=32,
        mean=INFO.mean,
        std=INFO.std,
        **extra,
    )


def test_minibatch_cka_of_models_matches_numpy_and_one_device(toy):
    a, b, source, data_cfg = toy
    mesh8 = sharding.make_mesh()
    assert mesh8.devices.size == 8
    got = cka.minibatch_cka(a, b, source, seed=5, **_kw(data_cfg, mesh8))
    one = cka.minibatch_cka(a, b, source, seed=5, **_kw(data_cfg, sharding.make_mesh(jax.devices()[:1])))
    np.testing.assert_allclose(got["cka"], one["cka"], rtol=1e-4, atol=1e-6)

    # Reference: the same examples in the same shuffled order, batched alike, HSIC_1 in NumPy.
    acts_a, acts_b = features.collect(
        [a, b],
        [LAYERS, LAYERS[1:]],
        features.shuffled(source, 5),
        mesh=mesh8,
        data_cfg=data_cfg,
        batch_size=32,
        mean=INFO.mean,
        std=INFO.std,
    )
    mats = [acts_a[n] for n in LAYERS] + [acts_b[n] for n in LAYERS[1:]]
    assert mats[0].shape == (70, 16 * 16 * 8)  # stem: 16x16 maps of 8 channels at width 0.25, flattened
    hs = np.zeros((len(mats), len(mats)))
    for lo in range(0, 70, 32):
        rows = [m[lo : lo + 32] for m in mats]
        hs += len(rows[0]) * np.array([[np_hsic1(u, v) for v in rows] for u in rows])
    want = cka.cka_from_hsic(hs)
    np.testing.assert_allclose(got["cka"], want[:5, 5:], rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(got["cka_aa"], want[:5, :5], rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(np.diag(got["cka_aa"]), 1.0, rtol=1e-5)
    assert got["cka"].shape == (5, 4) and got["num_examples"] == 70  # every batch counted (the last has 6)
    assert set(cka.same_layer(got)) == set(LAYERS[1:])


def test_full_cka_of_models_matches_numpy(toy):
    a, b, source, data_cfg = toy
    mesh = sharding.make_mesh()
    got = cka.full_cka(a, b, source, spatial="mean", **_kw(data_cfg, mesh))
    acts_a, acts_b = features.collect(
        [a, b],
        [LAYERS, LAYERS[1:]],
        source,
        mesh=mesh,
        data_cfg=data_cfg,
        batch_size=32,
        mean=INFO.mean,
        std=INFO.std,
        spatial="mean",
    )
    assert acts_a["stem"].shape == (70, 8)  # averaged over space
    want = [[np_cka(acts_a[i], acts_b[j]) for j in LAYERS[1:]] for i in LAYERS]
    np.testing.assert_allclose(got["cka"], want, rtol=1e-3, atol=1e-5)
    same = cka.full_cka(a, a, source, **_kw(data_cfg, mesh))
    np.testing.assert_allclose(list(cka.same_layer(same).values()), 1.0, rtol=1e-5)


def test_bad_arguments_are_named(toy):
    a, b, source, data_cfg = toy
    with pytest.raises(ValueError, match="spatial='max'"):
        features.as_matrix(jnp.zeros((2, 3, 3, 4)), "max")
    with pytest.raises(ValueError, match="batch_size must be at least 4"):
        cka.minibatch_cka(a, b, source, **{**_kw(data_cfg, sharding.make_mesh()), "batch_size": 2})
    with pytest.raises(ValueError, match="Unknown layer names"):
        cka.minibatch_cka(a, b, source, **{**_kw(data_cfg, sharding.make_mesh()), "layers_a": ["block99"]})
    with pytest.raises(ValueError, match="row counts"):
        cka.cka_matrix([np.zeros((5, 2))], [np.zeros((6, 2))])
