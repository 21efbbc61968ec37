"""The one place that decides where arrays live.

Data parallel (the default, `fsdp=1`): a `('data',)` mesh over all devices of
all processes; batches are split along it, model and optimizer state are
replicated. FSDP (`fsdp=N > 1`): a `('data', 'fsdp')` mesh of shape
(devices / N, N); batches are split over both axes (every device still gets
its own examples) and each state array is split N ways along its largest
axis that N divides, so a model N times larger than one device's memory
fits; XLA gathers a parameter where it is used. Same math, same results.

Multi-process runs call `initialize()` first; single-process runs skip it unchanged.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")
# Arrays smaller than this stay whole on every device: gathering them costs more than they weigh.
FSDP_MIN_SIZE = 1024


def _env_int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"{key}={env[key]!r} is not an integer") from None


def _cluster_processes(env: Mapping[str, str]) -> int:
    """Processes of the SLURM step, Open MPI job or Cloud TPU (GKE / multislice) run JAX would detect; else 1."""
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")):
        return _env_int(env, "SLURM_NTASKS")  # inside `srun`; a batch script alone is one process
    if "OMPI_MCA_orte_hnp_uri" in env and "OMPI_COMM_WORLD_SIZE" in env:
        return _env_int(env, "OMPI_COMM_WORLD_SIZE")
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if hosts:
        return len(hosts.split(","))
    return 2 if env.get("MEGASCALE_COORDINATOR_ADDRESS") else 1


def distributed_args(env: Mapping[str, str] = os.environ) -> dict[str, int] | None:
    """The arguments for `jax.distributed.initialize`, or None for a single-process run.

    JAX reads `JAX_COORDINATOR_ADDRESS` itself and detects SLURM, Open MPI and
    Cloud TPU on its own, but not the size and rank of a run started by hand:
    those come from `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`. A Cloud TPU VM
    pod announces itself only through its metadata server, so its launcher
    sets `JAXSPEC_DISTRIBUTED=1` (let JAX detect everything); `=0` forces a
    single process.
    """
    mode = env.get("JAXSPEC_DISTRIBUTED", "").strip().lower()
    if mode and mode not in _TRUE + _FALSE:
        raise ValueError(f"JAXSPEC_DISTRIBUTED={env['JAXSPEC_DISTRIBUTED']!r}; use 1 (multi-process) or 0 (single)")
    if mode in _FALSE:
        return None
    if env.get("JAX_COORDINATOR_ADDRESS"):
        args = {
            name: _env_int(env, key)
            for key, name in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id"))
            if env.get(key)
        }
        if len(args) == 2:
            if not 0 <= args["process_id"] < args["num_processes"]:
                raise ValueError(
                    f"JAX_PROCESS_ID={args['process_id']} is not in [0, JAX_NUM_PROCESSES={args['num_processes']})"
                )
        elif _cluster_processes(env) == 1:
            raise ValueError(
                f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']!r} is set, so set both "
                "JAX_NUM_PROCESSES and JAX_PROCESS_ID too (no SLURM/Open MPI/TPU job provides them)"
            )
        return args
    if mode in _TRUE or _cluster_processes(env) > 1:
        return {}
    return None


def initialize() -> None:
    """Joins a multi-process run when the environment describes one (see `distributed_args`)."""
    # Must run before anything touches a JAX backend, so only the environment is read.
    args = distributed_args()
    if args is None:
        return
    jax.distributed.initialize(**args)
    log.info("jax.distributed initialized (%s)", args or "detected from the cluster environment")
    if jax.default_backend() == "cpu":
        # XLA:CPU's gloo gives a late peer only 30 s to join the first collective over a set of
        # devices (later ones wait): meet now, while the processes are in step, not at the first train step.
        multihost_utils.sync_global_devices("jaxspec.sharding.initialize")


def make_mesh(devices=None, *, fsdp: int = 1) -> jax.sharding.Mesh:
    """The mesh over `devices` (default: all devices of all processes).

    `fsdp=1`: `('data',)`, pure data parallel. `fsdp=N` (a divisor of the
    device count; -1 = all devices): `('data', 'fsdp')` of shape (D / N, N),
    state split over `fsdp` (see `state_shardings`). Its axes are `Auto`, so
    XLA places the gathers and reductions that a split parameter needs.
    """
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    size = n if fsdp == -1 else fsdp
    if not isinstance(size, int) or size < 1 or n % size:
        raise ValueError(f"sharding.fsdp={fsdp!r} must be -1 (all devices) or a positive divisor of the {n} devices")
    if size == 1:
        return jax.make_mesh((n,), ("data",), devices=devices)
    return jax.make_mesh((n // size, size), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2, devices=devices)


def run_mesh(cfg) -> jax.sharding.Mesh:
    """The mesh of a run's `sharding` section: `devices` 0 is every device of every process, N the first N
    (one process only: a smoke run or a comparison on fewer devices, which also compiles faster), split
    as `fsdp` says (`make_mesh`)."""
    n, count = cfg.get("devices", 0), jax.device_count()
    if n == 0:
        return make_mesh(fsdp=cfg.fsdp)
    if not isinstance(n, int) or not 0 < n <= count or jax.process_count() > 1:
        raise ValueError(
            f"sharding.devices={n!r} must be 0 (every device) or 1..{count} (the first N; one process only, "
            f"this run has {jax.process_count()})"
        )
    return make_mesh(jax.devices()[:n], fsdp=cfg.fsdp)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fill_devices(n: int, devices: int) -> int:
    """`n` rounded up to a multiple of `devices`: a batch size whose examples split evenly over every device."""
    return -(-n // devices) * devices


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis: one slice of examples per device."""
    axes = mesh.axis_names
    return NamedSharding(mesh, P(axes[0] if len(axes) == 1 else axes))


