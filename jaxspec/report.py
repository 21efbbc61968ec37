"""The per-run report: WORKDIR/report.md with the config in brief, the results tables and plots.

It is made from results.json's content and metrics.jsonl only, so any
finished workdir can get (or refresh) its report:
`write_run_report(workdir, json.loads((workdir / "results.json").read_text()))`.
Images go to WORKDIR/plots/ and are linked with relative paths, so the report
renders wherever the workdir is copied. Classifier runs (`jaxspec.run`) and
detector runs (`jaxspec.detection.run`, scored by F and mAP) get the same layout.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np

from jaxspec import files, plots, tables
from jaxspec.train import history

PLOTS_DIR = "plots"
CURVES = f"{PLOTS_DIR}/curves.png"
VALIDATION_NOTE = (
    "Each phase validates on the classes it trains on: the generalist on all, the control on its "
    "parent's, a specialist on S's."
)
DETECTION_VALIDATION_NOTE = (
    "Each phase validates on the scenes and boxes it trains on: the generalist on all, a "
    "specialist (and the scratch one) on those of S."
)
# Rows that equal their reference (the parent restricted to S) by construction: no bars for them.
UNTUNED = ("extracted specialist, untuned", "sliced specialist, untuned")


def is_detection(results: dict) -> bool:
    """Whether `results` come from the detection job (`jaxspec.detection.run`), whose scores are F and mAP."""
    return results["config"].get("task") == "detect"


def class_change_image(k: int) -> str:
    """Path, relative to the workdir, of stage `k`'s per-class accuracy change chart."""
    return f"{PLOTS_DIR}/class_change_{k + 1}.png"


def detections_image(k: int) -> str:
    """Where a detection run draws stage k's specialist's detections beside the ground truth."""
    return f"{PLOTS_DIR}/detections_{k + 1}.png"


def stage_title(results: dict, k: int) -> str:
    """The results table's title for stage `k`, as printed at the end of a run."""
    spec = str(results["config"]["specialize"]["subset"]).split(">")[k]
    return f"model (test split, S = {spec}, {len(results['stages'][k]['subset'])} classes)"


def results_markdown(results: dict) -> str:
    """The run's results tables (one per stage of specialization), as printed at the end of a run."""
    table = tables.detection if is_detection(results) else tables.classification  # F and mAP, or top-1/top-2
    return "\n\n".join(
        table(list(stage["test_on_S"].items()), stage_title(results, k)) for k, stage in enumerate(results["stages"])
    )


def per_class_scores(metrics: dict, names: Sequence[str]) -> list[float]:
    """A row's per-class score on S, in the order of `names`: top-1 (classifier) or AP@0.5:0.95 (detector;
    NaN for a class without test boxes)."""
    if "per_class_top1" in metrics:
        return list(metrics["per_class_top1"])
    ap = metrics["AP50_95_per_class"]
    return [ap.get(name, float("nan")) for name in names]


def class_changes(stage: dict) -> tuple[str, list[float], dict[str, list[float]]]:
    """(reference row, its per-class scores, {row: per-class scores}) of one stage, for `plots.class_change_figure`.

    The reference is the table's first row (the generalist restricted to S);
    the tuned specialist comes first, then the other rows (control, parent or
    scratch specialist) except the untuned extracted or sliced one, which
    equals the reference.
    """
    names = stage["subset_names"]
    rows = {name: per_class_scores(m, names) for name, m in stage["test_on_S"].items()}
    ref, tuned = next(iter(rows)), f"specialist ({stage['method']}), tuned"
    if tuned not in rows:
        raise ValueError(f"stage has no row {tuned!r}; rows: {list(rows)}")
    after = {tuned: rows[tuned]}
    after |= {name: v for name, v in rows.items() if name not in (ref, tuned, *UNTUNED)}
    return ref, rows[ref], after


