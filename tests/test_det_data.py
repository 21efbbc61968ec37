"""Detection data: box-moving augmentation vs rendered masks, domain constraining, COCO and scene pipelines."""

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxspec.data.subsets import resolve_subset
from jaxspec.detection import augment, data, metrics
from jaxspec.detection.nms import Detections
from tests.synthetic_embedded import write_fixture


def _render(h, w, box):
    """A 1-channel image that is 255 exactly on the pixels the (integer) box covers."""
    image = np.zeros((h, w, 1), np.uint8)
    x1, y1, x2, y2 = (int(v) for v in box)
    image[y1:y2, x1:x2] = 255
    return image


def _mask_box(image):
    rows, cols = np.nonzero(image[..., 0] > 127)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float32)


def _random_box(rng, h, w):
    x1, y1 = rng.integers(0, w - 8), rng.integers(0, h - 8)
    return np.array([x1, y1, rng.integers(x1 + 6, w + 1), rng.integers(y1 + 6, h + 1)], np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_boxes_follow_the_pixels(seed):
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(40, 120, 2))
    box = _random_box(rng, h, w)
    image = _render(h, w, box)
    np.testing.assert_array_equal(_mask_box(image), box)

    flipped, fbox = augment.horizontal_flip(image, box[None])
    np.testing.assert_array_equal(fbox[0], _mask_box(flipped))

    boxed, lbox, scale, pad = augment.letterbox(image, box[None], 64, fill=0)
    assert boxed.shape == (64, 64, 1)
    np.testing.assert_allclose(lbox[0], _mask_box(boxed), atol=1.0)
    np.testing.assert_allclose(augment.unletterbox(lbox, scale, pad, (h, w))[0], box, atol=1e-4)

    kept_any = False
    for _ in range(4):
        out, abox, kept = augment.random_affine(boxed, lbox, rng, degrees=15, translate=0.1, scale=0.4, shear=5, fill=0)
        if not len(kept):  # box_candidates dropped it (mostly pushed off the canvas)
            continue
        kept_any = True
        # A sheared, rotated rectangle reaches its corners' bounding box only at single points, so compare
        # both ways: the clearly covered pixels lie inside the box, the touched pixels reach its edges.
        inner, outer = _mask_box(out), _mask_box((out > 0) * np.uint8(255))
        assert (inner[:2] >= abox[0, :2] - 1).all() and (inner[2:] <= abox[0, 2:] + 1).all(), (inner, abox)
        assert (outer[:2] <= abox[0, :2] + 1).all() and (outer[2:] >= abox[0, 2:] - 1).all(), (outer, abox)
    assert kept_any


def test_mosaic_moves_every_quadrant():
    rng = np.random.default_rng(0)
    for slot in range(4):
        images, boxes = [], []
        for k in range(4):
            h, w = (int(v) for v in rng.integers(30, 90, 2))
            box = _random_box(rng, h, w)
            images.append(_render(h, w, box) if k == slot else np.zeros((h, w, 1), np.uint8))
            boxes.append(box[None])
        canvas, out = augment.mosaic(images, boxes, rng, 64, fill=0)
        assert canvas.shape == (128, 128, 1) and out.shape == (4, 4)
        if (canvas > 127).any():
            np.testing.assert_allclose(out[slot], _mask_box(canvas), atol=1.0)
        else:  # the box fell off the canvas entirely
            assert (out[slot, 2] - out[slot, 0]) * (out[slot, 3] - out[slot, 1]) == 0


def test_box_candidates_and_hsv():
    before = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 100, 100]], np.float32)
    after = np.array([[0, 0, 10, 10], [0, 0, 1.5, 10], [0, 0, 3, 3], [0, 0, 100, 0.9]], np.float32)
    assert augment.box_candidates(before, after).tolist() == [True, False, False, False]
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    gains = np.random.default_rng(3).uniform(-1, 1, 3) * np.array([0.015, 0.7, 0.4]) + 1
    out = augment.augment_hsv(gray, np.random.default_rng(3))
    np.testing.assert_array_equal(out, np.clip(np.arange(256) * gains[2], 0, 255).astype(np.uint8).reshape(16, 16, 1))
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    same = augment.augment_hsv(rgb, np.random.default_rng(0), hgain=0, sgain=0, vgain=0)
    assert np.abs(same.astype(int) - rgb).max() <= 8  # only Pillow's RGB <-> HSV rounding


