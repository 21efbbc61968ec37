"""One process of a real multi-process CPU run (started by tests/test_multihost.py).

  JAX_COORDINATOR_ADDRESS=localhost:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=I \
      python -m tests.multihost_worker --out=DIR --steps=N [--fsdp=K]

joins the run through `jaxspec.sharding.initialize()`, trains a small
network for N steps on fixed global batches (each process feeding only
the rows its devices hold), saves and restores an orbax checkpoint of the
state and of a grain iterator from every process, and writes what it saw to
DIR/proc{I}.npz. `train` is also the single-process reference.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import numpy as np
from flax import nnx

from configs.common import data as data_config
from configs.common import optimizer as optimizer_config
from jaxspec import sharding
from jaxspec.data import pipeline
from jaxspec.data.sources import ArraySource, DatasetInfo
from jaxspec.train import checkpoint, optimizers, steps
from jaxspec.train.state import create_state

BATCH = 8
INFO = DatasetInfo("ids", tuple(f"c{i}" for i in range(5)), {}, (0.5,), (0.5,))


def global_batches(num_steps: int, batch_size: int = BATCH) -> list[dict[str, np.ndarray]]:
    """The same global batches in every process."""
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, 5, batch_size).astype(np.int32),
        }
        for _ in range(num_steps)
    ]


def local_rows(mesh: jax.sharding.Mesh, batch_size: int) -> slice:
    """The rows of a global batch that this process's devices hold (contiguous)."""
    index_map = sharding.batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    starts = sorted({idx[0].start or 0 for idx in index_map.values()})
    stops = sorted({idx[0].stop or batch_size for idx in index_map.values()})
    rows = slice(starts[0], stops[-1])
    assert rows.stop - rows.start == batch_size // jax.process_count(), (rows, index_map)
    return rows


class TinyNet(nnx.Module):
    """Conv, BatchNorm, dropout and a head: what the step must get right across processes, compiled in seconds."""

    def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 64, (3, 3), strides=(2, 2), rngs=rngs)
        self.bn = nnx.BatchNorm(64, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(64, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2))
        return self.head(self.dropout(x, rngs=rngs))


def train(mesh: jax.sharding.Mesh, num_steps: int):
    """TinyNet trained with SGD + momentum on `global_batches`; returns (state, last metrics)."""
    tx, schedule = optimizers.make_optimizer(optimizer_config(optimizer="sgd", lr=0.1, momentum=0.9), num_steps)
    modeldef, state = create_state(TinyNet(5, rngs=nnx.Rngs(0)), tx, seed=0)
    state = sharding.place_state(state, mesh)
    step = steps.make_train_step(modeldef, tx, schedule, mean=(0.5,), std=(0.5,), label_smoothing=0.1)
    train_step = steps.jit_train_step(step, mesh, sharding.state_shardings(state, mesh))
    rows, metrics = local_rows(mesh, BATCH), None
    for batch in global_batches(num_steps):
        state, metrics = train_step(state, sharding.put_batch({k: v[rows] for k, v in batch.items()}, mesh))
    return state, metrics


def gather(tree, mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
    """Every array of `tree` in full on this host, by path (one program gathers the split ones)."""
    full = jax.jit(lambda t: t, out_shardings=sharding.replicated(mesh))(tree)
    leaves = jax.tree_util.tree_flatten_with_path(full)[0]
    return {jax.tree_util.keystr(path): np.asarray(x.addressable_data(0)) for path, x in leaves}


def id_source(n: int = 64) -> ArraySource:
    """Example i's image is filled with i, so a batch tells which examples it holds."""
    ids = np.arange(n, dtype=np.uint8)
    return ArraySource(np.broadcast_to(ids[:, None, None], (n, 32, 32)).copy(), ids % 5, INFO)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--fsdp", type=int, default=1)
    args = parser.parse_args()
    out = pathlib.Path(args.out)

    sharding.initialize()
    mesh = sharding.make_mesh(fsdp=args.fsdp)
    state, metrics = train(mesh, args.steps)

    # Every process saves its part of the state and its own iterator position, then restores both.
    cfg = data_config(image_size=32, flip=False, crop_padding=0, num_threads=1, prefetch=2)
    it = pipeline.train_iterator(id_source(), cfg, batch_size=BATCH, seed=0)
    first = next(it)
    ckpt = checkpoint.Checkpointer(out / "ckpt")
    ckpt.save(state, it, force=True)
    ckpt.close()
    expected_next = next(it)
    fresh = pipeline.train_iterator(id_source(), cfg, batch_size=BATCH, seed=0)
    restored = checkpoint.Checkpointer(out / "ckpt").restore(checkpoint.abstract_like(state), fresh)
    restored_next = next(fresh)

    full, back = gather(state, mesh), gather(restored, mesh)
    np.savez(
        out / f"proc{jax.process_index()}.npz",
        process_count=jax.process_count(),
        device_count=jax.device_count(),
        loss=metrics["loss"].addressable_data(0),
        num_split=sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state)),
        restored_equal=full.keys() == back.keys() and all(np.array_equal(full[k], back[k]) for k in full),
        first_ids=first["image"][:, 0, 0, 0],
        next_ids=expected_next["image"][:, 0, 0, 0],
        restored_next_ids=restored_next["image"][:, 0, 0, 0],
        **{k: v for k, v in full.items() if k.startswith(".params")},
    )


if __name__ == "__main__":
    main()
