"""Experiment kind `detect`: one detection specialist per cell, scored against the generalist (paper Tables 4-7).

Cell axes: `group` (a subset spec: a group or class name, or a chain such as
`animals>horse` for gradual specialization), `method` (suppress | slice |
scratch, see `jaxspec.detection.run`), `seed`, and any field of
`config.specialize` (e.g. `freeze`, `freeze_bn_stats`). Metrics on the final
subset's test images: the generalist restricted to S, the specialist, and
the differences `dF`, `dmAP50`, `dmAP50_95` (specialist - generalist), as
fractions. With `experiment.bars`, `plots` draws dF per group.
"""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from jaxspec.data.subsets import parse_stages
from jaxspec.detection import run
from jaxspec.experiments.grid import cell_id
from jaxspec.experiments.kind import Kind
from jaxspec.experiments.specialize import phase_for
from jaxspec.methods import generalist, restricted

_SHORT = {"fitness": "F", "mAP50": "mAP50", "mAP50_95": "mAP50_95"}


def _scores(metrics: dict, prefix: str) -> dict[str, float]:
    return {f"{prefix}_{short}": metrics[key] for key, short in _SHORT.items()}


def run_cell(ctx, config, cell: dict) -> dict[str, float]:
    if "group" not in cell:
        raise ValueError(f"a `detect` grid needs a `group` axis; got axes {list(cell)}")
    stages = parse_stages(cell["group"], ctx.info)
    method, seed = cell.get("method", config.specialize.method), int(cell.get("seed", 0))
    if method == "scratch" and len(stages) > 1:
        raise ValueError(f"method 'scratch' trains one detector on the final subset; got the chain {cell['group']!r}")
    phase = phase_for(config, cell)
    gen = generalist(ctx)
    final = stages[-1]
    out = _scores(run.evaluate(ctx, restricted(gen, final), final), "generalist")
    parent = gen
    for k, subset in enumerate(stages if method != "scratch" else stages[-1:]):
        parent = run.specialize_from(
            ctx, parent, subset, method, seed=seed, name=f"cell-{cell_id(cell)}-stage{k}", phase=phase
        )
    out |= _scores(run.evaluate(ctx, parent, final), "specialist")
    for short in _SHORT.values():
        out[f"d{short}"] = out[f"specialist_{short}"] - out[f"generalist_{short}"]
    return out


def plots(ctx, config, results: list[dict], out_dir: pathlib.Path) -> list[str]:
    """dF (specialist - generalist) per group and method, mean and std over seeds (the paper's Table 6 as bars)."""
    if not config.experiment.get("bars", False):
        return []
    by: dict[tuple[str, str], list[float]] = {}
    for rec in results:
        key = (str(rec["cell"]["group"]), str(rec["cell"].get("method", config.specialize.method)))
        by.setdefault(key, []).append(100 * rec["metrics"]["dF"])
    groups = sorted({g for g, _ in by})
    kinds = sorted({m for _, m in by})
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(groups) * len(kinds) + 1.5), 3.6))
    for j, method in enumerate(kinds):
        vals = [by.get((g, method), [np.nan]) for g in groups]
        ax.bar(
            np.arange(len(groups)) + j * width,
            [np.mean(v) for v in vals],
            width,
            yerr=[np.std(v) for v in vals],
            label=method,
            capsize=3,
        )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(groups)) + width * (len(kinds) - 1) / 2, groups, rotation=30, ha="right")
    ax.set(ylabel="ΔF = F(specialist) - F(generalist), points", title="Specialization gain per group")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "delta_f.png", dpi=120)
    plt.close(fig)
    return ["delta_f.png"]


KIND = Kind(run_cell, task="detect", plots=plots)