class ListSource:
    """An in-memory detection source for the tests."""

    def __init__(self, records, info):
        self.records, self.info = records, info

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    @property
    def box_labels(self):
        return [r["labels"] for r in self.records]


def _coco_like_records(n, rng, size=(48, 64)):
    records = []
    for i in range(n):
        k = int(rng.integers(0, 6))
        labels = rng.integers(0, 80, k).astype(np.int32)
        if i % 3 == 0:
            labels[:1] = 16  # a dog, so the animal subset is never empty
        xy = rng.uniform(0, 30, (k, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(4, 20, (k, 2))], 1).astype(np.float32)
        records.append(
            {
                "image": rng.integers(0, 255, (*size, 3), dtype=np.uint8),
                "boxes": boxes,
                "labels": labels,
                "crowd": rng.uniform(size=k) < 0.2,
            }
        )
    return records


@pytest.mark.parametrize("remap", [True, False])
def test_domain_constraining_drops_images_and_boxes(remap):
    source = ListSource(_coco_like_records(30, np.random.default_rng(0)), data.coco_info())
    subset = resolve_subset("animal", source.info)
    assert subset == tuple(range(14, 24))
    constrained = data.ConstrainedDetectionSource(source, subset, remap=remap)
    expected = [i for i, r in enumerate(source.records) if np.isin(r["labels"], subset).any()]
    assert constrained.source_indices.tolist() == expected and 0 < len(expected) < 30
    assert constrained.info.num_classes == (10 if remap else 80)
    for j, i in enumerate(expected):
        rec, orig = constrained[j], source.records[i]
        keep = np.isin(orig["labels"], subset)
        want = orig["labels"][keep] - 14 if remap else orig["labels"][keep]
        np.testing.assert_array_equal(rec["labels"], want)
        np.testing.assert_array_equal(rec["boxes"], orig["boxes"][keep])
        np.testing.assert_array_equal(rec["crowd"], orig["crowd"][keep])
        np.testing.assert_array_equal(constrained.box_labels[j], want)
    with pytest.raises(ValueError, match="subset \\[80\\]"):
        data.ConstrainedDetectionSource(source, [80])

    def gen():
        for r in source.records:
            yield {"objects": {"label": r["labels"].astype(np.int64), "bbox": r["boxes"]}}

    spec = {"objects": {"label": tf.TensorSpec([None], tf.int64), "bbox": tf.TensorSpec([None, 4], tf.float32)}}
    ds = data.constrain_tf(tf.data.Dataset.from_generator(gen, output_signature=spec), subset, 80, remap=remap)
    got = list(ds.as_numpy_iterator())
    assert len(got) == len(expected)
    for ex, j in zip(got, range(len(expected))):
        np.testing.assert_array_equal(ex["objects"]["label"], constrained[j]["labels"])
        np.testing.assert_array_equal(ex["objects"]["bbox"], constrained[j]["boxes"])


def test_to_targets():
    boxes = np.array([[[10, 20, 30, 60], [0, 0, 0, 0]]], np.float32)
    targets = np.asarray(data.to_targets(boxes, np.array([[7, 0]]), np.array([[True, False]]), 80))
    np.testing.assert_allclose(targets, [[[7, 20 / 80, 40 / 80, 20 / 80, 40 / 80], [0, 0, 0, 0, 0]]])


def _tfds_records(n, rng):
    """Records as tfds coco/2017 stores them: bbox normalized (ymin, xmin, ymax, xmax)."""
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(30, 70, 2))
        k = int(rng.integers(0, 5))
        y1, x1 = rng.uniform(0, 0.5, k), rng.uniform(0, 0.5, k)
        bbox = np.stack([y1, x1, y1 + rng.uniform(0.1, 0.5, k), x1 + rng.uniform(0.1, 0.5, k)], 1)
        labels = rng.integers(0, 80, k)
        labels[:1] = 18 if i % 2 else labels[:1]
        out.append(
            {
                "image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                "image/id": i,
                "image/filename": f"{i}",
                "objects": {
                    "bbox": bbox.astype(np.float32),
                    "label": labels,
                    "is_crowd": np.arange(k) == 2,
                    "area": np.ones(k, np.int64),
                    "id": np.arange(k),
                },
            }
        )
    return out


