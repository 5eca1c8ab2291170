"""The CMC ``fitted_data.npz``: the model at the posterior mean, beside the data.

Physical parameters are the combined posterior means. The per-angle scaling is the
posterior mean where it was sampled; where it was integrated out (varpro) or derived,
it is the exact weighted least-squares scaling at the posterior-mean θ over all points
(the same conditional optimum the sampler marginalised around).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from homodyne_steps.dataset import XpcsData
from homodyne_steps.errors import DataError
from homodyne_steps.model import make_grid
from homodyne_steps.nlsq import accumulate, make_fit_data, optimal_scaling, stratified_blocks
from homodyne_steps.nlsq_stage import write_fitted_data
from homodyne_steps.registry import REGISTRY, canonical_mode
from homodyne_steps.serialise import read_json, read_npz


def write_cmc_fitted_data(out_dir: Path, qc_npz, nlsq_dir: Path, mode: str, L: float) -> Path:
    params = read_json(out_dir / "parameters.json")
    names = REGISTRY.physical_names(canonical_mode(mode))
    try:
        physical = np.array([params["parameters"][n]["mean"] for n in names], dtype=float)
    except (KeyError, TypeError):
        raise DataError(f"{out_dir / 'parameters.json'} lacks posterior means of {names}") from None
    data = XpcsData.from_npz(qc_npz)
    sigma_lag = read_npz(Path(nlsq_dir) / "fitted_data.npz", required=("sigma_per_lag",))[
        "sigma_per_lag"
    ]
    per_angle = params.get("per_angle") or []
    sampled = (
        len(per_angle) == data.n_phi
        and not any(row.get("derived") for row in per_angle)
        and all("contrast" in row and "offset" in row for row in per_angle)
    )
    if sampled:
        contrast = np.array([row["contrast"]["mean"] for row in per_angle], dtype=float)
        offset = np.array([row["offset"]["mean"] for row in per_angle], dtype=float)
    else:
        n_pairs = data.n_t * (data.n_t - 1) // 2
        grid = make_grid(data.t1, data.phi_angles_list, data.q, L, data.dt)
        st = accumulate(
            physical,
            grid,
            make_fit_data(data.c2_exp, sigma_lag),
            stratified_blocks(n_pairs, data.n_phi, 50_000),
            False,
        )
        contrast, offset = optimal_scaling(st)
    path = out_dir / "fitted_data.npz"
    write_fitted_data(path, data, L, physical, contrast, offset, sigma_lag)
    return path
