"""Specialization transforms: pure functions on parameter pytrees and logits.

`extract_params` is the paper's specialist extraction on an `nnx.State`: the
final layer keeps only the outputs of the classes in S (in S's order), so an
untuned specialist's logits are exactly the generalist's logits at S.
`extract` applies it to a module. The paper's baselines and Hinton et al.'s
dustbin specialist are module transforms next to it (`fresh_head`,
`add_dustbin`); `suppress_logits` is output suppression: the classes outside
S are masked so they can never win and carry no loss. `compose_subsets`
chains specializations (animals -> livestock) by re-expressing the narrower
subset in the wider specialist's output order.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.data.subsets import compose_subsets  # noqa: F401 -- part of this module's API
from jaxspec.models.layers import linear_init

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
    getattr(specialist, head).out_features = len(subset)
    return specialist


def suppress_logits(logits: jax.Array, subset: Sequence[int]) -> jax.Array:
    """Sets the logits of every class outside `subset` to `SUPPRESSED`."""
    s = _check_subset(subset, logits.shape[-1])
    keep = np.zeros(logits.shape[-1], bool)
    keep[s] = True
    return jnp.where(keep, logits, jnp.asarray(SUPPRESSED, logits.dtype))


def fresh_head(
    model: nnx.Module, num_outputs: int, *, rngs: nnx.Rngs, head: str = "head", kernel_init=linear_init
) -> nnx.Module:
    """A copy of `model` whose `head` is a new, randomly initialized `num_outputs`-way layer.

    The default initializer is MobileNetV3's own, so the head starts like one
    trained from scratch would (the paper's "random head" baseline).
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be positive, got {num_outputs}")
    new = nnx.merge(*nnx.split(model), copy=True)
    old = getattr(new, head)
    setattr(new, head, nnx.Linear(old.in_features, num_outputs, kernel_init=kernel_init, rngs=rngs))
    return new


def add_dustbin(model: nnx.Module, subset: Sequence[int], head: str = "head") -> nnx.Module:
    """Hinton et al.'s specialist: the outputs of `subset` plus one "everything else" output (last).

    The dustbin starts as a stand-in for the classes it absorbs: the mean of
    their weight columns and the log-sum-exp of their biases (the log of their
    summed prior mass), so it is neither silent nor dominant before tuning.
    """
    layer = getattr(model, head)
    num_outputs = layer.kernel.shape[-1]
    s = _check_subset(subset, num_outputs)
    rest = np.setdiff1d(np.arange(num_outputs), s)
    if rest.size == 0:
        raise ValueError(f"subset covers all {num_outputs} outputs: a dustbin would have nothing to absorb")
    new = extract(model, s, head)
    new_layer = getattr(new, head)
    kernel, bias = layer.kernel[...], layer.bias[...]
    new_layer.kernel.value = jnp.concatenate([new_layer.kernel[...], kernel[:, rest].mean(-1, keepdims=True)], -1)
    new_layer.bias.value = jnp.concatenate([new_layer.bias[...], jax.nn.logsumexp(bias[rest])[None]])
    new_layer.out_features = len(s) + 1
    return new
