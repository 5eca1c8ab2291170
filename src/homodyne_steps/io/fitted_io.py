"""``fitted_data.npz``: the model at fitted parameters, beside the data (seed §9 keys).

Written by the NLSQ stage (at the fit) and by the CMC combination (at the posterior
mean, :mod:`cmc_fitted`); the NLSQ plots read it, and the CMC shards read its noise
model ``sigma_per_lag``.
"""

from __future__ import annotations

import os

import numpy as np

from homodyne_steps._jax import jnp
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.io.serialise import write_npz
from homodyne_steps.physics.model import c2_matrix, make_grid
from homodyne_steps.physics.model_settings import ModelSettings


def write_fitted_data(
    path: str | os.PathLike[str],
    data: XpcsData,
    L: float,
    physical: np.ndarray,
    contrast: np.ndarray,
    offset: np.ndarray,
    sigma_lag: np.ndarray,
    model: ModelSettings | None = None,
) -> None:
    """The model at ``physical`` with per-angle scaling, beside the data (seed §9 keys).

    ``c2_theoretical_raw`` is g1² (contrast 1, offset 0); ``residuals_normalized`` uses
    the fit's noise model σ(angle, lag). Large arrays are produced one at a time.
    """
    model = model or ModelSettings()
    grid = make_grid(data.t1, data.phi_angles_list, data.q, L, data.dt, **model.to_mapping())
    ones = jnp.ones(data.n_phi)
    c2_raw = np.asarray(c2_matrix(jnp.asarray(physical), ones, 0.0 * ones, grid))  # g1²
    lag = np.abs(np.arange(data.n_t)[:, None] - np.arange(data.n_t)[None, :])
    contrast, offset = np.asarray(contrast, float), np.asarray(offset, float)

    def scaled() -> np.ndarray:
        return offset[:, None, None] + contrast[:, None, None] * c2_raw

    def normalized() -> np.ndarray:
        return (data.c2_exp - scaled()) / sigma_lag[:, lag]

    write_npz(
        path,
        phi_angles=data.phi_angles_list,
        c2_exp=data.c2_exp,
        c2_theoretical_raw=c2_raw,
        c2_theoretical_scaled=scaled,
        per_angle_scaling=np.stack([contrast, offset], axis=1),
        residuals=lambda: data.c2_exp - scaled(),
        residuals_normalized=normalized,
        sigma_per_lag=sigma_lag,
        t1=data.t1,
        t2=data.t2,
        q=np.array([data.q]),
    )
