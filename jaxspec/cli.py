"""What every command line does before its work."""

import os

import jax
from absl import app

from jaxspec import sharding


def start(argv) -> None:
    """Rejects stray arguments, joins a multi-process run, and caches compiled steps on disk."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    sharding.initialize()
    # Compiling the train step takes tens of seconds on CPU; reruns and resumes reuse it.
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jaxspec/jax"))
