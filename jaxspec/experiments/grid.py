"""Grids of experiment cells: expansion, resumable execution, mean ± std over seeds, report.

An experiment config is a normal run config plus
`experiment = dict(kind=..., grid=dict(axis=[values...], ..., seed=[...]))`.
Each cell (one value per axis) is handed to the kind's `run_cell(ctx, config, cell)`
(the contract is `jaxspec.experiments.kind.Kind`), which returns a flat dict of numbers. A cell's result is written to
`cells/<cell id>.json` atomically as soon as it is done, so an interrupted
grid resumes at the first unfinished cell (and a half-trained phase resumes
from its checkpoint). All cells share one run context, hence one generalist, or
one per seed with `experiment.generalist_per_seed` (then the grid runs seed
by seed). `plan.json` lists the planned cells and the wall time of each
invocation, the compute behind the numbers.

A `group` axis value `@name` expands to every group of grouping `name`
(`config.groupings[name]`, see `jaxspec.groupings`), and such grids also get
"average over groups" rows: per seed, the mean over groups, then mean ± std
over seeds.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import platform
import socket
import subprocess
import time

import jax
import ml_collections
import numpy as np

from jaxspec import classification, files, groupings, methods, tables, validate
from jaxspec.classification import Classification
from jaxspec.data.constrain import ConstrainedSource
from jaxspec.detection.task import Detection
from jaxspec.experiments import stats
from jaxspec.experiments.kind import KINDS, REPLICATES, load
from jaxspec.train import workdir as wdir
from jaxspec.train.context import RunContext, open_context

AVERAGE = "average over groups"


def cell_id(cell: dict) -> str:
    """A readable, file-name-safe identifier, e.g. `method=extract,group=lex0,seed=1`."""
    text = ",".join(f"{k}={v}" for k, v in cell.items())
    return "".join(c if c.isalnum() or c in "=,._-" else "_" for c in text)


def add_groupings(ctx: RunContext, config: ml_collections.ConfigDict) -> RunContext:
    """`ctx` with every grouping of `config.groupings` among its groups (confusion ones from the generalist)."""
    for name, cfg in (config.get("groupings") or {}).items():
        confusion = None
        if cfg.kind == "confusion":
            gen = methods.generalist(ctx)
            ev = classification.evaluator(ctx, gen.modeldef, ctx.info.num_classes, confusion=True)
            confusion = ev(gen.state, ctx.val)["confusion"]
        new = groupings.make_groups(cfg, ctx.info, confusion)
        clash = sorted(g for g in new if g in ctx.groups and tuple(ctx.groups[g]) != tuple(new[g]))
        if clash:
            raise ValueError(
                f"grouping {name!r} gives groups {clash} other classes than the groups of that "
                "name already known; rename the grouping"
            )
        ctx = ctx.with_groups(new, {name: tuple(new)})
    return ctx


def expand(grid: dict, ctx: RunContext, exclude=()) -> list[dict]:
    """The cartesian product of the grid's axes, in axis order, `@grouping` values expanded, less the cells
    that match an entry of `exclude` (`{axis: value or [values]}`, every axis named matching, `@grouping`
    expanded too): a design that is not a full product, e.g. the expensive scratch detector on one group
    only, or more seeds on one group than on the others."""
    axes = {axis: _expanded(axis, values, ctx) for axis, values in grid.items()}
    rules = [{k: _expanded(k, vs, ctx) for k, vs in _exclusion(rule, axes).items()} for rule in exclude]
    cells = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    return [c for c in cells if not any(all(c[k] in vs for k, vs in rule.items()) for rule in rules)]


def _expanded(axis: str, values, ctx: RunContext) -> list:
    out = []
    for v in values:
        if isinstance(v, str) and v.startswith("@"):
            if v[1:] not in ctx.groupings:
                raise ValueError(f"grid axis {axis!r}: unknown grouping {v!r}; known: {sorted(ctx.groupings)}")
            out.extend(ctx.groupings[v[1:]])
        else:
            out.append(v)
    return out


def _exclusion(rule, axes: dict) -> dict[str, list]:
    if not isinstance(rule, dict) or not rule or set(rule) - set(axes):
        validate.fail("experiment.exclude", rule, f"a dict of grid axes {list(axes)} to a value or a list of values")
    return {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in rule.items()}


def _without(cell: dict, axis: str) -> tuple:
    return tuple((k, v) for k, v in cell.items() if k != axis)


def _mean_std(records: list[dict], key_fn) -> list[dict]:
    """Rows `{cell, n, mean, std}` over the records sharing `key_fn(cell)` (sample std)."""
    by: dict[tuple, list[dict]] = {}
    for rec in records:
        by.setdefault(key_fn(rec["cell"]), []).append(rec["metrics"])
    rows = []
    for key, ms in by.items():
        names = [k for k in ms[0] if all(k in m for m in ms)]
        values = {k: np.array([m[k] for m in ms]) for k in names}
        rows.append(
            {
                "cell": dict(key),
                "n": len(ms),
                "mean": {k: float(v.mean()) for k, v in values.items()},
                "std": {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()},
            }
        )
    return rows


def aggregate(results: list[dict], group_sets: dict[str, set] | None = None) -> list[dict]:
    """Rows of mean ± std over the `seed` axis, plus per-seed averages over a `group` axis.

    The averages are over each set of `group_sets` (label -> groups; default:
    all groups under `AVERAGE`) that holds at least two of the cells' groups.
    """
    rows = _mean_std(results, lambda c: _without(c, "seed"))
    axes = list(results[0]["cell"]) if results else []
    if "group" not in axes:
        return rows
    for label, members in (group_sets or {AVERAGE: {r["cell"]["group"] for r in results}}).items():
        sub = [r for r in results if r["cell"]["group"] in members]
        groups = {r["cell"]["group"] for r in sub}
        if len(groups) < 2:
            continue
        # a seed that ran only some groups (e.g. extra seeds on one group) has no average over them
        have: dict = {}
        for r in sub:
            have.setdefault(_without(r["cell"], "group"), set()).add(r["cell"]["group"])
        sub = [r for r in sub if have[_without(r["cell"], "group")] == groups]
        averaged = [
            {"cell": {k: label if k == "group" else row["cell"][k] for k in axes}, "metrics": row["mean"]}
            for row in _mean_std(sub, lambda c: _without(c, "group"))
        ]
        rows += _mean_std(averaged, lambda c: _without(c, "seed"))
    return rows


def group_sets(grid: dict, ctx: RunContext) -> dict[str, set] | None:
    """One average per grouping when the `group` axis expands several (`@semantic`, `@random`), else None."""
    names = [v[1:] for v in grid.get("group", []) if isinstance(v, str) and v.startswith("@")]
    if len(names) < 2:
        return None
    return {f"{AVERAGE} ({name})": set(ctx.groupings[name]) for name in names}


def machine() -> dict:
    """Where the cells ran: host, processor, cores, devices, and the jaxspec commit when in a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=pathlib.Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "host": socket.gethostname(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "devices": f"{jax.device_count()} {jax.default_backend()}",
        "commit": commit,
    }


