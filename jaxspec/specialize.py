"""Specialization transforms: pure functions on parameter pytrees and logits.

`extract_params` is the paper's specialist extraction on an `nnx.State`: the
final layer keeps only the outputs of the classes in S (in S's order), so an
untuned specialist's logits are exactly the generalist's logits at S.
`extract` applies it to a module. `suppress_logits` is output suppression:
the classes outside S are masked so they can never win and carry no loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SUPPRESSED = -1e9  # finite (not -inf) so 0 * SUPPRESSED stays 0 in losses


def _check_subset(subset: Sequence[int], num_outputs: int) -> np.ndarray:
    s = np.asarray(subset, np.int64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"subset must be a non-empty list of class indices, got {subset!r}")
    bad = s[(s < 0) | (s >= num_outputs)]
    if bad.size:
        raise ValueError(f"subset indices {bad.tolist()} are out of range for {num_outputs} outputs")
    if len(set(s.tolist())) != s.size:
        raise ValueError(f"subset {s.tolist()} contains duplicates")
    return s


def extract_params(state: nnx.State, subset: Sequence[int], head: str = "head") -> nnx.State:
    """Returns a copy of `state` whose `head` keeps only the outputs in `subset`.

    Works for a dense head (kernel `[in, C]`) and a 1x1-conv head (kernel
    `[1, 1, in, C]`): the output axis is last in both, as is the bias's.
    """
    if head not in state:
        raise KeyError(f"No layer named {head!r} in the parameters; top-level names: {sorted(state)}")
    layer = state[head]
    num_outputs = layer["kernel"].shape[-1]
    s = _check_subset(subset, num_outputs)
    new_state = jax.tree.map(lambda x: x, state)  # fresh containers; arrays are immutable
    for name in ("kernel", "bias"):
        if name in layer:
            new_state[head][name] = jax.tree.map(lambda x: jnp.take(x, s, axis=-1), layer[name])
    return new_state


def extract(model: nnx.Module, subset: Sequence[int], head: str = "head") -> nnx.Module:
    """A new specialist module for `subset`; `model` is left unchanged."""
    graphdef, state = nnx.split(model)
    specialist = nnx.merge(graphdef, extract_params(state, subset, head), copy=True)
    # The layer's static width lives in the graph, not the parameters: keep it honest.
    setattr(getattr(specialist, head), "out_features", len(subset))
    return specialist


def suppress_logits(logits: jax.Array, subset: Sequence[int]) -> jax.Array:
    """Sets the logits of every class outside `subset` to `SUPPRESSED`."""
    s = _check_subset(subset, logits.shape[-1])
    keep = np.zeros(logits.shape[-1], bool)
    keep[s] = True
    return jnp.where(keep, logits, jnp.asarray(SUPPRESSED, logits.dtype))
