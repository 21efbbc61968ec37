"""The run context: what every phase of one run shares, built once and never reassigned.

It replaces passing an untyped runner object around: experiment kinds,
specialization methods and the driver all take a `RunContext` and read its
fields. Memoized results (evaluators, generalists) live in `cache`, a plain
dict; groups added by the experiments command make a new context
(`with_groups`) that shares the cache.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from clu import metric_writers

from jaxspec import sharding
from jaxspec.data.subsets import parse_stages
from jaxspec.train import history
from jaxspec.train.task import Task


@dataclasses.dataclass(frozen=True)
class RunContext:
    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    mesh: jax.sharding.Mesh
    writer: Any  # a clu MetricWriter: TensorBoard, plus metrics.jsonl on process 0
    task: Task
    train: Any  # the sources of the three splits
    val: Any
    test: Any
    info: Any  # the dataset's DatasetInfo (classes, groups, mean/std)
    stages: tuple[tuple[int, ...], ...]  # `specialize.subset` resolved: one class tuple per stage
    groups: Mapping[str, tuple[int, ...]]  # named subsets: the dataset's, plus the experiment's groupings
    groupings: Mapping[str, tuple[str, ...]]  # grouping name -> its group names
    cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def subset(self) -> tuple[int, ...]:
        """S: the first (widest) stage of `specialize.subset`."""
        return self.stages[0]

    def with_groups(self, groups: Mapping[str, tuple[int, ...]], groupings: Mapping[str, tuple[str, ...]]):
        """This context with more named groups (and the groupings they came from), same cache."""
        return dataclasses.replace(self, groups={**self.groups, **groups}, groupings={**self.groupings, **groupings})


def open_context(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, task: Task) -> RunContext:
    """Opens the data, the mesh and the metric writers of a run of `task` in `workdir`."""
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    writer = metric_writers.create_default_writer(str(workdir / "tensorboard"), just_logging=jax.process_index() > 0)
    if jax.process_index() == 0:
        writer = metric_writers.MultiWriter([writer, history.JsonlWriter(workdir / "metrics.jsonl")])
    d = config.data
    train, val, test = (task.open_split(d, split) for split in (d.train_split, d.val_split, d.test_split))
    return RunContext(
        config=config,
        workdir=workdir,
        mesh=sharding.run_mesh(config.sharding),
        writer=writer,
        task=task,
        train=train,
        val=val,
        test=test,
        info=train.info,
        stages=tuple(tuple(s) for s in parse_stages(config.specialize.subset, train.info)),
        groups=dict(train.info.groups),
        groupings={},
    )
