"""The benchmarks: train and eval steps (beside torchvision), input pipeline, vmapped specialists, routing, export."""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
import tempfile

import jax
import numpy as np

from jaxspec import route, sharding, specialize
from jaxspec.bench.core import (
    MEAN,
    STD,
    Settings,
    _batch,
    _compile,
    _model,
    _model_settings,
    _rounds,
    _row,
    _setting,
    _timed,
    _timing,
    _train_step,
    register,
)
from jaxspec.bench.pipeline_side import Side, data_config
from jaxspec.data import embedded, embedded_files, pipeline, synthetic_tfds
from jaxspec.data.constrain import ConstrainedSource
from jaxspec.data.datasets import get_info
from jaxspec.data.sources import ArraySource, DatasetInfo
from jaxspec.train import steps
from jaxspec.train.state import stack


def _torch_ref(s: Settings, mode: str, res: int, batch: int, classes: int, width: float):
    """`n -> seconds` of torchvision in the same setting (full width only), or None."""
    if s.torch is None or width != 1.0:
        return None
    key = f"{res}/{batch}/{classes}"
    s.torch.setup(
        key,
        res,
        batch,
        classes,
        device="cuda" if jax.default_backend() == "gpu" else "cpu",
        amp=None if s.dtype == "float32" else s.dtype,
    )
    return lambda n: s.torch.seconds(key, mode, n)


def _train_row(s: Settings, mesh, res: int, batch: int, classes: int, width: float) -> dict:
    _, state, step = _train_step(_model(s, classes, width), mesh)
    data = sharding.put_batch(_batch(res, batch, classes), mesh)
    compiled, compile_s, temp = _compile(steps.jit_train_step(step, mesh), state, data)
    holder = [state]

    def one():
        holder[0], metrics = compiled(holder[0], data)
        return metrics

    timing = _rounds(s, _timed(one), _torch_ref(s, "train", res, batch, classes, width))
    return _row(
        "train",
        _setting(s, f"{res}px, batch {batch}, {classes} classes", width),
        batch,
        timing,
        compile_seconds=compile_s,
        xla_temp_mib=None if temp is None else temp / 2**20,
    )


def _eval_row(s: Settings, mesh, res: int, batch: int, classes: int, width: float) -> dict:
    modeldef, state, _ = _train_step(_model(s, classes, width), mesh)
    step = steps.make_eval_step(modeldef, mean=MEAN, std=STD, num_classes=classes)
    data = sharding.put_batch(_batch(res, batch, classes, mask=True), mesh)
    compiled, compile_s, temp = _compile(steps.jit_eval_step(step, mesh), state, data)
    timing = _rounds(s, _timed(lambda: compiled(state, data)), _torch_ref(s, "eval", res, batch, classes, width))
    return _row(
        "eval",
        _setting(s, f"{res}px, batch {batch}, {classes} classes", width),
        batch,
        timing,
        compile_seconds=compile_s,
        xla_temp_mib=None if temp is None else temp / 2**20,
    )


@register("train")
def bench_train(s: Settings) -> list[dict]:
    """Full train step: forward, backward, Adam; train-mode BatchNorm, dropout, label smoothing."""
    mesh = sharding.make_mesh()
    return [_train_row(s, mesh, *setting) for setting in _model_settings(s)]


@register("eval")
def bench_eval(s: Settings) -> list[dict]:
    """Eval step: BatchNorm running averages, top-1/top-2 and per-class counts."""
    mesh = sharding.make_mesh()
    return [_eval_row(s, mesh, *setting) for setting in _model_settings(s)]


def embedded_cached() -> bool:
    """Whether the embedded data are cached: benchmarks read them then, and never fetch them."""
    return os.path.exists(os.path.join(embedded_files.default_data_dir(), f"embedded-{embedded.cache_key({})}.npz"))


def _small_source(quick: bool):
    """The embedded training split if it is already cached (never fetched here), else a synthetic stand-in."""
    if embedded_cached() and not quick:
        images, labels = embedded.load("train")
        return ArraySource(images, labels, get_info("embedded")), "embedded train split"
    rng = np.random.default_rng(0)
    n = 600 if quick else 21_000
    info = DatasetInfo("synthetic", tuple(f"c{i}" for i in range(30)), {}, (0.5,), (0.25,))
    return ArraySource(
        rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 30, info
    ), "synthetic 28x28 (embedded data not cached)"


def _train_rate(s: Settings, res: int) -> float | None:
    return next(
        (r["jaxspec"] for r in s.results if r["benchmark"] == "train" and r["setting"].startswith(f"{res}px")), None
    )


