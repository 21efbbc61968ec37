"""The per-run report of a tiny run, and the plot helpers on hand-made histories and accuracies."""

import copy
import json
import re

import numpy as np
import pytest
from PIL import Image

from configs import detect_animals
from jaxspec import plots, report, tables
from jaxspec.train import history


@pytest.fixture(scope="module")
def tiny_run(tiny_main_run):
    """The session's tiny run with validation on (tests/conftest.py): (workdir, results, terminal output)."""
    return tiny_main_run.workdir, tiny_main_run.results, tiny_main_run.out


# The tests on the tiny run go with the run's other users, on one worker.
SHARED = pytest.mark.xdist_group("tiny_main")


def _links(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


@SHARED
def test_run_writes_report_with_tables_and_images(tiny_run):
    workdir, results, terminal = tiny_run
    text = (workdir / "report.md").read_text()
    tables = report.results_markdown(results)
    assert tables in text and tables in terminal  # the same table as the terminal
    assert f"report: {workdir / 'report.md'}" in terminal
    assert "| specialist | 20 | 32 | adam, lr 0.0001, constant |" in text
    assert "| generalist | 30 | 32 | adam, lr 0.002, cosine, 5 warm-up steps |" in text
    assert "animals: 10 classes (bear, bird," in text and "with the `continued` control" in text
    assert "Validation was off" not in text
    links = _links(text)
    assert links == ["plots/class_change_1.png", "plots/curves.png"]
    for link in links:
        with Image.open(workdir / link) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200


@SHARED
def test_report_per_class_table_matches_results(tiny_run):
    workdir, results, _ = tiny_run
    text = (workdir / "report.md").read_text()
    on_s = results["stages"][0]["test_on_S"]
    gen = on_s["generalist restricted to S"]["per_class_top1"]
    tuned = on_s["specialist (extract), tuned"]["per_class_top1"]
    control = on_s["generalist trained further on its data (control)"]["per_class_top1"]
    for i, name in enumerate(results["stages"][0]["subset_names"]):
        row = f"| {name} | {100 * gen[i]:.1f} | {100 * tuned[i]:.1f} | {100 * control[i]:.1f} | "
        assert row + f"{100 * (tuned[i] - gen[i]):+.1f} |" in text


@SHARED
def test_report_without_curves_or_with_loaded_generalist(tiny_run, tmp_path):
    _, results, _ = tiny_run
    results = copy.deepcopy(results)
    results["config"]["generalist"]["init"] = "/models/g"
    results["config"]["eval"]["every_steps"] = 0
    text = report.write_run_report(tmp_path, results).read_text()  # no metrics.jsonl here
    assert "No training curves were logged" in text and "Validation was off" in text
    assert "| generalist | — | — | loaded from `/models/g` |" in text
    assert _links(text) == ["plots/class_change_1.png"]
    assert (tmp_path / "plots" / "class_change_1.png").exists() and not (tmp_path / "plots" / "curves.png").exists()


@SHARED
def test_report_of_a_gradual_run_from_results_json(tiny_run, tmp_path):
    """Two stages (as `animals>livestock` gives): a chart and a table per stage; JSON round trip is enough."""
    _, results, _ = tiny_run
    results = json.loads(json.dumps(results))
    second = copy.deepcopy(results["stages"][0])
    keep = [0, 1]
    second["subset"] = [second["subset"][i] for i in keep]
    second["subset_names"] = [second["subset_names"][i] for i in keep]
    second["test_on_S"] = {
        name: {**m, "per_class_top1": [m["per_class_top1"][i] for i in keep]} for name, m in second["test_on_S"].items()
    }
    results["stages"].append(second)
    results["config"]["specialize"]["subset"] = "animals>bear,bird"
    text = report.write_run_report(tmp_path, results).read_text()
    assert "| model (test split, S = bear,bird, 2 classes) | top-1 | top-2 |" in text
    assert "| S, stage 2 | bear,bird: 2 classes (bear, bird) |" in text
    assert _links(text) == ["plots/class_change_1.png", "plots/class_change_2.png"]


def test_class_changes_orders_rows():
    stage = {
        "method": "extract",
        "subset_names": ["a", "b"],
        "test_on_S": {
            "generalist restricted to S": {"per_class_top1": [0.5, 0.5]},
            "generalist trained further on its data (control)": {"per_class_top1": [0.6, 0.5]},
            "extracted specialist, untuned": {"per_class_top1": [0.5, 0.5]},
            "specialist (extract), tuned": {"per_class_top1": [0.7, 0.4]},
        },
    }
    ref, before, after = report.class_changes(stage)
    assert ref == "generalist restricted to S" and before == [0.5, 0.5]
    assert list(after) == ["specialist (extract), tuned", "generalist trained further on its data (control)"]
    with pytest.raises(ValueError, match=re.escape("no row 'specialist (dustbin), tuned'")):
        report.class_changes({**stage, "method": "dustbin"})


def _detection_results() -> dict:
    """Results as `jaxspec.detection.run.run` returns them (tiny config, slicing and a scratch specialist)."""
    config = detect_animals.get_config("tiny")
    config.specialize.method = "slice"

    def row(f, ap):  # F, mAP, and AP@0.5:0.95 of the classes with test boxes
        return {"fitness": f, "mAP50": f + 0.1, "mAP50_95": f - 0.01, "images": 9, "boxes": 14, "AP50_95_per_class": ap}

    names = ["bear", "bird", "cat"]
    gen = row(0.2, {"bear": 0.3, "cat": 0.1})  # no test box of a bird
    return {
        "config": config.to_dict(),
        "seconds": 12.0,
        "generalist_test_all_classes": row(0.15, {}),
        "stages": [
            {
                "subset": [0, 1, 2],
                "subset_names": names,
                "method": "slice",
                "slicing_exact": True,
                "test_on_S": {
                    "generalist restricted to S": gen,
                    "sliced specialist, untuned": gen,
                    "specialist (slice), tuned": row(0.25, {"bear": 0.5, "cat": 0.05}),
                    "scratch specialist (same data)": row(0.05, {"bear": 0.0, "cat": 0.2}),
                },
            }
        ],
    }


def test_detection_report(tmp_path):
    results = _detection_results()
    writer = history.JsonlWriter(tmp_path / "metrics.jsonl")
    for step in (2, 4):
        writer.write_scalars(step, {"generalist/train_loss": 1.0 / step, "generalist/train_learning_rate": 1e-3})
        writer.write_scalars(
            step,
            {
                "generalist/val_fitness": 0.01 * step,
                "generalist/val_mAP50": 0.02 * step,
                "generalist/val_mAP50_95": 0.005 * step,
            },
        )
    writer.close()
    text = report.write_run_report(tmp_path, results).read_text()
    stage = results["stages"][0]
    table = tables.detection(list(stage["test_on_S"].items()), "model (test split, S = animals, 3 classes)")
    assert table in text and report.results_markdown(results) == table
    assert "| model | yolov5n |" in text and "beside a specialist trained from scratch on D_S" in text
    assert "| generalist | 4 | 8 | adam, lr 0.003, cosine, 1 warm-up step |" in text
    assert "| specialist | 4 | 8 | adam, lr 0.0001, constant | — | — | — |" in text
    assert "the untuned sliced specialist equals its parent restricted to S" in text
    assert "(9 test images, 14 boxes): F 15.00, mAP@0.5 25.00, mAP@0.5:0.95 14.00 (%)" in text
    # per-class AP@0.5:0.95 by class name; the untuned sliced head (= the reference) gets no column
    header = "| class | generalist restricted to S | specialist (slice), tuned | scratch specialist (same data) | Δ |"
    assert header in text
    assert "| bear | 30.0 | 50.0 | 0.0 | +20.0 |" in text and "| bird | — | — | — | — |" in text
    assert "| cat | 10.0 | 5.0 | 20.0 | -5.0 |" in text
    assert _links(text) == ["plots/class_change_1.png", "plots/curves.png"]
    for link in _links(text):
        with Image.open(tmp_path / link) as im:
            assert im.format == "PNG"
    _, before, after = report.class_changes(stage)
    assert np.isnan(before[1]) and list(after) == ["specialist (slice), tuned", "scratch specialist (same data)"]


def test_detection_curves_panels():
    hist = {
        "specialist/train_loss": [(1, 3.0), (2, 2.0)],
        "specialist/val_fitness": [(2, 0.1)],
        "specialist/val_mAP50": [(2, 0.3)],
        "specialist/val_mAP50_95": [(2, 0.05)],
    }
    assert plots.phases(hist, plots.DETECTION_PANELS) == ["specialist"]
    _, val, lr = plots.curves_figure(hist, ["specialist"], plots.DETECTION_PANELS).axes
    np.testing.assert_allclose([line.get_xydata()[0, 1] for line in val.lines], [10.0, 30.0, 5.0])
    assert [t.get_text() for t in val.get_legend().get_texts()] == ["F", "mAP@0.5", "mAP@0.5:0.95"]
    assert [t.get_text() for t in lr.texts] == ["not logged"]


# Plot helpers on synthetic histories.

HIST = {
    "generalist/train_loss": [(10, 2.0), (20, 1.5), (30, 1.2)],
    "generalist/train_accuracy": [(10, 0.3), (20, 0.5), (30, 0.6)],
    "generalist/train_learning_rate": [(10, 1e-3), (20, 5e-4), (30, 0.0)],
    "generalist/val_top1": [(15, 0.4), (30, 0.55)],
    "generalist/images_per_sec": [(10, 100.0)],
    "throughput/images_per_sec": [(10, 100.0)],  # no curve of PANELS: not a phase
    "specialist/train_loss": [(5, 0.9), (10, 0.8)],
    "empty/train_loss": [],
}


def test_phases_in_logged_order_with_curves_only():
    assert plots.phases(HIST) == ["generalist", "specialist"]
    assert plots.phases({}) == []


def test_curves_figure_draws_the_history():
    fig = plots.curves_figure(HIST, ["generalist", "specialist"])
    axes = np.array(fig.axes).reshape(2, 3)
    loss, acc, lr = axes[0]
    np.testing.assert_allclose(loss.lines[0].get_xydata(), np.array(HIST["generalist/train_loss"]))
    train, val = acc.lines
    np.testing.assert_allclose(train.get_xydata(), np.array(HIST["generalist/train_accuracy"]) * [1, 100])
    np.testing.assert_allclose(val.get_xydata(), np.array(HIST["generalist/val_top1"]) * [1, 100])
    assert [t.get_text() for t in acc.get_legend().get_texts()] == ["train batches", "validation"]
    np.testing.assert_allclose(lr.lines[0].get_xydata(), np.array(HIST["generalist/train_learning_rate"]))
    # the specialist logged only its loss: the other panels say so instead of drawing
    assert len(axes[1, 0].lines) == 1
    for ax in axes[1, 1:]:
        assert not ax.lines and [t.get_text() for t in ax.texts] == ["not logged"]


def test_curves_figure_needs_a_phase():
    with pytest.raises(ValueError, match="at least one phase"):
        plots.curves_figure(HIST, [])


def test_class_change_bars_are_the_differences(tmp_path):
    names = ["cat", "dog", "cow"]
    before = [0.5, 0.8, np.nan]
    after = {"tuned": [0.75, 0.7, 0.9], "control": [0.5, 0.9, 0.2]}
    fig = plots.class_change_figure(names, before, after, title="t")
    ax = fig.axes[0]
    tuned, control = ax.containers
    np.testing.assert_allclose([b.get_height() for b in tuned], [25.0, -10.0, np.nan])
    np.testing.assert_allclose([b.get_height() for b in control], [0.0, 10.0, np.nan])
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["tuned (mean +7.50)", "control (mean +5.00)"]
    path = plots.save(fig, tmp_path / "sub" / "c.png")
    with Image.open(path) as im:
        assert im.format == "PNG"


def test_class_change_sorts_many_classes():
    rng = np.random.default_rng(0)
    n = plots.MAX_NAMED_CLASSES + 5
    before, after = rng.uniform(size=n), rng.uniform(size=n)
    ax = plots.class_change_figure([f"c{i}" for i in range(n)], before, {"tuned": after}).axes[0]
    heights = [b.get_height() for b in ax.containers[0]]
    np.testing.assert_allclose(heights, np.sort(100 * (after - before))[::-1])
    assert not ax.get_xticks().size


@pytest.mark.parametrize(
    "before, after, message",
    [
        ([0.1], {"a": [0.1, 0.2]}, "1 'before' accuracies for 2 class names"),
        ([0.1, 0.2], {"a": [0.1]}, "1 accuracies of 'a' for 2 class names"),
        ([0.1, 0.2], {}, "at least one model"),
    ],
)
def test_class_change_rejects_bad_input(before, after, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        plots.class_change_figure(["a", "b"], before, after)


def test_routing_examples_sorts_outcomes():
    labels = np.array([0, 1, 2, 3, 4, 5, 6])
    gen = np.array([9, 1, 2, 9, 4, 9, 9])
    final = np.array([0, 9, 2, 9, 4, 5, 9])
    mask = np.array([True, True, True, True, False, True, True])
    found = plots.routing_examples(labels, gen, final, per_kind=2, mask=mask)
    expected = {
        "corrected by the specialist": [0, 5],
        "made wrong by the specialist": [1],
        "right either way": [2],
        "wrong either way": [3, 6],
    }  # 4 is padding
    assert {k: v.tolist() for k, v in found.items()} == expected
    with pytest.raises(ValueError, match="differ in shape"):
        plots.routing_examples(labels, gen[:3], final)


def test_routing_figure_titles_each_example():
    images = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8, 1)
    names = ["cat", "dog", "cow"]
    fig = plots.routing_figure(
        images, np.array([0, 1, 2, 0]), np.array([1, 1, 2, 0]), np.array([0, 1, 1, 0]), names, per_kind=2
    )
    kinds = [sub.get_suptitle() for sub in fig.subfigs]
    assert kinds == ["corrected by the specialist", "made wrong by the specialist", "right either way"]
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles[0] == "true: cat\ngeneralist: dog\nrouted: cat"
    assert len(titles) == 4  # one corrected, one made wrong, two right either way
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), images[0, :, :, 0])


