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
        description="Mean bias and probability mass of the classes outside S while the full head trains on S, "
        "the body frozen (train=head) or not (train=full).",
        # head-only training against the whole network trained the same way; with label smoothing 0 as well,
        # whose target puts no floor under the irrelevant mass (reproduction C5)
        grid=dict(
            group=[arg.group],
            train=["head", "full"],
            label_smoothing=[0.0] if arg.tiny else [0.1, 0.0],
            seed=list(range(1 if arg.tiny else arg.seeds)),
        ),
        columns=[
            "start_irrelevant_prob",
            "end_irrelevant_prob",
            "end_test_irrelevant_prob",
            "start_irrelevant_bias",
            "end_irrelevant_bias",
            "end_relevant_bias",
        ],
        generalist_per_seed=True,
    )
    config.eval.every_steps = max(1, config.specialize.steps // 20)
    return config
