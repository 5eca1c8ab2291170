"""Kernel benchmark: full c2 view, and the pair function + Jacobian on the upper triangle.

Run: ``python bench/bench_kernel.py`` (reference laminar_flow case: 6 angles × 410 frames).
Prints compile time (first call) and the median of repeated calls after compilation.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from homodyne_steps._jax import jax, jnp
from homodyne_steps.physics.model import (
    c2_matrix,
    c2_pairs,
    c2_pairs_jacobian,
    compute_c2,
    make_grid,
    upper_triangle_pairs,
)
from homodyne_steps.physics.reference import REFERENCE_CASES, REFERENCE_GEOMETRY
from homodyne_steps.physics.registry import REGISTRY


def _timed(fn, repeat: int) -> tuple[float, float]:
    """(first call incl. compilation, median of ``repeat`` later calls), in seconds."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - start)
    return first, statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()

    case = REFERENCE_CASES["laminar_flow"]
    g = REFERENCE_GEOMETRY
    n_t = args.frames or case["n_frames"]
    phi = np.asarray(case["phi_deg"])
    t = g["dt"] * np.arange(n_t)
    _, p = REGISTRY.physical_vector(case["params"])
    grid = make_grid(t, phi, g["q"], g["L"])
    contrast = jnp.full(phi.size, g["contrast"])
    offset = jnp.full(phi.size, g["offset"])
    i, j, a = (jnp.asarray(x) for x in upper_triangle_pairs(n_t, phi.size))
    pj = jnp.asarray(p)

    rows = [
        ("compute_c2 (NumPy API, full matrices)",
         lambda: compute_c2(case["params"], t=t, phi_deg=phi, q=g["q"], L=g["L"],
                            contrast=g["contrast"], offset=g["offset"]),
         f"{phi.size}x{n_t}x{n_t}"),
        ("c2_matrix (jitted, full matrices)",
         lambda: c2_matrix(pj, contrast, offset, grid), f"{phi.size}x{n_t}x{n_t}"),
        ("c2_pairs (upper triangle)",
         lambda: c2_pairs(pj, contrast, offset, grid, i, j, a), f"{i.size} points"),
        ("c2_pairs_jacobian (value + jacfwd, 7 params)",
         lambda: c2_pairs_jacobian(pj, contrast, offset, grid, i, j, a), f"{i.size} points"),
    ]  # fmt: skip
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, float64")
    print(f"{'function':46s} {'size':>18s} {'first call [s]':>15s} {'after compile [ms]':>19s}")
    for name, fn, size in rows:
        first, median = _timed(fn, args.repeat)
        print(f"{name:46s} {size:>18s} {first:15.3f} {1e3 * median:19.2f}")


if __name__ == "__main__":
    main()
