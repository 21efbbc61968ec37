"""The experiments command: grid expansion, aggregation vs NumPy, a tiny grid end to end with resume."""

import dataclasses
import json
import types

import numpy as np
import pytest

from configs.experiments import c1_sweep, c3_semantic, c6_cka, forgetting, table1, table2
from configs.experiments import methods as methods_cfg
from jaxspec import tables
from jaxspec.data.datasets import get_info
from jaxspec.experiments import forgetting as forgetting_kind
from jaxspec.experiments import grid, stats
from jaxspec.experiments import specialize as specialize_kind
from tests.synthetic_embedded import on_fixture


def test_aggregate_is_mean_and_sample_std_over_seeds_with_group_average():
    rng = np.random.default_rng(0)
    vals = rng.random((2, 3))  # groups x seeds
    results = [
        {"cell": {"group": g, "method": "extract", "seed": s}, "metrics": {"top1": vals[i, s]}}
        for i, g in enumerate(["a", "b"])
        for s in range(3)
    ]
    rows = {r["cell"]["group"]: r for r in grid.aggregate(results)}
    for i, g in enumerate(["a", "b"]):
        assert rows[g]["n"] == 3
        np.testing.assert_allclose(rows[g]["mean"]["top1"], vals[i].mean())
        np.testing.assert_allclose(rows[g]["std"]["top1"], vals[i].std(ddof=1))
    avg = rows[grid.AVERAGE]
    np.testing.assert_allclose(avg["mean"]["top1"], vals.mean(0).mean())
    np.testing.assert_allclose(avg["std"]["top1"], vals.mean(0).std(ddof=1))
    table = tables.grid_means(list(rows.values()))
    assert f"{100 * vals[0].mean():.2f} ± {100 * vals[0].std(ddof=1):.2f}" in table
    one_group = [r for r in results if r["cell"]["group"] == "a"]
    assert [r["cell"]["group"] for r in grid.aggregate(one_group)] == ["a"]  # no average of a single group
    by_set = {r["cell"]["group"]: r for r in grid.aggregate(results, {"avg (x)": {"a", "b"}, "avg (y)": {"b"}})}
    assert set(by_set) == {"a", "b", "avg (x)"}  # a set with one group has no average
    np.testing.assert_allclose(by_set["avg (x)"]["mean"]["top1"], vals.mean(0).mean())
    extra = [{"cell": {"group": "a", "method": "extract", "seed": 3}, "metrics": {"top1": 5.0}}]  # group a only
    rows = {r["cell"]["group"]: r for r in grid.aggregate(results + extra)}
    assert rows["a"]["n"] == 4 and rows[grid.AVERAGE]["n"] == 3  # seed 3 has no average over the groups
    np.testing.assert_allclose(rows[grid.AVERAGE]["mean"]["top1"], vals.mean(0).mean())


def test_exclusions_expand_groupings_so_some_groups_run_more_seeds():
    ctx = types.SimpleNamespace(groupings={"lex": ("lex0", "lex1")})
    cells = grid.expand(
        {"group": ["animals", "@lex"], "seed": [0, 1, 2]}, ctx, exclude=[{"group": "@lex", "seed": [1, 2]}]
    )
    assert [(c["group"], c["seed"]) for c in cells] == [
        ("animals", 0),
        ("animals", 1),
        ("animals", 2),
        ("lex0", 0),
        ("lex1", 0),
    ]
    with pytest.raises(ValueError, match="unknown grouping '@sem'"):
        grid.expand({"group": ["animals"], "seed": [0]}, ctx, exclude=[{"group": "@sem"}])


def test_cell_ids_are_file_safe_and_distinct():
    a = grid.cell_id({"group": "lex0", "freeze": "blocks:0-3", "seed": 0})
    b = grid.cell_id({"group": "lex0", "freeze": "blocks/.*", "seed": 0})
    assert "/" not in a + b and ":" not in a + b and a != b


@pytest.fixture(scope="module")
def fixture_data(embedded_manifest):
    return embedded_manifest


def tiny(module, manifest, **grid_axes):
    config = on_fixture(module.get_config("tiny"), manifest)
    for phase in (config.generalist, config.specialize, config.scratch):
        phase.steps = 4
    config.specialize.head_steps = 2
    config.checkpoint_every = 4
    config.eval.every_steps = 2
    for k, v in grid_axes.items():
        config.experiment.grid[k] = v
    return config