def run_grid(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) every cell, then writes results.json and report.md (workdir locked and checked)."""
    validate.check(config)
    if config.experiment.kind not in KINDS:
        validate.fail("experiment.kind", config.experiment.kind, f"one of {list(KINDS)}")
    for rule in config.experiment.get("exclude", ()):  # before anything trains (a confusion grouping would)
        _exclusion(rule, config.experiment.grid)
    with wdir.opened(workdir, config.to_dict(), overwrite=config.get("overwrite", False)):
        return _run_grid(config, workdir)


def _run_grid(config: ml_collections.ConfigDict, workdir: str) -> dict:
    t0 = time.time()
    kind = load(config.experiment.kind)
    task = Detection() if kind.task == "detect" else Classification()
    ctx = add_groupings(open_context(config, workdir, task), config)
    cells = expand(config.experiment.grid.to_dict(), ctx, config.experiment.get("exclude", ()))
    out_dir = ctx.workdir / "cells"
    out_dir.mkdir(exist_ok=True)
    pending = [c for c in cells if not (out_dir / f"{cell_id(c)}.json").exists()]
    lead = jax.process_index() == 0
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0))
    where = machine()  # once: it asks git for the commit
    if lead:
        _plan(ctx.workdir, cells, where, started, 0.0, 0)
    max_k = int(config.experiment.get("vmap", 8))
    done: dict[str, dict] = {}
    # One generalist per seed: seed by seed, so cells finish (and their numbers can be kept) early; one shared
    # generalist: all at once, so `prepare` vmaps specialists of every seed together.
    per_seed = config.experiment.get("generalist_per_seed", False)
    for seed_cells in _by_seed(cells) if per_seed else [cells]:
        todo = [c for c in seed_cells if not (out_dir / f"{cell_id(c)}.json").exists()]
        if todo and max_k > 1 and kind.prepare is not None:
            kind.prepare(ctx, config, todo, max_k)  # specialists of one generalist, K per vmapped step
        for cell in seed_cells:
            path = out_dir / f"{cell_id(cell)}.json"
            if path.exists():
                done[cell_id(cell)] = json.loads(path.read_text())
                continue
            if lead:
                print(
                    f"[experiment {config.experiment.kind}] cell {cells.index(cell) + 1}/{len(cells)}: {cell_id(cell)}",
                    flush=True,
                )
            start = time.time()
            values = kind.run_cell(ctx, config, cell)
            record = {
                "cell": cell,
                "metrics": {k: float(v) for k, v in values.items() if not k.endswith(("_hits", REPLICATES))},
                "seconds": time.time() - start,
            }
            if any(k.endswith("_hits") for k in values):
                record["hits"] = {k: stats.pack_hits(v) for k, v in values.items() if k.endswith("_hits")}
            if any(k.endswith(REPLICATES) for k in values):
                record["replicates"] = {
                    k.removesuffix(REPLICATES): stats.pack_floats(v)
                    for k, v in values.items()
                    if k.endswith(REPLICATES)
                }
            done[cell_id(cell)] = record
            if lead:
                files.write_json(path, record, indent=1)
                _plan(ctx.workdir, cells, where, started, time.time() - t0, sum(cell_id(c) in done for c in pending))
    results = [done[cell_id(c)] for c in cells]

    rows = aggregate(results, group_sets(config.experiment.grid.to_dict(), ctx))
    columns = list(config.experiment.get("columns", ())) or None
    table = tables.grid_means(rows, columns)
    paired = paired_statistics(results, kind.paired)
    if any(row["t_interval"] for row in paired):
        table += "\n\nPaired effects (per-seed differences; same generalist and test images):\n\n"
        table += paired_markdown(paired)
    plots = kind.plots(ctx, config, results, ctx.workdir) if kind.plots is not None else []
    if lead:  # the generalist's training and validation curves, when it was trained in this workdir
        from jaxspec import plots as run_plots  # matplotlib only once a report is written
        from jaxspec import report as run_report

        panels = run_plots.DETECTION_PANELS if config.get("task") == "detect" else run_plots.PANELS
        plots += run_report.write_curves(ctx.workdir, ["generalist"], panels=panels)
    summary = {
        "config": config.to_dict(),
        "groups": {k: list(ctx.groups[k]) for ks in ctx.groupings.values() for k in ks},
        "cells": results,
        "rows": rows,
        "paired": paired,
        "plots": plots,
        "seconds": time.time() - t0,
        "machine": where,
    }
    if lead:
        files.write_json(ctx.workdir / "results.json", summary, indent=1)
        title = config.experiment.get("title", config.experiment.kind)
        report = [
            f"# {title}",
            "",
            config.experiment.get("description", ""),
            "",
            f"Data: {ctx.info.name} ({ctx.info.num_classes} classes), model {config.model.name} "
            f"(width {config.model.get('width_multiplier', '-')}"
            + (f", first {config.model.num_blocks} blocks" if config.model.get("num_blocks") else "")
            + "), "
            f"seeds {sorted({c.get('seed') for c in cells})}; "
            "mean ± std over seeds (sample std), accuracies in %.",
            "",
            table,
            "",
        ]
        report += [f"![{p}]({p})" for p in plots]
        files.write_atomic(ctx.workdir / "report.md", "\n".join(report) + "\n")
        print("\n" + table + f"\n\nreport: {ctx.workdir / 'report.md'}  ({summary['seconds']:.0f}s)", flush=True)
    ctx.writer.close()
    return summary


def _by_seed(cells: list[dict]) -> list[list[dict]]:
    """The cells split by seed, seeds in order of first appearance, each list in grid order."""
    by: dict = {}
    for c in cells:
        by.setdefault(c.get("seed"), []).append(c)
    return list(by.values())


def _plan(workdir: pathlib.Path, cells: list[dict], where: dict, started: str, seconds: float, finished: int) -> None:
    """`plan.json`: every cell the grid will run, the machine, and each invocation's wall time so far, kept
    current after every cell (the compute behind the grid; `jaxspec.experiments.results --collect` copies it)."""
    path = workdir / "plan.json"
    plan = json.loads(path.read_text()) if path.exists() else {"invocations": []}
    plan.update(cells=[cell_id(c) for c in cells], machine=where)
    runs = [run for run in plan["invocations"] if run["started"] != started]
    run = {"started": started, "seconds": seconds, "cells": finished, "commit": where.get("commit", "")}
    plan["invocations"] = [*runs, run]
    files.write_json(path, plan, indent=1)


def score(
    ctx: RunContext, trained: methods.Trained, subset, prefix: str, *, split: str = "test", hits: bool = False
) -> dict:
    """`{prefix}_top1`, `{prefix}_top2` of `trained` on the `split` ('test' or 'val') images of `subset`;
    `hits` adds `{prefix}_hits`, each image's top-1 outcome, for the paired bootstrap."""
    source = {"test": ctx.test, "val": ctx.val}[split]
    m = methods.evaluate_on(ctx, trained, ConstrainedSource(source, subset), per_example=hits)
    tag = "" if split == "test" else f"_{split}"
    out = {f"{prefix}{tag}_top1": m["top1"], f"{prefix}{tag}_top2": m["top2"]}
    if hits:
        out[f"{prefix}{tag}_hits"] = m["hits"]
    return out


