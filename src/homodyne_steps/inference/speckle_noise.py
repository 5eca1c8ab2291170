r"""Uncertainties from the noise model of a speckle two-time matrix.

Why. A cell's c2(t1, t2) is ⟨I(t1) I(t2)⟩ / (⟨I(t1)⟩⟨I(t2)⟩) over its pixels. Every
element of row t1 carries frame t1's speckle pattern, and frames within the
decorrelation time carry nearly the same pattern, so the elements' noise is shared over
the decorrelation time in both frame directions. The independent-noise covariance
(JᵀJ)⁻¹·χ²_red counts N²/2 independent points and is 10–20 times too narrow on data
made the way a beamline makes them (``bench/bench_coverage.py``).

Model. For a field with many independent scatterers (Gaussian speckle), the moment
theorem gives, for elements of distinct frames i < j and k < l::

    Cov(c2_ij, c2_kl) = B · [Γ_ik Γ_jl + Γ_il Γ_jk],    Γ_ik = c2_ik − offset (i ≠ k),
                                                       Γ_ii = d

with B ≈ 1/(independent speckles per cell) and d = β + 1/⟨n⟩ (contrast plus the
shot-noise excess). d is read where the correlator measured it: the mean of its own
diagonal (``XpcsData.c2_diagonal``, kept by ``preprocess`` before it replaces the
diagonal) minus the fitted offset, per angle. B follows from what the per-lag noise σ_k
already measures (:mod:`homodyne_steps.inference.noise`): half the variance of the
along-age differences c2[i+1, i+1+k] − c2[i, i+k], which under the model is::

    σ_k² = B · (d² + x_k),
    x_k  = mean_i[Γ_{i,i+k}² − Γ_{i,i+1} Γ_{i+k,i+k+1} − Γ_{i,i+k+1} Γ_{i+k,i+1}]   (k ≥ 2)

(neighbouring frames share their pattern, so x_k ≈ −Γ_{i,i+1}²: this is why σ_k
underestimates the element noise and χ²_red ≈ 2 on speckle data). The differences
remove the signal and the slow shared fluctuations, so B is stable where a regression of
one matrix's squared residuals is not (its few independent patterns make that noisy);
one B per ring (its sectors share pixel size and photon rate). The model predicts
χ²_red = mean w²·B(d² + Γ²); ``chi2_red_predicted`` against the fit's χ²_red says whether
it describes the data (on data with independent noise it does not, and
``independent`` is the method to use).
``bench/bench_noise_structure.py`` checks the model against many simulated
realisations: it predicts the variance of the fit's score to within its sampling error
and the spread of the linearised D0 estimator to a ratio of 1.00.

Covariance. The fit is least squares, so its covariance is the sandwich
V = H⁻¹ M H⁻¹ (H = JᵀJ with w = 1/σ) with the meat M = Σ_{n,m} u_n u_mᵀ Cov(n, m),
u_n = w_n² ∂c2_n/∂z. Per angle, with U_p the symmetric n_t × n_t matrix of u_·p (zero
diagonal), the sum over pairs of elements is a trace::

    M_pq = B/2 · tr(U_p Γ U_q Γ)

two n_t × n_t matrix products per parameter and angle (n_t = 1000: ~2·10⁹ flops each).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from homodyne_steps._jax import jnp
from homodyne_steps.errors import DataError
from homodyne_steps.inference.curvature import curvature_adjustment
from homodyne_steps.inference.identification import identify, weakly_identified
from homodyne_steps.inference.likelihood import full_system
from homodyne_steps.inference.lm import FitResult, Problem, rates_transform
from homodyne_steps.io.serialise import finite_or_none
from homodyne_steps.physics.model import g1_sq, g1_sq_and_jacobian
from homodyne_steps.physics.registry import Registry


@dataclass(frozen=True)
class NoiseLevels:
    """One angle's speckle noise: Var(c2_ij) = a + b·Γ_ij² (a = b·d²)."""

    a: float
    b: float

    @property
    def diagonal(self) -> float:
        """d = sqrt(a / b), Γ on the diagonal (contrast plus shot-noise excess)."""
        return float(np.sqrt(self.a / self.b)) if self.b > 0 else float("inf")


