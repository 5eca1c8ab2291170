"""The records of the CMC combination stage, built in memory from one combined run.

One function per output: :func:`parameters_record` (``parameters.json``, the sentinel),
:func:`analysis_record` (``analysis_results_cmc.json``), :func:`diagnostics_record`
(``diagnostics.json``), :func:`combination_report` (``combination_report.json``),
:func:`samples_arrays` (``samples.npz``) and :func:`combined_idata` (``posterior.nc``).
Nothing here writes a file (:mod:`cmc_combine` does). The JSON ones are typed records
(:mod:`homodyne_steps.io.cmc_files`), built from the values as they are written: JSON
never holds NaN, an undefined number (R-hat of one chain, say) is ``null``
(``to_jsonable(..., null_non_finite=True)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from homodyne_steps.inference.cmc_diagnostics import (
    BFMI_WARN,
    HETEROGENEITY_P,
    Diagnosis,
    Thresholds,
)
from homodyne_steps.inference.consensus import Combination, SelectionRules, heterogeneity
from homodyne_steps.inference.identification import PRIOR_SHRINK, prior_sd_ratio
from homodyne_steps.io.cmc_files import (
    CmcAnalysis,
    CmcDiagnostics,
    CmcParameters,
    CombinationReport,
)
from homodyne_steps.io.nlsq_files import NlsqParameters
from homodyne_steps.io.record import Record, or_none
from homodyne_steps.io.serialise import finite_or_none
from homodyne_steps.io.shard_io import Shard
from homodyne_steps.physics.cmc_space import COMBINATION
from homodyne_steps.physics.registry import REGISTRY

SCHEMA_VERSION = 1
NPZ_SCHEMA_VERSION = (1, 0)
STAT_KEYS = ("mean", "std", "hdi_3%", "hdi_97%", "r_hat", "ess_bulk", "ess_tail")

R = TypeVar("R", bound=Record)


class RecordSettings(Thresholds, SelectionRules, Protocol):
    """What the records read from the stage's settings (``CombineSettings``)."""

    def to_mapping(self) -> dict[str, Any]: ...


@dataclass
class CombinedRun:
    """Everything the records are built from: the shards (in index order), their
    combination and its diagnosis, the settings, the NLSQ record (None without one) and
    the seconds the combination took."""

    shards: list[Shard]
    combination: Combination
    diagnosis: Diagnosis
    settings: RecordSettings
    nlsq_rec: NlsqParameters | None
    combine_s: float

    @property
    def first(self) -> Shard:
        return self.shards[0]

    @property
    def kept(self) -> list[Shard]:
        return self.combination.selection.kept

    @property
    def names(self) -> tuple[str, ...]:
        return self.first.names


def _stat_mean(shards: Sequence[Shard], key: str) -> float | None:
    vals = [np.asarray(s.stats[key], dtype=np.float64) for s in shards if s.stats[key] is not None]
    return finite_or_none(np.mean(np.concatenate([v.ravel() for v in vals]))) if vals else None


def _n_phi(run: CombinedRun) -> int | None:
    """Angles of the data: from the shards' per-angle scaling, else from NLSQ."""
    first, nlsq_rec = run.first, run.nlsq_rec
    n_phi = max(first.scaling.values()) if first.scaling else None
    if n_phi is None and nlsq_rec is not None:
        n_phi = len(nlsq_rec.per_angle)
    return n_phi


# ---------------------------------------------------------------------------------------
# parameters.json
# ---------------------------------------------------------------------------------------
INTERVAL_KEYS = ("interval_68", "interval_95")


def _stat_entry(summary: Mapping[str, np.ndarray], j: int) -> dict[str, Any]:
    entry = {key: finite_or_none(summary[key][j]) for key in STAT_KEYS}
    for key in INTERVAL_KEYS:
        bounds = np.asarray(summary[key][j], dtype=np.float64)
        entry[key] = bounds.tolist() if np.all(np.isfinite(bounds)) else None
    return entry


