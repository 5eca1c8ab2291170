r"""What a normal (information) matrix determines, and its inverse.

Identification (:func:`identify`): JᵀJ is judged after normalisation to unit diagonal
(D⁻¹ JᵀJ D⁻¹, D = sqrt(diag JᵀJ), so parameter units do not matter); eigenvalues below
1e-10 of the largest span directions the data do not determine. A parameter with any
weight (> 1e-6) in those directions, no information at all, or a zero / non-finite σ is
*not identified*: its covariance row is NaN (uncertainty null in the records), never a
number. The covariance of the identified parameters is the pseudo-inverse over the
identified directions (it does not depend on which generalised inverse is used, because
those parameters lie in the row space of JᵀJ). With ``transform`` the matrix is judged
in other coordinates and the result carried back: the NLSQ fit judges each power law in
its rates coordinates, where its amplitude and offset do not become collinear as the
exponent goes to 0 (at alpha = −0.013 on a static speckle file the θ columns of D0 and
D_offset agree to 1e-5 and JᵀJ looked singular, though the data fix D(t) and, weakly,
all three). How the solver turns this into a verdict
is in :mod:`homodyne_steps.inference.lm`. :func:`weakly_identified` flags parameters
the data determine in principle but only to within a large part of their bounds.

:func:`combine_information` sums the information of independent estimates (generalised
least squares); :func:`scaled_pinv` is the Marquardt-scaled pseudo-inverse the solver's
tests and the elimination of the per-angle scaling use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


def scaled_pinv(a: np.ndarray) -> np.ndarray:
    """Inverse of a normal matrix computed in Marquardt-scaled form.

    Parameters span ~20 decades of scale (D0 ~ 1e4 Å²/s, γ̇0 ~ 1e-4 1/s): a plain pinv's
    relative cut-off would discard the directions of the large-valued parameters.
    """
    scale = np.sqrt(np.clip(np.diag(a), 1e-300, None))
    return np.linalg.pinv(a / np.outer(scale, scale), rcond=1e-13, hermitian=True) / np.outer(
        scale, scale
    )


IDENTIFY_RTOL = 1e-10  # eigenvalue cut of the normalised JᵀJ, relative to the largest
NULL_WEIGHT_TOL = 1e-6  # weight in the undetermined directions that unidentifies a parameter


@dataclass(frozen=True)
class Identification:
    """What a normal (information) matrix determines (module docstring, Identification).

    ``inverse`` is its pseudo-inverse over the identified eigen-directions, ``information``
    the matrix with the undetermined directions removed; ``unidentified`` marks the
    parameters the data cannot fix and ``why`` says why (empty when all are identified).
    """

    inverse: np.ndarray
    information: np.ndarray
    unidentified: np.ndarray
    rank: int
    why: str

    def covariance(self, factor: float = 1.0) -> np.ndarray:
        """``inverse · factor`` with NaN rows and columns for the unidentified."""
        cov = self.inverse * factor
        cov[self.unidentified, :] = np.nan
        cov[:, self.unidentified] = np.nan
        return cov


def identify(
    a: np.ndarray,
    factor: float = 1.0,
    scale: np.ndarray | None = None,
    transform: np.ndarray | None = None,
) -> Identification:
    """Identification of the parameters of normal matrix ``a`` (covariance = a⁻¹ · factor).

    ``scale`` normalises ``a`` (default sqrt(diag a)); a Schur complement should be
    normalised by the diagonal before elimination, so that a direction whose information
    the elimination removed shows as round-off, not as a unit entry.

    ``transform`` (T = ∂x/∂u, square and invertible) judges the matrix in coordinates u
    instead, TᵀaT, and carries the result back: inverse T(TᵀaT)⁻¹Tᵀ (the same matrix
    where it is well conditioned), unidentified every x that depends on a u the data do
    not fix. With the rates coordinates (:func:`homodyne_steps.physics.coordinates.
    rates_jacobian`) a power law whose exponent is near 0 is judged where its amplitude
    and offset are not collinear.
    """
    if transform is not None:
        t = np.asarray(transform, dtype=np.float64)
        in_u = identify(t.T @ a @ t, factor)
        bad = np.any(t[:, in_u.unidentified] != 0, axis=1)
        t_inv = np.linalg.inv(t)
        info = t_inv.T @ in_u.information @ t_inv
        return Identification(t @ in_u.inverse @ t.T, info, bad, in_u.rank, in_u.why)
    n = a.shape[0]
    if not np.all(np.isfinite(a)):
        nan = np.full((n, n), np.nan)
        return Identification(nan, nan, np.ones(n, bool), 0, "JᵀJ is not finite")
    d = np.sqrt(np.clip(np.diag(a), 0.0, None)) if scale is None else np.asarray(scale)
    s = np.where(d > 0, d, 1.0)
    a_s = np.where(np.outer(d > 0, d > 0), a / np.outer(s, s), 0.0)
    lam, v = np.linalg.eigh(a_s) if n else (np.zeros(0), np.zeros((0, 0)))
    keep = lam > IDENTIFY_RTOL * lam.max() if n and lam.max() > 0 else np.zeros(n, bool)
    vk = v[:, keep]
    inverse = (vk / lam[keep]) @ vk.T / np.outer(s, s)
    information = (vk * lam[keep]) @ vk.T * np.outer(s, s)
    bad = np.sum(v[:, ~keep] ** 2, axis=1) > NULL_WEIGHT_TOL
    why = f"JᵀJ has rank {int(keep.sum())} of {n}" if bad.any() else ""
    with np.errstate(invalid="ignore"):
        zero_sd = ~bad & ~(np.sqrt(np.diag(inverse) * factor) > 0)
    if zero_sd.any():
        bad |= zero_sd
        why = "; ".join(filter(None, [why, f"σ is zero or not finite (χ²_red = {factor:.3g})"]))
    return Identification(inverse, information, bad, int(keep.sum()), why)


WEAK_FRACTION = 0.25  # σ wider than this fraction of the bound range: weakly identified


def weakly_identified(
    values: np.ndarray, sd: np.ndarray, lower: np.ndarray, upper: np.ndarray, log_scale: np.ndarray
) -> np.ndarray:
    """Mask of the parameters the data fix only weakly: σ (in log for log-scale ones,
    σ/value) wider than a quarter of the bound range, so that the ±2σ interval spans at
    least the whole range the parameter may take; what the fit reports is then mostly
    the start, the bounds or the prior rather than the data. Parameters without a finite
    σ (fixed, not identified) are not flagged here: they are reported as such."""
    values, sd = np.asarray(values, np.float64), np.asarray(sd, np.float64)
    lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
    log_scale = np.asarray(log_scale, bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        width = np.where(log_scale, np.log(upper / lower), upper - lower)
        sd_u = np.where(log_scale, sd / np.abs(values), sd)
        return np.isfinite(sd_u) & (sd_u > WEAK_FRACTION * width)


PRIOR_SHRINK = 0.5  # posterior sd above this fraction of the prior's: weakly identified


def prior_sd_ratio(
    posterior_sd: np.ndarray, mu: np.ndarray, sigma: np.ndarray, lower: np.ndarray,
    upper: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """Posterior sd over the prior's, the prior N(μ, σ) restricted to [lower, upper] (a
    truncated normal's sd). Near 1 the posterior is its prior: the data left the
    parameter where the prior put it (D_offset on the static speckle files, whose
    posterior is N(0, 1000) around a truth of 1000), and a credible interval then says
    what the prior says. Above :data:`PRIOR_SHRINK` CMC calls it weakly identified."""
    from scipy.stats import truncnorm

    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    a = (np.asarray(lower, np.float64) - mu) / sigma
    b = (np.asarray(upper, np.float64) - mu) / sigma
    prior = truncnorm.std(a, b, loc=mu, scale=sigma)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(posterior_sd, np.float64) / prior


def combine_information(
    values: np.ndarray, infos: np.ndarray, log_scale: np.ndarray
) -> tuple[np.ndarray, Identification]:
    """Combine independent estimates by summing their Fisher information.

    ``values`` (K, p) are the estimates, ``infos`` (K, p, p) their information matrices
    (JᵀJ / χ²_red, zero in every direction an estimate does not determine). With
    χ²_k(θ) ≈ χ²_k(θ_k) + (θ − θ_k)ᵀ F_k (θ − θ_k) the total is minimised by
    θ = (Σ F_k)⁻¹ Σ F_k θ_k with covariance (Σ F_k)⁻¹: generalised least squares with the
    full covariances, where an estimate enters only through the directions it
    identifies, so estimates that each fix only some directions can fix all together.
    Log-scale parameters are combined in log (where the quadratic form is accurate).
    Directions no estimate determines stay at the mean of the estimates and are reported
    by the returned :class:`Identification` (covariance in the units of ``values``).
    """
    values, log_scale = np.asarray(values, dtype=np.float64), np.asarray(log_scale, bool)
    du = np.where(log_scale, values, 1.0)  # dx/du, u = log x on log-scale entries
    u = np.where(log_scale, np.log(np.where(log_scale, values, 1.0)), values)
    f_u = infos * du[:, :, None] * du[:, None, :]
    total = f_u.sum(0)
    b = np.einsum("kij,kj->i", f_u, u)
    ident = identify(total)
    u_ref = u.mean(0)
    u_hat = u_ref + ident.inverse @ (b - total @ u_ref)
    x_hat = u_hat.copy()
    x_hat[log_scale] = np.exp(u_hat[log_scale])
    jac = np.where(log_scale, x_hat, 1.0)
    inverse = ident.inverse * np.outer(jac, jac)
    return x_hat, replace(ident, inverse=inverse, information=total / np.outer(jac, jac))
