"""The NLSQ fitting strategies: one joint fit of all angles (with optional multistart), or
angle-by-angle fits combined (sequential). Pure: data and settings in, an outcome out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

from homodyne_steps.errors import ConfigError, DataError
from homodyne_steps.inference.identification import (
    combine_information,
    identify,
    weakly_identified,
)
from homodyne_steps.inference.likelihood import (
    angle_blocks,
    chi_squared_per_angle,
    count_points,
    make_fit_data,
    stratified_blocks,
)
from homodyne_steps.inference.lm import (
    FitResult,
    Problem,
    information_at,
    levenberg_marquardt,
)
from homodyne_steps.inference.nlsq_settings import NlsqSettings
from homodyne_steps.inference.noise import noise_sigma
from homodyne_steps.inference.other_starts import checked_start, distinct_minima, latin_hypercube
from homodyne_steps.inference.speckle_noise import fit_uncertainty
from homodyne_steps.inference.start_values import search_start
from homodyne_steps.inference.stratify import diagnose_counts
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.io.serialise import finite_or_none
from homodyne_steps.physics.model import make_grid
from homodyne_steps.physics.model_settings import ModelSettings
from homodyne_steps.physics.registry import REGISTRY, Registry, canonical_mode
from homodyne_steps.physics.scaling import build_map, quantile_estimates


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
    model: ModelSettings = field(default_factory=ModelSettings)
    #: how the covariance was computed (``nlsq.uncertainty``)
    uncertainty: dict[str, Any] = field(default_factory=lambda: {"method": "independent"})
    start: dict[str, Any] = field(default_factory=dict)  # how the start was chosen
    times_s: np.ndarray | None = None  # the measured times (the intervals' rates windows)


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
    model: ModelSettings
    diagonal: np.ndarray | None = None  # (P,) mean of the correlator's diagonal
    start: dict[str, Any] = field(default_factory=dict)  # how theta0 was chosen
    given: np.ndarray | None = None  # free parameters started where the user (or registry) said


def _prepare(
    data: XpcsData, mode: str, L: float, s: NlsqSettings, registry: Registry, model: ModelSettings
) -> _Prepared:
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
    grid = make_grid(data.t1, data.phi_angles_list, data.q, L, data.dt, **model.to_mapping())
    fixed = np.array([n in s.fixed_parameters for n in names])
    start = None
    searched = ~fixed & np.array([n not in s.initial_parameters for n in names])
    if s.start == "data" and searched.any():
        start = search_start(grid, c2, sigma_lag, names, theta0, searched, *registry.bounds(names))
        theta0 = start.theta
    diagonal = None
    if data.c2_diagonal is not None:
        with np.errstate(invalid="ignore"):
            diagonal = np.array([np.nanmean(row) if np.isfinite(row).any() else np.nan
                                 for row in np.asarray(data.c2_diagonal)])  # fmt: skip
    return _Prepared(
        mode,
        names,
        grid,
        c2,
        sigma_lag,
        n_points,
        theta0,
        contrast0,
        offset0,
        fixed,
        model,
        diagonal,
        start.to_record(names) if start else {"method": s.start if searched.any() else "given"},
        ~fixed & ~(searched if start is not None else np.zeros_like(fixed)),
    )


def _fit_from_data(prep: _Prepared, phi: np.ndarray, s: NlsqSettings, registry: Registry):
    """The joint fit from the data's start over every free parameter (the check of a
    fit from a given start, :func:`~homodyne_steps.inference.other_starts.checked_start`)."""
    theta = np.where(prep.fixed, prep.theta0, [registry[n].default for n in prep.names])
    lower, upper = registry.bounds(prep.names)
    start = search_start(
        prep.grid, prep.c2, prep.sigma_lag, prep.names, theta, ~prep.fixed, lower, upper
    )
    prob, psi0, _ = _problem(prep, phi, s, registry)
    return levenberg_marquardt(prob, start.theta, psi0, s.solver), start.to_record(prep.names)


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
        theta_names=prep.names,
    )
    return prob, psi0, diag


def _outcome(prep, prob, result, phi, s, diag, strategy, registry, extra=None) -> NlsqOutcome:
    p = len(prep.names)
    result, uncertainty = fit_uncertainty(
        prob, result, s.uncertainty.method, registry, prep.diagonal
    )
    unc = np.sqrt(np.abs(np.diag(result.covariance_x)))[:p]
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
        model=prep.model,
        uncertainty=uncertainty,
        start=prep.start,
        times_s=np.asarray(prep.grid.t_safe),
    )
    for k, v in (extra or {}).items():
        setattr(out, k, v)
    return out


def fit_joint(
    data: XpcsData,
    mode: str,
    L: float,
    s: NlsqSettings,
    registry: Registry = REGISTRY,
    model: ModelSettings | None = None,
) -> NlsqOutcome:
    prep = _prepare(data, mode, L, s, registry, model or ModelSettings())
    phi = np.asarray(data.phi_angles_list, dtype=np.float64)
    prob, psi0, diag = _problem(prep, phi, s, registry)
    result = levenberg_marquardt(prob, prep.theta0, psi0, s.solver)
    if prep.given is not None and prep.given.any():
        result, check = checked_start(
            result, prep.names, lambda: _fit_from_data(prep, phi, s, registry)
        )
        if check is not None:
            prep.start["check"] = check
    extra: dict[str, Any] = {}
    if s.multistart.enabled:
        starts = latin_hypercube(prep.names, registry, s.multistart.n_starts, s.multistart.seed)
        starts[:, prep.fixed] = prep.theta0[prep.fixed]
        results = [result]
        for theta in starts:
            prob_k, psi_k, _ = _problem(prep, phi, s, registry)
            results.append(levenberg_marquardt(prob_k, theta, psi_k, s.solver))
        distinct = distinct_minima(results)
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
    return _outcome(prep, prob, result, phi, s, diag, "joint", registry, extra)


def _fit_angle(data: XpcsData, prep: _Prepared, k: int, L: float, s: NlsqSettings, registry):
    """Angle k fitted alone (varpro scaling): its result and its problem."""
    phi = np.asarray(data.phi_angles_list, dtype=np.float64)[k : k + 1]
    sub_c2, sub_sigma = prep.c2[k : k + 1], prep.sigma_lag[k : k + 1]
    sub = replace(
        prep,
        grid=make_grid(data.t1, phi, data.q, L, data.dt, **prep.model.to_mapping()),
        c2=sub_c2,
        sigma_lag=sub_sigma,
        n_points=count_points(sub_c2, sub_sigma),
        contrast0=prep.contrast0[k : k + 1],
        offset0=prep.offset0[k : k + 1],
    )
    prob, psi0, _ = _problem(sub, phi, replace(s, per_angle_scaling="varpro"), registry)
    return levenberg_marquardt(prob, prep.theta0, psi0, s.solver), prob


def _usable(r: FitResult) -> bool:
    """The angle's information enters the combination: its fit stopped at a stationary
    point (every parameter, or only some directions, identified) with a finite χ²_red."""
    red = r.reduced_chi_squared
    return (
        r.status in ("converged", "not_identified")
        and bool(np.isfinite(red) and red > 0)
        and bool(np.any(r.information != 0))
    )


def _angle_record(phi: float, r: FitResult, names, used: bool) -> dict[str, Any]:
    sd = np.sqrt(np.abs(np.diag(r.covariance_x)))[: len(names)]
    return {
        "phi_deg": phi,
        "status": r.status,
        "reason": r.reason,
        "combined": used,
        "success": used and not r.weakly_identified,
        "not_identified": list(r.not_identified),
        "weakly_identified": list(r.weakly_identified),
        "chi_squared": finite_or_none(r.chi_squared),
        "reduced_chi_squared": finite_or_none(r.reduced_chi_squared),
        "n_points": r.n_points,
        "parameters": {
            n: {"value": float(v), "uncertainty": finite_or_none(u)}
            for n, v, u in zip(names, r.physical, sd, strict=True)
        },
    }


CONSISTENCY_P = 1e-3  # sequential: below this p-value the angles disagree


class _Combined(NamedTuple):
    theta: np.ndarray
    missing: tuple[str, ...]  # free parameters the combination does not determine
    why: str
    rank: int


def _combine(prep: _Prepared, results: list[FitResult], registry: Registry) -> _Combined:
    """θ = (Σ F_k)⁻¹ Σ F_k θ_k over the free parameters (clipped to the bounds), with
    F_k the information of angle k at its own optimum θ_k."""
    free = ~prep.fixed
    theta = prep.theta0.copy()
    if not results:
        return _Combined(theta, tuple(np.asarray(prep.names)[free]), "no usable angle", 0)
    values = np.array([r.physical[free] for r in results])
    infos = np.array([r.information[np.ix_(free, free)] / r.reduced_chi_squared for r in results])
    log_scale = np.array([registry[n].log_scale for n in prep.names])[free]
    x_hat, ident = combine_information(values, infos, log_scale)
    lo, hi = registry.bounds(prep.names)
    theta[free] = np.clip(x_hat, lo[free], hi[free])
    missing = tuple(np.asarray(prep.names)[free][ident.unidentified].tolist())
    return _Combined(theta, missing, ident.why, ident.rank)


class _AtCombined(NamedTuple):
    chi2: np.ndarray  # per angle
    contrast: np.ndarray
    offset: np.ndarray
    covariance: np.ndarray
    missing: tuple[str, ...]
    why: str


def _at_combined(prep: _Prepared, fits, used: np.ndarray, theta: np.ndarray) -> _AtCombined:
    """Every angle at the combined θ: χ², contrast, offset, and the covariance
    (Σ_k F_k(θ))⁻¹ over the used angles, F_k(θ) = JᵀJ_k(θ) / χ²_red,k: the curvature of
    the data's χ² at the reported values (F_k at θ_k would overstate the precision where
    the weak directions turn between the angles' optima)."""
    free = ~prep.fixed
    evals = [information_at(prob, theta) for _, prob in fits]
    info = np.zeros((free.sum(),) * 2)
    for (_, f, _, _), (r, _), u in zip(evals, fits, used, strict=True):
        if u:
            info += f[np.ix_(free, free)] / r.reduced_chi_squared
    ident = identify(info)
    cov = np.full((free.size, free.size), np.nan)
    cov[np.ix_(free, free)] = ident.covariance()
    return _AtCombined(
        chi2=np.array([e[0] for e in evals]),
        contrast=np.array([e[2][0] for e in evals]),
        offset=np.array([e[3][0] for e in evals]),
        covariance=cov,
        missing=tuple(np.asarray(prep.names)[free][ident.unidentified].tolist()),
        why=ident.why,
    )


