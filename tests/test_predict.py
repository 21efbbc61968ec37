"""jaxspec.predict: new images go through the recorded preprocessing and the project's own eval, routing and
detection paths; user mistakes are one-line errors."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import animals
from jaxspec import files, models, route, specialize
from jaxspec.cli import UserError
from jaxspec.data import datasets, pipeline
from jaxspec.detection import data as det_data
from jaxspec.detection import scenes
from jaxspec.detection import specialize as det_specialize
from jaxspec.detection import train as det_train
from jaxspec.models import layers
from jaxspec.predict import Classification, Detections, RoutedClassification, format_result, predict
from jaxspec.train import checkpoint
from tests.synthetic_embedded import on_fixture, write_fixture

pytestmark = pytest.mark.xdist_group("predict")  # the tests share `setup`'s models: one worker (tests/conftest.py)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A routed system laid out as WORKDIR/models: a generalist, an extracted `animals` specialist whose head
    was changed (so it overrules the generalist now and then) and a suppressed `clothing` one."""
    tmp = tmp_path_factory.mktemp("predict")
    config = on_fixture(animals.get_config("tiny"), write_fixture(str(tmp / "raw"), per_class=20))
    test = datasets.get_source("embedded", "test", data_dir=config.data.data_dir, manifest=config.data.manifest)
    info = test.info
    generalist = models.mobilenet_v3_small(30, rngs=nnx.Rngs(0), width_multiplier=0.25, num_blocks=4)
    # BatchNorm statistics of real images (momentum 0: one batch sets them), so outputs are far from uniform.
    for _, module in nnx.iter_modules(generalist):
        if isinstance(module, layers.BatchNorm):
            module.momentum = 0.0
    batch = next(pipeline.eval_iterator(test, config.data, batch_size=64))
    generalist(pipeline.normalize(batch["image"], info.mean, info.std))
    generalist.eval()
    animal = specialize.extract(generalist, range(10))
    animal.head.kernel.value = animal.head.kernel[...] + jax.random.normal(jax.random.key(1), animal.head.kernel.shape)
    pre = pipeline.preprocess_record(config.data, info)
    for name, model, classes, extra in (
        ("generalist", generalist, range(30), {}),
        ("animals", animal, range(10), {}),
        ("clothing", generalist, range(30), {"columns": list(range(10, 20))}),
    ):
        checkpoint.export_model(
            tmp / "models" / name,
            model,
            extra,
            preprocess=pre,
            classes=checkpoint.classes_record(classes, info.class_names),
        )
    return {
        "dir": tmp / "models",
        "config": config,
        "test": test,
        "info": info,
        "generalist": generalist,
        "animal": animal,
        "tmp": tmp,
    }


def _images(setup, n):
    return [setup["test"][i]["image"] for i in range(n)]  # 28x28x1 uint8, as the source holds them


def test_a_classifier_predicts_what_its_eval_path_computes(setup):
    batch = next(pipeline.eval_iterator(setup["test"], setup["config"].data, batch_size=16))
    info = setup["info"]
    ref = jax.nn.softmax(setup["animal"](pipeline.normalize(batch["image"], info.mean, info.std)))
    out = predict(setup["dir"] / "animals", _images(setup, 12), top_k=3, batch_size=5)  # batches 8 + 4 padded
    assert isinstance(out, Classification) and out.probabilities.shape == (12, 10)
    # float32 sums in another order (batches of 5 on 8 devices vs 16 eagerly): up to 4e-6 apart measured
    np.testing.assert_allclose(out.probabilities, ref[:12], atol=1e-5)
    assert out.names[:2] == ("bear", "bird") and out.classes == tuple(range(10))
    best = np.argmax(ref[:12], axis=1)
    assert [t[0][0] for t in out.top] == [out.names[j] for j in best] and len(out.top[0]) == 3


def test_files_pil_rgb_and_float_images_are_read_as_the_same_pixels(setup):
    ims = _images(setup, 3)
    want = predict(setup["dir"] / "animals", np.stack(ims)).probabilities  # one NHWC array
    paths = []
    for i, im in enumerate(ims):
        paths.append(str(setup["tmp"] / f"im{i}.png"))
        Image.fromarray(im[..., 0]).save(paths[-1])
    rgb = [np.repeat(im, 3, axis=-1) for im in ims]  # a grayscale model takes RGB as its luma
    for given in (
        paths,
        [Image.open(p) for p in paths],
        rgb,
        [im.astype(np.float32) / 255 for im in ims],
        np.stack(ims)[..., 0],
    ):  # NHW: a grayscale batch
        np.testing.assert_allclose(predict(setup["dir"] / "animals", given).probabilities, want, atol=1e-6)


def test_a_suppressed_model_scores_only_its_competing_outputs(setup):
    out = predict(setup["dir"] / "clothing", _images(setup, 4))
    info = setup["info"]
    x = pipeline.eval_batch(_images(setup, 4), pipeline.preprocess_record(setup["config"].data, info))
    logits = setup["generalist"](pipeline.normalize(x, info.mean, info.std))[:, 10:20]
    np.testing.assert_allclose(out.probabilities, jax.nn.softmax(logits), atol=1e-6)
    assert out.names[0] == "tshirt_top" and out.classes[0] == 10


