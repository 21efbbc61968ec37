"""Reproduction C1, first step: the specialist's length x learning rate x BatchNorm statistics on animals.

The grid is fixed here, before any run, and reported whole. Each seed trains
its own generalist; every setting is compared with the `continued` control of
the same length, learning rate and statistics, from the same generalist, on
the same images. Every model is also scored on the validation split, where one
setting is chosen for the >= 5-seed runs (never on test).

  python -m jaxspec.experiments --config=configs/experiments/c1_sweep.py --workdir=/tmp/c1_sweep
  ... c1_sweep.py:tiny (tests)
"""

import ml_collections

from configs import animals, common
from configs.experiments import base

EPOCHS = (10, 30, 100)  # of D_S; the paper tunes for a third of the generalist's epochs
LRS = (1e-4, 3e-5)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, arg = base.classification(arg)
    batch = config.specialize.batch_size
    steps = [4, 8] if arg.tiny else [common.steps_for(e, animals.SUBSET_EXAMPLES, batch) for e in EPOCHS]
    config.experiment = dict(
        kind="specialize",
        title="C1 sweep: specialist length x lr x BatchNorm statistics (animals)",
        description=f"Extracted animals specialists fine-tuned for {list(EPOCHS)} epochs of D_S ({steps} steps) at "
        f"lr {list(LRS)}, BatchNorm statistics updated or frozen; each against its equal-length control.",
        grid=dict(
            group=["animals"],
            method=["extract"],
            steps=steps,
            lr=list(LRS),
            freeze_bn_stats=[False, True],
            seed=list(range(1 if arg.tiny else arg.seeds)),
        ),
        columns=[
            "generalist_top1",
            "control_top1",
            "specialist_top1",
            "gain_vs_control_top1",
            "gain_vs_control_val_top1",
        ],
        generalist_per_seed=True,
        validation=True,
        curves=False,
    )
    return config
