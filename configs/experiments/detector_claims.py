"""The paper's detector claims C7 (Table 4) and C8 (Table 5) as one grid, so that both rest on the same
per-seed generalists (each ~70 minutes at `:full` on 2 CPU cores) instead of training them twice.

C7: on animals, clothing and digits, the specialist by domain constraining with output suppression (and head
slicing) against the generalist restricted to S and the `continued` control; the detector trained from scratch
on D_S on animals only (it costs as much as a generalist). C8: `animals>horse` against direct `horse` at equal
total steps.

  python -m jaxspec.experiments --config=configs/experiments/detector_claims.py:full --workdir=/tmp/claims
  ... :tiny (tests) | :seeds=N
"""

import ml_collections

from configs.experiments import base

GROUPS = ["animals", "clothing", "digits"]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, arg = base.detection(arg, target="horse")
    config.specialize.control = True
    chain = f"{arg.subset}>{arg.target}"
    config.experiment = {
        "kind": "detect",
        "title": "C7 and C8: specialized detectors against the generalist, the control and scratch; gradual "
        "against direct",
        "description": "Per seed one generalist; on its test images per group: the generalist restricted to S, "
        "the `continued` control, the specialist (suppress or slice) and, on animals, a detector trained from "
        f"scratch on D_S; `{chain}` against direct `{arg.target}` at equal total steps.",
        "grid": {
            "group": [*GROUPS, arg.target, chain],
            "method": ["suppress", "slice", "scratch"],
            "seed": list(range(1 if arg.tiny else arg.seeds)),
        },
        "exclude": [
            {"method": "scratch", "group": [g for g in GROUPS if g != arg.subset] + [arg.target, chain]},
            {"method": "slice", "group": [arg.target, chain]},
        ],
        "columns": ["generalist_F", "control_F", "specialist_F", "dF", "dF_vs_control", "dmAP50_95"],
        "generalist_per_seed": True,
        "equal_steps": chain,
    }
    return config
