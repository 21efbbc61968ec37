"""Specialization methods compared on one group, with validation accuracy over fine-tuning steps (Fig. 5a).

python -m jaxspec.experiments --config=configs/experiments/methods.py --workdir=/tmp/methods
"""

import ml_collections

from configs.experiments import base

METHODS = ["extract", "fresh_head", "head_then_full", "suppress", "dustbin", "scratch"]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, arg = base.classification(arg, group="animals")
    config.experiment = dict(
        kind="specialize",
        title="Specialization methods",
        description="All methods start from the same generalist; scratch uses config.scratch.",
        grid=dict(group=[arg.group], method=METHODS, seed=list(range(1 if arg.tiny else arg.seeds))),
        columns=["generalist_top1", "control_top1", "specialist_top1", "specialist_top2", "gain_top1"],
        curves=True,
        generalist_per_seed=True,  # seeds replicate the whole pipeline (reproduction C4)
    )
    config.eval.every_steps = max(1, config.specialize.steps // 10)
    return config