@register("pipeline")
def bench_pipeline(s: Settings) -> list[dict]:
    """grain input pipeline images/s with domain constraining (S = 10 of 30 classes), against the train step."""
    small, what = _small_source(s.quick)
    rng = np.random.default_rng(0)
    n_big = 64 if s.quick else 512
    big_info = DatasetInfo("synthetic-rgb", tuple(f"c{i}" for i in range(30)), {}, MEAN, STD)
    big = ArraySource(rng.integers(0, 256, (n_big, 256, 320, 3), dtype=np.uint8), np.arange(n_big) % 30, big_info)
    res_small, res_big = (r for r, *_ in _model_settings(s))
    cases = [
        (small, what, data_config(image_size=res_small), 16 if s.quick else 256, res_small),
        (
            big,
            "synthetic 256x320 RGB, RandomResizedCrop + flip + RandAugment(2, 9) + erasing 0.2",
            data_config(transform="imagenet", image_size=res_big, randaugment_ops=2, erasing_prob=0.2),
            8 if s.quick else 32,
            res_big,
        ),
    ]
    return [_pipeline_row(s, *case) for case in cases] + _jpeg_rows(s)


def _jpeg_rows(s: Settings) -> list[dict]:
    """The ImageNet recipe from 500x375 JPEGs in ArrayRecord (`synthetic_tfds`) to 224 px batches: jaxspec in
    1 and 2 worker processes beside tf_ref's tf.data pipeline on as many cores, each side a process pinned to
    its cores (`pipeline_side`), all sides' rounds alternated; and 2 workers ÷ 1 (scaling)."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    counts = range(1, len(cores) + 1)
    with tempfile.TemporaryDirectory() as data_dir:
        with contextlib.redirect_stdout(sys.stderr):  # tfds reports its progress on stdout, which carries the JSON
            synthetic_tfds.build_imagenet(data_dir, {"train": s.jpeg_images}, long_side=(500, 500), aspect=(0.75, 0.75))
        sides = {
            (kind, n): Side(f"{kind}-{n}", cores[:n], data_dir, s.jpeg_batch)
            for n in counts
            for kind in ("jaxspec", "tfdata")
        }
        rounds = {key: [] for key in sides}
        for _ in range(s.repeats):
            for (kind, n), side in sides.items():  # warm-up: past worker start-up and the batches made ahead
                rounds[kind, n].append(side.seconds(max(s.warmup, 2 * n), s.jpeg_steps) / s.jpeg_steps)
        for side in sides.values():
            side.close()
    recipe = (
        f"{s.jpeg_batch} x 500x375 JPEG (ArrayRecord) -> 224 px, RandomResizedCrop + flip + "
        "RandAugment(2, 9) + erasing 0.2"
    )
    rows = []
    for n in counts:
        timing = _timing(rounds["jaxspec", n], rounds["tfdata", n])
        rows.append(
            _row(
                "pipeline",
                f"{recipe}, {n} core(s): {n} worker(s) vs tf.data",
                s.jpeg_batch,
                timing,
                reference="tf.data",
                target=1.0,
                cores=n,
                img_s_per_core=s.jpeg_batch / timing["seconds"] / n,
            )
        )
    if len(cores) == 2:
        timing = _timing(rounds["jaxspec", 2], rounds["jaxspec", 1])
        rows.append(
            _row(
                "pipeline",
                f"{recipe}: 2 workers on 2 cores vs 1 on 1",
                s.jpeg_batch,
                timing,
                reference="1 worker",
                target=1.8,
                cores=2,
            )
        )
    return rows


def _pipeline_row(s: Settings, source, desc: str, cfg, batch: int, res: int) -> dict:
    it = pipeline.train_iterator(ConstrainedSource(source, list(range(10))), cfg, batch_size=batch, seed=0)
    timing = _rounds(s, _timed(lambda: next(it)), None)
    train = _train_rate(s, res)
    return _row(
        "pipeline",
        f"{res}px, batch {batch}: {desc}",
        batch,
        timing,
        ratio=None if train is None else batch / timing["seconds"] / train,
        train_step_img_s=train,
        threads=cfg.num_threads,
        host_cores=os.cpu_count(),
    )


@register("multi")
def bench_multi(s: Settings) -> list[dict]:
    """K specialists (extracted from one generalist) in one vmapped step vs K sequential single steps."""
    res, batch, _, width = _model_settings(s)[0]
    k = s.specialists
    batch = min(batch, 128)  # the default specialist phase's batch
    generalist = _model(s, 10 * k, width)
    mesh = sharding.make_mesh()
    singles = []
    for i in range(k):
        model = specialize.extract(generalist, list(range(10 * i, 10 * i + 10)))
        singles.append(_train_step(model, mesh, seed=i))
    data = sharding.put_batch(_batch(res, batch, 10), mesh)
    single, single_s, _ = _compile(steps.jit_train_step(singles[0][2], mesh), singles[0][1], data)
    smesh = sharding.spec_mesh(k)
    stacked = jax.device_put(stack([st for _, st, _ in singles]), sharding.stacked_sharding(smesh))
    mdata = sharding.put_batches([_batch(res, batch, 10, seed=i) for i in range(k)], smesh)
    vmapped, multi_s, temp = _compile(steps.jit_stacked_train_step(singles[0][2], smesh), stacked, mdata)
    states = [[st] for _, st, _ in singles]
    holder = [stacked]

    def sequential():
        out = None
        for h in states:
            h[0], out = single(h[0], data)
        return out

    def together():
        holder[0], metrics = vmapped(holder[0], mdata)
        return metrics

    timing = _rounds(s, _timed(together), _timed(sequential))  # ref: K sequential single steps
    setting = _setting(s, f"K={k} specialists, {res}px, batch {batch} each", width)
    return [
        _row(
            "multi",
            setting,
            k * batch,
            timing,
            reference="sequential",
            ratio=1 / timing["ratio"],
            speedup_vs_sequential=timing["ratio"],
            compile_seconds=multi_s,
            single_compile_seconds=single_s,
            xla_temp_mib=None if temp is None else temp / 2**20,
        )
    ]


@register("routed")
def bench_routed(s: Settings) -> list[dict]:
    """The routed system (generalist, then its group's specialist, `jaxspec.route`) vs the generalist alone,
    at both resolutions: at 32px a specialist chunk's fixed per-pass cost on CPU shows, at 224px arithmetic rules."""
    return [_routed_row(s, res, batch, width) for res, batch, _, width in _model_settings(s)]


def _routed_row(s: Settings, res: int, batch: int, width: float) -> dict:
    k = s.specialists
    generalist = _model(s, 10 * k, width)
    groups = [list(range(10 * i, 10 * i + 10)) for i in range(k)]
    system = route.build_routed(
        generalist,
        [specialize.extract(generalist, g) for g in groups],
        groups,
        mean=MEAN,
        std=STD,
        mesh=sharding.make_mesh(),
    )
    images = _batch(res, batch, 10 * k)["image"]
    t = route.throughput(system, images, repeats=max(3, s.repeats * s.steps))
    timing = {
        "seconds": batch / t["routed_images_per_s"],
        "rounds": [batch / t["routed_images_per_s"]],
        "ref_seconds": batch / t["generalist_images_per_s"],
        "ref_rounds": [batch / t["generalist_images_per_s"]],
    }
    setting = _setting(s, f"K={k} specialists, {res}px, batch {batch}", width)
    return _row(
        "routed",
        setting,
        batch,
        timing,
        reference="generalist",
        ratio=t["cost_vs_generalist"],
        specialist_examples_per_image=t["specialist_examples_per_image"],
        chunk=t["chunk"],
    )


@register("export")
def bench_export(s: Settings) -> list[dict]:
    """An exported generalist vs its extracted 10-class specialist in LiteRT (`jaxspec.export`'s .tflite, batch 1,
    one CPU thread): latency, and the size of each file. Untrained weights: neither depends on their values."""
    return [_export_row(s, res, classes, width) for res, _, classes, width in _model_settings(s)]


def _export_row(s: Settings, res: int, classes: int, width: float) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    from jaxspec import export

    generalist = _model(s, classes, width)
    generalist.eval()
    pre = {
        "transform": "imagenet" if res > 64 else "small",
        "image_size": res,
        "channels": 3,
        "model_channels": 3,
        "mean": list(MEAN),
        "std": list(STD),
    }
    image = _batch(res, 1, classes)["image"]
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        files = {
            name: export.export_model(model, pre, out, name)
            for name, model in (("generalist", generalist), ("specialist", specialize.extract(generalist, range(10))))
        }
        sizes = {
            f"{name}_{fmt}_bytes": _size(pathlib.Path(path))
            for name, written in files.items()
            for fmt, path in written.items()
        }
        runners = {
            name: Interpreter(model_path=written["tflite"], num_threads=1).get_signature_runner()
            for name, written in files.items()
        }
        timing = _rounds(
            s,
            _timed(lambda: runners["specialist"](images=image)["logits"]),
            _timed(lambda: runners["generalist"](images=image)["logits"]),
        )
    setting = _setting(s, f"{res}px, {classes} vs 10 classes, LiteRT 1 thread", width)
    return _row(
        "export",
        setting,
        1,
        timing,
        reference="generalist",
        specialist_ms=1000 * timing["seconds"],
        generalist_ms=1000 * timing["ref_seconds"],
        **sizes,
    )


def _size(path: pathlib.Path) -> int:
    """Bytes of a file, or of every file under a directory (a SavedModel)."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
