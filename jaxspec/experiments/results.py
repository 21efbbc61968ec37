"""RESULTS.md from the committed cell files: `python -m jaxspec.experiments.results [--check]`.

Every number of RESULTS.md comes from `results/<grid>/cells/*.json` (written
by `python -m jaxspec.experiments`, copied in by `--collect`) and
`results/<grid>/grid.json` (the command, commit, machine and planned cells of
the grid); the claims and their effects are `jaxspec.experiments.claims`.
`--check` regenerates both RESULTS.md and the summary block of README.md and
exits 1 if either differs from the committed file, so a table cannot drift
from its numbers.

  python -m jaxspec.experiments.results                  # writes RESULTS.md and README.md's summary
  python -m jaxspec.experiments.results --check          # exit 1 if they are out of date
  python -m jaxspec.experiments.results --collect=WORKDIR --name=c1_sweep --command="python -m ..."
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import sys

import numpy as np

from jaxspec import files
from jaxspec.experiments import stats
from jaxspec.experiments.claims import CLAIMS, Claim

EFFECT = 0.005  # the effect size (top-1 fraction) an inconclusive result is sized against: 0.5 points
README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


# -- reading -----------------------------------------------------------------------------------------------------


def load_grid(directory: pathlib.Path) -> dict | None:
    """`{'name', 'meta', 'cells': [records]}` of one committed grid, or None if it has not run yet."""
    cells_dir = directory / "cells"
    if not cells_dir.is_dir():
        return None
    meta_path = directory / "grid.json"
    if not meta_path.exists():
        raise SystemExit(f"results: {meta_path} is missing (write it with --collect)")
    records = [json.loads(p.read_text()) for p in sorted(cells_dir.glob("*.json"))]
    return {"name": directory.name, "meta": json.loads(meta_path.read_text()), "cells": records}


def contrasted(records: list[dict], contrast: tuple[str, str, str, str]) -> list[dict]:
    """Records of `a - b` in `metric` from pairs of cells equal but for `axis` (a's and b's value there).

    Each pair's per-image outcomes (of the model `metric` scores: `specialist_hits` for `specialist_top1`,
    or the cells' one `*_hits` entry) become `{a}_hits` and `{b}_hits`, and
    `metric`'s replicates under image resamples (detection) `{a}_{metric}` and `{b}_{metric}`, so the
    difference can be bootstrapped over images like any effect.
    """
    axis, a, b, metric = contrast
    key = lambda rec: tuple((k, v) for k, v in rec["cell"].items() if k != axis)  # noqa: E731
    b_cells = {key(rec): rec for rec in records if rec["cell"].get(axis) == b}
    out = []
    for rec in records:
        other = b_cells.get(key(rec)) if rec["cell"].get(axis) == a else None
        if other is None:
            continue
        new = {
            "cell": dict(key(rec)),
            "seconds": rec.get("seconds", 0) + other.get("seconds", 0),
            "metrics": {
                f"{a}_vs_{b}_{metric}": rec["metrics"][metric] - other["metrics"][metric],
                f"{a}_{metric}": rec["metrics"][metric],
                f"{b}_{metric}": other["metrics"][metric],
            },
        }
        hits = [_hits_of(r, metric) for r in (rec, other)]
        if None not in hits:
            new["hits"] = {f"{a}_hits": hits[0], f"{b}_hits": hits[1]}
        reps = [r.get("replicates", {}).get(metric) for r in (rec, other)]
        if None not in reps:  # both scored on the same test images under the same resamples
            new["replicates"] = {f"{a}_{metric}": reps[0], f"{b}_{metric}": reps[1]}
            new["metrics"]["test_images"] = rec["metrics"].get("test_images", 0)
        out.append(new)
    return out


def _hits_of(record: dict, metric: str):
    """The per-image outcomes behind `metric` (`x_top1` -> `x_hits`), or a cell's only ones; else None."""
    hits = record.get("hits", {})
    if metric.endswith("top1") and metric[: -len("top1")] + "hits" in hits:
        return hits[metric[: -len("top1")] + "hits"]
    return next(iter(hits.values())) if len(hits) == 1 else None


def pooled(records: list[dict], axis: str, effect: str, pair: tuple[str, str] = ()) -> list[dict]:
    """Per seed (and other axes), `effect` averaged over the values of `axis`: records with `axis='all'`.

    Their per-image outcomes are the seed's images of every value, concatenated, so the bootstrap
    resamples all of them."""
    out = []
    pair = pair or _pair(effect)
    for _, recs in stats.by_setting(records, axis):
        if len(recs) < 2:
            continue
        cell = {k: ("all" if k == axis else v) for k, v in recs[0]["cell"].items()}
        new = {"cell": cell, "metrics": _means(recs)}
        if all(f"{m}_hits" in r.get("hits", {}) for r in recs for m in pair):
            new["hits"] = {
                f"{m}_hits": stats.pack_hits(np.concatenate([stats.unpack_hits(r["hits"][f"{m}_hits"]) for r in recs]))
                for m in pair
            }
        out.append(new)
    return out


