"""Unit lesioning: which channels of a layer a task needs, and lesions as pure transforms.

A *unit* is an output channel of a layer with parameters: a conv + BatchNorm
block (`stem`, `last_conv`, `blocks/8/depthwise`, ...) or a dense layer
(`hidden`, whose units are the `pre_logits` features). `lesion` zeroes what
makes a unit's output exactly zero, in training and in eval mode: BatchNorm's
scale and bias (its output is then x * 0 + (0 - mean * 0)), or a layer's
kernel column and bias when it has no BatchNorm. MobileNetV3's activations
(ReLU, hard-swish) map 0 to 0, so the unit stays silent after them.

`lesion_impact` ranks units by how much a task's accuracy drops when each is
lesioned alone. It vmaps one forward pass over a chunk of lesions: only the
layers from the lesioned one on depend on the lesion, so JAX's batching runs
everything before it once per batch, not once per unit.

A lesion "at init" is `lesion_model` before training, and training may revive
the units. `hold_lesion` keeps them silent throughout training: it wraps the
layer in a `HeldLesion` that masks its output, so the units' parameters get
zero gradients, stay zero under any optimizer (weight decay of a zero is
zero), and `release_lesion` turns the trained model back into a plain one
that computes the same function.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec import sharding
from jaxspec.data import pipeline
from jaxspec.data.sources import Source
from jaxspec.train import freeze, loop
from jaxspec.train.state import ModelDef, TrainState

# Layer names whose units are another layer's output channels (pool = mean of last_conv).
_ALIASES = {"pre_logits": "hidden", "pool": "last_conv", "logits": "head"}


def _param_shapes(params) -> dict[str, tuple[int, ...]]:
    return {freeze.path_str(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}


def _unit_leaves(params, path: str) -> tuple[frozenset[str], int]:
    """The parameter paths to zero for `path`'s units, and how many units it has."""
    shapes = _param_shapes(params)
    if f"{path}/bn/scale" in shapes:
        leaves = (f"{path}/bn/scale", f"{path}/bn/bias")
    elif f"{path}/kernel" in shapes:
        leaves = tuple(p for p in (f"{path}/kernel", f"{path}/bias") if p in shapes)
    else:
        layers = sorted({p.rsplit("/", 2)[0] for p in shapes if p.endswith("/bn/scale")})
        raise ValueError(
            f"{path!r} is not a layer with units (no {path}/bn/scale or {path}/kernel parameter); "
            f"conv+BatchNorm layers are e.g. {layers[:4]} ... {layers[-2:]}"
        )
    return frozenset(leaves), shapes[leaves[0]][-1]


def unit_layer(model: nnx.Module, layer: str) -> str:
    """The parameter path whose output channels are the units of `layer`.

    `layer` is a parameter path ('blocks/8/depthwise') or one of the model's
    `layer_names` that a parameter lesion can silence: `stem`, `last_conv`,
    `pool` (= last_conv's units), `pre_logits` (= `hidden`), and `block{i}`
    of a block without a residual connection (= `blocks/{i}/project`).
    """
    path = _ALIASES.get(layer, layer)
    if layer.startswith("block") and layer in getattr(model, "layer_names", ()):
        i = int(layer[len("block") :])
        path = f"blocks/{i}/project"
        if model.blocks[i].use_residual:
            raise ValueError(
                f"{layer!r} outputs its input plus {path!r}, so no parameter lesion silences its channels; "
                f"lesion {path!r} or 'blocks/{i}/depthwise' (the block's expanded units) instead"
            )
    _unit_leaves(nnx.state(model, nnx.Param), path)
    return path


def num_units(params, path: str) -> int:
    return _unit_leaves(params, path)[1]


def keep_mask(n: int, units: Sequence[int]) -> np.ndarray:
    """[n] bool, False at `units`."""
    u = np.asarray(units, np.int64).reshape(-1)
    bad = u[(u < 0) | (u >= n)]
    if bad.size:
        raise ValueError(f"Unit indices {bad.tolist()} are out of range for a layer of {n} units")
    keep = np.ones(n, bool)
    keep[u] = False
    return keep


def _apply_keep(params, leaves: frozenset[str], keep):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.where(keep, x, jnp.zeros((), x.dtype)) if freeze.path_str(p) in leaves else x, params
    )


def lesion(params, path: str, units: Sequence[int]):
    """`params` with the `units` of layer `path` silenced; a new pytree, the input is unchanged."""
    leaves, n = _unit_leaves(params, path)
    return _apply_keep(params, leaves, keep_mask(n, units))


def _clone(model: nnx.Module) -> nnx.Module:
    return nnx.merge(*nnx.split(model), copy=True)


def lesion_model(model: nnx.Module, path: str, units: Sequence[int]) -> nnx.Module:
    """A copy of `model` with `lesion` applied: the start of a "lesion at init" retraining."""
    new = _clone(model)
    nnx.update(new, lesion(nnx.state(new, nnx.Param), path, units))
    return new


class LesionMask(nnx.Variable):
    """Which output channels a `HeldLesion` lets through: neither a parameter nor a statistic, never trained."""


class HeldLesion(nnx.Module):
    """`inner` with some output channels forced to exactly zero at every call."""

    def __init__(self, inner: nnx.Module, keep: np.ndarray):
        self.inner = inner
        self.keep = LesionMask(jnp.asarray(keep, bool))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.inner(x)
        return jnp.where(self.keep[...], y, jnp.zeros((), y.dtype))


def _locate(model: nnx.Module, path: str) -> tuple[nnx.Module, str]:
    *parents, attr = path.split("/")
    node = model
    for part in parents:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node, attr


