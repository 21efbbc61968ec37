"""RESULTS.md: generated from the committed cell files, verdicts read off the right intervals."""

import json
import pathlib

import numpy as np
import pytest
from scipy import stats as sps

from jaxspec.experiments import claims, results, stats

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_committed_results_md_is_what_the_committed_numbers_give():
    args = [
        "--check",
        f"--results={ROOT / 'results'}",
        f"--out={ROOT / 'RESULTS.md'}",
        f"--readme={ROOT / 'README.md'}",
    ]
    assert results.main(args) == 0


def _write_grid(
    root: pathlib.Path,
    name: str,
    effects: dict[tuple, list[float]],
    planned: int | None = None,
    val: dict[tuple, float] | None = None,
    hits: bool = True,
) -> None:
    """A grid whose cells have `gain_vs_control_top1` = the given per-seed values (and matching hits)."""
    (root / name / "cells").mkdir(parents=True)
    n = 0
    for setting, values in effects.items():
        for seed, v in enumerate(values):
            cell = {**dict(setting), "seed": seed}
            metrics = {"gain_vs_control_top1": v, "specialist_val_top1": (val or {}).get(setting, 0.5)}
            rec = {"cell": cell, "metrics": metrics, "seconds": 10.0}
            if hits:  # 400 images: the specialist right on 200 + round(400 v), the control on 200
                k = 200 + round(400 * v)
                rec["hits"] = {
                    "specialist_hits": stats.pack_hits(np.arange(400) < k),
                    "control_hits": stats.pack_hits(np.arange(400) < 200),
                }
            (root / name / "cells" / f"{n}.json").write_text(json.dumps(rec))
            n += 1
    (root / name / "grid.json").write_text(
        json.dumps({"command": f"run {name}", "cells": planned or n, "commit": "abc1234"})
    )


@pytest.fixture
def one_claim(monkeypatch):
    claim = claims.Claim(
        id="X",
        title="Specialists help",
        paper="Table 0.",
        grids=("sweep", "final"),
        effect="gain_vs_control_top1",
        primary=(("group", "a"),),
        design="d",
    )
    monkeypatch.setattr(results, "CLAIMS", (claim,))
    return claim


@pytest.mark.parametrize(
    "values, verdict",
    [
        ([0.010, 0.012, 0.011, 0.009, 0.013], "reproduced"),
        ([-0.010, -0.012, -0.011, -0.009, -0.013], "contradicted"),
        ([0.010, -0.012, 0.004, -0.003, 0.002], "inconclusive"),
    ],
)
def test_verdict_follows_the_t_interval_over_seeds(tmp_path, one_claim, values, verdict):
    _write_grid(
        tmp_path,
        "sweep",
        {(("group", "a"), ("steps", 10)): [0.0, 0.0, 0.0], (("group", "a"), ("steps", 20)): [0.0, 0.0, 0.0]},
        val={(("group", "a"), ("steps", 20)): 0.9},
    )
    _write_grid(tmp_path, "final", {(("group", "a"), ("steps", 20)): values, (("group", "b"), ("steps", 20)): values})
    text, summary = results.render(tmp_path)
    assert f"**Verdict: {verdict}**" in text and f"| {verdict} |" in summary
    t = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
    assert f"[{100 * t[0]:+.2f}, {100 * t[1]:+.2f}]" in text
    assert "**20** (chosen)" in text  # the higher validation score, not the test effect
    if verdict == "inconclusive":
        sd = np.std(values, ddof=1)
        assert f"{stats.seeds_to_resolve(sd, 0.005)} seeds" in text


def test_pending_until_every_planned_cell_ran(tmp_path, one_claim):
    _write_grid(tmp_path, "sweep", {(("group", "a"), ("steps", 10)): [0.01, 0.01]}, planned=4)
    text, _ = results.render(tmp_path)
    assert "**Verdict: pending**" in text and "2 of 4 cells" in text and "`final`: not run yet" in text
    assert "chosen on validation once every cell has run" in text


