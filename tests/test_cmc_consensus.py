"""Consensus Monte Carlo is exact, at any shard count, through the real shard model.

Each shard's log-likelihood is an exact Gaussian in the combination coordinates u
(:mod:`homodyne_steps.physics.cmc_space`), L_k = N(u; μ_k, KΣ), so the product of the K shard
likelihoods is N(u; mean μ_k, Σ). The prior is a non-flat TruncatedNormal in the
registry parameters θ, with bounds, and as informative as the data in places: the full
posterior, p(u) ∝ N(u; ū, Σ) · π(θ(u)) · |∂θ/∂u|, is far from Gaussian in u. It is
computed here independently of the package (SciPy's truncated normal, a
finite-difference Jacobian, importance sampling), and the consensus of K shards run
through the real shard model (:func:`cmc_shard.sample_shard`) and the real combination
stage must reproduce it. Every shard's likelihood lies well inside the prior's bounds:
in the ``none`` and ``log_reference`` sampling coordinates a shard cannot leave them,
and a shard cut by a bound is not Gaussian.
"""

from __future__ import annotations

import json

import arviz as az
import numpy as np
import pytest
from scipy.stats import truncnorm

from homodyne_steps._jax import jax, jnp
from homodyne_steps.errors import DataError
from homodyne_steps.inference.cmc_shard_settings import SamplerSettings
from homodyne_steps.physics.cmc_space import (
    COMBINATION,
    log_abs_det,
    log_prior,
    log_prior_weight,
    make_space,
    shard_log_density,
    shear_sign_ok,
    theta_from_w,
    w_from_theta,
    with_shear_convention,
    with_surrogate,
)
from homodyne_steps.stages.cmc_combine import CombineSettings, combine_stage
from homodyne_steps.stages.cmc_shard import sample_shard

NAMES = ("D0", "alpha", "D_offset")
LOWER, UPPER = np.array([100.0, -2.0, -1e5]), np.array([1e5, 2.0, 1e5])
PRIOR_MU, PRIOR_SD = np.array([9000.0, 0.55, 200.0]), np.array([1500.0, 0.05, 300.0])
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


def _reference(u_mean, u_cov, rng, n=100_000):
    """Mean and sd of θ under the full posterior, by importance sampling from the
    Gaussian likelihood in u with weights π(θ(u))·|∂θ/∂u|."""
    u = rng.multivariate_normal(u_mean, u_cov, n)
    theta = _theta_from_u(u)
    a, b = (LOWER - PRIOR_MU) / PRIOR_SD, (UPPER - PRIOR_MU) / PRIOR_SD
    log_w = truncnorm.logpdf(theta, a, b, loc=PRIOR_MU, scale=PRIOR_SD).sum(-1)
    ok = np.isfinite(log_w)
    log_w[ok] += _log_abs_jacobian(u[ok])
    w = np.where(ok, np.exp(log_w - log_w[ok].max()), 0.0)
    w /= w.sum()
    mean = w @ theta
    sd = np.sqrt(w @ (theta - mean) ** 2)
    return mean, sd, 1.0 / np.sum(w**2)


def _gaussian_loglik(mu_u, precision, space):
    def loglik(theta):
        d = w_from_theta(theta, space, COMBINATION) - mu_u
        return -0.5 * d @ (precision @ d), {}

    return loglik


def _run(tmp_path, K, coords, u_means, u_cov_shard, space, sampler):
    precision = jnp.asarray(np.linalg.inv(u_cov_shard))
    ncs, jss = [], []
    for k in range(K):
        loglik = _gaussian_loglik(jnp.asarray(u_means[k]), precision, space)
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


