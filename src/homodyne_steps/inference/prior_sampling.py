r"""The posterior sampled afresh when importance weights cannot carry the prior.

The combination turns draws of L·G^f into draws of L·π by importance weights π·|∂θ/∂u|
/ G^f (:func:`consensus.apply_prior`). That fails (Pareto k̂ > 0.7) when the prior is
much narrower than L·G along a direction the data leave open, or cuts the posterior
inside its bulk: on the laminar speckle files the data fix D(t) and γ̇(t) over the window
but hardly their exponents, the registry's priors on D0, D_offset and gamma_dot_t0 then
decide where along the valley the posterior sits, and in the rates coordinates
|∂θ/∂u| = 1/|m_early − m_late| has a cusp at exponent 0 (measured on one laminar file:
k̂ 1.7, 6 effective draws of 2000).

Here the likelihood is summarised instead of the posterior: the combined draws are
Gaussian in u (the consensus already assumes it of every shard), so dividing their
Gaussian by G^f gives a Gaussian likelihood L̃ in u (:func:`gaussian_likelihood`).
L̃·π is cheap (no data), so it is sampled directly by NUTS in coordinates where the
prior and its bounds are smooth, every parameter through its own transform
(:func:`sample_gaussian_likelihood_posterior`), under the shards' shear sign convention.

On that laminar file, with K = 1 where the exact likelihood can be evaluated at every
such draw, the weights L/L̃ spanned 0.55 log units (Pareto k̂ 0.01, 98 % effective): the
Gaussian L̃ is the likelihood where the posterior lies.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from homodyne_steps._jax import jax, jnp
from homodyne_steps.physics.cmc_space import (
    COMBINATION,
    SampledSpace,
    log_abs_det,
    log_prior,
    shear_sign_ok,
    theta_from_w,
    w_from_theta,
)

#: the smallest likelihood precision kept, relative to the largest (standardised
#: coordinates): a direction along which L·G is as wide as G carries no likelihood
#: information and is left to the prior
PRECISION_FLOOR = 1e-3
SAMPLING = "none"  # every parameter through its own bounded transform
MAX_DIVERGENCE_RATE = 0.05  # above it the fresh draws are not trusted
# The target needs no data, so draws are cheap, and the valley along the exponents makes
# them correlated: every second one is kept (a laminar file: ~580 leapfrog steps per draw,
# 2–3 % divergent, bulk ESS of beta 480 of 2000 draws without thinning, 660 of 2000 kept
# from 4000, 35 s; at target 0.95 the trees reach the depth limit and the ESS falls to 80)
TARGET_ACCEPT = 0.9
THINNING = 2
# Chains that disagree (split R-hat above this) are run again 4 times as long: on a laminar
# file the shear valley gave R-hat 1.13 and ESS 14 for beta at thinning 2, 1.02 and 280
# at thinning 8 (116 s)
RHAT_RETRY = 1.05
#: standard deviations of L̃ by which f_early − f_late must differ from 0 for its sign
#: (and the exponent's) to count as fixed by the data
SIGN_FIXED_Z = 3.0


def gaussian_likelihood(
    draws_u: np.ndarray, space: SampledSpace, n_joint: int, surrogate_fraction: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, precision, directions floored) of the Gaussian likelihood L̃ in u whose
    product with G^f is the Gaussian of the combined draws (chains, draws, ≥ n_joint).

    Precisions subtract: P_L = S⁻¹ − f·G⁻¹. Where the data add nothing to G, P_L is
    ~0 or slightly negative from sampling noise; such eigenvalues are raised to
    :data:`PRECISION_FLOOR` × the largest, which leaves those directions to the prior.
    """
    u = np.asarray(draws_u, dtype=np.float64)[..., :n_joint].reshape(-1, n_joint)
    mean, cov = u.mean(axis=0), np.atleast_2d(np.cov(u, rowvar=False))
    scale = np.sqrt(np.diag(cov))
    g_precision = surrogate_fraction * (scale / np.asarray(space.surrogate_sd)) ** 2
    g_mean = np.asarray(space.surrogate_mu) / scale
    s_inv = np.linalg.inv(cov / np.outer(scale, scale))
    shift = s_inv @ (mean / scale) - g_precision * g_mean
    precision = s_inv - np.diag(g_precision)
    evals, evecs = np.linalg.eigh(0.5 * (precision + precision.T))
    floor = PRECISION_FLOOR * evals[-1]
    floored = int(np.sum(evals < floor))
    precision = (evecs * np.maximum(evals, floor)) @ evecs.T
    centre = np.linalg.solve(precision, shift) * scale
    return centre, precision / np.outer(scale, scale), floored


