"""Paper Appendix A (Fig. 5b): head-only training of the full head on D_S; irrelevant classes fade.

python -m jaxspec.experiments --config=configs/experiments/forgetting.py --workdir=/tmp/forgetting
"""

import ml_collections

from configs.experiments import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, arg = base.classification(arg, group="animals")
    config.specialize.optim.lr = 1e-3  # only the head moves: a larger step shows the trend within the budget
    config.specialize.control = False
    config.experiment = dict(
        kind="forgetting",
        title="Forgetting of irrelevant classes (head-only training on D_S)",
        description="Mean bias and probability mass of the classes outside S while the full head trains on S.",
        grid=dict(group=[arg.group], seed=list(range(1 if arg.tiny else arg.seeds))),
        columns=[
            "start_irrelevant_prob",
            "end_irrelevant_prob",
            "start_irrelevant_bias",
            "end_irrelevant_bias",
            "end_relevant_bias",
        ],
    )
    config.eval.every_steps = max(1, config.specialize.steps // 20)
    return config
