"""Experiment kind `specialize`: one specialist per cell, scored beside the generalist and the control.

Cell axes: `group` (a named subset), `method` (see `jaxspec.methods`),
`seed`, and any field of `config.specialize` (e.g. `freeze`,
`freeze_bn_stats`, `dustbin_fraction`) to vary it across cells. Metrics on
the group's test images: generalist restricted to S, the `continued` control
restricted to S (one per seed, shared by all groups), the specialist, and
the gains. With `experiment.curves`, `plots` draws validation accuracy over
fine-tuning steps per method (the paper's Fig. 5a).
"""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from jaxspec import methods  # noqa: E402
from jaxspec.experiments.grid import cell_id, score  # noqa: E402
from jaxspec.run import restricted  # noqa: E402
from jaxspec.train import history  # noqa: E402

_CELL_AXES = ("group", "method", "seed")


def phase_for(config: ml_collections.ConfigDict, cell: dict) -> ml_collections.ConfigDict:
    """`config.specialize` with the cell's overrides; an axis that is not a field is an error."""
    phase = ml_collections.ConfigDict(config.specialize.to_dict())
    for k, v in cell.items():
        if k in _CELL_AXES:
            continue
        if k not in phase:
            raise ValueError(f"grid axis {k!r} is neither one of {_CELL_AXES} nor a field of config.specialize "
                             f"({sorted(phase)})")
        phase[k] = v
    return phase


def _name(cell: dict) -> str:
    return f"cell-{cell_id(cell)}"


def prepare(r, config, cells: list[dict], max_k: int) -> None:
    """Trains the cells' vmappable specialists together (`methods.train_together`) before the cells run."""
    jobs = [methods.Job(tuple(r.groups[c["group"]]), c.get("method", phase.method), int(c.get("seed", 0)), _name(c),
                        phase) for c in cells if c.get("group") in r.groups for phase in [phase_for(config, c)]]
    methods.train_together(r, r.generalist(), jobs, max_k)


def run_cell(r, config, cell: dict) -> dict[str, float]:
    if "group" not in cell:
        raise ValueError(f"a `specialize` grid needs a `group` axis; got axes {list(cell)}")
    if cell["group"] not in r.groups:
        raise ValueError(f"unknown group {cell['group']!r}; known: {sorted(r.groups)}")
    subset, seed = r.groups[cell["group"]], int(cell.get("seed", 0))
    phase = phase_for(config, cell)
    method = cell.get("method", phase.method)
    gen = r.generalist()
    out = score(r, restricted(gen, subset), subset, "generalist")
    spec = methods.specialize_from(r, gen, subset, method, seed=seed, name=_name(cell), phase=phase)
    out |= score(r, spec, subset, "specialist")
    out["gain_top1"] = out["specialist_top1"] - out["generalist_top1"]
    out["gain_top2"] = out["specialist_top2"] - out["generalist_top2"]
    if config.specialize.control:
        control = methods.specialize_from(r, gen, subset, "continued", seed=seed, name=f"control-seed{seed}",
                                          phase=config.specialize)
        out |= score(r, control, subset, "control")
        out["gain_vs_control_top1"] = out["specialist_top1"] - out["control_top1"]
    return out


def plots(r, config, results: list[dict], out_dir: pathlib.Path) -> list[str]:
    """Validation top-1 over fine-tuning steps, one line per method (mean ± std over seeds), per group."""
    if not config.experiment.get("curves", False):
        return []
    hist = history.read_history(r.workdir / "metrics.jsonl")
    curves: dict[tuple, list[list[tuple[int, float]]]] = {}
    for rec in results:
        cell = rec["cell"]
        points = hist.get(f"{_name(cell)}/val_top1")
        if points:
            curves.setdefault((cell["group"], cell.get("method", config.specialize.method)), []).append(points)
    if not curves:
        return []
    groups = sorted({g for g, _ in curves})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for (g, method), runs in sorted(curves.items()):
            if g != group:
                continue
            n = min(len(p) for p in runs)
            steps = np.array([s for s, _ in runs[0][:n]])
            vals = 100 * np.array([[v for _, v in p[:n]] for p in runs])
            ax.plot(steps, vals.mean(0), label=f"{method} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(steps, vals.mean(0) - vals.std(0), vals.mean(0) + vals.std(0), alpha=0.2)
        ax.set(title=f"S = {group}", xlabel="fine-tuning step", ylabel="validation top-1 on S (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=120)
    plt.close(fig)
    return ["curves.png"]