def one_sided_exponents(
    space: SampledSpace, centre: np.ndarray, precision: np.ndarray, z: float
) -> tuple[SampledSpace, list[str]]:
    """``space`` with each power law's exponent limited to one side of 0 where L̃ fixes
    the sign of f_early − f_late to ``z`` standard deviations (with the amplitude's lower
    bound > 0 the exponent's sign is then fixed too), and the exponents so limited.

    Why: the data then fix a·(m_early(e) − m_late(e)) ≈ −a·e·Δlog t, not a and e; the
    prior lets a grow as e → 0, and in (log a, e) the posterior is a funnel NUTS cannot
    enter (measured: ESS 4 of 2000 for beta on a laminar file). Through log|e| the funnel
    is a straight valley.
    """
    lower, upper = np.array(space.lower), np.array(space.upper)
    cov = np.linalg.inv(precision)
    limited = []
    for ka, ke, ko in space.groups():
        diff = centre[ka] - centre[ko]
        sd = math.sqrt(max(cov[ka, ka] + cov[ko, ko] - 2 * cov[ka, ko], 0.0))
        if not (space.lower[ka] >= 0 and abs(diff) > z * sd and lower[ke] < 0 < upper[ke]):
            continue
        # a > 0: f_early − f_late = a·(m_early − m_late) < 0 exactly when e > 0
        if diff < 0:
            lower[ke] = 0.0
        else:
            upper[ke] = 0.0
        limited.append(space.names[ke])
    return replace(space, lower=lower, upper=upper), limited


def _log_target(space: SampledSpace, sampling_space: SampledSpace, centre, precision):
    """log L̃(u(θ(w)))·π(θ)·|∂θ/∂w| in the sampling coordinates w (each parameter
    through its own transform onto ``sampling_space``'s bounds), −inf where the shear
    sign convention does not hold."""
    centre, precision = jnp.asarray(centre), jnp.asarray(precision)

    def log_density(w):
        theta = theta_from_w(w, sampling_space, SAMPLING)
        u = w_from_theta(theta, space, COMBINATION)
        r = u - centre
        value = -0.5 * r @ (precision @ r) + log_prior(theta, space)
        value = value + log_abs_det(theta, sampling_space, SAMPLING)
        return jnp.where(shear_sign_ok(u, space) & jnp.isfinite(value), value, -jnp.inf)

    return log_density


def _start(
    space: SampledSpace, sampling_space: SampledSpace, draws_u: np.ndarray, n_joint: int,
    log_density,
) -> np.ndarray | None:  # fmt: skip
    """The combined draw with the highest target density, in w (None: none is inside)."""
    u = np.asarray(draws_u, dtype=np.float64)[..., :n_joint].reshape(-1, n_joint)
    theta = np.asarray(theta_from_w(u, space, COMBINATION))
    with np.errstate(all="ignore"):
        w = np.asarray(w_from_theta(theta, sampling_space, SAMPLING))
    finite = np.all(np.isfinite(w), axis=1)
    if not finite.any():
        return None
    values = np.asarray(jax.vmap(log_density)(jnp.asarray(np.where(finite[:, None], w, 0.0))))
    values = np.where(finite & np.isfinite(values), values, -np.inf)
    return None if not np.isfinite(values.max()) else w[int(np.argmax(values))]


