"""The one place that imports JAX for the package.

Every module that computes with JAX imports ``jax``/``jnp`` from here, so float64 is on
before the first array is created (the model is defined in float64; float32 loses the
slow decays of g1 at small q² D t).
"""

import os

import jax

jax.config.update("jax_enable_x64", True)

_cache_dir = os.environ.get("HOMODYNE_STEPS_JAX_CACHE")
if _cache_dir:
    # Shared persistent compilation cache: repeat runs and parallel shard jobs skip
    # compiling the same kernels (min sizes 0 so small CPU programs are cached too).
    jax.config.update("jax_compilation_cache_dir", _cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import jax.numpy as jnp  # noqa: E402

__all__ = ["jax", "jnp"]