def paired_statistics(results: list[dict], pairs: dict[str, tuple[str, str]]) -> list[dict]:
    """Per set of cells differing only in seed, for each `metric: (a, b)` of `pairs` (metric = a - b per seed):
    the 95% t-interval over seeds and a paired bootstrap over the pooled test images of every seed."""
    out = []
    for setting, recs in stats.by_setting(results):
        row = {"cell": setting, "n": len(recs), "t_interval": {}, "bootstrap": {}, "seeds_for_0.5": {}}
        for metric, pair in pairs.items():
            e = stats.paired_effect(recs, metric, pair)
            if e is None:
                continue
            row["t_interval"][metric] = [e.t.mean, e.t.low, e.t.high]
            if len(e.values) > 1:
                row["seeds_for_0.5"][metric] = stats.seeds_to_resolve(e.sd, 0.005)
            if e.boot is not None:
                row["bootstrap"][metric] = [e.boot.mean, e.boot.low, e.boot.high]
        out.append(row)
    return out


def paired_markdown(rows: list[dict]) -> str:
    """The paired effects in top-1 points: mean, 95% t-interval over seeds, bootstrap interval, seeds for ±0.5."""
    lines = []
    for row in rows:
        for metric, (mean, low, high) in row["t_interval"].items():
            boot = row["bootstrap"].get(metric)
            lines.append(
                f"| {cell_id(row['cell'])} | {metric} | {row['n']} | {100 * mean:+.2f} | "
                f"[{100 * low:+.2f}, {100 * high:+.2f}] | "
                + (f"[{100 * boot[1]:+.2f}, {100 * boot[2]:+.2f}]" if boot else "-")
                + " | "
                + str(row["seeds_for_0.5"].get(metric, "-"))
                + " |"
            )
    if not lines:
        return ""
    return "\n".join(
        [
            "| cells | effect | seeds | mean (points) | 95% t-interval | paired bootstrap (images) | seeds for ±0.5 |",
            "|---|---|---:|---:|---:|---:|---:|",
            *lines,
        ]
    )