def test_a_models_directory_is_routed_by_jaxspec_route(setup):
    ims = _images(setup, 16)
    out = predict(setup["dir"], ims, batch_size=16)
    assert isinstance(out, RoutedClassification)
    info = setup["info"]
    system = route.build_routed(
        setup["generalist"],
        [setup["animal"], specialize.extract(setup["generalist"], range(10, 20))],
        [range(10), range(10, 20)],
        mean=info.mean,
        std=info.std,
    )
    ref = system.predict(pipeline.eval_batch(ims, pipeline.preprocess_record(setup["config"].data, info)))
    np.testing.assert_array_equal(out.classes, ref["pred"])
    np.testing.assert_array_equal(out.generalist_classes, ref["generalist_pred"])
    used = np.asarray(ref["used_specialist"])
    assert (out.classes != out.generalist_classes).any()  # the changed animal head overruled the generalist
    groups = np.asarray(ref["group"])
    assert out.specialists == [["animals", "clothing"][g] if u else None for g, u in zip(groups, used)]
    assert out.names == [info.class_names[c] for c in out.classes]
    assert "decided by" in format_result([f"im{i}" for i in range(16)], out)

    only = predict(setup["dir"], ims, specialists=["clothing"])  # animals then fall back to the generalist
    assert set(only.specialists) <= {"clothing", None}


def test_an_older_export_gets_its_records_at_the_next_export_weights_untouched(setup, tmp_path):
    d = tmp_path / "animals"
    shutil.copytree(setup["dir"] / "animals", d)
    spec = json.loads((d / "model.json").read_text())
    records = {k: spec.pop(k) for k in ("preprocess", "classes")}
    (d / "model.json").write_text(json.dumps(spec))
    weights = files.tree_digest(d / "weights")
    checkpoint.export_model(d, setup["animal"], {}, **records)
    assert {k: json.loads((d / "model.json").read_text())[k] for k in records} == records
    assert files.tree_digest(d / "weights") == weights and checkpoint.export_problem(d) == ""


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "does not exist"),
        ("not_a_model", "is not an exported jaxspec model (no model.json) nor a routed system"),
        ("unreadable", "cannot be read as an image"),
        ("no_image", "does not exist"),
        ("older", "has no 'preprocess' record (exported by an older jaxspec)"),
        ("too_big", "larger than image_size=32"),
        ("unknown_specialist", "specialists=['nope']"),
    ],
)
def test_mistakes_are_one_line_errors(setup, case, message):
    d, tmp = setup["dir"], setup["tmp"]
    image = _images(setup, 1)
    kw = {}
    if case == "missing":
        d = tmp / "nope"
    elif case == "not_a_model":
        d = tmp
    elif case == "unreadable":
        (tmp / "bad.png").write_text("not a png")
        image = [str(tmp / "bad.png")]
    elif case == "no_image":
        image = [str(tmp / "nope.png")]
    elif case == "older":  # weights that verify, model.json from before the records
        d = tmp / "older"
        shutil.copytree(setup["dir"] / "animals", d, dirs_exist_ok=True)
        spec = json.loads((d / "model.json").read_text())
        del spec["preprocess"]
        (d / "model.json").write_text(json.dumps(spec))
    elif case == "too_big":
        image = [np.zeros((40, 40), np.uint8)]
    else:
        kw = {"specialists": ["nope"]}
    with pytest.raises(UserError) as e:
        predict(d / "animals" if case in ("unreadable", "no_image", "too_big") else d, image, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_prints_a_top_k_table_and_one_line_errors(setup):
    path = str(setup["tmp"] / "cli.png")
    Image.fromarray(_images(setup, 1)[0][..., 0]).save(path)
    ok = subprocess.run(
        [sys.executable, "-m", "jaxspec.predict", f"--model={setup['dir'] / 'animals'}", path, "--top_k=2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.splitlines()[0] == path and ok.stdout.splitlines()[2].startswith("  2. ")
    bad = subprocess.run(
        [sys.executable, "-m", "jaxspec.predict", f"--model={setup['dir'] / 'animals'}", path + ".missing"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in bad.stderr.splitlines() if line.startswith("jaxspec: error:")]
    assert bad.returncode == 2 and len(lines) == 1 and "does not exist" in lines[0] and "Traceback" not in bad.stderr


def test_detector_boxes_come_back_in_the_images_own_pixels(tmp_path):
    cfg = det_data.default_config(image_size=64)
    info = scenes.scenes_info()
    det = models.get_model("yolov5n", 30, rngs=nnx.Rngs(0))
    checkpoint.export_model(
        tmp_path / "det",
        det,
        {"columns": list(range(10))},
        preprocess=det_data.preprocess_record(cfg, info),
        classes=checkpoint.classes_record(range(30), info.class_names),
    )
    image = np.random.default_rng(0).integers(0, 256, (48, 96, 1), np.uint8)  # wide: letterboxed with 16 px bands
    (found,) = predict(tmp_path / "det", image, conf_thres=0.0)  # untrained: keep every box
    assert isinstance(found, Detections) and len(found.scores) > 0
    assert set(found.classes) <= set(range(10))  # suppression: only the recorded columns are predicted

    # The eval pipeline's letterbox, the detector on it, and the inverse map written out by hand.
    example = det_data.eval_example(
        {"image": image, "boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int32), "valid": True, "index": 0}, cfg
    )
    assert tuple(example["pad"]) == (0, 16)
    det.eval()
    raw = det_train.detect(
        det,
        example["image"][None],
        det_specialize.class_mask(30, range(10)),
        mean=info.mean,
        std=info.std,
        conf_thres=0.0,
        iou_thres=0.45,
        max_det=300,
        max_nms=30000,
        multi_label=False,
    )
    boxes = np.asarray(raw.boxes[0])[np.asarray(raw.valid[0])]
    expected = np.clip((boxes - [0, 16, 0, 16]) / [64 / 96, 32 / 48, 64 / 96, 32 / 48], 0, [96, 48, 96, 48])
    np.testing.assert_allclose(found.boxes, expected, atol=1e-3)
    assert found.names == [info.class_names[c] for c in found.classes]
