"""The CMC combination stage: consensus algebra, shard exclusion, shard-set checks,
quality labels, settings, and the output-file contract.

Shards are fakes written with ``arviz.from_dict`` in the layout of ``cmc_shard``: a
posterior with one variable per physical parameter (plus per-angle contrast/offset),
NUTS sample stats, and the shard attributes; beside it the ``{k}.json`` summary.
"""

from __future__ import annotations

import json
from pathlib import Path

import arviz as az
import numpy as np
import pytest

from homodyne_steps.errors import ConfigError, DataError
from homodyne_steps.inference.cmc_diagnostics import quality_label
from homodyne_steps.inference.consensus import (
    consensus_mc,
    divergence_exclusion,
    robust_exclusion,
    simple_average,
)
from homodyne_steps.io.nlsq_files import NlsqParameters
from homodyne_steps.io.shard_io import ShardError, read_shards
from homodyne_steps.physics.cmc_space import make_space
from homodyne_steps.physics.coordinates import from_rates, split_times, to_rates
from homodyne_steps.physics.registry import REGISTRY
from homodyne_steps.stages.cmc_combine import OUTPUT_FILES, CombineSettings, combine_stage

STATIC_TRUTH = {"D0": 1.0e4, "alpha": -0.1, "D_offset": 10.0}
STATIC_SD = {"D0": 150.0, "alpha": 0.02, "D_offset": 4.0}
FLOW_TRUTH = (
    ("gamma_dot_t0", 1e-3, 1e-4),
    ("beta", 0.0, 0.05),
    ("gamma_dot_t_offset", 0.0, 1e-4),
    ("phi0", 0.0, 0.5),
)


