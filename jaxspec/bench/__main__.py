"""`python -m jaxspec.bench`: see `jaxspec.bench`."""

from __future__ import annotations

import json
import sys

from absl import app, flags

from jaxspec import cli
from jaxspec.bench import run, table
from jaxspec.bench.core import Settings
from jaxspec.bench.torch_ref import torch_worker

_OUT = flags.DEFINE_string("out", "", "Also write the JSON results to this file.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny models and sizes, one short round: a smoke test.")
_ONLY = flags.DEFINE_list("only", [], "Run only these benchmarks (default: all registered).")
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python", "", "Interpreter with torch + torchvision; default: this one if it has torch, else no torch rows."
)
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads for the torch side.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds per figure.")
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per timed round.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")
_SPECIALISTS = flags.DEFINE_integer("specialists", 3, "K for the vmapped-specialists benchmark.")
_JPEG_IMAGES = flags.DEFINE_integer("jpeg_images", 512, "JPEGs (500x375) in the dataset the pipeline is timed on.")
_JPEG_BATCH = flags.DEFINE_integer("jpeg_batch", 32, "Batch size of the JPEG pipeline rows.")
_JPEG_STEPS = flags.DEFINE_integer("jpeg_steps", 20, "Timed batches per round of the JPEG pipeline rows.")
_DTYPE = flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16"],
    "Activation dtype of jaxspec's models; bfloat16 also runs torch with AMP in bfloat16 and channels-last tensors.",
)


def main(argv) -> None:
    cli.start(argv, tf_defaults=True)  # the tf.data reference runs as TensorFlow ships
    quick = _QUICK.value
    worker, note = torch_worker(_TORCH_PYTHON.value, _TORCH_THREADS.value)
    settings = Settings(
        quick=quick,
        repeats=1 if quick else _REPEATS.value,
        steps=1 if quick else _STEPS.value,
        warmup=1 if quick else _WARMUP.value,
        specialists=2 if quick else _SPECIALISTS.value,
        torch=worker,
        dtype=_DTYPE.value,
        jpeg_images=48 if quick else _JPEG_IMAGES.value,
        jpeg_batch=8 if quick else _JPEG_BATCH.value,
        jpeg_steps=1 if quick else _JPEG_STEPS.value,
    )
    report = run(settings, _ONLY.value) | {"torch_note": note}
    text = json.dumps(report, indent=1)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")
    print(table(report), file=sys.stderr)
    print(text)


if __name__ == "__main__":
    app.run(main)
