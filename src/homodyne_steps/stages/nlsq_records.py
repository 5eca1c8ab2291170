"""The records the ``nlsq`` stage writes: parameters.json, analysis_results_nlsq.json,
convergence_metrics.json (and fitted_data.npz through :mod:`homodyne_steps.io.fitted_io`)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from homodyne_steps import __version__
from homodyne_steps.inference.intervals import valley_intervals
from homodyne_steps.inference.nlsq_fit import NlsqOutcome
from homodyne_steps.inference.noise import noise_scale_record, summary
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.io.fitted_io import write_fitted_data
from homodyne_steps.io.nlsq_files import (
    AngleScaling,
    NamedMatrix,
    NlsqConvergence,
    NlsqEstimate,
    NlsqParameters,
    ValueWithUncertainty,
)
from homodyne_steps.io.serialise import finite_or_none, write_json
from homodyne_steps.physics.registry import REGISTRY, Registry

SCHEMA_VERSION = 1  # of the three JSON records


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------
def scaling_flags(
    contrast: np.ndarray, offset: np.ndarray, registry: Registry = REGISTRY
) -> list[list[dict[str, Any]]]:
    """Per angle, the scaling values outside their physical range.

    Contrast must be > 0 (a zero or negative contrast means c2 does not decay as g1²
    does: no signal, or c2 rising with lag) and within the registry bounds; the offset
    within its registry bounds. varpro solves both without bounds, so this is where an
    unphysical value is caught; the fit itself is not changed.
    """
    (c_lo, c_hi), (o_lo, o_hi) = registry["contrast"].bounds, registry["offset"].bounds
    c_allowed = f"(0, {c_hi:g}]" if c_lo <= 0 else f"[{c_lo:g}, {c_hi:g}]"
    out = []
    for c, o in zip(np.asarray(contrast, float), np.asarray(offset, float), strict=True):
        flags = []
        if not (c > 0 and c_lo <= c <= c_hi):
            flags.append({"flag": "contrast_out_of_range", "value": finite_or_none(c),
                          "allowed": c_allowed})  # fmt: skip
        if not o_lo <= o <= o_hi:
            flags.append({"flag": "offset_out_of_range", "value": finite_or_none(o),
                          "allowed": f"[{o_lo:g}, {o_hi:g}]"})  # fmt: skip
        out.append(flags)
    return out


def quality_flag(out: NlsqOutcome, registry: Registry = REGISTRY) -> str:
    """poor unless converged; good only with χ²_red in [0.8, 1.25], no parameter at a
    bound or weakly identified and every angle's contrast and offset in range; warning
    otherwise."""
    r = out.result
    if not r.converged:
        return "poor"
    in_range = not any(scaling_flags(r.contrast, r.offset, registry))
    sound = not np.any(r.at_lower | r.at_upper) and not r.weakly_identified
    if in_range and 0.8 <= r.reduced_chi_squared <= 1.25 and sound:
        return "good"
    return "warning"


def uncertainty_convention(used: dict[str, Any]) -> str:
    """How the record's σ were computed (``nlsq.uncertainty``)."""
    if used.get("method") == "speckle":
        return (
            "sqrt(diag(H⁻¹ M H⁻¹)) at the optimum: the sandwich with the speckle noise model "
            "(noise shared through frames; levels fitted to the residuals), σ from data"
        )
    plain = "sqrt(diag((JᵀJ)⁻¹ · χ²_red)) at the optimum, σ from data"
    if "fallback" in used:  # auto, and the speckle model did not describe the data
        return f"{plain} (independent noise: {used['fallback']})"
    return plain


def parameters_record(out: NlsqOutcome, registry: Registry = REGISTRY) -> NlsqParameters:
    r = out.result
    p = len(out.names)
    intervals = (
        valley_intervals(
            out.names, r.physical, r.covariance_x[:p, :p], out.times_s, *registry.bounds(out.names)
        )  # fmt: skip
        if out.times_s is not None
        else {}
    )
    c_unc = np.sqrt(np.abs(np.diag(r.covariance)))[p : p + out.phi_deg.size]
    o_unc = np.sqrt(np.abs(np.diag(r.covariance)))[p + out.phi_deg.size :]
    flags = scaling_flags(r.contrast, r.offset, registry)
    return NlsqParameters(
        schema_version=SCHEMA_VERSION,
        analysis_mode=out.mode,
        model=out.model.to_mapping(),
        parameters={
            name: NlsqEstimate(
                value=float(r.physical[k]),
                uncertainty=finite_or_none(out.uncertainties[k]),
                unit=registry[name].unit,
                at_bound=bool(r.at_lower[k] or r.at_upper[k]),
                fixed=bool(not r.free[k]),
                identified=name not in r.not_identified,
                weakly_identified=name in r.weakly_identified,
                interval_68=_interval(intervals, name, "68"),
                interval_95=_interval(intervals, name, "95"),
            )
            for k, name in enumerate(out.names)
        },
        per_angle=[
            AngleScaling(
                phi_deg=float(out.phi_deg[k]),
                contrast=ValueWithUncertainty(
                    value=float(r.contrast[k]), uncertainty=finite_or_none(c_unc[k])
                ),
                offset=ValueWithUncertainty(
                    value=float(r.offset[k]), uncertainty=finite_or_none(o_unc[k])
                ),
                chi_squared=float(out.chi2_per_angle[k]),
                flags=flags[k],
            )
            for k in range(out.phi_deg.size)
        ],
        per_angle_scaling=out.scaling_mode,
        chi_squared=r.chi_squared,
        reduced_chi_squared=r.reduced_chi_squared,
        degrees_of_freedom=r.dof,
        uncertainty_convention=uncertainty_convention(out.uncertainty),
        noise_scale=noise_scale_record(r.reduced_chi_squared),
        curvature_adjustment=out.uncertainty.get("curvature_adjustment"),
        covariance=NamedMatrix(
            names=list(out.names), matrix=_finite_or_null(r.covariance_x[:p, :p])
        ),
        convergence=NlsqConvergence(
            status=r.status,
            reason=r.reason,
            iterations=r.iterations,
            converged=r.converged,
            not_identified=list(r.not_identified),
            weakly_identified=list(r.weakly_identified),
        ),
    )


