"""Experiment kind `specialize`: one specialist per cell, scored beside the generalist and the control.

Cell axes: `group` (a named subset), `draw` (`semantic`, the default: the
group itself; `random`: a group of its size from the same source, drawn by the
cell's seed, `groupings.random_like`), `method` (see `jaxspec.methods`),
`seed`, and any field of `config.specialize` (e.g. `freeze`,
`freeze_bn_stats`, `dustbin_fraction`; `lr` stands for `optim.lr`) to vary
it across cells. Metrics on the group's test images: generalist
restricted to S, the `continued` control restricted to S, the specialist,
and the gains (`PAIRED`: per seed, same generalist, same images; each
image's outcome is kept for the paired bootstrap).

The control trains as long and as the specialist does: the cell's overrides
of `CONTROL_FIELDS` apply to it too, so a sweep over lengths or learning
rates compares each specialist with its equal-length control (one control
per seed and setting, shared by the groups). `experiment.generalist_per_seed`
trains one generalist per seed, so seeds replicate the whole pipeline;
`experiment.validation` also scores every model on the validation images,
for choosing a setting without looking at test. With `experiment.curves`,
`plots` draws validation accuracy over fine-tuning steps per method (the
paper's Fig. 5a).
"""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from jaxspec import groupings, methods  # noqa: E402
from jaxspec.experiments.grid import cell_id, score  # noqa: E402
from jaxspec.experiments.kind import Kind  # noqa: E402
from jaxspec.train import history  # noqa: E402

_CELL_AXES = ("group", "draw", "method", "seed")
DRAWS = ("semantic", "random")
CONTROL_FIELDS = ("steps", "batch_size", "label_smoothing", "optim", "freeze_bn_stats")
ALIASES = {"lr": "optim.lr"}  # config keys cannot hold dots, so nested fields get short axis names
PAIRED = {"gain_top1": ("specialist", "generalist"), "gain_vs_control_top1": ("specialist", "control")}


def phase_for(config: ml_collections.ConfigDict, cell: dict, fields=None) -> ml_collections.ConfigDict:
    """`config.specialize` with the cell's overrides (only those under `fields`, when given); an axis that
    is not a field is an error."""
    phase = ml_collections.ConfigDict(config.specialize.to_dict())
    for k, v in cell.items():
        field = ALIASES.get(k, k)
        if k in _CELL_AXES or (fields is not None and field.split(".")[0] not in fields):
            continue
        *parents, leaf = field.split(".")
        node = phase
        for p in parents:
            node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ValueError(
                f"grid axis {k!r} is neither one of {_CELL_AXES} nor a field of config.specialize ({sorted(phase)})"
            )
        node[leaf] = v
    return phase


def control_name(cell: dict, seed: int, steps: int | None = None) -> str:
    """The `continued` control's phase. It trains the generalist on every class, so it depends on the seed,
    its length (`steps`, where groups' lengths differ) and the control fields the cell sets, not on the
    group or method: cells that agree on those share one control."""
    own = {k: v for k, v in cell.items() if k not in _CELL_AXES and ALIASES.get(k, k).split(".")[0] in CONTROL_FIELDS}
    return f"control-seed{seed}" + (f"-steps{steps}" if steps else "") + (f"-{cell_id(own)}" if own else "")


def _name(cell: dict) -> str:
    return f"cell-{cell_id(cell)}"


def subset_of(ctx, cell: dict) -> tuple[int, ...]:
    """The classes of the cell's `group` (and `draw`)."""
    if "group" not in cell:
        raise ValueError(f"a `specialize` grid needs a `group` axis; got axes {list(cell)}")
    if cell["group"] not in ctx.groups:
        raise ValueError(f"unknown group {cell['group']!r}; known: {sorted(ctx.groups)}")
    draw = cell.get("draw", "semantic")
    if draw not in DRAWS:
        raise ValueError(f"grid axis 'draw': {draw!r} is not one of {list(DRAWS)}")
    if draw == "random":
        return groupings.random_like(ctx.info, cell["group"], int(cell.get("seed", 0)))
    return tuple(ctx.groups[cell["group"]])


def parent_seed(config, seed: int) -> int:
    """The seed whose generalists a cell of seed `seed` uses: its own with `experiment.generalist_per_seed`,
    else the run's (`config.seed`)."""
    return int(seed) if config.experiment.get("generalist_per_seed", False) else config.seed


def seed_generalist(ctx, config, seed: int):
    """The cell's generalist: the one of `parent_seed`."""
    return methods.generalist(ctx, parent_seed(config, seed))


def prepare(ctx, config, cells: list[dict], max_k: int) -> None:
    """Trains the cells' vmappable specialists together (`methods.train_together`) before the cells run,
    K at a time from each generalist."""
    by_parent: dict[int, list] = {}
    for c in cells:
        if c.get("group") in ctx.groups and c.get("draw", "semantic") in DRAWS:
            phase, seed = phase_for(config, c), int(c.get("seed", 0))
            job = methods.Job(subset_of(ctx, c), c.get("method", phase.method), seed, _name(c), phase)
            by_parent.setdefault(parent_seed(config, seed), []).append(job)
    for key, jobs in by_parent.items():
        methods.train_together(ctx, methods.generalist(ctx, key), jobs, max_k)


def run_cell(ctx, config, cell: dict) -> dict[str, float]:
    subset, seed = subset_of(ctx, cell), int(cell.get("seed", 0))
    phase = phase_for(config, cell)
    method = cell.get("method", phase.method)
    gen = seed_generalist(ctx, config, seed)
    models = {
        "generalist": methods.restricted(gen, subset),
        "specialist": methods.specialize_from(ctx, gen, subset, method, seed=seed, name=_name(cell), phase=phase),
    }
    if config.specialize.control:
        models["control"] = methods.specialize_from(
            ctx,
            gen,
            subset,
            "continued",
            seed=seed,
            name=control_name(cell, seed),
            phase=phase_for(config, cell, CONTROL_FIELDS),
        )
    out = {}
    for prefix, trained in models.items():
        out |= score(ctx, trained, subset, prefix, hits=True)
        if config.experiment.get("validation", False):
            out |= score(ctx, trained, subset, prefix, split="val")
    for tag in ("", "_val"):
        if f"specialist{tag}_top1" in out:
            out[f"gain{tag}_top1"] = out[f"specialist{tag}_top1"] - out[f"generalist{tag}_top1"]
            out[f"gain{tag}_top2"] = out[f"specialist{tag}_top2"] - out[f"generalist{tag}_top2"]
            if "control" in models:
                out[f"gain_vs_control{tag}_top1"] = out[f"specialist{tag}_top1"] - out[f"control{tag}_top1"]
    return out


def plots(ctx, config, results: list[dict], out_dir: pathlib.Path) -> list[str]:
    """Validation top-1 over fine-tuning steps, one line per method (mean ± std over seeds), per group."""
    if not config.experiment.get("curves", False):
        return []
    hist = history.read_history(ctx.workdir / "metrics.jsonl")
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


KIND = Kind(run_cell, prepare=prepare, plots=plots, paired=PAIRED)