def test_final_grid_must_run_the_setting_chosen_on_validation(tmp_path, one_claim):
    _write_grid(
        tmp_path,
        "sweep",
        {(("group", "a"), ("steps", 10)): [0.0, 0.0], (("group", "a"), ("steps", 20)): [0.0, 0.0]},
        val={(("group", "a"), ("steps", 10)): 0.9},
    )
    _write_grid(tmp_path, "final", {(("group", "a"), ("steps", 20)): [0.01, 0.02, 0.01]})
    with pytest.raises(SystemExit, match="not the setting chosen on validation"):
        results.render(tmp_path)


def test_bootstrap_pools_the_seeds_images(tmp_path, one_claim):
    values = [0.01, 0.02, 0.03]
    _write_grid(tmp_path, "sweep", {(("group", "a"), ("steps", 10)): [0.0, 0.0]})
    _write_grid(tmp_path, "final", {(("group", "a"), ("steps", 10)): values})
    rows = results.paired_rows(results.load_grid(tmp_path / "final")["cells"], "gain_vs_control_top1")
    assert rows[0]["effect"].boot.n == 1200 and rows[0]["effect"].boot.mean == pytest.approx(np.mean(values), abs=1e-3)


def test_check_fails_when_the_committed_file_is_stale(tmp_path, one_claim):
    _write_grid(tmp_path, "sweep", {(("group", "a"), ("steps", 10)): [0.0, 0.0]})
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results.README_BEGIN}\n{results.README_END}\nrest\n")
    args = [f"--results={tmp_path}", f"--out={tmp_path / 'RESULTS.md'}", f"--readme={readme}"]
    assert results.main(args) == 0 and results.main(["--check", *args]) == 0
    (tmp_path / "RESULTS.md").write_text((tmp_path / "RESULTS.md").read_text().replace("+0.00", "+0.50"))
    assert results.main(["--check", *args]) == 1


def test_a_grid_collected_from_two_workdirs_keeps_both_invocations_and_commits(tmp_path, one_claim):
    """A grid resumed on a fresh machine from its committed cells: the cells, the compute and the commits add up."""
    _write_grid(tmp_path, "sweep", {(("group", "a"), ("steps", 10)): [0.0, 0.0]})
    meta_path = tmp_path / "sweep" / "grid.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(
        json.dumps({**meta, "cells": 3, "invocations": [{"started": "t1", "seconds": 7.0, "cells": 2}]})
    )
    wd = tmp_path / "wd"
    (wd / "cells").mkdir(parents=True)
    rec = {"cell": {"group": "a", "steps": 10, "seed": 2}, "metrics": {"gain_vs_control_top1": 0.0}, "seconds": 5.0}
    (wd / "cells" / "2.json").write_text(json.dumps(rec))
    machine = {"cpus": 2, "processor": "x86_64", "devices": "1 cpu", "commit": "def5678"}
    run = {"started": "t2", "seconds": 5.0, "cells": 1}  # a workdir of before invocations kept their commit
    plan = {"cells": ["0", "1", "2"], "machine": machine, "invocations": [run]}
    (wd / "plan.json").write_text(json.dumps(plan))
    results.collect(wd, tmp_path / "sweep", "", None)
    meta = json.loads(meta_path.read_text())
    assert [r["started"] for r in meta["invocations"]] == ["t1", "t2"]
    assert [r["commit"] for r in meta["invocations"]] == ["abc1234", "def5678"]
    grid = results.load_grid(tmp_path / "sweep")
    assert len(grid["cells"]) == 3 and results.grid_seconds(grid) == 12.0
    text, _ = results.render(tmp_path)
    assert "3 of 3 cells; commits abc1234, def5678;" in text