def test_shards_keep_the_shear_sign_convention_not_the_shear_bounds():
    # c2 is even in γ̇(t): the likelihood at γ̇ and at −γ̇ is the same. Shards take the image
    # whose mean shear rate is >= 0; the registry's gamma_dot_t0 > 0 would cut a shard
    # wherever its beta posterior reaches 0 (gamma_dot_t0 changes sign with beta there).
    names = ("D0", "alpha", "D_offset", "gamma_dot_t0", "beta", "gamma_dot_t_offset", "phi0")
    lower = np.array([100.0, -2.0, -1e5, 1e-6, -2.0, -0.1, -10.0])
    upper = np.array([1e5, 2.0, 1e5, 0.5, 2.0, 0.1, 10.0])
    space = make_space(names, lower, upper, (lower + upper) / 2, upper - lower, t=T)
    theta = np.array([1e4, -0.2, 500.0, 2e-4, 0.25, 2e-5, 3.0])
    space = with_surrogate(space, theta, np.array([1e3, 0.05, 100, 2e-5, 0.05, 2e-6, 0.3]))

    def flat(th):
        return jnp.zeros(()), {}

    def density(th, coords="rates"):
        w = w_from_theta(jnp.asarray(th), space, coords)
        return float(shard_log_density(w, space, coords, 4, flat)[0])

    mirror = theta * np.array([1, 1, 1, -1, 1, -1, 1])  # −γ̇(t): the same c2
    # beta < 0 at the same mean rates: gamma_dot_t0 < 0, outside the registry bounds
    t_pos = np.sort(T)
    m_e, m_l = (t_pos[:150] ** -0.05).mean(), (t_pos[150:] ** -0.05).mean()
    m_e0, m_l0 = (t_pos[:150] ** 0.25).mean(), (t_pos[150:] ** 0.25).mean()
    g_e, g_l = 2e-4 * m_e0 + 2e-5, 2e-4 * m_l0 + 2e-5
    a = (g_e - g_l) / (m_e - m_l)
    other_side = theta.copy()
    other_side[3:6] = [a, -0.05, g_e - a * m_e]
    assert other_side[3] < 0 < g_e + g_l
    assert np.isfinite(density(theta)) and np.isfinite(density(theta, "none"))
    assert density(mirror) == -np.inf
    assert np.isfinite(density(other_side, "rates"))  # not cut by gamma_dot_t0 > 0
    u = np.stack([w_from_theta(x, space, COMBINATION) for x in (theta, mirror, other_side)])
    assert np.asarray(shear_sign_ok(u, space)).tolist() == [True, False, True]
    # a start (the NLSQ optimum) with a negative mean shear rate becomes its mirror image
    np.testing.assert_array_equal(with_shear_convention(mirror, space), theta)
    np.testing.assert_array_equal(with_shear_convention(theta, space), theta)
    with pytest.raises(DataError, match="`none` cannot represent gamma_dot_t0 < 0"):
        sample_shard(space, "none", 1, flat, mirror, SamplerSettings())
    # the combined posterior keeps the same convention, and the prior's bounds
    weights = np.asarray(log_prior_weight(u, space, 1.0))
    assert np.isfinite(weights[0]) and weights[1] == weights[2] == -np.inf


@pytest.mark.slow
@pytest.mark.parametrize(
    "coords,K,width,tol",
    [("rates", 16, 0.5, 0.15), ("none", 4, 0.1, 0.2), ("log_reference", 4, 0.1, 0.2)],
)
def test_consensus_is_the_full_posterior(tmp_path, coords, K, width, tol):
    # ``none`` samples (D0, alpha, D_offset) through their logits, ``log_reference`` log D0
    # at t_ref: a wide posterior is a curved valley there that NUTS barely mixes in (the
    # reason ``rates`` is the default; at width 0.25 one log_reference shard of four had
    # 147 divergences and ESS 33, or none, depending on rounding in its metric), so for
    # them the data are made 10 times more informative. The workflow never shards these
    # two (the plan refuses); this checks that their shard density is the same measure.
    rng = np.random.default_rng(7)
    sd = width * np.array([40.0, 0.04, 60.0])  # (D_early, logit alpha, D_late)
    corr = np.array([[1.0, 0.5, 0.3], [0.5, 1.0, -0.4], [0.3, -0.4, 1.0]])
    cov = corr * np.outer(sd, sd)
    base = _space()
    u_true = np.asarray(w_from_theta(THETA_TRUE, base, "rates"))
    # shard likelihoods N(u; μ_k, K Σ) whose product is N(u; mean μ_k, Σ)
    u_means = u_true + rng.multivariate_normal(np.zeros(3), (K - 1) * cov, K)
    ref_mean, ref_sd, ess = _reference(u_means.mean(0), cov, rng)
    assert ess > 5_000  # the importance sampler itself is reliable
    theta0 = np.asarray(theta_from_w(u_means.mean(0), base, "rates"))
    space = with_surrogate(base, theta0, ref_sd)
    sampler = SamplerSettings(num_warmup=150, num_samples=1000, num_chains=2)
    out = _run(tmp_path, K, coords, u_means, K * cov, space, sampler)
    assert out.status != "not_converged", out.quality["warnings"]
    draws = out.draws.reshape(-1, out.draws.shape[-1])[:, :3]
    z = (draws.mean(0) - ref_mean) / ref_sd
    ratio = draws.std(0) / ref_sd
    assert np.all(np.abs(z) < tol), (coords, z, ratio)
    assert np.all(np.abs(ratio - 1) < tol), (coords, z, ratio)
    report = json.loads((tmp_path / f"out_{coords}_{K}" / "combination_report.json").read_text())
    assert report["prior_application"]["reliable"] is True
    post = az.from_netcdf(tmp_path / f"{coords}_{K}_0.nc").posterior
    assert post.attrs["prior_tempering"] == pytest.approx(1 / K)