def difference_design(gamma: np.ndarray) -> np.ndarray:
    """x_k = mean_i[Γ_{i,i+k}² − Γ_{i,i+1}Γ_{i+k,i+k+1} − Γ_{i,i+k+1}Γ_{i+k,i+1}] for
    k = 0 … n−1 (NaN where undefined: k < 2 and k > n − 2), Γ off the diagonal only."""
    n = gamma.shape[0]
    x = np.full(n, np.nan)
    near = np.diagonal(gamma, 1)  # Γ_{i,i+1}
    for k in range(2, n - 1):
        i = np.arange(n - k - 1)
        x[k] = np.mean(gamma[i, i + k] ** 2 - near[i] * near[i + k]
                       - gamma[i, i + k + 1] * gamma[i + k, i + 1])  # fmt: skip
    return x


def noise_scale(sigma_sq: np.ndarray, design: np.ndarray, counts: np.ndarray,
                d_sq: np.ndarray) -> float:  # fmt: skip
    """B from σ_k² = B (d² + x_k) over the lags k ≥ 2 of every angle (rows), each lag
    weighted by its number of differences: B = Σ n σ² / Σ n (d² + x)."""
    pred = d_sq[:, None] + design
    ok = np.isfinite(sigma_sq) & np.isfinite(pred) & (counts > 0)
    ok[:, :2] = False
    den = float(np.sum((counts * pred)[ok]))
    return float(np.sum((counts * sigma_sq)[ok]) / den) if den > 0 else float("nan")


def speckle_meat(u: np.ndarray, gamma: np.ndarray, levels: NoiseLevels) -> np.ndarray:
    """M_pq = Σ over pairs of upper-triangle elements of u_p u_q Cov (module docstring).

    ``u`` (K, n, n): each parameter's weighted derivatives on the upper triangle, zero
    elsewhere; ``gamma`` (n, n): Γ off the diagonal (its diagonal is replaced by d).
    With b = 0 (independent noise) M = a · Σ u uᵀ.
    """
    full = u + np.swapaxes(u, 1, 2)
    if levels.b <= 0:
        return levels.a * np.einsum("pij,qij->pq", u, u)
    g = gamma.copy()
    np.fill_diagonal(g, levels.diagonal)
    sandwiched = np.einsum("ik,qkl,lj->qij", g, full, g, optimize=True)
    return levels.b / 2.0 * np.einsum("pij,qij->pq", full, sandwiched, optimize=True)


@dataclass(frozen=True)
class SpeckleCovariance:
    """The sandwich of one fit over the solver's x and over (θ, contrast, offset); NaN
    where a parameter is fixed or not identified. ``levels`` per angle; the χ²_red the
    noise model predicts for the fit's weights."""

    covariance_x: np.ndarray
    covariance: np.ndarray
    levels: tuple[NoiseLevels, ...]
    chi2_red_predicted: float


@dataclass
class _AngleNoise:
    """One angle's Γ (n, n) and, per lag k, the noise variance σ_k², the design x_k of
    :func:`difference_design` and the elements n − k; w² of each upper-triangle element
    (0 where unused)."""

    gamma: np.ndarray
    sigma_sq: np.ndarray
    design: np.ndarray
    counts: np.ndarray
    w_sq: np.ndarray


def _pairs(prob: Problem, a: int):
    """Angle a's upper-triangle index pairs and their weights w (0 where unused)."""
    c2 = np.asarray(prob.data.c2[a])
    iu, ju = np.triu_indices(c2.shape[0], 1)
    w = np.asarray(prob.data.weight_lag[a])[ju - iu]
    return iu, ju, np.where(np.isfinite(c2[iu, ju]) & (w > 0), w, 0.0)


