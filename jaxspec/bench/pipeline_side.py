"""One side of the JPEG input-pipeline benchmark, in its own process, on the cores it is given.

  python jaxspec/bench/pipeline_side.py SIDE CORES DATA_DIR BATCH   (the repo root on PYTHONPATH)
  SIDE: jaxspec-N (jaxspec's pipeline in N worker processes) or tfdata-N (tf_ref's, N threads)
  CORES: comma-separated CPU numbers, e.g. 0 or 0,1

Per core is enforced by CPU affinity: it is set before anything that starts threads is imported
(hence run by path: `-m` would import `jaxspec.bench` and with it JAX first), so every thread of
this process and every worker process it spawns inherits it, and TF's and tf.data's thread pools
are sized to the cores. `Side` runs one and asks it for timed rounds.

Each request on stdin, `{"warmup": w, "batches": n}`, makes a fresh iterator, takes `w` batches,
times `n` and closes it, answering `{"seconds": t}`: a closed iterator computes nothing while
the other side's round is timed on the same cores, and the warm-up takes the start-up (worker
processes, tf.data's tracing) and the batches prepared ahead out of the timing, so `n / t` is
the steady rate. The tf.data side holds the JPEGs in memory; jaxspec's reads them from the
ArrayRecord file as training does, so the comparison favours the reference.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time


class Side:
    """A `pipeline_side` process: `seconds(warmup, batches)` times one round of it."""

    def __init__(self, side: str, cores, data_dir: str, batch: int):
        root = str(pathlib.Path(__file__).parents[2])
        env = {
            "TF_CPP_MIN_LOG_LEVEL": "2",
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        }
        self._proc = subprocess.Popen(
            [sys.executable, __file__, side, ",".join(map(str, cores)), data_dir, str(batch)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.name = side
        self._read()

    def _read(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"pipeline side {self.name} exited (rc {self._proc.wait()}); see stderr above")
        return json.loads(line)

    def seconds(self, warmup: int, batches: int) -> float:
        self._proc.stdin.write(json.dumps({"warmup": warmup, "batches": batches}) + "\n")
        self._proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait()


def data_config(**overrides):
    """The `data` fields the pipeline reads (as configs/common.py sets them)."""
    import ml_collections  # here, not above: a side imports nothing before its affinity is set

    cfg = {
        "transform": "small",
        "image_size": 32,
        "crop_padding": 4,
        "flip": True,
        "randaugment_ops": 0,
        "randaugment_magnitude": 9,
        "erasing_prob": 0.0,
        "num_threads": 4,
        "prefetch": 8,
        "num_workers": 0,
    }
    return ml_collections.ConfigDict(cfg | overrides)


def _jaxspec(workers: int, data_dir: str, batch: int):
    from jaxspec.data import datasets, pipeline

    source = datasets.get_source("imagenet2012", "train", data_dir=data_dir)
    # jaxspec's ImageNet recipe (configs/imagenet_animals.py), one thread and one batch ahead per worker.
    cfg = data_config(
        transform="imagenet",
        image_size=224,
        randaugment_ops=2,
        erasing_prob=0.2,
        num_workers=workers,
        num_threads=1,
        prefetch=1,
    )
    rounds = iter(range(sys.maxsize))
    return lambda: pipeline.train_iterator(source, cfg, batch_size=batch, seed=next(rounds))


def _tfdata(threads: int, data_dir: str, batch: int):
    import tensorflow_datasets as tfds

    from jaxspec.bench import tf_ref

    tf_ref.limit_threads(threads)
    records = tfds.data_source(
        "imagenet2012", split="train", data_dir=data_dir, download=False, decoders={"image": tfds.decode.SkipDecoding()}
    )
    jpegs = [r["image"] for r in records]  # held in memory: the reference reads no files
    return lambda: tf_ref.pipeline(jpegs, batch=batch, threads=threads)


def main(side: str, cores: str, data_dir: str, batch: str) -> None:
    os.sched_setaffinity(0, [int(c) for c in cores.split(",")])
    replies, sys.stdout = sys.stdout, sys.stderr  # stdout carries only the replies
    kind, n = side.rsplit("-", 1)
    make = {"jaxspec": _jaxspec, "tfdata": _tfdata}[kind](int(n), data_dir, int(batch))
    print(json.dumps({"ready": side}), file=replies, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        it = make()
        for _ in range(req["warmup"]):
            next(it)
        t = time.perf_counter()
        for _ in range(req["batches"]):
            next(it)
        seconds = time.perf_counter() - t
        if hasattr(it, "close"):
            it.close()
        del it
        print(json.dumps({"seconds": seconds}), file=replies, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
