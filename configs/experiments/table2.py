"""Paper Table 2: the dynamically configured system (generalist routes, group specialist decides) vs the generalist.

  python -m jaxspec.experiments --config=configs/experiments/table2.py --workdir=/tmp/table2
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, arg = common.experiment_base(arg)
    config.experiment = dict(
        kind="routed",
        title="Table 2: routed system vs generalist on all classes",
        description="One extracted specialist per group; the generalist's predicted class picks the specialist.",
        grid=dict(grouping=["lex", "semantic"], method=["extract"], seed=list(range(1 if arg.tiny else arg.seeds))),
        columns=["generalist_top1", "control_top1", "routed_top1", "gain_top1", "routing_accuracy"],
    )
    return config
