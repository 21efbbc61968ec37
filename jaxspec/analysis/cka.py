"""Linear CKA between the layers of two models: full-batch and minibatch estimators.

Linear CKA (Kornblith et al. 2019) compares two representations X [n, p] and
Y [n, q] of the same n examples through their centered Gram matrices,
CKA = <K, L>_F / (||K||_F ||L||_F) with K = Xc Xc^T, L = Yc Yc^T: invariant to
orthogonal transforms and isotropic scaling of either side, so layers of
different widths (and different networks) can be compared.

The full-batch estimator needs every example's activations at once (n x n per
layer). The minibatch estimator (Nguyen, Raghu, Kornblith 2021) replaces each
HSIC by the mean over minibatches of the *unbiased* HSIC_1 estimator (Song et
al. 2012): unbiased per batch, so the mean converges to the population HSIC as
batches are added, whatever the batch size, which a mean of biased per-batch
HSICs would not. One jitted, sharded step computes HSIC_1 for every pair of
layers of both models from one batch; sums are kept on device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from jaxspec import sharding
from jaxspec.analysis import features
from jaxspec.data.sources import Source

MIN_BATCH = 4  # HSIC_1 divides by n(n-3)(n-2)(n-1): it needs at least 4 examples


def _normalized_gram(x: jax.Array) -> jax.Array:
    """Centered linear Gram matrix scaled to unit Frobenius norm."""
    x = x - x.mean(axis=0)
    k = x @ x.T
    return k / jnp.linalg.norm(k)


@jax.jit
def linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
    """Full-batch linear CKA of X [n, p] and Y [n, q] (rows are the same examples)."""
    return jnp.sum(_normalized_gram(x) * _normalized_gram(y))


def cka_matrix(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> np.ndarray:
    """Full-batch CKA of every X in `xs` with every Y in `ys`; memory n^2 per layer of `ys`."""
    if len({len(a) for a in (*xs, *ys)}) != 1:
        raise ValueError(f"All representations need the same examples; got row counts {[len(a) for a in (*xs, *ys)]}")
    gram = jax.jit(_normalized_gram)
    gy = jnp.stack([gram(jnp.asarray(y)) for y in ys])
    out = [np.asarray(jnp.einsum("ij,bij->b", gram(jnp.asarray(x)), gy), np.float64) for x in xs]
    return np.stack(out)


def hsic1(mats: Sequence[jax.Array], mask: jax.Array | None = None) -> jax.Array:
    """Unbiased HSIC_1 of the linear kernels of every pair of `mats` ([n, d_i], same rows): [L, L].

    Rows where `mask` is false (eval padding) are left out exactly: their
    rows and columns of every Gram matrix are zero, and n counts real rows.
    Features are centered first (HSIC_1 is invariant to it; float32 is not).
    When the rows are sharded over a mesh, each device computes its rows of
    every Gram matrix against a gathered copy of the features, and the
    contractions over rows are summed across devices into replicated results.
    """
    rep = sharding.summed_over_rows(mats[0])

    def gathered(x):
        return x if rep is None else jax.sharding.reshard(x, rep)

    n_rows = mats[0].shape[0]
    m = jnp.ones(n_rows, jnp.float32) if mask is None else mask.astype(jnp.float32)
    n = m.sum()
    offdiag = (1.0 - jnp.eye(n_rows, dtype=jnp.float32)) * (m[:, None] * gathered(m)[None, :])
    grams = []
    for x in mats:
        x = x.astype(jnp.float32)
        x = (x - jnp.einsum("n,nd->d", m, x, out_sharding=rep) / n) * m[:, None]
        grams.append((x @ gathered(x).T) * offdiag)
    k = jnp.stack(grams)  # [L, n, n], zero diagonals
    trace = jnp.einsum("aij,bij->ab", k, k, out_sharding=rep)  # tr(K_a K_b) for symmetric K
    row = k.sum(axis=2)  # K_a 1
    total = row.sum(axis=1)  # 1^T K_a 1
    cross = jnp.einsum("ai,bi->ab", row, row, out_sharding=rep)  # 1^T K_a K_b 1
    return (trace + jnp.outer(total, total) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def cka_from_hsic(h: np.ndarray) -> np.ndarray:
    """CKA from an (accumulated) HSIC matrix: h_ab / sqrt(h_aa h_bb); NaN where undefined (a constant layer)."""
    h = np.asarray(h, np.float64)
    d = np.diag(h)
    with np.errstate(invalid="ignore", divide="ignore"):
        return h / np.sqrt(np.outer(d, d))


def make_hsic_step(act_fn):
    """`step(variables, batch) -> {"hsic": n * HSIC_1 [L, L], "count": n}` over all layers of all models.

    Each batch is weighted by its number of real examples n (any fixed
    weights keep the estimate unbiased; this one makes a short last batch
    count less). Batches with fewer than `MIN_BATCH` real examples add nothing.
    """

    def step(variables, batch):
        mats = [m for per_model in act_fn(variables, batch) for m in per_model]
        mask = batch["mask"]
        n = mask.astype(jnp.float32).sum()
        ok = n >= MIN_BATCH
        h = hsic1(mats, jnp.where(ok, mask, True))  # a dummy full mask keeps skipped batches finite
        return {"hsic": jnp.where(ok, n * h, 0.0), "count": jnp.where(ok, n, 0.0)}

    return step


def minibatch_cka(
    model_a: nnx.Module,
    model_b: nnx.Module,
    source: Source,
    *,
    layers_a: Sequence[str],
    layers_b: Sequence[str],
    mesh: jax.sharding.Mesh,
    data_cfg,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    spatial: str = "flatten",
    seed: int | None = 0,
) -> dict:
    """Minibatch CKA between every layer of `model_a` and every layer of `model_b` on `source`.

    `seed` shuffles the examples first (None: `source` is already in random
    order): HSIC_1 is unbiased for i.i.d. batches, and batches that each hold
    one class would estimate within-class similarity instead.
    """
    if batch_size < MIN_BATCH:
        raise ValueError(f"batch_size must be at least {MIN_BATCH} for unbiased HSIC, got {batch_size}")
    if seed is not None:
        source = features.shuffled(source, seed)
    modeldefs, variables = features.split([model_a, model_b])
    act_fn = features.make_activation_fn(modeldefs, [layers_a, layers_b], mean=mean, std=std, spatial=spatial)
    totals = None
    for out in features.run_over(
        make_hsic_step(act_fn), variables, source, mesh=mesh, data_cfg=data_cfg, batch_size=batch_size, name="cka"
    ):
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    if count == 0:
        raise ValueError(f"No batch of {source!r} had {MIN_BATCH} or more examples")
    h = np.asarray(totals["hsic"], np.float64) / count
    la = len(layers_a)
    full = cka_from_hsic(h)
    return {
        "estimator": "minibatch",
        "layers_a": list(layers_a),
        "layers_b": list(layers_b),
        "cka": full[:la, la:],
        "cka_aa": full[:la, :la],
        "cka_bb": full[la:, la:],
        "num_examples": round(count),  # examples in batches that counted
        "batch_size": batch_size,
        "spatial": spatial,
    }


def full_cka(
    model_a: nnx.Module,
    model_b: nnx.Module,
    source: Source,
    *,
    layers_a: Sequence[str],
    layers_b: Sequence[str],
    mesh: jax.sharding.Mesh,
    data_cfg,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    spatial: str = "flatten",
) -> dict:
    """Full-batch CKA between every layer of `model_a` and of `model_b` (all activations in memory)."""
    acts_a, acts_b = features.collect(
        [model_a, model_b],
        [layers_a, layers_b],
        source,
        mesh=mesh,
        data_cfg=data_cfg,
        batch_size=batch_size,
        mean=mean,
        std=std,
        spatial=spatial,
    )
    xs, ys = [acts_a[n] for n in layers_a], [acts_b[n] for n in layers_b]
    return {
        "estimator": "full",
        "layers_a": list(layers_a),
        "layers_b": list(layers_b),
        "cka": cka_matrix(xs, ys),
        "cka_aa": cka_matrix(xs, xs),
        "cka_bb": cka_matrix(ys, ys),
        "num_examples": len(source),
        "batch_size": batch_size,
        "spatial": spatial,
    }


def same_layer(result: dict) -> dict[str, float]:
    """CKA of each layer of model a with the layer of the same name in model b."""
    cols = {name: j for j, name in enumerate(result["layers_b"])}
    return {name: float(result["cka"][i, cols[name]]) for i, name in enumerate(result["layers_a"]) if name in cols}


def plot_heatmap(result: dict, path, *, names: tuple[str, str] = ("model a", "model b"), title: str = "") -> None:
    """Layer x layer CKA heatmap: rows are model a's layers, columns model b's."""
    cka = np.asarray(result["cka"])
    la, lb = result["layers_a"], result["layers_b"]
    size = max(4.0, 0.35 * max(len(la), len(lb)) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cka, vmin=0.0, vmax=1.0, cmap="magma", origin="lower")
    ax.set_xticks(range(len(lb)), lb, rotation=90, fontsize=7)
    ax.set_yticks(range(len(la)), la, fontsize=7)
    ax.set_xlabel(f"{names[1]} layer")
    ax.set_ylabel(f"{names[0]} layer")
    ax.set_title(title or f"linear CKA ({result['estimator']}, n={result['num_examples']})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="CKA")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_same_layer(result: dict, path, *, names: tuple[str, str] = ("model a", "model b"), title: str = "") -> None:
    """CKA of each layer with its namesake in the other model, in forward order."""
    same = same_layer(result)
    if not same:
        raise ValueError(f"No layer name is shared by {result['layers_a']} and {result['layers_b']}")
    fig, ax = plt.subplots(figsize=(max(5.0, 0.4 * len(same) + 2), 3.5))
    ax.plot(range(len(same)), list(same.values()), marker="o")
    ax.set_xticks(range(len(same)), list(same), rotation=90, fontsize=7)
    ax.set_ylim(min(0.0, math.floor(min(same.values()) * 10) / 10), 1.02)
    ax.set_ylabel("CKA")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"same-layer linear CKA, {names[0]} vs {names[1]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