def test_contrast_between_cells_and_the_pooled_row(tmp_path, monkeypatch):
    """Students in different cells: skd - scratch per seed and size, and the mean over sizes per seed."""
    claim = claims.Claim(
        id="Y",
        title="SKD helps",
        paper="p",
        grids=("skd",),
        effect="skd_vs_scratch_top1",
        contrast=("student", "skd", "scratch", "top1"),
        pool="size",
        primary=(("size", "all"),),
    )
    monkeypatch.setattr(results, "CLAIMS", (claim,))
    (tmp_path / "skd" / "cells").mkdir(parents=True)
    rng = np.random.default_rng(0)
    gains = {}
    for seed in range(3):
        for size in (5, 10):
            n = 20 * size
            base = rng.random(n) < 0.6
            better = base | (rng.random(n) < 0.2)
            gains[seed, size] = better.mean() - base.mean()
            for student, hits in (("skd", better), ("scratch", base), ("teacher", base)):
                rec = {
                    "cell": {"size": size, "student": student, "seed": seed},
                    "metrics": {"top1": float(hits.mean())},
                    "hits": {"model_hits": stats.pack_hits(hits)},
                }
                (tmp_path / "skd" / "cells" / f"{seed}-{size}-{student}.json").write_text(json.dumps(rec))
    (tmp_path / "skd" / "grid.json").write_text(json.dumps({"cells": 18}))
    rows = results.paired_rows(
        results.contrasted(results.load_grid(tmp_path / "skd")["cells"], claim.contrast), claim.effect
    )
    assert [r["setting"] for r in rows] == [{"size": 5}, {"size": 10}]
    assert rows[0]["effect"].values == pytest.approx([gains[s, 5] for s in range(3)])
    assert rows[0]["effect"].boot.n == 3 * 100  # each seed's 100 images, both students on the same ones
    text, _ = results.render(tmp_path)
    per_seed = [(gains[s, 5] + gains[s, 10]) / 2 for s in range(3)]
    t = sps.t.interval(0.95, 2, loc=np.mean(per_seed), scale=sps.sem(per_seed))
    assert f"{100 * np.mean(per_seed):+.2f} points, 95% CI [{100 * t[0]:+.2f}, {100 * t[1]:+.2f}]" in text
    assert "**Verdict: reproduced**" in text  # skd is right wherever scratch is, and on more images


def test_a_method_contrast_bootstraps_the_specialists_hits_not_the_generalists(tmp_path, monkeypatch):
    """Specialize cells keep three models' per-image outcomes; a contrast of `specialist_top1` between methods
    must resample the two specialists' (the generalist is the same in both cells: its difference is 0)."""
    claim = claims.Claim(
        id="M",
        title="Methods",
        paper="p",
        grids=("m",),
        effect="extract_vs_fresh_head_specialist_top1",
        contrast=("method", "extract", "fresh_head", "specialist_top1"),
        pair=("extract", "fresh_head"),
    )
    (tmp_path / "m" / "cells").mkdir(parents=True)
    rng = np.random.default_rng(2)
    diffs = []
    for seed in range(3):
        generalist = rng.random(300) < 0.5
        spec = {"extract": rng.random(300) < 0.7, "fresh_head": rng.random(300) < 0.6}
        diffs.append(spec["extract"].mean() - spec["fresh_head"].mean())
        for method, hits in spec.items():
            rec = {
                "cell": {"group": "animals", "method": method, "seed": seed},
                "metrics": {"specialist_top1": float(hits.mean()), "generalist_top1": float(generalist.mean())},
                "hits": {"generalist_hits": stats.pack_hits(generalist), "specialist_hits": stats.pack_hits(hits)},
            }
            (tmp_path / "m" / "cells" / f"{seed}-{method}.json").write_text(json.dumps(rec))
    (tmp_path / "m" / "grid.json").write_text(json.dumps({"cells": 6}))
    (row,) = results.paired_rows(
        results.contrasted(results.load_grid(tmp_path / "m")["cells"], claim.contrast), claim.effect, claim.pair
    )
    assert row["effect"].values == pytest.approx(diffs)
    assert row["effect"].boot.n == 3 * 300
    assert row["effect"].boot.mean == pytest.approx(np.mean(diffs), abs=0.01)
    assert row["effect"].boot.low > 0  # the generalists' hits would give exactly 0


