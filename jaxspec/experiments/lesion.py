"""Lesion and retrain (after Miao & Dobs, "competitive retraining") on the generalist.

Task A and task B are groups of classes (`lesion.task_a`, `lesion.task_b`); a
task's accuracy is the class-balanced top-1 on its test images with the argmax
over its own classes (the generalist as a multi-task network with one readout
per task). The units of `lesion.layer` are ranked by how much silencing each
alone lowers A's validation accuracy; A's units are the top `lesion.fraction`.

A cell {mode, retrain, seed} silences A's units (`mode`: none = no lesion,
the retraining control; init = zeroed once, free to recover; always = held at
zero throughout), retrains on `retrain`'s data (A, B or both; only those
classes' outputs compete) for `lesion.retrain` steps, and reports (accuracies
as fractions, differences in the same units):

- top1_{A,B}_before / top1_{A,B}: the original model / after retraining;
- delta_top1_{A,B} ± delta_top1_{A,B}_se: after − before, mean and standard
  error across the task's classes;
- impact_top1_{A,B}_before: accuracy lost when A's units are lesioned in the
  original model; impact_diff_top1_before = A's − B's (A's units are A-specific when > 0);
- impact_top1_{A,B}_after, impact_diff_top1_after: the same for A's units
  re-ranked in the retrained model (among live units: held ones carry nothing);
- overlap: the share of A's original units among the re-ranked ones.

Units are ranked on validation images and accuracies reported on test images, so the
choice of units is not fit to the reported numbers.

`lesion.layer='auto'` chooses the layer on validation too, before any cell:
each candidate (`lesion.candidates`, default every layer a parameter lesion can
silence) is scored by A's validation accuracy lost when its top units are
silenced together, and the layer losing most is used (`choose_layer`; the
scores go to each cell as `layer_impact_<layer>` and to `lesion/layers-*.json`).
`experiment.generalist_per_seed` gives each seed its own generalist (and its own
ranking and choice).
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np

from jaxspec import files, methods
from jaxspec.analysis import lesion
from jaxspec.data.constrain import ConstrainedSource
from jaxspec.data.subsets import resolve_subset
from jaxspec.experiments.kind import Kind
from jaxspec.experiments.specialize import seed_generalist
from jaxspec.train import driver
from jaxspec.train.state import to_model
from jaxspec.train.task import Outputs

MODES = ("none", "init", "always")
RETRAIN = ("A", "B", "both")


def _check_cell(cell: dict) -> tuple[str, str, int]:
    mode, retrain = cell.get("mode"), cell.get("retrain")
    if mode not in MODES:
        raise ValueError(f"Unknown lesion mode {mode!r} in cell {cell}; choose one of {list(MODES)}")
    if retrain not in RETRAIN:
        raise ValueError(f"Unknown retrain set {retrain!r} in cell {cell}; choose one of {list(RETRAIN)}")
    return mode, retrain, int(cell.get("seed", 0))


def tasks(config, info) -> dict[str, tuple[int, ...]]:
    """{'A': classes, 'B': classes} from the config; they must not share a class."""
    a, b = resolve_subset(config.lesion.task_a, info), resolve_subset(config.lesion.task_b, info)
    shared = sorted(set(a) & set(b))
    if shared:
        raise ValueError(f"lesion.task_a and lesion.task_b share classes {[info.class_names[c] for c in shared]}")
    return {"A": a, "B": b}


def _evaluators(ctx, trained: methods.Trained, path: str, task_classes: dict) -> dict[str, lesion.LesionEval]:
    cfg = ctx.config
    return {
        t: lesion.LesionEval(
            trained.modeldef,
            trained.state.params,
            path=path,
            columns=classes,
            mesh=ctx.mesh,
            data_cfg=cfg.data,
            batch_size=cfg.eval.batch_size,
            mean=ctx.info.mean,
            std=ctx.info.std,
            chunk=cfg.lesion.chunk,
        )
        for t, classes in task_classes.items()
    }


def _ranking(
    ctx, ev: lesion.LesionEval, trained: methods.Trained, path: str, task: tuple[int, ...], seed: int
) -> np.ndarray:
    """The seed's generalist's per-unit drops on A's validation data, computed once per workdir."""
    key = hashlib.sha256(json.dumps([path, list(task), seed]).encode()).hexdigest()[:12]
    file = pathlib.Path(ctx.workdir) / "lesion" / f"impact-{path.replace('/', '.')}-{key}.json"
    if file.exists():
        return np.asarray(json.loads(file.read_text())["drops"])
    _, drops = lesion.lesion_impact(ev, trained.state, ConstrainedSource(ctx.val, task), name=f"rank {path}")
    file.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(file, {"path": path, "task": list(task), "drops": drops.tolist()})
    return drops