def write_curves(workdir: str | pathlib.Path, names: Sequence[str] | None = None, panels=plots.PANELS) -> list[str]:
    """Draws the training curves of `names` (default: every phase logged) from WORKDIR/metrics.jsonl.

    Returns the image's path relative to the workdir, in a list (empty when no phase has curves).
    """
    workdir = pathlib.Path(workdir)
    hist = history.read_history(workdir / "metrics.jsonl")
    logged = plots.phases(hist, panels)
    names = logged if names is None else [n for n in names if n in logged]
    if not names:
        return []
    plots.save(plots.curves_figure(hist, names, panels), workdir / CURVES)
    return [CURVES]


def _optimizer(o: dict) -> str:
    if o["optimizer"] == "yolov5_sgd":  # its own schedule (`jaxspec.detection.train.yolov5_sgd`)
        text = (
            f"yolov5_sgd, lr {o['lr']:g} linearly to {o['lr'] * o['lrf']:g}, momentum {o['momentum']:g}, "
            f"{o['warmup_epochs']:g} warm-up epochs"
        )
    else:
        text = f"{o['optimizer']}, lr {o['lr']:g}, {o['schedule']}"
        if o.get("warmup_steps"):
            text += f", {o['warmup_steps']} warm-up step{'s' if o['warmup_steps'] != 1 else ''}"
        if o["schedule"] == "step":
            text += f", ×{o['decay_rate']:g} every {o['decay_every']} steps"
    if o.get("weight_decay"):
        text += f", weight decay {o['weight_decay']:g}"
    return text


def _phase_row(name: str, phase: dict, notes: str = "") -> str:
    frozen = ", ".join(
        filter(
            None,
            [
                f"`{phase['freeze']}`" if phase.get("freeze") else "",
                "BatchNorm statistics" if phase.get("freeze_bn_stats") else "",
            ],
        )
    )
    steps = f"{phase['epochs']:g} epochs" if phase.get("epochs", 0) > 0 else phase["steps"]  # detection phases
    smoothing = f"{phase['label_smoothing']:g}" if "label_smoothing" in phase else "—"
    return (
        f"| {name} | {steps} | {phase['batch_size']} | {_optimizer(phase['optim'])} "
        f"| {smoothing} | {frozen or '—'} | {notes or '—'} |"
    )


def config_markdown(results: dict) -> str:
    """The config in brief: data, model, subsets and method, and one row per training phase."""
    c, stages = results["config"], results["stages"]
    d, m, s = c["data"], c["model"], c["specialize"]
    if is_detection(results):
        scenes = d.get("scenes", {}).get("num_scenes")
        data = f"{d['name']}" + (f" ({'/'.join(map(str, scenes))} train/val/test scenes)" if scenes else "")
        lines = ["| | |", "|---|---|", f"| data | {data}, {d['image_size']} px |", f"| model | {m['name']} |"]
        method = s["method"] + (", beside a specialist trained from scratch on D_S" if s.get("scratch") else "")
    else:
        num_classes = len(results["generalist_test_all_classes"]["per_class_top1"])
        lines = [
            "| | |",
            "|---|---|",
            (f"| data | {d['name']} ({num_classes} classes), {d['image_size']} px, `{d['transform']}` augmentation |"),
            f"| model | {m['name']}"
            + (f", its first {m['num_blocks']} blocks" if m.get("num_blocks") else "")
            + f", width {m['width_multiplier']:g}, dropout {m['dropout_rate']:g} |",
        ]
        method = s["method"] + (", with the `continued` control" if s.get("control") else "")
    for k, stage in enumerate(stages):
        names = stage["subset_names"]
        shown = ", ".join(names[:12]) + (f", … ({len(names) - 12} more)" if len(names) > 12 else "")
        label = "S" if len(stages) == 1 else f"S, stage {k + 1}"
        lines.append(f"| {label} | {str(s['subset']).split('>')[k]}: {len(names)} classes ({shown}) |")
    lines += [
        f"| method | {method} |",
        f"| seed | {c['seed']} |",
        f"| run time | {run_time(results)} |",
        "",
        "| phase | steps | batch | optimizer | label smoothing | frozen | notes |",
        "|---|---:|---:|---|---:|---|---|",
    ]
    g = c["generalist"]
    if g.get("init"):
        lines.append(f"| generalist | — | — | loaded from `{g['init']}` | — | — | — |")
    else:
        lines.append(_phase_row("generalist", g))
    notes = ""
    if s["method"] == "head_then_full":
        notes = f"first {s['head_steps']} head-only steps at lr {s['head_lr']:g}"
    elif s["method"] == "dustbin":
        notes = f"dustbin fraction {s['dustbin_fraction']:g}"
    spec_phase = c["scratch"] if s["method"] == "scratch" else s
    lines.append(_phase_row("specialist (each stage)" if len(stages) > 1 else "specialist", spec_phase, notes))
    if s.get("control"):
        lines.append(_phase_row("control", s, "the parent trained further on its own data"))
    if is_detection(results) and s.get("scratch"):
        lines.append(_phase_row("scratch specialist", c["scratch"], "a new detector with S's classes only, on D_S"))
    return "\n".join(lines)


