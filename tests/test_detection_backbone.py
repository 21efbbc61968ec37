"""A detector's backbone pre-trained as a classifier (`config.backbone`, `jaxspec.detection.backbone`)."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import detect_animals
from jaxspec import methods, validate
from jaxspec.detection import backbone, run
from jaxspec.models.yolov5 import BACKBONE, YOLOv5Classifier, transplant_backbone, yolov5
from jaxspec.train import workdir
from tests.synthetic_embedded import on_fixture

pytestmark = pytest.mark.xdist_group("detect_run")


def test_the_classifier_is_the_detectors_backbone_and_transplants_into_it():
    classifier = YOLOv5Classifier("n", 30, rngs=nnx.Rngs(1))
    detector = yolov5("n", 30, rngs=nnx.Rngs(2))
    cls_layers = nnx.state(classifier.layers)
    det_layers = nnx.state(detector.layers)
    backbone_paths = {p for p, _ in jax.tree.leaves_with_path(cls_layers)}
    assert backbone_paths and backbone_paths <= {p for p, _ in jax.tree.leaves_with_path(det_layers)}
    assert classifier(np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 30)
    neck_before = jax.tree.map(np.asarray, nnx.state(detector.layers[BACKBONE]))
    transplant_backbone(detector, classifier)
    for i in range(BACKBONE):
        jax.tree.map(np.testing.assert_array_equal, nnx.state(detector.layers[i]), nnx.state(classifier.layers[i]))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(detector.layers[BACKBONE]), neck_before)
    with pytest.raises(ValueError, match="does not fit"):
        transplant_backbone(yolov5("s", 30, rngs=nnx.Rngs(0)), classifier)


def _config(manifest, epochs):
    config = on_fixture(detect_animals.get_config("tiny"), manifest)
    config.backbone.epochs = epochs
    config.backbone.batch_size = 16
    config.backbone.eval_batch_size = 16
    return config


def test_the_generalist_starts_from_the_pretrained_backbone(embedded_manifest, tmp_path):
    config = _config(embedded_manifest, 0.1)
    validate.check(config)
    ctx = run.open_run(config, str(tmp_path))
    cls = backbone.classification_context(ctx)
    assert cls.info.class_names == ctx.info.class_names and cls.info.mean == ctx.info.mean
    trained = backbone.pretrained(ctx, config.seed)
    steps = round(0.1 * len(cls.train) / 16)
    assert (tmp_path / "checkpoints" / "backbone" / str(steps)).is_dir()
    start = ctx.task.new_model(ctx, ctx.info.num_classes, config.seed)
    fresh = yolov5("n", ctx.info.num_classes, rngs=nnx.Rngs(config.seed))
    for i in range(BACKBONE):
        jax.tree.map(np.testing.assert_array_equal, nnx.state(start.layers[i]), nnx.state(trained.layers[i]))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(start.layers[BACKBONE]), nnx.state(fresh.layers[BACKBONE]))
    assert not np.array_equal(start.layers[0].conv.kernel[...], fresh.layers[0].conv.kernel[...])
    methods.generalist(ctx)  # trains from it
    ctx.writer.close()


def test_an_unused_backbone_section_leaves_old_workdirs_resumable_and_bad_values_fail(embedded_manifest):
    off = _config(embedded_manifest, 0.0).to_dict()
    old = {k: v for k, v in off.items() if k != "backbone"}  # a workdir written before the section existed
    assert workdir.differing(workdir.determinants(old), workdir.determinants(off)) == []
    on = _config(embedded_manifest, 1.0).to_dict()
    assert workdir.differing(workdir.determinants(old), workdir.determinants(on))
    bad = _config(embedded_manifest, 1.0)
    bad.backbone.data.image_size = 48
    with pytest.raises(validate.ConfigError, match="backbone.data.image_size=48"):
        validate.check(bad)
