"""Export for deployment: a classifier (or routed system) as a TensorFlow SavedModel and a LiteRT (.tflite) file.

  python -m jaxspec.export --model=WORKDIR/models/specialist --out=/tmp/specialist_export
  python -m jaxspec.export --model=WORKDIR/models --out=/tmp/routed_export     # generalist + specialists

Path: `jax2tf` (native serialization: the model's StableHLO inside the SavedModel) and TensorFlow's
TFLite converter, run by the LiteRT interpreter (`ai-edge-litert`), the path LiteRT documents for JAX.
Both graphs take uint8 images at the model's input size, [batch, image_size, image_size, channels]
(the SavedModel any batch, the .tflite batch 1), and hold the rest of the preprocessing: scaling to
[0, 1], mean/std, grayscale repeated to 3 channels. They return `logits` and `probabilities`. The
geometric step, which depends on each image's size (zero-pad or resize + centre-crop, see
`pipeline.preprocess_record`), is the app's: `export.json` records it with the class of each output.

A suppressed specialist is exported with only the outputs that compete (`route.specialist_of`). A
routed system is exported as one file per model plus `routed.json`, the tables `jaxspec.route` routes
with: a phone runs the generalist, looks its class up in `class_to_group`, and runs only that group's
specialist, whose output j is global class `label_maps[group][j]` (-1: a dustbin, keep the
generalist's class). Detectors are not exported (NMS and box decoding would need a graph of their own).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile

import jax
import numpy as np
from flax import nnx

from jaxspec import files
from jaxspec.cli import UserError
from jaxspec.data import pipeline
from jaxspec.models import layers
from jaxspec.predict import GENERALIST, Member, build_routed, is_routed, load_classifier, routed_members
from jaxspec.train.state import split_model

FORMATS = ("savedmodel", "tflite")


@contextlib.contextmanager
def _gspmd_lowering():
    """TF 2.21's StableHLO reader predates Shardy's dialect, which JAX 0.10 writes into exported modules
    by default; with the GSPMD partitioner the module has none (one device: nothing is partitioned)."""
    previous = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", False)
    try:
        yield
    finally:
        jax.config.update("jax_use_shardy_partitioner", previous)


def _serving_fn(model, preprocess: dict):
    """uint8 NHWC at the input size -> {'logits', 'probabilities'}, preprocessing included, convolutions
    in their plain form (`layers.use_native_convolutions`, on a copy: `model` is left as it is)."""
    modeldef, params, stats = split_model(layers.use_native_convolutions(nnx.merge(*nnx.split(model))))
    mean, std = preprocess["mean"], preprocess["std"]

    def serve(images):
        logits = modeldef.merge(params, stats)(pipeline.normalize(images, mean, std))
        return {"logits": logits, "probabilities": jax.nn.softmax(logits, axis=-1)}

    return serve


def _input_spec(preprocess: dict, batch):
    import tensorflow as tf

    size, channels = preprocess["image_size"], preprocess["channels"]
    return tf.TensorSpec((batch, size, size, channels), tf.uint8, name="images")


def _save(serve, preprocess: dict, batch: int | None, path: pathlib.Path) -> None:
    """`serve` as a SavedModel with one signature, `serving_default(images) -> {logits, probabilities}`, for
    `batch` images (None: any number)."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    converted = jax2tf.convert(
        serve,
        with_gradient=False,
        native_serialization_platforms=("cpu",),
        polymorphic_shapes=None if batch else ["(b, ...)"],
    )
    fn = tf.function(converted, autograph=False, input_signature=[_input_spec(preprocess, batch)])
    # Only the signature: a module attribute holding the function too would store the weights twice.
    tf.saved_model.save(tf.Module(), str(path), signatures=fn.get_concrete_function())


def export_model(model, preprocess: dict, out: pathlib.Path, name: str, formats=FORMATS) -> dict[str, str]:
    """Writes `model` as `out/<name>.savedmodel/` and/or `out/<name>.tflite`; returns {format: path}."""
    import tensorflow as tf

    serve = _serving_fn(model, preprocess)
    written = {}
    with _gspmd_lowering():
        if "savedmodel" in formats:
            path = out / f"{name}.savedmodel"
            _save(serve, preprocess, None, path)
            written["savedmodel"] = str(path)
        if "tflite" in formats:
            # Batch 1, static: TF 2.21's converter cannot take the shape-polymorphic module. Converted from a
            # SavedModel so the file keeps the signature's names (input `images`, outputs `logits`, `probabilities`).
            with tempfile.TemporaryDirectory() as tmp:
                _save(serve, preprocess, 1, pathlib.Path(tmp))
                tflite = tf.lite.TFLiteConverter.from_saved_model(tmp).convert()
            path = out / f"{name}.tflite"
            path.write_bytes(tflite)
            written["tflite"] = str(path)
    return written


def _model_record(member: Member, written: dict) -> dict:
    pre = member.spec["preprocess"]
    return {
        "files": {k: os.path.basename(v) for k, v in written.items()},
        "preprocess": pre,
        "input": {
            "name": "images",
            "dtype": "uint8",
            "shape": [None, pre["image_size"], pre["image_size"], pre["channels"]],
        },
        "outputs": ["logits", "probabilities"],
        "classes": [int(c) for c in member.classes],
        "names": member.names,
    }


def export(model_dir: str | os.PathLike, out: str | os.PathLike, formats=FORMATS, specialists=None) -> dict:
    """Exports the model or routed system in `model_dir` into `out` (created; must be empty if it
    exists) and returns what `out/export.json` records."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"formats={list(formats)}: choose from {list(FORMATS)}")
    src, out = pathlib.Path(model_dir).absolute(), pathlib.Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out={out} exists and is not an empty directory")
    routed = is_routed(src)
    members = routed_members(src, specialists) if routed else {src.name: load_classifier(src)}
    record = {}
    if routed:
        tables = build_routed(src, members).tables  # the tables `jaxspec.route` routes with
        record["routed"] = {
            "generalist": GENERALIST,
            "specialists": [n for n in members if n != GENERALIST],
            "label_maps": np.asarray(tables["label_maps"]).tolist(),
            "class_to_group": np.asarray(tables["class_to_group"]).tolist(),
            "class_names": members[GENERALIST].names,
        }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        record["models"] = {
            name: _model_record(m, export_model(m.model, m.spec["preprocess"], tmp, name, formats))
            for name, m in members.items()
        }
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files.write_json(tmp / "export.json", record, indent=1)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return record