def test_tiny_grid_end_to_end_and_resume(fixture_data, tmp_path, monkeypatch, capsys):
    config = tiny(table1, fixture_data, group=["lex0", "lex3"], seed=[0, 1])
    out = grid.run_grid(config, str(tmp_path))
    assert len(out["cells"]) == 4 and len(list((tmp_path / "cells").glob("*.json"))) == 4
    assert out["groups"]["lex0"] == list(range(6)) and out["groups"]["lex3"] == list(range(18, 24))
    rows = {r["cell"]["group"]: r for r in out["rows"]}
    assert set(rows) == {"lex0", "lex3", grid.AVERAGE} and rows["lex0"]["n"] == 2
    m = out["cells"][0]["metrics"]
    assert m["gain_top1"] == pytest.approx(m["specialist_top1"] - m["generalist_top1"])
    report = (tmp_path / "report.md").read_text()
    assert "| group | method | n | generalist_top1 |" in report and grid.AVERAGE in report
    assert (tmp_path / "checkpoints" / "control-seed1").exists()

    # Interrupted after two cells: rerunning computes only the missing ones.
    for p in sorted((tmp_path / "cells").glob("*seed=1.json")):
        p.unlink()
    from jaxspec.experiments import specialize as kind

    calls = []
    real = kind.KIND.run_cell
    monkeypatch.setattr(
        kind,
        "KIND",
        dataclasses.replace(kind.KIND, run_cell=lambda ctx, c, cell: calls.append(cell) or real(ctx, c, cell)),
    )
    again = grid.run_grid(config, str(tmp_path))
    assert [c["seed"] for c in calls] == [1, 1]
    assert json.dumps(again["rows"]) == json.dumps(out["rows"])  # restored checkpoints: identical numbers


def test_c1_sweep_pairs_each_setting_with_its_equal_length_control_per_seed_generalist(fixture_data, tmp_path):
    config = tiny(c1_sweep, fixture_data, steps=[2, 4], lr=[1e-4], freeze_bn_stats=[False], seed=[0, 1])
    out = grid.run_grid(config, str(tmp_path))
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "generalist").is_dir() and (ckpts / "generalist-seed1").is_dir()  # one generalist per seed
    for seed in (0, 1):
        for steps in (2, 4):
            control = ckpts / f"control-seed{seed}-freeze_bn_stats=False,lr=0.0001,steps={steps}"
            assert (control / str(steps)).is_dir()  # as long as its specialist
    cell = out["cells"][0]
    m, n_test = cell["metrics"], 10 * 4  # 10 animal classes x 4 test images each in the fixture
    assert {"gain_vs_control_top1", "gain_vs_control_val_top1", "specialist_val_top1"} <= set(m)
    hits = {k: stats.unpack_hits(v) for k, v in cell["hits"].items()}
    assert {len(h) for h in hits.values()} == {n_test}
    assert hits["specialist_hits"].mean() == pytest.approx(m["specialist_top1"])
    paired = {row["cell"]["steps"]: row for row in out["paired"]}
    row = paired[2]
    assert row["n"] == 2
    per_seed = [c["metrics"]["gain_vs_control_top1"] for c in out["cells"] if c["cell"]["steps"] == 2]
    t = stats.t_interval(per_seed)
    assert row["t_interval"]["gain_vs_control_top1"] == pytest.approx([t.mean, t.low, t.high])
    low, high = row["bootstrap"]["gain_vs_control_top1"][1:]
    assert low <= row["bootstrap"]["gain_vs_control_top1"][0] <= high
    assert "Paired effects" in (tmp_path / "report.md").read_text()
    assert out["machine"]["cpus"] >= 1 and out["machine"]["devices"].endswith("cpu")
    plan = json.loads((tmp_path / "plan.json").read_text())  # what `results --collect` copies: the compute
    assert plan["cells"] == [grid.cell_id(c["cell"]) for c in out["cells"]]
    (run,) = plan["invocations"]
    assert run["cells"] == 4 and run["seconds"] >= sum(c["seconds"] for c in out["cells"])


