"""jaxspec: task specialization in JAX/Flax NNX. `jaxspec.predict(model_dir, images)` applies a saved model."""

from jaxspec.predict import predict  # noqa: F401
