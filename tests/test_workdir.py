"""A workdir that cannot lie: fingerprints, verified checkpoints with fallback, the lock, exports, early checks."""

import json
import os
import shutil
import subprocess
import sys
import types

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import animals
from jaxspec import files, models, run, validate
from jaxspec.data import datasets, pipeline
from jaxspec.detection import data as det_data
from jaxspec.detection import scenes
from jaxspec.train import checkpoint, history, loop, workdir
from jaxspec.train.state import TrainState
from tests.synthetic_embedded import on_fixture


@pytest.fixture(scope="module")
def manifest(embedded_manifest):
    return embedded_manifest


def tiny(manifest, **overrides):
    config = on_fixture(animals.get_config("tiny"), manifest)
    config.specialize.control = False
    config.update_from_flattened_dict(overrides)
    return config


def _changed(config, key, value):
    config = config.copy_and_resolve_references()
    config.update_from_flattened_dict({key: value})
    return config


# ---- 1. a changed config never reuses the old phases -------------------------------------------------------------


@pytest.mark.xdist_group("tiny_main")  # on a copy of the session's tiny main run (tests/conftest.py)
def test_changed_config_stops_naming_the_keys_and_overwrite_moves_only_changed_phases_aside(
    tiny_main_run, tmp_path, capsys
):
    wd = shutil.copytree(tiny_main_run.workdir, tmp_path / "w")  # a finished run of the tiny config
    first, manifest = tiny_main_run.results, tiny_main_run.config.data.manifest
    for key, value in (("specialize.subset", "clothing"), ("seed", 1)):
        with pytest.raises(workdir.WorkdirError) as e:
            run.run(_changed(tiny_main_run.config, key, value), str(wd))
        message = str(e.value)
        assert "\n" not in message and key in message and "--config.overwrite=True" in message
    capsys.readouterr()

    again = run.run(tiny(manifest, **{"specialize.subset": "clothing", "overwrite": True}), str(wd))
    err = capsys.readouterr().err
    assert "[generalist] step" not in err  # the generalist did not change: resumed, not retrained
    assert "[specialist] step" in err
    assert again["stages"][0]["subset_names"][0] == "tshirt_top"
    spec = json.loads((wd / "models" / "specialist" / "model.json").read_text())
    assert spec["class_names"][0] == "tshirt_top"  # the export is the new specialist's
    aside = sorted(p.name for p in (wd / "checkpoints").iterdir())
    assert "generalist" in aside and not any(p.startswith("generalist.") for p in aside)
    assert any(p.startswith("specialist.replaced-") for p in aside)
    old = next((wd / "checkpoints").glob("specialist.replaced-*"))
    assert json.loads((old / "fingerprint.json").read_text())["phase.subset"] == "animals"  # nothing lost
    assert first["stages"][0]["subset_names"][0] == "bear"


def test_phase_fingerprint_catches_what_the_run_config_cannot(tmp_path):
    """Another parent (start weights) under the same phase name is refused; an equal fingerprint is reused."""
    d = tmp_path / "checkpoints" / "specialist"
    fp = {"phase.steps": 20, "seed": 1, "start_weights": "aa"}
    workdir.claim_phase(d, fp, overwrite=False)
    (d / "20").mkdir()
    workdir.claim_phase(d, dict(fp), overwrite=False)
    with pytest.raises(workdir.WorkdirError, match=r"start_weights \('aa' -> 'bb'\)"):
        workdir.claim_phase(d, {**fp, "start_weights": "bb"}, overwrite=False)
    (d / "fingerprint.json").unlink()  # a phase of an older jaxspec, or something else entirely
    with pytest.raises(workdir.WorkdirError, match="fingerprint.json"):
        workdir.claim_phase(d, fp, overwrite=False)


