"""Turning a user's description of a label subset S into class indices.

A subset is given as group names, class names or class indices, either as a
sequence or as one comma-separated string (handy on the command line:
`--config.specialize.subset=cat,dog`). Mistakes are reported with the valid
choices, since a silently wrong S would invalidate a whole experiment.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from jaxspec.data.sources import DatasetInfo


def _choices(info: DatasetInfo) -> str:
    names = list(info.class_names)
    shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    return f"groups: {sorted(info.groups)}; class names: {shown}; or class indices 0..{info.num_classes - 1}"


def _tokens(spec: str | int | Sequence[str | int]) -> list[str | int]:
    if isinstance(spec, str):
        return [t.strip() for t in spec.split(",") if t.strip()]
    if isinstance(spec, int):
        return [spec]
    return list(spec)


def resolve_subset(spec: str | int | Sequence[str | int], info: DatasetInfo) -> tuple[int, ...]:
    """Returns the class indices of S, in the order given.

    Raises ValueError for unknown names, out-of-range indices, duplicates and
    an empty subset.
    """
    name_to_index = {n: i for i, n in enumerate(info.class_names)}
    indices: list[int] = []
    for token in _tokens(spec):
        if isinstance(token, str) and token.lstrip("-").isdigit():
            token = int(token)
        if isinstance(token, int):
            if not 0 <= token < info.num_classes:
                raise ValueError(
                    f"Class index {token} is out of range for {info.name!r} (valid: 0..{info.num_classes - 1})"
                )
            indices.append(token)
        elif token in info.groups:
            indices.extend(info.groups[token])
        elif token in name_to_index:
            indices.append(name_to_index[token])
        else:
            raise ValueError(f"Unknown class or group {token!r} for dataset {info.name!r}. Valid {_choices(info)}")
    if not indices:
        raise ValueError(f"The label subset {spec!r} is empty. Valid {_choices(info)}")
    seen, dupes = set(), []
    for i in indices:
        if i in seen:
            dupes.append(f"{i} ({info.class_names[i]})")
        seen.add(i)
    if dupes:
        raise ValueError(f"The label subset {spec!r} names classes more than once: {', '.join(dupes)}")
    return tuple(int(i) for i in indices)


def compose_subsets(outer: Sequence[int], inner: Sequence[int]) -> list[int]:
    """Positions of `inner`'s classes among `outer`'s: the subset to extract from `outer`'s specialist.

    Both are global class indices; a specialist for `outer` has output j for
    class outer[j], so its `inner` specialist keeps outputs [outer.index(c) for c in inner].
    """
    pos = {c: j for j, c in enumerate(outer)}
    missing = [c for c in inner if c not in pos]
    if missing:
        raise ValueError(f"classes {missing} are not in the wider subset {list(outer)}: a specialist can only narrow")
    return [pos[c] for c in inner]


def parse_stages(spec: str, info: DatasetInfo) -> list[tuple[int, ...]]:
    """`'animals>livestock'` -> the subsets of gradual specialization, each inside the one before."""
    stages = [resolve_subset(part, info) for part in str(spec).split(">")]
    for outer, inner in itertools.pairwise(stages):
        compose_subsets(outer, inner)  # raises if a stage widens
    return stages