def _per_angle(run: CombinedRun) -> list[dict[str, Any]] | None:
    first, names, summary = run.first, run.names, run.diagnosis.summary
    if not first.scaling:
        return None
    n_angles = max(first.scaling.values())
    per_angle = []
    for a in range(n_angles):
        row: dict[str, Any] = {
            "angle": a,
            "coordinate": first.angle_coords[a] if a < len(first.angle_coords) else a,
            "derived": first.scaling_derived,
        }
        for var in first.scaling:
            if a < first.scaling[var]:
                row[var] = {
                    **_stat_entry(summary, names.index(f"{var}_{a}")),
                    "unit": REGISTRY[var].unit,
                }
        per_angle.append(row)
    return per_angle


def sampling_summary(run: CombinedRun) -> dict[str, Any]:
    draws, first = run.combination.draws, run.first
    n_chains, n_samples = int(draws.shape[0]), int(draws.shape[1])
    timings = [or_none(sh.meta.timings) or {} for sh in run.shards]
    total_times = [finite_or_none(t.get("total_s")) for t in timings]
    total_times = [t for t in total_times if t is not None]
    return {
        "n_chains": n_chains,
        "n_samples": n_samples,
        "n_warmup": or_none(first.meta.num_warmup),
        "total_samples": n_chains * n_samples,
        "num_shards": first.num_shards,
        "num_shards_used": len(run.kept),
        "combination_method": run.settings.method,
        "shard_sampling_time_s": {
            "sum": sum(total_times) if total_times else None,
            "max": max(total_times) if total_times else None,
        },
        "combine_time_s": run.combine_s,
    }


def _convergence(run: CombinedRun, weakly_identified: list[str]) -> dict[str, Any]:
    quality, summary = run.diagnosis.quality, run.diagnosis.summary
    r_hats = [x for x in (finite_or_none(v) for v in summary["r_hat"]) if x is not None]
    ess_all = [x for x in (finite_or_none(v) for v in summary["ess_bulk"]) if x is not None]
    return {
        "status": quality["convergence_status"],
        "all_converged": quality["all_converged"],
        "quality_flag": quality["quality_flag"],
        "min_r_hat": min(r_hats) if r_hats else None,
        "max_r_hat": max(r_hats) if r_hats else None,
        "min_ess": min(ess_all) if ess_all else None,
        "min_ess_tail": min(
            (x for x in (finite_or_none(v) for v in summary["ess_tail"]) if x is not None),
            default=None,
        ),
        "acceptance_rate": _stat_mean(run.kept, "acceptance_rate"),
        "divergences": run.diagnosis.divergences,
        "weakly_identified": weakly_identified,
        "summary": quality["summary"],
    }


def _prior_sd_ratios(run: CombinedRun) -> dict[str, float | None]:
    """Posterior sd over the prior's (bounds included) of each physical parameter."""
    space = _parameter_space(run)
    names = list(run.first.physical)
    sd = run.diagnosis.summary["std"][: len(names)]
    ratio = prior_sd_ratio(
        sd, *(np.array([space[n]["prior"][k] for n in names]) for k in ("mu", "sigma")),
        *(np.array([space[n]["bounds"][i] for n in names]) for i in (0, 1)),
    )  # fmt: skip
    return {n: finite_or_none(r) for n, r in zip(names, ratio, strict=True)}


def parameters_record(run: CombinedRun) -> CmcParameters:
    """``parameters.json``: posterior statistics per parameter and per angle, convergence."""
    first, summary = run.first, run.diagnosis.summary
    ratios = _prior_sd_ratios(run)
    weak = [n for n, r in ratios.items() if r is not None and r > PRIOR_SHRINK]
    mapping = {
        "schema_version": SCHEMA_VERSION,
        "method": "cmc",
        "analysis_mode": first.analysis_mode,
        "model": or_none(first.meta.model),
        "combination_method": run.settings.method,
        "parameters": {
            n: {
                **_stat_entry(summary, j),
                "prior_sd_ratio": ratios[n],
                "weakly_identified": n in weak,
                "unit": REGISTRY[n].unit,
            }
            for j, n in enumerate(first.physical)
        },  # fmt: skip
        "per_angle": _per_angle(run),
        "per_angle_scaling": first.per_angle_scaling,
        "convergence": _convergence(run, weak),
        "sampling_summary": sampling_summary(run),
        "noise_scale": or_none(first.meta.noise_scale),
        "curvature_adjustment": or_none(first.meta.curvature_adjustment),
    }
    return CmcParameters.of_mapping(mapping, null_non_finite=True)


