"""Command line: `python -m jaxspec.main --config=configs/animals.py --workdir=DIR`.

Overrides: `--config.specialize.steps=100`; an unknown key is an error.
"""

from absl import flags
from ml_collections import config_flags

from jaxspec.cli import config_help, run_main, start

_CONFIG = config_flags.DEFINE_config_file("config", None, config_help(), lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    start(argv)
    # Imported after initialize(): nothing may touch a backend before it.
    if _CONFIG.value.get("task") == "detect":
        from jaxspec.detection import run
    else:
        from jaxspec import run

    run.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    run_main(main)
