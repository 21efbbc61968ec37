"""Test setup: 8 fake CPU devices, so sharding is exercised without accelerators,
and one persistent compilation cache, so identical steps compile once per session."""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The 8 fake devices are threads: on a loaded 2-core machine they can reach a collective far apart, and
# XLA:CPU aborts the whole process after 40 s by default. Notebook kernels and worker processes inherit this.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_cpu_collective_call_terminate_timeout_seconds=600"]).strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxspec-test-xla-cache"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
