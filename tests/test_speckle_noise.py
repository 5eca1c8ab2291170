"""The speckle noise model of the NLSQ covariance (``nlsq.uncertainty.method: speckle``).

The trace form of the meat and the along-age-difference design are checked against
brute-force sums over an explicit element covariance; the whole method against the
spread of fits to speckle-level data made the way a beamline makes them (moving
particles, speckle, Poisson counts, the correlator), where the independent-noise σ is
an order of magnitude too small.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from homodyne_steps.errors import DataError
from homodyne_steps.inference.nlsq_fit import fit
from homodyne_steps.inference.nlsq_settings import NlsqSettings
from homodyne_steps.inference.speckle_noise import (
    NoiseLevels,
    difference_design,
    noise_scale,
    speckle_meat,
)
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.physics.model import compute_c2
from homodyne_steps.physics.reference import REFERENCE_CASES, REFERENCE_GEOMETRY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from speckle_data import speckle_dataset  # noqa: E402

STATIC = REFERENCE_CASES["static"]


def _gamma(n: int, rng) -> np.ndarray:
    """A smooth decaying Γ (off the diagonal) of n frames."""
    t = np.arange(n, dtype=np.float64)
    g = 0.3 * np.exp(-np.abs(t[:, None] - t[None, :]) / (3.0 + rng.random()))
    np.fill_diagonal(g, 0.0)
    return g


def _element_covariance(gamma: np.ndarray, b: float, d: float) -> tuple[np.ndarray, list]:
    """Cov(c2_ij, c2_kl) = B[Γ_ik Γ_jl + Γ_il Γ_jk] over the upper-triangle elements."""
    g = gamma.copy()
    np.fill_diagonal(g, d)
    pairs = [(i, j) for i in range(g.shape[0]) for j in range(i + 1, g.shape[0])]
    cov = np.array([[b * (g[i, k] * g[j, m] + g[i, m] * g[j, k]) for k, m in pairs]
                    for i, j in pairs])  # fmt: skip
    return cov, pairs


def test_meat_trace_form_equals_the_sum_over_element_pairs():
    rng = np.random.default_rng(0)
    n, b, d = 7, 0.006, 0.35
    gamma = _gamma(n, rng)
    cov, pairs = _element_covariance(gamma, b, d)
    u = np.zeros((2, n, n))
    values = rng.standard_normal((2, len(pairs)))
    for m, (i, j) in enumerate(pairs):
        u[:, i, j] = values[:, m]
    want = values @ cov @ values.T
    got = speckle_meat(u, gamma, NoiseLevels(b * d * d, b))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # b = 0: independent noise of variance a
    np.testing.assert_allclose(speckle_meat(u, gamma, NoiseLevels(0.01, 0.0)),
                               0.01 * values @ values.T, rtol=1e-12)  # fmt: skip


def test_difference_design_is_the_variance_of_along_age_differences():
    """Half the variance of c2[i+1, i+1+k] − c2[i, i+k], averaged over i, from the
    explicit covariance, is B (d² + x_k); and noise_scale recovers B from it."""
    rng = np.random.default_rng(1)
    n, b, d = 9, 0.006, 0.35
    gamma = _gamma(n, rng)
    cov, pairs = _element_covariance(gamma, b, d)
    index = {p: m for m, p in enumerate(pairs)}
    x = difference_design(gamma)
    sigma_sq = np.full(n, np.nan)
    for k in range(2, n - 1):
        halves = []
        for i in range(n - k - 1):
            e = np.zeros(len(pairs))
            e[index[(i + 1, i + 1 + k)]] += 1.0
            e[index[(i, i + k)]] -= 1.0
            halves.append(e @ cov @ e / 2)
        sigma_sq[k] = np.mean(halves)
        assert sigma_sq[k] == pytest.approx(b * (d * d + x[k]), rel=1e-12)
    counts = (n - np.arange(n)).astype(float)
    got = noise_scale(sigma_sq[None], x[None], counts[None], np.array([d * d]))
    assert got == pytest.approx(b, rel=1e-12)


def _d0_fits(seed: int, tmp: Path, n_frames: int) -> tuple[dict, object]:
    """D0 (the other parameters at the truth) fitted with each uncertainty method to one
    speckle realisation: {method: (value, σ)}, and the data."""
    settings = {"params": STATIC["params"], "phi_centres": list(STATIC["phi_deg"]),
                "n_frames": n_frames, "seed": seed}  # fmt: skip
    data, truth = speckle_dataset(settings, tmp)
    fixed = [n for n in truth["params"] if n != "D0"]
    out = {}
    for method in ("speckle", "independent"):
        s = NlsqSettings.from_mapping({"initial_parameters": truth["params"],
                                       "fixed_parameters": fixed,
                                       "uncertainty": {"method": method}})  # fmt: skip
        fitted = fit(data, "static", truth["L"], s)
        assert fitted.result.status == "converged", fitted.result.reason
        out[method] = (fitted.result.physical[0], fitted.uncertainties[0])
    return out, data


def test_speckle_sigma_matches_the_spread_of_fits_to_speckle_data(tmp_path):
    """16 speckle-level realisations (3 φ × 120 frames, D0 free): the spread of the D0
    estimates over the speckle σ is near 1 (0.6–1.5 allowed for 16 runs, ±2.2 standard
    errors) and ±1.96σ covers at least 80 % (13 of 16; P < 1 % at 95 % coverage); the
    independent σ is at least 5 times too small."""
    runs = []
    for seed in range(1, 17):
        fits, data = _d0_fits(seed, tmp_path, 120)
        runs.append((*fits["speckle"], fits["independent"][1]))
    value, sd, sd_plain = np.array(runs).T
    truth = STATIC["params"]["D0"]
    ratio = value.std(ddof=1) / sd.mean()
    assert 0.6 < ratio < 1.5, ratio
    assert np.mean(np.abs(value - truth) < 1.96 * sd) >= 0.8
    assert value.std(ddof=1) / sd_plain.mean() > 5
    assert data.c2_diagonal is not None and data.c2_diagonal.shape == (3, data.n_t)


def test_speckle_method_needs_the_correlator_diagonal(tmp_path):
    settings = {"params": STATIC["params"], "phi_centres": [0.0, 90.0], "n_frames": 40}
    data, truth = speckle_dataset(settings, tmp_path)
    s = NlsqSettings.from_mapping({"uncertainty": {"method": "speckle"}})
    with pytest.raises(DataError, match="c2_diagonal"):
        fit(data.replace(c2_diagonal=None), "static", truth["L"], s)


def test_speckle_method_refuses_data_with_independent_noise():
    """Model c2 with independent noise: the speckle model would predict χ²_red ~ 30 for
    the fit's weights where the fit has 1, and inflate σ ~200-fold; it says so instead."""
    g = REFERENCE_GEOMETRY
    rng = np.random.default_rng(4)
    t = g["dt"] * np.arange(1, 101)
    phi = np.array(STATIC["phi_deg"], dtype=np.float64)
    c2 = compute_c2(STATIC["params"], t=t, phi_deg=phi, q=g["q"], L=1.0,
                    contrast=g["contrast"], offset=g["offset"])  # fmt: skip
    e = np.triu(0.01 * rng.standard_normal(c2.shape), 1)
    c2 = c2 + e + np.swapaxes(e, 1, 2)
    data = XpcsData(wavevector_q_list=np.full(phi.size, g["q"]), phi_angles_list=phi, t1=t,
                    t2=t, c2_exp=c2, dt=g["dt"],
                    c2_diagonal=np.stack([np.diagonal(m) for m in c2]))  # fmt: skip
    s = {"initial_parameters": STATIC["params"]}
    plain = fit(data, "static", 1.0, NlsqSettings.from_mapping(s))  # auto: independent
    assert plain.uncertainty["method"] == "independent"
    assert "does not describe these data" in plain.uncertainty["fallback"]
    speckle = NlsqSettings.from_mapping({**s, "uncertainty": {"method": "speckle"}})
    with pytest.raises(DataError, match="does not describe these data"):
        fit(data, "static", 1.0, speckle)