def test_coco_pipeline_under_tfds_mock_data():
    records = _tfds_records(20, np.random.default_rng(0))
    cfg = data.default_config(name="coco/2017", image_size=64, max_boxes=8, num_threads=1, prefetch=2)
    with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: records):
        source = data.get_source(cfg, "train")
        assert len(source) == 20 and source.info.groups["animal"] == tuple(range(14, 24))
        rec, raw = source[3], records[3]
        h, w = raw["image"].shape[:2]
        y1, x1, y2, x2 = raw["objects"]["bbox"].T
        np.testing.assert_allclose(rec["boxes"], np.stack([x1 * w, y1 * h, x2 * w, y2 * h], 1), rtol=1e-6)
        assert [len(b) for b in source.box_labels] == [len(r["objects"]["label"]) for r in records]
        animals = data.ConstrainedDetectionSource(source, resolve_subset("animal", source.info))
        batch = next(data.train_iterator(animals, cfg, batch_size=8, seed=0))
        assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.uint8
        assert batch["boxes"].shape == (8, 8, 4) and batch["labels"].shape == (8, 8) and batch["mask"].shape == (8, 8)
        assert batch["mask"].any() and (batch["labels"][batch["mask"]] < 10).all()
        assert (batch["boxes"][~batch["mask"]] == 0).all()
        batches = list(data.eval_iterator(animals, cfg, batch_size=8))
        assert sum(int(b["valid"].sum()) for b in batches) == len(animals)
        assert batches[0]["crowd"].shape == (8, 8) and batches[0]["scale"].shape == (8, 2)


def _perfect_detections(batch):
    scores = np.linspace(1, 0.5, batch["mask"].size).reshape(batch["mask"].shape)
    return Detections(boxes=batch["boxes"], scores=scores, classes=batch["labels"], valid=batch["mask"])


def test_scene_pipeline_and_evaluator(tmp_path):
    manifest = write_fixture(str(tmp_path / "raw"), per_class=20)
    cfg = data.default_config(
        image_size=96, max_boxes=10, num_threads=1, prefetch=2, data_dir=str(tmp_path / "c"), manifest=manifest
    )
    cfg.scenes.num_scenes = (16, 4, 12)
    train = data.get_source(cfg, "train")
    batch = next(data.train_iterator(train, cfg, batch_size=8, seed=0))
    assert batch["image"].shape == (8, 96, 96, 1) and batch["mask"].any()
    # Perfect detections (the ground truth itself) score mAP 1 after the round trip to original coordinates.
    test = data.get_source(cfg, "test")
    ev = metrics.Evaluator(30)
    for b in data.eval_iterator(test, cfg, batch_size=8):
        ev.add(_perfect_detections(b), b)
    gt = ev.ground_truth()
    assert len(gt["labels"]) == sum(len(test[i]["labels"]) for i in range(len(test)))
    np.testing.assert_allclose(gt["boxes"], np.concatenate([test[i]["boxes"] for i in range(len(test))]), atol=1e-3)
    assert ev.result()["mAP50_95"] == pytest.approx(1.0)


def test_coco_animals_config_builds_the_papers_recipe():
    from flax import nnx

    from configs import coco_animals
    from jaxspec import models
    from jaxspec.detection import train as dtrain

    config = coco_animals.get_config()
    assert config.task == "detect" and config.model.name == "yolov5m" and config.data.image_size == 640
    assert (config.generalist.epochs, config.generalist.batch_size, config.specialize.subset) == (300, 16, "animal")
    assert config.generalist.optim.optimizer == "yolov5_sgd" and config.generalist.optim.lr == 0.01
    model = nnx.eval_shape(lambda: models.get_model(config.model.name, 80, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    assert sum(p.size for p in jax.tree.leaves(params)) == 21_190_557  # YOLOv5m's 21.2M
    _, schedule = dtrain.make_optimizer(config.generalist, params, steps_per_epoch=coco_animals.TRAIN_IMAGES // 16)
    assert 0 < float(schedule(0)) < 1e-3 * config.generalist.optim.lr  # warm-up from 0
    # Its input pipeline runs on real JPEGs in tests/test_jpeg_data.py.
