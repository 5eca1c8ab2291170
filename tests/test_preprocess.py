"""Tests of the preprocess stage (diagonal correction, normalization, filters, provenance)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from homodyne_steps.data.c2_cleaning import baseline_lag_range, correct_diagonal
from homodyne_steps.data.preprocess_settings import PreprocessSettings
from homodyne_steps.errors import ConfigError, DataError
from homodyne_steps.inference.noise import estimate_sigma_per_lag
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.io.serialise import read_npz
from homodyne_steps.stages.preprocess import preprocess, preprocess_stage, run_preprocess

RECORD_FIELDS = {
    "stage", "step", "method", "parameters", "input_shape", "output_shape",
    "input_dtype", "output_dtype", "duration_ms",
}  # fmt: skip
TAU = 8.0  # decay time of the model matrix, in lags
AMP = 0.3
EXCESS = 0.5


def model_c2(n: int = 60, tau: float = TAU, amp: float = AMP, excess: float = EXCESS):
    """c2 = 1 + amp*exp(-|ti-tj|/tau), plus a shot-noise excess on the diagonal."""
    lag = np.abs(np.subtract.outer(np.arange(n), np.arange(n)))
    c = 1.0 + amp * np.exp(-lag / tau)
    return c + excess * np.eye(n)


def random_symmetric(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    a = rng.normal(1.0, 0.2, size=(k, n, n))
    return 0.5 * (a + np.swapaxes(a, 1, 2))


def seed_basic(c: np.ndarray) -> np.ndarray:
    """The seed's formula written as loops, independent of the vectorised code."""
    n = c.shape[0]
    s = [0.5 * (c[i, i + 1] + c[i + 1, i]) for i in range(n - 1)]
    out = c.copy()
    for i in range(n):
        if i == 0:
            out[i, i] = s[0]
        elif i == n - 1:
            out[i, i] = s[n - 2]
        else:
            out[i, i] = 0.5 * (s[i - 1] + s[i])
    return out


def make_data(c2: np.ndarray, dtype=np.float64) -> XpcsData:
    c2 = np.asarray(c2, dtype=dtype)
    if c2.ndim == 2:
        c2 = c2[None]
    k, n = c2.shape[0], c2.shape[-1]
    t = np.arange(n, dtype=dtype) * 0.1
    return XpcsData(
        wavevector_q_list=np.full(k, 0.0054, dtype=dtype),
        phi_angles_list=np.linspace(0.0, 90.0, k).astype(dtype),
        t1=t,
        t2=t.copy(),
        c2_exp=c2,
        dt=0.1,
    )


# ------------------------------------------------------------------ diagonal correction


def test_basic_hand_computed():
    c = np.array([[9.0, 2.0, 4.0], [2.0, 9.0, 6.0], [4.0, 6.0, 9.0]])
    # s = [2, 6]; d = [2, (2+6)/2, 6]
    out = correct_diagonal(c, "basic")
    np.testing.assert_array_equal(np.diag(out), [2.0, 4.0, 6.0])
    np.testing.assert_array_equal(out - np.diag(np.diag(out)), c - np.diag(np.diag(c)))


def test_basic_uses_both_bands_on_asymmetric_input():
    c = np.array([[0.0, 1.0], [3.0, 0.0]])  # s[0] = (1 + 3) / 2
    np.testing.assert_array_equal(np.diag(correct_diagonal(c, "basic")), [2.0, 2.0])


