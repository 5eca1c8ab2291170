"""The posterior sampled afresh where importance weights cannot carry the prior
(inference/prior_sampling.py), checked against importance sampling from the prior itself
with millions of draws: no NUTS, no coordinates, no Gaussian fit."""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from homodyne_steps.inference.prior_sampling import (
    gaussian_likelihood,
    one_sided_exponents,
    sample_gaussian_likelihood_posterior,
)
from homodyne_steps.physics.cmc_space import make_space, theta_from_w, w_from_theta
from homodyne_steps.physics.registry import REGISTRY

T = 0.1 * np.arange(1, 201)  # s: the static reference case's 200 frames
NAMES = REGISTRY.physical_names("static")  # D0, alpha, D_offset with the registry's priors
LO, HI = (np.asarray(b, dtype=float) for b in REGISTRY.bounds(NAMES))
MU = np.array([REGISTRY[n].prior_mu for n in NAMES])
SD = np.array([REGISTRY[n].prior_sigma for n in NAMES])


def _space():
    return make_space(NAMES, LO, HI, MU, SD, t=T)


def _gaussian_product(m1, p1, m2, p2):
    """(mean, covariance) of N(m1, p1⁻¹)·N(m2, p2⁻¹)."""
    cov = np.linalg.inv(p1 + p2)
    return cov @ (p1 @ m1 + p2 @ m2), cov


def _case(seed=0):
    """A Gaussian likelihood in u whose maximum lies near D0's bound 100 (at fixed alpha
    a third of its D0 mass below it), a surrogate G 3 × as wide, and 2 × 1000 iid draws
    of L·G (what the consensus of Gaussian shards gives)."""
    space = _space()
    u_centre = np.asarray(w_from_theta(np.array([300.0, 0.3, 2000.0]), space, "rates"))
    sd_u = np.array([200.0, 0.3, 200.0])
    corr = np.array([[1.0, 0.2, 0.5], [0.2, 1.0, -0.1], [0.5, -0.1, 1.0]])
    precision = np.linalg.inv(corr * np.outer(sd_u, sd_u))
    placed = replace(space, surrogate_mu=u_centre + 0.5 * sd_u, surrogate_sd=3.0 * sd_u)
    mean, cov = _gaussian_product(u_centre, precision, placed.surrogate_mu,
                                  np.diag(1.0 / placed.surrogate_sd**2))  # fmt: skip
    draws = np.random.default_rng(seed).multivariate_normal(mean, cov, size=(2, 1000))
    return placed, u_centre, precision, draws


@functools.cache
def _reference(n=3_000_000, seed=5):
    """Posterior means and sds of the case's L·π by importance sampling from the
    truncated prior, and the effective number of its draws."""
    space, u_centre, precision, _ = _case()
    rng = np.random.default_rng(seed)
    a, b = (LO - MU) / SD, (HI - MU) / SD
    theta = np.stack(
        [stats.truncnorm.rvs(a[j], b[j], MU[j], SD[j], size=n, random_state=rng)
         for j in range(3)], axis=1,
    )  # fmt: skip
    r = np.asarray(w_from_theta(theta, space, "rates")) - u_centre
    log_w = -0.5 * np.einsum("ni,ij,nj->n", r, precision, r)
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    ess = 1.0 / np.sum(w**2)
    mean = w @ theta
    sd = np.sqrt(w @ (theta - mean) ** 2)
    return mean, sd, ess


def test_the_gaussian_likelihood_is_recovered_from_draws_of_its_product_with_g():
    space, u_centre, precision, draws = _case()
    centre, found, floored = gaussian_likelihood(draws, space, 3, 1.0)
    assert floored == 0
    sd_u = np.sqrt(np.diag(np.linalg.inv(precision)))
    # 2000 draws: the mean to a few hundredths of an sd, the precision to ~10 %
    assert np.all(np.abs(centre - u_centre) < 0.1 * sd_u)
    scale = np.outer(sd_u, sd_u)
    np.testing.assert_allclose(found * scale, precision * scale, atol=0.15)


@pytest.mark.slow
def test_a_posterior_cut_by_a_bound_matches_importance_sampling_from_the_prior():
    space, _, _, draws = _case()
    ref_mean, ref_sd, ess = _reference()
    assert ess > 2000  # the reference itself is precise
    out, record = sample_gaussian_likelihood_posterior(draws, space, 3, 1.0, seed=1)
    assert record["reliable"] and record["divergence_rate"] < 0.02
    assert record["thinning"] == 2  # the chains agreed at once
    theta = np.asarray(theta_from_w(out, space, "rates")).reshape(-1, 3)
    assert np.all(theta[:, 0] >= 100.0)  # the bound holds
    assert np.mean(theta[:, 0] < 600.0) > 0.05  # and the posterior reaches it
    assert np.all(np.abs(theta.mean(axis=0) - ref_mean) < 0.15 * ref_sd)
    np.testing.assert_allclose(theta.std(axis=0), ref_sd, rtol=0.15)