def test_c3_pairs_each_semantic_group_with_a_random_draw_of_its_size_from_its_source(fixture_data, tmp_path):
    config = tiny(c3_semantic, fixture_data)
    assert config.experiment.grid.group == ["tops", "footwear"] and config.experiment.grid.draw == [
        "semantic",
        "random",
    ]
    out = grid.run_grid(config, str(tmp_path))
    cells = {(c["cell"]["group"], c["cell"]["draw"]): c for c in out["cells"]}
    assert len(cells) == 4
    ctx = types.SimpleNamespace(info=get_info("embedded"), groups=get_info("embedded").groups)
    tops = specialize_kind.subset_of(ctx, {"group": "tops", "draw": "semantic", "seed": 0})
    drawn = specialize_kind.subset_of(ctx, {"group": "tops", "draw": "random", "seed": 0})
    assert tops == ctx.groups["tops"] and len(drawn) == 4 and set(drawn) <= set(ctx.groups["clothing"])
    for (group, draw), cell in cells.items():
        hits = stats.unpack_hits(cell["hits"]["specialist_hits"])
        n = 4 * len(ctx.groups[group])  # the fixture's 4 test images per class, of the cell's own classes
        assert len(hits) == n and hits.mean() == pytest.approx(cell["metrics"]["specialist_top1"])
        assert (tmp_path / "checkpoints" / f"cell-draw={draw},group={group},method=extract,seed=0").is_dir()
    # one control serves every cell of the seed: it trains on all classes, whatever S
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("control*")) == ["control-seed0"]
    with pytest.raises(ValueError, match="grid axis 'draw': 'lexical' is not one of"):
        specialize_kind.subset_of(ctx, {"group": "tops", "draw": "lexical"})


def test_c6_cka_cells_reuse_the_specialize_kinds_specialist_and_draw_the_band(fixture_data, tmp_path):
    config = tiny(c6_cka, fixture_data, seed=[0, 1])
    out = grid.run_grid(config, str(tmp_path))
    layers = ["stem", "block0", "block1", "block2", "block3", "last_conv", "pool", "pre_logits"]
    for cell in out["cells"]:
        m = cell["metrics"]
        assert sorted(m) == sorted([f"cka_{n}" for n in layers] + ["cka_drop"])
        assert all(-1e-3 <= m[f"cka_{n}"] <= 1 + 1e-3 for n in layers)
        assert m["cka_drop"] == pytest.approx(m["cka_stem"] - m["cka_pre_logits"])
        seed = cell["cell"]["seed"]
        assert (tmp_path / "checkpoints" / f"cell-group=animals,method=extract,seed={seed}").is_dir()
    assert (tmp_path / "checkpoints" / "generalist-seed1").is_dir()  # one generalist per seed
    assert "cka.png" in out["plots"] and (tmp_path / "cka.png").stat().st_size > 0


def test_methods_curves_and_forgetting_plots(fixture_data, tmp_path):
    config = tiny(methods_cfg, fixture_data, method=["extract", "suppress"], seed=[0])
    out = grid.run_grid(config, str(tmp_path / "m"))
    # the methods' validation curves, then the generalist's training curves (trained in this workdir)
    assert out["plots"] == ["curves.png", "plots/curves.png"]
    assert all((tmp_path / "m" / p).stat().st_size > 0 for p in out["plots"])
    assert "![plots/curves.png](plots/curves.png)" in (tmp_path / "m" / "report.md").read_text()
    config = tiny(forgetting, fixture_data, seed=[0])
    config.specialize.optim.lr = 0.05
    out = grid.run_grid(config, str(tmp_path / "f"))
    cells = {c["cell"]["train"]: c["metrics"] for c in out["cells"]}
    m = cells["head"]
    assert out["plots"] == ["forgetting.png", "plots/curves.png"]
    # Training only on S with every output in the softmax pushes the other classes down.
    assert m["end_irrelevant_prob"] < m["start_irrelevant_prob"]
    assert m["end_irrelevant_bias"] < m["start_irrelevant_bias"]
    assert m["end_test_irrelevant_prob"] < m["start_test_irrelevant_prob"]
    # The whole network trained the same way starts from the same generalist, scored on the same test images.
    assert cells["full"]["start_test_irrelevant_prob"] == m["start_test_irrelevant_prob"]
    assert cells["full"]["end_test_irrelevant_prob"] != m["end_test_irrelevant_prob"]
    with pytest.raises(ValueError, match="grid axis 'train': 'body' is not one of"):
        forgetting_kind.run_cell(None, config, {"group": "animals", "train": "body"})


