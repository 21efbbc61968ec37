"""The one place that decides where arrays live.

A 1-D `('data',)` mesh over all devices of all processes: batches are split
along it, model and optimizer state are replicated. Multi-process runs call
`initialize()` first; single-process runs skip it unchanged.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize() -> None:
    """Joins a multi-process run when the environment describes one."""
    # Must run before anything touches a JAX backend, so only the environment is read.
    if any(os.environ.get(k) for k in _MULTIPROCESS_ENV):
        jax.distributed.initialize()


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A `('data',)` mesh over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), ("data",), devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def put_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Assembles this process's part of the batch into global arrays."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicate(tree, mesh: jax.sharding.Mesh):
    """A fresh copy of `tree` on all devices (same value everywhere).

    Never aliases the input: train steps donate their state, and the module a
    state was split from (e.g. the generalist a specialist was extracted
    from) must survive that.
    """
    return jax.device_put(tree, replicated(mesh), may_alias=False)