def fsdp_spec(shape: tuple[int, ...], n: int, min_size: int = FSDP_MIN_SIZE) -> P:
    """Split over `fsdp` along the largest axis `n` divides (the last such on ties); whole if none or small."""
    axes = [i for i, d in enumerate(shape) if d % n == 0]
    if n == 1 or not axes or math.prod(shape) < min_size:
        return P()
    axis = max(axes, key=lambda i: (shape[i], i))
    return P(*(None,) * axis, "fsdp")


def state_shardings(tree, mesh: jax.sharding.Mesh, min_size: int = FSDP_MIN_SIZE):
    """A `NamedSharding` per array of `tree` (arrays or `ShapeDtypeStruct`s).

    Replicated on a data-parallel mesh; on a mesh with an `fsdp` axis, arrays
    of at least `min_size` elements are split along their largest axis that
    the axis size divides (`fsdp_spec`), the rest (scalars, the RNG key,
    small biases) replicated.
    """
    n = mesh.shape.get("fsdp", 1)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n, min_size)), tree)


def place_state(tree, mesh: jax.sharding.Mesh, min_size: int = FSDP_MIN_SIZE):
    """A fresh copy of `tree` laid out by `state_shardings` (never aliasing the input, see `replicate`)."""
    return _put(tree, state_shardings(tree, mesh, min_size))


def _put(tree, shardings):
    """`jax.device_put(tree, shardings)` into buffers of its own.

    Each array this process holds whole goes through a host copy: `device_put`
    onto several devices may reuse the input's buffer for one of them (seen
    with jax 0.10.2, `may_alias=False` notwithstanding), and the train steps
    donate the state. With several processes, `device_put` would also check
    every array in a collective of its own; every process builds the same
    state from the same seed, so one collective compares a checksum per array.
    """
    leaves, treedef = jax.tree.flatten(tree)
    targets = (
        [shardings] * len(leaves) if isinstance(shardings, jax.sharding.Sharding) else treedef.flatten_up_to(shardings)
    )
    host = [None if isinstance(x, jax.Array) and not x.is_fully_addressable else np.array(x) for x in leaves]
    if jax.process_count() > 1:
        sums = np.array([0 if h is None else zlib.crc32(np.ascontiguousarray(h).tobytes()) for h in host], np.uint32)
        multihost_utils.assert_equal(sums, "The state to place differs between processes (seeded differently?)")
    out = [
        jax.device_put(x, t, may_alias=False)
        if h is None
        else jax.make_array_from_callback(h.shape, t, lambda index, h=h: h[index])
        for x, h, t in zip(leaves, host, targets)
    ]
    return treedef.unflatten(out)


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
    return _put(tree, replicated(mesh))


SPEC_AXES = ("spec", "data")


def spec_mesh(num_specialists: int, devices=None) -> jax.sharding.Mesh:
    """The mesh of K specialists trained in one vmapped step: ('spec', 'data'), 'spec' the largest
    divisor of both K and the device count.

    The leading K axis of stacked states and batches is split over 'spec' (each
    device group holds K / |spec| specialists), every specialist's batch over
    'data'. Multi-process runs keep 'spec' at 1 (every process feeds its shard
    of every specialist's batch), so process-local batches stay the layout
    `jax.make_array_from_process_local_data` expects.
    """
    devices = jax.devices() if devices is None else list(devices)
    spec = math.gcd(num_specialists, len(devices)) if jax.process_count() == 1 else 1
    # Auto axes: under vmap a batched kernel turns convolutions into grouped ones, whose reshapes
    # explicit sharding types cannot express; the compiler propagates from the jit's shardings.
    return jax.make_mesh((spec, len(devices) // spec), SPEC_AXES, devices=devices, axis_types=(AxisType.Auto,) * 2)


def stacked_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Stacked states (and per-specialist metrics) on a `spec_mesh`: the leading K axis over 'spec'."""
    return NamedSharding(mesh, P("spec"))


def stacked_batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """[K, B, ...] batches on a `spec_mesh`: K over 'spec', each specialist's examples over 'data'."""
    return NamedSharding(mesh, P("spec", "data"))


def put_batches(batches, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This process's K batches (one per specialist) -> global [K, B, ...] arrays on a `spec_mesh`."""
    sh = stacked_batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.stack([b[k] for b in batches])) for k in batches[0]}


def summed_over_rows(x: jax.Array) -> NamedSharding | None:
    """`out_sharding` for a contraction over `x`'s rows inside a sharded step.

    With rows explicitly sharded, a matmul that sums over them is ambiguous to
    JAX; its result, like any other sum over the batch, is replicated. None
    (let JAX decide) when the rows are not explicitly sharded.
    """
    s = jax.typeof(x).sharding
    if isinstance(s, NamedSharding) and s.spec and s.spec[0] is not None:
        return NamedSharding(s.mesh, P())
    return None


def split_like_rows(x: jax.Array, ndim: int):
    """x's sharding for an array of `ndim` axes whose leading axis is split like x's rows, the rest whole."""
    s = jax.typeof(x).sharding
    rows = s.spec[0] if len(s.spec) else None
    return s.update(spec=(rows,) + (None,) * (ndim - 1))


def row_shards(x: jax.Array) -> int:
    """How many ways an explicitly sharded mesh splits x's rows (1 when they are not)."""
    s = jax.typeof(x).sharding
    axes = (s.spec[0] if len(s.spec) else None) or ()
    return math.prod(s.mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
