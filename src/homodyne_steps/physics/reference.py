"""Reference cases of ``shared/spec/physics.md``: used by the simulator, tests, benchmarks.

A light module (no JAX, no h5py) so the command line can show these defaults cheaply.
"""

from typing import Any

from homodyne_steps.physics.registry import LAMINAR_FLOW, STATIC

REFERENCE_GEOMETRY = {"q": 0.0054, "L": 2e6, "dt": 0.1, "contrast": 0.3, "offset": 1.0,
                      "noise": 0.01}  # fmt: skip
REFERENCE_CASES: dict[str, dict[str, Any]] = {
    STATIC: {
        "params": {"D0": 1e4, "alpha": -0.3, "D_offset": 1e3},
        "phi_deg": (0.0, 45.0, 90.0),
        "n_frames": 200,
    },
    LAMINAR_FLOW: {
        "params": {"D0": 1e4, "alpha": -0.2, "D_offset": 500.0, "gamma_dot_t0": 2e-4,
                   "beta": 0.25, "gamma_dot_t_offset": 2e-5, "phi0": 3.0},
        "phi_deg": (-30.0, 0.0, 30.0, 60.0, 90.0, 120.0),
        "n_frames": 410,
    },
}  # fmt: skip