def test_c3_contrasts_the_draws_and_pools_the_groups_per_seed(tmp_path, monkeypatch):
    """C3 as the claims list defines it: semantic - random gain over the control, per group and seed, then the
    mean over groups per seed (row `all`), whose t-interval the verdict reads; no shared images, no bootstrap."""
    (claim,) = [c for c in claims.CLAIMS if c.id == "C3"]
    monkeypatch.setattr(results, "CLAIMS", (claim,))
    cells = tmp_path / "c3_semantic" / "cells"
    cells.mkdir(parents=True)
    rng = np.random.default_rng(3)
    diffs = {}
    for seed in range(5):
        for group in ("tops", "footwear", "livestock"):
            gains = {"semantic": rng.normal(0.02, 0.01), "random": rng.normal(0.0, 0.01)}
            diffs[seed, group] = gains["semantic"] - gains["random"]
            for draw, gain in gains.items():
                rec = {
                    "cell": {"draw": draw, "group": group, "method": "extract", "seed": seed},
                    "metrics": {"gain_vs_control_top1": gain, "specialist_top1": 0.9},
                    "hits": {f"{m}_hits": stats.pack_hits(rng.random(40) < 0.9) for m in ("generalist", "specialist")},
                }
                (cells / f"{seed}-{group}-{draw}.json").write_text(json.dumps(rec))
    (tmp_path / "c3_semantic" / "grid.json").write_text(json.dumps({"cells": 30}))
    text, _ = results.render(tmp_path)
    per_seed = [np.mean([diffs[s, g] for g in ("tops", "footwear", "livestock")]) for s in range(5)]
    t = sps.t.interval(0.95, 4, loc=np.mean(per_seed), scale=sps.sem(per_seed))
    assert f"{100 * np.mean(per_seed):+.2f} points, 95% CI [{100 * t[0]:+.2f}, {100 * t[1]:+.2f}]" in text
    row = next(line for line in text.splitlines() if line.startswith("| all |"))
    assert "| - |" in row  # the two draws score different images: no paired bootstrap
    assert "**Verdict: reproduced**" in text


def test_a_detector_claim_bootstraps_mean_ap_from_its_replicates(tmp_path, monkeypatch):
    """mAP is no mean over images: the cells keep each model's F under shared image resamples, and the
    claim names the two scores its effect compares."""
    claim = claims.Claim(
        id="D", title="Detectors", paper="p", grids=("det",), effect="dF", pair=("specialist_F", "generalist_F")
    )
    monkeypatch.setattr(results, "CLAIMS", (claim,))
    (tmp_path / "det" / "cells").mkdir(parents=True)
    rng = np.random.default_rng(0)
    specialist, generalist = rng.normal(0.52, 0.01, (3, 500)), rng.normal(0.50, 0.01, (3, 500))
    for seed in range(3):
        rec = {
            "cell": {"group": "animals", "seed": seed},
            "metrics": {"dF": 0.02 + 0.002 * seed, "test_images": 700},
            "replicates": {
                "specialist_F": stats.pack_floats(specialist[seed]),
                "generalist_F": stats.pack_floats(generalist[seed]),
            },
        }
        (tmp_path / "det" / "cells" / f"{seed}.json").write_text(json.dumps(rec))
    (tmp_path / "det" / "grid.json").write_text(json.dumps({"cells": 3}))
    (row,) = results.paired_rows(results.load_grid(tmp_path / "det")["cells"], claim.effect, claim.pair)
    means = (specialist.astype(np.float32) - generalist.astype(np.float32)).mean(axis=0)
    assert row["effect"].boot.n == 3 * 700
    assert [row["effect"].boot.low, row["effect"].boot.high] == pytest.approx(np.quantile(means, [0.025, 0.975]))
    text, _ = results.render(tmp_path)
    assert f"[{100 * row['effect'].boot.low:+.2f}, {100 * row['effect'].boot.high:+.2f}]" in text
    assert "**Verdict: reproduced**" in text


