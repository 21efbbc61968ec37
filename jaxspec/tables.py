"""The Markdown results tables a run prints and reports: classifier and detector rows, the routed system,
and a grid's mean ± std over seeds. Pure functions of result dicts, so reports can be rebuilt from
`results.json` without the code that trained the models."""

from __future__ import annotations

from collections.abc import Sequence

DETECTION_SCORES = ("fitness", "mAP50", "mAP50_95")  # F = 0.1 mAP@0.5 + 0.9 mAP@0.5:0.95, then the two mAPs


def classification(rows: Sequence[tuple[str, dict]], title: str) -> str:
    """A Markdown table of top-1/top-2 (in %) for (model, metrics) rows."""
    lines = [f"| {title} | top-1 | top-2 |", "|---|---:|---:|"]
    lines += [f"| {name} | {100 * m['top1']:.2f} | {100 * m['top2']:.2f} |" for name, m in rows]
    return "\n".join(lines)


def detection(rows: Sequence[tuple[str, dict]], title: str) -> str:
    """Markdown: F, mAP@0.5, mAP@0.5:0.95 in % per (model, metrics) row."""
    lines = [f"| {title} | F | mAP@0.5 | mAP@0.5:0.95 |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | " + " | ".join(f"{100 * m[k]:.2f}" for k in DETECTION_SCORES) + " |" for name, m in rows]
    return "\n".join(lines)


def routed(result: dict, names: Sequence[str] | None = None) -> str:
    """A Markdown table of `evaluate`'s result: one row per group and one for all classes (in %)."""
    names = names or [f"group {g}" for g in range(len(result["groups"]))]
    lines = [
        "| group | classes | images | routing acc. | generalist top-1 | routed top-1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for g in result["groups"]:
        name = "no specialist" if g["group"] is None else names[g["group"]]
        lines.append(
            f"| {name} | {g['classes'] or '-'} | {g['count']} | {100 * g['routing_accuracy']:.2f} "
            f"| {100 * g['generalist_top1']:.2f} | {100 * g['top1']:.2f} |"
        )
    lines.append(
        f"| **all** | | {int(result['count'])} | {100 * result['routing_accuracy']:.2f} "
        f"| {100 * result['generalist_top1']:.2f} | {100 * result['top1']:.2f} |"
    )
    return "\n".join(lines)


def grid_means(rows: list[dict], metrics: list[str] | None = None) -> str:
    """One table: the cell's axes, then each metric as mean ± std (in % for metrics named like accuracies)."""
    if not rows:
        return "(no results)"
    axes = list(rows[0]["cell"])
    metrics = metrics or list(rows[0]["mean"])
    head = "| " + " | ".join([*axes, "n", *metrics]) + " |"
    lines = [head, "|" + "---|" * len(axes) + "---:|" + "---:|" * len(metrics)]
    for row in rows:
        cells = [str(row["cell"][a]) for a in axes] + [str(row["n"])]
        for m in metrics:
            if m not in row["mean"]:
                cells.append("")
                continue
            fmt = (lambda x: f"{100 * x:.2f}") if ("top" in m or "acc" in m) else (lambda x: f"{x:.4g}")
            cells.append(fmt(row["mean"][m]) + (f" ± {fmt(row['std'][m])}" if row["n"] > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
