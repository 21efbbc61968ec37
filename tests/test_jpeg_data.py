"""Real JPEG datasets (`jaxspec.data.synthetic_tfds`): tfds reads them as ImageNet and COCO, the full
ImageNet recipe's pipeline makes the same batches in worker processes as in this one (and resumes
across worker counts), and the ImageNet and COCO configs run end to end on them."""

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import coco_animals, imagenet_animals
from jaxspec import run
from jaxspec.data import datasets, pipeline, sources, synthetic_tfds
from jaxspec.data.constrain import ConstrainedSource
from jaxspec.data.subsets import resolve_subset
from jaxspec.detection import data as det_data
from jaxspec.detection import run as det_run

TRAIN, VALIDATION = 160, 40
CLASSES = tuple(range(0, 1000, 50))  # synthetic_tfds' default: 8 of the 20 are animals (0-397)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    synthetic_tfds.build_imagenet(d, {"train": TRAIN, "validation": VALIDATION})
    synthetic_tfds.build_coco(d, {"train": 32, "validation": 16})
    return d


def test_tfds_reads_them_as_imagenet_and_coco(data_dir):
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    assert builder.info.file_format.value == "array_record"
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": TRAIN, "validation": VALIDATION}
    src = datasets.get_source("imagenet2012", "train", data_dir=data_dir)
    assert src.info.num_classes == 1000 and len(src) == TRAIN
    assert sorted(np.unique(src.labels)) == list(CLASSES) and src.labels.dtype == np.int32
    batch = sources.read_batch(src, [3, 7], encoded=True)
    for jpeg, i in zip(batch["image"], (3, 7)):
        assert jpeg[:2] == b"\xff\xd8"  # the file's bytes, not pixels
        image = src[i]["image"]
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(jpeg))), image)
        assert 300 <= max(image.shape[:2]) <= 500 and image.shape[2] == 3 and image.std() > 20
    np.testing.assert_array_equal(batch["label"], src.labels[[3, 7]])
    coco = det_data.get_source(det_data.default_config(name="coco/2017", data_dir=data_dir), "train")
    rec = coco[0]
    h, w = rec["image"].shape[:2]
    assert len(coco) == 32 and 480 <= max(h, w) <= 640 and len(rec["labels"]) >= 1
    assert (rec["boxes"] >= 0).all() and (rec["boxes"][:, [2, 3]] <= [w, h]).all() and (rec["labels"] < 80).all()


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"]) for x, y in zip(a, b))


def test_the_recipes_pipeline_in_worker_processes_is_the_in_process_one_and_resumes_across_counts(data_dir):
    d = imagenet_animals.get_config().data
    d.update(data_dir=data_dir, num_threads=1, prefetch=1, num_workers=0)
    full = datasets.get_source(d.name, d.train_split, data_dir=data_dir)
    animals = ConstrainedSource(full, resolve_subset("animals", full.info))
    assert len(animals.subset) == 398 and len(animals) == np.isin(full.labels, range(398)).sum() > 8
    here = pipeline.train_iterator(animals, d, batch_size=8, seed=0)
    want = _take(here, 4)
    assert want[0]["image"].shape == (8, 224, 224, 3) and want[0]["image"].dtype == np.uint8
    assert (want[0]["label"] < 398).all()
    d.num_workers = 2
    workers = pipeline.train_iterator(animals, d, batch_size=8, seed=0)
    got = _take(workers, 2)
    state = workers.get_state()
    got += _take(workers, 2)
    workers.close()
    assert state == {"next_index": 2} and _same(got, want)
    d.num_workers = 1  # a checkpoint of 2 workers resumes in 1, and in this process
    resumed = pipeline.train_iterator(animals, d, batch_size=8, seed=0)
    resumed.set_state(state)
    assert _same(_take(resumed, 2), want[2:])
    resumed.close()
    here.set_state(state)
    assert _same(_take(here, 2), want[2:])
    test = datasets.get_source(d.name, d.test_split, data_dir=data_dir)
    evals = []
    for workers in (0, 2):
        d.num_workers = workers
        evals.append(list(pipeline.eval_iterator(test, d, batch_size=16)))
    assert len(evals[0]) == 3 and _same(*evals) and evals[0][0]["image"].shape == (16, 224, 224, 3)


def test_the_coco_recipes_pipeline_in_worker_processes_is_the_in_process_one(data_dir):
    d = coco_animals.get_config().data
    d.update(data_dir=data_dir, num_threads=1, prefetch=1)
    source = det_data.get_source(d, d.train_split)
    subset = resolve_subset("animal", source.info)
    animals = det_data.ConstrainedDetectionSource(source, subset, remap=False)
    runs = []
    for workers in (0, 2):
        d.num_workers = workers
        it = det_data.train_iterator(animals, d, batch_size=8, seed=0)
        runs.append(_take(it, 2))
        it.close()
    batch = runs[0][0]
    assert batch["image"].shape == (8, 640, 640, 3) and batch["boxes"].shape == (8, d.max_boxes, 4)
    assert batch["mask"].any() and np.isin(batch["labels"][batch["mask"]], subset).all()
    for a, b in zip(*runs):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.slow  # the JPEG configs' run end to end is test_coco_config_end_to_end; the main job is tiny_main
def test_imagenet_config_end_to_end(data_dir, tmp_path):
    config = imagenet_animals.get_config("tiny")
    config.data.data_dir = data_dir
    config.sharding.devices = 1  # as tests/synthetic_embedded.on_fixture says why
    results = run.run(config, str(tmp_path))
    stage = results["stages"][0]
    assert stage["extraction_exact"]
    rows = stage["test_on_S"]
    assert list(rows) == ["generalist restricted to S", "extracted specialist, untuned", "specialist (extract), tuned"]
    animal_images = VALIDATION * 8 // 20
    assert all(m["count"] == animal_images for m in rows.values())
    assert (tmp_path / "models" / "specialist" / "model.json").exists()


def test_coco_config_end_to_end(data_dir, tmp_path):
    config = coco_animals.get_config("tiny")
    config.data.data_dir = data_dir
    config.sharding.devices = 1  # as tests/synthetic_embedded.on_fixture says why
    results = det_run.run(config, str(tmp_path))
    rows = results["stages"][0]["test_on_S"]
    assert list(rows) == ["generalist restricted to S", "specialist (suppress), tuned"]
    test = det_data.get_source(config.data, "validation")
    records = [test[i] for i in range(len(test))]  # COCO's scores count the boxes that are not crowds
    animal_boxes = sum(int((np.isin(r["labels"], range(14, 24)) & ~r["crowd"]).sum()) for r in records)
    assert animal_boxes > 0 and all(m["boxes"] == animal_boxes for m in rows.values())
    assert (tmp_path / "models" / "specialist" / "model.json").exists()
    assert "yolov5_sgd, lr 0.01 linearly to 0.0001, momentum 0.937" in (tmp_path / "report.md").read_text()
