r"""The two-time correlator, normalised as the beamline's correlator does it.

For one (q, φ) cell with frames ``I_p(t)`` at pixels ``p``::

    c2(t1, t2) = ⟨I_p(t1) I_p(t2)⟩_p / (⟨I_p(t1)⟩_p ⟨I_p(t2)⟩_p)

i.e. each frame is divided by its own cell-mean intensity, so a frame-wise change of the
incident intensity (beam drift) cancels. The result is a symmetric (n, n) matrix. Its
diagonal (``t1 = t2``) carries the photon shot-noise excess ``≈ 1/⟨I⟩`` and is not a
sample of the correlation function.

A frame whose cell-mean intensity is 0 (a dropped, all-zero frame) has no
normalisation: its row and column are NaN, as are those of a frame holding NaN. Other
frames are unaffected. Pure NumPy; no file I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def two_time(counts: np.ndarray) -> np.ndarray:
    """c2 of one cell from ``counts`` of shape (n_frames, n_pixels); returns (n, n) float64."""
    frames = np.asarray(counts, dtype=np.float64)
    if frames.ndim != 2 or frames.shape[0] < 1 or frames.shape[1] < 1:
        raise ValueError(
            f"counts must be a (n_frames, n_pixels) array with both sizes >= 1, "
            f"got shape {frames.shape}"
        )
    n_pixels = frames.shape[1]
    mean = frames.mean(axis=1)
    product = (frames @ frames.T) / n_pixels
    product = 0.5 * (product + product.T)  # exact symmetry whatever the BLAS order
    norm = np.outer(mean, mean)
    usable = (mean != 0) & np.isfinite(mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        c2 = product / norm
    c2[~usable, :] = np.nan
    c2[:, ~usable] = np.nan
    return c2


def two_time_cells(frames_by_cell: Mapping[Any, np.ndarray]) -> dict[Any, np.ndarray]:
    """:func:`two_time` of every cell: key -> (n, n), same keys and order."""
    return {key: two_time(counts) for key, counts in frames_by_cell.items()}
