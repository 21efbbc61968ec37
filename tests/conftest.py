"""Test setup: 8 fake CPU devices, so sharding is exercised without accelerators, and one persistent
compilation cache, so identical steps compile once per session; the end-to-end runs that several modules
assert on (session fixtures, each run once per test process); and the order `-n 2` hands work out in."""

import contextlib
import io
import os
import tempfile
import types

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The 8 fake devices are threads: on a loaded 2-core machine they can reach a collective far apart, and
# XLA:CPU aborts the whole process after 40 s by default. Notebook kernels and worker processes inherit it.
# (LLVM -O0 was tried: no faster to compile here, twice as slow to run the overfit test; BENCHMARKS.md.)
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_cpu_collective_call_terminate_timeout_seconds=600"]
).strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxspec-test-xla-cache"))
# Every executable goes to the cache, not only those over a second: a fresh process (a CLI run, a notebook
# kernel, the other xdist worker) otherwise recompiles the hundreds of small ones that building a model and
# running it eagerly take. Subprocesses and kernels read both settings from the environment.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
)


# ---- shared end-to-end runs ---------------------------------------------------------------------------------------
# Session-scoped: one per test process. Under xdist the tests that use one are put in one `xdist_group`
# (see SCHEDULE below), so that it runs once for the whole suite. Tests must not change what these return:
# copy a workdir before running anything on it.


@pytest.fixture(scope="session")
def embedded_manifest(tmp_path_factory) -> str:
    """The synthetic embedded fixture (20 images per animal class); the data cache lies beside it."""
    from tests.synthetic_embedded import write_fixture

    return write_fixture(str(tmp_path_factory.mktemp("embedded")), per_class=20)


def _captured(fn):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        value = fn()
    return value, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def tiny_main_run(embedded_manifest, tmp_path_factory) -> types.SimpleNamespace:
    """The main job of configs/animals.py:tiny (validation every 10 steps), then the same job again on its
    finished workdir, which restores it: the config, the workdir, both runs' results and terminal output."""
    from configs import animals
    from jaxspec import run
    from tests.synthetic_embedded import on_fixture

    config = on_fixture(animals.get_config("tiny"), embedded_manifest)
    config.eval.every_steps = 10
    workdir = tmp_path_factory.mktemp("tiny_main")
    results, out, err = _captured(lambda: run.run(config, str(workdir)))
    again, again_out, again_err = _captured(lambda: run.run(config, str(workdir)))
    return types.SimpleNamespace(
        config=config,
        workdir=workdir,
        results=results,
        out=out,
        err=err,
        again=again,
        again_out=again_out,
        again_err=again_err,
    )


# ---- scheduling under `pytest -n 2` (pyproject: `--dist loadgroup`) -----------------------------------------------
# A test marked `xdist_group(name)` runs on the same worker as the rest of its group, so a module's or the
# session's fixture is computed once; other tests go one by one to whichever worker is free. The wall time
# is that of the worker that finishes last, so the long units are handed out first, in this order (longest
# first, from `--durations`: a group's name or a file's), and the many short tests fill in at the end.
SCHEDULE = (
    "tiny_main",
    "test_workdir.py",
    "test_experiments.py",
    "test_multi.py",
    "detect_run",
    "methods",
    "colab_detection",
    "test_jpeg_data.py",
    "distill",
    "test_distill.py",
    "test_lesion.py",
    "predict",
    "test_own_data.py",
    "test_methods.py",
    "test_batchnorm.py",
    "test_export.py",
    "test_train.py",
)


def _rank(item, rank: dict) -> int:
    mark = item.get_closest_marker("xdist_group")
    group = mark and (mark.args[0] if mark.args else mark.kwargs.get("name"))
    return min(rank.get(group, len(rank)), rank.get(item.path.name, len(rank)))


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SCHEDULE)}
    items.sort(key=lambda item: _rank(item, rank))  # stable: in collection order within a rank


def pytest_configure(config):
    # xdist (>= 3.6) would hand out groups with the most tests first; the order above is by duration.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
