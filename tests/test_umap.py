"""UMAP of features (shapes, PNGs, determinism), example selection, and the analysis CLI end to end."""

import json
import os
import pathlib
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from flax import nnx

from configs import animals
from jaxspec import models, run, specialize
from jaxspec.analysis import features, umap_plot
from jaxspec.data import datasets, pipeline
from jaxspec.data.sources import ArraySource, DatasetInfo
from jaxspec.train import checkpoint
from tests.synthetic_embedded import on_fixture

NAMES = ("ant", "bee", "cod", "eel", "fox")


def blobs(per_class=15, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(NAMES)), per_class)
    centers = 6.0 * rng.normal(size=(len(NAMES), 8))
    return centers[labels] + rng.normal(size=(len(labels), 8)), labels


def test_embedding_shape_and_determinism_by_seed():
    x, _ = blobs()
    a = umap_plot.embed(x, seed=0)
    assert a.shape == (75, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(umap_plot.embed(x, seed=0), a)
    assert not np.allclose(umap_plot.embed(x, seed=1), a)
    with pytest.raises(ValueError, match=r"shape \(2, 8\)"):
        umap_plot.embed(x[:2], seed=0)


def test_figures_are_written_with_relevant_only_embedding(tmp_path):
    x, labels = blobs()
    relevant = [1, 3]
    emb = umap_plot.umap_figures(
        {"generalist": x, "specialist": x[:, ::-1] * 2}, labels, NAMES, relevant, tmp_path, seed=0
    )
    assert {k: v.shape for k, v in emb["all"].items()} == {"generalist": (75, 2), "specialist": (75, 2)}
    assert {k: v.shape for k, v in emb["relevant"].items()} == {"generalist": (30, 2), "specialist": (30, 2)}
    for name in ("umap.png", "umap_relevant.png"):
        image = matplotlib.image.imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[1] > image.shape[0] > 100  # two panels side by side
    with pytest.raises(ValueError, match=r"Relevant classes \[7\]"):
        umap_plot.umap_figures({"g": x}, labels, NAMES, [1, 7], tmp_path, seed=0)
    with pytest.raises(ValueError, match="None of the 75 examples"):
        umap_plot.umap_figures({"g": x}, np.zeros(75, int), NAMES, [4], tmp_path, seed=0)


def test_example_selection_per_class_and_shuffled():
    info = DatasetInfo("toy", NAMES, {}, (0.5,), (0.5,))
    labels = np.array([0] * 9 + [1] * 2 + [2] * 5 + [4] * 6)
    src = ArraySource(
        np.arange(len(labels), dtype=np.uint8)[:, None, None] * np.ones((1, 2, 2), np.uint8), labels, info
    )
    chosen = features.per_class(src, 4, seed=3)
    assert np.bincount(chosen.labels).tolist() == [4, 2, 4, 0, 4]  # class 1 has only 2
    assert [int(chosen[i]["image"][0, 0, 0]) for i in range(len(chosen))] == [
        int(i) for i in chosen.indices
    ]  # examples come from the positions chosen
    assert (chosen.labels == labels[chosen.indices]).all()
    assert features.per_class(src, 4, seed=3).indices.tolist() == chosen.indices.tolist()
    assert features.per_class(src, 4, seed=4).indices.tolist() != chosen.indices.tolist()
    mixed = features.shuffled(src, 0)
    assert sorted(mixed.indices.tolist()) == list(range(len(labels))) and (np.diff(mixed.labels) < 0).any()
    with pytest.raises(ValueError, match="per_class must be positive, got 0"):
        features.per_class(src, 0, seed=0)
    with pytest.raises(ValueError, match=r"range \[0, 22\]"):
        features.IndexedSource(src, [0, 22])


@pytest.fixture(scope="module")
def manifest(embedded_manifest):
    return embedded_manifest


def tiny_config(manifest):
    config = on_fixture(animals.get_config("tiny"), manifest)
    config.specialize.control = False
    return config


def _cli(*args):
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8"}  # the batch is sharded over 8 fake devices
    return subprocess.run(
        [sys.executable, "-m", "jaxspec.analysis", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )


def _check_outputs(out: pathlib.Path, layers: list[str]) -> dict:
    for name in ("cka_heatmap.png", "cka_same_layer.png", "umap.png", "umap_relevant.png"):
        assert matplotlib.image.imread(out / name).ndim == 3
    record = json.loads((out / "cka.json").read_text())
    assert record["layers_generalist"] == record["layers_specialist"] == layers
    assert np.asarray(record["cka"]).shape == (len(layers), len(layers))
    assert record["subset_names"][:2] == ["bear", "bird"] and record["num_examples"] == 20  # 10 animals x 2
    assert record["umap"]["num_examples"] == 30 * 2
    return record


@pytest.mark.slow  # two subprocesses importing TensorFlow and compiling numba: ~65 s on 2 quiet cores
def test_cli_on_exported_models_extraction_keeps_every_layer(manifest, tmp_path):
    """A run directory laid out as jaxspec.main leaves it, with an untuned extracted specialist:
    every layer before the head is the generalist's, so its same-layer CKA is exactly 1."""
    config = tiny_config(manifest)
    generalist = models.mobilenet_v3_small(30, rngs=nnx.Rngs(0), width_multiplier=0.25)
    spec = {"name": "mobilenet_v3_small", "width_multiplier": 0.25, "dropout_rate": 0.2}
    info = datasets.get_info("embedded")
    for name, model, subset in (
        ("generalist", generalist, range(30)),
        ("specialist", specialize.extract(generalist, range(10)), range(10)),
    ):
        checkpoint.export_model(
            tmp_path / "models" / name,
            model,
            {**spec, "subset": list(subset)},
            preprocess=pipeline.preprocess_record(config.data, info),
            classes=checkpoint.classes_record(subset, info.class_names),
        )
    (tmp_path / "results.json").write_text(json.dumps({"config": config.to_dict()}))

    layers = ["stem", "block3", "block10", "pre_logits", "logits"]
    proc = _cli(f"--workdir={tmp_path}", "--per_class=2", "--batch_size=16", f"--layers={','.join(layers)}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[cka] step 2/2" in proc.stderr and "wrote" in proc.stdout
    record = _check_outputs(tmp_path / "analysis", layers)
    same = record["same_layer"]
    np.testing.assert_allclose([same[n] for n in layers[:-1]], 1.0, rtol=1e-4)
    assert same["logits"] < 0.999  # 10 of the 30 logits: a different representation

    bad = _cli(f"--workdir={tmp_path}", "--layers=stem,block99")
    assert bad.returncode != 0 and "block99" in bad.stderr


@pytest.mark.slow
def test_cli_on_a_tiny_run(manifest, tmp_path):
    config = tiny_config(manifest)
    run.run(config, str(tmp_path))
    proc = _cli(
        f"--workdir={tmp_path}", f"--out={tmp_path / 'a'}", "--per_class=2", "--batch_size=16", "--estimator=full"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    net = models.mobilenet_v3_small(1, rngs=nnx.Rngs(0), num_blocks=config.model.num_blocks)
    record = _check_outputs(tmp_path / "a", list(net.layer_names))
    cka = np.asarray(record["cka"], float)
    assert np.isfinite(cka).all() and (cka > -0.01).all() and (cka < 1.0 + 1e-4).all()
