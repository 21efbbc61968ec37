"""The main job end to end on the synthetic embedded fixture, and its CLI."""

import json
import subprocess
import sys

import pytest

from configs import animals
from jaxspec import run
from tests.synthetic_embedded import point_at, write_fixture


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_fixture(str(tmp_path_factory.mktemp("raw")), per_class=20)


def tiny_config(manifest):
    config = point_at(animals.get_config("tiny"), manifest)
    return config


def test_main_job_end_to_end_and_resume(manifest, tmp_path, capsys):
    config = tiny_config(manifest)
    results = run.run(config, str(tmp_path))
    out = capsys.readouterr().out
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
        assert (tmp_path / "checkpoints" / name / str(config[name if name == "generalist" else "specialize"].steps)).exists()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # Rerunning on the finished workdir resumes from the checkpoints: same numbers, no retraining, and says so.
    again = run.run(config, str(tmp_path))
    assert again["stages"] == results["stages"]
    captured = capsys.readouterr()
    assert "step 10/" not in captured.err
    assert f"[generalist] finished: restored, not retrained (checkpoint step {config.generalist.steps}/" in captured.err
    assert again["invocations"] == 2 and again["seconds_total"] == pytest.approx(results["seconds"] + again["seconds"])
    assert "over 2 runs" in (tmp_path / "report.md").read_text()  # the re-evaluation keeps the first run's time


def test_generalist_init_from_exported_model(manifest, tmp_path):
    config = tiny_config(manifest)
    first = run.run(config, str(tmp_path / "a"))
    config.generalist.init = str(tmp_path / "a" / "models" / "generalist")
    second = run.run(config, str(tmp_path / "b"))
    row = "generalist restricted to S"
    assert second["stages"][0]["test_on_S"][row] == first["stages"][0]["test_on_S"][row]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "jaxspec.main", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_cli_finds_configs_from_any_directory_and_lists_them(tmp_path):
    # From outside the checkout: the config is found and imports `configs.common`; the bad key is the error.
    proc = _cli("--config=configs/animals.py:tiny", f"--workdir={tmp_path}", "--config.specialize.stepz=3",
                cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        proc.stderr.strip().splitlines()[-1]] and "unknown key 'stepz'" in proc.stderr
    missing = _cli("--config=configs/nope.py", f"--workdir={tmp_path}", cwd=tmp_path)
    assert missing.returncode == 2 and "no such config file" in missing.stderr and "configs/animals.py" in missing.stderr
    helped = _cli("--helpfull")
    assert "configs/experiments/table1.py: Paper Table 1" in helped.stdout and ":seeds=N" in helped.stdout


def test_cli_rejects_unknown_override_key(tmp_path):
    proc = _cli("--config=configs/animals.py:tiny", f"--workdir={tmp_path}", "--config.specialize.stepz=3")
    assert proc.returncode != 0
    assert "stepz" in proc.stderr


def test_cli_rejects_unknown_subset(manifest, tmp_path):
    proc = _cli("--config=configs/animals.py:tiny", f"--workdir={tmp_path}", f"--config.data.manifest={manifest}",
                "--config.specialize.subset=unicorns")
    assert proc.returncode != 0
    assert "Unknown class or group 'unicorns'" in proc.stderr and "animals" in proc.stderr
