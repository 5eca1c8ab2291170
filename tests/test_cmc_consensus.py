"""Consensus Monte Carlo is exact, at any shard count, through the real shard model.

The shard model (:func:`cmc_shard.sample_shard`: NumPyro NUTS on the tempered target of
:mod:`cmc_space`) and the real combination stage are run with a likelihood chosen so
that every shard posterior is an exact Gaussian in the combination coordinates u:
L_k(θ) = N(u(θ); μ_k, KΣ) · [π(θ)·|∂θ/∂u|]^(−1/K), with a non-flat TruncatedNormal prior
π in bounds. The K shard targets L_k·[π·|∂θ/∂u|]^(1/K) are then N(u; μ_k, KΣ), whose
consensus is exactly N(u; mean μ_k, Σ): the full posterior of Π L_k · π. Any factor
tempered wrongly (a Jacobian counted K times, the prior of a bounded site raised to the
wrong power, a Jacobian of the sampling coordinates forgotten) leaves a non-Gaussian
factor that moves the answer. The alpha posterior sits near 0.6, where the rates
Jacobian 1/|m_early − m_late| changes by ~2 % per posterior sd, so 16 copies of it
move the mean by about 0.3 sd. Every shard's Gaussian lies well inside the prior's
bounds (a shard truncated by a bound is not Gaussian, and no consensus is exact then).
The prior and Jacobian functions are checked here against SciPy and finite
differences, independently of the package.
"""

from __future__ import annotations

import json

import arviz as az
import numpy as np
import pytest
from scipy.stats import truncnorm

from homodyne_steps._jax import jax, jnp
from homodyne_steps.cmc_combine import CombineSettings, combine_stage
from homodyne_steps.cmc_shard import SamplerSettings, sample_shard
from homodyne_steps.cmc_space import (
    COMBINATION,
    log_abs_det,
    log_prior,
    make_space,
    theta_from_w,
    w_from_theta,
)

NAMES = ("D0", "alpha", "D_offset")
LOWER, UPPER = np.array([100.0, -2.0, -1e5]), np.array([1e5, 2.0, 1e5])
PRIOR_MU, PRIOR_SD = np.array([8000.0, 0.4, 200.0]), np.array([5000.0, 0.3, 1000.0])
T = 0.05 * np.arange(1, 301)  # s
THETA_TRUE = np.array([1.0e4, 0.6, 300.0])


def _space():
    return make_space(NAMES, LOWER, UPPER, PRIOR_MU, PRIOR_SD, t=T)