@pytest.mark.parametrize("n", [2, 3, 7, 40])
def test_basic_matches_seed_formula(n):
    rng = np.random.default_rng(n)
    c = random_symmetric(rng, 3, n)
    out = correct_diagonal(c, "basic")
    for k in range(3):
        np.testing.assert_allclose(out[k], seed_basic(c[k]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("method", ["basic", "statistical", "interpolation"])
def test_only_diagonal_changes_and_symmetry_kept(method):
    rng = np.random.default_rng(1)
    c = random_symmetric(rng, 2, 25)
    out = correct_diagonal(c, method)
    off = ~np.eye(25, dtype=bool)
    np.testing.assert_array_equal(out[:, off], c[:, off])
    assert not np.array_equal(np.diagonal(out, 0, 1, 2), np.diagonal(c, 0, 1, 2))
    np.testing.assert_array_equal(out, np.swapaxes(out, 1, 2))
    assert out is not c and np.array_equal(c, random_symmetric(np.random.default_rng(1), 2, 25))


def test_methods_recover_true_diagonal():
    c = model_c2()
    truth = 1.0 + AMP
    one_lag = AMP * (1.0 - np.exp(-1.0 / TAU))  # drop of c2 over one lag at lag 0
    err = {m: np.abs(np.diag(correct_diagonal(c, m)) - truth) for m in
           ("basic", "statistical", "interpolation")}  # fmt: skip
    assert np.max(np.diag(c) - truth) == pytest.approx(EXCESS)  # the excess was there
    # basic estimates lag 1, statistical (window 3) about lag 2: both within two lags' drop.
    assert err["basic"].max() <= 2 * one_lag
    assert err["statistical"].max() <= 2 * one_lag
    # linear extrapolation leaves a second-order error: closer than basic everywhere.
    assert np.all(err["interpolation"] < err["basic"])
    assert err["interpolation"].max() <= 0.2 * err["basic"].min()


def test_statistical_robust_to_outlier_in_band():
    c = model_c2(n=30)
    c[10, 11] = c[11, 10] = 50.0  # one bad pair in the first band
    stat = np.diag(correct_diagonal(c, "statistical", window=3))
    basic = np.diag(correct_diagonal(c, "basic"))
    one_lag = AMP * (1.0 - np.exp(-1.0 / TAU))
    assert np.max(np.abs(stat - (1 + AMP))) <= 2 * one_lag
    assert basic[10] > 10  # the band average is dragged by the outlier


def test_statistical_window_one_interior_is_band_mean():
    c = model_c2(n=10)
    out = correct_diagonal(c, "statistical", window=1)
    np.testing.assert_allclose(np.diag(out)[1:-1], np.diag(correct_diagonal(c, "basic"))[1:-1])


def test_n1_raises_and_n2_works():
    for method in ("basic", "statistical", "interpolation"):
        with pytest.raises(DataError, match="n >= 2"):
            correct_diagonal(np.ones((3, 1, 1)), method)
        out = correct_diagonal(np.array([[5.0, 1.2], [1.2, 5.0]]), method)
        np.testing.assert_array_equal(out, [[1.2, 1.2], [1.2, 1.2]])
    with pytest.raises(DataError, match="n >= 2"):
        preprocess(make_data(np.ones((2, 1, 1))))


# -------------------------------------------------------------------------- pipeline


def test_float32_input_gives_float64_c_contiguous():
    c = np.asfortranarray(model_c2(n=20)).astype(np.float32)
    data = make_data(c, dtype=np.float32)
    out, records = preprocess(data)
    for name in ("wavevector_q_list", "phi_angles_list", "t1", "t2", "c2_exp"):
        arr = getattr(out, name)
        assert arr.dtype == np.float64 and arr.flags.c_contiguous, name
    assert records[0]["step"] == "format" and records[0]["input_dtype"] == "float32"
    assert data.c2_exp.dtype == np.float32  # input untouched (pure)


def symmetric_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    e = np.triu(rng.normal(0.0, sigma, size=(n, n)))
    return e + np.triu(e, 1).T  # mirror the upper triangle, as a correlator does


def test_noise_reduction_is_display_only_and_keeps_symmetry():
    rng = np.random.default_rng(7)
    n = 60
    c = 1.2 + symmetric_noise(rng, n, 0.05)
    off = ~np.eye(n, dtype=bool)
    plain = run_preprocess(make_data(c))
    sigma_plain = estimate_sigma_per_lag(plain.data.c2_exp)
    for method, size in (("gaussian", 2), ("median", 3), ("uniform", 3)):
        settings = {"noise_reduction": {"enabled": True, "method": method, "size": size}}
        result = run_preprocess(make_data(c), settings)
        # The fitted data are not smoothed: same array, same per-lag sigma.
        np.testing.assert_array_equal(result.data.c2_exp, plain.data.c2_exp)
        np.testing.assert_array_equal(estimate_sigma_per_lag(result.data.c2_exp), sigma_plain)
        # The display array is smoothed, symmetric, and differs.
        m = result.c2_smoothed[0]
        np.testing.assert_array_equal(m, m.T)
        assert np.std(m[off]) < 0.6 * np.std(c[off]), method
        (rec,) = [r for r in result.records if r["step"] == "noise_reduction"]
        assert rec["applied"] and rec["display_only"] is True and rec["output"] == "c2_smoothed"
        assert "sigma" in rec["reason"]
    assert plain.c2_smoothed is None


@pytest.mark.parametrize("method", ["gaussian", "median", "uniform"])
def test_display_smoothing_keeps_holes_and_does_not_spread_them(method):
    rng = np.random.default_rng(3)
    n = 40
    c = np.stack([model_c2(n=n) + symmetric_noise(rng, n, 0.01)])
    c[0, 10:14, :] = np.nan
    c[0, :, 10:14] = np.nan
    settings = {"noise_reduction": {"enabled": True, "method": method, "size": 2}}
    result = run_preprocess(make_data(c), settings)
    m = result.c2_smoothed[0]
    hole = np.isnan(result.data.c2_exp[0])
    off_hole = ~hole & ~np.eye(n, dtype=bool)
    assert np.isnan(m[hole]).all()  # the display shows the holes the fit sees
    assert np.isfinite(m[off_hole]).all()  # ...and NaN does not leak into the neighbours
    # Next to the hole the level is the data's, not pulled towards 0 by the NaN.
    np.testing.assert_allclose(m[9, 30], result.data.c2_exp[0, 9, 30], atol=0.03)


def test_stage_writes_smoothed_display_array_beside_unsmoothed_data(tmp_path):
    rng = np.random.default_rng(2)
    c = model_c2(n=30) + symmetric_noise(rng, 30, 0.02)
    src = make_data(c).to_npz(tmp_path / "in.npz")
    out = tmp_path / "out.npz"
    preprocess_stage(src, out, tmp_path / "p.json", {"noise_reduction": {"enabled": True}})
    arrays = read_npz(out)
    back = XpcsData.from_npz(out)  # the extra array does not disturb the data reader
    np.testing.assert_array_equal(back.c2_exp, preprocess(make_data(c))[0].c2_exp)
    assert arrays["c2_smoothed"].shape == back.c2_exp.shape
    assert not np.allclose(arrays["c2_smoothed"], back.c2_exp)
    prov = json.loads((tmp_path / "p.json").read_text())
    (rec,) = [r for r in prov["records"] if r["step"] == "noise_reduction"]
    assert rec["display_only"] is True
    # Without smoothing there is no display array.
    preprocess_stage(src, out, tmp_path / "p.json")
    assert "c2_smoothed" not in read_npz(out)


def test_normalization_baseline_to_one():
    c = np.stack([1.07 * model_c2(n=60, tau=5.0), 0.93 * model_c2(n=60, tau=5.0)])
    settings = {"normalization": {"enabled": True}}
    out, records = preprocess(make_data(c), settings)
    lo, hi = baseline_lag_range(60)
    assert (lo, hi) == (45, 59)
    for k in range(2):
        m = out.c2_exp[k]
        assert m[0, -1] == pytest.approx(1.0, abs=1e-3)  # the longest lag
        assert np.mean(np.diagonal(m, 50)) == pytest.approx(1.0, abs=1e-3)
    (rec,) = [r for r in records if r["step"] == "normalization"]
    assert rec["applied"] and rec["parameters"]["baseline_lags"] == [45, 59]
    np.testing.assert_allclose(rec["parameters"]["baselines"], [1.07, 0.93], rtol=1e-3)


def test_nan_and_inf_are_carried_as_masked_not_rejected():
    c = np.stack([model_c2(n=10)] * 3)
    c[2, 3, 5] = c[2, 5, 3] = np.nan
    c[1, 0, 7] = c[1, 7, 0] = np.inf
    c[0, 2, 8] = -np.inf
    out, records = preprocess(make_data(c))
    m = out.c2_exp
    assert np.isnan(m[2, 3, 5]) and np.isnan(m[2, 5, 3])  # masked, not filled
    assert np.isnan(m[1, 0, 7]) and np.isnan(m[1, 7, 0])  # Inf is no measurement: masked
    assert m[0, 2, 8] == m[0, 8, 2] == c[0, 8, 2]  # lone -Inf: the partner's value
    assert np.isnan(m).sum() == 4  # nothing else became NaN (diagonal neighbours finite)
    by_step = {r["step"]: r for r in records}
    assert by_step["masking"]["counts"] == {"inf_masked": 3, "nan_from_partner": 1}
    masked = by_step["validation"]["masked_per_angle"]
    assert [x["masked"] for x in masked] == [0, 1, 1]
    assert masked[2]["of"] == 45 and masked[2]["fraction"] == pytest.approx(1 / 45)
    assert masked[2]["phi"] == 90.0


def test_lone_nan_takes_its_symmetric_partner():
    c = model_c2(n=10)
    c[6, 2] = np.nan  # the lower element only; the upper (fitted) one is measured
    out, records = preprocess(make_data(c), {"diagonal_correction": {"enabled": False}})
    assert out.c2_exp[0, 6, 2] == out.c2_exp[0, 2, 6] == c[2, 6]
    assert records[1]["counts"]["nan_from_partner"] == 1


@pytest.mark.parametrize("method", ["basic", "statistical", "interpolation"])
def test_diagonal_correction_with_masked_neighbours(method):
    c = model_c2(n=12)
    c[4, 5] = c[5, 4] = np.nan
    out, _ = preprocess(make_data(c), {"diagonal_correction": {"method": method}})
    m = out.c2_exp[0]
    off = ~np.eye(12, dtype=bool)
    # Off-diagonal: untouched, the hole still a hole; the diagonal may be NaN next to it.
    np.testing.assert_array_equal(m[off], c[off])
    d = np.diag(m)
    assert np.isfinite(np.delete(d, [4, 5])).all()
    if method == "statistical":  # NaN-aware median: the other neighbours still count
        assert np.isfinite(d).all()


def test_angle_without_any_finite_value_passes_preprocess():
    # Not an error here: QC drops the angle and records why.
    c = np.stack([model_c2(n=10)] * 2)
    c[1] = np.nan
    for settings in ({}, {"normalization": {"enabled": True}}):
        out, records = preprocess(make_data(c), settings)
        assert np.isnan(out.c2_exp[1]).all()
        assert np.isfinite(out.c2_exp[0]).all()
        masked = {r["step"]: r for r in records}["validation"]["masked_per_angle"]
        assert masked[1]["masked"] == 45 and masked[1]["fraction"] == 1.0
    (rec,) = [r for r in records if r["step"] == "normalization"]
    assert rec["applied"] and rec["parameters"]["baselines"][1] is None  # strict JSON: null


def test_normalization_uses_finite_elements_and_names_an_unformable_baseline():
    c = np.stack([1.07 * model_c2(n=60, tau=5.0)] * 2)
    c[0, 0, 59] = c[0, 59, 0] = np.nan  # one long-lag element masked: mean of the rest
    out, records = preprocess(make_data(c), {"normalization": {"enabled": True}})
    (rec,) = [r for r in records if r["step"] == "normalization"]
    np.testing.assert_allclose(rec["parameters"]["baselines"], [1.07, 1.07], rtol=1e-3)
    assert np.isnan(out.c2_exp[0, 0, 59])
    c[1, :15, :] = np.nan  # frames 0..14 lost: every element at lags >= 45 is masked
    c[1, :, :15] = np.nan
    with pytest.raises(DataError, match=r"angle index 1: long-lag baseline .* masked"):
        preprocess(make_data(c), {"normalization": {"enabled": True}})


def test_asymmetric_input_rejected_naming_angle():
    c = np.stack([model_c2(n=10)] * 2)
    c[1, 0, 4] += 0.1
    with pytest.raises(DataError, match="angle index 1.*not symmetric"):
        preprocess(make_data(c))


def test_provenance_records():
    settings = {
        "diagonal_correction": {"method": "statistical", "window": 2},
        "noise_reduction": {"enabled": True, "size": 1.5},
    }
    _, records = preprocess(make_data(model_c2(n=20)), settings)
    steps = [r["step"] for r in records]
    assert steps == ["format", "masking", "diagonal_correction", "normalization",
                     "noise_reduction", "validation"]  # fmt: skip
    for r in records:
        assert RECORD_FIELDS <= set(r), r
        assert r["stage"] == "preprocess" and r["duration_ms"] >= 0
        assert r["input_shape"] == r["output_shape"] == [1, 20, 20]
    by_step = {r["step"]: r for r in records}
    assert by_step["diagonal_correction"]["parameters"] == {"window": 2}
    assert by_step["normalization"]["applied"] is False
    assert by_step["noise_reduction"]["parameters"]["size"] == 1.5


def test_diagonal_correction_can_be_disabled():
    c = model_c2(n=12)
    out, records = preprocess(make_data(c), {"diagonal_correction": {"enabled": False}})
    np.testing.assert_array_equal(out.c2_exp[0], c)
    assert records[2]["step"] == "diagonal_correction" and records[2]["applied"] is False


# -------------------------------------------------------------------------- settings


def test_settings_defaults_and_round_trip():
    s = PreprocessSettings.from_mapping(None)
    m = s.to_mapping()
    assert m == {
        "diagonal_correction": {"enabled": True, "method": "basic", "window": 3},
        "normalization": {"enabled": False, "method": "baseline"},
        "noise_reduction": {"enabled": False, "method": "gaussian", "size": 3},
    }
    assert PreprocessSettings.from_mapping(m) == s


@pytest.mark.parametrize(
    ("mapping", "pattern"),
    [
        ({"diagonal_correction": {"methd": "basic"}},
         r"preprocess\.diagonal_correction\.methd: unknown key"),
        ({"diagnal_correction": {}}, r"preprocess\.diagnal_correction: unknown key"),
        ({"diagonal_correction": {"method": "basci"}},
         r"preprocess\.diagonal_correction\.method: got 'basci'"),
        ({"diagonal_correction": {"window": 0}}, r"preprocess\.diagonal_correction\.window"),
        ({"diagonal_correction": {"window": 2.0}}, r"diagonal_correction\.window: got 2\.0"),
        ({"diagonal_correction": {"enabled": "yes"}}, r"diagonal_correction\.enabled"),
        ({"normalization": {"method": "max"}}, r"normalization\.method: got 'max'"),
        ({"noise_reduction": {"method": "median", "size": 2.5}}, r"noise_reduction\.size"),
        ({"noise_reduction": {"size": -1}}, r"noise_reduction\.size"),
        ({"noise_reduction": "gaussian"}, r"preprocess\.noise_reduction: got 'gaussian'"),
        ([1, 2], r"preprocess: got \[1, 2\]; expected a mapping"),
    ],
)  # fmt: skip
def test_bad_settings_raise_config_error(mapping, pattern):
    with pytest.raises(ConfigError, match=pattern):
        PreprocessSettings.from_mapping(mapping)


def test_settings_where_prefix_and_direct_construction_checked():
    with pytest.raises(ConfigError, match=r"^stages\.pre\.normalization\.x: unknown key"):
        PreprocessSettings.from_mapping({"normalization": {"x": 1}}, where="stages.pre")
    from homodyne_steps.data.preprocess_settings import DiagonalCorrectionSettings

    bad = PreprocessSettings(diagonal_correction=DiagonalCorrectionSettings(window=0))
    with pytest.raises(ConfigError, match="window"):
        preprocess(make_data(model_c2(n=5)), bad)


# ----------------------------------------------------------------------------- stage


def test_stage_writes_both_files(tmp_path):
    src = make_data(model_c2(n=16), dtype=np.float32).to_npz(tmp_path / "in.npz")
    out_npz, out_json = tmp_path / "out" / "c2.npz", tmp_path / "out" / "provenance.json"
    preprocess_stage(src, out_npz, out_json, {"diagonal_correction": {"method": "interpolation"}})
    back = XpcsData.from_npz(out_npz)
    assert back.c2_exp.dtype == np.float64
    assert np.diag(back.c2_exp[0]).max() < 1.0 + AMP + 0.05
    prov = json.loads(out_json.read_text())
    assert prov["schema_version"] == 1
    assert prov["settings"]["diagonal_correction"]["method"] == "interpolation"
    assert [r["step"] for r in prov["records"]][2] == "diagonal_correction"
    assert all(RECORD_FIELDS <= set(r) for r in prov["records"])


@pytest.mark.parametrize(
    ("c2", "settings", "error"),
    [
        (np.ones((1, 1, 1)), None, DataError),
        (model_c2(n=8), {"normalization": {"methd": "baseline"}}, ConfigError),
    ],
)
def test_stage_writes_nothing_on_failure(tmp_path, c2, settings, error):
    src = make_data(c2).to_npz(tmp_path / "in.npz")
    with pytest.raises(error):
        preprocess_stage(src, tmp_path / "o.npz", tmp_path / "p.json", settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz"]


def test_stage_removes_npz_when_json_write_fails(tmp_path, monkeypatch):
    import homodyne_steps.stages.preprocess as pp

    def broken_write_json(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(pp, "write_json", broken_write_json)
    src = make_data(model_c2(n=8)).to_npz(tmp_path / "in.npz")
    with pytest.raises(OSError, match="disk full"):
        preprocess_stage(src, tmp_path / "o.npz", tmp_path / "p.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz"]


def test_the_correlator_diagonal_is_kept_on_the_fitted_scale(tmp_path):
    """preprocess replaces the diagonal of c2_exp but keeps the correlator's own (its
    shot-noise excess is the speckle noise model's level) as c2_diagonal, normalised like
    c2_exp; it survives the npz round trip and angle selection."""
    c = np.stack([1.07 * model_c2(n=60, tau=5.0), 0.93 * model_c2(n=60, tau=5.0)])
    out, _ = preprocess(make_data(c), {"normalization": {"enabled": True}})
    np.testing.assert_allclose(out.c2_diagonal, [np.diagonal(model_c2(n=60, tau=5.0))] * 2,
                               rtol=2e-3)  # fmt: skip
    assert np.all(np.diagonal(out.c2_exp, 0, 1, 2) < out.c2_diagonal - 0.4)  # corrected
    back = XpcsData.from_npz(out.to_npz(tmp_path / "p.npz"))
    np.testing.assert_array_equal(back.c2_diagonal, out.c2_diagonal)
    one = back.select_angles([1])
    assert one.c2_diagonal.shape == (1, 60) and one.phi_angles_list.tolist() == [90.0]
    np.testing.assert_array_equal(one.c2_diagonal[0], out.c2_diagonal[1])
    assert make_data(c).c2_diagonal is None  # files before preprocess carry none