def test_workdirs_written_before_a_phase_field_existed_still_resume(tmp_path):
    """`reestimate_bn` came later: a phase or run recorded without it equals one with it off, not one with it on."""
    config = animals.get_config("tiny")
    older = config.to_dict()
    for section in ("generalist", "specialize", "scratch"):
        del older[section]["reestimate_bn"]
    config.scratch.reestimate_bn = False
    assert workdir.determinants(older) == workdir.determinants(config.to_dict())
    config.generalist.reestimate_bn = True
    assert (
        "generalist.reestimate_bn"
        in workdir.differing(workdir.determinants(older), workdir.determinants(config.to_dict()))[0]
    )

    class Source:  # what a fingerprint reads of a source
        labels, info = np.zeros(4, np.int32), types.SimpleNamespace(digest="", class_names=("a", "b"))

        def __len__(self):
            return 4

    src = Source()

    def fp(phase):
        return workdir.phase_fingerprint(
            phase=phase, seed=0, data_cfg=config.data, source=src, start={"w": np.ones(2)}, spec={"name": "m"}
        )

    old_phase = {k: v for k, v in config.specialize.to_dict().items() if k != "reestimate_bn"}
    assert fp(old_phase) == fp({**old_phase, "reestimate_bn": False}) != fp({**old_phase, "reestimate_bn": True})


def test_settings_that_cannot_change_results_may_differ(tmp_path):
    config = animals.get_config("tiny")
    workdir.check_run(tmp_path, config.to_dict(), overwrite=False)
    config.log_every, config.checkpoint_every, config.eval.batch_size, config.data.num_workers = 3, 7, 16, 2
    workdir.check_run(tmp_path, config.to_dict(), overwrite=False)
    config.specialize.optim.lr = 3e-5
    with pytest.raises(workdir.WorkdirError, match="specialize.optim.lr"):
        workdir.check_run(tmp_path, config.to_dict(), overwrite=False)


# ---- 2. verified checkpoints, fallback, no false "intact" ----------------------------------------------------------


def _state(step: int, value: float) -> TrainState:
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params={"w": jnp.full((64, 8), value)},
        batch_stats={"m": jnp.full((8,), value)},
        opt_state={"mu": jnp.full((64, 8), -value)},
        rng=jnp.zeros((2,), jnp.uint32),
    )


def _iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def _saved(directory, steps=(2, 4)):
    """Checkpoints at `steps`, the data iterator `step` elements in at each."""
    ckpt, it, position = checkpoint.Checkpointer(directory), _iterator(), 0
    for s in steps:
        for _ in range(s - position):
            next(it)
        position = s
        ckpt.save(_state(s, float(s)), it)
    ckpt.close()


def _some_file(step_dir, part):
    return sorted(p for p in (step_dir / part).rglob("*") if p.is_file() and p.stat().st_size > 0)[-1]


CORRUPTIONS = {
    "random bytes": lambda d: _some_file(d, "state").write_bytes(os.urandom(_some_file(d, "state").stat().st_size)),
    "zeros": lambda d: _some_file(d, "state").write_bytes(bytes(_some_file(d, "state").stat().st_size)),
    "a flipped bit": lambda d: _flip(_some_file(d, "state")),
    "a truncated file": lambda d: _truncate(_some_file(d, "state")),
    "a missing _METADATA": lambda d: (d / "state" / "_METADATA").unlink(),
    "a truncated iterator position": lambda d: _truncate(_some_file(d, "data")),
    "a fake iterator position": lambda d: _some_file(d, "data").write_text(json.dumps({"next_index": 5})),
    "an empty manifest": lambda d: next((d / "state").rglob("manifest.ocdbt")).write_bytes(b""),
    "no checksums (killed mid-save)": lambda d: (d / checkpoint.CHECKSUMS).unlink(),
}


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_restored(tmp_path, damage, capsys):
    _saved(tmp_path / "c")
    CORRUPTIONS[damage](tmp_path / "c" / "4")
    ckpt = checkpoint.Checkpointer(tmp_path / "c")
    err = capsys.readouterr().err
    assert "checkpoint step 4 of 'c' set aside" in err and "falling back to step 2" in err
    assert err.count("\n") == 1
    assert ckpt.latest_step() == 2
    it = _iterator()
    state = ckpt.restore(checkpoint.abstract_like(_state(0, 0.0)), it)
    assert int(state.step) == 2 and float(state.params["w"][0, 0]) == 2.0
    assert next(it) == 2  # the data position of step 2
    assert (tmp_path / "c" / "set_aside" / "4").is_dir()  # kept for inspection, not deleted
    ckpt.save(_state(4, 4.0), it)  # step 4 can be saved again
    ckpt.close()
    assert not checkpoint.step_problem(tmp_path / "c" / "4")


