"""COCO mAP against pycocotools' COCOeval on random detections and ground truth."""

import contextlib
import io

import numpy as np
import pytest

from jaxspec.detection import metrics

coco = pytest.importorskip("pycocotools.coco")
cocoeval = pytest.importorskip("pycocotools.cocoeval")

NUM_CLASSES = 6
NO_GT_CLASS, NO_DET_CLASS = 4, 3  # class 4 has detections but no ground truth; class 3 the reverse


def _random_problem(seed, num_images=40, crowd=False):
    """GT boxes per image, detections = jittered GT copies + random false positives, random scores."""
    rng = np.random.default_rng(seed)
    gt = {"image_id": [], "boxes": [], "labels": [], "crowd": []}
    dt = {"image_id": [], "boxes": [], "scores": [], "labels": []}
    gt_classes = [c for c in range(NUM_CLASSES) if c != NO_GT_CLASS]
    det_classes = [c for c in range(NUM_CLASSES) if c != NO_DET_CLASS]
    for img in range(num_images):
        n = rng.integers(0, 7)
        xy = rng.uniform(0, 200, (n, 2))
        wh = rng.uniform(5, 80, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        labels = rng.choice(gt_classes, n)
        is_crowd = (rng.uniform(size=n) < 0.15) if crowd else np.zeros(n, bool)
        gt["image_id"] += [img] * n
        gt["boxes"] += list(boxes)
        gt["labels"] += list(labels)
        gt["crowd"] += list(is_crowd)
        if img % 9 == 8:
            continue  # some images get no detections at all
        for box, label in zip(boxes, labels):
            for _ in range(rng.integers(0, 3)):  # 0-2 detections per box: misses and duplicates
                jitter = rng.normal(0, 0.12, 4) * np.tile(box[2:] - box[:2], 2)
                cls = label if (label in det_classes and rng.uniform() < 0.85) else rng.choice(det_classes)
                dt["image_id"].append(img)
                dt["boxes"].append(box + jitter)
                dt["labels"].append(cls)
                dt["scores"].append(rng.uniform())
        m = rng.integers(0, 60 if img == 0 else 8)  # image 0 exceeds maxDets=100 for some class
        xy = rng.uniform(0, 200, (m, 2))
        dt["image_id"] += [img] * m
        dt["boxes"] += list(np.concatenate([xy, xy + rng.uniform(5, 80, (m, 2))], 1))
        dt["labels"] += list(rng.choice(det_classes[:2], m))
        dt["scores"] += list(rng.uniform(size=m))
        if img % 7 == 3:  # an inverted box (x2 < x1): COCOeval ignores it when unmatched
            dt["image_id"].append(img)
            dt["boxes"].append(np.array([50, 50, 40, 70.0]))
            dt["labels"].append(det_classes[0])
            dt["scores"].append(rng.uniform())
    return ({k: np.asarray(v) for k, v in dt.items()}, {k: np.asarray(v) for k, v in gt.items()}, num_images)


def _cocoeval(dt, gt, num_images):
    xywh = lambda b: [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
    dataset = {
        "images": [{"id": i} for i in range(num_images)],
        "categories": [{"id": c} for c in range(NUM_CLASSES)],
        "annotations": [
            {
                "id": j + 1,
                "image_id": int(i),
                "category_id": int(c),
                "bbox": xywh(b),
                "area": xywh(b)[2] * xywh(b)[3],
                "iscrowd": int(cr),
            }
            for j, (i, b, c, cr) in enumerate(zip(gt["image_id"], gt["boxes"], gt["labels"], gt["crowd"]))
        ],
    }
    results = [
        {"image_id": int(i), "category_id": int(c), "bbox": xywh(b), "score": float(s)}
        for i, b, c, s in zip(dt["image_id"], dt["boxes"], dt["labels"], dt["scores"])
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = coco.COCO()
        ground_truth.dataset = dataset
        ground_truth.createIndex()
        ev = cocoeval.COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.mark.parametrize("seed, crowd", [(0, False), (1, False), (2, True), (3, True)])
def test_matches_cocoeval(seed, crowd):
    dt, gt, num_images = _random_problem(seed, crowd=crowd)
    ours = metrics.coco_map(dt, gt, NUM_CLASSES)
    ev = _cocoeval(dt, gt, num_images)
    assert ours["mAP50_95"] == pytest.approx(ev.stats[0], abs=1e-3)
    assert ours["mAP50"] == pytest.approx(ev.stats[1], abs=1e-3)
    assert 0.05 < ours["mAP50"] < 0.95  # a non-trivial problem
    # Per class: COCOeval's precision [T, R, K, area, maxDets] at area 'all', maxDets 100.
    theirs = ev.eval["precision"][:, :, :, 0, -1]
    np.testing.assert_allclose(ours["precision"], theirs, atol=1e-9)
    per_class = np.where(theirs[0, 0] > -1, theirs.mean(axis=(0, 1)), -1)
    np.testing.assert_allclose(ours["AP50_95_per_class"], per_class, atol=1e-9)
    # COCOeval's -1 cases: no ground truth -> -1 even with detections; ground truth but no detections -> 0.
    assert ours["AP50_per_class"][NO_GT_CLASS] == -1 and (theirs[:, :, NO_GT_CLASS] == -1).all()
    assert ours["AP50_per_class"][NO_DET_CLASS] == 0 and (theirs[:, :, NO_DET_CLASS] == 0).all()
    assert ours["fitness"] == pytest.approx(0.1 * ev.stats[1] + 0.9 * ev.stats[0], abs=1e-3)


def test_perfect_and_bad_input():
    gt = {
        "image_id": np.array([0, 0, 1]),
        "boxes": np.array([[0, 0, 10, 10], [20, 20, 40, 50], [5, 5, 9, 9.0]]),
        "labels": np.array([0, 1, 0]),
    }
    dt = {**gt, "scores": np.array([0.9, 0.8, 0.7])}
    out = metrics.coco_map(dt, gt, 3)
    assert out["mAP50"] == out["mAP50_95"] == pytest.approx(1.0) == out["fitness"]
    np.testing.assert_allclose(out["AP50_per_class"], [1.0, 1.0, -1.0])
    with pytest.raises(ValueError, match="label 3 outside 0..2"):
        metrics.coco_map({**dt, "labels": np.array([0, 3, 0])}, gt, 3)
    with pytest.raises(ValueError, match=r"ground_truth box \[5.0, 5.0, 4.0, 9.0\] \(row 2\)"):
        metrics.coco_map(dt, {**gt, "boxes": np.array([[0, 0, 10, 10], [20, 20, 40, 50], [5, 5, 4, 9.0]])}, 3)
    with pytest.raises(ValueError, match=r"detections lacks \['scores'\]"):
        metrics.coco_map(gt, gt, 3)


def _resampled(arrays: dict, copies: np.ndarray) -> dict:
    """The rows of `arrays` of image copies[j], for every j, as image j."""
    parts = [{**{k: v[arrays["image_id"] == i] for k, v in arrays.items()}} for i in copies]
    for j, part in enumerate(parts):
        part["image_id"] = np.full(len(part["image_id"]), j)
    return {k: np.concatenate([p[k] for p in parts]) for k in arrays}


def test_a_bootstrap_resample_scores_as_cocoeval_on_the_resampled_images():
    """`accumulate` with image weights == COCOeval on the resample written out (each copy a new image),
    so the bootstrap needs one matching per model, not one per resample."""
    dt, gt, num_images = _random_problem(4, crowd=True)
    matches = metrics.match(dt, gt, NUM_CLASSES, image_ids=range(num_images))
    assert metrics.accumulate(matches)["mAP50_95"] == metrics.coco_map(dt, gt, NUM_CLASSES)["mAP50_95"]
    weights = metrics.resample_weights(num_images, 3, seed=7)
    assert (weights.sum(axis=1) == num_images).all() and (weights == 0).any() and (weights > 1).any()
    boot = metrics.bootstrap_scores(matches, weights)
    for r, w in enumerate(weights):
        copies = np.repeat(np.arange(num_images), w)
        ev = _cocoeval(_resampled(dt, copies), _resampled(gt, copies), len(copies))
        ours = metrics.accumulate(matches, w)
        np.testing.assert_allclose(ours["precision"], ev.eval["precision"][:, :, :, 0, -1], atol=1e-9)
        assert boot["mAP50_95"][r] == pytest.approx(ours["mAP50_95"], abs=1e-12)
        assert ours["mAP50_95"] == pytest.approx(ev.stats[0], abs=1e-9)
        assert boot["mAP50"][r] == pytest.approx(ev.stats[1], abs=1e-9)
    # the same arguments, the same resamples: every model on these images is resampled alike
    np.testing.assert_array_equal(weights, metrics.resample_weights(num_images, 3, seed=7))
    with pytest.raises(ValueError, match="image 39 has boxes or detections but is not in image_ids"):
        metrics.match(dt, gt, NUM_CLASSES, image_ids=range(num_images - 1))


def test_many_resamples_at_once_score_as_each_resample_alone():
    """`bootstrap_scores` batches resamples (in chunks) through the same precision interpolation as
    `accumulate`, whose weighted scores the test above holds to pycocotools; a resample may also drop a class."""
    dt, gt, num_images = _random_problem(5, crowd=True)
    matches = metrics.match(dt, gt, NUM_CLASSES, image_ids=range(num_images))
    weights = metrics.resample_weights(num_images, 40, seed=3)
    weights[0] = 0
    weights[0, 0] = num_images  # one image only: most classes have no ground truth in this resample
    boot = metrics.bootstrap_scores(matches, weights, chunk=500)
    whole = metrics.bootstrap_scores(matches, weights)
    for k in boot:
        np.testing.assert_allclose(boot[k], whole[k], atol=1e-12)
    for r, w in enumerate(weights):
        ours = metrics.accumulate(matches, w)
        assert [boot[k][r] for k in ("mAP50", "mAP50_95", "fitness")] == pytest.approx(
            [ours[k] for k in ("mAP50", "mAP50_95", "fitness")], abs=1e-12
        )
    with pytest.raises(ValueError, match="image weights must be whole counts >= 0 for each of the"):
        metrics.accumulate(matches, np.full(num_images, 0.5))