# ---------------------------------------------------------------------------------------
# analysis_results_cmc.json
# ---------------------------------------------------------------------------------------
def _dataset_info(run: CombinedRun) -> dict[str, Any]:
    first, shards = run.first, run.shards
    return {
        "analysis_mode": first.analysis_mode,
        "per_angle_scaling": first.per_angle_scaling,
        "n_phi": _n_phi(run),
        "total_data_points": int(sum(sh.n_points for sh in shards)),
        "data_points_used": int(sum(sh.n_points for sh in run.kept)),
        "n_points_per_shard": {str(sh.index): sh.n_points for sh in shards},
        "num_shards": first.num_shards,
        "prior_tempering": [sh.prior_tempering for sh in shards],
        "noise_scale": or_none(first.meta.noise_scale),
        "shard_files": [str(sh.nc_path) for sh in shards],
    }


def _parameter_space(run: CombinedRun) -> dict[str, Any]:
    """Bounds and prior of each physical parameter as the shards used them (config
    overrides and ``cmc.prior.type: nlsq`` included); the registry's for shard files that
    do not record their space."""
    space = run.first.space
    out = {}
    for n in run.first.physical:
        spec = REGISTRY[n]
        if space is not None and n in space.names:
            j = space.names.index(n)
            bounds = [float(space.lower[j]), float(space.upper[j])]
            prior = {"mu": float(space.prior_mu[j]), "sigma": float(space.prior_sigma[j])}
        else:
            bounds = list(spec.bounds)
            prior = {"mu": spec.prior_mu, "sigma": spec.prior_sigma}
        out[n] = {"bounds": bounds, "unit": spec.unit, "prior": prior}
    return out


def analysis_record(run: CombinedRun) -> CmcAnalysis:
    """``analysis_results_cmc.json``: quality in words, data, sampling, priors, NLSQ."""
    quality, s = run.diagnosis.quality, run.settings
    mapping = {
        "schema_version": SCHEMA_VERSION,
        "method": "cmc",
        "analysis_mode": run.first.analysis_mode,
        "combination_method": s.method,
        "sampling_quality": {
            "convergence_status": quality["convergence_status"],
            "all_converged": quality["all_converged"],
            "quality_flag": quality["quality_flag"],
            "summary": quality["summary"],
            "warnings": quality["warnings"],
            "recommendations": quality["recommendations"],
        },
        "dataset_info": _dataset_info(run),
        "sampling_summary": sampling_summary(run),
        "parameter_space": _parameter_space(run),
        "nlsq_comparison": run.diagnosis.comparison,
        "settings": s.to_mapping(),
    }
    return CmcAnalysis.of_mapping(mapping, null_non_finite=True)


# ---------------------------------------------------------------------------------------
# diagnostics.json
# ---------------------------------------------------------------------------------------
def _shard_entry(run: CombinedRun, sh: Shard) -> dict[str, Any]:
    d, sel, names = run.diagnosis, run.combination.selection, run.names
    b = d.bfmi[sh.index]
    verdict = d.verdicts[sh.index]
    return {
        "shard": sh.index,
        "file": str(sh.nc_path),
        "n_points": sh.n_points,
        "n_chains": int(sh.draws.shape[0]),
        "n_samples": int(sh.draws.shape[1]),
        "means": dict(zip(names, d.shard_means[sh.index].tolist(), strict=True)),
        "std": dict(zip(names, d.shard_stds[sh.index].tolist(), strict=True)),
        "divergences": sh.divergences,
        "divergence_rate": sh.divergence_rate,
        "bfmi": None if b is None else b.tolist(),
        "min_bfmi": None if b is None or not np.any(np.isfinite(b)) else float(np.nanmin(b)),
        "max_r_hat": verdict["max_r_hat"],
        "min_ess": verdict["min_ess"],
        "converged": verdict["problem"] is None,
        "convergence_problem": verdict["problem"],
        "acceptance_rate": _stat_mean([sh], "acceptance_rate"),
        "mean_tree_depth": _stat_mean([sh], "tree_depth"),
        "step_size": _stat_mean([sh], "step_size"),
        "timings": or_none(sh.meta.timings),
        "seed": or_none(sh.meta.seed),
        "excluded": sh.index in sel.excluded,
        "excluded_by": sel.excluded_by.get(sh.index),
        "reason": sel.excluded.get(sh.index),
        "flagged_but_kept": sel.flagged_kept.get(sh.index),
    }