def candidates(model, spec: str = "") -> list[str]:
    """The layers `lesion.layer='auto'` chooses among: `spec`'s (comma-separated), else every layer name a
    parameter lesion can silence (`pool` is `last_conv`'s units, so it is left out)."""
    names = [n.strip() for n in spec.split(",") if n.strip()] if spec else list(model.layer_names)
    out = []
    for name in names:
        if name in ("pool", "logits") and not spec:
            continue
        try:
            lesion.unit_layer(model, name)
        except ValueError:
            if spec:
                raise
            continue
        out.append(name)
    return out


def choose_layer(ctx, config, gen: methods.Trained, classes: dict, seed: int) -> tuple[str, dict[str, float]]:
    """`lesion.layer`'s parameter path; for 'auto', the candidate whose top units cost A the most validation
    accuracy when silenced together, with every candidate's cost."""
    cfg = config.lesion
    if cfg.layer != "auto":
        return lesion.unit_layer(gen.model, cfg.layer), {}
    file = pathlib.Path(ctx.workdir) / "lesion" / f"layers-seed{seed}.json"
    if file.exists():
        record = json.loads(file.read_text())
        return record["path"], record["impacts"]
    impacts = {}
    val_a = ConstrainedSource(ctx.val, classes["A"])
    for name in candidates(gen.model, cfg.get("candidates", "")):
        path = lesion.unit_layer(gen.model, name)
        ev = _evaluators(ctx, gen, path, {"A": classes["A"]})["A"]
        units = lesion.top_units(_ranking(ctx, ev, gen, path, classes["A"], seed), cfg.fraction)
        keeps = np.stack([np.ones(ev.num_units, bool), lesion.keep_mask(ev.num_units, units)])
        intact, lesioned = ev(gen.state, val_a, keeps, f"layer {name}")
        impacts[name] = float((intact - lesioned).mean())
    best = max(impacts, key=impacts.get)
    record = {"chosen": best, "path": lesion.unit_layer(gen.model, best), "impacts": impacts, "seed": seed}
    files.write_json(file, record)
    return record["path"], impacts


def _per_class(ctx, ev: lesion.LesionEval, state, task, units) -> tuple[np.ndarray, np.ndarray]:
    """Per-class test accuracy intact and with `units` lesioned."""
    keeps = np.stack([np.ones(ev.num_units, bool), lesion.keep_mask(ev.num_units, units)])
    intact, lesioned = ev(state, ConstrainedSource(ctx.test, task), keeps)
    return intact, lesioned