# Semantic groups are three of ten classes: their specialists train as one vmapped step. The generalist's confusion
# clusters may have any sizes, so each trains alone (the same path as test_tiny_grid's specialists, three compiles).
@pytest.mark.parametrize(
    "grouping, names",
    [
        ("semantic", ["animals", "clothing", "digits"]),
        pytest.param("confusion", [f"confusion{i}" for i in range(3)], marks=pytest.mark.slow),
    ],
)
def test_routed_table2_cell(fixture_data, tmp_path, grouping, names):
    config = tiny(table2, fixture_data, grouping=[grouping], seed=[0])
    config.specialize.batch_size = 8  # a confusion cluster may hold only a few of the tiny data's classes
    out = grid.run_grid(config, str(tmp_path))
    m = out["cells"][0]["metrics"]
    assert 0 <= m["routing_accuracy"] <= 1 and 0 <= m["routed_top1"] <= 1
    assert m["gain_top1"] == pytest.approx(m["routed_top1"] - m["generalist_top1"])
    # each test image's outcome, for the paired bootstrap of the routed system against the generalist
    hits = {k: stats.unpack_hits(v) for k, v in out["cells"][0]["hits"].items()}
    assert len(hits["routed_hits"]) == len(hits["generalist_hits"]) > 0
    assert hits["routed_hits"].mean() == pytest.approx(m["routed_top1"])
    assert hits["generalist_hits"].mean() == pytest.approx(m["generalist_top1"])
    # the grouping's 3 groups cover all 30 classes once
    assert sorted(c for name in names for c in out["groups"][name]) == list(range(30))
    # the three specialists were trained under the names the `specialize` kind uses
    for name in names:
        assert (tmp_path / "checkpoints" / f"cell-group={name},method=extract,seed=0").exists()


def test_grid_errors_name_the_bad_value(fixture_data, tmp_path):
    config = tiny(table1, fixture_data, group=["@nonexistent"])
    with pytest.raises(ValueError, match="unknown grouping '@nonexistent'"):
        grid.run_grid(config, str(tmp_path))


def test_cli_rejects_unknown_override(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxspec.experiments",
            "--config=configs/experiments/table1.py:tiny",
            f"--workdir={tmp_path}",
            "--config.experiment.kindd=x",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "kindd" in proc.stderr


def test_group_sets_average_each_expanded_grouping():
    r = types.SimpleNamespace(groupings={"semantic": ("animals", "clothing"), "random": ("random0", "random1")})
    assert grid.group_sets({"group": ["@semantic"], "seed": [0]}, r) is None
    assert grid.group_sets({"group": ["@semantic", "@random"]}, r) == {
        f"{grid.AVERAGE} (semantic)": {"animals", "clothing"},
        f"{grid.AVERAGE} (random)": {"random0", "random1"},
    }


def test_exclude_drops_the_cells_matching_every_named_axis():
    r = types.SimpleNamespace(groupings={"semantic": ("animals", "clothing", "digits")})
    axes = {"group": ["@semantic", "horse"], "method": ["scratch", "suppress"], "seed": [0, 1]}
    exclude = [{"method": "scratch", "group": ["clothing", "digits", "horse"]}, {"group": "horse", "seed": 1}]
    cells = grid.expand(axes, r, exclude)
    assert [(c["group"], c["method"]) for c in cells if c["seed"] == 0] == [
        ("animals", "scratch"),
        ("animals", "suppress"),
        ("clothing", "suppress"),
        ("digits", "suppress"),
        ("horse", "suppress"),
    ]
    assert len(cells) == 9 and all(c["group"] != "horse" for c in cells if c["seed"] == 1)
    assert len(grid.expand(axes, r)) == 16
    with pytest.raises(
        Exception, match=r"experiment\.exclude=\{'methd': 'scratch'\} is not allowed: a dict of grid axes"
    ):
        grid.expand(axes, r, [{"methd": "scratch"}])
