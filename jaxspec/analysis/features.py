"""Activations of one or more models over a source, batch by batch.

The per-batch function is jitted and sharded exactly like the eval step
(`steps.jit_eval_step`: batch split over the mesh's `data` axis, model
variables replicated), so analyses run wherever evaluation runs. Each layer's
activation is returned as one row per example: spatial maps are flattened
(Kornblith et al. 2019 compare flattened H*W*C vectors) or averaged over
space (`spatial='mean'`, a C-dim vector that ignores where a feature fired).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxspec import sharding
from jaxspec.data import pipeline
from jaxspec.data.sources import Source
from jaxspec.train import loop, steps
from jaxspec.train.state import ModelDef, split_model

SPATIAL = ("flatten", "mean")
Variables = tuple[tuple[nnx.State, nnx.State], ...]  # (params, batch_stats) per model


class IndexedSource:
    """The examples of `source` at `indices`, in that order (labels unchanged)."""

    def __init__(self, source: Source, indices: Sequence[int]):
        self._indices = np.asarray(indices, np.int64)
        if self._indices.size and (self._indices.min() < 0 or self._indices.max() >= len(source)):
            raise ValueError(
                f"indices must lie in [0, {len(source)}); got range [{self._indices.min()}, {self._indices.max()}]"
            )
        self._source, self.info = source, source.info
        self._labels = np.asarray(source.labels)[self._indices]

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._source[int(self._indices[index])]

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def indices(self) -> np.ndarray:
        """Positions of the examples in the underlying source."""
        return self._indices

    def __repr__(self) -> str:
        return f"IndexedSource({self._source!r}, n={len(self)})"


def shuffled(source: Source, seed: int) -> IndexedSource:
    """`source` in a seeded random order: minibatch estimators need i.i.d. batches, not class-sorted ones."""
    return IndexedSource(source, np.random.default_rng(seed).permutation(len(source)))


def per_class(source: Source, n: int, *, seed: int) -> IndexedSource:
    """A seeded random choice of `n` examples of every class (all of a class that has fewer), grouped by class."""
    if n < 1:
        raise ValueError(f"per_class must be positive, got {n}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(source.labels)
    chosen = [np.sort(rng.permutation(np.flatnonzero(labels == c))[:n]) for c in np.unique(labels)]
    return IndexedSource(source, np.concatenate(chosen))


def _check_spatial(spatial: str) -> None:
    if spatial not in SPATIAL:
        raise ValueError(f"Unknown spatial={spatial!r}; choose one of {list(SPATIAL)}")


def as_matrix(x: jax.Array, spatial: str = "flatten") -> jax.Array:
    """[N, ...] activations -> [N, D] rows; `spatial` says what happens to [N, H, W, C] maps."""
    _check_spatial(spatial)
    if x.ndim == 4 and spatial == "mean":
        return x.mean(axis=(1, 2))
    return x.reshape(x.shape[0], -1)


def split(models: Sequence[nnx.Module]) -> tuple[tuple[ModelDef, ...], Variables]:
    """The static definitions and the (params, batch_stats) pytrees of `models`."""
    parts = [split_model(m) for m in models]
    return tuple(p[0] for p in parts), tuple((p[1], p[2]) for p in parts)


def make_activation_fn(
    modeldefs: Sequence[ModelDef],
    layers: Sequence[Sequence[str]],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    spatial: str = "flatten",
) -> Callable[[Variables, dict], list[list[jax.Array]]]:
    """`fn(variables, batch) -> [[N, D] per layer of layers[i]] per model i`, in eval mode."""
    if len(modeldefs) != len(layers):
        raise ValueError(f"{len(modeldefs)} models but {len(layers)} layer lists")
    _check_spatial(spatial)  # before anything is traced

    def fn(variables: Variables, batch: dict) -> list[list[jax.Array]]:
        x = pipeline.normalize(batch["image"], mean, std)
        out = []
        for modeldef, (params, batch_stats), names in zip(modeldefs, variables, layers, strict=True):
            model = modeldef.merge(params, batch_stats)
            model.eval()
            acts = model.intermediates(x, names)
            out.append([as_matrix(acts[name], spatial) for name in names])
        return out

    return fn


def run_over(
    step: Callable,
    variables: Variables,
    source: Source,
    *,
    mesh: jax.sharding.Mesh,
    data_cfg,
    batch_size: int,
    name: str,
) -> Iterator:
    """Yields `step(variables, batch)` for every padded batch of `source`, with a progress line.

    `step` is the plain per-batch function; it is jitted here with the eval
    step's shardings, and `variables` are replicated onto `mesh` once.
    """
    if len(source) == 0:
        raise ValueError(f"{name}: the source {source!r} is empty")
    jitted = steps.jit_eval_step(step, mesh)
    variables = sharding.replicate(variables, mesh)
    total = -(-len(source) // batch_size)
    progress = loop.Progress(name, total, 0, batch_size)
    every = max(1, total // 20)
    for i, batch in enumerate(pipeline.eval_iterator(source, data_cfg, batch_size=batch_size), start=1):
        yield jitted(variables, sharding.put_batch(batch, mesh))
        if i % every == 0 or i == total:
            progress.update(i, time.perf_counter(), {})
    progress.close()


def collect(
    models: Sequence[nnx.Module],
    layers: Sequence[Sequence[str]],
    source: Source,
    *,
    mesh: jax.sharding.Mesh,
    data_cfg,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    spatial: str = "flatten",
) -> list[dict[str, np.ndarray]]:
    """Every example's activations at `layers[i]` of `models[i]`, as host arrays (padding dropped)."""
    modeldefs, variables = split(models)
    act_fn = make_activation_fn(modeldefs, layers, mean=mean, std=std, spatial=spatial)

    def step(variables, batch):
        return {"acts": act_fn(variables, batch), "mask": batch["mask"]}

    parts = [[[] for _ in names] for names in layers]
    for out in run_over(step, variables, source, mesh=mesh, data_cfg=data_cfg, batch_size=batch_size, name="features"):
        out = jax.device_get(out)
        keep = np.asarray(out["mask"], bool)
        for per_model, acts in zip(parts, out["acts"], strict=True):
            for chunks, a in zip(per_model, acts, strict=True):
                chunks.append(np.asarray(a)[keep])
    return [
        {n: np.concatenate(c) for n, c in zip(names, per_model, strict=True)}
        for names, per_model in zip(layers, parts, strict=True)
    ]