def _consistency(results: list[FitResult], chi2_at_theta: np.ndarray, rank: int) -> dict:
    """Do the angles agree on one θ? Δ = Σ_k (χ²_k(θ) − χ²_k(θ_k)) / χ²_red,k is χ² with
    Σ_k rank F_k − rank Σ F_k degrees of freedom if they do and the per-angle quadratic
    models hold; a small p-value means they do not (or the combination's linearisation
    fails), so θ is not the optimum of the data."""
    from scipy.stats import chi2

    excess = [(c - r.chi_squared) / r.reduced_chi_squared
              for r, c in zip(results, chi2_at_theta, strict=True)]  # fmt: skip
    delta = float(sum(excess))
    dof = sum(identify(r.information).rank for r in results) - rank
    p_value = float(chi2.sf(delta, dof)) if dof > 0 else None
    return {
        "delta_chi_squared": delta,
        "degrees_of_freedom": dof,
        "p_value": p_value,
        "consistent": p_value is None or p_value >= CONSISTENCY_P,
    }


def _sequential_verdict(counts, n_phi, s: NlsqSettings, comb: _Combined, consistency):
    """``counts``: angles (combined, that succeeded, that identified everything alone)."""
    n_used, n_success, n_full = counts
    reasons = [
        f"{n_used} of {n_phi} angles reached a stationary point and were combined, "
        f"{n_success} of them determining their parameters ({n_full} identified every "
        f"parameter alone; min_success_rate {s.min_success_rate})"
    ]
    failed = n_used == 0 or n_success / n_phi < s.min_success_rate
    if n_used and not consistency["consistent"]:
        failed = True
        reasons.append(
            "the angles do not agree on one parameter set: χ² at the combined parameters "
            f"exceeds the per-angle minima by {consistency['delta_chi_squared']:.4g} for "
            f"{consistency['degrees_of_freedom']} degrees of freedom (p = "
            f"{consistency['p_value']:.2g} < {CONSISTENCY_P:g}); fit the angles jointly"
        )
    if comb.missing:
        reasons.append(
            f"their combined information does not determine {', '.join(comb.missing)} ({comb.why})"
        )
    if failed:
        return "failed", "; ".join(reasons)
    if comb.missing:
        return "not_identified", "; ".join(reasons)
    return "converged", reasons[0] + "; combined by summing their Fisher information (GLS)"


