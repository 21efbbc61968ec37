"""Experiment kind `routed` (paper Table 2): generalist + one specialist per group vs the generalist alone.

Cell axes: `grouping` (a name in `config.groupings`), `method`, `seed`. The
group specialists are trained exactly as the `specialize` kind trains them
(same checkpoint names), so a workdir that ran Table 1 first reuses them.
Metrics on the whole test split (all classes): routed top-1, generalist
top-1, the `continued` control's top-1, routing accuracy (the generalist's
pick lies in the true class's group), and how often a specialist fell back.
"""

from __future__ import annotations

from jaxspec import methods, route
from jaxspec.experiments.grid import cell_id


def _jobs(r, config, cell: dict) -> list[methods.Job]:
    """The group specialists of a cell, named as the `specialize` kind names the same specialist."""
    method, seed = cell.get("method", config.specialize.method), int(cell.get("seed", 0))
    return [methods.Job(tuple(r.groups[g]), method, seed, f"cell-{cell_id({'group': g, 'method': method, 'seed': seed})}",
                        config.specialize) for g in r.groupings[cell["grouping"]]]


def prepare(r, config, cells: list[dict], max_k: int) -> None:
    """Trains all cells' vmappable group specialists together (`methods.train_together`) before the cells run."""
    jobs = [j for c in cells if c.get("grouping") in r.groupings for j in _jobs(r, config, c)]
    methods.train_together(r, r.generalist(), jobs, max_k)


def run_cell(r, config, cell: dict) -> dict[str, float]:
    grouping, seed = cell["grouping"], int(cell.get("seed", 0))
    if grouping not in r.groupings:
        raise ValueError(f"unknown grouping {grouping!r}; known: {sorted(r.groupings)}")
    gen = r.generalist()
    models, maps = [], []
    for job in _jobs(r, config, cell):
        trained = methods.specialize_from(r, gen, job.subset, job.method, seed=seed, name=job.name, phase=job.phase)
        model, label_map = route.as_specialist(trained)
        models.append(model)
        maps.append(label_map)
    system = route.build_routed(gen.model, models, maps, mean=r.info.mean, std=r.info.std, mesh=r.mesh)
    res = route.evaluate(system, r.test, config.data, batch_size=config.eval.batch_size)
    out = {"routed_top1": res["top1"], "generalist_top1": res["generalist_top1"],
           "routing_accuracy": res["routing_accuracy"], "fallback_rate": res["fallback_rate"],
           "gain_top1": res["top1"] - res["generalist_top1"]}
    if config.specialize.control:
        control = methods.specialize_from(r, gen, range(r.info.num_classes), "continued", seed=seed,
                                          name=f"control-seed{seed}", phase=config.specialize)
        out["control_top1"] = r.evaluator(control.modeldef, r.info.num_classes)(control.state, r.test)["top1"]
    return out
