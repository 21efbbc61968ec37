"""ImageNet-1k's classes grouped by WordNet, from the table shipped beside this module.

The table (`imagenet_wordnet.json`) is made, and checked, by `make_imagenet_wordnet.py` from WordNet 3.0.
Both the data sources (the imagenet2012 groups) and the groupings (the semantic grouping) read it here.
"""

from __future__ import annotations

import functools
import json
import pathlib


@functools.cache
def table() -> dict:
    """The shipped table: every ImageNet-1k class (wnid -> index, coarse and fine group) and the group names."""
    return json.loads((pathlib.Path(__file__).parent / "imagenet_wordnet.json").read_text())


def groups(level: str = "coarse") -> dict[str, tuple[int, ...]]:
    """ImageNet-1k's WordNet groups from the shipped table (`jaxspec/data/imagenet_wordnet.json`).

    "coarse": the paper's animals (398, classes 0-397), artifacts (522) and
    miscellaneous (80). "fine": 9 groups named by their WordNet root (animal,
    artifact, abstraction, matter, geological_formation, person,
    natural_object, plant, fungus). See `jaxspec/data/make_imagenet_wordnet.py`.
    """
    if level not in ("coarse", "fine"):
        raise ValueError(f"Unknown WordNet level {level!r}; choose 'coarse' or 'fine'")
    table_ = table()
    members: dict[str, list[int]] = {g: [] for g in table_[f"{level}_groups"]}
    for c in table_["classes"].values():
        members[c[level]].append(c["index"])
    return {g: tuple(sorted(v)) for g, v in members.items()}
