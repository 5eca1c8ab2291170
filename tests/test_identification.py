"""CMC's weakly-identified flag: the posterior's sd against its truncated prior's
(inference/identification.py), checked against draws of the truncated prior."""

from __future__ import annotations

import numpy as np

from homodyne_steps.inference.identification import PRIOR_SHRINK, prior_sd_ratio


def test_the_prior_sd_is_that_of_the_normal_restricted_to_the_bounds():
    # D0's registry prior N(1e4, 1e4) on [1e2, 1e5], beta's N(0, 0.5) on [-2, 2], and an
    # unbounded one; their sds from rejection sampling, not from the module's formula
    mu, sigma = np.array([1e4, 0.0, 3.0]), np.array([1e4, 0.5, 2.0])
    lo, hi = np.array([1e2, -2.0, -np.inf]), np.array([1e5, 2.0, np.inf])
    x = np.random.default_rng(0).normal(mu, sigma, size=(2_000_000, 3))
    sd = [x[(x[:, j] >= lo[j]) & (x[:, j] <= hi[j]), j].std() for j in range(3)]
    np.testing.assert_allclose(prior_sd_ratio(sd, mu, sigma, lo, hi), 1.0, rtol=3e-3)
    assert sd[0] < 0.9 * sigma[0]  # the bound at 1e2 cuts D0's prior noticeably
    # a posterior the data made 10 times narrower is identified; its prior is not
    ratios = prior_sd_ratio(np.array(sd) / 10.0, mu, sigma, lo, hi)
    assert np.all(ratios < PRIOR_SHRINK) and PRIOR_SHRINK < 1.0
