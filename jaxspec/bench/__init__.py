"""`python -m jaxspec.bench`: how fast jaxspec trains, evaluates and feeds data on this machine.

One run measures train-step and eval images/s of MobileNetV3-Small per
resolution (torchvision's `mobilenet_v3_small` beside it when torch is
available: same batch, resolution, Adam 1e-4 and label smoothing 0.1), the
input pipeline with domain constraining, the ImageNet recipe from JPEGs beside
a tf.data pipeline of the same transforms on as many cores (`tf_ref`,
`pipeline_side`), K vmapped specialists against K sequential steps, the routed
system against its generalist, and an exported generalist against its
specialist in LiteRT (`--only=export`: latency and file sizes), YOLOv5n's train step
against the detection input pipeline (`--only=detect`), plus peak
memory. JSON goes to stdout (and to `--out`), a readable table to stderr.

  python -m jaxspec.bench --out=bench.json                      # torch in this venv, or no torch rows
  python -m jaxspec.bench --torch_python=/path/to/venv/bin/python  # torch from another interpreter
  python -m jaxspec.bench --quick                               # tiny sizes, seconds (the tests use it)
  python -m jaxspec.bench --dtype=bfloat16   # mixed precision; torch with AMP (bfloat16, channels-last)
  python -m jaxspec.bench --only=pipeline --jpeg_images=256  # input pipelines only, a smaller JPEG set

Timing: each figure is the median of `--repeats` rounds of `--steps` steps
after `--warmup`; jaxspec and torch alternate round by round, and a ratio is
the median of the per-round ratios, so load that drifts during a run on a
shared machine hits both sides alike (the JPEG rows alternate all four of their
sides: jaxspec in 1 and 2 worker processes, tf.data on 1 and 2 cores). Torch always runs in a subprocess
(this interpreter, or `--torch_python`) with `--torch_threads` threads, on
CUDA when JAX runs on a GPU.

More benchmarks plug in with `@register("name")`: a function of `Settings`
returning rows (dicts with at least `benchmark`, `setting`, `jaxspec`, `unit`).
"""

from jaxspec.bench import benchmarks, detect  # noqa: F401  (registers the benchmarks)
from jaxspec.bench.core import (  # noqa: F401
    AT_MOST,
    BENCHMARKS,
    TARGETS,
    Settings,
    _row,
    register,
    run,
    table,
)
from jaxspec.bench.torch_ref import TorchWorker  # noqa: F401
