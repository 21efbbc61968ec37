"""Orbax checkpoints of (train state, grain iterator) under one step number.

Orbax writes each step into a temporary directory and renames it when
complete; jaxspec then writes the step's checksums, and a restarted run
restores the newest step that verifies, data position included.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxspec import files, models
from jaxspec.train import workdir
from jaxspec.train.state import TrainState

CHECKSUMS = "jaxspec_checksums.json"


def _step_dirs(directory: pathlib.Path) -> list[int]:
    return (
        sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())
        if directory.is_dir()
        else []
    )


def step_problem(step_dir: pathlib.Path) -> str:
    """Why the checkpoint in `step_dir` cannot be trusted (a few words), or '' when it verifies."""
    try:
        expected = json.loads((step_dir / CHECKSUMS).read_text())
    except FileNotFoundError:
        return "it has no checksums: the run stopped while saving it"
    except (OSError, json.JSONDecodeError):
        return f"its {CHECKSUMS} is unreadable"
    return files.tree_problem(step_dir, expected, skip=(CHECKSUMS,))


def _fields(state: TrainState) -> dict:
    """The state as saved: its fields by name, without those that are off (None), so a checkpoint written
    before an optional field existed (`ema`) has the layout of one written with it off."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if getattr(state, f.name) is not None}


def _write_replicated_arrays_whole() -> None:
    """Replica-parallel saving splits every replicated array across its replicas, one compiled slice per array
    shape and device: for models of a few million parameters that costs more (hundreds of compilations on 8
    devices) than the parallel write saves. Orbax warns that its default handler is replaced: that is the point."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logger.setLevel(level)


_write_replicated_arrays_whole()


class Checkpointer:
    """The checkpoints of one phase, each verified by checksums before it is used.

    A step's checksums are written once orbax has finished saving it; on
    opening, steps that do not verify (corrupt, truncated, or saved by a run
    that died mid-save) are moved to `set_aside/` with a warning, so the run
    falls back to the newest step that does. `fingerprint` (see
    `workdir.claim_phase`) ties the directory to the phase that made it.
    """

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        max_to_keep: int = 2,
        fingerprint: dict | None = None,
        overwrite: bool = False,
    ):
        self.directory = pathlib.Path(directory).absolute()
        if fingerprint is not None:
            workdir.claim_phase(self.directory, fingerprint, overwrite=overwrite)
        self._set_aside_unverified()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
        )
        self._unsealed: list[int] = []  # saved, checksums not yet written

    def _set_aside_unverified(self) -> None:
        """Moves the newest steps that fail verification aside, down to the newest one that passes."""
        for step in reversed(_step_dirs(self.directory)):
            problem = step_problem(self.directory / str(step))
            if not problem:
                return
            if jax.process_index() == 0:
                aside = self.directory / "set_aside"
                aside.mkdir(exist_ok=True)
                (self.directory / str(step)).rename(_free_name(aside / str(step)))
            older = [s for s in _step_dirs(self.directory) if s < step]
            fallback = f"falling back to step {older[-1]}" if older else "starting the phase over"
            workdir.warn(f"checkpoint step {step} of {self.directory.name!r} set aside ({problem}); {fallback}")

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState, data_iter, *, force: bool = False) -> None:
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return
        self.seal()
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_fields(state)),
                data=grain.checkpoint.CheckpointSave(data_iter),
            ),
            force=force,
        )
        self._unsealed.append(step)

    def seal(self) -> None:
        """Waits for pending saves and writes their checksums."""
        if not self._unsealed:
            return
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in self._unsealed:
                step_dir = self.directory / str(step)
                if step_dir.is_dir():  # max_to_keep may have removed it since
                    files.write_json(step_dir / CHECKSUMS, files.tree_digest(step_dir, skip=(CHECKSUMS,)))
        self._unsealed = []

    def last_good_step(self) -> int | None:
        """The newest step that verifies now (pending saves sealed first), or None."""
        self.seal()
        for step in reversed(self._manager.all_steps()):
            if not step_problem(self.directory / str(step)):
                return step
        return None

    def restore(self, abstract_state: TrainState, data_iter=None, step: int | None = None) -> TrainState:
        """Restores into `abstract_state`'s shapes and shardings (and `data_iter`'s position)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}")
        if not (self.directory / str(step)).is_dir():
            raise FileNotFoundError(f"No checkpoint of step {step} in {self.directory}")
        problem = step_problem(self.directory / str(step))
        if problem:
            raise ValueError(f"checkpoint step {step} in {self.directory} cannot be used: {problem}")
        items = {"state": ocp.args.StandardRestore(_fields(abstract_state))}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return abstract_state.replace(**self._manager.restore(step, args=ocp.args.Composite(**items)).state)

    def close(self) -> None:
        self.seal()
        self._manager.wait_until_finished()
        self._manager.close()