def sample_gaussian_likelihood_posterior(
    draws_u: np.ndarray,
    space: SampledSpace,
    n_joint: int,
    surrogate_fraction: float,
    seed: int = 0,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Draws (same chains × draws as ``draws_u``) of L̃·π in u, L̃ the Gaussian
    likelihood of the combined draws (:func:`gaussian_likelihood`); columns beyond
    ``n_joint`` keep the combined draws' values. (None, record) when no combined draw
    lies where L̃·π > 0 to start from."""
    C, D = draws_u.shape[:2]
    centre, precision, floored = gaussian_likelihood(draws_u, space, n_joint, surrogate_fraction)
    sampling_space, one_sided = one_sided_exponents(space, centre, precision, SIGN_FIXED_Z)
    log_density = _log_target(space, sampling_space, centre, precision)
    record: dict[str, Any] = {
        "method": "gaussian_likelihood_times_prior",
        "summary": (
            "the combined draws' Gaussian divided by G gives a Gaussian likelihood in the "
            "combination coordinates; it times the exact prior was sampled by NUTS with every "
            "parameter through its own bounded transform"
        ),
        "directions_left_to_the_prior": floored,
        "exponents_of_fixed_sign": one_sided,
    }
    w0 = _start(space, sampling_space, draws_u, n_joint, log_density)
    if w0 is None:
        return None, {**record, "reliable": False}
    thinning = THINNING
    w, extra = _run_nuts(log_density, w0, C, D, thinning, seed)
    if _max_split_rhat(w) > RHAT_RETRY:  # chains that have not met: 4 times as long
        thinning = 4 * THINNING
        w, extra = _run_nuts(log_density, w0, C, D, thinning, seed)
    divergences = int(np.asarray(extra["diverging"]).sum())
    out = np.array(draws_u, dtype=np.float64, copy=True)
    theta = theta_from_w(jnp.asarray(w), sampling_space, SAMPLING)
    out[..., :n_joint] = np.asarray(w_from_theta(theta, space, COMBINATION))
    rate = divergences / (C * D)
    record.update(
        {
            "thinning": thinning,
            "divergences": divergences,
            "divergence_rate": rate,
            "mean_leapfrog_steps": float(np.asarray(extra["num_steps"]).mean()),
            "reliable": bool(rate <= MAX_DIVERGENCE_RATE and np.all(np.isfinite(out))),
        }
    )
    return out, record


def redraw(draws_u, space, n_joint, surrogate_fraction, seed, weighting):
    """Where importance weights cannot carry the prior: (fresh draws of the Gaussian
    likelihood of the combined draws times the exact prior, or None; record). The
    weights' record ``weighting`` is kept under ``importance_weights``; what it says of
    the combined draws (k̂, draws outside and bounds crossed) stays at the top."""
    fresh, record = sample_gaussian_likelihood_posterior(
        draws_u, space, n_joint, surrogate_fraction, seed
    )
    about_draws = ("pareto_k", "draws_outside_bounds", "bounds_crossed")
    record = {
        **record,
        **{k: weighting[k] for k in about_draws},
        "importance_weights": {k: v for k, v in weighting.items() if k not in about_draws[1:]},
    }
    return fresh, record


def _run_nuts(log_density, w0, chains: int, draws: int, thinning: int, seed: int):
    """(draws (chains, draws, p) in v, extra fields) of NUTS on the cheap target, every
    ``thinning``-th kept."""
    from numpyro.infer import MCMC, NUTS

    kernel = NUTS(potential_fn=lambda w: -log_density(w), dense_mass=True,
                  target_accept_prob=TARGET_ACCEPT, max_tree_depth=10)  # fmt: skip
    mcmc = MCMC(kernel, num_warmup=max(draws, 500), num_samples=thinning * draws,
                num_chains=chains, thinning=thinning, chain_method="sequential",
                progress_bar=False)  # fmt: skip
    mcmc.run(
        jax.random.PRNGKey(seed),
        # NumPyro takes one chain's start without the chain axis
        init_params=jnp.tile(jnp.asarray(w0), (chains, 1)) if chains > 1 else jnp.asarray(w0),
        extra_fields=("diverging", "num_steps"),
    )
    return np.asarray(mcmc.get_samples(group_by_chain=True)), mcmc.get_extra_fields(
        group_by_chain=True
    )


def _max_split_rhat(w: np.ndarray) -> float:
    """The largest split R-hat over the coordinates of draws (chains, draws, p)."""
    from numpyro.diagnostics import split_gelman_rubin

    return float(np.nanmax(split_gelman_rubin(w)))


__all__ = [
    "PRECISION_FLOOR",
    "gaussian_likelihood",
    "redraw",
    "sample_gaussian_likelihood_posterior",
]