def _angle_noise(prob: Problem, result: FitResult, a: int) -> _AngleNoise:
    """Angle a's noise terms at the fit's optimum (no Jacobian: light)."""
    iu, ju, w = _pairs(prob, a)
    n = int(prob.data.c2.shape[1])
    g = np.asarray(g1_sq(jnp.asarray(result.physical), prob.grid, jnp.asarray(iu),
                         jnp.asarray(ju), jnp.full(iu.size, a)))  # fmt: skip
    gamma = np.zeros((n, n))
    gamma[iu, ju] = result.contrast[a] * g
    gamma = gamma + gamma.T
    weight_lag = np.asarray(prob.data.weight_lag[a])
    with np.errstate(divide="ignore"):
        sigma_sq = np.where(weight_lag > 0, 1.0 / weight_lag**2, np.nan)
    counts = (n - np.arange(n)).astype(np.float64)
    return _AngleNoise(gamma, sigma_sq, difference_design(gamma), counts, w * w)


def _angle_scores(prob: Problem, result: FitResult, a: int) -> np.ndarray:
    """u (p + 2, n, n): angle a's w²·∂c2/∂(θ, contrast_a, offset_a) on the upper
    triangle. Built one angle at a time (K·n_t² floats each), never all at once."""
    iu, ju, w = _pairs(prob, a)
    n = int(prob.data.c2.shape[1])
    g, h = g1_sq_and_jacobian(jnp.asarray(result.physical), prob.grid, jnp.asarray(iu),
                              jnp.asarray(ju), jnp.full(iu.size, a))  # fmt: skip
    g, h = np.asarray(g), np.asarray(h)
    derivs = np.concatenate([result.contrast[a] * h, g[:, None], np.ones((iu.size, 1))], axis=1)
    u = np.zeros((derivs.shape[1], n, n))
    u[:, iu, ju] = (derivs * (w * w)[:, None]).T
    return u


@dataclass(frozen=True)
class _Noise:
    """The noise model at a fit's optimum: each angle's terms and levels, and the χ²_red
    it predicts for the fit's weights."""

    terms: list[_AngleNoise]
    levels: list[NoiseLevels]
    chi2_red_predicted: float


def _noise(prob: Problem, result: FitResult, diagonal: np.ndarray) -> _Noise:
    """Light (O(n_t²) per angle): what the refusal test needs before the meat is built."""
    n_phi = result.contrast.size
    terms = [_angle_noise(prob, result, a) for a in range(n_phi)]
    # One scale B for the ring (its sectors share pixel size and photon rate); each
    # angle's d from its own diagonal.
    d = np.asarray(diagonal, dtype=np.float64) - result.offset
    b = noise_scale(*(np.stack([getattr(t, k) for t in terms])
                      for k in ("sigma_sq", "design", "counts")), d * d)  # fmt: skip
    levels = [NoiseLevels(b * d_a * d_a, b) for d_a in d]
    used = sum(float(np.count_nonzero(t.w_sq)) for t in terms)
    iu = np.triu_indices(terms[0].gamma.shape[0], 1)
    predicted = sum(float(np.sum(t.w_sq * b * (d_a * d_a + t.gamma[iu] ** 2)))
                    for t, d_a in zip(terms, d, strict=True)) / max(used, 1.0)  # fmt: skip
    return _Noise(terms, levels, predicted)


ROW_SAMPLE = 64  # rows per angle whose residual sums test for frame-shared noise


def _row_sum_variances(prob: Problem, result: FitResult, noise: _Noise, a: int):
    """Σ over sampled rows i of s_i² (s_i = Σ_j r_ij, the residuals of row i) and its
    expectation under the speckle model and under independent noise.

    Frame-shared noise shows most in row sums: under the model
    Var(s_i) = B·[mᵀΓm + (Σ_j Γ_ij m_j)²] (m: the row's used elements, Γ_jj = d), under
    independent noise Σ_j σ²_|i−j|; on speckle data they differ 60–80-fold.
    """
    iu, ju, w = _pairs(prob, a)
    n = int(prob.data.c2.shape[1])
    used = np.zeros((n, n), dtype=bool)
    used[iu, ju] = w > 0
    used |= used.T
    term, level = noise.terms[a], noise.levels[a]
    c2 = np.nan_to_num(np.asarray(prob.data.c2[a]))
    rows = np.unique(np.linspace(0, n - 1, min(ROW_SAMPLE, n)).astype(int))
    resid = np.where(used[rows], c2[rows] - result.offset[a] - term.gamma[rows], 0.0)
    gamma = term.gamma.copy()
    np.fill_diagonal(gamma, level.diagonal)
    m = used[rows].astype(np.float64)
    speckle = level.b * (np.sum((m @ gamma) * m) + np.sum(np.sum(gamma[rows] * m, 1) ** 2))
    lag = np.abs(np.arange(n)[None, :] - rows[:, None])
    independent = np.sum(np.where(used[rows], term.sigma_sq[lag], 0.0))
    return float(np.sum(resid.sum(1) ** 2)), float(speckle), float(independent)