def _strict_json(path: Path):
    def _reject(token):
        raise ValueError(f"{path}: non-standard JSON token {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject)


def make_shard(
    out: Path,
    k: int,
    K: int,
    *,
    n_chains: int = 2,
    n_draws: int = 300,
    mode: str = "static",
    shift: dict[str, float] | None = None,
    n_angles: int = 2,
    divergence_rate: float = 0.0,
    stuck: bool = False,
    frozen: bool = False,
    seed: int | None = None,
    num_shards: int | None = None,
    json_index: int | None = None,
    drop: tuple[str, ...] = (),
    derived: bool = False,
    contrast_shift: float = 0.0,
) -> tuple[Path, Path]:
    """Write fake shard ``k`` of ``K``: Gaussian draws around the truth (shard SD = √K ×
    the full-data SD); ``stuck`` puts the chains of every parameter 10 SD apart.
    ``derived``: contrast/offset are deterministics of D0/alpha (as numpyro writes them
    in varpro mode: collinear, default dim names ``contrast_dim_0``)."""
    rng = np.random.default_rng(1000 + k if seed is None else seed)
    shape = (n_chains, n_draws)
    posterior = {}
    for name, mu in STATIC_TRUTH.items():
        if name in drop:
            continue
        sd = STATIC_SD[name] * np.sqrt(K)
        mu = mu + (shift or {}).get(name, 0.0)
        x = rng.normal(mu, sd, shape)
        if stuck:
            x += 10 * sd * np.arange(n_chains)[:, None]
        if frozen:  # a sampler that stopped moving: three points, each held for long
            x = np.repeat(x.reshape(-1)[:3], -(-x.size // 3))[: x.size].reshape(shape)
        posterior[name] = x
    if mode == "laminar_flow":
        for name, mu, sd in FLOW_TRUTH:
            posterior[name] = rng.normal(mu, sd, shape)
    if n_angles and derived:
        a = np.arange(n_angles)
        d0 = (posterior["D0"] - STATIC_TRUTH["D0"])[..., None]
        posterior["contrast"] = 0.3 + contrast_shift + 0.01 * a + 1e-5 * d0
        posterior["offset"] = 1.0 + 0.001 * a + 0.01 * posterior["alpha"][..., None]
    elif n_angles:
        posterior["contrast"] = rng.normal(0.3, 0.01, (*shape, n_angles))
        posterior["offset"] = rng.normal(1.0, 0.01, (*shape, n_angles))
    n_div = int(round(divergence_rate * n_chains * n_draws))
    diverging = np.zeros(n_chains * n_draws, dtype=bool)
    diverging[:n_div] = True
    sample_stats = {
        "diverging": diverging.reshape(shape),
        "energy": rng.normal(10.0, 1.0, shape),
        "tree_depth": np.full(shape, 3, dtype=np.int64),
        "step_size": np.full(shape, 0.4),
        "acceptance_rate": rng.uniform(0.7, 0.95, shape),
    }
    idata = az.from_dict(
        posterior=posterior,
        sample_stats=sample_stats,
        dims=None if derived else {"contrast": ["angle"], "offset": ["angle"]},
    )
    K_attr = K if num_shards is None else num_shards
    idata.posterior.attrs.update(
        shard=k,
        num_shards=K_attr,
        n_points=5000 + k,
        analysis_mode=mode,
        per_angle_scaling=("varpro" if derived else "individual") if n_angles else "constant",
        prior_tempering=1.0 / K_attr,
    )
    out.mkdir(parents=True, exist_ok=True)
    nc, js = out / f"{k}.nc", out / f"{k}.json"
    idata.to_netcdf(str(nc))
    meta = {
        "shard": k if json_index is None else json_index,
        "num_shards": K_attr,
        "n_points": 5000 + k,
        "num_chains": n_chains,
        "num_warmup": 200,
        "num_samples": n_draws,
        "seed": k,
        "divergences": n_div,
        "divergence_rate": n_div / (n_chains * n_draws),
        "step_size": 0.4,
        "mean_tree_depth": 3.0,
        "acceptance_rate": 0.85,
        "timings": {"compile_s": 1.0, "warmup_s": 2.0, "sampling_s": 3.0, "total_s": 6.0},
        "parameters": list(posterior),
    }
    js.write_text(json.dumps(meta), encoding="utf-8")
    return nc, js


def make_set(out: Path, K: int, **kw) -> tuple[list[Path], list[Path]]:
    per_shard = kw.pop("per_shard", {})
    pairs = [make_shard(out, k, K, **{**kw, **per_shard.get(k, {})}) for k in range(K)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# ---------------------------------------------------------------------------------------
# Pure combination functions
# ---------------------------------------------------------------------------------------
def test_consensus_mc_is_exact_for_gaussian_shards():
    rng = np.random.default_rng(7)
    K, p, C, D = 4, 3, 4, 25_000
    scales = np.array([1e4, 1.0, 0.01])  # parameters of very different size, as in XPCS
    mus, covs, draws = [], [], []
    for _ in range(K):
        a = rng.normal(size=(p, p))
        cov = (a @ a.T + p * np.eye(p)) * np.outer(scales, scales)
        mu = rng.normal(size=p) * scales
        mus.append(mu)
        covs.append(cov)
        draws.append(rng.multivariate_normal(mu, cov, size=(C, D)))
    precisions = [np.linalg.inv(c) for c in covs]
    cov_true = np.linalg.inv(sum(precisions))
    mu_true = cov_true @ sum(w @ m for w, m in zip(precisions, mus, strict=True))

    combined = consensus_mc(draws)
    assert combined.shape == (C, D, p)
    flat = combined.reshape(-1, p)
    sd = np.sqrt(np.diag(cov_true))
    se = sd / np.sqrt(flat.shape[0])
    assert np.all(np.abs(flat.mean(0) - mu_true) < 5 * se)
    cov = np.cov(flat, rowvar=False)
    corr_err = (cov - cov_true) / np.outer(sd, sd)
    assert np.max(np.abs(corr_err)) < 0.03
    # the naive average is not the product of the Gaussians
    naive = simple_average(draws).reshape(-1, p)
    assert np.max(np.abs(naive.mean(0) - mu_true) / sd) > 0.1


def test_simple_average_of_identical_shards_returns_them():
    x = np.random.default_rng(1).normal(size=(2, 50, 3))
    np.testing.assert_allclose(simple_average([x, x.copy(), x.copy()]), x)
    # consensus of identical shards is also the shard itself (equal weights)
    np.testing.assert_allclose(consensus_mc([x, x.copy()]), x, rtol=1e-10, atol=1e-12)


def test_shards_of_different_shapes_are_refused():
    a, b = np.zeros((2, 50, 3)), np.zeros((2, 40, 3))
    with pytest.raises(
        ShardError, match=r"same \(chains, draws, n_params\).*shard 1: \(2, 40, 3\)"
    ):
        consensus_mc([a, b])
    with pytest.raises(ShardError, match="same"):
        simple_average([a, b])
    with pytest.raises(ShardError, match="singular"):
        x = np.random.default_rng(0).normal(size=(2, 50, 2))
        y = x.copy()
        y[..., 1] = 3.0  # constant parameter in one shard
        consensus_mc([x, y], labels=[4, 5])


def _shard_moments(K, p, rng, sd=1.0):
    """Means and covariances of K homogeneous shards: each mean scatters around the
    full-data mean (0) with the shard's own covariance, as independent data give."""
    covs = np.stack([np.eye(p) * sd**2] * K)
    means = rng.normal(0.0, sd, (K, p))
    return means, covs


def test_outlier_test_drops_a_shard_10_widths_out_and_says_why():
    means, covs = _shard_moments(7, 2, np.random.default_rng(0))
    means[6, 0] = 10.0
    kept, reasons = robust_exclusion(means, covs, 0.01, names=["D0", "alpha"])
    assert kept.tolist() == [True] * 6 + [False]
    assert reasons[6] is not None and "Mahalanobis" in reasons[6] and "D0 +" in reasons[6]
    assert all(r is None for r in reasons[:6])


def test_outlier_test_rarely_excludes_homogeneous_shards():
    # The family-wise false-exclusion probability is outlier_p_value (0.01): over 300
    # homogeneous runs of 16 shards, about 3 lose a shard (the old median/MAD rule on
    # three parameters lost one in most runs).
    rng = np.random.default_rng(1)
    runs_with_exclusion = 0
    for _ in range(300):
        means, covs = _shard_moments(16, 3, rng)
        kept, _ = robust_exclusion(means, covs, 0.01)
        runs_with_exclusion += int(not kept.all())
    assert runs_with_exclusion <= 9, runs_with_exclusion


def test_outlier_test_never_leaves_fewer_than_half():
    means = np.array([[100.0, 0.0], [-100.0, 0.01], [0.0, 50.0], [0.01, -0.01], [-0.01, 0.02]])
    covs = np.stack([np.eye(2)] * 5)
    kept, reasons = robust_exclusion(means, covs, 0.01)
    assert kept.all()
    assert [r is not None for r in reasons] == [True, True, True, False, False]
    assert all("fewer than half" in r for r in reasons[:3])
    # with 3 shards one outlier leaves 2 of 3 (not fewer than half): excluded
    kept3, _ = robust_exclusion(np.array([[0.0], [0.01], [100.0]]), np.ones((3, 1, 1)), 0.01)
    assert kept3.tolist() == [True, True, False]


def test_outlier_test_uses_the_shard_widths():
    # means scatter by 0.01 but each shard posterior is 1 wide: a mean 0.1 away is well
    # inside the shard widths -> kept; 6 widths away -> excluded
    means = np.array([[0.0], [0.01], [-0.01], [0.005], [0.1]])
    kept, reasons = robust_exclusion(means, np.ones((5, 1, 1)), 0.01)
    assert kept.all() and reasons == [None] * 5
    means[4, 0] = 6.0
    assert robust_exclusion(means, np.ones((5, 1, 1)), 0.01)[0].tolist() == [
        True, True, True, True, False
    ]  # fmt: skip


def test_divergence_exclusion():
    kept, reasons = divergence_exclusion([0.0, 0.5, 0.05], 0.1)
    assert kept.tolist() == [True, False, True]
    assert "0.5" in reasons[1] and reasons[0] is None
    kept, reasons = divergence_exclusion([0.3, 0.5], 0.1)
    assert kept.all() and all("kept" in r for r in reasons)


def test_a_shard_whose_sampler_stopped_moving_is_excluded_and_fails_the_run(tmp_path):
    # A collapsed step size in a short warmup leaves a few repeated points: their
    # covariance is singular, so the shard has no consensus weight. The combination goes
    # on without it, names it, and the run is not_converged (it used to stop the stage).
    ncs, jss = make_set(tmp_path / "s", 4, n_draws=150, per_shard={2: {"frozen": True}})
    outcome = combine_stage(ncs, jss, tmp_path / "out")
    assert outcome.kept == [0, 1, 3]
    report = _strict_json(tmp_path / "out" / "combination_report.json")
    assert [(e["shard"], e["excluded_by"]) for e in report["excluded_shards"]] == [
        (2, "degenerate")
    ]
    conv = _strict_json(tmp_path / "out" / "parameters.json")["convergence"]
    assert conv["status"] == "not_converged" and "[2]" in conv["summary"], conv
    # every shard frozen: nothing to combine, and the error names the shard
    ncs, jss = make_set(tmp_path / "t", 2, n_draws=150, frozen=True)
    with pytest.raises(ShardError, match="shard 0: the sample covariance"):
        combine_stage(ncs, jss, tmp_path / "out2")


def test_quality_labels():
    s = CombineSettings()
    assert quality_label(1.01, s) == "good"
    assert quality_label(1.07, s) == "acceptable"
    assert quality_label(1.1, s) == "acceptable"
    assert quality_label(1.2, s) == "poor"
    assert quality_label(float("nan"), s) == "unknown"


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------
def test_settings_round_trip_and_defaults():
    s = CombineSettings.from_mapping(None)
    assert s == CombineSettings()
    assert s.method == "robust_consensus_mc" and s.outlier_p_value == 0.01
    t = CombineSettings.from_mapping({"method": "consensus_mc", "ess_warn": 100})
    assert CombineSettings.from_mapping(t.to_mapping()) == t


@pytest.mark.parametrize(
    "mapping, key",
    [
        ({"bogus": 1}, "cmc.combine.bogus"),
        ({"method": "median"}, "cmc.combine.method"),
        ({"mad_threshold": 3.0}, "cmc.combine.mad_threshold: replaced by outlier_p_value"),
        ({"outlier_p_value": 0}, "cmc.combine.outlier_p_value"),
        ({"shard_ess_min": -1}, "cmc.combine.shard_ess_min"),
        ({"max_divergence_rate": 1.5}, "cmc.combine.max_divergence_rate"),
        ({"rhat_good": True}, "cmc.combine.rhat_good"),
        ({"rhat_good": 1.2, "rhat_acceptable": 1.1}, "cmc.combine.rhat_acceptable"),
    ],
)
def test_settings_errors_name_the_key(mapping, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        CombineSettings.from_mapping(mapping)


# ---------------------------------------------------------------------------------------
# Shard sets
# ---------------------------------------------------------------------------------------
def test_missing_and_mismatched_shards_give_clear_errors(tmp_path):
    ncs, jss = make_set(tmp_path / "a", 3, n_draws=60)
    out = tmp_path / "out"
    with pytest.raises(ShardError, match=r"missing shards \[1\]"):
        combine_stage([ncs[0], ncs[2]], [jss[0], jss[2]], out)
    with pytest.raises(ShardError, match="appear more than once"):
        combine_stage([ncs[0], ncs[0], ncs[2]], [jss[0], jss[0], jss[2]], out)
    with pytest.raises(ShardError, match="3 shard posterior files but 2"):
        combine_stage(ncs, jss[:2], out)
    with pytest.raises(ShardError, match="does not exist"):
        combine_stage([*ncs[:2], tmp_path / "nope.nc"], jss, out)
    # a shard from another run (different num_shards)
    other_nc, other_js = make_shard(tmp_path / "b", 1, 4, n_draws=60)
    with pytest.raises(ShardError, match="num_shards differs"):
        combine_stage([ncs[0], other_nc, ncs[2]], [jss[0], other_js, jss[2]], out)
    # different analysis mode
    flow_nc, flow_js = make_shard(tmp_path / "c", 1, 3, n_draws=60, mode="laminar_flow")
    with pytest.raises(ShardError, match="analysis_mode differs"):
        combine_stage([ncs[0], flow_nc, ncs[2]], [jss[0], flow_js, jss[2]], out)
    # different parameter names (no per-angle scaling in one shard)
    odd_nc, odd_js = make_shard(tmp_path / "d", 1, 3, n_draws=60, n_angles=0)
    with pytest.raises(ShardError, match="differs"):
        combine_stage([ncs[0], odd_nc, ncs[2]], [jss[0], odd_js, jss[2]], out)
    # a physical parameter missing
    miss_nc, miss_js = make_shard(tmp_path / "e", 1, 3, n_draws=60, drop=("alpha",))
    with pytest.raises(ShardError, match=r"lacks \['alpha'\]"):
        combine_stage([ncs[0], miss_nc, ncs[2]], [jss[0], miss_js, jss[2]], out)
    # summary and posterior of different shards
    bad_nc, bad_js = make_shard(tmp_path / "f", 1, 3, n_draws=60, json_index=2)
    with pytest.raises(ShardError, match="not of the same shard"):
        combine_stage([ncs[0], bad_nc, ncs[2]], [jss[0], bad_js, jss[2]], out)
    # different draw counts
    short_nc, short_js = make_shard(tmp_path / "g", 1, 3, n_draws=40)
    with pytest.raises(ShardError, match=r"different \(chains, draws\)"):
        combine_stage([ncs[0], short_nc, ncs[2]], [jss[0], short_js, jss[2]], out)
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------------------
# The stage and its files
# ---------------------------------------------------------------------------------------
def nlsq_record(mode, values, sds, n_angles):
    """An NLSQ parameters record (as the NLSQ stage writes it) with the given values."""
    scaling = {"value": 0.3, "uncertainty": 0.01}
    return NlsqParameters.from_json(
        {
            "schema_version": 1,
            "analysis_mode": mode,
            "parameters": {
                n: {
                    "value": v,
                    "uncertainty": sds[n],
                    "unit": "",
                    "at_bound": False,
                    "fixed": False,
                    "identified": True,
                }
                for n, v in values.items()
            },
            "per_angle": [
                {
                    "phi_deg": 10.0 * k,
                    "contrast": scaling,
                    "offset": {**scaling, "value": 1.0},
                    "chi_squared": 1.0,
                    "flags": [],
                }
                for k in range(n_angles)
            ],
            "per_angle_scaling": "varpro",
            "chi_squared": 100.0,
            "reduced_chi_squared": 1.0,
            "degrees_of_freedom": 100,
            "uncertainty_convention": "test",
            "noise_scale": {},
            "convergence": {
                "status": "converged",
                "reason": "test",
                "iterations": 3,
                "converged": True,
                "not_identified": [],
            },
        }
    )


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cmc")
    K = 4
    ncs, jss = make_set(base / "shards", K, n_chains=2, n_draws=400)
    nlsq = nlsq_record("static", STATIC_TRUTH, STATIC_SD, n_angles=2).write(
        base / "nlsq_parameters.json"
    )
    out = base / "out"
    outcome = combine_stage(ncs, jss, out, CombineSettings(), nlsq_parameters=nlsq)
    return out, outcome, K


def test_combine_stage_writes_every_file_with_documented_keys(good_run):
    out, outcome, K = good_run
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]

    params = _strict_json(out / "parameters.json")
    assert params["method"] == "cmc" and params["analysis_mode"] == "static"
    assert params["combination_method"] == "robust_consensus_mc"
    assert list(params["parameters"]) == ["D0", "alpha", "D_offset"]
    for entry in params["parameters"].values():
        assert set(entry) == {
            "mean", "std", "hdi_3%", "hdi_97%", "r_hat", "ess_bulk", "ess_tail",
            "interval_68", "interval_95", "prior_sd_ratio", "weakly_identified", "unit"
        }  # fmt: skip
        # the data narrowed every prior (D0: sd 150 of ~8000, alpha 0.02 of 0.5, D_offset 4 of 1000)
        assert 0 < entry["prior_sd_ratio"] < 0.5 and entry["weakly_identified"] is False
    assert params["parameters"]["D0"]["unit"] == "Å²/s"
    assert len(params["per_angle"]) == 2 and "contrast" in params["per_angle"][0]
    conv = params["convergence"]
    assert {"status", "all_converged", "min_r_hat", "max_r_hat", "min_ess"} <= set(conv)
    assert conv["all_converged"] is True and conv["weakly_identified"] == []
    assert params["sampling_summary"]["num_shards"] == K
    # combined posterior recovers the truth within its width
    for n, v in STATIC_TRUTH.items():
        e = params["parameters"][n]
        assert abs(e["mean"] - v) < 5 * STATIC_SD[n]
        assert e["std"] == pytest.approx(STATIC_SD[n], rel=0.2)
        assert e["hdi_3%"] < e["mean"] < e["hdi_97%"]
        # the equal-tailed intervals of a near-Gaussian posterior: mean ± 1 and 1.96 sd
        for key, z in (("interval_68", 0.994), ("interval_95", 1.96)):
            lo, hi = e[key]
            assert lo == pytest.approx(e["mean"] - z * e["std"], abs=0.2 * e["std"])
            assert hi == pytest.approx(e["mean"] + z * e["std"], abs=0.2 * e["std"])

    analysis = _strict_json(out / "analysis_results_cmc.json")
    q = analysis["sampling_quality"]
    assert {"convergence_status", "quality_flag", "warnings", "recommendations"} <= set(q)
    assert analysis["dataset_info"]["num_shards"] == K
    assert analysis["dataset_info"]["total_data_points"] == sum(5000 + k for k in range(K))
    cmp = analysis["nlsq_comparison"]["parameters"]
    assert set(cmp) == set(STATIC_TRUTH)
    assert all(abs(c["z_score"]) < 5 for c in cmp.values())
    assert {"nlsq_value", "nlsq_uncertainty", "z_score"} <= set(cmp["D0"])

    diag = _strict_json(out / "diagnostics.json")
    assert {
        "thresholds",
        "per_parameter_diagnostics",
        "sampling_efficiency",
        "cmc_specific",
    } <= set(diag)
    assert diag["thresholds"]["r_hat_good"] == 1.05
    names = [d["name"] for d in diag["per_parameter_diagnostics"]]
    assert names == list(outcome.names)
    assert names[3:] == ["contrast_0", "contrast_1", "offset_0", "offset_1"]
    cmc = diag["cmc_specific"]
    assert cmc["num_shards"] == K and cmc["combination_method"] == "robust_consensus_mc"
    shard0 = cmc["shard_summary"][0]
    for key in ("means", "std", "divergence_rate", "bfmi", "timings", "excluded", "reason"):
        assert key in shard0
    assert shard0["excluded"] is False and len(shard0["bfmi"]) == 2
    assert diag["sampling_efficiency"]["divergences"] == 0

    report = _strict_json(out / "combination_report.json")
    assert report["kept_shards"] == list(range(K)) and report["excluded_shards"] == []
    assert set(report["heterogeneity"]["per_parameter"]) == set(outcome.names)
    assert report["heterogeneity"]["dof"] == K - 1
    assert len(report["per_shard"]) == K


def test_samples_npz_matches_the_seed_schema(good_run):
    out, outcome, K = good_run
    with np.load(out / "samples.npz", allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    assert set(data) == {
        "posterior_samples", "param_names", "r_hat", "ess_bulk", "ess_tail", "divergences",
        "analysis_mode", "n_phi", "n_chains", "n_samples", "schema_version",
    }  # fmt: skip
    p = len(outcome.names)
    assert data["posterior_samples"].shape == (2, 400, p)
    assert data["posterior_samples"].dtype == np.float64
    assert data["param_names"].tolist() == list(outcome.names)
    for key in ("r_hat", "ess_bulk", "ess_tail"):
        assert data[key].shape == (p,)
    for key in ("divergences", "analysis_mode", "n_phi", "n_chains", "n_samples"):
        assert data[key].shape == (1,), key
    assert data["analysis_mode"][0] == "static"
    assert (data["n_phi"][0], data["n_chains"][0], data["n_samples"][0]) == (2, 2, 400)
    assert data["schema_version"].tolist() == [1, 0]

    post = az.from_netcdf(out / "posterior.nc").posterior
    assert set(post.data_vars) == {"D0", "alpha", "D_offset", "contrast", "offset"}
    assert post["contrast"].shape == (2, 400, 2)
    np.testing.assert_allclose(post["D0"].values, data["posterior_samples"][..., 0])


def test_outlier_and_divergent_shards_are_excluded_and_reported(tmp_path):
    K = 6
    ncs, jss = make_set(
        tmp_path / "s",
        K,
        n_draws=150,
        per_shard={1: {"shift": {"D0": 40 * STATIC_SD["D0"]}}, 4: {"divergence_rate": 0.3}},
    )
    out = tmp_path / "out"
    outcome = combine_stage(ncs, jss, out)
    assert outcome.kept == [0, 2, 3, 5]
    report = _strict_json(out / "combination_report.json")
    by = {e["shard"]: e["excluded_by"] for e in report["excluded_shards"]}
    assert by == {1: "outlier", 4: "divergence"}
    analysis = _strict_json(out / "analysis_results_cmc.json")
    recs = " ".join(analysis["sampling_quality"]["recommendations"])
    assert "check shard heterogeneity: shards [1, 4] excluded" in recs
    diag = _strict_json(out / "diagnostics.json")
    summ = {s["shard"]: s for s in diag["cmc_specific"]["shard_summary"]}
    assert summ[4]["excluded"] and "divergence rate" in summ[4]["reason"]
    assert summ[1]["excluded"] and "D0" in summ[1]["reason"]

    # plain consensus keeps the outlier (only the divergence filter applies)
    outcome2 = combine_stage(ncs, jss, tmp_path / "out2", CombineSettings(method="consensus_mc"))
    assert outcome2.kept == [0, 1, 2, 3, 5]
    het = _strict_json(tmp_path / "out2" / "combination_report.json")["heterogeneity"]
    assert "D0" in het["heterogeneous_parameters"] and het["detected"]


def test_stuck_chains_are_poor_and_not_converged(tmp_path):
    ncs, jss = make_set(tmp_path / "s", 3, n_draws=150, stuck=True, n_angles=0)
    out = tmp_path / "out"
    outcome = combine_stage(ncs, jss, out)
    assert outcome.status == "not_converged"
    params = _strict_json(out / "parameters.json")
    assert params["per_angle"] is None
    assert params["parameters"]["D0"]["r_hat"] > 1.1
    assert params["convergence"]["status"] == "not_converged"
    assert params["convergence"]["all_converged"] is False
    diag = _strict_json(out / "diagnostics.json")
    assert all(d["quality"] == "poor" for d in diag["per_parameter_diagnostics"])
    q = _strict_json(out / "analysis_results_cmc.json")["sampling_quality"]
    assert "NOT CONVERGED" in q["summary"]
    assert any("increase num_warmup" in r for r in q["recommendations"])
    with np.load(out / "samples.npz", allow_pickle=False) as f:
        assert f["n_phi"][0] == -1  # not known without sampled scaling or NLSQ


def test_single_chain_writes_null_r_hat_not_nan(tmp_path):
    ncs, jss = make_set(tmp_path / "s", 2, n_chains=1, n_draws=100, n_angles=1)
    out = tmp_path / "out"
    outcome = combine_stage(ncs, jss, out, CombineSettings(method="simple_average"))
    params = _strict_json(out / "parameters.json")  # strict parse: no NaN tokens
    assert params["parameters"]["D0"]["r_hat"] is None
    assert outcome.status == "not_converged"
    assert "undefined" in " ".join(outcome.quality["warnings"])


def test_failures_write_nothing(tmp_path):
    ncs, jss = make_set(tmp_path / "s", 2, n_draws=60)
    out = tmp_path / "out"
    bad = tmp_path / "nlsq.json"
    bad.write_text('{"analysis_mode": "laminar_flow", "parameters": {"D0": {"value": NaN}}}')
    with pytest.raises(DataError):
        combine_stage(ncs, jss, out, nlsq_parameters=bad)
    nlsq_record("laminar_flow", {}, {}, n_angles=1).write(bad)
    with pytest.raises(DataError, match="differs from the shards"):
        combine_stage(ncs, jss, out, nlsq_parameters=bad)
    assert not out.exists() or not any(out.iterdir())


def test_derived_per_angle_scaling_is_combined_per_component(tmp_path):
    # varpro-like shards: contrast/offset are deterministics, their joint covariance with
    # the physical parameters is singular; the stage combines them per component
    ncs, jss = make_set(tmp_path / "s", 3, n_draws=150, n_angles=4, derived=True)
    out = tmp_path / "out"
    outcome = combine_stage(ncs, jss, out)
    assert outcome.names[3:] == tuple(
        [f"contrast_{a}" for a in range(4)] + [f"offset_{a}" for a in range(4)]
    )
    report = _strict_json(out / "combination_report.json")
    assert report["jointly_combined"] == ["D0", "alpha", "D_offset"]
    assert len(report["combined_per_component"]) == 8
    params = _strict_json(out / "parameters.json")
    assert len(params["per_angle"]) == 4 and params["per_angle"][0]["derived"] is True
    assert params["per_angle"][2]["contrast"]["mean"] == pytest.approx(0.32, abs=1e-3)
    with pytest.raises(ShardError, match="singular"):  # why: no joint precision exists
        consensus_mc([sh.draws for sh in read_shards(ncs, jss)])


def test_derived_scaling_is_reported_but_not_assessed(tmp_path):
    # varpro's contrast is each shard's conditional optimum: shards differ by more than
    # its within-shard spread, which is no sign of non-convergence or heterogeneity
    ncs, jss = make_set(
        tmp_path / "s", 2, n_draws=300, derived=True, per_shard={1: {"contrast_shift": 0.05}}
    )
    outcome = combine_stage(ncs, jss, tmp_path / "out")
    assert outcome.status == "converged", outcome.quality["warnings"]
    report = _strict_json(tmp_path / "out" / "combination_report.json")
    assert report["heterogeneity"]["heterogeneous_parameters"] == []


def test_shards_are_combined_in_the_rates_coordinates(tmp_path):
    # Shards Gaussian in (D_early, alpha, D_late), written in the registry parameters as
    # the shard stage writes them: the consensus must be the Gaussian product in the
    # combination coordinates, mapped back.
    t_early, t_late = split_times(0.1 * np.arange(1, 201))
    names = ["D0", "alpha", "D_offset"]
    lo, hi = REGISTRY.bounds(names)
    space = make_space(names, lo, hi, [1e4, 0, 0], [1e4, 0.5, 1e3], t=0.1 * np.arange(1, 201))
    mean_rates = np.array([8000.0, -0.3, 5500.0])  # (D_early, alpha, D_late) columns
    cov_full = np.array([[400.0, 0.05, 100.0], [0.05, 1e-4, 0.02], [100.0, 0.02, 100.0]])
    K, rng = 2, np.random.default_rng(3)
    precisions, weighted = [], []
    ncs, jss = [], []
    for k in range(K):
        mu_k = mean_rates + rng.multivariate_normal(np.zeros(3), cov_full)
        cov_k = K * cov_full
        rates = rng.multivariate_normal(mu_k, cov_k, size=(2, 2000))
        precisions.append(np.linalg.inv(cov_k))
        weighted.append(precisions[-1] @ mu_k)
        physical = from_rates(rates, names, t_early, t_late)
        idata = az.from_dict(
            posterior={n: physical[..., j] for j, n in enumerate(names)},
            sample_stats={"diverging": np.zeros((2, 2000), dtype=bool)},
        )
        idata.posterior.attrs.update(
            shard=k, num_shards=K, n_points=1000, analysis_mode="static",
            per_angle_scaling="constant", prior_tempering=1.0 / K, reparameterize="rates",
            sampled_space=space.to_json(),
        )  # fmt: skip
        (tmp_path / "s").mkdir(exist_ok=True)
        nc, js = tmp_path / "s" / f"{k}.nc", tmp_path / "s" / f"{k}.json"
        idata.to_netcdf(str(nc))
        js.write_text(json.dumps({"shard": k, "num_shards": K, "n_points": 1000}))
        ncs.append(nc)
        jss.append(js)
    outcome = combine_stage(ncs, jss, tmp_path / "out", CombineSettings(method="consensus_mc"))
    cov = np.linalg.inv(sum(precisions))
    mean = cov @ sum(weighted)
    combined = to_rates(outcome.draws, names, t_early, t_late).reshape(-1, 3)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(combined.mean(0) - mean) < 0.1 * sd), (combined.mean(0), mean, sd)
    np.testing.assert_allclose(combined.std(0), sd, rtol=0.05)
    # in the physical parameters the combined posterior is not Gaussian, but its mean is
    # the mapped-back Gaussian product, not the product of the physical moments
    assert outcome.summary["mean"][0] == pytest.approx(
        from_rates(rng.multivariate_normal(mean, cov, 200_000), names, t_early, t_late)[
            :, 0
        ].mean(),
        rel=0.01,
    )
    space_record = _strict_json(tmp_path / "out" / "analysis_results_cmc.json")["parameter_space"]
    assert [space_record[n]["prior"]["sigma"] for n in names] == [1e4, 0.5, 1e3]


def test_the_analysis_record_reports_the_prior_the_shards_used():
    """Bounds and prior from the shards' recorded space (config overrides, prior type
    nlsq), not the registry's defaults; the registry's only for shards without one."""
    from types import SimpleNamespace

    from homodyne_steps.stages.cmc_records import _parameter_space

    names = ("D0", "alpha", "D_offset")
    space = make_space(names, [50.0, -1.5, -10.0], [2e5, 1.0, 10.0], [2e4, -0.2, 1.0],
                       [3e3, 0.1, 2.0], t=0.1 * np.arange(1, 21))  # fmt: skip
    run = SimpleNamespace(first=SimpleNamespace(space=space, physical=names))
    rec = _parameter_space(run)
    assert rec["D0"] == {"bounds": [50.0, 2e5], "unit": "Å²/s", "prior": {"mu": 2e4, "sigma": 3e3}}
    assert rec["alpha"]["prior"] == {"mu": -0.2, "sigma": 0.1}
    assert rec["D_offset"]["bounds"] == [-10.0, 10.0]
    old = _parameter_space(SimpleNamespace(first=SimpleNamespace(space=None, physical=names)))
    assert old["D0"]["prior"] == {
        "mu": REGISTRY["D0"].prior_mu,
        "sigma": REGISTRY["D0"].prior_sigma,
    }


def test_one_stuck_shard_makes_the_run_not_converged_and_is_named(tmp_path):
    # Consensus gives a stuck shard's wide draws little weight, so the combined R-hat
    # looks fine; the shard's own R-hat must still fail the run.
    ncs, jss = make_set(tmp_path / "s", 8, n_draws=200, n_angles=0, per_shard={3: {"stuck": True}})
    outcome = combine_stage(ncs, jss, tmp_path / "out", CombineSettings(method="consensus_mc"))
    assert max(outcome.summary["r_hat"]) < 1.1  # hidden in the combination ...
    assert outcome.status == "not_converged"  # ... but not in the verdict
    params = _strict_json(tmp_path / "out" / "parameters.json")
    assert "shards [3] did not converge" in params["convergence"]["summary"]
    report = _strict_json(tmp_path / "out" / "combination_report.json")
    assert [e["shard"] for e in report["not_converged_shards"]] == [3]
    assert "R-hat" in report["not_converged_shards"][0]["problem"]
    diag = _strict_json(tmp_path / "out" / "diagnostics.json")
    shards = {s["shard"]: s for s in diag["cmc_specific"]["shard_summary"]}
    assert shards[3]["converged"] is False and shards[0]["converged"] is True


def test_the_prior_is_applied_once_and_excluded_shards_take_only_their_data(tmp_path):
    # Gaussian likelihoods L_k in the combination coordinates u; each shard's draws come
    # from L_k·G^(1/K) (G: the recorded surrogate prior, Gaussian in u, so the product is
    # Gaussian); shard 3 is an outlier. The stage must return L_kept·π·|∂θ/∂u|, computed
    # here without G: draws of the Gaussian L_kept weighted by SciPy's truncated normal.
    from scipy.stats import truncnorm

    from homodyne_steps.physics.cmc_space import (
        log_abs_det,
        theta_from_w,
        w_from_theta,
        with_surrogate,
    )

    t = 0.1 * np.arange(1, 201)
    names = ["D0", "alpha", "D_offset"]
    lo, hi = np.array([100.0, -2.0, -1e5]), np.array([1e5, 2.0, 1e5])
    mu_p, sd_p = np.array([1e4, -0.1, 0.0]), np.array([1000.0, 0.02, 300.0])  # informative
    base = make_space(names, lo, hi, mu_p, sd_p, t=t)
    theta0 = np.array([1e4, -0.1, 10.0])
    space = with_surrogate(base, theta0, np.array([100.0, 0.01, 100.0]))
    u0 = np.asarray(w_from_theta(theta0, space, "rates"))
    sd_u = np.abs(u0) * np.array([0.01, 0.0, 0.01]) + np.array([0.0, 0.03, 0.0])
    K, rng = 4, np.random.default_rng(5)
    prec_lik = np.diag(1.0 / (np.sqrt(K) * sd_u) ** 2)  # each L_k: N(means[k], prec_lik⁻¹)
    means = [u0 + rng.normal(0, sd_u * np.sqrt(K - 1)) for _ in range(K)]
    means[3] = u0 + 40 * np.sqrt(K) * sd_u  # the outlier
    prec_g, mu_g = np.diag(1.0 / space.surrogate_sd**2), space.surrogate_mu
    prec_shard = prec_lik + prec_g / K
    cov_shard = np.linalg.inv(prec_shard)
    (tmp_path / "s").mkdir()
    ncs, jss = [], []
    for k in range(K):
        m_k = cov_shard @ (prec_lik @ means[k] + prec_g @ mu_g / K)
        u = rng.multivariate_normal(m_k, cov_shard, size=(2, 3000))
        theta = np.asarray(theta_from_w(u, space, "rates"))
        idata = az.from_dict(
            posterior={n: theta[..., j] for j, n in enumerate(names)},
            sample_stats={"diverging": np.zeros((2, 3000), dtype=bool)},
        )
        idata.posterior.attrs.update(
            shard=k, num_shards=K, n_points=1000, analysis_mode="static",
            per_angle_scaling="constant", prior_tempering=1.0 / K,
            sampled_space=space.to_json(),
        )  # fmt: skip
        nc, js = tmp_path / "s" / f"{k}.nc", tmp_path / "s" / f"{k}.json"
        idata.to_netcdf(str(nc))
        js.write_text(json.dumps({"shard": k, "num_shards": K, "n_points": 1000}))
        ncs.append(nc)
        jss.append(js)
    outcome = combine_stage(ncs, jss, tmp_path / "out")
    assert outcome.kept == [0, 1, 2]
    report = _strict_json(tmp_path / "out" / "combination_report.json")
    applied = report["prior_application"]
    assert applied["method"] == "pareto_smoothed_importance_resampling" and applied["reliable"]
    assert "G(u)^0.75" in applied["weights"]
    # reference: the kept shards' Gaussian likelihood product × π |J|
    prec = 3 * prec_lik
    m = np.linalg.solve(prec, sum(prec_lik @ means[k] for k in range(3)))
    u = rng.multivariate_normal(m, np.linalg.inv(prec), 400_000)
    theta = np.asarray(theta_from_w(u, space, "rates"))
    a, b = (lo - mu_p) / sd_p, (hi - mu_p) / sd_p
    log_w = truncnorm.logpdf(theta, a, b, loc=mu_p, scale=sd_p).sum(-1)
    log_w += np.asarray(log_abs_det(theta, space, "rates"))
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    ref_mean = w @ theta
    ref_sd = np.sqrt(w @ (theta - ref_mean) ** 2)
    assert np.any(np.abs(theta.mean(0) - ref_mean) > 0.3 * ref_sd)  # the prior matters
    z = (outcome.summary["mean"][:3] - ref_mean) / ref_sd
    assert np.all(np.abs(z) < 0.1), (z, outcome.summary["mean"][:3], ref_mean, ref_sd)
    np.testing.assert_allclose(outcome.summary["std"][:3], ref_sd, rtol=0.07)


def test_shards_whose_surrogates_differ_only_by_round_off_belong_together():
    # each shard finds G itself (a Newton solve on the data); on other hardware its
    # centre differs by round-off, which must not split the set
    from dataclasses import replace

    from homodyne_steps.io.shard_io import _same_surrogate, _without_surrogate

    names = ["D0", "alpha", "D_offset"]
    base = make_space(names, [1e2, -2.0, -1e5], [1e5, 2.0, 1e5], [1e4, 0, 0],
                      [1e4, 0.5, 1e3], t=0.1 * np.arange(1, 201))  # fmt: skip
    mu, sd = np.array([8.1e3, -0.4, 6.2e3]), np.array([900.0, 0.3, 700.0])
    a = replace(base, surrogate_mu=mu, surrogate_sd=sd)
    b = replace(a, surrogate_mu=mu * (1 + 1e-13), surrogate_sd=sd * (1 - 1e-13))
    assert _without_surrogate(a) == _without_surrogate(b) and _same_surrogate(a, b)
    far = replace(a, surrogate_mu=mu + [0.0, 0.01, 0.0])  # 3 % of alpha's width
    assert not _same_surrogate(a, far)
    assert not _same_surrogate(a, base)
