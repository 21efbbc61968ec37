"""Layer freezing by parameter path, as an optax transform.

A parameter's path is its place in the model joined by '/', e.g.
`blocks/3/expand/conv/kernel` or `head/bias`. Freeze patterns are regular
expressions matched against the whole path, plus a shorthand for runs of
numbered blocks: `blocks:0-5` freezes blocks 0 to 5 (inclusive), whatever
their inner layers are called; for the detector, `layers:10-12` is YOLOv5's
layers 10-12. Frozen parameters get a zero update from
`optax.multi_transform`, so they stay bit-identical, carry no optimizer state
and receive no weight decay.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import optax

HEAD_ONLY = ("(?!head/).*",)  # every parameter except the head's: for head-only training
_BLOCK_RANGE = re.compile(r"^([A-Za-z_][\w/]*):(\d+)-(\d+)$")


def path_str(path) -> str:
    """'blocks/3/expand/conv/kernel' for a key path into an `nnx.State`."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        # GetAttrKey('value') of a Variable is not part of the model's layout
    return "/".join(parts)


def _to_regex(pattern: str) -> re.Pattern:
    m = _BLOCK_RANGE.match(pattern)
    if m:
        name, lo, hi = m.group(1), int(m.group(2)), int(m.group(3))
        if lo > hi:
            raise ValueError(f"Empty block range in freeze pattern {pattern!r}: {lo} > {hi}")
        return re.compile(f"{re.escape(name)}/({'|'.join(str(i) for i in range(lo, hi + 1))})/.*")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"Invalid freeze pattern {pattern!r}: {e}") from None


def under(prefix: str, pattern: str) -> str:
    """`pattern` for the same parameters in a model mounted at `prefix` (e.g. an SKD student's `model/`)."""
    if _BLOCK_RANGE.match(pattern):
        return f"{prefix}/{pattern}"
    return f"{prefix}/(?:{pattern})"


def frozen_labels(params, patterns: Sequence[str]):
    """A pytree like `params` with 'frozen' or 'trainable' at each leaf.

    Every pattern must match at least one parameter, so a typo cannot
    silently freeze nothing.
    """
    regexes = [(p, _to_regex(p)) for p in patterns]
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for pattern, rx in regexes:
        if not any(rx.fullmatch(path) for path in paths):
            raise ValueError(
                f"Freeze pattern {pattern!r} matches no parameter; paths look like {paths[:3]} ... {paths[-2:]}"
            )
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if any(rx.fullmatch(path_str(p)) for _, rx in regexes) else "trainable", params
    )


def freeze(tx: optax.GradientTransformation, params, patterns: Sequence[str]) -> optax.GradientTransformation:
    """`tx` for the trainable parameters, zero updates for those matching `patterns`."""
    if not patterns:
        return tx
    labels = frozen_labels(params, patterns)
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def parse_patterns(spec) -> tuple[str, ...]:
    """Config value -> patterns: a tuple/list, or one comma-separated string ('' = none)."""
    if isinstance(spec, str):
        return tuple(p.strip() for p in spec.split(",") if p.strip())
    return tuple(spec)
