"""Paper Table 4: generalist vs a detector trained from scratch on S vs specialized generalists.

python -m jaxspec.experiments --config=configs/experiments/table4.py --workdir=/tmp/table4
... table4.py:data=coco (YOLOv5m on COCO, the paper's recipe) | :tiny (tests) | :seeds=1
"""

import ml_collections

from configs.experiments import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, arg = base.detection(arg)
    config.specialize.control = True
    config.experiment = {
        "kind": "detect",
        "title": "Table 4: generalist vs scratch vs specialized detectors",
        "description": "All on S's test images; specialists by domain constraining with output suppression or "
        "head slicing; scratch trains a new detector on D_S with config.scratch.",
        "grid": {
            "group": [arg.subset],
            "method": ["slice"] if arg.tiny else ["scratch", "suppress", "slice"],
            "seed": list(range(1 if arg.tiny else arg.seeds)),
        },
        "columns": ["generalist_F", "control_F", "specialist_F", "dF", "dF_vs_control", "dmAP50_95"],
        "generalist_per_seed": True,
    }
    return config
