"""The one place that imports JAX for the package.

Every module that computes with JAX imports ``jax``/``jnp`` from here, so float64 is on
before the first array is created (the model is defined in float64; float32 loses the
slow decays of g1 at small q² D t).

The persistent compilation cache is on by default, so repeat runs and parallel shard
jobs skip compiling the same kernels: ``HOMODYNE_STEPS_JAX_CACHE`` names the directory
(default ``~/.cache/homodyne-steps/jax``); set it to ``off`` to disable.

The cache has a size limit (least recently used entries go first), which is also what
makes JAX lock it: without a limit JAX writes an entry in place and unlocked, and a job
that reads an entry another job is still writing can crash inside XLA (seen once with
concurrent test runs). The lock is ``filelock``'s; without that package the cache stays
off rather than unlocked.
"""

import os
from pathlib import Path

import jax

try:
    import filelock  # noqa: F401  (JAX's lock for a size-limited cache)
except ImportError:  # pragma: no cover - a declared dependency
    filelock = None

jax.config.update("jax_enable_x64", True)

CACHE_MAX_BYTES = 1 << 30  # a full test run writes ~50 MB


def cache_dir() -> Path | None:
    value = os.environ.get("HOMODYNE_STEPS_JAX_CACHE")
    if value is not None and value.strip().lower() in ("", "0", "off", "false", "none"):
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "homodyne-steps" / "jax"


def index_unlimited_entries(path: Path) -> int:
    """Give every entry written without a size limit (no ``-atime`` file: an older
    version of this package, or another tool sharing the directory) the access time JAX's
    eviction reads, its modification time; without it every later write fails. Returns
    how many were indexed."""
    count = 0
    for entry in path.glob("*-cache"):
        atime = entry.with_name(entry.name.removesuffix("-cache") + "-atime")
        if not atime.exists():
            try:
                atime.write_bytes(entry.stat().st_mtime_ns.to_bytes(8, "little"))
                count += 1
            except OSError:  # evicted meanwhile, or read-only: JAX then skips writing
                pass
    return count


_cache = cache_dir() if filelock is not None else None
if _cache is not None:
    try:
        _cache.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home on some clusters: compile every time instead
        _cache = None
if _cache is not None:
    index_unlimited_entries(_cache)
    # min sizes 0: small CPU programs are worth caching too (1.7 s -> 0.6 s measured)
    jax.config.update("jax_compilation_cache_dir", str(_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)

import jax.numpy as jnp  # noqa: E402

__all__ = ["jax", "jnp", "cache_dir", "index_unlimited_entries", "CACHE_MAX_BYTES"]