def _thresholds(s: RecordSettings) -> dict[str, Any]:
    return {
        "r_hat_good": s.rhat_good,
        "r_hat_acceptable": s.rhat_acceptable,
        "ess_warn": s.ess_warn,
        "bfmi_warn": BFMI_WARN,
        "max_divergence_rate": s.max_divergence_rate,
        "outlier_p_value": s.outlier_p_value,
        "outlier_test": (
            "squared Mahalanobis distance of a shard's mean from the median of the shard "
            "means (sampled physical parameters, combination coordinates, shard "
            "covariance) against χ²(p) at 1 − outlier_p_value/K"
        ),
        "shard_ess_min": s.shard_ess_min,
        "heterogeneity_p_value": HETEROGENEITY_P,
    }


def diagnostics_record(run: CombinedRun) -> CmcDiagnostics:
    """``diagnostics.json``: thresholds, per-parameter labels, sampler efficiency, shards."""
    d, s, kept = run.diagnosis, run.settings, run.kept
    quality = d.quality
    tree = [
        np.asarray(sh.stats["tree_depth"]).ravel()
        for sh in kept
        if sh.stats["tree_depth"] is not None
    ]
    mapping = {
        "schema_version": SCHEMA_VERSION,
        "convergence": {
            "r_hat_threshold": s.rhat_acceptable,
            "r_hat_good": s.rhat_good,
            "ess_threshold": s.ess_warn,
            "status": quality["convergence_status"],
            "all_converged": quality["all_converged"],
        },
        "thresholds": _thresholds(s),
        "per_parameter_diagnostics": quality["per_parameter"],
        "sampling_efficiency": {
            "acceptance_rate": _stat_mean(kept, "acceptance_rate"),
            "divergences": d.divergences,
            "divergence_rate": d.divergences / d.n_draws_kept if d.n_draws_kept else None,
            "mean_tree_depth": _stat_mean(kept, "tree_depth"),
            "max_tree_depth": float(np.max(np.concatenate(tree))) if tree else None,
            "mean_step_size": _stat_mean(kept, "step_size"),
        },
        "cmc_specific": {
            "combination_method": s.method,
            "num_shards": run.first.num_shards,
            "num_shards_used": len(kept),
            "shard_summary": [_shard_entry(run, sh) for sh in run.shards],
        },
    }
    return CmcDiagnostics.of_mapping(mapping, null_non_finite=True)


# ---------------------------------------------------------------------------------------
# combination_report.json
# ---------------------------------------------------------------------------------------
def _per_shard(run: CombinedRun) -> list[dict[str, Any]]:
    d, names, shards = run.diagnosis, run.names, run.shards
    all_het = heterogeneity(
        np.stack([d.shard_means[sh.index] for sh in shards]),
        np.stack([d.shard_stds[sh.index] ** 2 for sh in shards]),
        d.summary["mean"],
    )
    return [
        {
            "shard": sh.index,
            "kept": sh.index not in run.combination.selection.excluded,
            "means": dict(zip(names, d.shard_means[sh.index].tolist(), strict=True)),
            "stds": dict(zip(names, d.shard_stds[sh.index].tolist(), strict=True)),
            "z_vs_combined": dict(zip(names, all_het["z"][i].tolist(), strict=True)),
        }
        for i, sh in enumerate(shards)
    ]


def _heterogeneity_entry(run: CombinedRun) -> dict[str, Any]:
    d, het = run.diagnosis, run.diagnosis.heterogeneity
    return {
        "definition": (
            "chi2 = Σ_k (mean_k − combined_mean)² / var_k over the kept shards "
            "(var_k: shard k's posterior variance, ≈ K × the full-data variance); "
            "≈ χ²(K−1) when the shards agree"
        ),
        "dof": het["dof"],
        "per_parameter": {
            n: {
                "chi2": het["chi2"][j],
                "reduced_chi2": het["reduced_chi2"][j],
                "p_value": het["p_value"][j],
                "heterogeneous": n in d.heterogeneous,
            }
            for j, n in enumerate(run.names)
        },
        "heterogeneous_parameters": d.heterogeneous,
        "detected": bool(d.heterogeneous or run.combination.selection.flagged_kept),
    }