def test_boxes_figure_draws_boxes_in_pixel_frame():
    images = [np.zeros((20, 30, 1), np.uint8), np.zeros((10, 10, 3), np.uint8), np.zeros((5, 5, 1), np.uint8)]
    boxes = [np.array([[1.0, 2.0, 11.0, 7.0], [0.0, 0.0, 30.0, 20.0]]), np.zeros((0, 4)), np.array([[1, 1, 2, 2]])]
    labels = [np.array([2, 0]), np.array([], int), np.array([1])]
    fig = plots.boxes_figure(images, boxes, labels, ["a", "b", "c"], scores=[[0.9, 0.5], [], [0.25]], cols=2)
    first = fig.axes[0]
    rects = [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in first.patches]
    assert rects == [(1.0, 2.0, 10.0, 5.0), (0.0, 0.0, 30.0, 20.0)]
    assert [t.get_text() for t in first.texts] == ["c 0.90", "a 0.50"]
    assert first.images[0].get_extent() == [0, 30, 20, 0]  # pixel (r, c) covers [c, c+1) x [r, r+1)
    assert not fig.axes[1].patches and not fig.axes[3].images  # no boxes; the 4th panel is empty
    with pytest.raises(ValueError, match="3 images, 2 box sets and 3 label sets"):
        plots.boxes_figure(images, boxes[:2], labels, ["a", "b", "c"])


