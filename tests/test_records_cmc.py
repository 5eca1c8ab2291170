"""The typed records of the CMC files (:mod:`homodyne_steps.io.cmc_files`).

Real files, made by the real stages on small inputs (the plan of a tiny dataset, the
combination of fake shards from ``test_cmc_combine``), read back into records and
written again byte for byte; undefined numbers read as None; a corrupted file is one
RecordError naming the file and the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from homodyne_steps.io.cmc_files import (
    AnglePosterior,
    CmcAnalysis,
    CmcDiagnostics,
    CmcParameters,
    CmcPlan,
    CombinationReport,
    PosteriorStats,
    TimeSpread,
)
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.io.record import ABSENT, RecordError
from homodyne_steps.plots.plot_cmc import plot_cmc_stage
from homodyne_steps.plots.plot_common import PlotError
from homodyne_steps.stages.cmc_combine import CombineSettings, combine_stage
from homodyne_steps.stages.cmc_plan import ShardingSettings, cmc_plan_stage
from test_cmc_combine import STATIC_SD, STATIC_TRUTH, make_set, nlsq_record

RECORDS = {
    "plan.json": CmcPlan,
    "parameters.json": CmcParameters,
    "analysis_results_cmc.json": CmcAnalysis,
    "combination_report.json": CombinationReport,
    "diagnostics.json": CmcDiagnostics,
}
N_MASKED = 4


def _tiny_data(n_phi: int = 3, n_t: int = 30) -> XpcsData:
    rng = np.random.default_rng(5)
    t = 0.1 * np.arange(1, n_t + 1)
    lag = np.abs(t[:, None] - t[None, :])
    c2 = 1.0 + 0.3 * np.exp(-lag) + 0.001 * rng.standard_normal((n_phi, n_t, n_t))
    c2 = (c2 + np.swapaxes(c2, 1, 2)) / 2
    for a, i, j in ((0, 0, 5), (0, 3, 9), (1, 2, 20), (2, 10, 11)):  # N_MASKED points
        c2[a, i, j] = c2[a, j, i] = np.nan
    phi = np.array([0.0, 45.0, 90.0])[:n_phi]
    return XpcsData(np.full(n_phi, 0.005), phi, t, t.copy(), c2, 0.1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Folders of real CMC outputs: ``full`` (the plan of a tiny dataset; 4 shards with
    per-angle scaling, one excluded as an outlier, compared with NLSQ) and ``nulls`` (one
    chain, no per-angle scaling, no NLSQ: R-hat, n_phi, the comparison are null)."""
    base = tmp_path_factory.mktemp("cmc_records")
    full, nulls = base / "full", base / "nulls"
    _tiny_data().to_npz(base / "qc.npz")
    cmc_plan_stage(
        base / "qc.npz",
        full / "plan.json",
        full / "plan.npz",
        mode="static",
        scaling_mode="varpro",
        settings=ShardingSettings.from_mapping({"num_shards": 2, "min_points_per_parameter": 10}),
    )
    ncs, jss = make_set(
        base / "s_full",
        4,
        n_draws=120,
        n_angles=2,
        per_shard={1: {"shift": {"D0": 40 * STATIC_SD["D0"]}}},
    )
    nlsq = nlsq_record("static", STATIC_TRUTH, STATIC_SD, n_angles=2).write(base / "nlsq.json")
    combine_stage(ncs, jss, full, CombineSettings(), nlsq_parameters=nlsq)
    ncs, jss = make_set(base / "s_nulls", 2, n_chains=1, n_draws=80, n_angles=0)
    combine_stage(ncs, jss, nulls, CombineSettings(method="simple_average"))
    return {"full": full, "nulls": nulls}


def _cases() -> list[tuple[str, str]]:
    return [("full", name) for name in RECORDS] + [
        ("nulls", name) for name in RECORDS if name != "plan.json"
    ]


