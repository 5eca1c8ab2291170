r"""Where the CMC shards' surrogate prior G sits: at the approximate posterior mode.

The shards sample L_k·G^(1/K) and the prior π is applied after the combination, with
importance weights π/G (:mod:`homodyne_steps.physics.cmc_space`). That works when L·G
and L·π put their mass in the same place. When the data fix D(t) over the measured
window but not D0, alpha and D_offset separately, the likelihood is flat along a valley
and its maximum may lie far out along it (measured on speckle files, 3 φ × 200 frames:
12 of 30 NLSQ optima at the D0 bound 1e5 with D_offset ≈ −9e4, where π is ~e⁻⁴⁰⁰⁰ times
its value at the truth). A G centred there, as wide as the likelihood, leaves every
shard free to wander along the valley (to alpha ≈ 1.8, D0 < 0), the shard posteriors
are far from Gaussian, and no combined draw lies inside the prior bounds.

So G is centred on the mode of the *approximate posterior*: the likelihood as the
Gaussian that NLSQ reports (mean θ̂, covariance Σ, carried to the combination
coordinates u by J = ∂u/∂θ) times the prior π (its Gaussian factors, the bounds as a
stiff penalty). Its widths are ``width`` × the approximate posterior's marginal sd
(Gauss–Newton curvature of the same objective), and its centre lies beyond that mode,
away from the likelihood's maximum, by as much as puts the mode of L·G (what the
shards sample) on it: a G wider than the posterior, centred on the mode, let the
likelihood pull L·G ``width``² times as far off as it pulls the posterior. Where the
data dominate, the posterior is the likelihood and G is what it always was (θ̂ with
NLSQ widths); along a valley the prior now holds the shards where the posterior is.
The importance weights π/G still correct for every approximation made here (the Pareto
k̂ says whether they can), so G's place changes the efficiency, not the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from scipy.optimize import minimize

from homodyne_steps._jax import jax, jnp
from homodyne_steps.inference.shard_mode import shard_mode
from homodyne_steps.io.nlsq_files import NlsqParameters
from homodyne_steps.io.record import or_none
from homodyne_steps.physics.cmc_space import (
    COMBINATION,
    SURROGATE_WIDTH,
    SampledSpace,
    shear_sign_ok,
    theta_from_w,
    w_from_theta,
)

_BOUND_STIFFNESS = 1e6  # penalty per (prior σ)² beyond a bound: G's centre stays inside


def likelihood_covariance(
    space: SampledSpace, n_physical: int, covariance: Any, sd: Any
) -> np.ndarray:
    """Σ over ``space.names``: NLSQ's covariance of the first ``n_physical`` parameters
    where it is finite (rows with an undefined entry keep only their own ``sd``), then
    ``sd`` alone (no correlation) for the rest. ``sd`` are the θ widths used where the
    covariance says nothing (the prior σ of a parameter NLSQ could not determine)."""
    sd = np.asarray(sd, dtype=np.float64)
    cov = np.diag(sd**2)
    if covariance is not None:
        block = np.asarray(covariance, dtype=np.float64).reshape(n_physical, n_physical)
        diag = np.diag(block)
        idx = np.flatnonzero(np.isfinite(diag) & (diag > 0))
        idx = idx[np.all(np.isfinite(block[np.ix_(idx, idx)]), axis=1)]
        cov[np.ix_(idx, idx)] = block[np.ix_(idx, idx)]
    return cov


def nlsq_likelihood_covariance(
    nlsq_params: NlsqParameters, names: Sequence[str], space: SampledSpace, theta0, nlsq_theta
) -> np.ndarray:
    """The likelihood's θ covariance for the surrogate: NLSQ's where it is defined (in
    the shards' sign convention ``theta0``; entries that differ from ``nlsq_theta`` are
    the mirror image); elsewhere the NLSQ σ, or the prior σ for
    the scaling parameters and a parameter NLSQ could not determine."""
    sd = np.array(space.prior_sigma, dtype=np.float64)
    for k, n in enumerate(names):
        unc = nlsq_params.parameters[n].uncertainty
        if unc is not None and math.isfinite(unc) and unc > 0:
            sd[k] = float(unc)
    recorded = or_none(nlsq_params.covariance)
    block = None
    if recorded is not None and list(recorded.names) == list(names):
        block = np.array([[np.nan if x is None else x for x in row] for row in recorded.matrix])
        signs = np.where(np.asarray(theta0)[: len(names)] == np.asarray(nlsq_theta), 1.0, -1.0)
        block = block * np.outer(signs, signs)
    return likelihood_covariance(space, len(names), block, sd)


def place_surrogate(
    space: SampledSpace,
    theta_hat: Any,
    cov_theta: Any,
    width: float = SURROGATE_WIDTH,
    u_max: Any = None,
) -> tuple[SampledSpace, np.ndarray, dict[str, Any]]:
    """(``space`` with G, the approximate posterior mode θ_c, a record of the move).

    ``theta_hat`` (inside the bounds, the shards' sign convention) and ``cov_theta``
    (p × p over ``space.names``) are the likelihood's Gaussian summary; ``u_max``, where
    given, is the likelihood's maximum in u (:func:`likelihood_maximum`) when it lies
    elsewhere than ``theta_hat`` (an optimum held by a bound).
    """
    theta_hat = np.asarray(theta_hat, dtype=np.float64)

    def to_u(th):
        return w_from_theta(th, space, COMBINATION)

    u_nlsq = np.asarray(to_u(jnp.asarray(theta_hat)))
    u_hat = u_nlsq if u_max is None else np.asarray(u_max, dtype=np.float64)
    jac = np.asarray(jax.jacfwd(to_u)(jnp.asarray(theta_hat)))
    v_u = jac @ np.asarray(cov_theta, dtype=np.float64) @ jac.T
    scale = np.sqrt(np.diag(v_u))
    if not (np.all(np.isfinite(u_hat)) and np.all(np.isfinite(scale)) and np.all(scale > 0)):
        raise ValueError(
            f"cannot centre the shards' surrogate prior near {theta_hat.tolist()}: a value on "
            "a bound or a zero or undefined width"
        )
    # the likelihood's precision in s = (u − û)/scale; directions it does not fix get ~0
    eig, vec = np.linalg.eigh(v_u / np.outer(scale, scale))
    precision = (vec / np.maximum(eig, 1e-12)) @ vec.T
    prior_sd = np.where(np.isfinite(space.prior_sigma), space.prior_sigma, np.inf)

    def theta_of(s):
        return theta_from_w(jnp.asarray(u_hat) + s * scale, space, COMBINATION)

    s_c = _approximate_mode(space, theta_of, precision, prior_sd)
    u_c = u_hat + s_c * scale
    theta_c = np.asarray(theta_of(jnp.asarray(s_c)))
    inside = np.all((theta_c >= space.lower) & (theta_c <= space.upper))
    if not (np.all(np.isfinite(theta_c)) and inside and bool(shear_sign_ok(u_c, space))):
        s_c = (u_nlsq - u_hat) / scale  # keep the NLSQ optimum
        theta_c = theta_hat
    sd_u = width * scale * _posterior_sd(theta_of, s_c, precision, prior_sd)
    if not (np.all(np.isfinite(sd_u)) and np.all(sd_u > 0)):
        raise ValueError(f"the shards' surrogate prior has a zero or undefined width: {sd_u}")
    distance = float(np.sqrt(s_c @ precision @ s_c))
    # L·G, not G, on the approximate posterior mode: G's slope there balances the
    # likelihood's, −precision·s_c (in s; the likelihood's maximum is at s = 0)
    sd_s = sd_u / scale
    s_g = s_c + sd_s**2 * (precision @ s_c)
    if not np.all(np.isfinite(s_g)):
        s_g = s_c
    shift = float(np.sqrt(np.sum(((s_g - s_c) / sd_s) ** 2)))
    record = {
        "center": dict(zip(space.names, map(float, theta_c), strict=True)),
        "nlsq_optimum": dict(zip(space.names, map(float, theta_hat), strict=True)),
        "distance_sd": distance if math.isfinite(distance) else None,
        "width_sd": float(width),
        "offset_sd": shift,
    }
    return replace(space, surrogate_mu=u_hat + s_g * scale, surrogate_sd=sd_u), theta_c, record


def _posterior_sd(theta_of, s_c, precision, prior_sd) -> np.ndarray:
    """Marginal sd in s of the approximate posterior at s_c: the Gauss–Newton curvature
    of the likelihood plus the prior's Gaussian factors."""
    a = np.asarray(jax.jacfwd(theta_of)(jnp.asarray(s_c)))
    w_prior = np.where(np.isfinite(prior_sd), 1.0 / prior_sd**2, 0.0)
    post_cov = np.linalg.pinv(precision + a.T @ (w_prior[:, None] * a), hermitian=True)
    return np.sqrt(np.clip(np.diag(post_cov), 0.0, None))


def _approximate_mode(space: SampledSpace, theta_of, precision, prior_sd) -> np.ndarray:
    """The mode, in s (θ = ``theta_of``(s)), of the Gaussian likelihood exp(−½ sᵀ
    ``precision`` s) times the prior's Gaussian factors, the bounds as a stiff penalty."""

    def objective(s):
        th = theta_of(s)
        z_prior = jnp.where(np.isfinite(prior_sd), (th - space.prior_mu) / prior_sd, 0.0)
        below = jnp.where(np.isfinite(space.lower), jnp.maximum(space.lower - th, 0.0), 0.0)
        above = jnp.where(np.isfinite(space.upper), jnp.maximum(th - space.upper, 0.0), 0.0)
        outside = (below + above) / jnp.where(np.isfinite(prior_sd), prior_sd, 1.0)
        return 0.5 * (
            s @ precision @ s + jnp.sum(z_prior**2) + _BOUND_STIFFNESS * jnp.sum(outside**2)
        )

    value_and_grad = jax.jit(jax.value_and_grad(objective))
    res = minimize(
        lambda s: tuple(np.asarray(v, dtype=np.float64) for v in value_and_grad(jnp.asarray(s))),
        np.zeros(space.size), jac=True, method="BFGS", options={"maxiter": 500, "gtol": 1e-8},
    )  # fmt: skip
    return np.asarray(res.x, dtype=np.float64)


def likelihood_maximum(
    space: SampledSpace, loglik_u: Callable[[Any], Any], u_start: Any
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """(the maximum of the likelihood in the combination coordinates u, a record), by
    damped Newton from ``u_start`` without the parameter bounds (the shards have none),
    under the shear sign convention; None where no higher point was found.

    ``loglik_u(u)``: the whole data's log likelihood at θ(u) (a JAX function). The
    curvature adjustment must be centred here: ℓ(û + C(u − û)) keeps its maximum at û
    only if ℓ's slope is zero at û. Centred on an NLSQ optimum held by a bound, where ℓ
    still rises, it moves the maximum C⁻¹ times as far out, 20–50 times on speckle
    data (measured: every combined draw then had D0 below its bound 100).
    """

    def potential(u):
        value = loglik_u(u)
        return -jnp.where(shear_sign_ok(u, space), value, -jnp.inf)

    u_start = np.asarray(u_start, dtype=np.float64)
    start_value = float(potential(jnp.asarray(u_start)))
    mode = shard_mode(potential, u_start)
    record: dict[str, Any] = {
        "newton_status": mode.status,
        "newton_iterations": mode.iterations,
        "log_likelihood_gain": start_value - mode.potential,
    }
    if mode.status == "failed" or not mode.potential < start_value:
        return None, record
    return np.asarray(mode.w, dtype=np.float64), record


__all__ = [
    "likelihood_covariance",
    "nlsq_likelihood_covariance",
    "place_surrogate",
    "likelihood_maximum",
]
