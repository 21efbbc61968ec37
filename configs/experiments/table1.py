"""Paper Table 1: equal lexicographic splits, generalist vs tuned specialist per group, plus the average.

python -m jaxspec.experiments --config=configs/experiments/table1.py --workdir=/tmp/table1
... table1.py:data=cifar100 | :data=imagenet (real recipes) | :tiny (tests)
"""

import ml_collections

from configs.experiments import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, arg = base.classification(arg)
    config.experiment = dict(
        kind="specialize",
        title="Table 1: lexicographic groups",
        description="Each group is a contiguous split of the class order; extracted specialists fine-tuned on it.",
        grid=dict(group=["@lex"], method=["extract"], seed=list(range(1 if arg.tiny else arg.seeds))),
        columns=["generalist_top1", "control_top1", "specialist_top1", "gain_top1", "gain_vs_control_top1"],
        curves=False,
    )
    return config