def generalist_markdown(results: dict) -> str:
    """Bullets: whether extraction was exact, the generalist on all classes and on its own training data."""
    gen_all = results["generalist_test_all_classes"]
    lines = []
    for k, stage in enumerate(results["stages"]):
        for key, what in (("extraction_exact", "extracted"), ("slicing_exact", "sliced")):
            if key in stage:
                verdict = "equals" if stage[key] else "**differs from**"
                lines.append(f"- Stage {k + 1}: the untuned {what} specialist {verdict} its parent restricted to S.")
    if is_detection(results):
        lines.append(
            f"- Generalist on all classes ({gen_all['images']} test images, {gen_all['boxes']} boxes): "
            f"F {100 * gen_all['fitness']:.2f}, mAP@0.5 {100 * gen_all['mAP50']:.2f}, "
            f"mAP@0.5:0.95 {100 * gen_all['mAP50_95']:.2f} (%)."
        )
        return "\n".join(lines)
    gen_train = results["generalist_train_eval_mode"]
    lines += [
        (
            f"- Generalist on all {len(gen_all['per_class_top1'])} classes (test): top-1 "
            f"{100 * gen_all['top1']:.2f}%, top-2 {100 * gen_all['top2']:.2f}%, loss {gen_all['loss']:.4f}."
        ),
        (
            f"- Generalist on its own training data (eval mode): top-1 {100 * gen_train['top1']:.2f}%, "
            f"loss {gen_train['loss']:.4f} (specialization can only help if this is not perfect)."
        ),
    ]
    return "\n".join(lines)


def _points(x: float, fmt: str) -> str:
    return "—" if np.isnan(x) else format(100 * x, fmt)