def fit_sequential(
    data: XpcsData,
    mode: str,
    L: float,
    s: NlsqSettings,
    registry: Registry = REGISTRY,
    model: ModelSettings | None = None,
) -> NlsqOutcome:
    """Fit each angle alone; combine the physical parameters by their information.

    Angle k's fit gives θ_k and the information F_k = JᵀJ_k / χ²_red,k (the per-angle
    scaling profiled out) restricted to the directions that angle identifies: one angle
    of a laminar-flow dataset cannot separate phi0 from the γ̇ scale (only
    γ̇·cos(phi0 − φ) enters), so its fit is ``not_identified`` and contributes nothing
    along that direction. The combination is generalised least squares with the full
    covariances, θ = (Σ F_k)⁻¹ Σ F_k θ_k (log D0, log γ̇0 as in the solver;
    :func:`~homodyne_steps.inference.identification.combine_information`), with
    covariance (Σ_k F_k)⁻¹
    evaluated at the combined θ (:func:`_at_combined`): inverse-variance weights
    without the covariances would mix directions an angle does not determine. It is
    ``not_identified`` (naming the parameters) if Σ F_k leaves directions undetermined.

    The combination is exact for a model linear in θ; otherwise it holds only if the
    per-angle optima are close enough for their quadratic models to hold at θ. The
    consistency test (:func:`_consistency`) checks that on the data: χ², contrast and
    offset are recomputed for every angle at the combined θ, and a χ² excess beyond its
    expected distribution fails the fit. It does on the laminar-flow reference case (the
    angles' optima lie far apart along the curved γ̇–phi0 valleys): use ``joint`` there.
    An angle's information is used when it reached a stationary point (identified or
    not); it counts as a success for ``min_success_rate`` when, in addition, none of its
    parameters is only weakly identified (a pure-noise angle "converges" to values the
    data do not fix). One that did not converge is neither.
    """
    prep = _prepare(data, mode, L, s, registry, model or ModelSettings())
    phi = np.asarray(data.phi_angles_list, dtype=np.float64)
    fits = [_fit_angle(data, prep, k, L, s, registry) for k in range(phi.size)]
    used = np.array([_usable(r) for r, _ in fits], dtype=bool)
    per_angle = [
        _angle_record(float(phi[k]), r, prep.names, bool(used[k])) for k, (r, _) in enumerate(fits)
    ]
    results, comb, at = _combine_angles(prep, fits, used, registry)
    consistency = _consistency(results, at.chi2[used], comb.rank)
    n_full = sum(r.converged for r, _ in fits)
    success = np.array([a["success"] for a in per_angle], dtype=bool)
    counts = (int(used.sum()), int(success.sum()), n_full)
    status, reason = _sequential_verdict(counts, phi.size, s, comb, consistency)
    combined = _sequential_result(prep, fits, comb, at, (status, reason), registry)
    uncertainty = {"method": "independent"}
    if s.uncertainty.method != "independent":
        whole, _, _ = _problem(prep, phi, replace(s, per_angle_scaling="varpro"), registry)
        combined, uncertainty = fit_uncertainty(
            whole, combined, s.uncertainty.method, registry, prep.diagonal
        )
    out = NlsqOutcome(
        mode=prep.mode,
        names=prep.names,
        result=combined,
        phi_deg=phi,
        sigma_lag=prep.sigma_lag,
        strategy="sequential",
        scaling_mode="varpro",
        uncertainties=np.sqrt(np.abs(np.diag(combined.covariance_x))),
        chi2_per_angle=at.chi2,
        diagnostics={"n_chunks": None, "note": "one problem per angle"},
        per_angle_fits=per_angle,
        uncertainty=uncertainty,
        model=prep.model,
        start=prep.start,
    )
    out.diagnostics["success_rate"] = float(success.mean())
    out.diagnostics["identified_alone"] = n_full
    out.diagnostics["consistency"] = consistency
    return out