def test_no_step_verifies_starts_the_phase_over(tmp_path, capsys):
    _saved(tmp_path / "c", steps=(2,))
    CORRUPTIONS["a flipped bit"](tmp_path / "c" / "2")
    ckpt = checkpoint.Checkpointer(tmp_path / "c")
    assert "starting the phase over" in capsys.readouterr().err
    assert ckpt.latest_step() is None
    ckpt.close()


def test_nan_stop_names_its_step_and_a_verified_checkpoint_even_with_a_save_in_flight(tmp_path):
    """The save of step 4 is still in flight when step 5's NaN stops the loop: it is finished, checked, named."""
    ckpt = checkpoint.Checkpointer(tmp_path / "c")

    def step(state, batch):
        new = state.replace(step=state.step + 1)
        loss = jnp.where(new.step >= 5, jnp.nan, 1.0)
        return new, {"loss": loss, "grad_norm": jnp.ones(()), "accuracy": jnp.zeros(())}

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    data = ({"x": np.zeros((8,), np.float32)} for _ in iter(int, 1))
    writer = history.JsonlWriter(tmp_path / "m.jsonl")
    with pytest.raises(FloatingPointError) as e:
        loop.fit(
            "p",
            _state(0, 1.0),
            step,
            _Positioned(data),
            num_steps=10,
            batch_size=8,
            mesh=mesh,
            ckpt=ckpt,
            writer=writer,
            log_every=1,
            checkpoint_every=4,
        )
    assert "at step 5" in str(e.value) and "step 4 verified" in str(e.value)
    assert not checkpoint.step_problem(tmp_path / "c" / "4")

    empty = checkpoint.Checkpointer(tmp_path / "d")
    with pytest.raises(FloatingPointError, match="no checkpoint verifies"):
        loop.fit(
            "p",
            _state(0, 1.0),
            step,
            _Positioned(data),
            num_steps=10,
            batch_size=8,
            mesh=mesh,
            ckpt=empty,
            writer=writer,
            log_every=1,
            checkpoint_every=50,
        )


class _Positioned:
    """A batch iterator grain can checkpoint (its position is a count)."""

    def __init__(self, batches):
        self._batches, self._n = batches, 0

    def __next__(self):
        self._n += 1
        return next(self._batches)

    def get_state(self) -> bytes:
        return json.dumps({"n": self._n}).encode()

    def set_state(self, state: bytes):
        self._n = json.loads(state)["n"]


# ---- 3. the lock ---------------------------------------------------------------------------------------------------


def test_a_second_run_on_a_locked_workdir_stops_before_any_work(manifest, tmp_path):
    probe = (
        "import sys; from jaxspec.train import workdir; l = workdir.Lock(sys.argv[1]); l.acquire(); "
        "print('locked', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", probe, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir.WorkdirError, match=rf"in use by pid {holder.pid} on host"):
            run.run(tiny(manifest), str(tmp_path))
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.communicate("")
    # The holder is gone; the kernel dropped its lock, and the lock file was emptied on release.
    with workdir.Lock(tmp_path):
        pass


def test_a_stale_lock_from_a_dead_process_is_taken_over_with_a_warning(tmp_path, capsys):
    (tmp_path / "lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere", "since": "then"}))
    with workdir.Lock(tmp_path):
        assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    assert "taking over the lock of pid 999999 on host elsewhere" in capsys.readouterr().err


# ---- 4. exports --------------------------------------------------------------------------------------------------


def test_exports_describe_the_model_itself_and_are_repaired_when_incomplete(manifest, tmp_path):
    wide = models.get_model("mobilenet_v3_small", 30, rngs=nnx.Rngs(3), width_multiplier=0.5)
    config = tiny(manifest, **{"generalist.init": str(tmp_path / "wide")})
    info = datasets.get_info("embedded")
    checkpoint.export_model(
        tmp_path / "wide",
        wide,
        {},
        preprocess=pipeline.preprocess_record(config.data, info),
        classes=checkpoint.classes_record(range(30), info.class_names),
    )
    run.run(config, str(tmp_path / "w"))
    for name in ("generalist", "specialist"):
        model, spec = checkpoint.load_model(tmp_path / "w" / "models" / name)
        assert spec["width_multiplier"] == 0.5 and model.width_multiplier == 0.5

    # A crash before model.json (an older jaxspec wrote it last, in place) is repaired on rerun.
    (tmp_path / "w" / "models" / "specialist" / "model.json").unlink()
    run.run(config, str(tmp_path / "w"))
    assert checkpoint.load_model(tmp_path / "w" / "models" / "specialist")[1]["class_names"][0] == "bear"


