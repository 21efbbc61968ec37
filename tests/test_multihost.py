"""Multi-process runs for real: 2 CPU processes on localhost, joined by `sharding.initialize()`.

The workers (tests/multihost_worker.py) each feed their own rows of the same
global batches; the parameters they reach must be the ones one process with
both devices reaches.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxspec import sharding
from tests import multihost_worker
from tests.synthetic_embedded import write_fixture

ROOT = pathlib.Path(__file__).parent.parent
STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(argv: list[str], logs: pathlib.Path, n: int = 2, timeout: float = 900) -> list[dict[str, str]]:
    """Runs `argv` as processes 0..n-1 of one JAX run on localhost; all must succeed. Returns their output."""
    port, procs = free_port(), []
    logs.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": str(n),
            "JAX_PROCESS_ID": str(i),
            "PYTHONPATH": str(ROOT),
        }
        # files, not pipes: a process blocked on a full pipe would stall its peers at the next collective
        with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
            procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:  # a peer that died leaves the others waiting at a collective
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = [{"stdout": (logs / f"{i}.out").read_text(), "stderr": (logs / f"{i}.err").read_text()} for i in range(n)]
    for i, code in enumerate(codes):
        assert code == 0, f"process {i} exited with {code}:\n{outputs[i]['stderr'][-4000:]}"
    return outputs


def reference_params() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Parameters at the start and after STEPS steps of one process with both devices, same global batches."""
    mesh = sharding.make_mesh(jax.devices()[:2])
    full = [multihost_worker.gather(multihost_worker.train(mesh, n)[0], mesh) for n in (0, STEPS)]
    return tuple({k: v for k, v in f.items() if k.startswith(".params")} for f in full)


def check_workers(out: pathlib.Path) -> list[dict]:
    procs = [dict(np.load(out / f"proc{i}.npz")) for i in range(2)]
    for i, p in enumerate(procs):
        assert p["process_count"] == 2 and p["device_count"] == 2
        assert p["restored_equal"], "the state restored from the checkpoint differs from the one saved"
        # each process reads its own shard (examples p, p+2, ...) and resumes it where it was saved
        assert np.all(p["first_ids"] % 2 == i) and np.all(p["next_ids"] % 2 == i)
        np.testing.assert_array_equal(p["restored_next_ids"], p["next_ids"])
    assert not set(procs[0]["first_ids"]) & set(procs[1]["first_ids"])
    return procs


def assert_same_params(got: dict, reference: tuple[dict, dict]) -> None:
    init, want = reference
    names = [k for k in got if k.startswith(".params")]
    assert sorted(names) == sorted(want)
    for k in names:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # far beyond that tolerance, training moved the parameters
    assert max(np.abs(want[k] - init[k]).max() for k in names) > 1e-2


def test_distributed_args_single_process_unchanged():
    assert sharding.distributed_args({}) is None
    assert sharding.distributed_args({"JAXSPEC_DISTRIBUTED": "0", "JAX_COORDINATOR_ADDRESS": "h:1"}) is None
    # a SLURM batch script (no srun step) or a one-task step is one process
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert sharding.distributed_args(slurm) is None
    assert sharding.distributed_args({**slurm, "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}) is None


def test_distributed_args_multi_process():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert sharding.distributed_args(env) == {"num_processes": 4, "process_id": 3}
    step = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "n[1-2]",
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "5",
    }
    assert sharding.distributed_args(step) == {}  # JAX reads SLURM itself
    assert sharding.distributed_args({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == {}
    assert sharding.distributed_args({"TPU_WORKER_HOSTNAMES": "w0"}) is None
    assert sharding.distributed_args({"JAXSPEC_DISTRIBUTED": "1"}) == {}  # e.g. a Cloud TPU VM pod


@pytest.mark.parametrize(
    "env, message",
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "'two'"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2"),
        ({"JAXSPEC_DISTRIBUTED": "maybe"}, "'maybe'"),
    ],
)
def test_distributed_args_errors_name_the_bad_value(env, message):
    with pytest.raises(ValueError, match=message):
        sharding.distributed_args(env)


def test_two_processes_train_like_one(tmp_path):
    run_processes(
        [sys.executable, "-m", "tests.multihost_worker", f"--out={tmp_path}", f"--steps={STEPS}"], tmp_path / "logs"
    )
    procs = check_workers(tmp_path)
    assert procs[0]["num_split"] == 0  # data parallel: everything replicated
    want = reference_params()
    for p in procs:
        assert_same_params(p, want)
    # the orbax checkpoint holds one state written by both processes
    assert [q.name for q in (tmp_path / "ckpt").iterdir()] == [str(STEPS)]


@pytest.mark.slow
def test_two_processes_fsdp_across_processes(tmp_path):
    run_processes(
        [sys.executable, "-m", "tests.multihost_worker", f"--out={tmp_path}", f"--steps={STEPS}", "--fsdp=2"],
        tmp_path / "logs",
    )
    procs = check_workers(tmp_path)
    assert procs[0]["num_split"] > 0  # some arrays live half on each process
    want = reference_params()
    for p in procs:
        assert_same_params(p, want)


@pytest.mark.slow
def test_cli_in_two_processes_finishes_and_resumes(tmp_path):
    manifest = write_fixture(str(tmp_path / "raw"), per_class=20)
    workdir = tmp_path / "work"
    argv = [
        sys.executable,
        "-m",
        "jaxspec.main",
        "--config=configs/animals.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.manifest={manifest}",
        f"--config.data.data_dir={tmp_path / 'cache'}",
    ]
    first = run_processes(argv, tmp_path / "logs1")
    assert "| specialist (extract), tuned |" in first[0]["stdout"]
    assert "| specialist (extract), tuned |" not in first[1]["stdout"]  # results are printed by process 0 only
    assert "[generalist] step 30/30" in first[0]["stderr"] and "[generalist]" not in first[1]["stderr"]
    results = json.loads((workdir / "results.json").read_text())
    assert not list(workdir.glob("*.tmp"))
    assert results["stages"][0]["extraction_exact"]
    assert (workdir / "checkpoints" / "generalist" / "30").is_dir()

    again = run_processes(argv, tmp_path / "logs2")  # resumes from the finished checkpoints: trains nothing
    assert "step 10/" not in again[0]["stderr"]
    assert json.loads((workdir / "results.json").read_text())["stages"] == results["stages"]
