"""SKD experiment: small specialists for random class subsets, made four ways.

A cell {subset_size, student, seed} draws S as the first `subset_size`
classes of a permutation seeded by `seed` (so one seed's subsets are nested
and every seed draws different ones) and scores on S's test images:

- teacher: the large generalist (`skd.teacher`) restricted to S (a reference);
- generalist: the student-size generalist (`config.model`) restricted to S;
- scratch: the student architecture with |S| outputs trained on D_S alone (`config.scratch`);
- finetuned: extracted from the student-size generalist, fine-tuned on D_S (`config.specialize`);
- skd: the scratch student trained with SKD's loss against the teacher (`config.scratch` steps);
- skd_finetuned: the finetuned student's start, trained with SKD's loss (`config.specialize` steps).

Every student gets the same steps whatever |S|. Both generalists are
trained once per workdir (checkpoints `teacher` and `generalist`), or once
per seed with `experiment.generalist_per_seed` (`teacher-seed<seed>`,
`generalist-seed<seed>`), so that seeds replicate the whole pipeline; students
go to `skd-<student>-<size>-seed<seed>`. Returns top1/top2 (fractions), loss
and the deployed parameter count, and each test image's top-1 outcome (`model_hits`), so students of one
seed and subset are compared image by image (`jaxspec.experiments.results`).
"""

from __future__ import annotations

import pathlib

import numpy as np
from flax import nnx

from jaxspec import distill, methods, models, specialize
from jaxspec.data.constrain import ConstrainedSource
from jaxspec.experiments.kind import Kind
from jaxspec.experiments.specialize import parent_seed, seed_generalist
from jaxspec.train import driver

STUDENTS = ("teacher", "generalist", "scratch", "finetuned", "skd", "skd_finetuned")


def draw_subset(num_classes: int, size: int, seed: int) -> tuple[int, ...]:
    """The first `size` classes of a `seed`-seeded permutation, sorted."""
    if not 2 <= size <= num_classes:
        raise ValueError(f"subset_size={size} must be between 2 and the dataset's {num_classes} classes")
    return tuple(sorted(int(c) for c in np.random.default_rng(seed).permutation(num_classes)[:size]))


def teacher(ctx, config, seed: int) -> methods.Trained:
    """The large generalist of `parent_seed(config, seed)` (checkpoint `teacher`, or `teacher-seed<seed>` for
    another seed than the run's), computed once per seed."""
    seed = parent_seed(config, seed)
    key = ("teacher", seed)
    if key in ctx.cache:
        return ctx.cache[key]
    t, n = config.skd.teacher, ctx.info.num_classes
    model = models.get_model(
        t.name,
        n,
        rngs=nnx.Rngs(seed),
        width_multiplier=t.width_multiplier,
        num_blocks=t.get("num_blocks"),
        dropout_rate=config.model.dropout_rate,
        depthwise=config.model.depthwise,
        dtype=config.model.dtype,
    )
    name = "teacher" if seed == config.seed else f"teacher-seed{seed}"
    d, s = driver.train_phase(ctx, name, model, ctx.train, ctx.val, config.skd.teacher_phase, seed)
    ctx.cache[key] = methods.Trained(d, s, tuple(range(n)))
    return ctx.cache[key]


def _student(ctx, config, student: str, subset, seed: int) -> methods.Trained:
    train_s, val_s = ConstrainedSource(ctx.train, subset), ConstrainedSource(ctx.val, subset)
    name = f"skd-{student}-{len(subset)}-seed{seed}"

    def generalist() -> methods.Trained:  # the student-size one, trained only for the students that use it
        return seed_generalist(ctx, config, seed)

    if student == "teacher":
        return methods.restricted(teacher(ctx, config, seed), subset)
    if student == "generalist":
        return methods.restricted(generalist(), subset)
    if student == "scratch":
        d, s = driver.train_phase(
            ctx, name, ctx.task.new_model(ctx, len(subset), seed), train_s, val_s, config.scratch, seed
        )
        return methods.Trained(d, s, subset)
    if student == "finetuned":
        return methods.specialize_from(ctx, generalist(), subset, "extract", seed=seed, name=name)
    if student == "skd":
        start, phase = ctx.task.new_model(ctx, len(subset), seed), config.scratch
    else:
        start, phase = specialize.extract(generalist().model, subset), config.specialize
    t = teacher(ctx, config, seed)
    d, s = driver.train_phase(
        ctx, name, start, train_s, val_s, phase, seed, task=distill.Distillation(t.modeldef, t.state, config.skd)
    )
    return methods.Trained(d, s, subset)


def run_cell(ctx, config, cell: dict) -> dict[str, float]:
    student, seed = cell.get("student"), int(cell.get("seed", 0))
    if student not in STUDENTS:
        raise ValueError(f"Unknown student {student!r} in cell {cell}; choose one of {list(STUDENTS)}")
    subset = draw_subset(ctx.info.num_classes, int(cell["subset_size"]), seed)
    trained = _student(ctx, config, student, subset, seed)
    m = methods.evaluate_on(ctx, trained, ConstrainedSource(ctx.test, subset), per_example=True)
    return {
        "top1": m["top1"],
        "top2": m["top2"],
        "loss": m["loss"],
        "params": float(distill.student_params(trained.model)),
        "model_hits": m["hits"],
    }


def plots(ctx, config, results: list[dict], out_dir: pathlib.Path) -> list[str]:
    """skd.png: test top-1 on S against |S| per student, mean ± std over seeds."""
    from matplotlib.figure import Figure

    from jaxspec.plots import save

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for student in STUDENTS:
        rows = [x for x in results if x["cell"]["student"] == student]
        if not rows:
            continue
        sizes = sorted({x["cell"]["subset_size"] for x in rows})
        vals = [100 * np.array([x["metrics"]["top1"] for x in rows if x["cell"]["subset_size"] == k]) for k in sizes]
        ax.errorbar(
            sizes,
            [v.mean() for v in vals],
            yerr=[v.std(ddof=1) if len(v) > 1 else 0 for v in vals],
            marker="o",
            capsize=3,
            label=student,
            ls="--" if student in ("teacher", "generalist") else "-",
        )
    ax.set(xlabel="classes in S", ylabel="test top-1 on S (%)", title="specialists by subset size (± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return [save(fig, pathlib.Path(out_dir) / "skd.png", dpi=120).name]


KIND = Kind(run_cell, plots=plots)