@pytest.mark.parametrize(("run", "name"), _cases())
def test_a_record_read_and_written_again_is_the_same_file(runs, tmp_path, run, name):
    path = runs[run] / name
    rec = RECORDS[name].read(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert rec.to_json() == raw
    assert list(rec.to_json()) == list(raw)
    assert rec.write(tmp_path / name).read_bytes() == path.read_bytes()


def test_plan_record_holds_the_plan(runs):
    plan = CmcPlan.read(runs["full"] / "plan.json")
    n_pairs = 30 * 29 // 2
    assert plan.num_shards == 2 and len(plan.points_per_shard) == 2
    assert plan.n_masked == N_MASKED and plan.n_points == 3 * n_pairs - N_MASKED
    assert plan.decisions[0].decision == "num_shards" and plan.decisions[0].value == 2
    assert plan.sampling_coordinates == "rates" and plan.settings["num_shards"] == 2


def test_records_of_a_full_run(runs):
    out = runs["full"]
    params = CmcParameters.read(out / "parameters.json")
    assert params.names == tuple(STATIC_TRUTH)
    d0 = params.parameters["D0"]
    assert d0.hdi_3 < d0.mean < d0.hdi_97 and d0.unit == "Å²/s"
    assert [row.angle for row in params.per_angle] == [0, 1]
    assert params.per_angle[0].contrast.mean == pytest.approx(0.3, abs=0.02)
    assert params.noise_scale is None  # the fake shards do not record it
    report = CombinationReport.read(out / "combination_report.json")
    assert [(e.shard, e.excluded_by) for e in report.excluded_shards] == [(1, "outlier")]
    assert report.kept_shards == [0, 2, 3] and not report.per_shard[1].kept
    assert report.heterogeneity.dof == 2 and report.settings.ess_warn == 400.0
    analysis = CmcAnalysis.read(out / "analysis_results_cmc.json")
    assert analysis.nlsq_comparison is not None
    assert set(analysis.nlsq_comparison.parameters) == set(STATIC_TRUTH)
    assert analysis.dataset_info.n_phi == 2
    diag = CmcDiagnostics.read(out / "diagnostics.json")
    summary = diag.cmc_specific.shard_summary
    assert summary[1].excluded and summary[1].excluded_by == "outlier"
    assert summary[0].reason is None and len(summary[0].bfmi) == 2


def test_undefined_numbers_read_as_none(runs):
    out = runs["nulls"]
    params = CmcParameters.read(out / "parameters.json")
    assert params.parameters["D0"].r_hat is None and params.per_angle is None
    assert params.convergence.min_r_hat is None and params.convergence.max_r_hat is None
    analysis = CmcAnalysis.read(out / "analysis_results_cmc.json")
    assert analysis.nlsq_comparison is None and analysis.dataset_info.n_phi is None
    diag = CmcDiagnostics.read(out / "diagnostics.json")
    assert all(p.r_hat is None for p in diag.per_parameter_diagnostics)
    assert diag.cmc_specific.shard_summary[0].max_r_hat is None


def _drop(*keys):
    def edit(rec):
        for key in keys[:-1]:
            rec = rec[key]
        del rec[keys[-1]]

    return edit


def _set(*keys, value):
    def edit(rec):
        for key in keys[:-1]:
            rec = rec[key]
        rec[keys[-1]] = value

    return edit


CORRUPTIONS = [
    ("plan.json", _drop("num_shards"), "key 'num_shards' is missing"),
    ("plan.json", _set("decisions", 0, "reason", value=None), "'decisions[0].reason'"),
    ("parameters.json", _drop("parameters", "D0", "hdi_97%"), "'parameters.D0.hdi_97%'"),
    ("parameters.json", _set("convergence", "status", value=3), "'convergence.status'"),
    (
        "analysis_results_cmc.json",
        _drop("sampling_quality", "warnings"),
        "'sampling_quality.warnings'",
    ),
    ("analysis_results_cmc.json", _set("dataset_info", "n_phi", value=2.5), "'dataset_info.n_phi'"),
    ("combination_report.json", _drop("heterogeneity", "dof"), "'heterogeneity.dof'"),
    ("combination_report.json", _set("per_shard", 0, "kept", value="yes"), "'per_shard[0].kept'"),
    (
        "diagnostics.json",
        _drop("cmc_specific", "shard_summary", 0, "seed"),
        "'cmc_specific.shard_summary[0].seed'",
    ),
    ("diagnostics.json", _set("thresholds", "bfmi_warn", value=None), "'thresholds.bfmi_warn'"),
]


@pytest.mark.parametrize(("name", "edit", "key"), CORRUPTIONS)
def test_a_corrupted_file_is_an_error_naming_the_file_and_the_key(runs, tmp_path, name, edit, key):
    raw = json.loads((runs["full"] / name).read_text(encoding="utf-8"))
    edit(raw)
    path = tmp_path / name
    path.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(RecordError) as info:
        RECORDS[name].read(path)
    message = str(info.value)
    assert str(path) in message and RECORDS[name].WHAT in message and key in message


def test_keys_older_files_lack_are_absent_and_not_written(runs):
    raw = json.loads((runs["full"] / "plan.json").read_text(encoding="utf-8"))
    del raw["n_masked"], raw["sampling_coordinates"]
    plan = CmcPlan.from_json(raw)
    assert plan.n_masked is ABSENT and plan.sampling_coordinates is ABSENT
    assert plan.to_json() == raw
    row = AnglePosterior.from_json({"angle": 0, "coordinate": 12.5, "derived": False})
    assert row.contrast is ABSENT and row.to_json() == {
        "angle": 0,
        "coordinate": 12.5,
        "derived": False,
    }


def test_keys_that_are_no_python_names_map_to_fields():
    stats = dict.fromkeys(("mean", "std", "hdi_3%", "hdi_97%", "r_hat"), 1.0)
    stats |= {"ess_bulk": 10, "ess_tail": None, "unit": "1/s"}  # an int stays an int
    rec = PosteriorStats.from_json(stats)
    assert (rec.hdi_3, rec.hdi_97, rec.ess_bulk) == (1.0, 1.0, 10)
    assert json.dumps(rec.to_json()) == json.dumps(stats)


def test_builders_write_null_for_non_finite_and_refuse_undeclared_keys():
    rec = TimeSpread.of_mapping(
        {"sum": np.float64("nan"), "max": np.float32(np.inf)}, null_non_finite=True
    )
    assert rec == TimeSpread(sum=None, max=None)
    with pytest.raises(RecordError, match="does not hold every key"):
        TimeSpread.of_mapping({"sum": 1.0, "max": 2.0, "mean": 1.5}, null_non_finite=True)


def test_plots_name_the_corrupted_file_and_key(runs, tmp_path):
    cmc = tmp_path / "cmc"
    cmc.mkdir()
    params = json.loads((runs["full"] / "parameters.json").read_text(encoding="utf-8"))
    del params["convergence"]["status"]
    (cmc / "parameters.json").write_text(json.dumps(params), encoding="utf-8")
    report = (runs["full"] / "combination_report.json").read_text(encoding="utf-8")
    (cmc / "combination_report.json").write_text(report, encoding="utf-8")
    with pytest.raises(PlotError, match=r"parameters\.json.*'convergence\.status' is missing"):
        plot_cmc_stage(cmc, [], tmp_path / "plots")
