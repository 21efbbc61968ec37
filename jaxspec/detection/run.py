"""The detection main job: generalist YOLOv5 on all classes -> specialist(s) on S -> F / mAP table.

The paper's section 4 in one command: a generalist detector trained on every
class, then a specialist for S made by domain constraining (train only on
images with an object of S, only S's boxes) plus output suppression or head
slicing (`specialize.method`), optionally beside a specialist trained from
scratch on the same data (`specialize.scratch`). `specialize.subset='animals>horse'`
specializes gradually, each stage's specialist the next one's parent. Every
model is scored on S's test images (`jaxspec.detection.train.Evaluator`):
F = 0.1 mAP@0.5 + 0.9 mAP@0.5:0.95. Phases checkpoint into the workdir and
resume as the classifier's do (`jaxspec.run`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import ml_collections

from jaxspec import methods, validate
from jaxspec.detection import data
from jaxspec.detection import specialize as dspec
from jaxspec.detection.task import Detection, evaluator
from jaxspec.methods import restricted
from jaxspec.specialize import compose_subsets
from jaxspec.tables import DETECTION_SCORES
from jaxspec.train import checkpoint, driver
from jaxspec.train import workdir as wdir
from jaxspec.train.context import RunContext, open_context
from jaxspec.train.task import Outputs

METHODS = ("suppress", "slice", "scratch")
EXAMPLES = 8  # test scenes drawn with the specialist's detections in report.md


def open_run(config: ml_collections.ConfigDict, workdir: str) -> RunContext:
    """The context of a detection run: scenes, mesh, writers (`jaxspec.train.context`)."""
    return open_context(config, workdir, Detection())


def constrained(ctx: RunContext, source, subset: Sequence[int] | None):
    """`source` kept to images with an object of `subset` and to its boxes; global labels (None: all)."""
    if subset is None or len(subset) == ctx.info.num_classes:
        return source
    return data.ConstrainedDetectionSource(source, subset, remap=False)


def evaluate(ctx: RunContext, trained: methods.Trained, subset: Sequence[int] | None, source=None) -> dict:
    """F, mAP@0.5, mAP@0.5:0.95 and per-class AP of `trained` on `subset`'s test images."""
    return detect(ctx, trained, subset, source)[0]


def detect(ctx: RunContext, trained: methods.Trained, subset: Sequence[int] | None, source=None):
    """(`evaluate`'s scores, the detections they score) of `trained` on `subset`'s test images."""
    source = constrained(ctx, ctx.test if source is None else source, subset)
    ev = evaluator(ctx, trained.modeldef)
    found = ev.collect(trained.state, source, classes=trained.classes, columns=trained.columns)
    return ev.score(found, source, trained.classes), found


def draw_detections(ctx: RunContext, trained: methods.Trained, subset: Sequence[int], found, path) -> None:
    """The first EXAMPLES test scenes of S: ground truth beside `trained`'s detections (`found`, from `detect`)."""
    from jaxspec import plots

    source = constrained(ctx, ctx.test, subset)
    records = [source[i] for i in range(min(EXAMPLES, len(source)))]
    fig = plots.truth_and_detections_figure(records, found.detections(), trained.classes, ctx.info.class_names)
    plots.save(fig, path)


def train_phase(
    ctx: RunContext,
    name: str,
    model,
    classes: Sequence[int],
    columns: Sequence[int] | None,
    subset: Sequence[int] | None,
    phase,
    seed: int,
):
    """`driver.train_phase` on `subset`'s scenes (all: None) for a model whose output j is global class
    `classes[j]`, only `columns` scored."""
    return driver.train_phase(
        ctx,
        name,
        model,
        constrained(ctx, ctx.train, subset),
        constrained(ctx, ctx.val, subset),
        phase,
        seed,
        outputs=Outputs.of(classes, columns),
    )


def export(ctx: RunContext, name: str, trained: methods.Trained) -> None:
    """workdir/models/<name>: weights + what a user needs to read the outputs."""
    checkpoint.export_model(
        ctx.workdir / "models" / name,
        trained.model,
        {
            "output_classes": list(trained.classes),
            "class_names": [ctx.info.class_names[c] for c in trained.classes],
            "columns": None if trained.columns is None else list(trained.columns),
            "image_size": ctx.config.data.image_size,
        },
        preprocess=ctx.task.preprocess(ctx),
        classes=checkpoint.classes_record(trained.classes, ctx.info.class_names),
    )