def _means(records: list[dict]) -> dict[str, float]:
    """The mean over `records` of each metric they all have."""
    return {
        k: float(np.mean([r["metrics"][k] for r in records]))
        for k in records[0]["metrics"]
        if all(k in r["metrics"] for r in records)
    }


def paired_rows(records: list[dict], effect: str, pair: tuple[str, str] = ()) -> list[dict]:
    """Per setting (cells equal but for the seed): the paired `effect` (`stats.Effect`) and per-cell means.

    The bootstrap needs the effect's two models (`gain_vs_control_top1` -> specialist, control; else `pair`)
    to have per-image outcomes, or replicates of their scores under image resamples, in every cell.
    """
    rows = []
    for setting, recs in stats.by_setting(records):
        e = stats.paired_effect(recs, effect, pair or _pair(effect))
        if e is None:
            raise SystemExit(f"results: a cell of {setting} has no metric {effect!r}")
        rows.append({"setting": setting, "effect": e, "means": _means(recs)})
    return rows


def _pair(effect: str) -> tuple[str, str]:
    """The two models an effect metric compares: `gain_vs_control_top1` -> (specialist, control)."""
    stem = effect.rsplit("_top", 1)[0]
    if stem == "gain":
        return "specialist", "generalist"
    if stem.startswith("gain_vs_"):
        return "specialist", stem[len("gain_vs_") :]
    a, _, b = stem.partition("_vs_")
    return a, b


def choose(rows: list[dict], metric: str) -> dict:
    """The setting with the highest mean `metric` over seeds (validation only); ties go to the fewer steps."""
    return max(rows, key=lambda r: (round(r["means"][metric], 10), -r["setting"].get("steps", 0)))["setting"]


# -- writing -----------------------------------------------------------------------------------------------------


def _pts(x: float) -> str:
    return f"{100 * x:+.2f}"


def _ci(interval) -> str:
    if interval is None or not math.isfinite(interval.low):
        return "-"
    return f"[{_pts(interval.low)}, {_pts(interval.high)}]"


def _verdict(row: dict, direction: int) -> str:
    return stats.verdict(row["effect"].t, direction) if row["effect"].t.n > 1 else "inconclusive"


def _resolve(row: dict) -> str:
    """How many seeds (at the observed per-seed s.d.) or test images per seed (at the bootstrap's width)
    would bring the 95% half-width to 0.5 points."""
    parts = []
    if math.isfinite(row["effect"].sd):
        n = stats.seeds_to_resolve(row["effect"].sd, EFFECT)
        parts.append(f"{n} seeds" if n else "> 10,000 seeds")
    if row["effect"].boot is not None and row["effect"].boot.half_width > 0:
        per_seed = row["effect"].boot.n / len(row["effect"].values)
        parts.append(f"{math.ceil(per_seed * (row['effect'].boot.half_width / EFFECT) ** 2):,} images/seed")
    return " or ".join(parts) or "-"


def effect_table(rows: list[dict], claim: Claim, chosen: dict | None = None) -> list[str]:
    """One row per setting; axes with one value across the grid are said once above the table."""
    fixed = {a: v for a, v in rows[0]["setting"].items() if all(r["setting"][a] == v for r in rows)}
    axes = [a for a in rows[0]["setting"] if a not in fixed or len(rows) == 1]
    cols = [c for c in claim.columns if all(c in r["means"] for r in rows)]
    head = [
        *axes,
        "seeds",
        *[f"{c} (%)" for c in cols],
        f"{claim.effect}: per seed (points)",
        "mean",
        "95% t-interval",
        "paired bootstrap",
        "verdict",
        "to resolve ±0.5",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(axes) + "---:|" * (len(head) - len(axes))]
    for r in rows:
        cells = [str(r["setting"][a]) for a in axes]
        if chosen is not None and r["setting"] == chosen:
            cells[0] = f"**{cells[0]}** (chosen)"
        verdict = _verdict(r, claim.direction)
        cells += [
            str(len(r["effect"].values)),
            *[f"{100 * r['means'][c]:.2f}" for c in cols],
            ", ".join(_pts(v) for v in r["effect"].values),
            _pts(r["effect"].t.mean),
            _ci(r["effect"].t),
            _ci(r["effect"].boot),
            verdict,
            _resolve(r) if verdict == "inconclusive" else "",
        ]
        out.append("| " + " | ".join(cells) + " |")
    if fixed and len(rows) > 1:
        out = [f"All cells: {', '.join(f'{k}={v}' for k, v in fixed.items())}.", "", *out]
    return out


