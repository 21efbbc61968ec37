"""`python -m jaxspec.bench --quick` runs and reports every benchmark; the registry and table work."""

import json
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from jaxspec import bench, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quick_cli(tmp_path, *only: str) -> dict[str, list[dict]]:
    """`python -m jaxspec.bench --quick` (of `only`, or every benchmark): the report's rows by benchmark,
    after the checks every report must pass."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    args = [sys.executable, "-m", "jaxspec.bench", "--quick", f"--out={out}", "--torch_python=/nonexistent"]
    proc = subprocess.run(
        args + ([f"--only={','.join(only)}"] if only else []),
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report
    assert {"command", "date", "machine", "settings", "results", "memory", "load_before", "load_after"} <= set(report)
    assert report["machine"]["cores"] == os.cpu_count() and report["machine"]["backend"] == "cpu"
    by_bench = {}
    for row in report["results"]:
        by_bench.setdefault(row["benchmark"], []).append(row)
        assert row["jaxspec"] > 0 and row["unit"] == "img/s" and len(row["rounds_seconds"]) == 1
    assert sorted(by_bench) == sorted(only or bench.BENCHMARKS)
    assert report["memory"]["host_peak_rss_mib"] > 0
    assert "torch worker '/nonexistent' failed" in report["torch_note"]
    assert "| benchmark | setting |" in proc.stderr
    return by_bench


def test_quick_cli_writes_json_and_the_table(tmp_path):
    """The command's plumbing on two cheap benchmarks; every benchmark runs in the slow test below."""
    by_bench = _quick_cli(tmp_path, "eval", "routed")
    assert len(by_bench["eval"]) == len(by_bench["routed"]) == 2
    for rt in by_bench["routed"]:  # routed vs generalist: ratio is the routed system's cost in generalist passes
        assert rt["reference"] == "generalist" and rt["ratio"] == pytest.approx(rt["generalist"] / rt["jaxspec"])
        assert 1 <= rt["specialist_examples_per_image"] <= 1 + rt["chunk"]


@pytest.mark.slow  # ~170 s on 2 cores (a compile per model and size); the CLI itself is tested above
def test_quick_cli_writes_json_with_every_benchmark(tmp_path):
    by_bench = _quick_cli(tmp_path)
    assert len(by_bench["train"]) == len(by_bench["eval"]) == 2
    assert all(r["xla_temp_mib"] > 0 and r["compile_seconds"] > 0 for r in by_bench["train"])
    # the in-memory pipelines are compared with the train step at its resolution
    detection = [r for r in by_bench["pipeline"] if "detection input pipeline" in r["setting"]]
    in_memory = by_bench["pipeline"][:2]
    jpeg = [r for r in by_bench["pipeline"][2:] if r not in detection]
    for p, t in zip(in_memory, by_bench["train"]):
        assert p["ratio"] == pytest.approx(p["jaxspec"] / t["jaxspec"])
    # the JPEG pipeline with tf.data's on 1 (and 2) cores, and 2 workers against 1
    cores = min(2, len(os.sched_getaffinity(0)))
    assert [(r["reference"], r["cores"], r["target"]) for r in jpeg] == (
        [("tf.data", n, 1.0) for n in range(1, cores + 1)] + [("1 worker", 2, 1.8)] * (cores == 2)
    )
    for r in jpeg:
        assert r["ratio"] == pytest.approx(r["jaxspec"] / r[r["reference"]]) and "224 px" in r["setting"]
    assert jpeg[0]["img_s_per_core"] == pytest.approx(jpeg[0]["jaxspec"])
    (m,) = by_bench["multi"]
    assert m["reference"] == "sequential" and m["ratio"] == pytest.approx(1 / m["speedup_vs_sequential"])
    assert m["meets_target"] == (m["ratio"] <= bench.TARGETS["multi"])
    assert len(by_bench["export"]) == 2
    # the detector's train step and its input pipeline, compared
    (d,), (dp,) = by_bench["detect"], detection
    assert dp["ratio"] == pytest.approx(dp["jaxspec"] / d["jaxspec"]) and dp["train_step_img_s"] == d["jaxspec"]
    for ex in by_bench["export"]:  # LiteRT latency of the exported specialist vs its generalist, and file sizes
        assert ex["reference"] == "generalist" and ex["specialist_ms"] > 0 and ex["generalist_ms"] > 0
        assert ex["specialist_tflite_bytes"] > 0 and ex["generalist_savedmodel_bytes"] > 0