def specialize_from(
    ctx: RunContext, parent: methods.Trained, subset: Sequence[int], method: str, *, seed: int, name: str, phase=None
) -> methods.Trained:
    """The `method` specialist for `subset` (global classes) from `parent`, trained on D_S under `name`.

    suppress: the parent's head, only S's class outputs scored; slice: the
    head sliced to S's 5 + |S| channels per anchor; scratch: a new |S|-class
    detector trained with `config.scratch`.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown detection specialization method {method!r}; choose one of {list(METHODS)}")
    subset = tuple(int(c) for c in subset)
    phase = phase or ctx.config.specialize
    pos = compose_subsets(parent.classes, subset)
    if method == "suppress":
        d, s = train_phase(ctx, name, parent.model, parent.classes, pos, subset, phase, seed)
        return methods.Trained(d, s, parent.classes, tuple(pos))
    if method == "slice":
        start = dspec.slice_head(parent.model, pos)
    else:
        start, phase = ctx.task.new_model(ctx, len(subset), seed), ctx.config.scratch
    d, s = train_phase(ctx, name, start, subset, None, subset, phase, seed)
    return methods.Trained(d, s, subset)


def continued(ctx: RunContext, parent: methods.Trained, *, seed: int, name: str, phase) -> methods.Trained:
    """The `continued` control: `parent` trained further on all scenes and classes with `phase` (give it as
    many steps as the specialist it controls for); restrict it to S to compare them."""
    d, s = train_phase(ctx, name, parent.model, parent.classes, parent.columns, None, phase, seed)
    return methods.Trained(d, s, parent.classes, parent.columns)


def specialize_stage(ctx: RunContext, parent: methods.Trained, subset, k: int) -> tuple[methods.Trained, list, object]:
    """One stage of (possibly gradual) specialization: its specialist, its rows of the results table and the
    tuned specialist's detections on the test scenes of S."""
    cfg, seed = ctx.config.specialize, ctx.config.seed + 1 + k
    suffix = "" if k == 0 else f"_{k + 1}"
    rows = [("generalist restricted to S", restricted(methods.generalist(ctx), subset))]
    if k > 0:
        rows.append(("parent specialist restricted to S", restricted(parent, subset)))
    if cfg.method == "slice":
        untuned = dspec.slice_head(parent.model, compose_subsets(parent.classes, subset))
        rows.append(("sliced specialist, untuned", methods.frozen(ctx, untuned, subset)))
    trained = specialize_from(ctx, parent, subset, cfg.method, seed=seed, name=f"specialist{suffix}")
    tuned = f"specialist ({cfg.method}), tuned"
    rows.append((tuned, trained))
    if cfg.scratch:
        scratch = specialize_from(ctx, parent, subset, "scratch", seed=seed, name=f"scratch{suffix}")
        rows.append(("scratch specialist (same data)", scratch))
    export(ctx, f"specialist{suffix}", trained)
    scored = {row: detect(ctx, t, subset) for row, t in rows}
    return trained, [(row, scores) for row, (scores, _) in scored.items()], scored[tuned][1]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the whole detection job and returns (and writes) its results (config checked, workdir locked)."""
    validate.check(config)
    with wdir.opened(workdir, config.to_dict(), overwrite=config.get("overwrite", False)):
        return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    t0 = time.time()
    ctx = open_run(config, workdir)
    info, lead = ctx.info, jax.process_index() == 0
    if lead:
        chain = " > ".join(f"{len(s)} classes" for s in ctx.stages)
        print(
            f"jaxspec detect: {info.name} ({info.num_classes} classes), {config.model.name} at "
            f"{config.data.image_size} px, S = {config.specialize.subset!r} ({chain}), method "
            f"{config.specialize.method}, {jax.device_count()} {jax.default_backend()} device(s)",
            flush=True,
        )
    generalist = methods.generalist(ctx)
    export(ctx, "generalist", generalist)
    parent, stages, printed, drawn = generalist, [], [], []
    for k, subset in enumerate(ctx.stages):
        parent, rows, found = specialize_stage(ctx, parent, subset, k)
        drawn.append((parent, subset, found))
        metrics = dict(rows)
        stage = {
            "subset": list(subset),
            "subset_names": [info.class_names[c] for c in subset],
            "method": config.specialize.method,
            "test_on_S": metrics,
        }
        if "sliced specialist, untuned" in metrics:
            ref = metrics["parent specialist restricted to S" if k else "generalist restricted to S"]
            stage["slicing_exact"] = all(metrics["sliced specialist, untuned"][s] == ref[s] for s in DETECTION_SCORES)
        stages.append(stage)
        spec = str(config.specialize.subset).split(">")[k]
        printed.append(ctx.task.results_table(rows, f"model (test split, S = {spec}, {len(subset)} classes)"))
    gen_all = evaluate(ctx, generalist, None)
    results = {
        "config": config.to_dict(),
        "stages": stages,
        "generalist_test_all_classes": gen_all,
        "seconds": time.time() - t0,
    }
    if lead:
        from jaxspec import report  # matplotlib is imported only once a report is written

        for k, (trained, subset, found) in enumerate(drawn):
            draw_detections(ctx, trained, subset, found, ctx.workdir / report.detections_image(k))
        report.finish(
            ctx.workdir,
            results,
            printed,
            f"generalist on all {info.num_classes} classes: F "
            f"{100 * gen_all['fitness']:.2f}, mAP@0.5 {100 * gen_all['mAP50']:.2f}, mAP@0.5:0.95 "
            f"{100 * gen_all['mAP50_95']:.2f}",
        )
    ctx.writer.close()
    return results
