"""Command line: `python -m jaxspec.experiments --config=configs/experiments/table1.py --workdir=DIR`.

Runs the config's grid of cells (see `jaxspec.experiments.grid`); rerunning on
the same workdir skips finished cells. Overrides as for `jaxspec.main`.
"""

from absl import flags
from ml_collections import config_flags

from jaxspec.cli import config_help, run_main, start

_CONFIG = config_flags.DEFINE_config_file("config", None, config_help(), lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, cell results and the report.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    start(argv)
    from jaxspec.experiments import grid  # after initialize(): nothing may touch a backend before it

    grid.run_grid(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    run_main(main)
