"""Tests of the quality-control stage (homodyne_steps.qc)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from homodyne_steps.dataset import XpcsData
from homodyne_steps.errors import ConfigError, QualityError
from homodyne_steps.qc import (
    QcSettings,
    angle_stats,
    assess,
    failed_report_path,
    qc_stage,
    repair,
    run_qc,
)

PHIS = np.array([0.0, 45.0, 90.0])


def symmetric_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    e = rng.normal(0.0, sigma, (n, n))
    return np.triu(e) + np.triu(e, 1).T  # mirror the upper triangle, as a correlator does


def make_data(n: int = 60, noise: float = 0.01, seed: int = 0) -> XpcsData:
    """c2 = 1 + 0.3 exp(-|ti - tj| / 20) with 1% relative symmetric noise, 3 angles."""
    rng = np.random.default_rng(seed)
    lag = np.abs(np.subtract.outer(np.arange(n), np.arange(n)))
    clean = 1.0 + 0.3 * np.exp(-lag / 20.0)
    c2 = np.stack([clean * (1.0 + symmetric_noise(rng, n, noise)) for _ in PHIS])
    t = np.arange(n) * 0.1
    return XpcsData(np.full(3, 0.0054), PHIS.copy(), t, t.copy(), c2, 0.1)


def with_c2(data: XpcsData, c2: np.ndarray) -> XpcsData:
    return data.replace(c2_exp=c2)


def codes(report, angle: int | None = None) -> set[str]:
    return {i.code for i in report.issues if angle is None or i.angle_index == angle}


def strict_load(path):
    def reject(token):
        raise AssertionError(f"non-standard JSON token {token} in {path}")

    return json.loads(path.read_text(), parse_constant=reject)


# --------------------------------------------------------------------------- clean data


def test_clean_data_is_excellent_at_every_checkpoint():
    data = make_data()
    report, final = run_qc(data, data, data, QcSettings())
    for name in ("raw", "filtered", "preprocessed", "final"):
        cp = report["checkpoints"][name]
        assert cp["score"] >= 85, (name, cp["issues"])
        assert cp["label"] == "excellent"
        assert cp["issues"] == []
    assert report["repairs"] == []
    assert report["overall"]["status"] == "excellent"
    np.testing.assert_array_equal(final.c2_exp, data.c2_exp)


def test_statistics_of_clean_data():
    st = angle_stats(make_data().c2_exp[0])
    assert st.first_lag == pytest.approx(1 + 0.3 * np.exp(-1 / 20), abs=0.01)
    assert st.baseline == pytest.approx(1.05, abs=0.05)
    assert st.noise == pytest.approx(0.01 * 1.1, rel=0.2)  # σ = 1% of c2 ~ 1.1


def test_first_lag_ceiling_is_checked_off_diagonal_not_on_the_diagonal():
    data = make_data()
    clean_score = assess(data, "raw").score
    n = data.n_t
    # A huge shot-noise excess on the diagonal alone must not matter...
    diag = data.c2_exp + 5.0 * np.eye(n)
    assert assess(with_c2(data, diag), "raw").score == clean_score
    # ...but the same excess at the first non-zero lag is suspicious.
    band = np.eye(n, k=1) + np.eye(n, k=-1)
    c2 = data.c2_exp.copy()
    c2[1] += 5.0 * band
    r = assess(with_c2(data, c2), "raw")
    assert r.score < clean_score
    high = [i for i in r.issues if i.code == "first_lag_high"]
    assert [i.angle_index for i in high] == [1]
    assert "phi=45" in high[0].message and high[0].value == pytest.approx(6.28, abs=0.05)


# --------------------------------------------------------------------------- repairs


def test_nan_found_and_repaired_symmetrically():
    data = make_data()
    c2 = data.c2_exp.copy()
    c2[1, 3, 10] = np.nan  # lone NaN: its partner c2[1, 10, 3] is finite
    for i, j in [(5, 20), (6, 21), (7, 22), (30, 30), (0, 59)]:  # symmetric NaN pairs
        c2[1, i, j] = c2[1, j, i] = np.nan
    n_nan = int(np.isnan(c2).sum())
    broken = with_c2(data, c2)

    r = assess(broken, "raw")
    nan_issues = [i for i in r.issues if i.code == "non_finite"]
    assert [i.angle_index for i in nan_issues] == [1]
    assert "phi=45" in nan_issues[0].message and nan_issues[0].value == n_nan
    assert r.score < assess(data, "raw").score

    fixed, records = repair(broken)
    assert np.isfinite(fixed.c2_exp).all()
    np.testing.assert_array_equal(fixed.c2_exp, np.swapaxes(fixed.c2_exp, 1, 2))
    rec = [x for x in records if x["what"] == "nan"]
    assert len(rec) == 1 and rec[0]["angle_index"] == 1 and rec[0]["count"] == n_nan
    assert rec[0]["before"] == {"nan": n_nan} and rec[0]["after"]["nan"] == 0
    # Filled values are the neighbours' level, not zeros.
    np.testing.assert_allclose(fixed.c2_exp[1, 6, 21], data.c2_exp[1, 6, 21], atol=0.05)
    assert fixed.c2_exp[1, 3, 10] == data.c2_exp[1, 10, 3]  # copied from the partner
    assert assess(fixed, "final").score == assess(data, "final").score


def test_inf_is_capped_to_the_finite_range():
    data = make_data()
    c2 = data.c2_exp.copy()
    c2[0, 5, 10] = c2[0, 10, 5] = np.inf
    c2[2, 7, 40] = c2[2, 40, 7] = -np.inf
    r = assess(with_c2(data, c2), "raw")
    assert {i.angle_index for i in r.issues if i.code == "non_finite"} == {0, 2}

    fixed, records = repair(with_c2(data, c2))
    assert np.isfinite(fixed.c2_exp).all()
    assert fixed.c2_exp[0, 5, 10] == data.c2_exp[0].max()
    assert fixed.c2_exp[2, 7, 40] == data.c2_exp[2].min()
    np.testing.assert_array_equal(fixed.c2_exp, np.swapaxes(fixed.c2_exp, 1, 2))
    inf = {x["angle_index"]: x for x in records if x["what"] == "inf"}
    assert inf[0]["count"] == 2 and inf[0]["before"]["pos_inf"] == 2
    assert inf[2]["before"]["neg_inf"] == 2


def test_negative_values_repaired_and_recorded():
    data = make_data()
    c2 = data.c2_exp.copy()
    for i, j in [(2, 12), (20, 50)]:
        c2[0, i, j] = c2[0, j, i] = -0.5
    r = assess(with_c2(data, c2), "raw")
    neg = [i for i in r.issues if i.code == "negative"]
    assert [i.angle_index for i in neg] == [0] and neg[0].value == -0.5

    fixed, records = repair(with_c2(data, c2))
    assert fixed.c2_exp.min() >= 0
    np.testing.assert_array_equal(fixed.c2_exp, np.swapaxes(fixed.c2_exp, 1, 2))
    rec = [x for x in records if x["what"] == "negative"]
    assert len(rec) == 1 and rec[0]["count"] == 4 and rec[0]["before"]["min"] == -0.5
    # Replaced by the level of the lag band (1 + 0.3 exp(-10/20) ≈ 1.18), not by 0.
    assert fixed.c2_exp[0, 2, 12] == pytest.approx(1 + 0.3 * np.exp(-0.5), abs=0.02)


def test_percent_data_is_a_scale_problem_and_is_rescaled():
    data = make_data()
    percent = with_c2(data, data.c2_exp * 100.0)
    r = assess(percent, "raw")
    for a in range(3):
        assert {"baseline", "first_lag_high"} <= codes(r, a)
    assert r.score <= 50

    report, final = run_qc(percent, percent, percent, QcSettings())
    scale = [x for x in report["repairs"] if x["what"] == "scale"]
    assert [x["angle_index"] for x in scale] == [0, 1, 2]
    assert scale[0]["before"]["baseline"] == pytest.approx(105, abs=5)
    assert scale[0]["after"]["baseline"] == pytest.approx(1.05, abs=0.05)
    np.testing.assert_allclose(final.c2_exp, data.c2_exp)
    assert report["checkpoints"]["final"]["label"] == "excellent"
    assert report["checkpoints"]["raw"]["score"] <= 50


def test_asymmetric_data_is_flagged_and_symmetrised():
    data = make_data()
    c2 = data.c2_exp.copy()
    c2[2, 4, 9] += 0.2
    r = assess(with_c2(data, c2), "raw")
    assert codes(r) == {"asymmetric"} and codes(r, 2) == {"asymmetric"}
    fixed, records = repair(with_c2(data, c2))
    np.testing.assert_array_equal(fixed.c2_exp, np.swapaxes(fixed.c2_exp, 1, 2))
    assert [x["what"] for x in records] == ["asymmetric"]


def test_no_repair_when_auto_repair_is_off():
    data = make_data()
    c2 = data.c2_exp.copy()
    c2[0, 3, 4] = c2[0, 4, 3] = np.nan
    broken = with_c2(data, c2)
    report, final = run_qc(broken, broken, broken, QcSettings(auto_repair=False))
    assert report["repairs"] == []
    assert np.isnan(final.c2_exp[0, 3, 4])
    assert "non_finite" in {i["code"] for i in report["checkpoints"]["final"]["issues"]}


# --------------------------------------------------------------------------- per-angle checks


def test_pure_noise_angle_lowers_the_score_and_is_named():
    data = make_data()
    rng = np.random.default_rng(5)
    c2 = data.c2_exp.copy()
    c2[2] = 1.0 + symmetric_noise(rng, data.n_t, 0.01)  # no decay at all
    r = assess(with_c2(data, c2), "preprocessed")
    assert r.score < assess(data, "preprocessed").score
    assert codes(r) == {"no_decay"}  # one issue, not also charged as an outlier
    (issue,) = r.issues
    assert issue.angle_index == 2 and issue.phi == 90.0 and "phi=90" in issue.message


def test_outlier_angle_is_named():
    data = make_data()
    c2 = data.c2_exp.copy()
    c2[0] += 0.3  # same decay, baseline 1.35 (within tolerance) but unlike the others
    r = assess(with_c2(data, c2), "filtered")
    assert codes(r) == {"outlier"} and codes(r, 0) == {"outlier"}
    assert r.score < 100


def test_too_few_time_points():
    r = assess(make_data(n=12), "raw")
    assert "too_few_times" in codes(r)
    assert r.deductions["too_few_times"] == 30


def test_unknown_checkpoint_is_rejected():
    with pytest.raises(ValueError, match="checkpoint"):
        assess(make_data(), "cooked")


# --------------------------------------------------------------------------- the stage


def garbage(data: XpcsData) -> XpcsData:
    rng = np.random.default_rng(1)
    c2 = rng.normal(0.0, 3.0, data.c2_exp.shape)  # no structure, negative, asymmetric
    c2[:, ::7, ::5] = np.nan
    return with_c2(data, c2)


def write_inputs(tmp_path, raw, filtered, pre):
    paths = [tmp_path / f"{n}.npz" for n in ("raw", "filtered", "preprocessed")]
    for p, d in zip(paths, (raw, filtered, pre), strict=True):
        d.to_npz(p)
    return paths


def test_garbage_fails_and_stage_raises_without_outputs(tmp_path):
    bad = garbage(make_data())
    report, _ = run_qc(bad, bad, bad, QcSettings())
    assert report["overall"]["score"] < 50
    assert report["overall"]["status"] == "fail"

    inputs = write_inputs(tmp_path, bad, bad, bad)
    out_json, out_npz = tmp_path / "qc_report.json", tmp_path / "qc_final.npz"
    out_json.write_text("{}")  # stale outputs of an earlier run must not survive
    out_npz.write_bytes(b"")
    with pytest.raises(QualityError) as err:
        qc_stage(*inputs, out_json, out_npz, {"on_fail": "error"})
    message = str(err.value)
    assert "below the pass threshold" in message and "qc.on_fail: warn" in message
    assert "no decay" in message or "baseline" in message  # names what is wrong
    assert not out_json.exists() and not out_npz.exists()
    failed = failed_report_path(out_json)
    assert failed.name == "qc_report.failed.json"
    assert strict_load(failed)["overall"]["status"] == "fail"


def test_garbage_with_on_fail_warn_writes_outputs(tmp_path):
    bad = garbage(make_data())
    inputs = write_inputs(tmp_path, bad, bad, bad)
    out_json, out_npz = tmp_path / "qc_report.json", tmp_path / "qc_final.npz"
    qc_stage(*inputs, out_json, out_npz, {"on_fail": "warn"})
    report = strict_load(out_json)
    assert report["overall"]["status"] == "fail" and report["overall"]["passed"] is False
    assert XpcsData.from_npz(out_npz).c2_exp.shape == bad.c2_exp.shape
    assert not failed_report_path(out_json).exists()


def test_stage_report_is_strict_json_with_schema(tmp_path):
    data = make_data()
    raw_c2 = data.c2_exp.copy()
    raw_c2[0, :, 0] = np.nan  # NaN/Inf in the inputs must not leak into the JSON
    raw_c2[1, 2, 3] = np.inf
    raw_c2[2] = np.nan  # an angle with nothing measurable
    raw = with_c2(data, raw_c2)
    inputs = write_inputs(tmp_path, raw, data, raw)
    out_json, out_npz = tmp_path / "qc_report.json", tmp_path / "qc_final.npz"
    qc_stage(*inputs, out_json, out_npz, QcSettings(on_fail="warn"))
    report = strict_load(out_json)
    assert report["schema_version"] == 1
    assert report["thresholds"] == {"pass": 50.0, "warn": 70.0, "excellent": 85.0}
    assert set(report["checkpoints"]) == {"raw", "filtered", "preprocessed", "final"}
    assert report["checkpoints"]["filtered"]["label"] == "excellent"
    assert report["checkpoints"]["raw"]["score"] < 85
    assert {x["what"] for x in report["repairs"]} >= {"nan", "inf", "unrepairable"}
    assert report["overall"]["score"] == report["checkpoints"]["final"]["score"]
    assert XpcsData.from_npz(out_npz).c2_exp.shape == data.c2_exp.shape


# --------------------------------------------------------------------------- settings


def test_settings_defaults_and_round_trip():
    s = QcSettings.from_mapping({})
    assert (s.pass_threshold, s.warn_threshold, s.excellent_threshold) == (50, 70, 85)
    assert s.on_fail == "error" and s.auto_repair is True
    assert (s.g2_ceiling, s.g2_floor) == (2.0, 0.5)
    custom = QcSettings.from_mapping({"thresholds": {"pass": 40}, "on_fail": "warn"})
    assert QcSettings.from_mapping(custom.to_mapping()) == custom
    assert json.loads(json.dumps(custom.to_mapping()))["thresholds"]["pass"] == 40


@pytest.mark.parametrize(
    ("mapping", "key"),
    [
        ({"bogus": 1}, "qc.bogus"),
        ({"thresholds": {"fail": 10}}, "qc.thresholds.fail"),
        ({"thresholds": {"pass": 80}}, "qc.thresholds"),  # 80 > warn 70
        ({"thresholds": {"warn": 90, "excellent": 85}}, "qc.thresholds"),
        ({"thresholds": {"excellent": 101}}, "qc.thresholds"),
        ({"thresholds": [50, 70, 85]}, "qc.thresholds"),
        ({"on_fail": "ignore"}, "qc.on_fail"),
        ({"auto_repair": "yes"}, "qc.auto_repair"),
        ({"g2_ceiling": "2"}, "qc.g2_ceiling"),
        ({"g2_ceiling": True}, "qc.g2_ceiling"),
        ({"g2_floor": 3.0}, "qc.g2_floor"),
        ({"min_time_points": 2.5}, "qc.min_time_points"),
        ({"max_relative_noise": float("nan")}, "qc.max_relative_noise"),
    ],
)
def test_bad_settings_name_the_key(mapping, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        QcSettings.from_mapping(mapping)


def test_settings_error_uses_the_callers_path():
    with pytest.raises(ConfigError, match=r"analysis\.qc\.thresholds"):
        QcSettings.from_mapping({"thresholds": {"pass": 90}}, where="analysis.qc")
    with pytest.raises(ConfigError, match=r"qc\.thresholds"):
        QcSettings(pass_threshold=90.0)  # direct construction is validated too
