"""The benchmark registry, timing, result rows, and the report table."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import resource
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
import optax
from flax import nnx

from jaxspec import models, sharding
from jaxspec.bench.torch_ref import TorchWorker
from jaxspec.train import steps
from jaxspec.train.state import create_state

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (resolution, batch, classes, width): the two settings; tiny ones for --quick.
MODEL_SETTINGS = ((32, 256, 100, 1.0), (224, 32, 1000, 1.0))
QUICK_SETTINGS = ((32, 16, 10, 0.25), (64, 8, 10, 0.25))
# Each benchmark's `ratio` and its target (the issue's): train/eval: jaxspec ÷ torchvision images/s;
# pipeline: pipeline ÷ train-step images/s (its JPEG rows: ÷ tf.data's on as many cores, target 1.0, and
# 2 worker processes ÷ 1, target 1.8); multi: vmapped step time ÷ (K × one specialist's step), at most.
# routed (no target): its time ÷ the generalist's; one generalist + one specialist pass per image would be 2.
TARGETS = {"train": 1.5, "eval": 3.0, "pipeline": 3.0, "multi": 1.1}
AT_MOST = ("multi",)


@dataclasses.dataclass
class Settings:
    quick: bool
    repeats: int
    steps: int
    warmup: int
    specialists: int
    torch: TorchWorker | None
    dtype: str = "float32"  # the models' activation dtype; other than float32, torch runs with AMP in it
    jpeg_images: int = 512  # size of the JPEG dataset the input pipeline is timed on
    jpeg_batch: int = 32
    # Timed batches per round of the JPEG rows: a 5-batch round of 2 workers lasts ~0.25 s, short enough for
    # the workers' hand-offs to show (1.61x scaling measured, 1.85x with 20 batches on the same quiet machine).
    jpeg_steps: int = 20
    results: list[dict] = dataclasses.field(default_factory=list)  # rows so far, for cross-references


BENCHMARKS: dict[str, Callable[[Settings], list[dict]]] = {}


def register(name: str):
    """Adds a benchmark `fn(settings) -> rows` under `name` (run in registration order)."""

    def wrap(fn):
        BENCHMARKS[name] = fn
        return fn

    return wrap


def _rounds(s: Settings, run: Callable[[int], float], ref: Callable[[int], float] | None) -> dict:
    """Alternating timed rounds of `run(n) -> seconds` and `ref`; median seconds per step and of ref ÷ run."""
    run(s.warmup)
    if ref is not None:
        ref(s.warmup)
    ours, theirs = [], []
    for _ in range(s.repeats):
        ours.append(run(s.steps) / s.steps)
        if ref is not None:
            theirs.append(ref(s.steps) / s.steps)
    return _timing(ours, theirs if ref is not None else None)


def _timing(ours: list[float], theirs: list[float] | None = None) -> dict:
    """Median seconds per step of alternated rounds, and the median of the per-round ratios theirs ÷ ours."""
    out = {"seconds": float(np.median(ours)), "rounds": ours}
    if theirs is not None:
        out |= {
            "ref_seconds": float(np.median(theirs)),
            "ref_rounds": theirs,
            "ratio": float(np.median(np.asarray(theirs) / np.asarray(ours))),
        }
    return out


def _timed(fn: Callable[[], object]) -> Callable[[int], float]:
    def run(n: int) -> float:
        t = time.perf_counter()
        out = None
        for _ in range(n):
            out = fn()
        jax.block_until_ready(out)
        return time.perf_counter() - t

    return run


def _row(
    benchmark: str,
    setting: str,
    images: int,
    timing: dict,
    *,
    unit: str = "img/s",
    reference: str = "torchvision",
    ratio: float | None = None,
    target: float | None = None,
    **extra,
) -> dict:
    """One result; `reference` names what `timing`'s ref side measured, `ratio` defaults to ref ÷ ours time,
    `target` to the benchmark's in `TARGETS`."""
    row = {
        "benchmark": benchmark,
        "setting": setting,
        "unit": unit,
        "jaxspec": images / timing["seconds"],
        "seconds_per_step": timing["seconds"],
        "rounds_seconds": timing["rounds"],
    }
    if "ref_seconds" in timing:
        row |= {
            "reference": reference,
            reference: images / timing["ref_seconds"],
            f"{reference}_rounds_seconds": timing["ref_rounds"],
        }
    ratio = timing.get("ratio") if ratio is None else ratio
    target = TARGETS.get(benchmark) if target is None else target
    if ratio is not None:
        row["ratio"] = ratio
        if target is not None:
            row |= {"target": target, "meets_target": ratio <= target if benchmark in AT_MOST else ratio >= target}
    return row | extra