def test_auto_tells_frame_shared_noise_from_independent_noise(tmp_path):
    """χ²_red alone cannot tell them apart where shot noise dominates the diagonal (the
    model simulator's excess 0.5): the residuals' row sums can. Model data with
    independent noise: observed ≈ the independent prediction, ~1/20 of the speckle
    model's; speckle data (one realisation, 3 φ × 120 frames): 60–80 × the independent
    prediction, and auto takes the speckle σ and records the test."""
    from homodyne_steps.stages.simulate import reference_settings, simulate_bins

    sim = reference_settings("static", n_q_rings=1, n_frames=61, seed=4, diagonal_excess=0.5)
    bins, truth = simulate_bins(sim)
    c2 = np.stack([bins.c2[(0, k)] for k in range(len(sim.phi_deg))])[:, 1:, 1:]
    t = sim.dt * np.arange(1, sim.n_frames)
    data = XpcsData(np.full(c2.shape[0], truth["q"]), np.asarray(sim.phi_deg, float), t, t,
                    c2, sim.dt, c2_diagonal=np.stack([np.diagonal(m) for m in c2]))  # fmt: skip
    start = {"initial_parameters": truth["params"]}
    out = fit(data, "static", truth["L"], NlsqSettings.from_mapping(start))
    assert out.uncertainty["method"] == "independent"
    assert "do not share noise through frames" in out.uncertainty["fallback"]
    settings = {"params": STATIC["params"], "phi_centres": list(STATIC["phi_deg"]),
                "n_frames": 120, "seed": 2}  # fmt: skip
    data, truth = speckle_dataset(settings, tmp_path)
    start = {"initial_parameters": truth["params"]}
    out = fit(data, "static", truth["L"], NlsqSettings.from_mapping(start))
    assert out.uncertainty["method"] == "speckle", out.uncertainty
    rows = out.uncertainty["row_sums"]
    assert rows["observed_over_independent"] > 10 > 1 / rows["observed_over_speckle"]
    assert out.uncertainty["curvature_adjustment"]["parameters"] == list(out.names)
