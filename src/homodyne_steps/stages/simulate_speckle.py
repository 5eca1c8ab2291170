"""Two-time bins made the way an experiment makes them: speckle frames, then a correlator.

:func:`speckle_bins` runs the particle/pixel/photon simulator of
:mod:`homodyne_steps.physics.speckle` and the beamline-normalised correlator of
:mod:`homodyne_steps.data.correlator` on every (ring, sector) cell, and returns the
bins for :func:`homodyne_steps.io.aps_writer.write_aps_file` with a truth record. One C2
step is one frame (no averaging or striding). Frames listed as dropped are all-zero
frames; their rows and columns of C2 are NaN, as a real correlator's division by a zero
mean makes them, and are written as such.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from homodyne_steps import __version__
from homodyne_steps.data.correlator import two_time_cells
from homodyne_steps.io.aps_writer import TwoTimeBins
from homodyne_steps.physics.speckle import SpeckleSettings, speckle_frames

SHEAR_FORM_OF_GAP = {"uniform": "physical", "triangular": "homodyne"}


def speckle_bins(settings: SpeckleSettings) -> tuple[TwoTimeBins, dict[str, Any]]:
    """Simulate frames, correlate every cell; return the bins and the truth record.

    The truth's ``model`` names the c2 form the data follow: ``shear`` is ``physical``
    (``sinc²((qL/2) cos(φ0-φ) ∫γ̇)``) for a uniform gap and ``homodyne`` (the seed's
    ``sinc⁴((qL/2π) cos(φ0-φ) ∫γ̇)``) for the triangular one; ``integral`` is ``exact``
    (closed-form integrals of the power laws, not the trapezoid). ``contrast`` is the
    ensemble contrast ``Σ N_m(N_m-1)/N² ≈ 1/n_modes`` and ``offset`` is 1; a correlator
    over ``pixels_per_cell`` pixels reads ``c2 - 1`` about ``(1 + 2β - c)/P`` low
    (:func:`homodyne_steps.physics.speckle.expected_c2`, ``pixel_bias``).
    """
    s = settings
    c2 = two_time_cells(speckle_frames(s))
    q = np.asarray(s.q_centres, dtype=np.float64)
    phi = np.asarray(s.phi_centres, dtype=np.float64)
    bins = TwoTimeBins(
        q_centres=q,
        phi_centres=phi,
        c2=c2,
        frame_time_s=float(s.dt),
        avg_frames=1,
        stride_frames=1,
    )
    truth = {
        "method": "speckle",
        "params": {name: float(value) for name, value in s.params.items()},
        "analysis_mode": s.mode,
        "model": {"shear": SHEAR_FORM_OF_GAP[s.gap], "integral": "exact"},
        "contrast": s.contrast,
        "offset": 1.0,
        "q_rings": q.tolist(),
        "phi_deg": phi.tolist(),
        "L": float(s.L),
        "dt": bins.dt,
        "n_frames": int(s.n_frames),
        "frame_time": bins.frame_time_s,
        "avg_frames": 1,
        "stride_frames": 1,
        "dropped_frames": list(s.dropped_frames),
        "box": s.box,
        "seed": int(s.seed),
        "settings": s.as_dict(),
        "generator": f"homodyne-steps {__version__} (speckle)",
    }
    return bins, truth
