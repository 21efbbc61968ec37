"""Reproduction C3: fine semantic groups inside one source against random groups of the same size and source.

Each seed trains its own generalist; for every fine group (`tops`, `footwear`,
`livestock`, `wildlife`, `curved_digits`, `stroke_digits`) the `semantic` cell
specializes on the group itself and the `random` cell on a group of its size
drawn by the seed from the same source (`groupings.random_like`), both by
extraction and from random init (the paper's Table 3 columns), each beside the
generalist and the equal-length `continued` control on the same images.

  python -m jaxspec.experiments --config=configs/experiments/c3_semantic.py --workdir=/tmp/c3
  ... c3_semantic.py:tiny (tests) | :seeds=N
"""

import ml_collections

from configs.experiments import base

GROUPS = ["tops", "footwear", "livestock", "wildlife", "curved_digits", "stroke_digits"]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, arg = base.classification(arg, seeds=5)
    config.experiment = dict(
        kind="specialize",
        title="C3: fine semantic groups vs random groups of the same size and source",
        description="Specialists on a fine semantic group and on a random group of its size drawn from the same "
        "source (per seed); extracted from the seed's generalist, or trained from random init.",
        grid=dict(
            group=GROUPS[:2] if arg.tiny else GROUPS,
            draw=["semantic", "random"],
            method=["extract"] if arg.tiny else ["extract", "scratch"],
            seed=list(range(1 if arg.tiny else arg.seeds)),
        ),
        columns=["generalist_top1", "control_top1", "specialist_top1", "gain_top1", "gain_vs_control_top1"],
        generalist_per_seed=True,
        curves=False,
    )
    return config
