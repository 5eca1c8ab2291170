"""Tests of the quality-control stage (homodyne_steps.stages.qc and its parts)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from homodyne_steps.data.qc_checks import angle_stats, assess
from homodyne_steps.data.qc_repair import repair
from homodyne_steps.data.qc_settings import QcSettings
from homodyne_steps.errors import ConfigError, QualityError
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.stages.qc import failed_report_path, qc_stage, run_qc

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


def test_nan_is_masked_not_filled_and_partner_copied():
    data = make_data()
    c2 = data.c2_exp.copy()
    c2[1, 3, 10] = np.nan  # lone NaN: its partner c2[1, 10, 3] is finite
    pairs = [(5, 20), (6, 21), (7, 22), (0, 59)]
    for i, j in pairs:  # symmetric NaN pairs: nothing measured there
        c2[1, i, j] = c2[1, j, i] = np.nan
    c2[1, 30, 30] = np.nan  # the diagonal is never fitted: not a masked pair
    n_nan = int(np.isnan(c2).sum())
    broken = with_c2(data, c2)

    r = assess(broken, "raw")
    masked = [i for i in r.issues if i.code == "masked"]
    assert [i.angle_index for i in masked] == [1] and masked[0].severity == "warning"
    assert "4 of 1770 off-diagonal pairs masked" in masked[0].message
    assert "phi=45" in masked[0].message and masked[0].value == pytest.approx(4 / 1770)
    assert r.masked["count"] == 4 and r.masked["of"] == 3 * 1770
    assert [x["masked"] for x in r.masked["per_angle"]] == [0, 4, 0]
    assert r.deductions["masked"] == pytest.approx(40 * 4 / (3 * 1770), abs=0.01)
    fixed, records = repair(broken)
    m = fixed.c2_exp[1]
    for i, j in pairs:
        assert np.isnan(m[i, j]) and np.isnan(m[j, i])  # masked, nothing invented
    assert np.isnan(m[30, 30])
    assert m[3, 10] == data.c2_exp[1, 10, 3]  # copied from the measured partner
    assert np.isfinite(np.delete(m.ravel(), np.flatnonzero(np.isnan(m)))).all()
    assert int(np.isnan(fixed.c2_exp).sum()) == n_nan - 1
    np.testing.assert_array_equal(fixed.c2_exp, np.swapaxes(fixed.c2_exp, 1, 2))
    (rec,) = [x for x in records if x["what"] == "nan"]
    assert rec["angle_index"] == 1 and rec["count"] == n_nan
    assert rec["after"] == {"nan": n_nan - 1, "from_symmetric": 1, "masked": n_nan - 1}
    assert "nothing interpolated" in rec["method"]


def test_inf_is_masked_not_capped():
    data = make_data()
    c2 = data.c2_exp.copy()
    c2[0, 5, 10] = c2[0, 10, 5] = np.inf
    c2[2, 7, 40] = c2[2, 40, 7] = -np.inf
    r = assess(with_c2(data, c2), "raw")
    assert {i.angle_index for i in r.issues if i.code == "infinite"} == {0, 2}
    assert r.deductions["infinite"] > 10

    fixed, records = repair(with_c2(data, c2))
    assert not np.isinf(fixed.c2_exp).any()
    for a, i, j in [(0, 5, 10), (2, 7, 40)]:
        assert np.isnan(fixed.c2_exp[a, i, j]) and np.isnan(fixed.c2_exp[a, j, i])
    assert int(np.isnan(fixed.c2_exp).sum()) == 4
    inf = {x["angle_index"]: x for x in records if x["what"] == "inf"}
    assert inf[0]["count"] == 2 and inf[0]["before"]["pos_inf"] == 2
    assert inf[2]["before"]["neg_inf"] == 2 and inf[2]["after"]["masked"] == 2
    final = assess(fixed, "final")
    assert "infinite" not in codes(final) and final.masked["count"] == 2


def test_negative_values_masked_and_recorded():
    data = make_data()
    c2 = data.c2_exp.copy()
    for i, j in [(2, 12), (20, 50)]:
        c2[0, i, j] = c2[0, j, i] = -0.5
    r = assess(with_c2(data, c2), "raw")
    neg = [i for i in r.issues if i.code == "negative"]
    assert [i.angle_index for i in neg] == [0] and neg[0].value == -0.5

    fixed, records = repair(with_c2(data, c2))
    assert not (fixed.c2_exp < 0).any()
    for i, j in [(2, 12), (20, 50)]:
        assert np.isnan(fixed.c2_exp[0, i, j]) and np.isnan(fixed.c2_exp[0, j, i])
    assert int(np.isnan(fixed.c2_exp).sum()) == 4  # nothing else touched
    (rec,) = [x for x in records if x["what"] == "negative"]
    assert rec["count"] == 4 and rec["before"]["min"] == -0.5
    assert rec["after"] == {"negative": 0, "masked": 4}


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
    assert report["repairs"] == [] and report["dropped_angles"] == []
    assert np.isnan(final.c2_exp[0, 3, 4])
    assert "masked" in {i["code"] for i in report["checkpoints"]["final"]["issues"]}


# --------------------------------------------------------------------------- angle drops


def test_angle_above_max_masked_fraction_is_dropped_and_recorded():
    data = make_data()
    c2 = data.c2_exp.copy()
    c2[1, :40, :] = np.nan  # frames 0..39 of 60 lost: 1 - C(20, 2)/C(60, 2) masked
    c2[1, :, :40] = np.nan
    frac = 1 - (20 * 19) / (60 * 59)
    broken = with_c2(data, c2)
    report, final = run_qc(broken, broken, broken, QcSettings())
    (d,) = report["dropped_angles"]
    assert d["angle_index"] == 1 and d["phi"] == 45.0 and d["q"] == 0.0054
    assert d["masked_fraction"] == pytest.approx(frac)
    assert "max_masked_fraction = 0.5" in d["reason"]
    assert final.phi_angles_list.tolist() == [0.0, 90.0]
    np.testing.assert_array_equal(final.c2_exp, data.c2_exp[[0, 2]])
    fin = report["checkpoints"]["final"]
    assert fin["masked"]["dropped_angles"] == [1]
    assert fin["masked"]["fraction"] == pytest.approx(1 / 3)  # the dropped angle, wholly
    # Issues of the final checkpoint name angles by their preprocessed index.
    assert [x["angle_index"] for x in fin["masked"]["per_angle"]] == [0, 2]
    (issue,) = [i for i in fin["issues"] if i["code"] == "masked"]
    assert issue["angle_index"] == 1 and "dropped from the final data" in issue["message"]
    assert fin["score"] < assess(data, "final").score
    # The preprocessed checkpoint already says the angle will be dropped.
    pre = [i for i in report["checkpoints"]["preprocessed"]["issues"] if i["code"] == "masked"]
    assert "dropped from the final data" in pre[0]["message"]
    # A looser limit keeps it, holes and all.
    report, final = run_qc(broken, broken, broken, QcSettings(max_masked_fraction=0.9))
    assert report["dropped_angles"] == [] and final.n_phi == 3
    assert np.isnan(final.c2_exp[1, 0, 50])


def test_angle_without_finite_values_is_dropped_whatever_the_limit():
    data = make_data()
    c2 = data.c2_exp.copy()
    c2[2] = np.nan
    broken = with_c2(data, c2)
    report, final = run_qc(broken, broken, broken, QcSettings(max_masked_fraction=1.0))
    (d,) = report["dropped_angles"]
    assert d["angle_index"] == 2 and "nothing was measured" in d["reason"]
    assert final.n_phi == 2 and report["repairs"] == []


def test_every_angle_dropped_fails_even_with_on_fail_warn(tmp_path):
    data = make_data()
    c2 = data.c2_exp.copy()
    c2[:, :, :45] = np.nan  # 45 of 60 frames lost at every angle
    c2[:, :45, :] = np.nan
    broken = with_c2(data, c2)
    report, final = run_qc(broken, broken, broken, QcSettings())
    assert final.n_phi == 0 and len(report["dropped_angles"]) == 3
    assert report["overall"]["score"] == 0 and report["overall"]["status"] == "fail"
    top = report["checkpoints"]["final"]["issues"][0]
    assert top["code"] == "all_angles_masked" and "no angle left" in top["message"]

    inputs = write_inputs(tmp_path, broken, broken, broken)
    out_json, out_npz = tmp_path / "qc_report.json", tmp_path / "qc_final.npz"
    with pytest.raises(QualityError, match=r"no angle left.*max_masked_fraction = 0\.5"):
        qc_stage(*inputs, out_json, out_npz, {"on_fail": "warn"})
    assert not out_json.exists() and not out_npz.exists()
    assert strict_load(failed_report_path(out_json))["dropped_angles"][0]["angle_index"] == 0


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


def test_constant_data_fails_with_no_correlation_decay(tmp_path):
    # 1 + noise everywhere: per angle no_decay alone left 70 ("good"); there is nothing
    # to fit, so the dataset fails.
    data = make_data()
    rng = np.random.default_rng(11)
    flat = with_c2(data, np.stack([1.0 + symmetric_noise(rng, data.n_t, 0.01) for _ in PHIS]))
    r = assess(flat, "final")
    assert r.score < QcSettings().pass_threshold and r.label == "poor"
    assert r.deductions["no_correlation_decay"] == 100
    top = r.issues[0]
    assert top.code == "no_correlation_decay" and top.severity == "error"
    assert "no correlation decay" in top.message and top.angle_index is None

    inputs = write_inputs(tmp_path, flat, flat, flat)
    with pytest.raises(QualityError, match="no correlation decay"):
        qc_stage(*inputs, tmp_path / "qc.json", tmp_path / "qc.npz", {})
    # One flat angle among decaying ones is a per-angle issue only.
    one = with_c2(data, np.concatenate([data.c2_exp[:2], flat.c2_exp[2:]]))
    assert "no_correlation_decay" not in codes(assess(one, "final"))


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
    c2 = rng.normal(1.0, 0.3, data.c2_exp.shape)  # no structure, asymmetric
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
    assert "no correlation decay" in message  # names what is wrong
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
    assert {x["what"] for x in report["repairs"]} >= {"nan", "inf"}
    assert [d["angle_index"] for d in report["dropped_angles"]] == [2]  # nothing measured
    assert report["overall"]["score"] == report["checkpoints"]["final"]["score"]
    final = XpcsData.from_npz(out_npz)
    assert final.c2_exp.shape == (2, data.n_t, data.n_t)
    # a NaN column whose mirror row was measured takes the measured values
    np.testing.assert_array_equal(final.c2_exp[0, 1:, 0], data.c2_exp[0, 0, 1:])
    # a lone Inf is masked, then takes its measured partner
    assert final.c2_exp[1, 2, 3] == final.c2_exp[1, 3, 2] == data.c2_exp[1, 3, 2]


# --------------------------------------------------------------------------- settings


def test_settings_defaults_and_round_trip():
    s = QcSettings.from_mapping({})
    assert (s.pass_threshold, s.warn_threshold, s.excellent_threshold) == (50, 70, 85)
    assert s.on_fail == "error" and s.auto_repair is True
    assert (s.g2_ceiling, s.g2_floor) == (2.0, 0.5)
    assert s.max_masked_fraction == 0.5
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
        ({"max_masked_fraction": 1.5}, "qc.max_masked_fraction"),
        ({"max_masked_fraction": -0.1}, "qc.max_masked_fraction"),
        ({"max_masked_fraction": "half"}, "qc.max_masked_fraction"),
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