def _interval(intervals: dict, name: str, level: str) -> list[float] | None:
    return list(intervals[name][level]) if name in intervals else None


def _finite_or_null(matrix: np.ndarray) -> list[list[float | None]]:
    return [[finite_or_none(x) for x in row] for row in np.asarray(matrix)]


def write_outputs(
    out_dir: str | os.PathLike[str],
    out: NlsqOutcome,
    data: XpcsData,
    L: float,
    registry: Registry = REGISTRY,
) -> None:
    """The four output files into ``out_dir``; ``parameters.json`` last."""
    out_dir = Path(out_dir)
    r = out.result
    params = parameters_record(out, registry)
    analysis = analysis_record(out, data, L, registry)
    convergence = convergence_record(out, registry)
    write_fitted_data(out_dir / "fitted_data.npz", data, L, r.physical, r.contrast, r.offset,
                      out.sigma_lag, out.model)  # fmt: skip
    write_json(out_dir / "analysis_results_nlsq.json", analysis)
    write_json(out_dir / "convergence_metrics.json", convergence)
    params.write(out_dir / "parameters.json")  # last: the workflow's sentinel


def analysis_record(
    out: NlsqOutcome, data: XpcsData, L: float, registry: Registry = REGISTRY
) -> dict[str, Any]:
    """``analysis_results_nlsq.json``: fit quality, data, covariance and correlation."""
    r = out.result
    names = list(out.names)
    cov = r.covariance_x[: len(names), : len(names)]
    sd = np.sqrt(np.abs(np.diag(cov)))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(sd, sd)
    return {
        "schema_version": SCHEMA_VERSION,
        "method": "nlsq",
        "strategy": out.strategy,
        "analysis_mode": out.mode,
        "model": out.model.to_mapping(),
        "per_angle_scaling": out.scaling_mode,
        "fit_quality": {
            "chi_squared": r.chi_squared,
            "reduced_chi_squared": r.reduced_chi_squared,
            "degrees_of_freedom": r.dof,
            "quality_flag": quality_flag(out, registry),
        },
        "dataset_info": {
            "n_angles": data.n_phi,
            "n_time_points": data.n_t,
            "total_data_points": r.n_points,
            "q": data.q,
            "dt": data.dt,
            "L": L,
            "phi_deg": data.phi_angles_list.tolist(),
        },
        "optimization_summary": {
            "status": r.status,
            "iterations": r.iterations,
            "execution_time": out.timings.get("fit_s"),
            "start": out.start,
        },
        # null where undefined (a not_identified direction): 0 would claim "no correlation"
        "covariance": {"names": names, "matrix": _finite_or_null(cov)},
        "correlation": {"names": names, "matrix": _finite_or_null(corr)},
        "noise": {
            "method": "per-lag robust scatter along the age direction",
            **summary(out.sigma_lag),
        },
        "uncertainty": out.uncertainty,
        "stratification": out.diagnostics,
        "multistart": out.multistart,
        "sequential": out.per_angle_fits,
    }


def convergence_record(out: NlsqOutcome, registry: Registry = REGISTRY) -> dict[str, Any]:
    """``convergence_metrics.json``: how the solver got there, and on what machine."""
    import jax

    r = out.result
    return {
        "schema_version": SCHEMA_VERSION,
        "convergence": {
            "status": r.status,
            "reason": r.reason,
            "iterations": r.iterations,
            "value_passes": r.value_passes,
            "jacobian_passes": r.jacobian_passes,
            "execution_time": out.timings.get("fit_s"),
            "first_pass_time_incl_compile": r.timings.get("first_pass_s"),
            "chi_squared": r.chi_squared,
            "history": r.history,
        },
        "recovery_actions": [],
        "quality_flag": quality_flag(out, registry),
        "device_info": {
            "platform": jax.devices()[0].platform,
            "jax": jax.__version__,
            "python": platform.python_version(),
            "homodyne_steps": __version__,
        },
    }
