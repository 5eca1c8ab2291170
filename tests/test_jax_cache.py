"""The persistent compilation cache (``homodyne_steps._jax``): size-limited and locked.

Parallel shard jobs share the cache; JAX writes entries in place, and without a size
limit it takes no lock, so a job could read an entry another is still writing. Each
check runs in a fresh interpreter, since the cache is configured once, at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROGRAM = """
import json
from homodyne_steps._jax import CACHE_MAX_BYTES, jax, jnp
f = jax.jit(lambda x: jnp.sin(x) * 3.0 + x)
value = float(f(jnp.float64(0.5)))
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir,
                  "max_size": jax.config.jax_compilation_cache_max_size,
                  "limit": CACHE_MAX_BYTES, "value": value}))
"""


def _run(cache: str) -> dict:
    env = {**os.environ, "HOMODYNE_STEPS_JAX_CACHE": cache}
    # a failed cache write is only a warning: made an error here
    strict = "error:Error writing persistent compilation cache:UserWarning"
    out = subprocess.run([sys.executable, "-W", strict, "-c", PROGRAM], env=env,
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_is_size_limited_and_written_under_a_lock(tmp_path):
    cache = tmp_path / "jax"
    got = _run(str(cache))
    assert got["dir"] == str(cache)
    assert got["max_size"] == got["limit"] > 0
    names = os.listdir(cache)
    # an entry and its access time (kept only when eviction is on), and JAX's lock file
    assert any(n.endswith("-cache") for n in names), names
    assert any(n.endswith("-atime") for n in names), names
    assert ".lockfile" in names
    # a second process reads the entry back and computes the same
    assert _run(str(cache))["value"] == got["value"]


def test_cache_off_writes_nothing(tmp_path):
    got = _run("off")
    assert not got["dir"]
    assert got["value"] == _run(str(tmp_path / "jax"))["value"]


def test_entries_written_without_a_limit_do_not_block_writing(tmp_path):
    """An entry without its access-time file (written by a version without the limit)
    made every later write fail ("Error writing persistent compilation cache entry"):
    it is indexed at import, and the new program is written."""
    cache = tmp_path / "jax"
    cache.mkdir()
    (cache / "old-cache").write_bytes(b"an executable written without a size limit")
    _run(str(cache))  # warnings are errors in the child
    names = os.listdir(cache)
    assert "old-atime" in names
    assert any(n.startswith("jit__lambda") and n.endswith("-cache") for n in names), names
