"""Paper Table 5: gradual specialization (generalist -> animals -> horse) vs direct (generalist -> horse).

python -m jaxspec.experiments --config=configs/experiments/table5.py --workdir=/tmp/table5
... table5.py:data=coco | :tiny | :seeds=1
"""

import ml_collections

from configs.experiments import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, arg = base.detection(arg, target="horse")
    chain = f"{arg.subset}>{arg.target}"
    config.experiment = {
        "kind": "detect",
        "title": "Table 5: gradual specialization",
        "description": f"`{arg.target}` directly from the generalist vs through the `{arg.subset}` specialist "
        "(each stage domain constrained; the chain is `a>b`), at equal total steps.",
        "grid": {
            "group": [chain] if arg.tiny else [arg.target, chain],
            "method": [config.specialize.method],
            "seed": list(range(1 if arg.tiny else arg.seeds)),
        },
        "columns": ["generalist_F", "specialist_F", "dF", "specialist_mAP50", "specialist_mAP50_95"],
        "generalist_per_seed": True,
        "equal_steps": chain,  # direct `horse` trains as many steps as the chain's two stages
    }
    return config