def _batch(res: int, batch: int, classes: int, seed: int = 0, mask: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {
        "image": rng.integers(0, 256, (batch, res, res, 3), dtype=np.uint8),
        "label": rng.integers(0, classes, batch).astype(np.int32),
    }
    return out | {"mask": np.ones(batch, bool)} if mask else out


def _compile(fn, *args) -> tuple[Callable, float, int | None]:
    """AOT-compiles `fn(*args)`: the executable, seconds taken, and XLA's temp bytes per call."""
    t = time.perf_counter()
    compiled = fn.lower(*args).compile()
    seconds = time.perf_counter() - t
    mem = compiled.memory_analysis()
    return compiled, seconds, None if mem is None else int(mem.temp_size_in_bytes)


def _model(s: Settings, classes: int, width: float):
    return models.mobilenet_v3_small(classes, rngs=nnx.Rngs(0), width_multiplier=width, dtype=s.dtype)


def _train_step(model, mesh, seed: int = 0):
    tx = optax.adam(1e-4)
    modeldef, state = create_state(model, tx, seed)
    step = steps.make_train_step(modeldef, tx, optax.constant_schedule(1e-4), mean=MEAN, std=STD, label_smoothing=0.1)
    return modeldef, sharding.replicate(state, mesh), step


def _model_settings(s: Settings):
    return QUICK_SETTINGS if s.quick else MODEL_SETTINGS


def _setting(s: Settings, head: str, width: float) -> str:
    """`head` plus the width and dtype where they are not the defaults."""
    return head + ("" if width == 1.0 else f", width {width}") + ("" if s.dtype == "float32" else f", {s.dtype}")


def _machine() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
    }


def _memory(torch_info: dict | None) -> dict:
    devices = []
    for d in jax.local_devices():
        stats = d.memory_stats()
        if stats:
            devices.append(
                {
                    "device": str(d),
                    "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
                    "bytes_limit": stats.get("bytes_limit"),
                }
            )
    out = {"host_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "devices": devices}
    if torch_info:
        out["torch_worker_peak_rss_mib"] = torch_info["peak_rss_mib"]
    return out


def _fmt(v, digits=0) -> str:
    return "" if v is None else f"{v:,.{digits}f}"


def table(report: dict) -> str:
    """The results as a Markdown table (what the terminal shows)."""
    lines = ["| benchmark | setting | jaxspec | reference | ratio | target |", "|---|---|---:|---:|---:|---|"]
    for r in report["results"]:
        ref = f"{_fmt(r[r['reference']])} ({r['reference']})" if "reference" in r else ""
        target = (
            ""
            if "target" not in r
            else (
                f"{'≤' if r['benchmark'] in AT_MOST else '≥'} {r['target']}: {'met' if r['meets_target'] else 'MISSED'}"
            )
        )
        lines.append(
            f"| {r['benchmark']} | {r['setting']} | {_fmt(r['jaxspec'])} {r['unit']} | {ref} | "
            f"{_fmt(r.get('ratio'), 2)} | {target} |"
        )
    m = report["memory"]
    lines.append(
        f"\npeak host RSS {m['host_peak_rss_mib']:,.0f} MiB"
        + (f", torch worker {m['torch_worker_peak_rss_mib']:,.0f} MiB" if "torch_worker_peak_rss_mib" in m else "")
        + "".join(f"; {d['device']} peak {d['peak_bytes_in_use'] / 2**20:,.0f} MiB" for d in m["devices"])
    )
    lines.append(
        f"load average before/after: {report['load_before']} / {report['load_after']}; "
        "ratio: train/eval = jaxspec ÷ torchvision images/s; pipeline = pipeline ÷ train-step images/s "
        "(JPEG rows: ÷ tf.data on as many cores; 2 workers ÷ 1); "
        "multi = vmapped step time ÷ (K × one specialist's step time); routed = routed time ÷ generalist time"
    )
    if report.get("torch_note"):
        lines.append(f"torch: {report['torch_note']}")
    return "\n".join(lines)


def run(settings: Settings, names: list[str] | None = None) -> dict:
    """Runs the benchmarks `names` (default all) and returns the report dict."""
    names = list(BENCHMARKS) if not names else names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"Unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
    report = {
        "command": " ".join([os.path.basename(sys.executable), "-m", "jaxspec.bench", *sys.argv[1:]]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": _machine(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            f.name: getattr(settings, f.name)
            for f in dataclasses.fields(settings)
            if f.name not in ("torch", "results")
        },
    }  # asdict would deep-copy the torch worker
    for name in names:
        print(f"jaxspec.bench: {name} ...", file=sys.stderr, flush=True)
        settings.results.extend(BENCHMARKS[name](settings))
    torch_info = settings.torch.close() if settings.torch is not None else None
    report |= {
        "results": settings.results,
        "memory": _memory(torch_info),
        "torch": torch_info,
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    return report
