"""The NLSQ stage: settings, from QC'd data to fitted parameters, and the output files.

Strategies:

- ``joint`` (default): every angle in one problem (:mod:`homodyne_steps.nlsq`), over
  angle-stratified chunks; optional multistart (Latin hypercube over the bounds, log
  spacing for log-scale parameters) reporting whether distinct minima were found.
- ``sequential``: each angle fitted alone (its own exact scaling), physical parameters
  combined by inverse variance; fails unless ``min_success_rate`` of the angles
  converge. For data whose angles cannot share one problem, or to check consistency.

Output files (seed §9 names, plus ``schema_version``): ``parameters.json``,
``analysis_results_nlsq.json``, ``convergence_metrics.json``, ``fitted_data.npz``.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from homodyne_steps import __version__
from homodyne_steps._jax import jnp
from homodyne_steps.dataset import XpcsData
from homodyne_steps.errors import ConfigError, DataError, HomodyneStepsError
from homodyne_steps.model import c2_matrix, make_grid
from homodyne_steps.nlsq import (
    FitResult,
    Problem,
    SolverSettings,
    angle_blocks,
    count_points,
    levenberg_marquardt,
    make_fit_data,
    stratified_blocks,
)
from homodyne_steps.noise import NoiseSettings, noise_sigma, summary
from homodyne_steps.registry import REGISTRY, Registry, canonical_mode
from homodyne_steps.scaling import MODES, build_map, quantile_estimates
from homodyne_steps.serialise import write_json, write_npz
from homodyne_steps.settings import check_keys, get_choice, get_int, get_number
from homodyne_steps.stratify import ChunkingSettings, diagnose_counts

SCHEMA_VERSION = 1
OUTPUT_FILES = (
    "parameters.json",
    "analysis_results_nlsq.json",
    "convergence_metrics.json",
    "fitted_data.npz",
)


class FitFailed(HomodyneStepsError):
    """The fit did not converge (raised after the diagnostic files are written)."""


@dataclass(frozen=True)
class MultistartSettings:
    enabled: bool = False
    n_starts: int = 8
    seed: int = 0


@dataclass(frozen=True)
class NlsqSettings:
    per_angle_scaling: str = "varpro"
    strategy: str = "joint"
    initial_parameters: Mapping[str, float] = field(default_factory=dict)
    fixed_parameters: tuple[str, ...] = ()
    noise: NoiseSettings = field(default_factory=NoiseSettings)
    chunking: ChunkingSettings = field(default_factory=ChunkingSettings)
    solver: SolverSettings = field(default_factory=SolverSettings)
    multistart: MultistartSettings = field(default_factory=MultistartSettings)
    min_success_rate: float = 0.5
    on_failure: str = "error"

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None, where: str = "nlsq") -> NlsqSettings:
        m = dict(m or {})
        check_keys(
            m,
            {
                "per_angle_scaling",
                "strategy",
                "initial_parameters",
                "fixed_parameters",
                "noise",
                "chunking",
                "solver",
                "multistart",
                "min_success_rate",
                "on_failure",
            },
            where,
        )
        init = dict(m.get("initial_parameters") or {})
        for name, value in init.items():
            if name not in REGISTRY.names:
                raise ConfigError(
                    f"{where}.initial_parameters.{name}: unknown parameter; known: "
                    f"{list(REGISTRY.names)}"
                )
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigError(f"{where}.initial_parameters.{name}: expected a number")
        fixed = m.get("fixed_parameters") or []
        if not isinstance(fixed, list | tuple) or not all(isinstance(x, str) for x in fixed):
            raise ConfigError(f"{where}.fixed_parameters: expected a list of parameter names")
        solver = dict(m.get("solver") or {})
        w = f"{where}.solver"
        check_keys(solver, {"max_iterations", "dchi2_tol", "ftol", "xtol", "gtol"}, w)
        d = SolverSettings()
        ms = dict(m.get("multistart") or {})
        check_keys(ms, {"enabled", "n_starts", "seed"}, f"{where}.multistart")
        enabled = ms.get("enabled", False)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{where}.multistart.enabled: expected true or false")
        return cls(
            per_angle_scaling=get_choice(m, "per_angle_scaling", "varpro", MODES, where),
            strategy=get_choice(m, "strategy", "joint", ("joint", "sequential"), where),
            initial_parameters=init,
            fixed_parameters=tuple(fixed),
            noise=NoiseSettings.from_mapping(m.get("noise"), f"{where}.noise"),
            chunking=ChunkingSettings.from_mapping(m.get("chunking"), f"{where}.chunking"),
            solver=SolverSettings(
                max_iterations=get_int(solver, "max_iterations", d.max_iterations, w, minimum=1),
                dchi2_tol=get_number(solver, "dchi2_tol", d.dchi2_tol, w, minimum=0.0),
                ftol=get_number(solver, "ftol", d.ftol, w, minimum=0.0),
                xtol=get_number(solver, "xtol", d.xtol, w, minimum=0.0),
                gtol=get_number(solver, "gtol", d.gtol, w, minimum=0.0),
            ),
            multistart=MultistartSettings(
                enabled=enabled,
                n_starts=get_int(ms, "n_starts", 8, f"{where}.multistart", minimum=1),
                seed=get_int(ms, "seed", 0, f"{where}.multistart", minimum=0),
            ),
            min_success_rate=get_number(
                m, "min_success_rate", 0.5, where, minimum=0.0, maximum=1.0
            ),
            on_failure=get_choice(m, "on_failure", "error", ("error", "warn"), where),
        )


@dataclass
class NlsqOutcome:
    """Everything the writers need, whichever strategy produced it."""

    mode: str
    names: tuple[str, ...]
    result: FitResult
    phi_deg: np.ndarray
    sigma_lag: np.ndarray
    strategy: str
    scaling_mode: str
    uncertainties: np.ndarray
    chi2_per_angle: np.ndarray
    diagnostics: dict[str, Any]
    multistart: dict[str, Any] | None = None
    per_angle_fits: list[dict[str, Any]] | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Prepared:
    mode: str
    names: tuple[str, ...]
    grid: Any
    c2: np.ndarray  # (P, n_t, n_t)
    sigma_lag: np.ndarray  # (P, n_t)
    n_points: int
    theta0: np.ndarray
    contrast0: np.ndarray
    offset0: np.ndarray
    fixed: np.ndarray


def _prepare(data: XpcsData, mode: str, L: float, s: NlsqSettings, registry: Registry) -> _Prepared:
    mode = canonical_mode(mode)
    names = registry.physical_names(mode)
    unknown = [n for n in s.initial_parameters if n not in names]
    if unknown:
        raise ConfigError(
            f"nlsq.initial_parameters: {unknown} are not parameters of {mode} mode {list(names)}"
        )
    bad_fixed = [n for n in s.fixed_parameters if n not in names]
    if bad_fixed:
        raise ConfigError(
            f"nlsq.fixed_parameters: {bad_fixed} are not parameters of {mode} mode {list(names)}"
        )
    theta0 = np.array(
        [
            registry.check_value(
                n, s.initial_parameters.get(n, registry[n].default), where="nlsq.initial_parameters"
            )
            for n in names
        ]
    )
    c2 = np.asarray(data.c2_exp, dtype=np.float64)
    sigma_lag = noise_sigma(c2, s.noise)
    n_points = count_points(c2, sigma_lag)
    if n_points <= len(names) + 2 * data.n_phi:
        raise DataError(f"only {n_points} usable points: too few to fit {mode} mode")
    contrast0, offset0 = quantile_estimates(c2, registry)
    grid = make_grid(data.t1, data.phi_angles_list, data.q, L, data.dt)
    fixed = np.array([n in s.fixed_parameters for n in names])
    return _Prepared(mode, names, grid, c2, sigma_lag, n_points, theta0, contrast0, offset0, fixed)


def _blocks(prep: _Prepared, s: NlsqSettings) -> tuple[np.ndarray, dict[str, Any]]:
    """The chunk blocks of a fit and their diagnostics (stratified unless disabled)."""
    start = time.perf_counter()
    n_phi, n_t = prep.c2.shape[0], prep.c2.shape[1]
    n_pairs = n_t * (n_t - 1) // 2
    n_total = n_phi * n_pairs
    chunk = s.chunking.chunk_size
    n_chunks = max(1, -(-n_total // chunk))
    if s.chunking.use_stratification(n_chunks, n_phi) or n_chunks == 1:
        blocks = stratified_blocks(n_pairs, n_phi, chunk)
    else:  # consecutive ids: the naive (angle-major) chunking, for comparison only
        ids = np.full(n_chunks * chunk, n_total, dtype=np.int64)
        ids[:n_total] = np.arange(n_total)
        blocks = angle_blocks(ids.reshape(n_chunks, chunk), np.arange(n_total) // n_pairs, n_phi)
    counts = (blocks < n_total).sum(axis=2)
    diag = diagnose_counts(
        counts,
        n_angles=n_phi,
        chunk_size=chunk,
        execution_time_ms=1e3 * (time.perf_counter() - start),
        memory_bytes=blocks.nbytes,
        slots=blocks.size,
    ).to_dict()
    return blocks, diag


def _problem(prep: _Prepared, phi: np.ndarray, s: NlsqSettings, registry: Registry):
    n_phi = phi.size
    smap, psi0 = build_map(s.per_angle_scaling, phi, prep.contrast0, prep.offset0)
    lo, hi = registry.bounds(prep.names)
    c_b, o_b = registry["contrast"].bounds, registry["offset"].bounds
    if smap.mode in ("individual", "auto"):
        k = n_phi if smap.mode == "individual" else 1
        s_lo = np.r_[np.full(k, c_b[0]), np.full(k, o_b[0])]
        s_hi = np.r_[np.full(k, c_b[1]), np.full(k, o_b[1])]
        psi0 = np.clip(psi0, s_lo, s_hi)
    else:  # fourier coefficients are unbounded; varpro/constant have none
        s_lo = np.full(0 if smap.mode == "varpro" else smap.n_params, -np.inf)
        s_hi = -s_lo
    n_psi = 0 if smap.mode == "varpro" else smap.n_params
    lower, upper = np.r_[lo, s_lo[:n_psi]], np.r_[hi, s_hi[:n_psi]]
    fixed = np.r_[prep.fixed, np.zeros(n_psi, bool)]
    log_scale = np.r_[[registry[n].log_scale for n in prep.names], np.zeros(n_psi, bool)]
    blocks, diag = _blocks(prep, s)
    prob = Problem(
        prep.grid,
        make_fit_data(prep.c2, prep.sigma_lag),
        blocks,
        prep.n_points,
        n_phi,
        smap,
        lower,
        upper,
        fixed,
        log_scale,
    )
    return prob, psi0, diag


def _latin_hypercube(names, registry: Registry, n: int, seed: int) -> np.ndarray:
    from scipy.stats import qmc

    u = qmc.LatinHypercube(d=len(names), seed=seed).random(n)
    out = np.empty_like(u)
    for k, name in enumerate(names):
        lo, hi = registry[name].bounds
        if registry[name].log_scale:
            out[:, k] = np.exp(np.log(lo) + u[:, k] * (np.log(hi) - np.log(lo)))
        else:
            out[:, k] = lo + u[:, k] * (hi - lo)
    return out


def _distinct(results: list[FitResult]) -> list[int]:
    """Indices of results that are distinct minima: χ² apart by > 1, or any parameter
    farther than 3 standard deviations (of the best fit) from every kept minimum."""
    order = sorted(range(len(results)), key=lambda k: results[k].chi_squared)
    best = results[order[0]]
    sd = np.sqrt(np.abs(np.diag(best.covariance_x)))[: best.physical.size]
    kept: list[int] = []
    for k in order:
        r = results[k]
        if not np.isfinite(r.chi_squared):
            continue
        same = any(
            abs(r.chi_squared - results[m].chi_squared) <= 1.0
            and np.all(np.abs(r.physical - results[m].physical) <= 3 * np.where(sd > 0, sd, np.inf))
            for m in kept
        )
        if not same:
            kept.append(k)
    return kept


def _outcome(prep, prob, result, phi, s, diag, strategy, extra=None) -> NlsqOutcome:
    p = len(prep.names)
    unc = np.sqrt(np.abs(np.diag(result.covariance_x)))[:p]
    from homodyne_steps.nlsq import chi_squared_per_angle

    st = prob.stats(result.physical, with_jacobian=False)
    out = NlsqOutcome(
        mode=prep.mode,
        names=prep.names,
        result=result,
        phi_deg=phi,
        sigma_lag=prep.sigma_lag,
        strategy=strategy,
        scaling_mode=s.per_angle_scaling,
        uncertainties=unc,
        chi2_per_angle=chi_squared_per_angle(st, result.contrast, result.offset),
        diagnostics=diag,
    )
    for k, v in (extra or {}).items():
        setattr(out, k, v)
    return out


def fit_joint(
    data: XpcsData, mode: str, L: float, s: NlsqSettings, registry: Registry = REGISTRY
) -> NlsqOutcome:
    prep = _prepare(data, mode, L, s, registry)
    phi = np.asarray(data.phi_angles_list, dtype=np.float64)
    prob, psi0, diag = _problem(prep, phi, s, registry)
    result = levenberg_marquardt(prob, prep.theta0, psi0, s.solver)
    extra: dict[str, Any] = {}
    if s.multistart.enabled:
        starts = _latin_hypercube(prep.names, registry, s.multistart.n_starts, s.multistart.seed)
        starts[:, prep.fixed] = prep.theta0[prep.fixed]
        results = [result]
        for theta in starts:
            prob_k, psi_k, _ = _problem(prep, phi, s, registry)
            results.append(levenberg_marquardt(prob_k, theta, psi_k, s.solver))
        distinct = _distinct(results)
        best = min(results, key=lambda r: r.chi_squared if np.isfinite(r.chi_squared) else np.inf)
        extra["multistart"] = {
            "n_starts": len(results),
            "seed": s.multistart.seed,
            "n_converged": sum(r.converged for r in results),
            "distinct_minima_found": len(distinct) > 1,
            "minima": [
                {
                    "chi_squared": results[k].chi_squared,
                    "status": results[k].status,
                    "parameters": dict(zip(prep.names, results[k].physical.tolist(), strict=True)),
                }
                for k in distinct
            ],
            "chosen": "lowest chi_squared",
        }
        result = best
    return _outcome(prep, prob, result, phi, s, diag, "joint", extra)


def fit_sequential(
    data: XpcsData, mode: str, L: float, s: NlsqSettings, registry: Registry = REGISTRY
) -> NlsqOutcome:
    """Fit each angle alone; combine physical parameters by inverse variance."""
    prep = _prepare(data, mode, L, s, registry)
    phi = np.asarray(data.phi_angles_list, dtype=np.float64)
    p = len(prep.names)
    per_angle, fits = [], []
    contrast, offset = np.full(phi.size, np.nan), np.full(phi.size, np.nan)
    for k in range(phi.size):
        sub_c2, sub_sigma = prep.c2[k : k + 1], prep.sigma_lag[k : k + 1]
        sub = replace(
            prep,
            grid=make_grid(data.t1, phi[k : k + 1], data.q, L, data.dt),
            c2=sub_c2,
            sigma_lag=sub_sigma,
            n_points=count_points(sub_c2, sub_sigma),
            contrast0=prep.contrast0[k : k + 1],
            offset0=prep.offset0[k : k + 1],
        )
        sub_settings = replace(s, per_angle_scaling="varpro")
        prob, psi0, _ = _problem(sub, phi[k : k + 1], sub_settings, registry)
        r = levenberg_marquardt(prob, prep.theta0, psi0, s.solver)
        sd = np.sqrt(np.abs(np.diag(r.covariance_x)))[:p]
        ok = r.converged and np.all(np.isfinite(sd))
        fits.append((r, sd, ok))
        contrast[k], offset[k] = r.contrast[0], r.offset[0]
        per_angle.append(
            {
                "phi_deg": float(phi[k]),
                "status": r.status,
                "success": bool(ok),
                "chi_squared": r.chi_squared,
                "n_points": r.n_points,
                "parameters": {
                    n: {"value": float(v), "uncertainty": float(u)}
                    for n, v, u in zip(prep.names, r.physical, sd, strict=True)
                },
            }
        )
    good = [(r, sd) for r, sd, ok in fits if ok]
    rate = len(good) / phi.size
    values, unc = np.full(p, np.nan), np.full(p, np.nan)
    if good:
        v = np.array([r.physical for r, _ in good])
        w = 1.0 / np.maximum(np.array([sd for _, sd in good]), 1e-300) ** 2
        values = (w * v).sum(0) / w.sum(0)
        unc = 1.0 / np.sqrt(w.sum(0))
    chi2 = float(sum(r.chi_squared for r, _, _ in fits))
    n_points = int(sum(r.n_points for r, _, _ in fits))
    n_fitted = p + 2 * phi.size
    status = "converged" if rate >= s.min_success_rate else "failed"
    reason = (
        f"{len(good)} of {phi.size} angles converged (min_success_rate "
        f"{s.min_success_rate}); parameters combined by inverse variance"
    )
    lo, hi = registry.bounds(prep.names)
    cov = np.diag(unc**2)
    combined = FitResult(
        physical=values,
        psi=np.zeros(0),
        contrast=contrast,
        offset=offset,
        chi_squared=chi2,
        n_points=n_points,
        n_fitted=n_fitted,
        covariance=np.full((p + 2 * phi.size,) * 2, np.nan),
        covariance_x=cov,
        free=~prep.fixed,
        at_lower=values <= lo,
        at_upper=values >= hi,
        status=status,
        reason=reason,
        iterations=int(sum(r.iterations for r, _, _ in fits)),
        value_passes=int(sum(r.value_passes for r, _, _ in fits)),
        jacobian_passes=int(sum(r.jacobian_passes for r, _, _ in fits)),
        timings={"total_s": float(sum(r.timings["total_s"] for r, _, _ in fits))},
    )
    out = NlsqOutcome(
        mode=prep.mode,
        names=prep.names,
        result=combined,
        phi_deg=phi,
        sigma_lag=prep.sigma_lag,
        strategy="sequential",
        scaling_mode="varpro",
        uncertainties=unc,
        chi2_per_angle=np.array([r.chi_squared for r, _, _ in fits]),
        diagnostics={"n_chunks": None, "note": "one problem per angle"},
        per_angle_fits=per_angle,
    )
    out.diagnostics["success_rate"] = rate
    return out


def fit(
    data: XpcsData, mode: str, L: float, s: NlsqSettings, registry: Registry = REGISTRY
) -> NlsqOutcome:
    start = time.perf_counter()
    fn = fit_sequential if s.strategy == "sequential" else fit_joint
    out = fn(data, mode, L, s, registry)
    out.timings["fit_s"] = time.perf_counter() - start
    return out


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------
def quality_flag(out: NlsqOutcome) -> str:
    r = out.result
    if not r.converged:
        return "poor"
    if 0.8 <= r.reduced_chi_squared <= 1.25 and not np.any(r.at_lower | r.at_upper):
        return "good"
    return "warning"


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def parameters_record(out: NlsqOutcome, registry: Registry = REGISTRY) -> dict[str, Any]:
    r = out.result
    p = len(out.names)
    c_unc = np.sqrt(np.abs(np.diag(r.covariance)))[p : p + out.phi_deg.size]
    o_unc = np.sqrt(np.abs(np.diag(r.covariance)))[p + out.phi_deg.size :]
    return {
        "schema_version": SCHEMA_VERSION,
        "analysis_mode": out.mode,
        "parameters": {
            name: {
                "value": float(r.physical[k]),
                "uncertainty": _finite(out.uncertainties[k]),
                "unit": registry[name].unit,
                "at_bound": bool(r.at_lower[k] or r.at_upper[k]),
                "fixed": bool(not r.free[k]),
            }
            for k, name in enumerate(out.names)
        },
        "per_angle": [
            {
                "phi_deg": float(out.phi_deg[k]),
                "contrast": {"value": float(r.contrast[k]), "uncertainty": _finite(c_unc[k])},
                "offset": {"value": float(r.offset[k]), "uncertainty": _finite(o_unc[k])},
                "chi_squared": float(out.chi2_per_angle[k]),
            }
            for k in range(out.phi_deg.size)
        ],
        "per_angle_scaling": out.scaling_mode,
        "chi_squared": r.chi_squared,
        "reduced_chi_squared": r.reduced_chi_squared,
        "degrees_of_freedom": r.dof,
        "uncertainty_convention": "sqrt(diag((JᵀJ)⁻¹ · χ²_red)) at the optimum, σ from data",
        "convergence": {
            "status": r.status,
            "reason": r.reason,
            "iterations": r.iterations,
            "converged": r.converged,
        },
    }


def write_outputs(
    out_dir: str | os.PathLike[str],
    out: NlsqOutcome,
    data: XpcsData,
    L: float,
    registry: Registry = REGISTRY,
) -> None:
    out_dir = Path(out_dir)
    r = out.result
    params = parameters_record(out, registry)
    names = list(out.names)
    cov = r.covariance_x[: len(names), : len(names)]
    sd = np.sqrt(np.abs(np.diag(cov)))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(sd, sd)
    analysis = {
        "schema_version": SCHEMA_VERSION,
        "method": "nlsq",
        "strategy": out.strategy,
        "analysis_mode": out.mode,
        "per_angle_scaling": out.scaling_mode,
        "fit_quality": {
            "chi_squared": r.chi_squared,
            "reduced_chi_squared": r.reduced_chi_squared,
            "degrees_of_freedom": r.dof,
            "quality_flag": quality_flag(out),
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
        },
        "covariance": {"names": names, "matrix": np.where(np.isfinite(cov), cov, 0.0).tolist()},
        "correlation": {"names": names, "matrix": np.where(np.isfinite(corr), corr, 0.0).tolist()},
        "noise": {
            "method": "per-lag robust scatter along the age direction",
            **summary(out.sigma_lag),
        },
        "stratification": out.diagnostics,
        "multistart": out.multistart,
        "sequential": out.per_angle_fits,
    }
    import jax

    convergence = {
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
        "quality_flag": quality_flag(out),
        "device_info": {
            "platform": jax.devices()[0].platform,
            "jax": jax.__version__,
            "python": platform.python_version(),
            "homodyne_steps": __version__,
        },
    }
    write_fitted_data(out_dir / "fitted_data.npz", data, L, r.physical, r.contrast, r.offset,
                      out.sigma_lag)  # fmt: skip
    write_json(out_dir / "analysis_results_nlsq.json", analysis)
    write_json(out_dir / "convergence_metrics.json", convergence)
    write_json(out_dir / "parameters.json", params)  # last: the workflow's sentinel


def write_fitted_data(
    path: str | os.PathLike[str],
    data: XpcsData,
    L: float,
    physical: np.ndarray,
    contrast: np.ndarray,
    offset: np.ndarray,
    sigma_lag: np.ndarray,
) -> None:
    """The model at ``physical`` with per-angle scaling, beside the data (seed §9 keys).

    ``c2_theoretical_raw`` is g1² (contrast 1, offset 0); ``residuals_normalized`` uses
    the fit's noise model σ(angle, lag). Large arrays are produced one at a time.
    """
    grid = make_grid(data.t1, data.phi_angles_list, data.q, L, data.dt)
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


def nlsq_stage(
    in_npz: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    mode: str,
    L: float,
    settings: NlsqSettings,
    parameter_overrides: Mapping[str, Any] | None = None,
) -> NlsqOutcome:
    """Fit a QC'd dataset and write the four output files into ``out_dir``.

    A fit that does not converge writes ``parameters.failed.json`` (the diagnostics)
    and raises :class:`FitFailed` unless ``on_failure: warn``.
    """
    registry = REGISTRY.with_overrides(parameter_overrides)
    data = XpcsData.from_npz(in_npz)
    out = fit(data, mode, L, settings, registry)
    out_dir = Path(out_dir)
    failed = out_dir / "parameters.failed.json"
    if not out.result.converged and settings.on_failure == "error":
        for name in OUTPUT_FILES:
            (out_dir / name).unlink(missing_ok=True)
        write_json(failed, parameters_record(out, registry))
        raise FitFailed(
            f"NLSQ did not converge ({out.result.status}: {out.result.reason}); diagnostics in "
            f"{failed}. Try other initial_parameters, multistart, or set "
            "nlsq.on_failure: warn to keep the unconverged result"
        )
    failed.unlink(missing_ok=True)
    write_outputs(out_dir, out, data, L, registry)
    return out
