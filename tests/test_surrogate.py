"""Where the CMC shards' surrogate prior sits (inference/surrogate.py)."""

from __future__ import annotations

import numpy as np
import pytest

from homodyne_steps._jax import jnp
from homodyne_steps.inference.surrogate import (
    likelihood_covariance,
    likelihood_maximum,
    place_surrogate,
)
from homodyne_steps.physics.cmc_space import make_space, w_from_theta

T = 0.1 * np.arange(1, 201)  # s: the static reference case's 200 frames
STATIC = ["D0", "alpha", "D_offset"]
LO, HI = np.array([1e2, -2.0, -1e5]), np.array([1e5, 2.0, 1e5])
MU, SD = np.array([1e4, 0.0, 0.0]), np.array([1e4, 0.5, 1e3])  # the registry's priors


def test_conjugate_case_matches_the_closed_form_posterior():
    # unbounded parameters: u = θ, the likelihood N(m, V) times the prior N(μ, s²) is a
    # Gaussian with precision V⁻¹ + s⁻² (computed here by hand, not by the module)
    space = make_space(["a", "b"], [-np.inf] * 2, [np.inf] * 2, [0.0, 5.0], [2.0, 1.0])
    m = np.array([3.0, 1.0])
    v = np.array([[1.0, 0.6], [0.6, 4.0]])
    placed, centre, record = place_surrogate(space, m, v, width=3.0)
    prec = np.linalg.inv(v) + np.diag(1.0 / np.array([2.0, 1.0]) ** 2)
    post_cov = np.linalg.inv(prec)
    mode = post_cov @ (np.linalg.inv(v) @ m + np.array([0.0, 5.0]) / np.array([4.0, 1.0]))
    np.testing.assert_allclose(centre, mode, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(placed.surrogate_sd, 3.0 * np.sqrt(np.diag(post_cov)), rtol=1e-6)
    # what the shards sample, L·G, has its mode on the posterior's (G itself lies beyond it,
    # away from the likelihood, so that the likelihood's pull does not move L·G off it)
    p_g = np.diag(1.0 / placed.surrogate_sd**2)
    lg_mode = np.linalg.solve(
        np.linalg.inv(v) + p_g, np.linalg.solve(v, m) + p_g @ placed.surrogate_mu
    )
    np.testing.assert_allclose(lg_mode, mode, rtol=1e-6, atol=1e-8)
    assert record["offset_sd"] > 0.1
    d = mode - m
    assert record["distance_sd"] == pytest.approx(float(np.sqrt(d @ np.linalg.solve(v, d))))


def test_a_well_determined_optimum_keeps_its_place_and_width():
    space = make_space(STATIC, LO, HI, MU, SD, t=T)
    theta_hat = np.array([1.2e4, -0.35, 900.0])
    sd = np.array([300.0, 0.01, 40.0])  # the data dominate the prior by ~30×
    cov = np.diag(sd**2)
    placed, centre, record = place_surrogate(space, theta_hat, cov)
    assert np.all(np.abs(centre - theta_hat) < 0.05 * sd)
    assert record["distance_sd"] < 0.05
    jac_sd = np.asarray(w_from_theta(theta_hat + sd * np.eye(3), space, "rates")) - np.asarray(
        w_from_theta(theta_hat, space, "rates")
    )
    wide = 3.0 * np.sqrt(np.sum(jac_sd**2, axis=0))  # the old rule: 3 NLSQ sd, uncorrelated
    assert np.all(placed.surrogate_sd <= 1.05 * wide)
    assert np.all(placed.surrogate_sd >= 0.5 * 3.0 * np.abs(np.diag(jac_sd)))


def test_an_optimum_far_along_the_valley_is_pulled_back_inside_the_prior():
    # seed 5 of the static speckle set: NLSQ at the D0 bound, D_offset ≈ −9e4, with the
    # speckle covariance it reported (a valley a million Å²/s long)
    space = make_space(STATIC, LO, HI, MU, SD, t=T)
    theta_hat = np.array([1e5, -0.0298, -87305.7])
    cov = np.array([
        [3.1535e12, 9.898e5, -3.15687e12],
        [9.898e5, 0.31076, -9.9088e5],
        [-3.15687e12, -9.9088e5, 3.16027e12],
    ])  # fmt: skip
    rates_hat = np.asarray(w_from_theta(theta_hat, space, "rates"))
    placed, centre, record = place_surrogate(space, theta_hat, cov)
    assert np.all(centre > LO) and np.all(centre < HI)
    assert abs(centre[2]) < 3 * SD[2]  # D_offset back within its prior
    assert centre[1] < 0 and centre[0] < 5e4
    # the data-determined rates (D over the early and late halves) hardly move
    rates_c = np.asarray(w_from_theta(centre, space, "rates"))
    assert abs(rates_c[0] - rates_hat[0]) < 0.5 * np.sqrt(cov[0, 0]) * 1e-2 + 2e3
    assert 0.1 < record["distance_sd"] < 3.0  # a long move, cheap along the valley
    assert np.all(np.isfinite(placed.surrogate_sd)) and np.all(placed.surrogate_sd > 0)


def test_likelihood_covariance_keeps_only_defined_rows():
    space = make_space(STATIC, LO, HI, MU, SD, t=T)
    block = np.array([[4.0, 1.0, np.nan], [1.0, 9.0, np.nan], [np.nan, np.nan, np.nan]])
    cov = likelihood_covariance(space, 3, block, np.array([2.0, 3.0, 7.0]))
    np.testing.assert_array_equal(cov, [[4.0, 1.0, 0.0], [1.0, 9.0, 0.0], [0.0, 0.0, 49.0]])
    assert np.array_equal(likelihood_covariance(space, 3, None, [1.0, 2.0, 3.0]),
                          np.diag([1.0, 4.0, 9.0]))  # fmt: skip


def test_draws_beyond_the_bounds_are_named_in_the_error():
    from homodyne_steps.inference.consensus import apply_prior
    from homodyne_steps.io.shard_io import ShardError

    space = make_space(STATIC, LO, HI, MU, SD, t=T)
    placed, _, _ = place_surrogate(space, np.array([1.2e4, -0.35, 900.0]),
                                   np.diag([3e3, 0.1, 400.0]) ** 2)  # fmt: skip
    # the shards' answer at alpha ≈ 1.8 with D0 < 0 (seen on a static speckle file)
    theta = np.random.default_rng(1).normal([-20.0, 1.8, 6000.0], [5.0, 0.05, 300.0], (2, 40, 3))
    u = np.asarray(w_from_theta(theta, space, "rates"))
    with pytest.raises(ShardError, match=r"D0 below 100 in 100% of the draws.*at_bound"):
        apply_prior(u, placed, 3, 1.0)


def test_the_likelihood_maximum_is_found_beyond_the_bounds():
    # a Gaussian log likelihood in the rates coordinates whose maximum lies where D0 < 0
    # (as on static speckle files whose NLSQ optimum sits on the D0 bound): the shards
    # have no bounds, so the adjustment's centre is there, not at the NLSQ optimum
    space = make_space(STATIC, LO, HI, MU, SD, t=T)
    u_star = np.asarray(w_from_theta(np.array([-8000.0, 0.3, 2.0e4]), space, "rates"))
    width = np.array([50.0, 0.2, 80.0])

    def loglik_u(u):
        return -0.5 * jnp.sum(((u - u_star) / width) ** 2)

    u_start = np.asarray(w_from_theta(np.array([1e5, -0.04, -8.5e4]), space, "rates"))
    u_max, record = likelihood_maximum(space, loglik_u, u_start)
    np.testing.assert_allclose(u_max, u_star, rtol=1e-6, atol=1e-6 * np.abs(u_star).max())
    assert record["newton_status"] == "converged" and record["log_likelihood_gain"] > 0
    # started on the maximum: no higher point, no new centre
    assert likelihood_maximum(space, loglik_u, u_star)[0] is None


def test_the_prior_record_names_the_bounds_the_combined_draws_cross():
    from homodyne_steps.inference.consensus import apply_prior

    space = make_space(STATIC, LO, HI, MU, SD, t=T)
    placed, _, _ = place_surrogate(space, np.array([1.2e4, -0.35, 900.0]),
                                   np.diag([3e3, 0.1, 400.0]) ** 2)  # fmt: skip
    rng = np.random.default_rng(2)
    theta = rng.normal([1.2e4, -0.35, 900.0], [3e3, 0.1, 400.0], (2, 200, 3))
    theta[0, :50, 0] = 50.0  # an eighth of the draws below D0's bound 100
    theta[1, 0, 2] = -2e5  # and one below D_offset's
    u = np.asarray(w_from_theta(theta, space, "rates"))
    _, record = apply_prior(u, placed, 3, 1.0)
    assert record["bounds_crossed"] == [
        "D0 below 100 in 12% of the draws",
        "D_offset below -100000 in <1% of the draws",
    ]
    assert record["draws_outside_bounds"] == 51
