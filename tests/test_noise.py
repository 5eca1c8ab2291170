"""The per-lag noise estimator: accuracy on simulated data, robustness, pooling, settings.

Statistical tolerances: for Gaussian noise the MAD of neighbour differences estimates σ
with a relative standard deviation of about 1.3/√n for n differences (measured: MAD
efficiency 37 %, and neighbouring differences share an element). Per-lag checks
therefore use lags with many differences (or large pools) where a fixed bound is asked
for, and otherwise a bound of Z_MAX standard deviations for each lag's own number of
differences (thousands of lags are checked at once), so they fail for a wrong
estimator, not for an unlucky draw.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from homodyne_steps.errors import ConfigError, DataError
from homodyne_steps.inference.noise import (
    NoiseSettings,
    estimate_sigma_per_lag,
    noise_sigma,
    sigma_for_pairs,
    summary,
)
from homodyne_steps.physics.model import compute_c2, upper_triangle_pairs
from homodyne_steps.stages.simulate import reference_settings, simulate_bins

REL_SD = 1.3  # relative sd of the estimate × √(number of differences), measured
Z_MAX = 5.0  # bound in sd when every lag of a run is checked


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def simulated(noise: float, n_frames: int, seed: int = 1, phi_deg=None):
    """(noisy c2, true σ = noise × clean c2) of the static reference case, one q ring."""
    overrides = {"n_frames": n_frames, "n_q_rings": 1, "noise": noise, "seed": seed}
    if phi_deg is not None:
        overrides["phi_deg"] = tuple(phi_deg)
    s = reference_settings("static", **overrides)
    bins, _ = simulate_bins(s)
    n_phi = len(s.phi_deg)
    c2 = np.stack([bins.c2[(0, k)] for k in range(n_phi)])
    clean = compute_c2(
        dict(s.params),
        t=s.dt * np.arange(s.n_frames),
        phi_deg=np.asarray(s.phi_deg, dtype=float),
        q=s.q,
        L=s.L,
        contrast=s.contrast,
        offset=s.offset,
        dt=s.dt,
    )
    return c2, noise * clean


def band(x: np.ndarray, k: int) -> np.ndarray:
    return np.diagonal(x, offset=k, axis1=-2, axis2=-1)


def true_sigma_per_lag(true_sigma: np.ndarray) -> np.ndarray:
    """RMS over each band of the true per-element σ: (n_phi, n_t), lag 0 NaN."""
    n_t = true_sigma.shape[-1]
    out = np.full(true_sigma.shape[:2], np.nan)
    for k in range(1, n_t):
        out[:, k] = np.sqrt(np.mean(band(true_sigma, k) ** 2, axis=-1))
    return out


def reference_estimate(c2: np.ndarray, min_samples: int) -> np.ndarray:
    """Straightforward loop implementation of the documented rule (module docstring)."""
    n_phi, n_t, _ = c2.shape
    out = np.full((n_phi, n_t), np.nan)
    for a in range(n_phi):
        diffs = {}
        for k in range(1, n_t):
            b = np.array([c2[a, i, i + k] for i in range(n_t - k)])
            d = b[1:] - b[:-1]
            diffs[k] = d[np.isfinite(d)]
        for k in range(1, n_t):
            r = 0
            while True:
                lags = range(max(1, k - r), min(n_t - 1, k + r) + 1)
                pool = np.concatenate([diffs[x] for x in lags])
                if pool.size >= min_samples:
                    break
                r += 1
            mad = np.median(np.abs(pool - np.median(pool)))
            out[a, k] = 1.4826 * mad / np.sqrt(2.0)
    return out


def symmetric_mask(rng: np.random.Generator, n_t: int, fraction: float) -> np.ndarray:
    m = np.triu(rng.random((n_t, n_t)) < fraction, k=1)
    return m | m.T


@pytest.fixture(scope="module")
def long_run():
    """One angle, 3000 frames, relative noise 0.01: lags with ~3000 differences."""
    c2, true_sigma = simulated(0.01, 3000, phi_deg=(0.0,))
    return c2, true_sigma_per_lag(true_sigma)


@pytest.fixture(scope="module")
def reference_run():
    """The static reference case (3 angles, alpha = −0.3 ageing), 600 frames."""
    return simulated(0.01, 600)


# ---------------------------------------------------------------------------------------
# Accuracy on simulated data
# ---------------------------------------------------------------------------------------
def test_well_populated_lags_match_true_sigma_within_10_percent(long_run):
    c2, truth = long_run
    est = estimate_sigma_per_lag(c2)
    n_t = c2.shape[-1]
    n_diff = n_t - np.arange(n_t) - 1
    lags = np.nonzero(n_diff >= 2700)[0][1:]  # lag 1 .. ~299, 4 sd ≈ 10 %
    ratio = est[0, lags] / truth[0, lags]
    assert lags.size > 250
    assert np.all(np.abs(ratio - 1) < 0.10), (ratio.min(), ratio.max())
    assert abs(np.mean(ratio) - 1) < 0.01  # unbiased


def test_every_lag_within_its_statistical_bound(long_run):
    """All lags, pooled ones included, within Z_MAX sd for their number of differences."""
    c2, truth = long_run
    est = estimate_sigma_per_lag(c2)
    n_t = c2.shape[-1]
    n_diff = np.maximum(n_t - np.arange(n_t) - 1, 64)  # pooled lags hold >= 64
    ratio = est[0, 1:] / truth[0, 1:]
    bound = np.maximum(0.10, Z_MAX * REL_SD / np.sqrt(n_diff[1:]))
    assert np.all(np.abs(ratio - 1) < bound)


def test_pooled_long_lags_within_25_percent(long_run):
    """Lags whose band has < min_samples differences get a pooled, accurate σ."""
    c2, truth = long_run
    n_t = c2.shape[-1]
    est = estimate_sigma_per_lag(c2, min_samples=400)
    pooled = np.arange(n_t - 400, n_t)  # bands with < 400 differences
    ratio = est[0, pooled] / truth[0, pooled]
    assert np.all(np.isfinite(ratio))
    assert np.all(np.abs(ratio - 1) < 0.25), (ratio.min(), ratio.max())
    # the last lag (a single element, no difference of its own) is estimated too
    assert np.isfinite(est[0, n_t - 1])

    est64 = estimate_sigma_per_lag(c2)  # default pool of >= 64 differences
    ratio64 = est64[0, n_t - 64 :] / truth[0, n_t - 64 :]
    assert abs(np.median(ratio64) - 1) < 0.10
    assert np.all(np.abs(ratio64 - 1) < Z_MAX * REL_SD / np.sqrt(64))


def test_matches_the_documented_rule_exactly_with_nan_and_inf():
    """Window pooling, NaN/Inf handling and even/odd medians against a plain loop."""
    rng = np.random.default_rng(7)
    n_t = 41
    c2 = 1.0 + 0.05 * rng.standard_normal((3, n_t, n_t))
    finite = np.triu(c2) + np.triu(c2, k=1).transpose(0, 2, 1)
    holed = finite.copy()
    for a, fraction in ((0, 0.0), (1, 0.1), (2, 0.35)):
        holed[a][symmetric_mask(rng, n_t, fraction)] = np.nan
    holed[1, 3, 20] = holed[1, 20, 3] = np.inf
    for c2 in (finite, holed):
        for min_samples in (2, 31, 64, 200):
            got = estimate_sigma_per_lag(c2, min_samples=min_samples)
            want = reference_estimate(c2, min_samples)
            np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)


def test_ageing_trend_does_not_inflate_the_estimate():
    """Static reference case (D ∝ t^−0.3): c2 drifts along each band with age.

    With low noise the drift dominates the spread of a band's values, so an estimator
    from the values themselves is far too large; differences along age are not.
    """
    c2, true_sigma = simulated(0.001, 600)
    truth = true_sigma_per_lag(true_sigma)
    est = estimate_sigma_per_lag(c2)
    lags = np.arange(1, 60)
    naive = np.stack([np.std(band(c2, k), axis=-1) for k in lags], axis=1)
    assert np.median(naive / truth[:, lags]) > 2.0  # the trend is real and large
    n_diff = c2.shape[-1] - lags - 1
    ratio = est[:, lags] / truth[:, lags]
    assert np.all(np.abs(ratio - 1) < Z_MAX * REL_SD / np.sqrt(n_diff))
    assert abs(np.median(ratio) - 1) < 0.05


def test_doubling_the_noise_doubles_sigma(reference_run):
    c2_1, _ = reference_run
    c2_2, _ = simulated(0.02, 600)  # same seed: same draws, twice the amplitude
    s1 = estimate_sigma_per_lag(c2_1)
    s2 = estimate_sigma_per_lag(c2_2)
    ratio = s2[:, 1:] / s1[:, 1:]
    assert abs(np.median(ratio) - 2.0) < 0.02
    assert np.all(np.abs(ratio - 2.0) < 0.2)


# ---------------------------------------------------------------------------------------
# Robustness
# ---------------------------------------------------------------------------------------
def test_nan_elements_are_tolerated(reference_run):
    c2, true_sigma = reference_run
    truth = true_sigma_per_lag(true_sigma)
    clean_est = estimate_sigma_per_lag(c2)
    rng = np.random.default_rng(3)
    holed = c2.copy()
    mask = symmetric_mask(rng, c2.shape[-1], 0.05)
    holed[:, mask] = np.nan
    holed[1, :, 17] = holed[1, 17, :] = np.nan  # a whole bad frame in one angle
    est = estimate_sigma_per_lag(holed)
    assert np.all(np.isnan(est[:, 0]))
    assert np.all(np.isfinite(est[:, 1:]))
    n_diff = np.maximum(0.9 * (c2.shape[-1] - np.arange(c2.shape[-1]) - 1), 64)
    bound = Z_MAX * REL_SD / np.sqrt(n_diff[1:])
    assert np.all(np.abs(est[:, 1:] / truth[:, 1:] - 1) < bound)
    assert abs(np.median(est[:, 1:] / clean_est[:, 1:]) - 1) < 0.02


def test_outliers_barely_move_the_estimate(reference_run):
    c2, _ = reference_run
    base = estimate_sigma_per_lag(c2)
    rng = np.random.default_rng(5)
    spiked = c2.copy()
    mask = symmetric_mask(rng, c2.shape[-1], 0.003)  # ~0.3 % of the points
    spiked[:, mask] = 1e3
    est = estimate_sigma_per_lag(spiked)
    n_t = c2.shape[-1]
    lags = np.arange(1, n_t - 100)  # bands long enough to contain a spike or two
    assert abs(np.median(est[:, lags] / base[:, lags]) - 1) < 0.02
    assert np.all(np.abs(est[:, 1:] / base[:, 1:] - 1) < 0.25)
    # what a non-robust estimator would do with the same data
    d = np.diff(band(spiked[0], 5))
    assert np.std(d) / np.sqrt(2) > 100 * base[0, 5]


def test_an_angle_full_of_nan_raises_naming_it(reference_run):
    c2 = reference_run[0].copy()
    c2[2] = np.nan
    with pytest.raises(DataError, match="angle index 2"):
        estimate_sigma_per_lag(c2)
    c2 = reference_run[0][:, :12, :12].copy()  # 55 differences in all, fewer than 64
    with pytest.raises(DataError, match="angle index 0"):
        estimate_sigma_per_lag(c2)


def test_noise_free_data_raise_instead_of_zero_sigma():
    c2 = np.ones((2, 50, 50))
    with pytest.raises(DataError, match="angle index 0, lag 1"):
        estimate_sigma_per_lag(c2)


@pytest.mark.parametrize("shape", [(10, 10), (2, 10, 9), (1, 2, 2)])
def test_bad_shapes_raise(shape):
    with pytest.raises(DataError, match="c2"):
        estimate_sigma_per_lag(np.ones(shape))


# ---------------------------------------------------------------------------------------
# Layout, helpers, speed
# ---------------------------------------------------------------------------------------
def test_lag_zero_is_nan_and_the_rest_finite(reference_run):
    c2, _ = reference_run
    est = estimate_sigma_per_lag(c2)
    assert est.shape == c2.shape[:2]
    assert np.all(np.isnan(est[:, 0]))
    assert np.all(np.isfinite(est[:, 1:]) & (est[:, 1:] > 0))


def test_only_the_upper_triangle_is_read(reference_run):
    c2 = reference_run[0].copy()
    est = estimate_sigma_per_lag(c2)
    lower = np.tril_indices(c2.shape[-1], k=-1)
    c2[:, lower[0], lower[1]] = 1e9  # garbage below the diagonal
    np.testing.assert_array_equal(estimate_sigma_per_lag(c2), est)


def test_sigma_for_pairs_gathers_by_angle_and_lag():
    n_phi, n_t = 3, 7
    sigma_lag = np.arange(n_phi * n_t, dtype=float).reshape(n_phi, n_t)
    sigma_lag[:, 0] = np.nan
    i, j, a = upper_triangle_pairs(n_t, n_phi)
    got = sigma_for_pairs(sigma_lag, i, j, a)
    want = np.array([sigma_lag[aa, jj - ii] for ii, jj, aa in zip(i, j, a, strict=True)])
    np.testing.assert_array_equal(got, want)
    assert got.shape == i.shape
    # the lower triangle reads the same lag (no wrap-around to a wrong column)
    np.testing.assert_array_equal(sigma_for_pairs(sigma_lag, j, i, a), want)
    assert np.isnan(sigma_for_pairs(sigma_lag, np.array([2]), np.array([2]), np.array([1])))[0]


def test_fixed_sigma(reference_run):
    c2, _ = reference_run
    s = NoiseSettings.from_mapping({"method": "fixed", "sigma": 0.004})
    sig = noise_sigma(c2, s)
    assert sig.shape == c2.shape[:2]
    assert np.all(np.isnan(sig[:, 0]))
    assert np.all(sig[:, 1:] == 0.004)
    np.testing.assert_array_equal(noise_sigma(c2, NoiseSettings()), estimate_sigma_per_lag(c2, 64))
    np.testing.assert_array_equal(
        noise_sigma(c2, NoiseSettings(min_samples=300)), estimate_sigma_per_lag(c2, 300)
    )


def test_summary_is_json_friendly():
    sigma_lag = np.array([[np.nan, 1.0, 3.0, 2.0], [np.nan, np.nan, np.nan, np.nan]])
    out = summary(sigma_lag)
    assert json.loads(json.dumps(out)) == out
    assert out["median"] == [2.0, None]
    assert out["min"] == [1.0, None]
    assert out["max"] == [3.0, None]
    assert out["n_phi"] == 2 and out["n_lags"] == 3
    assert all(type(v) is float for v in out["median"][:1] + out["min"][:1])


def test_23_angles_by_1000_frames_is_fast():
    rng = np.random.default_rng(0)
    c2 = 1.0 + 0.01 * rng.standard_normal((23, 1000, 1000))
    timings = []
    for _ in range(2):
        t0 = time.perf_counter()
        est = estimate_sigma_per_lag(c2)
        timings.append(time.perf_counter() - t0)
    assert abs(np.median(est[:, 1:]) / 0.01 - 1) < 0.01
    assert min(timings) < 1.0, timings  # ~0.2 s measured; per-element loops take minutes


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------
def test_settings_defaults_and_round_trip():
    s = NoiseSettings.from_mapping(None)
    assert (s.method, s.sigma, s.min_samples) == ("per_lag", None, 64)
    for m in ({}, {"method": "fixed", "sigma": 0.01}, {"min_samples": 10}):
        s = NoiseSettings.from_mapping(m)
        again = NoiseSettings.from_mapping(json.loads(json.dumps(s.to_mapping())))
        assert again == s


@pytest.mark.parametrize(
    ("mapping", "key"),
    [
        ({"methd": "fixed"}, "nlsq.noise.methd"),
        ({"method": "global"}, "nlsq.noise.method"),
        ({"method": "fixed"}, "nlsq.noise.sigma"),
        ({"method": "fixed", "sigma": 0.0}, "nlsq.noise.sigma"),
        ({"method": "fixed", "sigma": -1.0}, "nlsq.noise.sigma"),
        ({"method": "fixed", "sigma": "1e-3"}, "nlsq.noise.sigma"),
        ({"method": "fixed", "sigma": float("nan")}, "nlsq.noise.sigma"),
        ({"sigma": 0.01}, "nlsq.noise.sigma"),  # sigma is only for method fixed
        ({"min_samples": 1}, "nlsq.noise.min_samples"),
        ({"min_samples": 64.0}, "nlsq.noise.min_samples"),
        ({"min_samples": True}, "nlsq.noise.min_samples"),
    ],
)
def test_settings_errors_name_the_key(mapping, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        NoiseSettings.from_mapping(mapping)


def test_settings_custom_path_and_direct_construction():
    with pytest.raises(ConfigError, match=r"mcmc\.noise\.bogus"):
        NoiseSettings.from_mapping({"bogus": 1}, where="mcmc.noise")
    with pytest.raises(ConfigError, match="sigma"):
        NoiseSettings(method="fixed")
    with pytest.raises(ConfigError, match="method"):
        NoiseSettings(method="per_angle")
    with pytest.raises(ConfigError, match="min_samples"):
        estimate_sigma_per_lag(np.ones((1, 10, 10)), min_samples=1)