def combination_report(run: CombinedRun) -> CombinationReport:
    """``combination_report.json``: which shards were combined, how, and how they agree."""
    s, d, names, first = run.settings, run.diagnosis, run.names, run.first
    sel = run.combination.selection
    excluded, flagged_kept = sel.excluded, sel.flagged_kept
    mapping = {
        "schema_version": SCHEMA_VERSION,
        "method": s.method,
        "settings": s.to_mapping(),
        "num_shards": first.num_shards,
        "kept_shards": [sh.index for sh in sel.kept],
        "excluded_shards": [
            {"shard": k, "excluded_by": sel.excluded_by[k], "reason": excluded[k]}
            for k in sorted(excluded)
        ],
        "flagged_but_kept": [{"shard": k, "reason": flagged_kept[k]} for k in sorted(flagged_kept)],
        "parameter_names": list(names),
        "combination_coordinates": (
            f"{COMBINATION} coordinates of the sampled parameters (cmc_space): power laws as "
            "(mean over the early half, logit exponent, mean over the late half), other "
            "bounded parameters through their logits"
            if first.space is not None
            else "the parameters as stored (the shard files record no sampled space)"
        ),
        "prior_application": run.combination.restoration,
        "not_converged_shards": [{"shard": k, "problem": d.stuck[k]} for k in sorted(d.stuck)],
        "jointly_combined": list(names[: first.n_joint]),
        "combined_per_component": list(names[first.n_joint :]),
        "ignored_variables": first.ignored_variables,
        "per_shard": _per_shard(run),
        "combined_mean": dict(zip(names, d.summary["mean"].tolist(), strict=True)),
        "heterogeneity": _heterogeneity_entry(run),
    }
    return CombinationReport.of_mapping(mapping, null_non_finite=True)


# ---------------------------------------------------------------------------------------
# samples.npz and posterior.nc
# ---------------------------------------------------------------------------------------
def samples_arrays(run: CombinedRun) -> dict[str, np.ndarray]:
    """``samples.npz``: the combined draws, their R-hat/ESS and the run's shape."""
    draws, summary, first = run.combination.draws, run.diagnosis.summary, run.first
    n_phi = _n_phi(run)
    n_phi_value = -1 if n_phi is None else int(n_phi)  # -1: not known from the inputs
    return {
        "posterior_samples": draws,
        "param_names": np.array(run.names, dtype=str),
        "r_hat": summary["r_hat"],
        "ess_bulk": summary["ess_bulk"],
        "ess_tail": summary["ess_tail"],
        "divergences": np.array([run.diagnosis.divergences], dtype=np.int64),
        "analysis_mode": np.array([first.analysis_mode], dtype=str),
        "n_phi": np.array([n_phi_value], dtype=np.int64),
        "n_chains": np.array([int(draws.shape[0])], dtype=np.int64),
        "n_samples": np.array([int(draws.shape[1])], dtype=np.int64),
        "schema_version": np.array(NPZ_SCHEMA_VERSION, dtype=np.int64),
    }


def combined_idata(run: CombinedRun):
    """``posterior.nc``: the combined posterior in the shards' layout (per-angle scaling
    with an angle dim), with the run's identity as posterior attributes."""
    import arviz as az

    draws, shard = run.combination.draws, run.first
    post: dict[str, np.ndarray] = {}
    j = 0
    for n in shard.physical:
        post[n] = draws[..., j]
        j += 1
    dims, coords = {}, {}
    for n, n_angle in shard.scaling.items():
        post[n] = draws[..., j : j + n_angle]
        j += n_angle
        dims[n] = ["angle"]
    if shard.scaling:
        coords["angle"] = shard.angle_coords
    idata = az.from_dict(posterior=post, dims=dims, coords=coords or None)
    idata.posterior.attrs.update(
        {
            "schema_version": SCHEMA_VERSION,
            "analysis_mode": shard.analysis_mode,
            "per_angle_scaling": shard.per_angle_scaling,
            "combination_method": run.settings.method,
            "num_shards": shard.num_shards,
            "kept_shards": ",".join(str(sh.index) for sh in run.kept),
            "convergence_status": run.diagnosis.quality["convergence_status"],
        }
    )
    return idata
