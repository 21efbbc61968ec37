"""Reproduction C6 (paper Fig. 3): same-layer CKA between each seed's generalist and its animals specialist.

python -m jaxspec.experiments --config=configs/experiments/c6_cka.py --workdir=/tmp/c6
... c6_cka.py:tiny (tests) | :seeds=N | :group=NAME
"""

import ml_collections

from configs.experiments import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, arg = base.classification(arg, group="animals")
    config.experiment = dict(
        kind="cka",
        title="C6: generalist-specialist similarity by layer",
        description="Minibatch linear CKA of each layer of the seed's generalist with the same layer of its "
        "extracted, fine-tuned specialist, on S's test images; cka_drop = first layer - pre_logits.",
        grid=dict(group=[arg.group], method=["extract"], seed=list(range(1 if arg.tiny else arg.seeds))),
        columns=["cka_stem", "cka_last_conv", "cka_pre_logits", "cka_drop"],
        generalist_per_seed=True,
    )
    return config