def hold_lesion(model: nnx.Module, path: str, units: Sequence[int]) -> nnx.Module:
    """A copy of `model` whose `units` of `path` are lesioned and stay silent during training ("lesion always")."""
    new = lesion_model(model, path, units)
    parent, attr = _locate(new, path)
    keep = keep_mask(num_units(nnx.state(new, nnx.Param), path), units)
    setattr(parent, attr, HeldLesion(getattr(parent, attr), keep))
    return new


def release_lesion(model: nnx.Module, path: str) -> nnx.Module:
    """The plain model that computes what `model` (made by `hold_lesion`) computes: unwrapped, units lesioned."""
    new = _clone(model)
    parent, attr = _locate(new, path)
    held = getattr(parent, attr)
    if not isinstance(held, HeldLesion):
        raise TypeError(f"{path!r} holds no lesion (found {type(held).__name__}); was the model made by hold_lesion?")
    setattr(parent, attr, held.inner)
    return lesion_model(new, path, np.flatnonzero(~np.asarray(held.keep[...])))


def top_units(drops: np.ndarray, fraction: float, candidates: Sequence[int] | None = None) -> np.ndarray:
    """The task-specific units: the `fraction` of all units with the largest accuracy drops, largest first.

    Ties go to the lower index. `candidates` restricts the choice (e.g. to
    units that are not already silenced) without changing how many are chosen.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    drops = np.asarray(drops, np.float64)
    k = max(1, round(fraction * len(drops)))
    pool = np.arange(len(drops)) if candidates is None else np.asarray(candidates, np.int64)
    if len(pool) < k:
        raise ValueError(f"Only {len(pool)} candidate units for the top {k} ({fraction:.0%} of {len(drops)})")
    return pool[np.argsort(-drops[pool], kind="stable")[:k]]


def _sweep_step(modeldef: ModelDef, leaves: frozenset[str], *, mean, std, columns):
    """(state, batch, keep [K, units]) -> (per-class hits under each of the K lesions [K, classes], counts)."""
    cols = np.asarray(columns, np.int32)

    def step(state: TrainState, batch, keep):
        x = pipeline.normalize(batch["image"], mean, std)
        onehot = jax.nn.one_hot(batch["label"], len(cols)) * batch["mask"][:, None]

        def hits(k):
            model = modeldef.merge(_apply_keep(state.params, leaves, k), state.batch_stats)
            model.eval()
            pred = jnp.argmax(model(x)[:, cols], axis=-1)
            return jnp.sum(onehot * (pred == batch["label"])[:, None], axis=0)

        return jax.vmap(hits)(keep), onehot.sum(0)

    return step


class LesionEval:
    """Per-class top-1 on a task under many lesions of one layer, compiled once per model structure.

    Predictions are the argmax over `columns` (the task's outputs; a source's
    labels index into them). `params` only tells the parameter structure.
    """

    def __init__(
        self,
        modeldef: ModelDef,
        params,
        *,
        path: str,
        columns: Sequence[int],
        mesh: jax.sharding.Mesh,
        data_cfg,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        chunk: int = 32,
    ):
        leaves, self.num_units = _unit_leaves(params, path)
        rep = sharding.replicated(mesh)
        self._step = jax.jit(
            _sweep_step(modeldef, leaves, mean=mean, std=std, columns=columns),
            in_shardings=(None, sharding.batch_sharding(mesh), rep),
            out_shardings=rep,
        )
        self._rep, self._mesh, self._data_cfg, self._batch_size, self._chunk = rep, mesh, data_cfg, batch_size, chunk

    def __call__(self, state: TrainState, source: Source, keeps: np.ndarray, name: str = "") -> np.ndarray:
        """Per-class accuracy [len(keeps), classes]; row r keeps the units where keeps[r] is True."""
        keeps = np.asarray(keeps, bool)
        if keeps.ndim != 2 or keeps.shape[1] != self.num_units:
            raise ValueError(f"keeps must be [rows, {self.num_units}], got shape {keeps.shape}")
        rows = len(keeps)
        keeps = np.concatenate([keeps, np.ones((-rows % self._chunk, self.num_units), bool)])
        hits, counts = [], None
        progress = loop.Progress(name, total=rows, start=0, batch_size=len(source)) if name else None
        for k in range(0, len(keeps), self._chunk):
            keep = jax.device_put(keeps[k : k + self._chunk], self._rep)
            total = None
            for batch in pipeline.eval_iterator(source, self._data_cfg, batch_size=self._batch_size):
                out = self._step(state, sharding.put_batch(batch, self._mesh), keep)
                total = out if total is None else jax.tree.map(jnp.add, total, out)
            chunk_hits, counts = jax.device_get(total)
            hits.append(chunk_hits)
            if progress:
                progress.update(min(k + self._chunk, rows), time.perf_counter(), {})
        if progress:
            progress.close()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.concatenate(hits).astype(np.float64)[:rows] / counts


def lesion_impact(ev: LesionEval, state: TrainState, source: Source, name: str = "") -> tuple[float, np.ndarray]:
    """Class-balanced top-1 intact, and its drop when each unit is lesioned alone (large = the task needs it)."""
    n = ev.num_units
    keeps = np.ones((n + 1, n), bool)  # row 0 intact, row 1 + u lesions unit u
    keeps[np.arange(1, n + 1), np.arange(n)] = False
    accuracy = ev(state, source, keeps, name).mean(axis=1)
    return float(accuracy[0]), accuracy[0] - accuracy[1:]
