"""Experiment kind `routed` (paper Table 2): generalist + one specialist per group vs the generalist alone.

Cell axes: `grouping` (a name in `config.groupings`), `method`, `seed`. The
group specialists are trained exactly as the `specialize` kind trains them
(same checkpoint names), so a workdir that ran Table 1 first reuses them.
Metrics on the whole test split (all classes): routed top-1, generalist
top-1, the `continued` control's top-1, routing accuracy (the generalist's
pick lies in the true class's group), and how often a specialist fell back;
`gain_top1` = routed - generalist and `gain_vs_control_top1` = routed -
control, with each image's outcome per model for the paired bootstrap.
`experiment.generalist_per_seed` gives each seed its own generalist.
"""

from __future__ import annotations

from jaxspec import classification, methods, route
from jaxspec.experiments.grid import cell_id
from jaxspec.experiments.kind import Kind
from jaxspec.experiments.specialize import seed_generalist


def _jobs(ctx, config, cell: dict) -> list[methods.Job]:
    """The group specialists of a cell, named as the `specialize` kind names the same specialist."""
    method, seed = cell.get("method", config.specialize.method), int(cell.get("seed", 0))
    return [
        methods.Job(
            tuple(ctx.groups[g]),
            method,
            seed,
            f"cell-{cell_id({'group': g, 'method': method, 'seed': seed})}",
            config.specialize,
        )
        for g in ctx.groupings[cell["grouping"]]
    ]


def prepare(ctx, config, cells: list[dict], max_k: int) -> None:
    """Trains all cells' vmappable group specialists together (`methods.train_together`) before the cells run."""
    jobs = [j for c in cells if c.get("grouping") in ctx.groupings for j in _jobs(ctx, config, c)]
    seeds = {int(c.get("seed", 0)) for c in cells}
    if config.experiment.get("generalist_per_seed", False) and len(seeds) > 1:
        raise ValueError(f"one generalist per seed: prepare one seed's cells at a time, not seeds {sorted(seeds)}")
    methods.train_together(ctx, seed_generalist(ctx, config, min(seeds, default=0)), jobs, max_k)


def run_cell(ctx, config, cell: dict) -> dict[str, float]:
    grouping, seed = cell["grouping"], int(cell.get("seed", 0))
    if grouping not in ctx.groupings:
        raise ValueError(f"unknown grouping {grouping!r}; known: {sorted(ctx.groupings)}")
    gen = seed_generalist(ctx, config, seed)
    models, maps = [], []
    for job in _jobs(ctx, config, cell):
        trained = methods.specialize_from(ctx, gen, job.subset, job.method, seed=seed, name=job.name, phase=job.phase)
        model, label_map = route.as_specialist(trained)
        models.append(model)
        maps.append(label_map)
    system = route.build_routed(gen.model, models, maps, mean=ctx.info.mean, std=ctx.info.std, mesh=ctx.mesh)
    res = route.evaluate(system, ctx.test, config.data, batch_size=config.eval.batch_size, per_example=True)
    out = {
        "routed_top1": res["top1"],
        "generalist_top1": res["generalist_top1"],
        "routing_accuracy": res["routing_accuracy"],
        "fallback_rate": res["fallback_rate"],
        "gain_top1": res["top1"] - res["generalist_top1"],
        "routed_hits": res["hits"],
        "generalist_hits": res["generalist_hits"],
    }
    if config.specialize.control:
        control = methods.specialize_from(
            ctx,
            gen,
            range(ctx.info.num_classes),
            "continued",
            seed=seed,
            name=f"control-seed{seed}",
            phase=config.specialize,
        )
        evaluator = classification.evaluator(ctx, control.modeldef, ctx.info.num_classes, per_example=True)
        m = evaluator(control.state, ctx.test)
        out |= {"control_top1": m["top1"], "control_hits": m["hits"], "gain_vs_control_top1": res["top1"] - m["top1"]}
    return out


PAIRED = {"gain_top1": ("routed", "generalist"), "gain_vs_control_top1": ("routed", "control")}

KIND = Kind(run_cell, prepare=prepare, paired=PAIRED)
