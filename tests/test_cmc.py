"""CMC: shard plans, and the static reference case recovered end to end."""

import json

import numpy as np
import pytest

from homodyne_steps.errors import ConfigError
from homodyne_steps.inference.cmc_shard_settings import PriorSettings, SamplerSettings
from homodyne_steps.inference.nlsq_settings import NlsqSettings
from homodyne_steps.inference.shard_mode import laplace_metric
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.io.nlsq_files import NlsqParameters
from homodyne_steps.io.serialise import read_npz
from homodyne_steps.stages.cmc_combine import CombineSettings, combine_stage
from homodyne_steps.stages.cmc_plan import (
    ShardingSettings,
    choose_num_shards,
    cmc_plan_stage,
    sampled_parameter_count,
)
from homodyne_steps.stages.cmc_shard import cmc_shard_stage, prepare_shard, run_shard
from homodyne_steps.stages.nlsq_stage import nlsq_stage
from homodyne_steps.stages.simulate import reference_settings, simulate_bins


def reference_data(mode="static", **overrides):
    s = reference_settings(mode, n_q_rings=1, diagonal_excess=0.0, **overrides)
    bins, truth = simulate_bins(s)
    phi = np.asarray(s.phi_deg, dtype=float)
    c2 = np.stack([bins.c2[(0, k)] for k in range(phi.size)])[:, 1:, 1:]
    t = s.dt * np.arange(1, s.n_frames)
    data = XpcsData(np.full(phi.size, truth["q"]), phi, t, t.copy(), c2, s.dt)
    return data, truth


