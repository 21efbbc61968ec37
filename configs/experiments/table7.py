"""Paper Table 7: which layers to freeze while specializing (YOLOv5 layer indices), with and without
frozen BatchNorm statistics. Paired as Tables 4 and 5: one generalist per seed (at `:full` the same
generalists as `detector_claims.py:full`, whose checkpoints a Table 7 workdir can start from) and the
`continued` control per seed.

  python -m jaxspec.experiments --config=configs/experiments/table7.py --workdir=/tmp/table7
  ... table7.py:data=coco | :tiny | :seeds=1
"""

import ml_collections

from configs.experiments import base

# none, backbone (0-9), the first neck layers (10-12), the whole neck (10-23), everything but the head
FREEZE = ["", "layers:0-9", "layers:10-12", "layers:10-23", "layers:0-23"]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, arg = base.detection(arg)
    config.specialize.control = True
    config.experiment = {
        "kind": "detect",
        "title": "Table 7: freezing while specializing",
        "description": "`freeze` lists frozen YOLOv5 layers; `freeze_bn_stats` keeps BatchNorm's running statistics.",
        "grid": {
            "group": [arg.subset],
            "method": [config.specialize.method],
            "freeze": ["layers:10-12"] if arg.tiny else FREEZE,
            "freeze_bn_stats": [True] if arg.tiny else [False, True],
            "seed": list(range(1 if arg.tiny else arg.seeds)),
        },
        "columns": ["generalist_F", "control_F", "specialist_F", "dF", "dF_vs_control", "specialist_mAP50_95"],
        "generalist_per_seed": True,
    }
    return config