def _theta_from_u(u):
    """(D0, alpha, D_offset) from (D_early, logit alpha, D_late), written out here
    independently of the package."""
    t = np.sort(T[T > 0])
    t_e, t_l = t[: t.size // 2], t[t.size // 2 :]
    alpha = LOWER[1] + (UPPER[1] - LOWER[1]) / (1 + np.exp(-u[..., 1]))
    m_e = (t_e ** alpha[..., None]).mean(-1)
    m_l = (t_l ** alpha[..., None]).mean(-1)
    d0 = (u[..., 0] - u[..., 2]) / (m_e - m_l)
    return np.stack([d0, alpha, u[..., 0] - d0 * m_e], axis=-1)


def _log_abs_jacobian(u, h=1e-6):
    """log|det ∂θ/∂u| by central differences, one u at a time."""
    out = np.empty(u.shape[0])
    for n, x in enumerate(u):
        jac = np.empty((3, 3))
        for j in range(3):
            step = np.zeros(3)
            step[j] = h * max(1.0, abs(x[j]))
            jac[:, j] = (_theta_from_u(x + step) - _theta_from_u(x - step)) / (2 * step[j])
        out[n] = np.linalg.slogdet(jac)[1]
    return out


def _gaussian_loglik(mu_u, precision, space, num_shards):
    """N(u(θ); μ_k, KΣ) · [π(θ)·|∂θ/∂u|]^(−1/K): the shard's target becomes N(u; μ_k, KΣ)."""

    def loglik(theta):
        d = w_from_theta(theta, space, COMBINATION) - mu_u
        cancel = log_prior(theta, space) + log_abs_det(theta, space, COMBINATION)
        return -0.5 * d @ (precision @ d) - cancel / num_shards, {}

    return loglik


def _run(tmp_path, K, coords, u_means, u_cov_shard, space, sampler):
    precision = jnp.asarray(np.linalg.inv(u_cov_shard))
    ncs, jss = [], []
    for k in range(K):
        loglik = _gaussian_loglik(jnp.asarray(u_means[k]), precision, space, K)
        theta0 = np.asarray(theta_from_w(u_means.mean(0), space, "rates"))
        idata, rec = sample_shard(space, coords, K, loglik, theta0, sampler, shard=k)
        idata.posterior.attrs.update(
            shard=k, num_shards=K, n_points=1000, analysis_mode="static",
            per_angle_scaling="constant",
        )  # fmt: skip
        nc, js = tmp_path / f"{coords}_{K}_{k}.nc", tmp_path / f"{coords}_{K}_{k}.json"
        idata.to_netcdf(str(nc))
        js.write_text(json.dumps({"shard": k, "num_shards": K, "n_points": 1000, **rec}))
        ncs.append(nc)
        jss.append(js)
    return combine_stage(
        ncs, jss, tmp_path / f"out_{coords}_{K}", CombineSettings(method="consensus_mc")
    )


def test_prior_and_jacobian_against_scipy_and_finite_differences():
    space = _space()
    rng = np.random.default_rng(3)
    u = np.asarray(w_from_theta(THETA_TRUE, space, "rates")) + rng.normal(0, 0.05, (20, 3)) * [
        100,
        1,
        100,
    ]
    theta = _theta_from_u(u)
    np.testing.assert_allclose(np.asarray(theta_from_w(u, space, "rates")), theta, rtol=1e-10)
    np.testing.assert_allclose(
        np.asarray(log_abs_det(theta, space, "rates")), _log_abs_jacobian(u), atol=1e-5
    )
    a, b = (LOWER - PRIOR_MU) / PRIOR_SD, (UPPER - PRIOR_MU) / PRIOR_SD
    ref = truncnorm.logpdf(theta, a, b, loc=PRIOR_MU, scale=PRIOR_SD).sum(-1)
    diff = np.asarray(log_prior(theta, space)) - ref
    np.testing.assert_allclose(diff, diff[0], atol=1e-9)  # equal up to a constant
    outside = theta.copy()
    outside[0, 0] = 50.0  # D0 below its bound
    assert np.asarray(log_prior(outside, space))[0] == -np.inf
    # every sampling coordinate system maps back and forth, and its Jacobian matches
    for coords in ("rates", "none", "log_reference"):
        w = np.asarray(w_from_theta(theta, space, coords))
        np.testing.assert_allclose(np.asarray(theta_from_w(w, space, coords)), theta, rtol=1e-9)
        jac = np.stack(
            [np.asarray(jax.jacfwd(lambda x, c=coords: theta_from_w(x, space, c))(x)) for x in w]
        )
        np.testing.assert_allclose(
            np.asarray(log_abs_det(theta, space, coords)),
            np.linalg.slogdet(jac)[1],
            atol=1e-8,
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    "coords,K,width,tol",
    [("rates", 16, 0.5, 0.1), ("none", 4, 0.1, 0.2), ("log_reference", 4, 0.1, 0.2)],
)
def test_consensus_is_the_full_posterior(tmp_path, coords, K, width, tol):
    # ``none`` samples (D0, alpha, D_offset) through their logits, where a wide posterior
    # is a curved valley that NUTS barely mixes in (the reason ``rates`` is the default);
    # there the data are made 5 times more informative.
    rng = np.random.default_rng(7)
    space = _space()
    u_true = np.asarray(w_from_theta(THETA_TRUE, space, "rates"))
    # full-data likelihood N(u; ū, Σ) in (D_early, logit alpha, D_late), correlated as
    # data make them
    sd = width * np.array([40.0, 0.04, 60.0])
    corr = np.array([[1.0, 0.5, 0.3], [0.5, 1.0, -0.4], [0.3, -0.4, 1.0]])
    cov = corr * np.outer(sd, sd)
    # shard likelihoods N(u; μ_k, K Σ) whose product is N(u; mean μ_k, Σ)
    u_means = u_true + rng.multivariate_normal(np.zeros(3), (K - 1) * cov, K)
    sampler = SamplerSettings(num_warmup=150, num_samples=1000, num_chains=2)
    out = _run(tmp_path, K, coords, u_means, K * cov, space, sampler)
    assert out.status != "not_converged", out.quality["warnings"]
    u = np.asarray(w_from_theta(out.draws[..., :3], space, COMBINATION)).reshape(-1, 3)
    z = (u.mean(0) - u_means.mean(0)) / sd
    ratio = u.std(0) / sd
    assert np.all(np.abs(z) < tol), (coords, z, ratio)
    assert np.all(np.abs(ratio - 1) < tol), (coords, z, ratio)
    np.testing.assert_allclose(np.corrcoef(u, rowvar=False), corr, atol=tol / 2)
    post = az.from_netcdf(tmp_path / f"{coords}_{K}_0.nc").posterior
    assert post.attrs["prior_tempering"] == pytest.approx(1 / K)
