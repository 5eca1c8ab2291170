"""The CMC ``fitted_data.npz``: the model at the posterior mean, beside the data.

Physical parameters are the combined posterior means. The per-angle scaling is the
posterior mean where it was sampled; where it was integrated out (varpro) or derived,
it is the exact weighted least-squares scaling at the posterior-mean θ over all points
(the same conditional optimum the sampler marginalised around).

:func:`cmc_fitted_model` computes it from the stage's ``parameters.json`` record
(:class:`~homodyne_steps.io.cmc_files.CmcParameters`, in memory, before any file is
written); :meth:`FittedModel.write` writes the file
(:func:`fitted_io.write_fitted_data`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from homodyne_steps.errors import DataError
from homodyne_steps.inference.likelihood import (
    accumulate,
    make_fit_data,
    optimal_scaling,
    stratified_blocks,
)
from homodyne_steps.io.cmc_files import AnglePosterior, CmcParameters
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.io.fitted_io import write_fitted_data
from homodyne_steps.io.record import ABSENT
from homodyne_steps.io.serialise import read_npz
from homodyne_steps.physics.model import make_grid
from homodyne_steps.physics.model_settings import ModelSettings
from homodyne_steps.physics.registry import REGISTRY, canonical_mode


@dataclass(frozen=True)
class FittedInputs:
    """What the CMC fitted data needs beyond the posterior: the QC'd data, the NLSQ
    ``fitted_data.npz`` (it holds the noise model σ(angle, lag)), the dataset's analysis
    mode and gap L."""

    qc_npz: str | os.PathLike[str]
    nlsq_fitted: str | os.PathLike[str]
    analysis_mode: str
    L: float
    model: ModelSettings = field(default_factory=ModelSettings)


@dataclass
class FittedModel:
    """The model's inputs at the posterior mean, ready to be written."""

    data: XpcsData
    L: float
    physical: np.ndarray
    contrast: np.ndarray
    offset: np.ndarray
    sigma_lag: np.ndarray
    model: ModelSettings = field(default_factory=ModelSettings)

    def write(self, path: str | os.PathLike[str]) -> Path:
        write_fitted_data(path, self.data, self.L, self.physical, self.contrast, self.offset,
                          self.sigma_lag, self.model)  # fmt: skip
        return Path(path)


def _sampled_scaling(per_angle: Sequence[AnglePosterior], n_phi: int) -> bool:
    """Whether the record holds a sampled posterior mean of contrast and offset per angle."""
    return (
        len(per_angle) == n_phi
        and not any(row.derived for row in per_angle)
        and all(row.contrast is not ABSENT and row.offset is not ABSENT for row in per_angle)
    )


def cmc_fitted_model(
    params: CmcParameters, inputs: FittedInputs, params_path: str | os.PathLike[str]
) -> FittedModel:
    """The model at the posterior means of ``params`` (the CMC ``parameters.json`` record,
    to be written at ``params_path``)."""
    mode, L = inputs.analysis_mode, inputs.L
    names = REGISTRY.physical_names(canonical_mode(mode))
    try:
        physical = np.array([params.parameters[n].mean for n in names], dtype=float)
    except KeyError:
        raise DataError(f"{Path(params_path)} lacks posterior means of {names}") from None
    data = XpcsData.from_npz(inputs.qc_npz)
    sigma_lag = read_npz(inputs.nlsq_fitted, required=("sigma_per_lag",))["sigma_per_lag"]
    per_angle = params.per_angle or []
    if _sampled_scaling(per_angle, data.n_phi):
        contrast = np.array([row.contrast.mean for row in per_angle], dtype=float)
        offset = np.array([row.offset.mean for row in per_angle], dtype=float)
    else:
        n_pairs = data.n_t * (data.n_t - 1) // 2
        grid = make_grid(
            data.t1, data.phi_angles_list, data.q, L, data.dt, **inputs.model.to_mapping()
        )
        st = accumulate(
            physical,
            grid,
            make_fit_data(data.c2_exp, sigma_lag),
            stratified_blocks(n_pairs, data.n_phi, 50_000),
            False,
        )
        contrast, offset = optimal_scaling(st)
    return FittedModel(data, L, physical, contrast, offset, sigma_lag, inputs.model)
