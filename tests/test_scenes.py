"""Embedded detection scenes: determinism, tight visible boxes, COCO json, class coverage."""

import json

import numpy as np
import pytest

from jaxspec.data import embedded
from jaxspec.detection import scenes
from tests.synthetic_embedded import write_fixture

CFG = scenes.SceneConfig(num_scenes=(120, 10, 10))


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    manifest = write_fixture(str(tmp_path_factory.mktemp("raw")), per_class=20)
    return {"manifest": manifest, "data_dir": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def train(paths):
    return scenes.load("train", CFG, **paths)


def test_deterministic_by_seed_and_cached(paths, train, tmp_path):
    again = scenes.load("train", CFG, directory=str(tmp_path / "again"), **paths)
    for i in (0, 7, len(train) - 1):
        a, b = train[i], again[i]
        for k in ("image", "boxes", "labels"):
            np.testing.assert_array_equal(a[k], b[k])
    images, labels = embedded.load("train", data_dir=paths["data_dir"], manifest=paths["manifest"])
    alone = scenes.compose(images, labels, scenes.scene_rng(CFG, "train", 7), CFG)
    np.testing.assert_array_equal(alone.image, train[7]["image"])  # any scene regenerates on its own
    other = scenes.compose(images, labels, scenes.scene_rng(scenes.SceneConfig(seed=1), "train", 7), CFG)
    assert other.image.shape != alone.image.shape or not np.array_equal(other.image, alone.image)
    assert scenes.cache_key(CFG, paths["manifest"]) != scenes.cache_key(scenes.SceneConfig(seed=1), paths["manifest"])


def test_boxes_tightly_contain_the_visible_pixels():
    """Objects of brightness 100 + label: the visible pixels must show their owner's value."""
    images = np.repeat(np.arange(30, dtype=np.uint8)[:, None, None] + 100, 28 * 28).reshape(30, 28, 28)
    images[:, :3] = 0  # a dark band, so the visible shape is not the whole pasted square
    cfg = scenes.SceneConfig(clutter=1.0)
    seen_occlusion = False
    for i in range(40):
        s = scenes.compose(images, np.arange(30), np.random.default_rng(i), cfg)
        assert 1 <= len(s.labels) <= 8 and s.image.dtype == np.uint8 and s.image.shape[2] == 1
        assert 96 <= s.image.shape[0] <= 160 and 96 <= s.image.shape[1] <= 160
        assert set(np.unique(s.owner)) <= set(range(-1, len(s.labels)))
        for j, (box, label) in enumerate(zip(s.boxes.astype(int), s.labels)):
            rows, cols = np.nonzero(s.owner == j)
            assert (box == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]).all()
            values = s.image[rows, cols, 0]  # the band's edge blends in, but never above the object's value
            assert (values > cfg.threshold).all() and (values <= 100 + label).all()
            assert np.mean(values == 100 + label) > 0.5
            full = (box[2] - box[0]) * (box[3] - box[1])
            seen_occlusion |= len(rows) < full
    assert seen_occlusion


def test_no_overlap_mode():
    images = np.full((3, 28, 28), 200, np.uint8)
    cfg = scenes.SceneConfig(overlap=False, objects=(6, 8))
    for i in range(10):
        b = scenes.compose(images, np.arange(3), np.random.default_rng(i), cfg).boxes
        inter = np.clip(
            np.minimum(b[:, None, 2:], b[None, :, 2:]) - np.maximum(b[:, None, :2], b[None, :, :2]), 0, None
        )
        assert (np.prod(inter, -1)[~np.eye(len(b), dtype=bool)] == 0).all()


def test_coco_json_loads_in_pycocotools_and_every_class_appears(train):
    coco = pytest.importorskip("pycocotools.coco")
    with open(train.coco_json_path) as f:
        ds = json.load(f)
    gt = coco.COCO()
    gt.dataset = ds
    gt.createIndex()
    assert sorted(gt.getImgIds()) == list(range(len(train)))
    cats = gt.loadCats(gt.getCatIds())
    assert [c["name"] for c in cats] == list(embedded.CLASS_NAMES)
    assert {c["supercategory"] for c in cats} == {"animals", "clothing", "digits"}
    for i in (0, 5, 119):
        anns = gt.loadAnns(gt.getAnnIds(imgIds=i))
        rec = train[i]
        assert (gt.imgs[i]["height"], gt.imgs[i]["width"]) == rec["image"].shape[:2]
        xywh = np.array([a["bbox"] for a in anns]).reshape(-1, 4)
        np.testing.assert_allclose(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), rec["boxes"])
        assert [a["category_id"] - 1 for a in anns] == rec["labels"].tolist()
    assert set(np.concatenate(train.box_labels).tolist()) == set(range(30))


def test_cli_writes_every_split(paths, tmp_path):
    scenes.main(
        [
            "--directory",
            str(tmp_path),
            "--num_scenes",
            "3,2,2",
            "--data_dir",
            paths["data_dir"],
            "--manifest",
            paths["manifest"],
            "--no_overlap",
        ]
    )
    for split, n in zip(embedded.SPLITS, (3, 2, 2)):
        assert len(scenes.SceneSource(str(tmp_path / f"{split}.npz"))) == n
        with open(tmp_path / f"{split}.json") as f:
            assert len(json.load(f)["images"]) == n


def test_bad_config_and_split():
    with pytest.raises(ValueError, match="does not fit canvas"):
        scenes.SceneConfig(scale=(16, 120))
    with pytest.raises(ValueError, match=r"objects=\(3, 1\)"):
        scenes.SceneConfig(objects=(3, 1))
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        scenes.load("dev")