def _combine_angles(prep: _Prepared, fits, used: np.ndarray, registry: Registry):
    """(the used angles' results, their combination, every angle at the combined θ).

    A parameter the angles' optima identify but the information at θ does not is
    reported missing too.
    """
    results = [r for (r, _), u in zip(fits, used, strict=True) if u]
    comb = _combine(prep, results, registry)
    at = _at_combined(prep, fits, used, comb.theta)
    if set(at.missing) - set(comb.missing):  # identified by the angles' optima, not at θ
        missing = set(at.missing) | set(comb.missing)
        comb = comb._replace(missing=tuple(n for n in prep.names if n in missing), why=at.why)
    return results, comb, at


def _sequential_result(
    prep: _Prepared, fits, comb: _Combined, at: _AtCombined, verdict, registry: Registry
) -> FitResult:
    """The combined fit as one :class:`FitResult` (its counts summed over the angles)."""
    theta, n_phi = comb.theta, len(fits)
    status, reason = verdict
    lo, hi = registry.bounds(prep.names)
    sd = np.sqrt(np.abs(np.diag(at.covariance)))
    weak = weakly_identified(theta, sd, lo, hi, [registry[n].log_scale for n in prep.names])
    return FitResult(
        physical=theta,
        psi=np.zeros(0),
        contrast=at.contrast,
        offset=at.offset,
        chi_squared=float(at.chi2.sum()),
        n_points=int(sum(r.n_points for r, _ in fits)),
        n_fitted=int(np.sum(~prep.fixed)) + 2 * n_phi,
        covariance=np.full((len(prep.names) + 2 * n_phi,) * 2, np.nan),
        covariance_x=at.covariance,
        free=~prep.fixed,
        at_lower=theta <= lo,
        at_upper=theta >= hi,
        status=status,
        reason=reason,
        iterations=int(sum(r.iterations for r, _ in fits)),
        value_passes=int(sum(r.value_passes for r, _ in fits)),
        jacobian_passes=int(sum(r.jacobian_passes for r, _ in fits)),
        timings={"total_s": float(sum(r.timings["total_s"] for r, _ in fits))},
        not_identified=comb.missing,
        weakly_identified=tuple(np.asarray(prep.names)[weak].tolist()),
    )


def fit(
    data: XpcsData,
    mode: str,
    L: float,
    s: NlsqSettings,
    registry: Registry = REGISTRY,
    model: ModelSettings | None = None,
) -> NlsqOutcome:
    """Fit ``data`` with the kernel's ``model`` (default: physical shear, exact
    integrals) by the strategy of ``s``."""
    start = time.perf_counter()
    fn = fit_sequential if s.strategy == "sequential" else fit_joint
    out = fn(data, mode, L, s, registry, model)
    out.timings["fit_s"] = time.perf_counter() - start
    return out
