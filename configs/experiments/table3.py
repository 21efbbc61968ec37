"""Paper Table 3: semantic groups vs random groups of the same sizes (top-2 gains), plus scratch specialists.

python -m jaxspec.experiments --config=configs/experiments/table3.py --workdir=/tmp/table3
"""

import ml_collections

from configs.experiments import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, arg = base.classification(arg)
    config.experiment = dict(
        kind="specialize",
        title="Table 3: semantic vs random groups",
        description="Semantic groups are the dataset's own hierarchy; random groups have the same sizes.",
        grid=dict(
            group=["@semantic", "@random"],
            method=["extract", "scratch"],
            seed=list(range(1 if arg.tiny else arg.seeds)),
        ),
        columns=[
            "generalist_top1",
            "generalist_top2",
            "specialist_top1",
            "specialist_top2",
            "gain_top1",
            "gain_top2",
            "control_top2",
        ],
        curves=False,
    )
    return config
