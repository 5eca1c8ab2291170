"""The speckle simulator and the correlator, tested against physics.

``physics/speckle.py`` makes photon-count frames from diffusing, sheared particles; the
correlator of ``data/correlator.py`` turns them into c2. The science tests average c2
over independent seeds and compare it with the analytic expectation
``1 + β |g1|²`` of ``expected_c2`` (exact integrals, the cell's spread of (|q|, φ) and the
first-order O(1/pixels) ratio-estimator bias included), lag bin by lag bin.

Tolerances: the seed mean of every off-diagonal lag bin lies within ``Z_MAX = 3.5``
standard errors (SE = seed standard deviation / √seeds) of the expectation. That is "3 SE"
with room for 16–32 bins per case and a t-distribution with 23 degrees of freedom
(P(|t| > 3.5) ≈ 0.2 % per bin). The bins are strongly correlated along the lag axis (a
speckle pattern lives for many frames), so a case has only a few independent
comparisons; the RMS of its z-scores must stay below ``Z_RMS = 2`` (a χ² with ~cells
degrees of freedom passes that > 98 % of the time), which catches a systematic offset
spread over many bins. The wrong shear form misses by more than 10 SE.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from scipy.integrate import quad

from homodyne_steps.data.correlator import two_time, two_time_cells
from homodyne_steps.errors import SimulationError
from homodyne_steps.physics.speckle import (
    SpeckleSettings,
    cumulative_integrals,
    drift_factor,
    expected_c2,
    power_law_integral,
    speckle_frames,
)
from homodyne_steps.stages.simulate_speckle import speckle_bins

Z_MAX = 3.5
Z_RMS = 2.0
WRONG_FORM_MIN_Z = 10.0
N_SEEDS = 24
LAG_EDGES = (1, 2, 3, 5, 9, 17, 33, 65, 80)  # lag bins [a, b) in frames; 0 (diagonal) left out

STATIC_PARAMS = {"D0": 1e4, "alpha": -0.3, "D_offset": 1e3}
FLOW_PARAMS = {"D0": 1e4, "alpha": -0.2, "D_offset": 500.0, "gamma_dot_t0": 2e-4,
               "beta": 0.25, "gamma_dot_t_offset": 2e-5, "phi0": 3.0}  # fmt: skip
FLOW_ANGLES = [3.0, 33.0, 63.0, 93.0]  # φ0 - φ = 0, -30, -60, -90 degrees
SMALL = {"n_frames": 80, "n_particles": 512}  # other settings: the defaults
CASES = {
    "static": {"params": STATIC_PARAMS, "phi_centres": [0.0, 90.0]},
    # a realistic run: beam drifting by 30 % over the run and one dropped frame
    "laminar": {"params": FLOW_PARAMS, "phi_centres": FLOW_ANGLES, "drift": 0.3,
                "dropped_frames": [37]},
    "triangular": {"params": FLOW_PARAMS, "phi_centres": FLOW_ANGLES, "gap": "triangular"},
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def lag_bins(c2: np.ndarray, dropped=(), edges=LAG_EDGES) -> np.ndarray:
    """Mean of c2 over the lags of each bin (NaN entries and dropped frames left out)."""
    c2 = np.array(c2, dtype=np.float64)
    c2[list(dropped), :] = np.nan
    c2[:, list(dropped)] = np.nan
    n = c2.shape[0]
    out = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        values = np.concatenate([np.diagonal(c2, lag) for lag in range(a, min(b, n))])
        out.append(np.nanmean(values))
    return np.array(out)


@functools.cache
def seed_runs(case: str, **extra) -> tuple[SpeckleSettings, np.ndarray]:
    """Lag-binned c2 of every seed and cell: (seeds, cells, bins)."""
    runs = []
    for seed in range(N_SEEDS):
        s = SpeckleSettings.from_mapping({**SMALL, **CASES[case], "seed": seed})
        c2 = two_time_cells(speckle_frames(s))
        runs.append([lag_bins(c2[(0, ip)]) for ip in range(len(s.phi_centres))])
    return s, np.array(runs)


def expected_bins(s: SpeckleSettings, shear: str) -> np.ndarray:
    return np.array(
        [
            lag_bins(
                expected_c2(s, 0, ip, shear, cell_average=True, pixel_bias=True), s.dropped_frames
            )  # fmt: skip
            for ip in range(len(s.phi_centres))
        ]
    )


def z_scores(case: str, shear: str) -> np.ndarray:
    s, runs = seed_runs(case)
    mean = runs.mean(axis=0)
    se = runs.std(axis=0, ddof=1) / math.sqrt(runs.shape[0])
    return (mean - expected_bins(s, shear)) / se


def assert_agrees(z: np.ndarray) -> None:
    assert np.all(np.isfinite(z))
    assert np.max(np.abs(z)) <= Z_MAX, np.round(z, 2)
    assert math.sqrt(np.mean(z**2)) <= Z_RMS, np.round(z, 2)


# ---------------------------------------------------------------------------------------
# Exact integrals and the expectation
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("a", [-1.5, -1.0, -1.0 + 1e-9, -0.3, 0.0, 0.25, 1.7])
@pytest.mark.parametrize("t1, t2", [(0.0, 0.1), (0.1, 0.2), (0.0, 3.0), (2.0, 2.1)])
def test_power_law_integral_is_exact_with_the_time_floor(a, t1, t2):
    """∫ max(t, eps)^a dt to 1e-10 against adaptive quadrature, a = -1 included."""
    eps = 0.05
    kink = [eps] if t1 < eps < t2 else None
    reference = quad(lambda t: max(t, eps) ** a, t1, t2, points=kink, epsabs=0, epsrel=1e-12)
    assert power_law_integral(t1, t2, a, eps) == pytest.approx(reference[0], rel=1e-10)


def test_cumulative_integrals_add_the_constant_parts():
    s = SpeckleSettings.from_mapping({**SMALL, "params": FLOW_PARAMS})
    i_d, i_g = cumulative_integrals(s)
    t_end = s.dt * (s.n_frames - 1)
    eps = s.dt / 2
    # the floor holds t^a at eps^a on [0, eps]; the power law is exact above eps
    d_ref = 1e4 * (eps**-0.2 * eps + (t_end**0.8 - eps**0.8) / 0.8) + 500.0 * t_end
    g_ref = 2e-4 * (eps**0.25 * eps + (t_end**1.25 - eps**1.25) / 1.25) + 2e-5 * t_end
    assert i_d[0] == 0 and i_g[0] == 0
    assert i_d[-1] == pytest.approx(d_ref, rel=1e-12)
    assert i_g[-1] == pytest.approx(g_ref, rel=1e-12)


@pytest.mark.parametrize("shear", ["physical", "homodyne"])
@pytest.mark.parametrize("exponents", [(-0.2, 0.25), (-1.0, -1.5), (0.0, 0.0)])
def test_expectation_agrees_with_the_package_model(shear, exponents):
    """Two independent codes for the same c2: ours (NumPy) and physics/model.py (JAX).

    With exact integrals they must agree to rounding for any exponents (a = -1 and the
    time floor included); with constant rates the seed's trapezoid is exact too.
    """
    from homodyne_steps.physics.model import compute_c2

    params = {**FLOW_PARAMS, "alpha": exponents[0], "beta": exponents[1]}
    s = SpeckleSettings.from_mapping({**SMALL, "params": params, "phi_centres": FLOW_ANGLES})
    integrals = ["exact", "trapezoid"] if exponents == (0.0, 0.0) else ["exact"]
    for integral in integrals:
        model = compute_c2(
            params, t=s.times, phi_deg=np.array(FLOW_ANGLES), q=s.q_centres[0], L=s.L,
            contrast=s.contrast, offset=1.0, dt=s.dt, shear=shear, integral=integral,
        )  # fmt: skip
        for ip in range(len(FLOW_ANGLES)):
            ours = expected_c2(s, 0, ip, shear)
            np.testing.assert_allclose(ours, model[ip], rtol=1e-12, atol=1e-12)
    other = "homodyne" if shear == "physical" else "physical"
    assert np.max(np.abs(expected_c2(s, 0, 0, other) - expected_c2(s, 0, 0, shear))) > 0.05


def test_contrast_is_one_over_modes_with_the_finite_particle_correction():
    s = SpeckleSettings.from_mapping({"n_particles": 1000, "n_modes": 4})
    assert s.contrast == pytest.approx(0.25 * (1 - 4 / 1000), rel=1e-12)
    e = expected_c2(s, 0, 0)
    assert np.diagonal(e) == pytest.approx(1 + s.contrast)
    assert np.all(e >= 1.0)
    np.testing.assert_array_equal(e, e.T)


# ---------------------------------------------------------------------------------------
# Science: seed means of the measured c2 against the physics
# ---------------------------------------------------------------------------------------
def test_static_c2_matches_the_diffusion_physics():
    z = z_scores("static", "physical")
    assert_agrees(z)
    s, runs = seed_runs("static")
    se = runs.std(axis=0, ddof=1).max() / math.sqrt(N_SEEDS)
    decay = expected_bins(s, "physical")[0]
    assert decay[0] - decay[-1] > 30 * se  # the check sees the whole decay, not noise


def test_laminar_c2_matches_the_physical_shear_form_with_drift_and_a_dropped_frame():
    assert_agrees(z_scores("laminar", "physical"))
    assert np.max(np.abs(z_scores("laminar", "homodyne"))) > WRONG_FORM_MIN_Z


@pytest.mark.parametrize("pair", [(3, 0), (2, 1)])  # (φ0-φ = -90° vs 0°), (-60° vs -30°)
def test_flow_angle_dependence(pair):
    """The difference between two angles at a few lags, per seed, against the physics."""
    s, runs = seed_runs("laminar")
    a, b = pair
    expected = expected_bins(s, "physical")
    for k in (3, 4, 5):  # lags 5-8, 9-16, 17-32 frames
        diff = runs[:, a, k] - runs[:, b, k]
        se = diff.std(ddof=1) / math.sqrt(N_SEEDS)
        want = expected[a, k] - expected[b, k]
        assert abs(diff.mean() - want) <= 3.0 * se, (k, diff.mean(), want, se)
        assert abs(want) > 5.0 * se, (k, want, se)  # the angle dependence is resolved


def test_triangular_gap_gives_the_homodyne_form_not_the_physical_one():
    assert_agrees(z_scores("triangular", "homodyne"))
    assert np.max(np.abs(z_scores("triangular", "physical"))) > WRONG_FORM_MIN_Z


def test_ratio_estimator_bias_is_first_order_in_one_over_pixels():
    """With 12 pixels the correlator reads c2 - 1 about 1.5/12 low; the formula fixes it."""
    edges = (1, 2, 4, 8, 16, 32, 40)
    base = {"params": {"D0": 1e4, "alpha": 0.0, "D_offset": 0.0}, "n_frames": 40,
            "n_particles": 256, "pixels_per_cell": 12,
            "phi_centres": [float(a) for a in range(0, 180, 15)]}  # fmt: skip
    runs = []
    for seed in range(60):
        s = SpeckleSettings.from_mapping({**base, "seed": seed})
        c2 = two_time_cells(speckle_frames(s))  # static: the 12 cells are alike
        runs.append(np.mean([lag_bins(c, edges=edges) for c in c2.values()], axis=0))
    runs = np.array(runs)
    mean, se = runs.mean(axis=0), runs.std(axis=0, ddof=1) / math.sqrt(len(runs))
    naive = lag_bins(expected_c2(s, 0, 0), edges=edges)
    corrected = lag_bins(expected_c2(s, 0, 0, pixel_bias=True), edges=edges)
    assert np.max(np.abs(mean - naive) / se) > 6.0
    assert np.max(np.abs(mean - corrected) / se) <= Z_MAX


# ---------------------------------------------------------------------------------------
# The frames
# ---------------------------------------------------------------------------------------
def tiny(**overrides) -> SpeckleSettings:
    m = {"n_frames": 12, "n_particles": 256, "pixels_per_cell": 40, "phi_centres": [0, 90]}
    return SpeckleSettings.from_mapping({**m, **overrides})


def test_frames_are_counts_with_the_drift_ramp_and_zero_dropped_frames():
    s = tiny(drift=0.5, dropped_frames=[4], photons_per_pixel=50.0, pixels_per_cell=400)
    frames = speckle_frames(s)
    assert sorted(frames) == [(0, 0), (0, 1)]
    for counts in frames.values():
        assert counts.shape == (12, 400) and np.issubdtype(counts.dtype, np.integer)
        assert np.all(counts >= 0) and np.all(counts[4] == 0)
        # per-frame mean ∝ 50 × ramp; relative SE of one frame's mean ≈ √(β + 1/50)/√400
        ratio = counts.mean(axis=1) / (50.0 * drift_factor(s))
        keep = np.arange(12) != 4
        np.testing.assert_allclose(ratio[keep], 1.0, atol=4 * math.sqrt(0.27 / 400))


def test_frames_are_deterministic_for_a_seed_and_differ_between_seeds():
    a, b, c = speckle_frames(tiny(seed=5)), speckle_frames(tiny(seed=5)), speckle_frames(tiny())
    np.testing.assert_array_equal(a[(0, 1)], b[(0, 1)])
    assert not np.array_equal(a[(0, 1)], c[(0, 1)])


def test_speckle_bins_are_one_frame_per_step_with_the_truth():
    s = tiny(q_centres=[0.004, 0.006], gap="triangular", dropped_frames=[2])
    bins, truth = speckle_bins(s)
    assert sorted(bins.c2) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert bins.dt == s.dt and bins.avg_frames == bins.stride_frames == 1
    np.testing.assert_array_equal(bins.q_centres, [0.004, 0.006])
    for c2 in bins.c2.values():
        assert c2.shape == (12, 12)
        assert np.all(np.isnan(c2[2])) and np.all(np.isnan(c2[:, 2]))
        assert np.isfinite(np.delete(np.delete(c2, 2, 0), 2, 1)).all()
    assert truth["model"] == {"shear": "homodyne", "integral": "exact"}
    assert truth["params"] == s.params and truth["offset"] == 1.0
    assert truth["contrast"] == pytest.approx(1 / s.n_modes, rel=0.02)
    assert speckle_bins(tiny())[1]["model"]["shear"] == "physical"


# ---------------------------------------------------------------------------------------
# The correlator
# ---------------------------------------------------------------------------------------
def test_correlator_of_constant_frames_is_exactly_one():
    counts = np.full((7, 5), 3.0)
    counts[4] = 11.0  # a brighter frame: normalised away
    np.testing.assert_array_equal(two_time(counts), np.ones((7, 7)))


def test_correlator_hand_computed_two_pixels():
    counts = np.array([[1, 3], [4, 2]])  # frame means 2 and 3
    # <I0 I0> = 5, <I0 I1> = (4 + 6)/2 = 5, <I1 I1> = (16 + 4)/2 = 10
    want = np.array([[5 / 4, 5 / 6], [5 / 6, 10 / 9]])
    np.testing.assert_allclose(two_time(counts), want, rtol=1e-15)


def test_correlator_zero_frame_gives_a_nan_row_and_column_only():
    counts = np.array([[1, 3], [0, 0], [4, 2]])
    c2 = two_time(counts)
    assert np.all(np.isnan(c2[1])) and np.all(np.isnan(c2[:, 1]))
    np.testing.assert_allclose(c2[np.ix_([0, 2], [0, 2])], [[5 / 4, 5 / 6], [5 / 6, 10 / 9]])
    assert two_time_cells({"a": counts})["a"].shape == (3, 3)
    with pytest.raises(ValueError, match="n_frames, n_pixels"):
        two_time(np.ones(4))


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, key",
    [
        ({"n_framez": 10}, "simulate.n_framez"),
        ({"n_frames": 2}, "simulate.n_frames"),
        ({"n_frames": 10.0}, "simulate.n_frames"),
        ({"q_centres": [0.005, -0.001]}, "simulate.q_centres"),
        ({"q_centres": "0.005"}, "simulate.q_centres"),
        ({"phi_centres": [0, 0]}, "simulate.phi_centres"),
        ({"phi_centres": [-190.0]}, "simulate.phi_centres"),
        ({"L": 0}, "simulate.L"),
        ({"dt": "0.1"}, "simulate.dt"),
        ({"photons_per_pixel": -1}, "simulate.photons_per_pixel"),
        ({"pixels_per_cell": 1}, "simulate.pixels_per_cell"),
        ({"n_modes": 0}, "simulate.n_modes"),
        ({"n_particles": 20, "n_modes": 4}, "simulate.n_particles"),
        ({"ring_width": 0.0}, "simulate.ring_width"),
        ({"sector_width_deg": 120}, "simulate.sector_width_deg"),
        ({"gap": "parabolic"}, "simulate.gap"),
        ({"drift": 1.5}, "simulate.drift"),
        ({"dropped_frames": [200]}, "simulate.dropped_frames"),
        ({"dropped_frames": [1.0]}, "simulate.dropped_frames"),
        ({"seed": -1}, "simulate.seed"),
        ({"params": {"D0": 1e4, "alpha": 0.0}}, "simulate.params"),
        ({"params": {**STATIC_PARAMS, "Dzero": 1.0}}, "simulate.params.Dzero"),
        ({"params": {**STATIC_PARAMS, "alpha": 5.0}}, "simulate.params.alpha"),
        ({"params": {**STATIC_PARAMS, "D0": "1e4"}}, "simulate.params.D0"),
        ({"params": {**STATIC_PARAMS, "D_offset": -5e4}}, "simulate.params.D_offset"),
    ],
)
def test_settings_errors_name_the_key(bad, key):
    with pytest.raises(SimulationError) as info:
        SpeckleSettings.from_mapping(bad)
    message = str(info.value)
    assert message.startswith(key), message
    assert len(message) > len(key) + 10  # and says what was expected


def test_settings_defaults_and_where():
    s = SpeckleSettings.from_mapping({})
    assert s.mode == "laminar_flow" and len(s.phi_centres) == 6 and s.n_frames == 120
    assert s.pixels_per_cell == 180 and s.photons_per_pixel == 10.0 and s.n_modes == 4
    assert SpeckleSettings() == s
    with pytest.raises(SimulationError, match=r"^cfg\.gap"):
        SpeckleSettings.from_mapping({"gap": 1}, where="cfg")
    with pytest.raises(SimulationError, match=r"^speckle\.n_frames"):
        SpeckleSettings(n_frames=1)
    with pytest.raises(SimulationError, match="shear"):
        expected_c2(s, 0, 0, "linear")
    with pytest.raises(SimulationError, match="outside"):
        expected_c2(s, 1, 0)