def test_an_exponent_is_held_to_one_side_only_where_the_data_fix_the_rates_order():
    space, u_centre, precision, _ = _case()
    # here D_early − D_late is within 1 sd of 0: the exponent may take either sign
    _, limited = one_sided_exponents(space, u_centre, precision, 3.0)
    assert limited == []
    # D(t) rising by 10 sd over the window: with D0 > 0, alpha > 0
    rising = u_centre.copy()
    rising[2] = rising[0] + 10 * 283.0
    sampling, limited = one_sided_exponents(space, rising, precision, 3.0)
    assert limited == ["alpha"] and sampling.lower[1] == 0.0 and sampling.upper[1] == 2.0
    falling = u_centre.copy()
    falling[2] = falling[0] - 10 * 283.0
    sampling, limited = one_sided_exponents(space, falling, precision, 3.0)
    assert limited == ["alpha"] and sampling.lower[1] == -2.0 and sampling.upper[1] == 0.0


@pytest.mark.slow
def test_the_combination_samples_afresh_where_the_prior_weights_fail():
    from homodyne_steps.inference.consensus import apply_prior

    space, u_centre, precision, _ = _case()
    # G as wide as L and 2 sd off: L·G sits where π/G cannot reach the posterior
    sd_u = np.sqrt(np.diag(np.linalg.inv(precision)))
    placed = replace(space, surrogate_mu=u_centre + 2.0 * sd_u, surrogate_sd=sd_u)
    mean, cov = _gaussian_product(u_centre, precision, placed.surrogate_mu,
                                  np.diag(1.0 / sd_u**2))  # fmt: skip
    draws = np.random.default_rng(3).multivariate_normal(mean, cov, size=(2, 1000))
    out, record = apply_prior(draws, placed, 3, 1.0)
    assert record["method"] == "gaussian_likelihood_times_prior" and record["reliable"]
    assert record["pareto_k"] == record["importance_weights"]["pareto_k"] > 0.7
    theta = np.asarray(theta_from_w(out, space, "rates")).reshape(-1, 3)
    ref_mean, ref_sd, _ = _reference()
    assert np.all(np.abs(theta.mean(axis=0) - ref_mean) < 0.2 * ref_sd)
    np.testing.assert_allclose(theta.std(axis=0), ref_sd, rtol=0.2)


def test_a_prior_that_could_not_be_applied_makes_the_run_not_converged():
    from homodyne_steps.inference.cmc_diagnostics import check_prior_weights

    weights = {"pareto_k": 1.72, "ess": 6.0}
    failed = {"method": "gaussian_likelihood_times_prior", "reliable": False,
              "divergence_rate": 0.12, "importance_weights": weights,
              "bounds_crossed": ["D0 below 100 in 43% of the draws"]}  # fmt: skip
    quality: dict = {"warnings": [], "convergence_status": "converged"}
    check_prior_weights(quality, failed)
    assert quality["convergence_status"] == "not_converged"
    (warning,) = quality["warnings"]
    assert "k̂ 1.72" in warning and "6 effective draws" in warning
    assert "D0 below 100 in 43%" in warning and "diverged in 12% of its draws" in warning
    # drawn afresh without trouble: nothing to say
    quality = {"warnings": [], "convergence_status": "converged"}
    check_prior_weights(quality, {**failed, "reliable": True})
    assert quality == {"warnings": [], "convergence_status": "converged"}


@pytest.mark.slow
def test_chains_that_disagree_are_run_again_four_times_as_long(monkeypatch):
    from homodyne_steps.inference import prior_sampling

    space, _, _, draws = _case()
    monkeypatch.setattr(prior_sampling, "RHAT_RETRY", 0.0)  # every R-hat is too large
    out, record = sample_gaussian_likelihood_posterior(draws, space, 3, 1.0, seed=1)
    assert record["thinning"] == 8 and out.shape == draws.shape
    ref_mean, ref_sd, _ = _reference()
    theta = np.asarray(theta_from_w(out, space, "rates")).reshape(-1, 3)
    assert np.all(np.abs(theta.mean(axis=0) - ref_mean) < 0.15 * ref_sd)


@pytest.mark.slow
def test_one_chain_is_redrawn_as_one_chain():
    space, _, _, draws = _case()
    out, record = sample_gaussian_likelihood_posterior(draws[:1], space, 3, 1.0, seed=2)
    assert out.shape == (1, 1000, 3) and record["reliable"]
    ref_mean, ref_sd, _ = _reference()
    theta = np.asarray(theta_from_w(out, space, "rates")).reshape(-1, 3)
    assert np.all(np.abs(theta.mean(axis=0) - ref_mean) < 0.25 * ref_sd)
