"""NLSQ intervals that follow the power-law valley (inference/intervals.py)."""

from __future__ import annotations

import numpy as np
import pytest

from homodyne_steps.inference.intervals import valley_intervals
from homodyne_steps.physics.coordinates import rates_jacobian

T = 0.1 * np.arange(1, 201)  # s: the static reference case's 200 frames
NAMES = ["D0", "alpha", "D_offset"]
LO, HI = np.array([1e2, -2.0, -1e5]), np.array([1e5, 2.0, 1e5])
HALF = T.size // 2


def rates(theta):
    """(D_early, alpha, D_late) written out here, independently of the package."""
    d0, alpha, off = theta
    return np.array([d0 * np.mean(T[:HALF] ** alpha) + off, alpha,
                     d0 * np.mean(T[HALF:] ** alpha) + off])  # fmt: skip


def from_rates(u):
    """θ of draws u (..., 3), written out here."""
    alpha = u[..., 1]
    m_e = np.mean(T[:HALF] ** alpha[..., None], axis=-1)
    m_l = np.mean(T[HALF:] ** alpha[..., None], axis=-1)
    d0 = (u[..., 0] - u[..., 2]) / (m_e - m_l)
    return np.stack([d0, alpha, u[..., 0] - d0 * m_e], axis=-1)


def test_a_straight_valley_gives_plus_minus_sigma():
    theta = np.array([1e4, -0.3, 1000.0])
    sd = np.array([50.0, 0.002, 20.0])
    cov = np.diag(sd**2)
    got = valley_intervals(NAMES, theta, cov, T, LO, HI)
    for k, n in enumerate(NAMES):
        for level, z in (("68", 1.0), ("95", 1.959964)):
            lo, hi = got[n][level]
            assert lo == pytest.approx(theta[k] - z * sd[k], abs=0.05 * z * sd[k])
            assert hi == pytest.approx(theta[k] + z * sd[k], abs=0.05 * z * sd[k])


def test_a_curved_valley_matches_an_independent_propagation():
    # an optimum at alpha = −1.1 with the speckle covariance of one static file
    theta = np.array([4594.0, -1.184, 6192.0])
    cov = np.array([[1.063e7, -1.80e3, -3.0e6], [-1.80e3, 0.602, 6.0e2], [-3.0e6, 6.0e2, 1.10e6]])
    got = valley_intervals(NAMES, theta, cov, T, LO, HI, seed=1)
    a = rates_jacobian(NAMES, theta, T)  # ∂θ/∂u: checked against finite differences elsewhere
    v_u = np.linalg.solve(a, np.linalg.solve(a, cov).T)
    draws = from_rates(np.random.default_rng(11).multivariate_normal(rates(theta), v_u, 200_000))
    keep = np.all((draws >= LO) & (draws <= HI), axis=1)
    for k, n in enumerate(NAMES):
        ref = np.quantile(draws[keep, k], [0.025, 0.16, 0.84, 0.975])
        width = ref[3] - ref[0]
        assert got[n]["95"] == pytest.approx((ref[0], ref[3]), abs=0.03 * width)
        assert got[n]["68"] == pytest.approx((ref[1], ref[2]), abs=0.03 * width)
    lo, hi = got["D_offset"]["95"]
    assert hi - theta[2] < 0.5 * (theta[2] - lo)  # asymmetric: the valley bends down


def test_intervals_cover_the_truth_when_the_estimate_is_gaussian_in_the_rates():
    """Estimates drawn where the fit is Gaussian (the rates coordinates) around the static
    reference truth, with σ like those of the speckle files: the reported intervals of
    every parameter cover the truth at their nominal rates."""
    truth = np.array([1e4, -0.3, 1000.0])
    a_true = rates_jacobian(NAMES, truth, T)
    cov_theta = np.diag([3000.0, 0.5, 1500.0]) ** 2
    v_u = np.linalg.solve(a_true, np.linalg.solve(a_true, cov_theta).T)
    rng = np.random.default_rng(5)
    hits = {"68": [], "95": []}
    for u_hat in rng.multivariate_normal(rates(truth), v_u, 300):
        theta = from_rates(u_hat)
        if not np.all((theta > LO) & (theta < HI)):
            continue
        a = rates_jacobian(NAMES, theta, T)
        got = valley_intervals(NAMES, theta, a @ v_u @ a.T, T, LO, HI, len(hits["68"]), 4000)
        for level in hits:
            hits[level].append([got[n][level][0] <= x <= got[n][level][1]
                                for n, x in zip(NAMES, truth, strict=True)])  # fmt: skip
    assert len(hits["68"]) > 200
    cover68, cover95 = np.mean(hits["68"], axis=0), np.mean(hits["95"], axis=0)
    assert np.all((cover68 >= 0.60) & (cover68 <= 0.80)), cover68
    assert np.all((cover95 >= 0.90) & (cover95 <= 0.99)), cover95


def test_parameters_without_sigma_get_no_interval():
    cov = np.diag([np.nan, 0.01, 100.0])
    got = valley_intervals(NAMES, np.array([1e4, -0.3, 1e3]), cov, T, LO, HI)
    # D0 has no σ, so its law stays in θ: alpha and D_offset get ±σ intervals, D0 none
    assert "D0" not in got and set(got) == {"alpha", "D_offset"}
    assert got["alpha"]["68"] == pytest.approx((-0.4, -0.2), abs=0.01)