def frame_sharing(prob: Problem, result: FitResult, noise: _Noise) -> dict[str, float]:
    """Observed over predicted variance of residual row sums, pooled over angles, under
    the speckle model and under independent noise: the data choose the nearer (in log)."""
    sums = np.sum([_row_sum_variances(prob, result, noise, a)
                   for a in range(result.contrast.size)], axis=0)  # fmt: skip
    return {"observed_over_speckle": float(sums[0] / sums[1]),
            "observed_over_independent": float(sums[0] / sums[2])}  # fmt: skip


def speckle_covariance(
    prob: Problem, result: FitResult, diagonal: np.ndarray, noise: _Noise | None = None
) -> SpeckleCovariance:
    """V at the fit's optimum, in the coordinates of ``prob``'s scaling mode: the meat
    over (θ, contrast, offset) carried to the fitted z = (free θ, ψ) with
    T = diag(I_free, M) (s = Mψ + fixed; varpro and individual: M = I)."""
    p = result.physical.size
    n_phi = result.contrast.size
    st = prob.stats(result.physical, with_jacobian=True)
    normal, _ = full_system(st, result.contrast, result.offset)
    noise = noise or _noise(prob, result, diagonal)
    terms, levels = noise.terms, noise.levels
    meat = np.zeros_like(normal)
    for a, t in enumerate(terms):
        idx = np.r_[np.arange(p), p + a, p + n_phi + a]
        meat[np.ix_(idx, idx)] += speckle_meat(_angle_scores(prob, result, a), t.gamma, levels[a])
    free = ~np.asarray(prob.fixed[:p], bool)
    matrix = prob.scaling.matrix
    n_free = int(free.sum())
    t_z = np.zeros((p + matrix.shape[0], n_free + matrix.shape[1]))
    t_z[:p, :n_free] = np.eye(p)[:, free]
    t_z[p:, n_free:] = matrix
    # judged with the power laws in rates coordinates u (z = T u): see identify
    z_from_u = rates_transform(prob, result.physical, p + matrix.shape[1],
                               np.r_[free, np.ones(matrix.shape[1], bool)])  # fmt: skip
    t_u = t_z @ z_from_u
    ident_u = identify(t_u.T @ normal @ t_u)
    cov_u = ident_u.inverse @ (t_u.T @ meat @ t_u) @ ident_u.inverse
    cov_z = z_from_u @ cov_u @ z_from_u.T
    unidentified = np.any(z_from_u[:, ident_u.unidentified] != 0, axis=1)
    cov_z[unidentified, :] = np.nan
    cov_z[:, unidentified] = np.nan
    cov_full = t_z @ np.nan_to_num(cov_z) @ t_z.T
    unknown = np.any(t_z[:, ~np.isfinite(np.diag(cov_z))] != 0, axis=1)
    unknown[:p] |= ~free
    cov_full[unknown, :] = np.nan
    cov_full[:, unknown] = np.nan
    n_x = prob.lower.size
    cov_x = np.full((n_x, n_x), np.nan)
    if prob.varpro:
        cov_x[:p, :p] = cov_full[:p, :p]
    else:
        x_free = ~np.asarray(prob.fixed, bool)
        cov_x[np.ix_(x_free, x_free)] = cov_z
    return SpeckleCovariance(cov_x, cov_full, tuple(levels), noise.chi2_red_predicted)


SPECKLE_CHI2_FACTOR = 3.0  # predicted and fitted χ²_red must agree within this factor