def test_an_exported_detector_loads_with_the_documented_loader(tmp_path):
    det = models.get_model("yolov5n", 4, rngs=nnx.Rngs(0))
    checkpoint.export_model(
        tmp_path / "det",
        det,
        {},
        classes=checkpoint.classes_record(range(4), "abcd"),
        preprocess=det_data.preprocess_record(det_data.default_config(), scenes.scenes_info()),
    )
    loaded, spec = checkpoint.load_model(tmp_path / "det")
    assert spec["name"] == "yolov5n" and loaded.num_classes == 4
    x = jnp.zeros((1, 64, 64, 3))
    det.eval()
    for a, b in zip(det(x), loaded(x)):
        np.testing.assert_array_equal(a, b)


# ---- 5. input checks before any work -----------------------------------------------------------------------------


BAD = [
    ("generalist.steps", -5),
    ("generalist.steps", 0),
    ("specialize.batch_size", 0),
    ("specialize.batch_size", -32),
    ("generalist.batch_size", 12),
    ("checkpoint_every", 0),
    ("log_every", 0),
    ("eval.batch_size", 0),
    ("specialize.method", "bogus"),
    ("specialize.optim.optimizer", "adagrad"),
    ("generalist.optim.lr", -1.0),
    ("specialize.label_smoothing", 1.5),
    ("model.dtype", "float16"),
    ("model.name", "resnet50"),
    ("model.num_blocks", 0),
    ("model.num_blocks", 12),
    ("seed", -1),
    ("data.num_workers", -2),
]


@pytest.mark.parametrize("key,value", BAD)
def test_bad_values_are_one_line_errors_naming_key_value_and_allowed(key, value):
    config = animals.get_config("tiny")
    config.update_from_flattened_dict({key: value})
    with pytest.raises(validate.ConfigError) as e:
        validate.check(config)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{key}={value!r} is not allowed: ")


def test_unreadable_files_are_refused_before_any_work(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(os.urandom(500))
    good = tmp_path / "good.npz"
    np.savez(good, w=np.arange(100_000, dtype=np.float32))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200_000])
    bad_manifest = tmp_path / "manifest.json"
    bad_manifest.write_text('{"images": ')
    for key, value in (
        ("generalist.init", str(garbage)),
        ("generalist.init", str(truncated)),
        ("generalist.init", str(tmp_path)),
        ("data.manifest", str(bad_manifest)),
    ):
        config = animals.get_config("tiny")
        config.update_from_flattened_dict({key: value})
        with pytest.raises(validate.ConfigError, match=f"^{key}="):
            validate.check(config)


def test_a_workdir_that_is_a_file_or_not_writable_is_refused(tmp_path):
    config = animals.get_config("tiny")
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(workdir.WorkdirError, match="is a file"):
        run.run(config, str(file))
    with pytest.raises(workdir.WorkdirError, match="not writable"):
        run.run(config, str(file / "below"))


def test_an_unknown_experiment_kind_is_refused(tmp_path):
    from jaxspec.experiments import grid

    config = animals.get_config("tiny")
    config.experiment = ml_collections.ConfigDict(dict(kind="tabel1", grid=dict(seed=[0])))
    with pytest.raises(validate.ConfigError, match=r"^experiment.kind='tabel1' is not allowed: one of \["):
        grid.run_grid(config, str(tmp_path))
    assert not (tmp_path / "run.json").exists()


