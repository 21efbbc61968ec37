"""Orbax checkpoints of (train state, grain iterator) under one step number.

Orbax writes each step into a temporary directory and renames it when
complete, so a crash mid-save never corrupts the latest good checkpoint; a
restarted run restores the newest complete step, data position included.
"""

from __future__ import annotations

import json
import os
import pathlib

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxspec import models
from jaxspec.train.state import TrainState


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState, data_iter, *, force: bool = False) -> None:
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iter),
            ),
            force=force,
        )

    def restore(self, abstract_state: TrainState, data_iter=None, step: int | None = None) -> TrainState:
        """Restores into `abstract_state`'s shapes and shardings (and `data_iter`'s position)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self._manager.restore(step, args=ocp.args.Composite(**items)).state

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(state: TrainState) -> TrainState:
    """Shapes, dtypes and shardings of `state`, without its values."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def export_model(directory: str | pathlib.Path, model, spec: dict) -> None:
    """Saves a finished model (parameters + BatchNorm statistics) for reuse.

    `spec` holds the constructor arguments (`name`, `num_classes`, ...) that
    `load_model` needs to rebuild the module before restoring into it.
    """
    directory = pathlib.Path(directory).absolute()
    weights = directory / "weights"
    if weights.exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    _, params, batch_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(weights, {"params": params, "batch_stats": batch_stats})
    checkpointer.wait_until_finished()
    tmp = directory / "model.json.tmp"
    tmp.write_text(json.dumps(spec, indent=1))
    os.replace(tmp, directory / "model.json")


def load_model(directory: str | pathlib.Path, dtype="float32"):
    """Rebuilds a model saved by `export_model`, computing in `dtype`; returns (model, spec)."""

    directory = pathlib.Path(directory).absolute()
    if not (directory / "model.json").exists() or not (directory / "weights").exists():
        raise FileNotFoundError(
            f"{directory} is not an exported jaxspec model (expected model.json and weights/)"
        )
    spec = json.loads((directory / "model.json").read_text())
    model = models.get_model(
        spec["name"],
        spec["num_classes"],
        rngs=nnx.Rngs(0),
        width_multiplier=spec["width_multiplier"],
        dropout_rate=spec["dropout_rate"],
        dtype=dtype,
    )
    _, params, batch_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {"params": params, "batch_stats": batch_stats}
    )
    restored = ocp.StandardCheckpointer().restore(directory / "weights", target)
    nnx.update(model, restored["params"], restored["batch_stats"])
    model.eval()
    return model, spec