def test_registry_runs_named_benchmarks_and_rejects_unknown(monkeypatch):
    monkeypatch.setitem(
        bench.BENCHMARKS,
        "fake",
        lambda s: [
            bench._row(
                "fake",
                "x",
                10,
                {"seconds": 0.5, "rounds": [0.5], "ref_seconds": 1.0, "ref_rounds": [1.0], "ratio": 2.0},
            )
        ],
    )
    s = bench.Settings(quick=True, repeats=1, steps=1, warmup=0, specialists=2, torch=None)
    report = bench.run(s, ["fake"])
    (row,) = report["results"]
    assert row["jaxspec"] == 20 and row["torchvision"] == 10 and row["ratio"] == 2.0 and "target" not in row
    assert "| fake | x | 20 img/s | 10 (torchvision) | 2.00 |" in bench.table(report)
    with pytest.raises(ValueError, match=r"Unknown benchmarks \['nope'\]"):
        bench.run(s, ["nope"])


@pytest.mark.parametrize(
    "name, ratio, met", [("train", 1.6, True), ("eval", 2.9, False), ("multi", 1.05, True), ("multi", 1.2, False)]
)
def test_targets(name, ratio, met):
    row = bench._row(name, "s", 4, {"seconds": 1.0, "rounds": [1.0]}, ratio=ratio)
    assert row["meets_target"] is met


@pytest.mark.skipif(
    not os.environ.get("JAXSPEC_TORCH_PYTHON"),
    reason="set JAXSPEC_TORCH_PYTHON to an interpreter with torch + torchvision",
)
def test_torch_worker_builds_torchvisions_model():
    worker = bench.TorchWorker(os.environ["JAXSPEC_TORCH_PYTHON"], threads=1)
    params = worker.setup("t", res=32, batch=2, classes=7)
    ours = nnx.eval_shape(lambda: models.mobilenet_v3_small(7, rngs=nnx.Rngs(0)))
    assert params == sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
    assert worker.seconds("t", "train", 1) > 0 and worker.seconds("t", "eval", 1) > 0
    assert worker.setup("amp", res=32, batch=2, classes=7, amp="bfloat16") == params  # autocast, channels-last
    assert worker.seconds("amp", "train", 1) > 0 and worker.seconds("amp", "eval", 1) > 0
    assert worker.close()["threads"] == 1


def test_run_keeps_a_live_torch_worker_out_of_the_report(monkeypatch):
    import threading

    class Worker:  # like TorchWorker: holds a process and pipes, which cannot be copied
        lock = threading.Lock()

        def close(self):
            return {"peak_rss_mib": 1.0}

    monkeypatch.setitem(bench.BENCHMARKS, "fake", lambda s: [])
    s = bench.Settings(quick=True, repeats=1, steps=1, warmup=0, specialists=2, torch=Worker())
    report = bench.run(s, ["fake"])
    assert report["settings"] == {
        "quick": True,
        "repeats": 1,
        "steps": 1,
        "warmup": 0,
        "specialists": 2,
        "dtype": "float32",
        "jpeg_images": 512,
        "jpeg_batch": 32,
        "jpeg_steps": 20,
    }
    assert report["memory"]["torch_worker_peak_rss_mib"] == 1.0


def test_dtype_reaches_the_models_and_the_settings_column():
    from jaxspec.bench import core

    s = bench.Settings(quick=True, repeats=1, steps=1, warmup=0, specialists=2, torch=None, dtype="bfloat16")
    assert nnx.eval_shape(lambda: core._model(s, 5, 0.25)).dtype == jax.numpy.bfloat16
    assert core._setting(s, "32px", 0.25) == "32px, width 0.25, bfloat16"
    assert core._setting(bench.Settings(True, 1, 1, 0, 2, None), "32px", 1.0) == "32px"


def test_tf_reference_does_jaxspecs_transforms():
    """The tf.data side of the JPEG pipeline rows applies jaxspec's transforms: each RandAugment op as
    Pillow's within its rounding (rotation's nearest neighbours: 0.1% of pixels), the resize within 4."""
    import io

    import numpy as np
    import tensorflow as tf
    from PIL import Image

    from jaxspec.bench import tf_ref
    from jaxspec.data import augment, synthetic_tfds

    image = synthetic_tfds.natural_image(np.random.default_rng(0), 300, 280)
    ours = np.asarray(Image.fromarray(image).resize((224, 224), Image.Resampling.BILINEAR))
    theirs = tf_ref._resize(tf.constant(image), 224).numpy()
    assert np.abs(ours.astype(int) - theirs).mean() < 1.5 and np.abs(ours.astype(int) - theirs).max() <= 4
    for op in augment.RAND_AUGMENT_OPS:
        m = augment._magnitude(op, 9, 31, 224, 224)
        want = np.asarray(augment._APPLY[op](Image.fromarray(ours), m)).astype(int)
        got = tf_ref._APPLY[op](tf.constant(ours), tf.constant(m, tf.float32)).numpy()
        assert np.abs(want - got).max() <= 1 or np.mean(want != got) < 0.005, op
    jpeg = io.BytesIO()
    Image.fromarray(image).save(jpeg, "JPEG")
    out = tf_ref.train_transform(224, 2, 9, 0.5)(tf.constant(jpeg.getvalue())).numpy()
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
