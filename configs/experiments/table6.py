"""Paper Table 6: the specialization gain dF for every superclass, and its average.

python -m jaxspec.experiments --config=configs/experiments/table6.py --workdir=/tmp/table6
... table6.py:data=coco (the 12 COCO supercategories) | :tiny | :seeds=1
"""

import ml_collections

from configs.experiments import base
from jaxspec.detection.data import COCO_SUPERCATEGORIES

EMBEDDED_SUPERCLASSES = ["animals", "clothing", "digits"]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, arg = base.detection(arg)
    groups = list(COCO_SUPERCATEGORIES) if arg.data == "coco" else EMBEDDED_SUPERCLASSES
    config.experiment = {
        "kind": "detect",
        "title": "Table 6: specialization gain per superclass",
        "description": "One specialist per superclass from the same generalist; dF = F(specialist) - F(generalist) "
        "on the superclass's test images.",
        "grid": {
            "group": groups[:2] if arg.tiny else groups,
            "method": [config.specialize.method],
            "seed": list(range(1 if arg.tiny else arg.seeds)),
        },
        "columns": ["generalist_F", "specialist_F", "dF", "dmAP50", "dmAP50_95"],
        "bars": True,
    }
    return config