def test_plan_covers_every_point_once_and_every_shard_every_angle(tmp_path):
    data, _ = reference_data(n_frames=60)
    data.to_npz(tmp_path / "qc.npz")
    rec = cmc_plan_stage(
        tmp_path / "qc.npz",
        tmp_path / "plan.json",
        tmp_path / "plan.npz",
        mode="static",
        scaling_mode="varpro",
        settings=ShardingSettings.from_mapping(
            {"num_shards": 4, "seed": 3, "min_points_per_parameter": 100}
        ),
    )
    n_pairs = 59 * 58 // 2
    n_points = 3 * n_pairs
    idx = read_npz(tmp_path / "plan.npz")["indices"]
    assert rec.num_shards == idx.shape[0] == 4
    real = idx[idx < n_points]
    np.testing.assert_array_equal(np.sort(real), np.arange(n_points))  # each point once
    for row in idx:
        angles, counts = np.unique(row[row < n_points] // n_pairs, return_counts=True)
        assert angles.tolist() == [0, 1, 2] and counts.max() - counts.min() <= 1
    # A different seed gives a different, equally valid assignment; the decision is logged.
    cmc_plan_stage(
        tmp_path / "qc.npz",
        tmp_path / "p2.json",
        tmp_path / "p2.npz",
        mode="static",
        scaling_mode="varpro",
        settings=ShardingSettings.from_mapping(
            {"num_shards": 4, "seed": 4, "min_points_per_parameter": 100}
        ),
    )
    assert not np.array_equal(read_npz(tmp_path / "p2.npz")["indices"], idx)
    assert (
        "set in the config"
        in json.loads((tmp_path / "plan.json").read_text())["decisions"][0]["reason"]
    )


def test_automatic_shard_count_by_size_and_information():
    s = ShardingSettings.from_mapping(
        {"max_points_per_shard": 10_000, "min_points_per_parameter": 1_000}
    )
    assert choose_num_shards(100_000, 3, s)[0] == 10  # size decides
    assert choose_num_shards(100_000, 19, s)[0] == 5  # information decides
    assert sampled_parameter_count("laminar_flow", "varpro", 6) == 7
    assert sampled_parameter_count("laminar_flow", "individual", 6) == 19
    assert sampled_parameter_count("static", "auto", 3) == 5


def test_an_explicit_shard_count_that_starves_the_shards_is_refused():
    # 42 126 one-point shards were planned before; each shard needs enough points for its
    # posterior to be data-dominated (min_points_per_parameter x sampled parameters)
    s = ShardingSettings.from_mapping({"num_shards": 10_000_000})
    with pytest.raises(ConfigError, match=r"num_shards: 10000000 shards would hold 0 points"):
        choose_num_shards(134_550, 3, s)
    s = ShardingSettings.from_mapping({"num_shards": 23})
    with pytest.raises(ConfigError, match=r"5850 points each .* 6000 .* at most 22 shards"):
        choose_num_shards(134_550, 3, s)
    assert choose_num_shards(134_550, 3, ShardingSettings.from_mapping({"num_shards": 22}))[0] == 22


def test_coordinates_that_cannot_cross_exponent_zero_get_one_shard():
    # log_reference and none sample the amplitude: a shard whose alpha posterior reaches
    # 0 is cut there, and consensus of cut shards is wrong, so they are never sharded
    auto = ShardingSettings.from_mapping({"max_points_per_shard": 10_000})
    assert choose_num_shards(100_000, 3, auto, "rates")[0] == 10
    for coords in ("none", "log_reference"):
        k, decisions = choose_num_shards(100_000, 3, auto, coords)
        assert k == 1 and "cannot cross exponent = 0" in decisions[0]["reason"]
        explicit = ShardingSettings.from_mapping({"num_shards": 4})
        with pytest.raises(ConfigError, match=rf"num_shards: 4 shards refused: .*'{coords}'"):
            choose_num_shards(100_000, 3, explicit, coords)
        assert choose_num_shards(100_000, 3, ShardingSettings.from_mapping({"num_shards": 1}),
                                 coords)[0] == 1  # fmt: skip
    with pytest.raises(ConfigError, match="reparameterize: 'log'"):
        choose_num_shards(100_000, 3, auto, "log")


def test_shard_metric_survives_coordinates_of_very_different_scales():
    # A laminar shard's rates: D(t) ~1e4 Å²/s with sd ~300, γ̇(t) ~1e-4 1/s with sd
    # ~5e-6. The Hessian's eigenvalues span 1e18; with the rounding of a computed
    # Hessian an unscaled eigensolver finds it indefinite and NUTS used to fall back to
    # a metric adapted from the identity (step size 3e-4, every draw at tree depth 8).
    rng = np.random.default_rng(0)
    corr = np.full((7, 7), 0.97)
    np.fill_diagonal(corr, 1.0)
    sd = np.array([300.0, 0.2, 240.0, 7e-6, 0.19, 5e-6, 0.15])
    cov = corr * np.outer(sd, sd)
    hessian = np.linalg.inv(cov)
    unscaled_failures = 0
    for _ in range(10):
        noise = rng.normal(size=(7, 7)) * 4e-16 * np.abs(hessian)
        computed = hessian + noise + noise.T
        unscaled_failures += np.linalg.eigvalsh(computed)[0] <= 0
        inverse_mass, diagonal = laplace_metric(computed)
        np.testing.assert_allclose(inverse_mass, cov, rtol=1e-6)
        np.testing.assert_allclose(diagonal, 1 / np.diag(hessian), rtol=1e-9)
    assert unscaled_failures >= 3  # the trap is real for these scales
    # not positive definite: no Laplace metric, but the diagonal to start NUTS from
    saddle = np.diag([1e8, -1.0, 1e-8])
    inverse_mass, diagonal = laplace_metric(saddle)
    assert inverse_mass is None
    np.testing.assert_allclose(diagonal, [1e-8, 1.0, 1e8])


@pytest.mark.parametrize(
    "section,settings,message",
    [
        (ShardingSettings, {"num_shards": 0}, "cmc.sharding.num_shards"),
        (ShardingSettings, {"seeds": 1}, "cmc.sharding.seeds: unknown key"),
        (SamplerSettings, {"num_warmup": "many"}, "cmc.sampler.num_warmup"),
        (SamplerSettings, {"reparameterize": "log"}, "cmc.sampler.reparameterize"),
        (PriorSettings, {"type": "flat"}, "cmc.prior.type"),
    ],
)
def test_settings_errors_name_the_key(section, settings, message):
    with pytest.raises(ConfigError, match=message):
        section.from_mapping(settings)


def fit_and_plan(tmp_path, data, truth, mode, num_shards, nlsq=None):
    """The stages before the shards: data file, NLSQ fit, shard plan (plan.npz)."""
    qc = tmp_path / "qc.npz"
    data.to_npz(qc)
    nlsq_dir = tmp_path / "nlsq"
    settings = NlsqSettings.from_mapping(nlsq or {})
    nlsq_stage(qc, nlsq_dir, mode=mode, L=truth["L"], settings=settings)
    cmc_plan_stage(
        qc,
        tmp_path / "plan.json",
        tmp_path / "plan.npz",
        mode=mode,
        scaling_mode="varpro",
        settings=ShardingSettings.from_mapping(
            {"num_shards": num_shards, "min_points_per_parameter": 100}
        ),
    )
    return qc, nlsq_dir


def test_shard_blocks_hold_exactly_the_shards_points_grouped_by_angle(tmp_path):
    data, truth = reference_data("laminar_flow", n_frames=40, seed=2)
    # 40 frames do not identify every laminar parameter; the blocks are what is tested
    qc, nlsq_dir = fit_and_plan(
        tmp_path, data, truth, "laminar_flow", num_shards=3, nlsq={"on_failure": "warn"}
    )
    plan = read_npz(tmp_path / "plan.npz")["indices"]
    nlsq = NlsqParameters.read(nlsq_dir / "parameters.json")
    sigma = read_npz(nlsq_dir / "fitted_data.npz")["sigma_per_lag"]
    n_pairs = data.n_t * (data.n_t - 1) // 2
    n_total = data.n_phi * n_pairs
    for k in range(plan.shape[0]):
        inp = prepare_shard(
            data, plan, k, nlsq, sigma, mode="laminar_flow", L=truth["L"], prior=PriorSettings()
        )
        blocks = np.asarray(inp.blocks)[0]
        assert blocks.shape[0] == data.n_phi
        ids = plan[k][plan[k] < n_total]
        held = blocks[blocks < n_total]
        assert held.size == ids.size == inp.n_points
        assert np.array_equal(np.sort(held), np.sort(ids))
        for angle, row in enumerate(blocks):
            assert np.all(row[row < n_total] // n_pairs == angle)
    # a plan of 3 shards made for other coordinates is refused by a shard in `none`
    none = SamplerSettings.from_mapping({"reparameterize": "none"})
    with pytest.raises(ConfigError, match="'none' cannot be combined across the plan's 3 shards"):
        run_shard(inp, none, PriorSettings())


def sample_and_combine(tmp_path, qc, nlsq_dir, L, mode, n_shards, sampler):
    """Every shard of the plan, then the combination (into tmp_path / "cmc")."""
    shards, records = [], []
    for k in range(n_shards):
        nc = tmp_path / "shards" / f"{k}.nc"
        records.append(
            cmc_shard_stage(
                qc,
                tmp_path / "plan.npz",
                nlsq_dir / "parameters.json",
                nlsq_dir / "fitted_data.npz",
                k,
                nc,
                nc.with_suffix(".json"),
                mode=mode,
                L=L,
                sampler=sampler,
                prior=PriorSettings(),
            )
        )
        shards.append(nc)
    out = combine_stage(
        shards,
        [p.with_suffix(".json") for p in shards],
        tmp_path / "cmc",
        CombineSettings(),
        nlsq_parameters=nlsq_dir / "parameters.json",
    )
    return records, out


@pytest.mark.slow
def test_static_reference_posterior_recovers_the_truth(tmp_path):
    data, truth = reference_data(seed=5)
    qc, nlsq_dir = fit_and_plan(tmp_path, data, truth, "static", num_shards=2)
    sampler = SamplerSettings.from_mapping({"num_warmup": 200, "num_samples": 400})
    records, out = sample_and_combine(tmp_path, qc, nlsq_dir, truth["L"], "static", 2, sampler)
    for rec in records:
        assert rec["n_points"] > 25_000 and rec["divergence_rate"] < 0.05
    params = json.loads((tmp_path / "cmc" / "parameters.json").read_text())
    nlsq = json.loads((nlsq_dir / "parameters.json").read_text())["parameters"]
    assert out.status != "not_converged"
    for name, value in truth["params"].items():
        p = params["parameters"][name]
        assert abs(p["mean"] - value) < 3 * p["std"], (name, p, value)
        assert p["r_hat"] < 1.05 and p["ess_bulk"] > 100
        # calibration: the static posterior is near-Gaussian, so the combined sd must
        # match the full-data Laplace (NLSQ) uncertainty; a shard that loses points or
        # mixes angles shows up here as a too-wide posterior
        assert 0.8 < p["std"] / nlsq[name]["uncertainty"] < 1.25, (name, p, nlsq[name])


def test_shards_refuse_an_nlsq_result_of_another_model():
    """A shard samples the kernel of its own settings: an NLSQ record fitted with another
    shear form or integral (its start and σ scale would not belong) is an error, and a
    record from before the choice counts as the seed's homodyne/trapezoid."""
    from dataclasses import replace

    from homodyne_steps.errors import DataError
    from homodyne_steps.inference.shard_inputs import _check_same_fit
    from homodyne_steps.io.record import ABSENT
    from homodyne_steps.physics.model_settings import ModelSettings
    from test_cmc_combine import nlsq_record

    rec = nlsq_record("static", {"D0": 1e4, "alpha": 0.0, "D_offset": 0.0},
                      {"D0": 1.0, "alpha": 1.0, "D_offset": 1.0}, n_angles=1)  # fmt: skip
    physical = ModelSettings(shear="physical", integral="exact")
    seed = ModelSettings(shear="homodyne", integral="trapezoid")
    assert rec.model is ABSENT
    _check_same_fit(rec, "static", seed)  # an older record: the seed's form
    with pytest.raises(DataError, match="fitted with model .*rerun the NLSQ stage"):
        _check_same_fit(rec, "static", physical)
    _check_same_fit(replace(rec, model=physical.to_mapping()), "static", physical)
    with pytest.raises(DataError, match="is for 'static' mode, not 'laminar_flow'"):
        _check_same_fit(rec, "laminar_flow", seed)
