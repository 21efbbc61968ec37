"""The detection main job end to end on synthetic embedded scenes: results, freezing, resume, COCOeval
agreement, the CLI and an experiment grid."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from configs import detect_animals
from configs.experiments import table5
from jaxspec.detection import data, run
from jaxspec.detection import specialize as dspec
from jaxspec.detection.task import evaluator
from jaxspec.experiments import grid, stats
from jaxspec.methods import generalist, restricted
from jaxspec.train import checkpoint
from tests.synthetic_embedded import on_fixture

pytestmark = pytest.mark.xdist_group("detect_run")  # the tests share one finished run: one worker (tests/conftest.py)

ANIMALS = tuple(range(10))


@pytest.fixture(scope="module")
def manifest(embedded_manifest):
    return embedded_manifest


SPECIALIZE = {"method": "slice", "freeze": "layers:10-12", "freeze_bn_stats": True}


def _cli(workdir, manifest, **specialize):
    args = [f"--config.specialize.{k}={v}" for k, v in specialize.items()]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxspec.main",
            "--config=configs/detect_animals.py:tiny",
            f"--workdir={workdir}",
            f"--config.data.manifest={manifest}",
            f"--config.data.data_dir={pathlib.Path(manifest).parent / 'cache'}",
            *args,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def finished(manifest, tmp_path_factory):
    """One tiny run through the CLI (head slicing, layers 10-12 and BatchNorm statistics frozen while
    specializing): its config, workdir, results.json and output."""
    workdir = tmp_path_factory.mktemp("run")
    proc = _cli(workdir, manifest, **SPECIALIZE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = on_fixture(detect_animals.get_config("tiny"), manifest)
    config.specialize.update(SPECIALIZE)
    return config, workdir, json.loads((workdir / "results.json").read_text()), proc


def _flat(tree):
    return {"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(tree)}


def test_cli_run_prints_progress_and_the_results_table(finished):
    *_, proc = finished
    assert "jaxspec detect: embedded_scenes (30 classes), yolov5n at 64 px" in proc.stdout
    for row in (
        "generalist restricted to S",
        "sliced specialist, untuned",
        "specialist (slice), tuned",
        "scratch specialist (same data)",
    ):
        assert f"| {row} |" in proc.stdout
    assert "| model (test split, S = animals, 10 classes) | F | mAP@0.5 | mAP@0.5:0.95 |" in proc.stdout
    assert "[generalist] step 4/4" in proc.stderr and "img/s  ETA" in proc.stderr


def test_results_table_slicing_exact_and_every_animal_box_scored(finished):
    config, workdir, results, _ = finished
    stage = results["stages"][0]
    rows = stage["test_on_S"]
    assert list(rows) == [
        "generalist restricted to S",
        "sliced specialist, untuned",
        "specialist (slice), tuned",
        "scratch specialist (same data)",
    ]
    assert stage["slicing_exact"]  # the sliced, untuned head is the generalist restricted to S
    assert rows["generalist restricted to S"]["mAP50"] > 0  # (the tiny config's eval makes that a real number)
    assert (
        rows["sliced specialist, untuned"]["AP50_95_per_class"]
        == rows["generalist restricted to S"]["AP50_95_per_class"]
    )
    test = data.get_source(config.data, "test")
    animal_boxes = sum(int(np.isin(labels, ANIMALS).sum()) for labels in test.box_labels)
    with_animals = sum(bool(np.isin(labels, ANIMALS).any()) for labels in test.box_labels)
    for m in rows.values():
        assert m["boxes"] == animal_boxes and m["images"] == with_animals
        assert 0 <= m["mAP50_95"] <= m["mAP50"] <= 1
        assert m["fitness"] == pytest.approx(0.1 * m["mAP50"] + 0.9 * m["mAP50_95"])
        assert set(m["AP50_95_per_class"]) <= {test.info.class_names[c] for c in ANIMALS}
    assert results["generalist_test_all_classes"]["boxes"] == sum(len(labels) for labels in test.box_labels)
    for name in ("generalist", "specialist", "scratch"):
        assert (workdir / "checkpoints" / name / "4").exists()
    spec = json.loads((workdir / "models" / "specialist" / "model.json").read_text())
    assert spec["num_classes"] == 10 and spec["class_names"][:2] == ["bear", "bird"]


def test_frozen_layers_and_statistics_are_the_generalists(finished):
    config, workdir, *_ = finished
    r = run.open_run(config, str(workdir))  # finished phases restore without training
    gen = generalist(r)
    spec = run.specialize_from(r, gen, ANIMALS, "slice", seed=config.seed + 1, name="specialist")
    start = dspec.slice_head(gen.model, ANIMALS)
    before, after = _flat(nnx.state(start, nnx.Param)), _flat(spec.state.params)
    for path in before:
        assert np.array_equal(before[path], after[path]) == path.startswith("layers/10/"), path
    stats_before, stats_after = _flat(nnx.state(start, nnx.BatchStat)), _flat(spec.state.batch_stats)
    assert stats_before.keys() == stats_after.keys()
    for path, value in stats_before.items():
        np.testing.assert_array_equal(value, stats_after[path], err_msg=path)
    # The run's exported detector loads with the documented loader and predicts as the trained one does.
    loaded, record = checkpoint.load_model(workdir / "models" / "specialist")
    assert record["name"] == config.model.name and record["output_classes"] == list(ANIMALS)
    x = np.random.default_rng(0).random((2, config.data.image_size, config.data.image_size, 3)).astype(np.float32)
    for a, b in zip(spec.model(x), loaded(x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # report.md draws the tuned specialist's detections: those its results row scored.
    scores, found = run.detect(r, spec, ANIMALS)
    assert scores == finished[2]["stages"][0]["test_on_S"]["specialist (slice), tuned"]
    assert len(found.detections()["scores"]) > 0
    assert (workdir / "plots" / "detections_1.png").stat().st_size > 0
    assert "![detections, S = animals](plots/detections_1.png)" in (workdir / "report.md").read_text()
    r.writer.close()


@pytest.mark.slow
def test_interrupted_specialist_resumes_to_the_same_results(finished, tmp_path):
    config, workdir, results, _ = finished
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "checkpoints" / "specialist" / "4")  # as if stopped after the step-2 checkpoint
    shutil.rmtree(copy / "models" / "specialist")
    logged = len((copy / "metrics.jsonl").read_text().splitlines())
    again = run.run(config, str(copy))
    new_lines = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()[logged:]]
    trained = {(name.split("/")[0], rec["step"]) for rec in new_lines for name in rec if name.endswith("train_loss")}
    assert trained == {("specialist", 4)}  # only the interrupted phase ran, and only its missing steps
    assert json.loads(json.dumps(again["stages"])) == results["stages"]


def test_evaluator_agrees_with_pycocotools_on_the_scenes_json(finished):
    cocoeval = pytest.importorskip("pycocotools.cocoeval")
    coco = pytest.importorskip("pycocotools.coco")
    config, workdir, results, _ = finished
    r = run.open_run(config, str(workdir))
    gen = restricted(generalist(r), ANIMALS)
    source = run.constrained(r, r.test, ANIMALS)
    found = evaluator(r, gen.modeldef).collect(gen.state, source, classes=gen.classes, columns=gen.columns)
    dt, gt = found.detections(), found.ground_truth()
    ids = source.source_indices  # evaluator image ids are positions in the constrained source
    truth = np.concatenate([source[i]["boxes"] for i in range(len(source))])
    np.testing.assert_allclose(gt["boxes"], truth, atol=1e-3)  # letterbox there and back
    ground = coco.COCO(r.test.coco_json_path)
    found = ground.loadRes(
        [
            {
                "image_id": int(ids[i]),
                "category_id": int(c) + 1,
                "score": float(s),
                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
            }
            for i, b, s, c in zip(dt["image_id"], dt["boxes"], dt["scores"], dt["labels"])
        ]
    )
    ev = cocoeval.COCOeval(ground, found, "bbox")
    ev.params.imgIds, ev.params.catIds = [int(i) for i in ids], [c + 1 for c in ANIMALS]
    ev.params.maxDets = [1, 10, config.eval.coco_max_dets]
    ev.evaluate()
    ev.accumulate()
    precision = ev.eval["precision"][..., 0, -1]  # [T, R, K] at area 'all' and the largest maxDets, as summarize()
    ours = results["stages"][0]["test_on_S"]["generalist restricted to S"]
    assert len(dt["scores"]) > 0 and ours["mAP50"] > 0
    assert ours["mAP50_95"] == pytest.approx(precision[precision > -1].mean(), abs=1e-3)
    assert ours["mAP50"] == pytest.approx(precision[0][precision[0] > -1].mean(), abs=1e-3)
    r.writer.close()


def test_a_bad_method_is_named(manifest, tmp_path):
    config = on_fixture(detect_animals.get_config("tiny"), manifest)
    config.specialize.method = "extract"
    with pytest.raises(
        ValueError, match=r"^specialize.method='extract' is not allowed: one of \['suppress', 'slice'\]"
    ):
        run.run(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_gradual_vs_direct_grid_at_equal_steps_with_controls_per_seed_generalists_and_a_paired_bootstrap(
    finished, manifest, tmp_path
):
    """Table 5's grid in small: `horse` directly and through `animals`, each with its `continued` control,
    two seeds, each seed's own generalist; the direct specialist trains as many steps as both stages."""
    _, workdir, *_ = finished
    config = on_fixture(table5.get_config("tiny"), manifest)
    config.experiment.update(bars=True)
    config.experiment.grid.update(group=["horse", "animals>horse"], seed=[0, 1])
    config.specialize.control = True
    shutil.copytree(workdir / "checkpoints" / "generalist", tmp_path / "checkpoints" / "generalist")  # seed 0's
    out = grid.run_grid(config, str(tmp_path))
    test = data.get_source(config.data, "test")
    with_horses = sum(bool((labels == test.info.class_names.index("horse")).any()) for labels in test.box_labels)
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "generalist-seed1").is_dir()  # seed 1 replicates the whole pipeline
    steps = config.specialize.steps
    for rec in out["cells"]:
        cell, m = rec["cell"], rec["metrics"]
        assert m["dF"] == pytest.approx(m["specialist_F"] - m["generalist_F"])
        assert m["dF_vs_control"] == pytest.approx(m["specialist_F"] - m["control_F"])
        name = f"cell-{grid.cell_id(cell)}"
        if ">" in cell["group"]:  # the chain: its steps in each stage
            assert (ckpt / f"{name}-stage0" / str(steps)).is_dir() and (ckpt / f"{name}-stage1" / str(steps)).is_dir()
        else:  # direct: as many steps as the chain's two stages together
            assert (ckpt / f"{name}-stage0" / str(2 * steps)).is_dir()
        control = ckpt / f"control-seed{cell['seed']}-steps{2 * steps}"
        assert (control / str(2 * steps)).is_dir()  # the control trains as long as its specialist
        replicates = {k: stats.unpack_floats(v) for k, v in rec["replicates"].items()}
        assert sorted(replicates) == sorted(
            f"{p}_{s}" for p in ("generalist", "specialist", "control") for s in ("F", "mAP50", "mAP50_95")
        )
        assert {len(v) for v in replicates.values()} == {stats.RESAMPLES}
        assert m["test_images"] == with_horses  # every test scene with a horse, resampled
    # the generalist continued on every class: one control per seed and length, shared by both groups
    assert sorted(p.name for p in ckpt.glob("control-*")) == [f"control-seed{s}-steps{2 * steps}" for s in (0, 1)]
    paired = {row["cell"]["group"]: row for row in out["paired"]}
    for group, row in paired.items():
        assert row["n"] == 2
        values = [c["metrics"]["dF"] for c in out["cells"] if c["cell"]["group"] == group]
        assert row["t_interval"]["dF"][0] == pytest.approx(np.mean(values))
        mean, low, high = row["bootstrap"]["dF"]
        assert mean == pytest.approx(np.mean(values)) and low <= high
    assert out["plots"] == ["delta_f.png"] and (tmp_path / "delta_f.png").stat().st_size > 0
    assert f"| animals>horse | {config.specialize.method} | 2 |" in (tmp_path / "report.md").read_text()
