"""The contract between the grid runner (`jaxspec.experiments.grid`) and an experiment kind.

A kind is a module of `jaxspec.experiments` listed in `KINDS` that defines
`KIND = Kind(...)`: how one cell is run and scored, and optionally how the
cells' specialists are trained ahead (K per vmapped step), the figures of the
report, and the paired effects the report computes.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from collections.abc import Callable, Mapping

import ml_collections

from jaxspec.train.context import RunContext

KINDS = ("cka", "detect", "forgetting", "lesion", "routed", "skd", "specialize")

# run_cell(ctx, config, cell) -> {metric: number, or `<name>_hits`: each test image's top-1 outcome, or
# `<name>_replicates`: a score under each of `stats.RESAMPLES` resamples of the test images, the same for
# every cell (a score that is not a mean over images, such as mAP: `jaxspec.detection.metrics.bootstrap_scores`)}
RunCell = Callable[[RunContext, ml_collections.ConfigDict, dict], dict]
REPLICATES = "_replicates"
# prepare(ctx, config, cells not yet done, max_k): trains the cells' specialists ahead, K per vmapped step
Prepare = Callable[[RunContext, ml_collections.ConfigDict, list, int], None]
# plots(ctx, config, cell records, out_dir) -> file names of the figures written into out_dir
Plots = Callable[[RunContext, ml_collections.ConfigDict, list, pathlib.Path], list]


@dataclasses.dataclass(frozen=True)
class Kind:
    run_cell: RunCell
    task: str = "classify"  # the run context its cells need: "classify" or "detect" (`config.task`)
    prepare: Prepare | None = None
    plots: Plots | None = None
    paired: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # effect -> (a, b): a - b


def load(name: str) -> Kind:
    """The `Kind` of module `jaxspec.experiments.<name>` (one of `KINDS`)."""
    if name not in KINDS:
        raise ValueError(f"experiment.kind={name!r}; allowed: {list(KINDS)}")
    kind = getattr(importlib.import_module(f"jaxspec.experiments.{name}"), "KIND", None)
    if not isinstance(kind, Kind):
        raise TypeError(f"jaxspec.experiments.{name} must define KIND = Kind(...)")
    return kind
