"""The run configs the experiment grids build on: a classification or a detection main-job config, chosen
by the `:data=` argument, with the groupings the grids expand."""

from __future__ import annotations

import ml_collections

from configs import animals, cifar100_animals, coco_animals, common, detect_animals, imagenet_animals


def classification(arg: str | None, **defaults) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """The run config an experiment grid builds on, and the parsed config-path argument.

    `data=embedded` (default; `tiny` for tests), `data=cifar100` or
    `data=imagenet` (the real recipes; not run in CI); `seeds=N`.
    """
    arg = common.parse_arg(arg, **{"data": "embedded", "tiny": False, "seeds": 3, **defaults})
    bases = {
        "embedded": lambda: animals.get_config("tiny" if arg.tiny else None),
        "cifar100": cifar100_animals.get_config,
        "imagenet": imagenet_animals.get_config,
    }
    if arg.data not in bases:
        raise ValueError(f"Unknown data={arg.data!r}; choose one of {sorted(bases)}")
    config = bases[arg.data]()
    lex_k = {"embedded": 5, "cifar100": 5, "imagenet": 5}[arg.data]  # Table 1: 5 x 200 on ImageNet
    config.groupings = dict(
        lex=common.grouping("lexicographic", k=lex_k),
        semantic=common.grouping("semantic"),
        random=common.grouping("random"),
    )  # random: the semantic groups' sizes
    return config, arg


def detection(arg: str | None, **defaults) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """The run config a detection experiment grid builds on, and the parsed config-path argument.

    `data=embedded` (default; `full` for the results recipe, `tiny` for tests) or `data=coco`
    (`configs/coco_animals.py`, the paper's recipe; not run in CI); `seeds=N`. `arg.subset` is the
    specialization group of the chosen data.
    """
    arg = common.parse_arg(arg, data="embedded", tiny=False, full=False, seeds=3, **defaults)
    if arg.data == "embedded":
        config = detect_animals.get_config(f"tiny={arg.tiny},full={arg.full}")
    elif arg.data == "coco":
        config = coco_animals.get_config()
    else:
        raise ValueError(f"Unknown data={arg.data!r}; choose one of ['coco', 'embedded']")
    arg.subset = config.specialize.subset
    return config, arg
