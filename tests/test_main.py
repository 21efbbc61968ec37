"""The main job end to end on the synthetic embedded fixture, and its CLI."""

import json
import subprocess
import sys

import pytest

from configs import animals
from jaxspec import run
from tests.synthetic_embedded import on_fixture

# The tests of the tiny main run share the session's run (tests/conftest.py) with the others of their group.
SHARED = pytest.mark.xdist_group("tiny_main")


def tiny_config(manifest):
    config = on_fixture(animals.get_config("tiny"), manifest)
    return config


@SHARED
def test_main_job_end_to_end_and_resume(tiny_main_run):
    config, tmp_path, results, out = (
        tiny_main_run.config,
        tiny_main_run.workdir,
        tiny_main_run.results,
        tiny_main_run.out,
    )
    assert "| generalist restricted to S |" in out and "| specialist (extract), tuned |" in out
    assert "| generalist trained further on its data (control) |" in out
    assert "smoke run" in out  # a :tiny run says that its near-chance numbers are expected
    stage = results["stages"][0]
    on_s = stage["test_on_S"]
    # the untuned extracted specialist is the generalist restricted to S, exactly
    assert stage["extraction_exact"]
    assert on_s["extracted specialist, untuned"]["top1"] == on_s["generalist restricted to S"]["top1"]
    assert on_s["specialist (extract), tuned"]["count"] == 10 * 4  # 10 animal classes x 20% of 20 per class
    assert stage["subset_names"][:2] == ["bear", "bird"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["stages"][0]["test_on_S"] == json.loads(json.dumps(on_s))
    for name in ("generalist", "specialist"):
        assert (tmp_path / "models" / name / "model.json").exists()
        assert (
            tmp_path / "checkpoints" / name / str(config[name if name == "generalist" else "specialize"].steps)
        ).exists()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # Rerunning on the finished workdir resumes from the checkpoints: same numbers, no retraining, and says so.
    again, err = tiny_main_run.again, tiny_main_run.again_err
    assert again["stages"] == results["stages"]
    assert "step 10/" not in err
    assert f"[generalist] finished: restored, not retrained (checkpoint step {config.generalist.steps}/" in err
    assert again["invocations"] == 2 and again["seconds_total"] == pytest.approx(results["seconds"] + again["seconds"])
    assert "over 2 runs" in (tmp_path / "report.md").read_text()  # the re-evaluation keeps the first run's time


@SHARED
def test_generalist_init_from_exported_model(tiny_main_run, tmp_path):
    """A generalist loaded from the shared run's export scores as that run's generalist did."""
    first = tiny_main_run.results
    config = tiny_config(tiny_main_run.config.data.manifest)
    config.generalist.init = str(tiny_main_run.workdir / "models" / "generalist")
    config.specialize.control = False  # not compared here
    second = run.run(config, str(tmp_path / "b"))
    row = "generalist restricted to S"
    assert second["stages"][0]["test_on_S"][row] == first["stages"][0]["test_on_S"][row]


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "jaxspec.main", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_cli_finds_configs_from_any_directory_and_lists_them(tmp_path):
    # From outside the checkout: the config is found and imports `configs.common`; the bad key is the error.
    proc = _cli(
        "--config=configs/animals.py:tiny", f"--workdir={tmp_path}", "--config.specialize.stepz=3", cwd=tmp_path
    )
    assert (
        proc.returncode == 2
        and proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]
        and "unknown key 'stepz'" in proc.stderr
    )
    missing = _cli("--config=configs/nope.py", f"--workdir={tmp_path}", cwd=tmp_path)
    assert (
        missing.returncode == 2 and "no such config file" in missing.stderr and "configs/animals.py" in missing.stderr
    )
    helped = _cli("--helpfull")
    assert "configs/experiments/table1.py: Paper Table 1" in helped.stdout and ":seeds=N" in helped.stdout


@pytest.mark.slow  # the same command, from the checkout, as test_workdir.py's test_cli_errors_are_one_line
def test_cli_rejects_unknown_override_key(tmp_path):
    proc = _cli("--config=configs/animals.py:tiny", f"--workdir={tmp_path}", "--config.specialize.stepz=3")
    assert proc.returncode != 0
    assert "stepz" in proc.stderr


def test_cli_rejects_unknown_subset(embedded_manifest, tmp_path):
    proc = _cli(
        "--config=configs/animals.py:tiny",
        f"--workdir={tmp_path}",
        f"--config.data.manifest={embedded_manifest}",
        "--config.specialize.subset=unicorns",
    )
    assert proc.returncode != 0
    assert "Unknown class or group 'unicorns'" in proc.stderr and "animals" in proc.stderr
