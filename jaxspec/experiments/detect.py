"""Experiment kind `detect`: one detection specialist per cell, scored against the generalist (paper Tables 4-7).

Cell axes: `group` (a subset spec: a group or class name, or a chain such as
`animals>horse` for gradual specialization), `method` (suppress | slice |
scratch, see `jaxspec.detection.run`), `seed`, and any field of
`config.specialize` (e.g. `freeze`, `freeze_bn_stats`). Metrics on the final
subset's test images: the generalist restricted to S, the specialist, with
`specialize.control` the `continued` control (the generalist trained on all
scenes for the specialist's steps, restricted to S), and the differences
`dF`, `dmAP50`, `dmAP50_95` (specialist - generalist; `..._vs_control`:
specialist - control), as fractions. `experiment.generalist_per_seed`
trains one generalist per seed, so seeds replicate the whole pipeline.
`experiment.equal_steps` (a chain, e.g. `animals>horse`) gives the one-stage
cells of its last subset (direct `horse`) as many steps as the chain's stages
take together (Table 5 at equal total steps); other groups keep their own.
mAP is not a mean over images, so each model's scores under
`stats.RESAMPLES` resamples of the test images (the same for every cell) are
kept for the paired bootstrap. With `experiment.bars`, `plots` draws dF per group.
"""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

from jaxspec.data.subsets import parse_stages
from jaxspec.detection import metrics, run
from jaxspec.detection.task import with_steps
from jaxspec.experiments import stats
from jaxspec.experiments.grid import cell_id
from jaxspec.experiments.kind import REPLICATES, Kind
from jaxspec.experiments.specialize import CONTROL_FIELDS, control_name, phase_for, seed_generalist
from jaxspec.methods import restricted

_SHORT = {"fitness": "F", "mAP50": "mAP50", "mAP50_95": "mAP50_95"}
PAIRED = {f"d{s}": (f"specialist_{s}", f"generalist_{s}") for s in _SHORT.values()} | {
    f"d{s}_vs_control": (f"specialist_{s}", f"control_{s}") for s in _SHORT.values()
}


def _scores(metrics: dict, prefix: str) -> dict[str, float]:
    return {f"{prefix}_{short}": metrics[key] for key, short in _SHORT.items()}


def _steps(ctx, phase, stages) -> int:
    """Training steps of `phase` through `stages`, each stage's epochs counted over its own D_S."""
    return sum(with_steps(phase, len(run.constrained(ctx, ctx.train, s))).steps for s in stages)


def _fixed(phase, steps: int) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(phase.to_dict())
    out.steps, out.epochs = steps, 0.0
    return out


def run_cell(ctx, config, cell: dict) -> dict:
    if "group" not in cell:
        raise ValueError(f"a `detect` grid needs a `group` axis; got axes {list(cell)}")
    stages = parse_stages(cell["group"], ctx.info)
    method, seed = cell.get("method", config.specialize.method), int(cell.get("seed", 0))
    if method == "scratch" and len(stages) > 1:
        raise ValueError(f"method 'scratch' trains one detector on the final subset; got the chain {cell['group']!r}")
    phase = phase_for(config, cell)
    chain = parse_stages(config.experiment.equal_steps, ctx.info) if config.experiment.get("equal_steps") else []
    equal = len(stages) == 1 and method != "scratch" and chain[-1:] == stages
    if equal:
        phase = _fixed(phase, _steps(ctx, phase, chain))
    gen = seed_generalist(ctx, config, seed)
    final = stages[-1]
    models = {"generalist": restricted(gen, final)}
    parent = gen
    for k, subset in enumerate(stages if method != "scratch" else stages[-1:]):
        parent = run.specialize_from(
            ctx, parent, subset, method, seed=seed, name=f"cell-{cell_id(cell)}-stage{k}", phase=phase
        )
    models["specialist"] = parent
    if config.specialize.get("control", False):
        control = phase_for(config, cell, CONTROL_FIELDS)
        control = _fixed(control, phase.steps if equal else _steps(ctx, control, stages))
        trained = run.continued(ctx, gen, seed=seed, name=control_name(cell, seed, control.steps), phase=control)
        models["control"] = restricted(trained, final)
    out, weights = {}, None
    for prefix, trained in models.items():
        scores, found = run.detect(ctx, trained, final)
        out |= _scores(scores, prefix)
        matches = found.matches()
        if weights is None:
            weights = metrics.resample_weights(len(matches.image_ids), stats.RESAMPLES)
            out["test_images"] = len(matches.image_ids)
        for key, values in metrics.bootstrap_scores(matches, weights).items():
            out[f"{prefix}_{_SHORT[key]}{REPLICATES}"] = values
    for effect, (a, b) in PAIRED.items():
        if a in out and b in out:
            out[effect] = out[a] - out[b]
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


KIND = Kind(run_cell, task="detect", plots=plots, paired=PAIRED)
