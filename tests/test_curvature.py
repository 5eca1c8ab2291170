"""The curvature adjustment that calibrates CMC's likelihood to the speckle σ."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from homodyne_steps._jax import jax, jnp
from homodyne_steps.errors import DataError
from homodyne_steps.inference.cmc_shard_settings import PriorSettings, SamplerSettings
from homodyne_steps.inference.curvature import (
    adjustment_matrix,
    curvature_adjustment,
    recorded_adjustment,
)
from homodyne_steps.io.nlsq_files import NlsqParameters
from homodyne_steps.physics.cmc_space import COMBINATION, make_space, theta_from_w, w_from_theta
from homodyne_steps.physics.registry import REGISTRY
from homodyne_steps.stages.cmc_combine import CombineSettings, combine_stage
from homodyne_steps.stages.cmc_shard import cmc_shard_stage
from test_cmc import fit_and_plan, reference_data

NAMES = ("D0", "alpha", "D_offset")


def _covariances(rng, scale):
    a, b = rng.normal(size=(2, scale.size, scale.size))
    outer = np.outer(scale, scale)
    return (a @ a.T + 0.1 * np.eye(scale.size)) * outer, (b @ b.T + np.eye(scale.size)) * outer


def test_adjustment_matrix_gives_the_target_curvature():
    rng = np.random.default_rng(3)
    for scale in (np.array([1e4, 1.0, 1e-4]), np.array([1e-6, 1e5, 3.0, 1e2])):
        cov_m, cov_t = _covariances(rng, scale)
        c = adjustment_matrix(cov_m, cov_t)
        got = c.T @ np.linalg.inv(cov_m) @ c
        want = np.linalg.inv(cov_t)
        assert np.allclose(got / np.outer(1 / scale, 1 / scale),
                           want / np.outer(1 / scale, 1 / scale), rtol=1e-8, atol=1e-8)  # fmt: skip


def test_adjusted_likelihood_in_rates_coordinates_has_the_target_curvature_in_theta():
    """ℓ Gaussian in θ with covariance V_model; adjusted in the (nonlinear) combination
    coordinates, its maximum stays at θ̂ and its Hessian in θ there is −V_target⁻¹: by the
    chain rule, independently of how C was built."""
    t = 0.1 * np.arange(1, 200)
    lo, hi = REGISTRY.bounds(NAMES)
    space = make_space(NAMES, lo, hi, [1e4, 0.0, 0.0], [1e4, 0.5, 1e3], t=t)
    theta0 = np.array([1.2e4, -0.4, 300.0])
    cov_m, cov_t = _covariances(np.random.default_rng(5), np.array([300.0, 0.01, 200.0]))
    adj = curvature_adjustment(NAMES, theta0, cov_m, cov_t)

    def to_u(th):
        return w_from_theta(th, space, COMBINATION)

    u0, c = adj.affine_map(NAMES, theta0, np.ones(3), to_u, np.ones(3))
    h = jnp.asarray(np.linalg.inv(cov_m))

    def adjusted(th):
        moved = theta_from_w(u0 + c @ (to_u(th) - u0), space, COMBINATION) - theta0
        return -0.5 * moved @ h @ moved

    grad = np.asarray(jax.grad(adjusted)(jnp.asarray(theta0)))
    assert np.all(np.abs(grad * np.sqrt(np.diag(cov_t))) < 1e-9), grad
    hess = np.asarray(jax.hessian(adjusted)(jnp.asarray(theta0)))
    want = -np.linalg.inv(cov_t)
    norm = np.sqrt(np.outer(np.diag(cov_t), np.diag(cov_t)))
    assert np.allclose(hess * norm, want * norm, atol=1e-7)
    # a mirror image (θ → −θ for the sign-flipped entries) carries the same map
    signs = np.array([-1.0, 1.0, -1.0])
    u1, c1 = adj.affine_map(NAMES, signs * theta0, signs, lambda th: th, np.ones(3))
    assert np.allclose(u1, signs * theta0)
    assert np.allclose(c1, signs[:, None] * adjustment_matrix(cov_m, cov_t) * signs)


def test_the_record_round_trips_and_a_broken_one_is_refused():
    rng = np.random.default_rng(1)
    cov_m, cov_t = _covariances(rng, np.array([1e3, 0.1, 1e2]))
    cov_t[1, :] = cov_t[:, 1] = np.nan  # alpha not identified: left out
    adj = curvature_adjustment(NAMES, np.array([1e4, -0.3, 1e3]), cov_m, cov_t)
    assert adj.parameters == ("D0", "D_offset")
    back = recorded_adjustment(json.loads(json.dumps(adj.to_mapping())), "x")
    assert back.parameters == adj.parameters
    assert np.array_equal(back.cov_target, adj.cov_target)
    assert recorded_adjustment(None, "x") is None
    bad = {**adj.to_mapping(), "covariance_model": [[1.0]]}
    with pytest.raises(DataError, match="NLSQ: curvature_adjustment over 2 parameters"):
        recorded_adjustment(bad, "NLSQ")
    with pytest.raises(DataError, match="needs parameters, center"):
        recorded_adjustment({"parameters": ["D0"]}, "NLSQ")
    with pytest.raises(DataError, match="which this fit does not sample"):
        adj.affine_map(("alpha",), np.zeros(1), np.ones(1), lambda th: th, np.ones(1))


def test_covariances_singular_in_theta_only_to_round_off_keep_their_adjustment():
    # D0 and D_offset moving together along the valley: in θ their correlation is 1 to
    # within round-off (a correlation eigenvalue −2e-12 on a laminar speckle file, which
    # Cholesky refuses); the shards build C in their own coordinates u instead
    q = np.linalg.qr(np.random.default_rng(4).normal(size=(3, 3)))[0]
    sd = np.array([6.7e5, 0.5, 6.7e5])

    def covariance(smallest):
        corr = q @ np.diag([smallest, 0.9, 2.1 - smallest]) @ q.T
        corr /= np.sqrt(np.outer(np.diag(corr), np.diag(corr)))
        return corr * np.outer(sd, sd)

    cov_m, cov_t = covariance(1e-3) / 400.0, covariance(-2e-12)
    with pytest.raises(np.linalg.LinAlgError):  # what used to drop the adjustment
        adjustment_matrix(cov_m, cov_t)
    adj = curvature_adjustment(NAMES, np.array([1e5, -0.02, -9e4]), cov_m, cov_t)
    assert adj is not None and adj.parameters == NAMES
    # indefinite beyond round-off: refused
    assert (
        curvature_adjustment(NAMES, np.array([1e5, -0.02, -9e4]), cov_m, covariance(-1e-4)) is None
    )


def test_cmc_with_the_adjustment_reports_the_target_covariance(tmp_path):
    """Model data (static reference, near-Gaussian posterior), an NLSQ record whose
    target covariance is 4 × its own (its σ doubled, as NLSQ writes them): the shard's
    posterior, after the combination, has sd 2 × the model's σ for every parameter and
    the model's correlations (tolerance: Monte Carlo error of 2 × 300 draws)."""
    data, truth = reference_data(n_frames=120, seed=7)
    qc, nlsq_dir = fit_and_plan(tmp_path, data, truth, "static", num_shards=1)
    nlsq = NlsqParameters.read(nlsq_dir / "parameters.json")
    analysis = json.loads((nlsq_dir / "analysis_results_nlsq.json").read_text())
    cov = np.array(analysis["covariance"]["matrix"], dtype=float)[:3, :3]
    value = np.array([nlsq.parameters[n].value for n in NAMES])
    adj = curvature_adjustment(NAMES, value, cov, 4.0 * cov)
    doubled = {n: replace(p, uncertainty=2 * p.uncertainty) for n, p in nlsq.parameters.items()}
    nlsq = replace(nlsq, parameters=doubled, curvature_adjustment=adj.to_mapping())
    nlsq.write(nlsq_dir / "parameters.json")
    prior = PriorSettings.from_mapping({"type": "nlsq", "nlsq_width": 20.0})
    nc = tmp_path / "shards" / "0.nc"
    record = cmc_shard_stage(qc, tmp_path / "plan.npz", nlsq_dir / "parameters.json",
                             nlsq_dir / "fitted_data.npz", 0, nc, nc.with_suffix(".json"),
                             mode="static", L=truth["L"], prior=prior,
                             sampler=SamplerSettings.from_mapping(
                                 {"num_warmup": 150, "num_samples": 300}))  # fmt: skip
    assert record["curvature_adjustment"] == list(NAMES)
    assert record["divergences"] == 0
    combine_stage([nc], [nc.with_suffix(".json")], tmp_path / "cmc", CombineSettings(),
                  nlsq_parameters=nlsq_dir / "parameters.json")  # fmt: skip
    record = json.loads((tmp_path / "cmc" / "parameters.json").read_text())
    assert record["curvature_adjustment"] == list(NAMES)
    cmc = record["parameters"]
    sigma = np.sqrt(np.diag(cov))
    sd = np.array([cmc[n]["std"] for n in NAMES])
    assert np.allclose(sd / sigma, 2.0, rtol=0.12), sd / sigma
    mean = np.array([cmc[n]["mean"] for n in NAMES])
    assert np.all(np.abs(mean - value) < 0.3 * sd), (mean, value, sd)