def _per_class_table(names: Sequence[str], ref: str, before: Sequence[float], after: dict) -> str:
    """Scores per class (in %) of the reference and each row of `after`; Δ = the first of them minus the reference."""
    cols = [ref, *after]
    lines = ["| class | " + " | ".join(cols) + " | Δ |", "|---|" + "---:|" * (len(cols) + 1)]
    first = np.asarray(next(iter(after.values())), np.float64) - np.asarray(before, np.float64)
    for i, name in enumerate(names):
        scores = [before[i], *(a[i] for a in after.values())]
        cells = [_points(a, ".1f") for a in scores] + [_points(first[i], "+.1f")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_run_report(workdir: str | pathlib.Path, results: dict) -> pathlib.Path:
    """Writes WORKDIR/report.md and its images (WORKDIR/plots/*.png); returns the report's path.

    Works for the classifier's (`jaxspec.run`) and the detector's (`jaxspec.detection.run`) results.
    """
    workdir = pathlib.Path(workdir)
    c, stages = results["config"], results["stages"]
    subset = str(c["specialize"]["subset"])
    detection = is_detection(results)
    metric, panels = ("AP@0.5:0.95", plots.DETECTION_PANELS) if detection else ("top-1", plots.PANELS)
    scores = (
        'F = 0.1 mAP@0.5 + 0.9 mAP@0.5:0.95, in %; "restricted to S": only S\'s outputs are kept'
        if detection
        else 'top-1/top-2 in %; "restricted to S" is the argmax over S\'s outputs only'
    )
    out = [
        f"# jaxspec run: S = {subset}, method {c['specialize']['method']}",
        "",
        f"Workdir: `{workdir}`",
        "",
        "## Config",
        "",
        config_markdown(results),
        "",
        "## Results",
        "",
        f"Test split (images of S only); {scores}.",
        "",
        results_markdown(results),
        "",
        generalist_markdown(results),
        "",
    ]

    out += [f"## Per-class {metric} change on S", ""]
    for k, stage in enumerate(stages):
        ref, before, after = class_changes(stage)
        spec = subset.split(">")[k]
        fig = plots.class_change_figure(
            stage["subset_names"],
            before,
            after,
            metric=metric,
            title=f"S = {spec}: per-class {metric} change vs {ref} (test split)",
        )
        image = class_change_image(k)
        plots.save(fig, workdir / image)
        out += [f"![per-class change, S = {spec}]({image})", ""]
        if len(stage["subset_names"]) <= plots.MAX_NAMED_CLASSES:
            out += [
                f"{metric} per class (%); Δ = {next(iter(after))} − {ref} (points)"
                + ("; — : no test boxes of the class." if detection else "."),
                "",
                _per_class_table(stage["subset_names"], ref, before, after),
                "",
            ]
        else:
            out += ["(per-class scores of every row: results.json)", ""]

    drawn = [k for k in range(len(stages)) if detection and (workdir / detections_image(k)).exists()]
    if drawn:
        out += ["## The specialist's detections", ""]
    for k in drawn:
        spec = subset.split(">")[k]
        out += [
            f"![detections, S = {spec}]({detections_image(k)})",
            "",
            f"The first test scenes of S = {spec}: ground truth (left) and the tuned specialist's detections "
            f"scoring at least {plots.DRAWN_SCORE:g} (right), in each scene's own pixels.",
            "",
        ]

    out += ["## Training curves", ""]
    curves = write_curves(workdir, panels=panels)
    if curves:
        out += [f"![training curves]({curves[0]})", "", DETECTION_VALIDATION_NOTE if detection else VALIDATION_NOTE, ""]
    else:
        out += ["No training curves were logged (metrics.jsonl is missing or empty).", ""]
    if not c["eval"]["every_steps"]:
        out += ["Validation was off (`eval.every_steps = 0`): no validation curves.", ""]
    if c["generalist"].get("init"):
        out += [f"The generalist was loaded from `{c['generalist']['init']}`: it has no curves here.", ""]

    path = workdir / "report.md"
    files.write_atomic(path, "\n".join(out))
    return path


SMOKE_NOTE = (
    "This was a `:tiny` smoke run: a tiny network trained for a few dozen steps, to check the pipeline "
    "end to end. Numbers near chance are expected; the default config trains for real."
)


def run_time(results: dict) -> str:
    """The wall time of every invocation that made `results`, e.g. '312 s' or '318 s over 2 runs (this one 6 s)'."""
    if results.get("invocations", 1) == 1:
        return f"{results['seconds']:.0f} s"
    return f"{results['seconds_total']:.0f} s over {results['invocations']} runs (this one {results['seconds']:.0f} s)"


def finish(workdir: str | pathlib.Path, results: dict, tables: Sequence[str], summary: str) -> pathlib.Path:
    """The end of a main job: results.json (atomically), the tables and `summary` on the terminal, report.md."""
    workdir = pathlib.Path(workdir)
    path = workdir / "results.json"
    if path.exists():  # a rerun (resumed or only re-evaluated): keep the time of the earlier invocations
        prev = json.loads(path.read_text())
        results["seconds_total"] = prev.get("seconds_total", prev["seconds"]) + results["seconds"]
        results["invocations"] = prev.get("invocations", 1) + 1
    files.write_json(path, results, indent=1)
    print("\n" + "\n\n".join(tables))
    print(f"\n{summary}")
    if results["config"].get("smoke"):
        print(SMOKE_NOTE)
    print(f"results: {path}  ({run_time(results)})", flush=True)
    path = write_run_report(workdir, results)
    print(f"report: {path}", flush=True)
    return path
