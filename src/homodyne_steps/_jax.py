"""The one place that imports JAX for the package.

Every module that computes with JAX imports ``jax``/``jnp`` from here, so float64 is on
before the first array is created (the model is defined in float64; float32 loses the
slow decays of g1 at small q² D t).

The persistent compilation cache is on by default, so repeat runs and parallel shard
jobs skip compiling the same kernels: ``HOMODYNE_STEPS_JAX_CACHE`` names the directory
(default ``~/.cache/homodyne-steps/jax``); set it to ``off`` to disable.

Jobs share it without a lock: JAX writes an entry in place, but compresses it with a
checksum, so a job that reads an entry another is still writing fails to decompress it,
warns and compiles afresh (``tests/test_jax_cache.py``). A size limit would make JAX lock
the cache, at the price of a scan of every entry on each write (measured: 60 ms per new
program with the 2900 entries of one test run, twice the cost of compiling it).
"""

import os
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)


def cache_dir() -> Path | None:
    value = os.environ.get("HOMODYNE_STEPS_JAX_CACHE")
    if value is not None and value.strip().lower() in ("", "0", "off", "false", "none"):
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "homodyne-steps" / "jax"


_cache = cache_dir()
if _cache is not None:
    try:
        _cache.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home on some clusters: compile every time instead
        _cache = None
if _cache is not None:
    # min sizes 0: small CPU programs are worth caching too (1.7 s -> 0.6 s measured)
    jax.config.update("jax_compilation_cache_dir", str(_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import jax.numpy as jnp  # noqa: E402

__all__ = ["jax", "jnp", "cache_dir"]