def run_cell(ctx, config, cell: dict) -> dict[str, float]:
    """One lesion-and-retrain condition; see the module docstring for what it returns."""
    mode, retrain, seed = _check_cell(cell)
    cfg = config.lesion
    classes = tasks(config, ctx.info)
    gen = seed_generalist(ctx, config, seed)
    path, impacts = choose_layer(ctx, config, gen, classes, seed)
    evs = _evaluators(ctx, gen, path, classes)
    units = lesion.top_units(_ranking(ctx, evs["A"], gen, path, classes["A"], seed), cfg.fraction)

    before = {t: _per_class(ctx, evs[t], gen.state, classes[t], units) for t in classes}
    start = {
        "none": gen.model,
        "init": lesion.lesion_model(gen.model, path, units),
        "always": lesion.hold_lesion(gen.model, path, units),
    }[mode]
    data = classes["A"] + classes["B"] if retrain == "both" else classes[retrain]
    d, s = driver.train_phase(
        ctx,
        f"lesion-{mode}-{retrain}-seed{seed}",
        start,
        ConstrainedSource(ctx.train, data),
        ConstrainedSource(ctx.val, data),
        cfg.retrain,
        seed,
        outputs=Outputs.of(columns=data),
    )
    model = to_model(d, s)
    if mode == "always":
        model = lesion.release_lesion(model, path)
    after = methods.frozen(ctx, model, gen.classes)

    live = np.setdiff1d(np.arange(evs["A"].num_units), units) if mode == "always" else None
    _, drops = lesion.lesion_impact(
        evs["A"], after.state, ConstrainedSource(ctx.val, classes["A"]), name=f"rank {path} after retraining"
    )
    units_after = lesion.top_units(drops, cfg.fraction, candidates=live)
    now = {t: _per_class(ctx, evs[t], after.state, classes[t], units_after) for t in classes}

    out = {}
    for t in classes:
        (orig, orig_lesioned), (new, new_lesioned) = before[t], now[t]
        delta = new - orig
        out |= {
            f"top1_{t}_before": orig.mean(),
            f"top1_{t}": new.mean(),
            f"delta_top1_{t}": delta.mean(),
            f"delta_top1_{t}_se": delta.std(ddof=1) / np.sqrt(len(delta)) if len(delta) > 1 else float("nan"),
            f"impact_top1_{t}_before": (orig - orig_lesioned).mean(),
            f"impact_top1_{t}_after": (new - new_lesioned).mean(),
        }
    for when in ("before", "after"):
        out[f"impact_diff_top1_{when}"] = out[f"impact_top1_A_{when}"] - out[f"impact_top1_B_{when}"]
    out["overlap"] = len(np.intersect1d(units, units_after)) / len(units)
    out |= {f"layer_impact_{name}": v for name, v in impacts.items()}
    return {k: float(v) for k, v in out.items()}


def plots(ctx, config, results: list[dict], out_dir: pathlib.Path) -> list[str]:
    """lesion.png: accuracy change per task, and lesion-impact difference before/after, per condition."""
    from matplotlib.figure import Figure

    from jaxspec.plots import save

    conditions = [
        (m, t)
        for m in MODES
        for t in RETRAIN
        if any(x["cell"]["mode"] == m and x["cell"]["retrain"] == t for x in results)
    ]

    def stat(mode, retrain, key):  # in percentage points
        v = 100 * np.array(
            [x["metrics"][key] for x in results if x["cell"]["mode"] == mode and x["cell"]["retrain"] == retrain]
        )
        return v.mean(), (v.std(ddof=1) if len(v) > 1 else 0.0)

    pos = np.arange(len(conditions))
    labels = [f"{m}\nretrain {t}" for m, t in conditions]
    fig = Figure(figsize=(max(8, 1.6 * len(conditions)), 4))
    ax1, ax2 = fig.subplots(1, 2)
    for j, t in enumerate(("A", "B")):
        mean = [stat(*c, f"delta_top1_{t}")[0] for c in conditions]
        se = [stat(*c, f"delta_top1_{t}_se")[0] for c in conditions]  # the class SE, averaged over seeds
        ax1.bar(pos + (j - 0.5) * 0.4, mean, 0.4, yerr=se, capsize=3, label=f"task {t}")
    ax1.axhline(0, color="k", lw=0.8)
    ax1.set(ylabel="top-1 change vs. original (points)", title="accuracy after retraining (± SE over classes)")
    for j, when in enumerate(("before", "after")):
        m, sd = zip(*(stat(*c, f"impact_diff_top1_{when}") for c in conditions))
        ax2.bar(pos + (j - 0.5) * 0.4, m, 0.4, yerr=sd, capsize=3, label=f"{when} retraining")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set(ylabel="impact on A − impact on B (points)", title="A-unit lesion specificity (± std over seeds)")
    for ax in (ax1, ax2):
        ax.set_xticks(pos, labels, fontsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return [save(fig, pathlib.Path(out_dir) / "lesion.png", dpi=120).name]


KIND = Kind(run_cell, plots=plots)