def _command(meta: dict) -> str:
    return meta.get("command", "(not recorded)")


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def _commits(meta: dict) -> str:
    """The commits the grid's cells were computed at, in order ('commit X' when one)."""
    ran = [r["commit"][:7] for r in meta.get("invocations", []) if r.get("cells") and r.get("commit")]
    unique = list(dict.fromkeys(ran)) or [meta.get("commit", "?")[:7]]
    return ("commit " if len(unique) == 1 else "commits ") + ", ".join(unique)


def grid_seconds(grid: dict) -> float:
    """Wall time behind a grid: its recorded invocations, else the sum of its cells' own times."""
    runs = grid["meta"].get("invocations")
    return float(sum(r["seconds"] for r in runs)) if runs else float(sum(c.get("seconds", 0) for c in grid["cells"]))


def claim_section(claim: Claim, grids: dict[str, dict | None]) -> tuple[list[str], str]:
    """The claim's markdown and its one-word verdict."""
    out = [f"## {claim.id}. {claim.title}", "", f"**Paper.** {claim.paper}", "", f"**Design.** {claim.design}", ""]
    verdict, summary, chosen = "pending", "", None
    for i, name in enumerate(claim.grids):
        grid = grids.get(name)
        if grid is None:
            out += [f"### `{name}`: not run yet", ""]
            continue
        meta, planned = grid["meta"], grid["meta"].get("cells")
        done = len(grid["cells"])
        out += [
            f"### `{name}`",
            "",
            f"`{_command(meta)}`",
            "",
            f"{done} of {planned or '?'} cells; {_commits(meta)}; "
            f"{meta.get('machine', {}).get('cpus', '?')}-core {meta.get('machine', {}).get('processor', '?')} "
            f"({meta.get('machine', {}).get('devices', '?')}); {_hours(grid_seconds(grid))} of wall time.",
            "",
        ]
        if not claim.effect or not grid["cells"]:
            continue
        records = contrasted(grid["cells"], claim.contrast) if claim.contrast else grid["cells"]
        if claim.pool:
            records = records + pooled(records, claim.pool, claim.effect, claim.pair)
        rows = paired_rows(records, claim.effect, claim.pair)
        if not rows:  # e.g. a contrast whose two sides have not both run yet
            out += [f"No cell pair to compare yet for `{claim.effect}`.", ""]
            continue
        choosing = i < len(claim.grids) - 1 and "specialist_val_top1" in rows[0]["means"]
        complete = planned is not None and done >= planned
        if choosing and complete:
            chosen = choose(rows, "specialist_val_top1")
            out += [
                f"Chosen on validation (highest mean specialist validation top-1): "
                f"{', '.join(f'{k}={v}' for k, v in chosen.items() if k != 'group')}.",
                "",
            ]
        elif choosing:
            out += ["The setting is chosen on validation once every cell has run.", ""]
        elif chosen is not None:
            ran = {k: v for k, v in rows[0]["setting"].items() if k in chosen and k != "group"}
            if ran != {k: v for k, v in chosen.items() if k != "group"}:
                raise SystemExit(f"results: grid {name} ran {ran}, not the setting chosen on validation {chosen}")
        out += effect_table(rows, claim, chosen if choosing else None) + [""]
        if i == len(claim.grids) - 1:
            primary = [r for r in rows if all(r["setting"].get(k) == v for k, v in claim.primary)]
            if primary and complete:
                r = primary[0]
                verdict = _verdict(r, claim.direction)
                summary = (
                    f"{claim.effect} {_pts(r['effect'].t.mean)} points, 95% CI {_ci(r['effect'].t)} over "
                    f"{len(r['effect'].values)} seeds (bootstrap over test images {_ci(r['effect'].boot)})"
                )
                if verdict == "inconclusive":
                    summary += (
                        f"; half-width {100 * r['effect'].t.half_width:.2f} points; {_resolve(r)} would resolve ±0.5"
                    )
    out[1:1] = [
        "",
        f"**Verdict: {verdict}**" + (f": {summary}." if summary else " (the grids below have not all finished)."),
    ]
    return out, verdict