def _free_name(path: pathlib.Path) -> pathlib.Path:
    n, out = 1, path
    while out.exists():
        out, n = path.with_name(f"{path.name}-{n}"), n + 1
    return out


def abstract_like(state: TrainState) -> TrainState:
    """Shapes, dtypes and shardings of `state`, without its values."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def classes_record(output_classes, class_names) -> list[dict]:
    """Each output's global class index and name, for model.json (`-1`, a dustbin, is named `other`)."""
    return [{"class": int(c), "name": class_names[c] if c >= 0 else "other"} for c in output_classes]


def export_model(directory: str | pathlib.Path, model, info: dict, *, preprocess: dict, classes: list[dict]) -> None:
    """Saves a finished model (parameters + BatchNorm statistics) for reuse, with its `model.json`.

    `model.json` holds the model's own description (`models.describe`), `info`
    (subset, ...), `preprocess` (how evaluation fed it, e.g.
    `pipeline.preprocess_record`), `classes` (`classes_record`: what each
    output means), a digest of the weights and the checksums of their files.
    The directory is written whole and then renamed into place, so it is
    complete or absent; an export that does not verify against the model
    (left by an older run) is moved aside and written anew, and one whose
    model.json predates the preprocess/classes records gets them added.
    """
    directory = pathlib.Path(directory).absolute()
    outputs = models.describe(model)["num_classes"]
    if len(classes) != outputs:
        raise ValueError(f"classes describes {len(classes)} outputs but the model has {outputs}")
    records = {"preprocess": preprocess, "classes": classes}
    digest = workdir.weights_digest(model)
    if export_problem(directory, digest) == "":
        spec = json.loads((directory / "model.json").read_text())
        if any(k not in spec for k in records):
            files.write_json(directory / "model.json", {**spec, **records}, indent=1)
        return
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _, params, batch_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / "weights", {"params": params, "batch_stats": batch_stats})
    checkpointer.wait_until_finished()
    spec = {
        **models.describe(model),
        **info,
        **records,
        "weights_digest": digest,
        "weights_files": files.tree_digest(tmp / "weights"),
    }
    files.write_json(tmp / "model.json", spec, indent=1)
    if directory.exists():
        problem = export_problem(directory, digest)
        moved = workdir.set_aside(directory)
        workdir.warn(
            f"export {directory.name!r} did not match the trained model ({problem}); moved it aside to {moved.name}"
        )
    tmp.rename(directory)


def export_problem(directory: pathlib.Path, digest: str | None = None) -> str:
    """Why `directory` is not a complete export (of the weights with `digest`), or '' when it is."""
    try:
        spec = json.loads((directory / "model.json").read_text())
    except FileNotFoundError:
        return "no model.json" if directory.exists() else "absent"
    except (OSError, json.JSONDecodeError):
        return "model.json is unreadable"
    if "weights_files" not in spec:
        return "model.json has no weights checksums (an older export)"
    if digest is not None and spec.get("weights_digest") != digest:
        return "its weights are another model's"
    problem = files.tree_problem(directory / "weights", spec["weights_files"])
    return f"weights/{problem}" if problem else ""


def load_model(directory: str | pathlib.Path, dtype="float32"):
    """Rebuilds a model saved by `export_model`, computing in `dtype`; returns (model, spec)."""

    directory = pathlib.Path(directory).absolute()
    if not (directory / "model.json").exists() or not (directory / "weights").exists():
        raise FileNotFoundError(f"{directory} is not an exported jaxspec model (expected model.json and weights/)")
    spec = json.loads((directory / "model.json").read_text())
    model = models.from_spec(spec, rngs=nnx.Rngs(0), dtype=dtype)
    _, params, batch_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {"params": params, "batch_stats": batch_stats}
    )
    restored = ocp.StandardCheckpointer().restore(directory / "weights", target)
    nnx.update(model, restored["params"], restored["batch_stats"])
    model.eval()
    return model, spec