def with_speckle_covariance(
    prob: Problem, result: FitResult, registry: Registry, diagonal: np.ndarray | None
) -> tuple[FitResult, dict[str, Any]]:
    """``result`` with the speckle covariance (and its weak-identification flags), and a
    record of how it was made. Refuses data the noise model does not describe: its
    predicted χ²_red must agree with the fit's within :data:`SPECKLE_CHI2_FACTOR`."""
    if diagonal is None or not np.all(np.isfinite(diagonal)):
        raise DataError(
            "the speckle noise model reads the correlator's own c2 diagonal, which these "
            "data do not carry (c2_diagonal: written by preprocess since 2026-11-30; "
            "re-run preprocess and qc) or which is masked for an angle"
        )
    noise = _noise(prob, result, diagonal)
    ratio = noise.chi2_red_predicted / result.reduced_chi_squared
    if not 1 / SPECKLE_CHI2_FACTOR < ratio < SPECKLE_CHI2_FACTOR:
        raise DataError(
            "the speckle noise model does not describe these data: for the fit's weights "
            f"it predicts χ²_red = {noise.chi2_red_predicted:.3g}, the fit has "
            f"{result.reduced_chi_squared:.3g} (they must agree within a factor "
            f"{SPECKLE_CHI2_FACTOR:g}); the noise looks independent between elements"
        )
    rows = frame_sharing(prob, result, noise)
    if abs(np.log(rows["observed_over_speckle"])) >= abs(np.log(rows["observed_over_independent"])):
        raise DataError(
            "the residuals do not share noise through frames as speckle data do: the "
            "variance of their row sums is "
            f"{rows['observed_over_independent']:.3g} × what independent noise predicts and "
            f"{rows['observed_over_speckle']:.3g} × what the speckle model predicts"
        )
    sc = speckle_covariance(prob, result, diagonal, noise)
    p = result.physical.size
    names = list(prob.names[:p])
    lo, hi = registry.bounds(names)
    sd = np.sqrt(np.abs(np.diag(sc.covariance_x)))[:p]
    weak = weakly_identified(result.physical, sd, lo, hi, [registry[n].log_scale for n in names])
    robust = replace(
        result,
        covariance=sc.covariance,
        covariance_x=sc.covariance_x,
        weakly_identified=tuple(np.asarray(names)[weak].tolist()),
    )
    levels = [{"B": lv.b, "d": finite_or_none(lv.diagonal)} for lv in sc.levels]
    record = {"method": "speckle", "reduced_chi2_predicted": sc.chi2_red_predicted,
              "row_sums": rows, "per_angle": levels}  # fmt: skip
    adjustment = curvature_adjustment(
        names, result.physical, result.covariance[:p, :p], robust.covariance[:p, :p]
    )
    if adjustment is not None:  # CMC's likelihood gets the same calibration
        record["curvature_adjustment"] = adjustment.to_mapping()
    return robust, record


def fit_uncertainty(
    prob: Problem, result: FitResult, method: str, registry: Registry, diagonal
) -> tuple[FitResult, dict[str, Any]]:
    """``result`` with the covariance ``nlsq.uncertainty.method`` asks for, and a record
    of how it was made. ``auto``: the speckle covariance where the data carry the
    correlator's diagonal and the speckle model describes them, else the independent
    one, with the reason in the record (``fallback``)."""
    if method == "independent" or not np.isfinite(result.chi_squared):
        return result, {"method": "independent"}
    try:
        return with_speckle_covariance(prob, result, registry, diagonal)
    except DataError as exc:
        if method == "speckle":
            raise DataError(f"nlsq.uncertainty.method: speckle: {exc}") from None
        return result, {"method": "independent", "requested": method, "fallback": str(exc)}


__all__ = [
    "NoiseLevels",
    "SPECKLE_CHI2_FACTOR",
    "SpeckleCovariance",
    "difference_design",
    "noise_scale",
    "speckle_covariance",
    "fit_uncertainty",
    "frame_sharing",
    "speckle_meat",
    "with_speckle_covariance",
]
