"""Lesion and retrain (see `jaxspec.experiments.lesion`).

The generalist of `configs/animals.py` (30 classes) is the network; task A =
animals, task B = clothing; A's units are the 20% of `last_conv`'s channels
(576 at width 1) whose lesion costs A the most validation accuracy. Each cell
lesions them (none / init / always), retrains on A, B or both for 5 epochs of
A+B's data at a constant Adam 3e-4, and reports per-task accuracy changes and
lesion specificity: 3 modes x 3 retraining sets x 3 seeds.

  python -m jaxspec.experiments --config=configs/experiments/lesion.py --workdir=/tmp/lesion
  configs/experiments/lesion.py:tiny      seconds-long phases on the synthetic test fixture
  configs/experiments/lesion.py:seeds=1   one seed
  configs/experiments/lesion.py:epochs=1  shorter retraining (epochs of A+B's data)

Other data (`data=cifar100`) need --config.lesion.task_a/task_b set to two of their groups.
"""

from __future__ import annotations

import ml_collections

from configs import common
from configs.experiments import base

RETRAIN_EXAMPLES = 14_000  # 700 per class x (10 animals + 10 clothing)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, arg = base.classification(arg, epochs=5.0)
    batch = 128
    config.lesion = {
        # a layer name or parameter path whose output channels are the units; auto: the candidate whose top
        # units cost A the most validation accuracy (`jaxspec.experiments.lesion.choose_layer`)
        "layer": "auto",
        "candidates": "",  # comma-separated layer names for auto; empty: every layer a lesion can silence
        "task_a": "animals",  # the task whose units are lesioned
        "task_b": "clothing",
        "fraction": 0.2,  # A's units: this share of the layer's units, by lesion impact on A
        "chunk": 32,  # lesions evaluated per forward pass when ranking
        "retrain": common.phase(
            steps=common.steps_for(arg.epochs, RETRAIN_EXAMPLES, batch),
            batch_size=batch,
            label_smoothing=0.1,
            optim=common.optimizer(optimizer="adam", lr=3e-4),
        ),
    }
    config.experiment = {
        "kind": "lesion",
        "title": "Lesioning task-specific units, then retraining",
        "description": (
            "A = task_a's classes, B = task_b's; A's units: the top lesion.fraction of lesion.layer's channels by "
            "validation accuracy lost on A when silenced alone. mode: none | init (zeroed once) | always (held at "
            "zero); retrain: the data trained on afterwards. delta = after - before (test, class-balanced; _se: "
            "standard error over classes); impact = accuracy lost when A's units are silenced, A's units re-ranked "
            "after retraining; overlap = share of the original A units among the re-ranked ones."
        ),
        "grid": {
            "mode": ["none", "init", "always"],
            "retrain": ["A", "B", "both"],
            "seed": list(range(1 if arg.tiny else arg.seeds)),
        },
        "columns": [
            "top1_A_before",
            "top1_B_before",
            "delta_top1_A",
            "delta_top1_A_se",
            "delta_top1_B",
            "delta_top1_B_se",
            "impact_diff_top1_before",
            "impact_diff_top1_after",
            "overlap",
        ],
        "generalist_per_seed": True,  # seeds replicate the whole pipeline, layer choice included
    }
    if arg.tiny:
        config.lesion.retrain.steps = 10
        config.lesion.retrain.batch_size = 32
        config.lesion.chunk = 16
        config.checkpoint_every = 1000  # only the final save of each phase
        config.experiment.grid.mode = ["init", "always"]
        config.experiment.grid.retrain = ["both"]
    return config
