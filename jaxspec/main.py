"""Command line: `python -m jaxspec.main --config=configs/animals.py --workdir=DIR`.

Overrides: `--config.specialize.steps=100`; an unknown key is an error.
"""

import os

import jax
from absl import app, flags
from ml_collections import config_flags

from jaxspec import sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and results.")
flags.mark_flags_as_required(["config", "workdir"])


def start(argv) -> None:
    """What every command does first: reject stray arguments, join the processes, cache compiles."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    sharding.initialize()
    # Compiling the train step takes tens of seconds on CPU; reruns and resumes reuse it.
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jaxspec/jax"))


def main(argv):
    start(argv)
    from jaxspec import run  # after initialize(): nothing may touch a backend before it

    run.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
