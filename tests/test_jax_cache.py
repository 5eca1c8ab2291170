"""The persistent compilation cache (``homodyne_steps._jax``) survives a damaged entry.

Parallel shard jobs share the cache and JAX writes an entry in place, so a job could
read one another job is still writing. JAX compresses entries (zlib or zstd, both
checksummed), so a partial entry fails to decompress, JAX warns and compiles afresh:
checked here on entries cut to half their length. Each run is a fresh interpreter, since
the cache is configured once, at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROGRAM = """
import json
from homodyne_steps._jax import jax, jnp
f = jax.jit(lambda x: jnp.sin(x) * 3.0 + x)
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir,
                  "value": float(f(jnp.float64(0.5)))}))
"""


def _run(cache: str) -> tuple[dict, str]:
    env = {**os.environ, "HOMODYNE_STEPS_JAX_CACHE": cache}
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True,
                         text=True, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_a_partly_written_entry_is_compiled_afresh(tmp_path):
    cache = tmp_path / "jax"
    first, _ = _run(str(cache))
    assert first["dir"] == str(cache)
    entries = [p for p in cache.iterdir() if p.name.endswith("-cache")]
    assert entries
    for p in entries:  # as a reader would find them mid-write
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    second, stderr = _run(str(cache))
    assert second["value"] == first["value"]
    assert "Error reading persistent compilation cache entry" in stderr


def test_cache_off_writes_nothing(tmp_path):
    got, _ = _run("off")
    assert not got["dir"]
    assert got["value"] == _run(str(tmp_path / "jax"))[0]["value"]