def test_a_contrast_of_detector_cells_bootstraps_from_both_cells_replicates(tmp_path, monkeypatch):
    """C8 compares two cells (the chain and direct `horse`, scored on the same test images): the contrast
    carries each cell's replicates of the compared score, so the difference is bootstrapped per resample."""
    claim = claims.Claim(
        id="G",
        title="Gradual",
        paper="p",
        grids=("det",),
        effect="a>b_vs_b_specialist_F",
        contrast=("group", "a>b", "b", "specialist_F"),
        pair=("a>b_specialist_F", "b_specialist_F"),
    )
    monkeypatch.setattr(results, "CLAIMS", (claim,))
    (tmp_path / "det" / "cells").mkdir(parents=True)
    rng = np.random.default_rng(1)
    scores = {"a>b": rng.normal(0.60, 0.02, (3, 400)), "b": rng.normal(0.58, 0.02, (3, 400))}
    for group, reps in scores.items():
        for seed in range(3):
            rec = {
                "cell": {"group": group, "method": "suppress", "seed": seed},
                "metrics": {"specialist_F": float(reps[seed].mean()), "test_images": 90},
                "replicates": {
                    "specialist_F": stats.pack_floats(reps[seed]),
                    "generalist_F": stats.pack_floats(reps[seed]),
                },
            }
            (tmp_path / "det" / "cells" / f"{group}-{seed}.json").write_text(json.dumps(rec))
    (tmp_path / "det" / "grid.json").write_text(json.dumps({"cells": 6}))
    records = results.contrasted(results.load_grid(tmp_path / "det")["cells"], claim.contrast)
    (row,) = results.paired_rows(records, claim.effect, claim.pair)
    assert row["setting"] == {"method": "suppress"}
    means = (scores["a>b"].astype(np.float32) - scores["b"].astype(np.float32)).mean(axis=0)
    assert row["effect"].boot.n == 3 * 90
    assert [row["effect"].boot.low, row["effect"].boot.high] == pytest.approx(np.quantile(means, [0.025, 0.975]))
    assert row["effect"].values == pytest.approx(scores["a>b"].mean(axis=1) - scores["b"].mean(axis=1))


def test_a_contrast_whose_other_side_has_not_run_is_pending(tmp_path, monkeypatch):
    """A grid part-way through: cells of one side of the contrast only, so no pair yet; the section says so."""
    claim = claims.Claim(
        id="G", title="Gradual", paper="p", grids=("det",), effect="d", contrast=("group", "a>b", "b", "F")
    )
    monkeypatch.setattr(results, "CLAIMS", (claim,))
    (tmp_path / "det" / "cells").mkdir(parents=True)
    rec = {"cell": {"group": "a", "method": "suppress", "seed": 0}, "metrics": {"F": 0.5}}
    (tmp_path / "det" / "cells" / "a-0.json").write_text(json.dumps(rec))
    (tmp_path / "det" / "grid.json").write_text(json.dumps({"cells": 4}))
    section, verdict = results.claim_section(claim, {"det": results.load_grid(tmp_path / "det")})
    assert verdict == "pending" and "No cell pair to compare yet for `d`." in section
    assert "1 of 4 cells" in "\n".join(section)


def test_c1_runs_the_setting_the_committed_sweep_chose():
    """configs/experiments/c1.py names its setting; it must be the one the committed sweep chose on validation."""
    from configs.experiments import c1

    sweep = results.load_grid(ROOT / "results" / "c1_sweep")
    assert len(sweep["cells"]) == sweep["meta"]["cells"]  # the sweep is complete: its choice is final
    rows = results.paired_rows(sweep["cells"], "gain_vs_control_top1")
    chosen = results.choose(rows, "specialist_val_top1")
    grid = c1.get_config().experiment.grid
    assert {k: grid[k] for k in ("steps", "lr", "freeze_bn_stats")} == {
        k: [chosen[k]] for k in ("steps", "lr", "freeze_bn_stats")
    }
    # animals' seeds: the target half-width of 0.3 points at the chosen setting's per-seed s.d. in the sweep
    sd = next(r["effect"].sd for r in rows if r["setting"] == chosen)
    assert c1.ANIMALS_SEEDS == stats.seeds_to_resolve(sd, 0.003) == len(grid.seed)
