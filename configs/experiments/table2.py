"""Paper Table 2: the dynamically configured system (generalist routes, group specialist decides) vs the generalist.

python -m jaxspec.experiments --config=configs/experiments/table2.py --workdir=/tmp/table2
"""

import ml_collections

from configs import common
from configs.experiments import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, arg = base.classification(arg)
    config.experiment = dict(
        kind="routed",
        title="Table 2: routed system vs generalist on all classes",
        description="One extracted specialist per group; the generalist's predicted class picks the specialist. "
        "Groupings: lexicographic, semantic, and Hinton-style clusters of the classes the generalist "
        "confuses on validation data.",
        grid=dict(
            grouping=["lex", "semantic", "confusion"],
            method=["extract"],
            seed=list(range(1 if arg.tiny else arg.seeds)),
        ),
        columns=["generalist_top1", "control_top1", "routed_top1", "gain_top1", "routing_accuracy"],
        generalist_per_seed=True,  # seeds replicate the whole pipeline (reproduction C2)
    )
    config.groupings.confusion = common.grouping("confusion", k=3)  # as many groups as the semantic ones
    return config