def test_per_image_groups_filters_and_sorts_detections():
    found = {
        "image_id": np.array([3, 0, 3, 3, 1]),
        "boxes": np.arange(20.0).reshape(5, 4),
        "labels": np.array([7, 1, 8, 9, 2]),
        "scores": np.array([0.5, 0.9, 0.05, 0.8, 0.3]),
    }
    boxes, labels, scores = plots.per_image(found, [3, 2, 0], min_score=0.1, top=5)
    assert [s.tolist() for s in scores] == [[0.8, 0.5], [], [0.9]]  # image 3's 0.05 is below min_score
    assert [lab.tolist() for lab in labels] == [[9, 7], [], [1]]
    np.testing.assert_array_equal(boxes[0], found["boxes"][[3, 0]])
    assert boxes[1].shape == (0, 4)
    assert [s.tolist() for s in plots.per_image(found, [3], top=1)[2]] == [[0.8]]
    with pytest.raises(ValueError, match="5 image ids, 5 scores, 5 boxes and 4 labels"):
        plots.per_image({**found, "labels": found["labels"][:4]}, [0])


def test_truth_and_detections_pairs_each_scene_with_its_detections_named_globally():
    records = [
        {"image": np.zeros((8, 8, 1), np.uint8), "boxes": np.array([[0.0, 0, 4, 4]]), "labels": np.array([5])},
        {"image": np.zeros((6, 9, 1), np.uint8), "boxes": np.zeros((0, 4)), "labels": np.zeros(0, int)},
    ]
    found = {  # labels are output positions of a model whose outputs are global classes (5, 2)
        "image_id": np.array([1, 0, 0, 7]),
        "boxes": np.array([[1.0, 1, 3, 3], [0, 0, 4, 4], [2, 2, 6, 6], [0, 0, 1, 1]]),
        "labels": np.array([1, 0, 1, 0]),
        "scores": np.array([0.9, 0.8, 0.1, 0.99]),
    }
    names = ["a", "b", "c", "d", "e", "f"]
    fig = plots.truth_and_detections_figure(records, found, (5, 2), names, min_score=0.25, pairs_per_row=1)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "scene 0: ground truth",
        "scene 0: 1 detections ≥ 0.25",
        "scene 1: ground truth",
        "scene 1: 1 detections ≥ 0.25",
    ]
    texts = [[t.get_text() for t in ax.texts] for ax in fig.axes]
    assert texts == [["f"], ["f 0.80"], [], ["c 0.90"]]  # image 7 is not drawn; 0.1 is below min_score