def render(results_dir: pathlib.Path) -> tuple[str, str]:
    """RESULTS.md, and the README's summary block (between its markers)."""
    grids = {name: load_grid(results_dir / name) for c in CLAIMS for name in c.grids}
    total = sum(grid_seconds(g) for g in grids.values() if g)
    body, summary = [], ["| claim | verdict |", "|---|---|"]
    for claim in CLAIMS:
        section, verdict = claim_section(claim, grids)
        body += section
        summary.append(
            f"| [{claim.id}](RESULTS.md#{claim.id.lower()}-{_anchor(claim.title)}) {claim.title} | {verdict} |"
        )
    head = [
        "# Reproduction results",
        "",
        "Malashin & Ilyukhin, *Neural network task specialization via domain constraining*: each claim tested "
        "on the embedded data with paired comparisons (same generalist per seed, same test images), 95% "
        "t-intervals over seeds and a paired bootstrap over test images. Verdicts: **reproduced** (the "
        "interval excludes 0 in the paper's direction), **contradicted** (in the other), **inconclusive** "
        "(it includes 0), **pending** (not run to its budget yet). Effects are in points (top-1 for "
        "classifiers, F or mAP for detectors).",
        "",
        f"Total compute so far: {_hours(total)} of wall time on the machines named per grid.",
        "",
        "Generated by `python -m jaxspec.experiments.results` from `results/`; do not edit by hand. "
        "`launch/reproduce.sh --root=DIR` runs the grids in this order, resuming from the committed cells, and "
        "collects them. "
        "Measurements made before this protocol (single generalists, 2-3 seeds): "
        "[docs/results.md](docs/results.md).",
        "",
    ]
    return "\n".join(head + body).rstrip() + "\n", "\n".join(summary)


def _anchor(title: str) -> str:
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c == "-")


def readme_with(readme: str, summary: str) -> str:
    start, end = readme.find(README_BEGIN), readme.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"results: README.md lacks the markers {README_BEGIN} ... {README_END}")
    return readme[: start + len(README_BEGIN)] + "\n" + summary + "\n" + readme[end:]


def collect(workdir: pathlib.Path, out: pathlib.Path, command: str, planned: int | None) -> None:
    """Copies a grid workdir's finished cells and its plan into `out` (no checkpoints, no images)."""
    (out / "cells").mkdir(parents=True, exist_ok=True)
    for path in sorted((workdir / "cells").glob("*.json")):
        shutil.copyfile(path, out / "cells" / path.name)
    plan = json.loads((workdir / "plan.json").read_text()) if (workdir / "plan.json").exists() else {}
    meta = json.loads((out / "grid.json").read_text()) if (out / "grid.json").exists() else {}
    # A grid may run in several workdirs (machines that did not survive, resumed from the committed cells):
    # their invocations add up, each keeping the commit it ran.
    runs = {r["started"]: {"commit": meta.get("commit", ""), **r} for r in meta.get("invocations", [])}
    runs |= {
        r["started"]: {"commit": plan.get("machine", {}).get("commit", ""), **r} for r in plan.get("invocations", [])
    }
    if runs:
        meta["invocations"] = [runs[k] for k in sorted(runs)]
    if "machine" in plan:
        meta["machine"] = plan["machine"]
    meta["cells"] = len(plan["cells"]) if "cells" in plan else (planned or meta.get("cells"))
    if command:
        meta["command"] = command
    if "commit" not in meta or plan.get("machine", {}).get("commit"):
        meta["commit"] = plan.get("machine", {}).get("commit", meta.get("commit", ""))
    files.write_json(out / "grid.json", meta, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxspec.experiments.results", description=__doc__.splitlines()[0])
    p.add_argument("--results", default="results", help="the committed grids (default: results/)")
    p.add_argument("--out", default="RESULTS.md")
    p.add_argument("--readme", default="README.md", help="its summary block is rewritten too")
    p.add_argument("--check", action="store_true", help="exit 1 if RESULTS.md or the README block is out of date")
    p.add_argument("--collect", metavar="WORKDIR", help="copy a grid workdir's cells into results/NAME first")
    p.add_argument("--name", help="with --collect: the grid's directory under results/")
    p.add_argument("--command", default="", help="with --collect: the command that ran the grid")
    p.add_argument("--planned", type=int, help="with --collect: cells planned, for workdirs without plan.json")
    args = p.parse_args(argv)
    results_dir = pathlib.Path(args.results)
    if args.collect:
        if not args.name:
            p.error("--collect needs --name")
        collect(pathlib.Path(args.collect), results_dir / args.name, args.command, args.planned)
    text, summary = render(results_dir)
    readme_path = pathlib.Path(args.readme)
    readme = readme_path.read_text()
    new_readme = readme_with(readme, summary)
    out = pathlib.Path(args.out)
    if args.check:
        stale = [
            str(path)
            for path, new in ((out, text), (readme_path, new_readme))
            if not path.exists() or path.read_text() != new
        ]
        if stale:
            print(
                f"results: {', '.join(stale)} out of date; run `python -m jaxspec.experiments.results`", file=sys.stderr
            )
            return 1
        return 0
    files.write_atomic(out, text)
    files.write_atomic(readme_path, new_readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
