"""The main job: generalist -> specialist(s) -> evaluation on S.

`specialize.method` picks how the specialist is made (see `jaxspec.methods`);
`specialize.subset='animals>livestock'` specializes gradually, each stage's
specialist being the next one's generalist. Each phase checkpoints into the workdir, so rerunning the same command on a
finished or interrupted workdir resumes from the latest checkpoint instead of
starting over; a finished phase is only evaluated again.
"""

from __future__ import annotations

import time

import jax
import ml_collections

from jaxspec import classification, methods, specialize, validate
from jaxspec.data.constrain import ConstrainedSource
from jaxspec.train import checkpoint
from jaxspec.train import workdir as wdir
from jaxspec.train.context import RunContext, open_context


def open_run(config: ml_collections.ConfigDict, workdir: str) -> RunContext:
    """The context of a classification run: data, mesh, writers (`jaxspec.train.context`)."""
    return open_context(config, workdir, classification.Classification())


def export(ctx: RunContext, name: str, trained: methods.Trained, subset) -> None:
    """Writes `trained` to workdir/models/<name> with what a user needs to read its outputs."""
    checkpoint.export_model(
        ctx.workdir / "models" / name,
        trained.model,
        {
            "subset": list(subset),
            "class_names": [ctx.info.class_names[c] for c in subset],
            "output_classes": list(trained.classes),
            "columns": None if trained.columns is None else list(trained.columns),
        },
        preprocess=ctx.task.preprocess(ctx),
        classes=checkpoint.classes_record(trained.classes, ctx.info.class_names),
    )


def specialize_stage(ctx: RunContext, parent: methods.Trained, subset, k: int) -> tuple[methods.Trained, list]:
    """One stage of (possibly gradual) specialization and its rows of the results table."""
    cfg, seed = ctx.config.specialize, ctx.config.seed + 1 + k
    name = "specialist" if k == 0 else f"specialist_{k + 1}"
    test_s = ConstrainedSource(ctx.test, subset)
    rows = [("generalist restricted to S", methods.restricted(methods.generalist(ctx), subset))]
    if k > 0:
        rows.append(("parent specialist restricted to S", methods.restricted(parent, subset)))
    if cfg.control:
        control = methods.specialize_from(ctx, parent, subset, "continued", seed=seed, name=f"{name}-control")
        rows.append((f"{'generalist' if k == 0 else 'parent'} trained further on its data (control)", control))
    if cfg.method == "extract":
        untuned = specialize.extract(parent.model, specialize.compose_subsets(parent.classes, subset))
        rows.append(("extracted specialist, untuned", methods.frozen(ctx, untuned, subset)))
    trained = methods.specialize_from(ctx, parent, subset, cfg.method, seed=seed, name=name)
    rows.append((f"specialist ({cfg.method}), tuned", trained))
    export(ctx, name, trained, subset)
    return trained, [(row, methods.evaluate_on(ctx, t, test_s)) for row, t in rows]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the whole job and returns (and writes) its results.

    The config is checked whole first (`jaxspec.validate`), then the workdir
    is locked and checked against it (`jaxspec.train.workdir`).
    """
    validate.check(config)
    with wdir.opened(workdir, config.to_dict(), overwrite=config.get("overwrite", False)):
        return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    t0 = time.time()
    ctx = open_run(config, workdir)
    info = ctx.info
    if jax.process_index() == 0:
        chain = " > ".join(f"{len(s)} classes" for s in ctx.stages)
        print(
            f"jaxspec: {info.name} ({info.num_classes} classes), S = {config.specialize.subset!r} ({chain}), "
            f"method {config.specialize.method}, {jax.device_count()} {jax.default_backend()} device(s)",
            flush=True,
        )

    generalist = methods.generalist(ctx)
    export(ctx, "generalist", generalist, range(info.num_classes))
    parent, stages, printed = generalist, [], []
    for k, subset in enumerate(ctx.stages):
        parent, rows = specialize_stage(ctx, parent, subset, k)
        metrics = dict(rows)
        stage = {
            "subset": list(subset),
            "subset_names": [info.class_names[c] for c in subset],
            "method": config.specialize.method,
            "test_on_S": metrics,
        }
        if "extracted specialist, untuned" in metrics:
            untuned = metrics["extracted specialist, untuned"]
            ref = metrics["parent specialist restricted to S"] if k > 0 else metrics["generalist restricted to S"]
            stage["extraction_exact"] = untuned["top1"] == ref["top1"] and untuned["top2"] == ref["top2"]
        stages.append(stage)
        spec = config.specialize.subset.split(">")[k]
        printed.append(ctx.task.results_table(rows, f"model (test split, S = {spec}, {len(subset)} classes)"))

    gen_eval = classification.evaluator(ctx, generalist.modeldef, info.num_classes)
    gen_all = gen_eval(generalist.state, ctx.test)
    gen_train = gen_eval(generalist.state, ctx.train)  # the paper's precondition: not zero training loss
    results = {
        "config": config.to_dict(),
        "stages": stages,
        "generalist_test_all_classes": gen_all,
        "generalist_train_eval_mode": {k: gen_train[k] for k in ("top1", "loss")},
        "seconds": time.time() - t0,
    }
    if jax.process_index() == 0:
        from jaxspec import report  # matplotlib is imported only once a report is written

        report.finish(
            ctx.workdir,
            results,
            printed,
            f"generalist on all {info.num_classes} classes: top-1 "
            f"{100 * gen_all['top1']:.2f}%; on its training data (eval mode): top-1 "
            f"{100 * gen_train['top1']:.2f}%, loss {gen_train['loss']:.4f}",
        )
    ctx.writer.close()
    return results