def test_cli_errors_are_one_line(tmp_path):
    for arg, expected in (
        ("--config.specialize.stepz=3", "unknown key 'stepz' in specialize; valid keys: "),
        ("--config.foo=1", "unknown key 'foo' in the config"),
        ("--config.generalist.steps=-5", "generalist.steps=-5 is not allowed"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "jaxspec.main", "--config=configs/animals.py:tiny", f"--workdir={tmp_path}", arg],
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = [line for line in proc.stderr.splitlines() if line.startswith("jaxspec:")]
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


# ---- 6. metrics survive a kill as far as the checkpoint does -------------------------------------------------------


def test_metrics_are_on_disk_at_each_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    seen = []

    def step(state, batch):
        seen.append(len(history.read_history(path).get("p/train_loss", [])))
        new = state.replace(step=state.step + 1)
        return new, {"loss": jnp.ones(()), "grad_norm": jnp.ones(()), "accuracy": jnp.zeros(())}

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    data = _Positioned({"x": np.zeros((8,), np.float32)} for _ in iter(int, 1))
    loop.fit(
        "p",
        _state(0, 1.0),
        step,
        data,
        num_steps=6,
        batch_size=8,
        mesh=mesh,
        ckpt=checkpoint.Checkpointer(tmp_path / "c"),
        writer=history.JsonlWriter(path),
        log_every=1,
        checkpoint_every=3,
    )
    assert seen[3] == 3  # when step 4 starts, steps 1-3 (up to the checkpoint at 3) are in the file


def test_write_atomic_leaves_no_partial_file(tmp_path):
    files.write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# ---- resilience: SIGKILL at random steps, resume, bit-identical -------------------------------------------------


def _cli_args(manifest, workdir_path):
    return [
        sys.executable,
        "-m",
        "jaxspec.main",
        "--config=configs/animals.py:tiny",
        f"--workdir={workdir_path}",
        f"--config.data.manifest={manifest}",
        f"--config.data.data_dir={os.path.dirname(manifest)}/cache",
        "--config.specialize.control=False",
        "--config.generalist.steps=24",
        "--config.specialize.steps=12",
        "--config.checkpoint_every=4",
        "--config.log_every=1",
    ]


def _final_states(wd):
    import orbax.checkpoint as ocp

    out = {}
    for phase in sorted((wd / "checkpoints").iterdir()):
        last = max(int(p.name) for p in phase.iterdir() if p.name.isdigit())
        state = ocp.StandardCheckpointer().restore(phase / str(last) / "state")
        position = [
            p.read_bytes()
            for p in sorted((phase / str(last) / "data").rglob("*"))
            if p.is_file() and p.name != "commit_success.txt"
        ]  # that one names its own path
        out[phase.name] = (last, state, position)
    return out


def test_sigkill_at_random_steps_then_resume_is_bit_identical(manifest, tmp_path):
    rng = np.random.default_rng()
    order = [("generalist", s) for s in range(1, 25)] + [("specialist", s) for s in range(1, 13)]
    targets = sorted(rng.choice(np.arange(1, len(order) - 1), size=2, replace=False))  # two kills, then a resume
    subprocess.run(_cli_args(manifest, tmp_path / "full"), check=True, capture_output=True, timeout=600)

    killed_at = []
    for target in targets:
        proc = subprocess.Popen(
            _cli_args(manifest, tmp_path / "killed"), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        for line in proc.stderr:
            parts = line.split()
            if len(parts) > 2 and parts[1] == "step" and "/" in parts[2]:
                at = (parts[0].strip("[]"), int(parts[2].split("/")[0]))
                if at in order and order.index(at) >= target:
                    proc.kill()
                    killed_at.append(at)
                    break
        proc.wait(timeout=600)
    subprocess.run(_cli_args(manifest, tmp_path / "killed"), check=True, capture_output=True, timeout=600)

    full, resumed = _final_states(tmp_path / "full"), _final_states(tmp_path / "killed")
    assert sorted(full) == sorted(resumed) == ["generalist", "specialist"], (killed_at, targets)
    for phase in full:
        assert full[phase][0] == resumed[phase][0]
        leaves_a, tree_a = jax.tree.flatten(full[phase][1])
        leaves_b, tree_b = jax.tree.flatten(resumed[phase][1])
        assert tree_a == tree_b
        differing = sum(not np.array_equal(a, b) for a, b in zip(leaves_a, leaves_b))
        assert differing == 0, f"{phase}: {differing} of {len(leaves_a)} arrays differ (killed at {killed_at})"
        assert full[phase][2] == resumed[phase][2]  # the data iterator's position
    results = [json.loads((tmp_path / w / "results.json").read_text())["stages"] for w in ("full", "killed")]
    assert results[0] == results[1]
