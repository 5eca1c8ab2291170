"""Missing values are carried as NaN through filter → preprocess → QC and never fitted.

The data here are built independently of the package's model: an exponential decay
c2 = 1 + b·exp(−2Γ|t1 − t2|) with Gaussian noise of known σ = 0.01 (drawn on the upper
triangle and mirrored, as a correlator does) and a shot-noise excess on the diagonal.
A block of lost frames (whole rows and columns) is NaN. Before, QC filled such a hole by
band interpolation and NLSQ fitted the invented points at full weight: 30 lost frames
became 8 535 invented points, σ 0.0077 instead of 0.0100, and QC said "excellent".
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from homodyne_steps.data.preprocess_settings import PreprocessSettings
from homodyne_steps.data.qc_settings import QcSettings
from homodyne_steps.inference.likelihood import count_points
from homodyne_steps.inference.noise import estimate_sigma_per_lag
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.io.serialise import read_npz
from homodyne_steps.stages.cmc_plan import ShardingSettings, cmc_plan_stage
from homodyne_steps.stages.filter import FilterSettings, apply_filter, filter_stage
from homodyne_steps.stages.preprocess import preprocess, preprocess_stage
from homodyne_steps.stages.qc import qc_stage, run_qc

SIGMA = 0.01
N_T = 150
DT = 0.1
GAMMA = 0.25  # 1/s: g1² = exp(-2Γ|Δt|) falls to 1/e in 20 frames
CONTRAST = 0.3
PHIS = np.array([-20.0, 10.0, 40.0])
Q = 0.0054
HOLE = slice(60, 90)  # 30 lost frames


def exponential_data(seed: int = 0, n_t: int = N_T) -> XpcsData:
    rng = np.random.default_rng(seed)
    t = DT * np.arange(1, n_t + 1)  # no t = 0 frame: the filter keeps every frame
    lag = np.abs(np.subtract.outer(t, t))
    mats = []
    for _ in PHIS:
        e = np.triu(rng.normal(0.0, SIGMA, (n_t, n_t)), 1)
        c = 1.0 + CONTRAST * np.exp(-2.0 * GAMMA * lag) + e + e.T
        c[np.diag_indices(n_t)] += 0.2  # shot-noise excess: the diagonal correction's job
        mats.append(c)
    return XpcsData(np.full(PHIS.size, Q), PHIS.copy(), t, t.copy(), np.stack(mats), DT)


def with_hole(data: XpcsData, angles=None, frames: slice = HOLE) -> XpcsData:
    c2 = data.c2_exp.copy()
    for a in range(data.n_phi) if angles is None else angles:
        c2[a, frames, :] = np.nan
        c2[a, :, frames] = np.nan
    return data.replace(c2_exp=c2)


def hole_mask(n_t: int, frames: slice = HOLE) -> np.ndarray:
    """True at every upper-triangle pair (i < j) that touches a lost frame."""
    lost = np.zeros(n_t, dtype=bool)
    lost[frames] = True
    i, j = np.triu_indices(n_t, k=1)
    return lost[i] | lost[j]


def pipeline(raw: XpcsData, qc: QcSettings | None = None):
    filtered, _ = apply_filter(raw, FilterSettings.from_mapping({}))
    pre, _ = preprocess(filtered, PreprocessSettings.from_mapping({}))
    report, final = run_qc(raw, filtered, pre, qc or QcSettings())
    return filtered, pre, report, final


@pytest.fixture(scope="module")
def runs():
    clean = exponential_data()
    holed = with_hole(clean)
    return {"clean": pipeline(clean), "holed": pipeline(holed)}


def test_final_data_have_nan_at_exactly_the_lost_points(runs):
    _, pre, report, final = runs["holed"]
    assert final.n_phi == 3 and report["dropped_angles"] == []
    expected = hole_mask(N_T)
    i, j = np.triu_indices(N_T, k=1)
    for a in range(final.n_phi):
        upper = final.c2_exp[a][i, j]
        np.testing.assert_array_equal(np.isnan(upper), expected)  # nothing invented
        np.testing.assert_array_equal(upper[~expected], pre.c2_exp[a][i, j][~expected])
    # the matrices stay symmetric, holes included
    np.testing.assert_array_equal(final.c2_exp, np.swapaxes(final.c2_exp, 1, 2))


def test_noise_estimate_of_the_final_data_is_the_true_sigma(runs):
    for name in ("clean", "holed"):
        final = runs[name][3]
        sigma = estimate_sigma_per_lag(final.c2_exp)
        per_angle = np.median(sigma[:, 1:], axis=1)
        np.testing.assert_allclose(per_angle, SIGMA, rtol=0.1, err_msg=name)


def test_qc_reports_the_masked_fraction_and_charges_it(runs):
    clean, holed = runs["clean"][2], runs["holed"][2]
    fin = holed["checkpoints"]["final"]
    n_pairs = N_T * (N_T - 1) // 2
    per_angle = int(hole_mask(N_T).sum())
    assert [x["masked"] for x in fin["masked"]["per_angle"]] == [per_angle] * 3
    assert fin["masked"]["fraction"] == pytest.approx(per_angle / n_pairs)
    issues = [i for i in fin["issues"] if i["code"] == "masked"]
    assert [i["angle_index"] for i in issues] == [0, 1, 2]
    assert f"{per_angle} of {n_pairs} off-diagonal pairs masked" in issues[0]["message"]
    assert fin["deductions"]["masked"] == pytest.approx(40 * per_angle / n_pairs, abs=0.01)
    assert holed["overall"]["score"] < clean["overall"]["score"]
    assert holed["overall"]["passed"]  # a hole costs information; the rest is usable
    # the repair record says what was masked, and that nothing was filled
    recs = [r for r in holed["repairs"] if r["what"] == "nan"]
    assert [r["angle_index"] for r in recs] == [0, 1, 2]
    assert all(r["after"]["from_symmetric"] == 0 for r in recs)


def test_nlsq_point_count_excludes_the_masked_points(runs):
    final = runs["holed"][3]
    sigma = estimate_sigma_per_lag(final.c2_exp)
    n_pairs = N_T * (N_T - 1) // 2
    assert count_points(final.c2_exp, sigma) == 3 * (n_pairs - int(hole_mask(N_T).sum()))
    clean = runs["clean"][3]
    assert count_points(clean.c2_exp, estimate_sigma_per_lag(clean.c2_exp)) == 3 * n_pairs


def test_cmc_plan_holds_only_finite_points_with_their_ids(runs, tmp_path):
    final = runs["holed"][3]
    final.to_npz(tmp_path / "qc.npz")
    rec = cmc_plan_stage(
        tmp_path / "qc.npz",
        tmp_path / "plan.json",
        tmp_path / "plan.npz",
        mode="static",
        scaling_mode="varpro",
        settings=ShardingSettings.from_mapping(
            {"max_points_per_shard": 1_000, "min_points_per_parameter": 1_000}
        ),
    )
    n_pairs = N_T * (N_T - 1) // 2
    n_finite = 3 * (n_pairs - int(hole_mask(N_T).sum()))
    assert rec.n_points == n_finite and rec.n_masked == 3 * n_pairs - n_finite
    # by information: n_finite // (1000 x 3 parameters); the hole leaves fewer shards
    assert rec.num_shards == n_finite // 3_000 < 3 * n_pairs // 3_000
    plan = read_npz(tmp_path / "plan.npz")
    ids = plan["indices"][plan["indices"] < 3 * n_pairs]
    assert int(plan["n_ids"]) == 3 * n_pairs and ids.size == n_finite == np.unique(ids).size
    # ids keep their meaning: id = angle * n_pairs + pair, and each names a finite point
    i, j = np.triu_indices(N_T, k=1)
    a, p = np.divmod(ids, n_pairs)
    assert np.isfinite(final.c2_exp[a, i[p], j[p]]).all()


def test_angle_with_too_many_masked_points_is_dropped_through_the_stages(tmp_path):
    raw = with_hole(exponential_data(seed=1), angles=[1], frames=slice(20, 110))
    raw.to_npz(tmp_path / "loaded.npz")
    data = tmp_path
    filter_stage(
        data / "loaded.npz",
        data / "filtered.npz",
        data / "filter_report.json",
        FilterSettings.from_mapping({}),
    )
    preprocess_stage(data / "filtered.npz", data / "preprocessed.npz", data / "provenance.json")
    qc_stage(
        data / "loaded.npz",
        data / "filtered.npz",
        data / "preprocessed.npz",
        data / "qc_report.json",
        data / "qc.npz",
        {"max_masked_fraction": 0.5},
    )
    report = json.loads((data / "qc_report.json").read_text())
    frac = float(hole_mask(N_T, slice(20, 110)).mean())
    assert frac > 0.5
    (d,) = report["dropped_angles"]
    assert d["angle_index"] == 1 and d["phi"] == 10.0
    assert d["masked_fraction"] == pytest.approx(frac)
    assert "max_masked_fraction = 0.5" in d["reason"]
    final = XpcsData.from_npz(data / "qc.npz")
    assert final.phi_angles_list.tolist() == [-20.0, 40.0]
    assert np.isfinite(final.c2_exp[:, ~np.eye(N_T, dtype=bool)]).all()
    # preprocess recorded the masked count of every angle instead of failing
    prov = json.loads((data / "provenance.json").read_text())
    (val,) = [r for r in prov["records"] if r["step"] == "validation"]
    assert [x["masked"] for x in val["masked_per_angle"]] == [0, d["masked"], 0]


def test_plots_show_the_display_smoothing_and_the_dropped_angles(tmp_path):
    from homodyne_steps.plots.plot_data import plot_data_stage
    from homodyne_steps.plots.plot_qc import plot_qc_stage

    raw = with_hole(exponential_data(seed=2, n_t=60), angles=[0, 1], frames=slice(10, 20))
    raw = with_hole(raw, angles=[2], frames=slice(5, 50))  # > 50 % masked: dropped
    raw.to_npz(tmp_path / "filtered.npz")
    preprocess_stage(
        tmp_path / "filtered.npz",
        tmp_path / "preprocessed.npz",
        tmp_path / "provenance.json",
        {"noise_reduction": {"enabled": True, "size": 1.5}},
    )
    index = plot_data_stage(
        tmp_path / "filtered.npz", tmp_path / "preprocessed.npz", tmp_path / "d"
    )
    assert index["smoothed_for_display"] is True and len(index["figures"]) == 4
    qc_stage(
        tmp_path / "filtered.npz",
        tmp_path / "filtered.npz",
        tmp_path / "preprocessed.npz",
        tmp_path / "qc_report.json",
        tmp_path / "qc.npz",
        {"on_fail": "warn"},
    )
    report = json.loads((tmp_path / "qc_report.json").read_text())
    assert [d["angle_index"] for d in report["dropped_angles"]] == [2]
    plot_qc_stage(tmp_path / "qc_report.json", tmp_path / "q", dataset="holes")
    assert (tmp_path / "q" / "qc_summary.png").stat().st_size > 0
    # the smoothed display array never reaches the fit's input
    assert "c2_smoothed" not in read_npz(tmp_path / "qc.npz")
