"""jaxspec.export: the SavedModel and the LiteRT file compute JAX's logits (1e-4) from uint8 images, and a routed
export carries the tables jaxspec.route routes with."""

import json

import jax
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from flax import nnx

from configs import animals
from jaxspec import models, specialize
from jaxspec.cli import UserError
from jaxspec.data import datasets, embedded, pipeline
from jaxspec.export import export
from jaxspec.models import layers
from jaxspec.predict import predict
from jaxspec.train import checkpoint
from tests.synthetic_embedded import on_fixture, write_fixture


def _models_dir(tmp, config, info, images):
    """WORKDIR/models with a generalist (BatchNorm statistics of `images`) and an extracted animal specialist."""
    generalist = models.mobilenet_v3_small(30, rngs=nnx.Rngs(0), width_multiplier=0.25, num_blocks=4)
    for _, module in nnx.iter_modules(generalist):
        if isinstance(module, layers.BatchNorm):
            module.momentum = 0.0  # one train-mode pass sets the statistics
    generalist(pipeline.normalize(images, info.mean, info.std))
    generalist.eval()
    pre = pipeline.preprocess_record(config.data, info)
    for name, model, classes in (
        ("generalist", generalist, range(30)),
        ("specialist", specialize.extract(generalist, range(10)), range(10)),
    ):
        checkpoint.export_model(
            tmp / "models" / name,
            model,
            {},
            preprocess=pre,
            classes=checkpoint.classes_record(classes, info.class_names),
        )
    return tmp / "models"


def _tflite(path, images):
    runner = Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    return np.concatenate([runner(images=image[None])["logits"] for image in images])


def _check(out, models_dir, name, images, info):
    """Both formats against the model's JAX eval path on `images` (uint8 at the input size)."""
    model, _ = checkpoint.load_model(models_dir / name)
    want = np.asarray(model(pipeline.normalize(images, info.mean, info.std)))
    saved = tf.saved_model.load(str(out / f"{name}.savedmodel")).signatures["serving_default"]
    got = saved(images=tf.constant(images))
    np.testing.assert_allclose(got["logits"].numpy(), want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["probabilities"].numpy(), jax.nn.softmax(want), atol=1e-5, rtol=0)
    np.testing.assert_allclose(_tflite(out / f"{name}.tflite", images), want, atol=1e-4, rtol=0)
    return want


def test_a_routed_export_computes_jax_logits_and_routes_like_jaxspec_route(tmp_path):
    config = on_fixture(animals.get_config("tiny"), write_fixture(str(tmp_path / "raw"), per_class=20))
    test = datasets.get_source("embedded", "test", data_dir=config.data.data_dir, manifest=config.data.manifest)
    batch = next(pipeline.eval_iterator(test, config.data, batch_size=64))["image"]
    models_dir = _models_dir(tmp_path, config, test.info, batch)
    record = export(models_dir, tmp_path / "out")
    images = batch[:16]
    gen = _check(tmp_path / "out", models_dir, "generalist", images, test.info)
    spec = _check(tmp_path / "out", models_dir, "specialist", images, test.info)

    # What a phone does with routed.json: the generalist's class picks a group, its specialist decides.
    saved = json.loads((tmp_path / "out" / "export.json").read_text())
    assert saved == json.loads(json.dumps(record))
    routed = saved["routed"]
    assert routed["specialists"] == ["specialist"] and routed["label_maps"] == [list(range(10))]
    group = np.asarray(routed["class_to_group"])[gen.argmax(1)]
    final = np.where(group >= 0, np.asarray(routed["label_maps"][0])[spec.argmax(1)], gen.argmax(1))
    np.testing.assert_array_equal(final, predict(models_dir, list(images)).classes)
    assert saved["models"]["specialist"]["input"] == {"name": "images", "dtype": "uint8", "shape": [None, 32, 32, 1]}
    assert saved["models"]["specialist"]["names"][0] == "bear"

    with pytest.raises(UserError, match="exists and is not an empty directory"):
        export(models_dir / "specialist", tmp_path / "out")
    with pytest.raises(UserError, match=r"formats=\['onnx'\]: choose from"):
        export(models_dir / "specialist", tmp_path / "other", formats=["onnx"])


def test_native_convolutions_compute_what_the_cpu_forms_do():
    model = models.mobilenet_v3_small(10, rngs=nnx.Rngs(0), width_multiplier=0.25, num_blocks=4)
    model.eval()
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    forward = nnx.jit(lambda m, x: m(x))  # each form compiled whole: eager calls compile every op
    want = forward(model, x)
    native = layers.use_native_convolutions(nnx.merge(*nnx.split(model)))
    impls = {m.impl for _, m in nnx.iter_modules(native) if hasattr(m, "impl")}
    assert impls == {"conv"} and {m.impl for _, m in nnx.iter_modules(model) if hasattr(m, "impl")} != {"conv"}
    np.testing.assert_allclose(forward(native, x), want, atol=1e-5, rtol=0)


@pytest.mark.realdata
def test_exported_files_compute_jax_logits_on_the_real_embedded_images(tmp_path):
    config = animals.get_config("tiny")
    info = datasets.get_info("embedded")
    images = pipeline.eval_batch(
        list(embedded.load("test")[0][::250, ..., None]), pipeline.preprocess_record(config.data, info)
    )  # 24 images, 4 of each part
    models_dir = _models_dir(tmp_path, config, info, images)
    export(models_dir / "specialist", tmp_path / "out", formats=["savedmodel", "tflite"])
    _check(tmp_path / "out", models_dir, "specialist", images, info)
