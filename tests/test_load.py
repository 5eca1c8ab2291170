"""Tests of the load stage: both APS layouts, the reference reader's traps, bad inputs."""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest

from homodyne_steps.errors import DataError
from homodyne_steps.io.aps_reader import read_aps
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.stages.filter import FilterSettings, apply_filter
from homodyne_steps.stages.load import load_stage
from homodyne_steps.stages.simulate import reference_settings, simulate_bins, simulate_file

N_FRAMES = 30
PHI = (90.0, -30.0, 0.0, 45.0)  # deliberately unsorted: the reader sorts rows by phi


def _settings(**overrides):
    base = {"n_frames": N_FRAMES, "phi_deg": PHI}
    base.update(overrides)
    return reference_settings("laminar_flow", **base)


def _simulate(tmp_path, fmt, **overrides):
    settings = _settings(**overrides)
    path, _ = simulate_file(settings, tmp_path / f"{fmt}.hdf", fmt=fmt)
    bins, truth = simulate_bins(settings)
    return path, settings, bins, truth


def _expected(settings, bins, iq):
    """(q list, phi list sorted, c2 stack as float32) of ring ``iq`` from the truth."""
    cells = sorted((c for c in bins.c2 if c[0] == iq), key=lambda c: bins.phi_centres[c[1]])
    q = np.array([bins.q_centres[iq]] * len(cells))
    phi = np.array([bins.phi_centres[ip] for _, ip in cells])
    c2 = np.stack([bins.c2[c].astype(np.float32) for c in cells])
    return q, phi, c2


def _check_ring(out, settings, bins, iq):
    q, phi, c2 = _expected(settings, bins, iq)
    np.testing.assert_allclose(out["wavevector_q_list"], q, rtol=1e-12)
    np.testing.assert_array_equal(out["phi_angles_list"], phi)
    assert out["c2_exp"].shape == c2.shape
    np.testing.assert_allclose(out["c2_exp"], c2, rtol=1e-6, atol=0)


def _write_old(path, dq, dphi, mats, exposure=0.01, dqlist_2d=True, avg=1, stride=1):
    """Hand-written legacy file: dq/dphi lists, g2 datasets by name (None: leave out)."""
    with h5py.File(path, "w") as h5:
        dq = np.asarray(dq, float)
        h5["xpcs/dqlist"] = dq.reshape(1, -1) if dqlist_2d else dq
        if dphi is not None:
            h5["xpcs/dphilist"] = np.asarray(dphi, float).reshape(1, -1)
        if exposure is not None:
            h5["measurement/instrument/detector/exposure_period"] = np.array([[exposure]])
        for key, value in (("avg_frames", avg), ("stride_frames", stride)):
            if value is not None:
                h5[f"xpcs/{key}"] = np.array([[value]], dtype=np.uint64)
        grp = h5.create_group("exchange/C2T_all")
        for key, m in mats.items():
            grp[key] = np.asarray(m, np.float32)
    return path


def _sym(n, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    a = rng.random((n, n)) * scale + 1.0
    return (a + a.T) / 2


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["aps_u", "aps_old"])
def test_round_trip_values_labels_time(tmp_path, fmt):
    path, settings, bins, truth = _simulate(tmp_path, fmt)
    out = read_aps(path, settings.q)
    assert out["format"] == fmt
    _check_ring(out, settings, bins, settings.target_ring)
    assert out["c2_exp"].dtype == np.float32
    np.testing.assert_array_equal(out["c2_exp"], np.swapaxes(out["c2_exp"], 1, 2))
    assert out["dt"] == pytest.approx(truth["dt"], rel=1e-12)
    src = out["source"]
    assert src["dt_source"]["kind"] == "file" and src["dt_source"]["assumed_1"] == []
    np.testing.assert_allclose(out["t1"], truth["dt"] * np.arange(N_FRAMES), rtol=1e-12)
    np.testing.assert_array_equal(out["t1"], out["t2"])
    assert out["t1"].dtype == np.float64 and out["t1"][0] == 0.0
    assert src["q_selected"] == pytest.approx(truth["q"])
    assert src["storage"] == {"setting": "auto", "found": ["upper"] * len(PHI)}
    assert src["bin_mapping"] == ("suffix" if fmt == "aps_old" else "dynamic_index_mapping")
    assert src["member_prefix"] == ("g2" if fmt == "aps_old" else "c2")
    assert src["skipped_bins"] == [] and src["q_relative_spread"] == 0.0


@pytest.mark.parametrize("iq", [1, 2])
def test_aps_u_empty_cells_map_through_index_mapping(tmp_path, iq):
    # Empty cells shift every later compressed label: the naive label-1 formula mislabels.
    path, settings, bins, _ = _simulate(tmp_path, "aps_u", empty_cells=((0, 2), (1, 0)))
    out = read_aps(path, settings.q_rings()[iq])
    _check_ring(out, settings, bins, iq)
    with h5py.File(path) as h5:
        mapping = h5["xpcs/qmap/dynamic_index_mapping"][()]
    labels = out["source"]["bin_labels"]
    phis = [PHI[int(mapping[c - 1]) % len(PHI)] for c in labels]
    assert phis == out["phi_angles_list"].tolist()


@pytest.mark.parametrize("iq", [1, 2])
def test_aps_old_missing_bins_map_by_suffix(tmp_path, iq):
    # NaN entries in dqlist and absent g2 keys: pairing by position would mislabel.
    path, settings, bins, _ = _simulate(tmp_path, "aps_old", empty_cells=((0, 2), (1, 0)))
    with h5py.File(path) as h5:
        assert np.isnan(h5["xpcs/dqlist"][0, 2]) and "g2_00003" not in h5["exchange/C2T_all"]
    out = read_aps(path, settings.q_rings()[iq])
    _check_ring(out, settings, bins, iq)
    n_phi = len(PHI)
    assert all((lab - 1) // n_phi == iq for lab in out["source"]["bin_labels"])


def test_aps_old_nan_bin_with_matrix_is_skipped(tmp_path):
    mats = {f"g2_{k:05d}": np.triu(_sym(6, k)) for k in (1, 2, 3)}
    path = _write_old(tmp_path / "nan.hdf", [np.nan, 0.005, 0.005], [0.0, 10.0, 20.0], mats)
    out = read_aps(path, 0.005)  # nearest by |dq - q| would be the NaN under argmin
    assert out["source"]["bin_labels"] == [2, 3]
    assert np.isfinite(out["source"]["q_selected"])
    assert out["source"]["q_available"] == [0.005]
    np.testing.assert_allclose(out["c2_exp"][0], _sym(6, 2).astype(np.float32), rtol=1e-6)


def test_only_selected_ring_is_read(tmp_path):
    # A broken matrix in another ring must not matter: only the chosen ring is read.
    mats = {"g2_00001": np.triu(_sym(6)), "g2_00002": np.ones((4, 5))}
    path = _write_old(tmp_path / "other.hdf", [0.005, 0.009], [0.0, 0.0], mats)
    assert read_aps(path, 0.005)["c2_exp"].shape == (1, 6, 6)
    with pytest.raises(DataError, match="g2_00002"):
        read_aps(path, 0.009)


# ---------------------------------------------------------------- q selection


def test_q_selection_picks_ring_and_far_target_errors(tmp_path):
    path, settings, bins, _ = _simulate(tmp_path, "aps_u")
    out = read_aps(path, settings.q_rings()[2] * 1.03)
    _check_ring(out, settings, bins, 2)
    out = read_aps(path, settings.q_rings()[0] * 0.97)
    _check_ring(out, settings, bins, 0)
    with pytest.raises(DataError, match="available q") as err:
        read_aps(path, 10 * settings.q)
    for q_ring in settings.q_rings():
        assert f"{q_ring:.6g}" in str(err.value)
    with pytest.raises(DataError, match="available q"):
        read_aps(path, settings.q * 1.05, q_tolerance=0.01)


# ---------------------------------------------------------------- frames and dt


@pytest.mark.parametrize("fmt", ["aps_u", "aps_old"])
def test_frame_slicing_inclusive_time_since_file_start(tmp_path, fmt):
    path, settings, bins, truth = _simulate(tmp_path, fmt)
    out = read_aps(path, settings.q, start_frame=10, end_frame=20)
    _, _, c2 = _expected(settings, bins, settings.target_ring)
    assert out["c2_exp"].shape == (len(PHI), 11, 11)
    np.testing.assert_allclose(out["c2_exp"], c2[:, 9:20, 9:20], rtol=1e-6, atol=0)
    # Frame 10 of the file is 9 steps after its first frame.
    np.testing.assert_allclose(out["t1"], truth["dt"] * np.arange(9, 20), rtol=1e-12)
    assert out["source"]["time_origin"] == "file"
    assert out["source"]["t_first_s"] == pytest.approx(9 * truth["dt"], rel=1e-12)
    assert out["source"]["start_frame"] == 10 and out["source"]["end_frame"] == 20
    ref = read_aps(path, settings.q, start_frame=10, end_frame=20, time_origin="first_loaded")
    np.testing.assert_allclose(ref["t1"], truth["dt"] * np.arange(11), rtol=1e-12)
    np.testing.assert_array_equal(ref["t1"], ref["t2"])
    assert ref["source"]["t_first_s"] == 0.0 and ref["source"]["time_origin"] == "first_loaded"
    np.testing.assert_array_equal(ref["c2_exp"], out["c2_exp"])
    assert read_aps(path, settings.q, end_frame=-1)["c2_exp"].shape[1] == N_FRAMES


def test_dt_override(tmp_path):
    path, settings, _, truth = _simulate(tmp_path, "aps_u")
    out = read_aps(path, settings.q, dt=0.5)
    assert out["dt"] == 0.5 and out["dt"] != truth["dt"]
    assert out["source"]["dt_source"] == {"kind": "config"}
    np.testing.assert_allclose(out["t1"], 0.5 * np.arange(N_FRAMES))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(DataError, match="dt"):
            read_aps(path, settings.q, dt=bad)


@pytest.mark.parametrize(
    ("fmt", "period"),
    [("aps_u", "entry/instrument/detector_1/frame_time"),
     ("aps_old", "measurement/instrument/detector/exposure_period")],
)  # fmt: skip
def test_dt_missing_everywhere(tmp_path, fmt, period):
    path, settings, _, _ = _simulate(tmp_path, fmt)
    with h5py.File(path, "a") as h5:
        del h5[period]
    with pytest.raises(DataError, match="set dt") as err:
        read_aps(path, settings.q)
    assert period.split("/")[-1] in str(err.value)
    assert read_aps(path, settings.q, dt=0.2)["dt"] == 0.2


def test_dt_without_avg_stride_defaults_to_one(tmp_path):
    # A period without its factors used to become dt = period × 1 silently: now an error
    # naming what is missing, unless the user opts in to assume 1.
    path, settings, bins, _ = _simulate(tmp_path, "aps_u")
    with h5py.File(path, "a") as h5:
        del h5["xpcs/twotime/config"]
    with pytest.raises(DataError, match="missing_frame_factors: assume_1") as err:
        read_aps(path, settings.q)
    msg = str(err.value)
    for needle in ("/xpcs/twotime/config/avg_frame and /xpcs/twotime/config/stride_frame are "
                   "missing", "/entry/instrument/detector_1/frame_time", "set dt (s)",
                   f"{bins.frame_time_s:g} s", str(path)):  # fmt: skip
        assert needle in msg, msg
    out = read_aps(path, settings.q, missing_frame_factors="assume_1")
    assert out["dt"] == pytest.approx(bins.frame_time_s)
    assert out["source"]["dt_source"]["assumed_1"] == [
        "/xpcs/twotime/config/avg_frame",
        "/xpcs/twotime/config/stride_frame",
    ]
    assert read_aps(path, settings.q, dt=0.3)["source"]["dt_source"] == {"kind": "config"}


# ---------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found") as err:
        read_aps(tmp_path / "nope.hdf", 0.005)
    assert "nope.hdf" in str(err.value)


def test_not_hdf5(tmp_path):
    path = tmp_path / "notes.hdf"
    path.write_text("this is not HDF5\n")
    with pytest.raises(DataError, match="not an HDF5 file") as err:
        read_aps(path, 0.005)
    assert "notes.hdf" in str(err.value)


def test_unknown_layout_lists_keys(tmp_path):
    path = tmp_path / "odd.hdf"
    with h5py.File(path, "w") as h5:
        h5["measurement/x"] = 1.0
        h5["xpcs/something_else"] = 2.0
    with pytest.raises(DataError, match="unknown layout") as err:
        read_aps(path, 0.005)
    assert "measurement" in str(err.value) and "something_else" in str(err.value)


def test_missing_dphilist(tmp_path):
    path = _write_old(tmp_path / "nodphi.hdf", [0.005], None, {"g2_00001": np.eye(4)})
    with pytest.raises(DataError, match="/xpcs/dphilist"):
        read_aps(path, 0.005)


def test_missing_dim1(tmp_path):
    path, settings, _, _ = _simulate(tmp_path, "aps_u")
    with h5py.File(path, "a") as h5:
        del h5["xpcs/qmap/dynamic_v_list_dim1"]
    with pytest.raises(DataError, match="dynamic_v_list_dim1"):
        read_aps(path, settings.q)


def test_correlation_map_as_dataset(tmp_path):
    path, settings, _, _ = _simulate(tmp_path, "aps_u")
    with h5py.File(path, "a") as h5:
        del h5["xpcs/twotime/correlation_map"]
        h5["xpcs/twotime/correlation_map"] = np.zeros((2, 4, 4))
    with pytest.raises(DataError, match="correlation_map.*expected a group"):
        read_aps(path, settings.q)


def test_one_d_dqlist(tmp_path):
    mats = {"g2_00001": np.triu(_sym(4))}
    path = _write_old(tmp_path / "flat.hdf", [0.005], [0.0], mats, dqlist_2d=False)
    with pytest.raises(DataError, match="dqlist.*2-D"):
        read_aps(path, 0.005)


def test_aps_old_suffix_out_of_range(tmp_path):
    # 2 members for 3 bins: neither by suffix (99 > 3) nor by position (2 != 3).
    mats = {"g2_00001": np.triu(_sym(4)), "g2_00099": np.triu(_sym(4))}
    path = _write_old(tmp_path / "range.hdf", [0.005, 0.005, 0.005], [0.0, 1.0, 2.0], mats)
    with pytest.raises(DataError, match="g2_00099") as err:
        read_aps(path, 0.005)
    msg = str(err.value)
    assert "by suffix" in msg and "1..3" in msg and "by position, 2 datasets for 3 bins" in msg


def test_aps_u_count_mismatch(tmp_path):
    path, settings, _, _ = _simulate(tmp_path, "aps_u")
    with h5py.File(path, "a") as h5:
        del h5["xpcs/twotime/correlation_map/c2_00002"]
    with pytest.raises(DataError, match="processed_bins"):
        read_aps(path, settings.q)


def test_aps_u_map_names_must_be_q_phi(tmp_path):
    path, settings, _, _ = _simulate(tmp_path, "aps_u")
    with h5py.File(path, "a") as h5:
        del h5["xpcs/qmap/map_names"]
        h5.create_dataset("xpcs/qmap/map_names", data=["x", "y"], dtype=h5py.string_dtype())
    with pytest.raises(DataError, match="map_names"):
        read_aps(path, settings.q)


def test_aps_u_without_mapping_uses_label_minus_one(tmp_path):
    path, settings, bins, _ = _simulate(tmp_path, "aps_u")
    with h5py.File(path, "a") as h5:
        del h5["xpcs/qmap/dynamic_index_mapping"]
    _check_ring(read_aps(path, settings.q), settings, bins, settings.target_ring)


def test_non_square_matrix(tmp_path):
    path = _write_old(tmp_path / "rect.hdf", [0.005], [0.0], {"g2_00001": np.ones((4, 5))})
    with pytest.raises(DataError, match="g2_00001.*square"):
        read_aps(path, 0.005)


def test_mismatched_matrix_sizes(tmp_path):
    mats = {"g2_00001": np.triu(_sym(5)), "g2_00002": np.triu(_sym(6))}
    path = _write_old(tmp_path / "sizes.hdf", [0.005, 0.005], [0.0, 1.0], mats)
    with pytest.raises(DataError, match="differ in size") as err:
        read_aps(path, 0.005)
    assert "g2_00001" in str(err.value) and "g2_00002" in str(err.value)


def test_full_storage_detected_and_accepted(tmp_path):
    full = [_sym(6, 1), _sym(6, 2)]
    mats = {"g2_00001": full[0], "g2_00002": full[1]}
    path = _write_old(tmp_path / "full.hdf", [0.005, 0.005], [10.0, -5.0], mats)
    with pytest.raises(DataError, match="set storage: full or auto") as err:
        read_aps(path, 0.005, storage="upper")
    assert "g2_0000" in str(err.value) and "full symmetric matrix" in str(err.value)
    expected = np.stack([full[1], full[0]]).astype(np.float32)  # sorted by phi: -5, 10
    for storage in ("full", "auto"):
        out = read_aps(path, 0.005, storage=storage)
        np.testing.assert_array_equal(out["c2_exp"], expected)  # not doubled (Q8)
        np.testing.assert_array_equal(out["phi_angles_list"], [-5.0, 10.0])
        assert out["source"]["storage"] == {"setting": storage, "found": ["full", "full"]}


def test_full_storage_rejects_asymmetric(tmp_path):
    m = _sym(5)
    m[0, 3] += 0.1
    path = _write_old(tmp_path / "asym.hdf", [0.005], [0.0], {"g2_00001": m})
    for storage in ("full", "auto"):
        with pytest.raises(DataError, match="not symmetric") as err:
            read_aps(path, 0.005, storage=storage)
        assert "/exchange/C2T_all/g2_00001" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"start_frame": 20, "end_frame": 10}, r"end_frame must be -1 .* >= start_frame \(20\)"),
     ({"end_frame": -5}, r"end_frame must be -1 \(the last frame\) .* got -5"),  # was: all
     ({"end_frame": 0}, "end_frame must be -1"),
     ({"end_frame": N_FRAMES + 1}, f"{N_FRAMES} frames"),
     ({"start_frame": 0}, "start_frame"),
     ({"start_frame": 1.5}, "start_frame"),
     ({"storage": "triangle"}, r"storage must be one of \['auto', 'upper', 'lower', 'full'\]"),
     ({"time_origin": "zero"}, "time_origin must be one of"),
     ({"missing_frame_factors": "ignore"}, "missing_frame_factors must be one of"),
     ({"q_tolerance": -0.1}, "q_tolerance")],
)  # fmt: skip
def test_bad_frames_and_arguments(tmp_path, kwargs, match):
    path, settings, _, _ = _simulate(tmp_path, "aps_u")
    with pytest.raises(DataError, match=match):
        read_aps(path, settings.q, **kwargs)


@pytest.mark.parametrize("q", [0.0, -0.005, float("nan"), "0.005"])
def test_bad_target_q(tmp_path, q):
    path, _, _, _ = _simulate(tmp_path, "aps_u")
    with pytest.raises(DataError, match="target q"):
        read_aps(path, q)


# ---------------------------------------------------------------- legacy member names


def _f32(m):
    return np.asarray(m, np.float32)


@pytest.mark.parametrize("pattern", ["c2_{:05d}", "c2_{}"])
def test_legacy_zero_based_members_pair_by_position(tmp_path, pattern):
    # The reference package's fixtures number members 0..B-1 and pair them by position;
    # "c2_{}" also checks that position follows the number, not the name (c2_10 < c2_2).
    n_bins = 12
    dq = [0.004] * 6 + [0.006] * 6
    dphi = [90.0, -30.0, 10.0, 150.0, -90.0, 40.0] * 2
    mats = {pattern.format(k): np.triu(_sym(5, k)) for k in range(n_bins)}
    path = _write_old(tmp_path / "pos.hdf", dq, dphi, mats)
    out = read_aps(path, 0.006)
    src = out["source"]
    assert src["bin_mapping"] == "position" and src["member_prefix"] == "c2"
    order = [10, 7, 8, 11, 6, 9]  # bins 6..11 (q = 0.006) sorted by phi
    np.testing.assert_array_equal(out["phi_angles_list"], sorted(dphi[6:]))
    np.testing.assert_array_equal(out["wavevector_q_list"], [0.006] * 6)
    assert src["bin_labels"] == [k + 1 for k in order]
    assert src["datasets"] == [f"/exchange/C2T_all/{pattern.format(k)}" for k in order]
    np.testing.assert_array_equal(out["c2_exp"], np.stack([_f32(_sym(5, k)) for k in order]))


def test_legacy_c2_members_one_based_pair_by_suffix(tmp_path):
    # A subset of bins: suffixes are labels, so bin 5 is dqlist[0, 4], not position 1.
    dq, dphi = [0.005] * 6, [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    mats = {"c2_00002": np.triu(_sym(4, 2)), "c2_00005": np.triu(_sym(4, 5))}
    out = read_aps(_write_old(tmp_path / "sub.hdf", dq, dphi, mats), 0.005)
    assert out["source"]["bin_mapping"] == "suffix" and out["source"]["member_prefix"] == "c2"
    assert out["source"]["bin_labels"] == [2, 5]
    np.testing.assert_array_equal(out["phi_angles_list"], [10.0, 40.0])
    np.testing.assert_array_equal(out["c2_exp"], np.stack([_f32(_sym(4, 2)), _f32(_sym(4, 5))]))


def test_legacy_mixed_prefixes_refused(tmp_path):
    mats = {"g2_00001": np.triu(_sym(4)), "c2_00002": np.triu(_sym(4))}
    path = _write_old(tmp_path / "mixed.hdf", [0.005, 0.005], [0.0, 1.0], mats)
    with pytest.raises(DataError, match="mixes two naming schemes") as err:
        read_aps(path, 0.005)
    for needle in ("c2_NNNNN (c2_00002)", "g2_NNNNN (g2_00001)", str(path)):
        assert needle in str(err.value)


def test_legacy_same_number_twice_refused(tmp_path):
    mats = {"g2_1": np.triu(_sym(4)), "g2_00001": np.triu(_sym(4))}
    path = _write_old(tmp_path / "twice.hdf", [0.005, 0.005], [0.0, 1.0], mats)
    with pytest.raises(DataError, match="same number 1") as err:
        read_aps(path, 0.005)
    assert "g2_1" in str(err.value) and "g2_00001" in str(err.value)


def test_legacy_no_members(tmp_path):
    path = _write_old(tmp_path / "none.hdf", [0.005], [0.0], {"other": np.eye(3)})
    with pytest.raises(DataError, match="no g2_NNNNN or c2_NNNNN datasets"):
        read_aps(path, 0.005)


# ---------------------------------------------------------------- storage


def _stored(kind, seed=0, n=6):
    """A symmetric matrix and how a file stores it (upper/lower triangle, full, diagonal)."""
    full = _sym(n, seed)
    stored = {
        "upper": np.triu(full),
        "lower": np.tril(full),
        "full": full,
        "diagonal": np.diag(np.diag(full)),
    }[kind]
    return _f32(np.diag(np.diag(full)) if kind == "diagonal" else full), stored


def test_storage_auto_detects_each_matrix(tmp_path):
    kinds = ("upper", "lower", "full", "diagonal")
    pairs = [_stored(kind, seed) for seed, kind in enumerate(kinds)]
    mats = {f"g2_{k + 1:05d}": stored for k, (_, stored) in enumerate(pairs)}
    path = _write_old(tmp_path / "auto.hdf", [0.005] * 4, [0.0, 1.0, 2.0, 3.0], mats)
    out = read_aps(path, 0.005)
    np.testing.assert_array_equal(out["c2_exp"], np.stack([full for full, _ in pairs]))
    # Both strict triangles 0 counts as upper (the reconstruction is the same).
    assert out["source"]["storage"] == {
        "setting": "auto",
        "found": ["upper", "lower", "full", "upper"],
    }


def test_storage_lower_setting_reconstructs(tmp_path):
    full, stored = _stored("lower", 3)
    path = _write_old(tmp_path / "lower.hdf", [0.005], [0.0], {"g2_00001": stored})
    out = read_aps(path, 0.005, storage="lower")
    np.testing.assert_array_equal(out["c2_exp"][0], full)
    assert out["source"]["storage"] == {"setting": "lower", "found": ["lower"]}


@pytest.mark.parametrize(
    ("kind", "setting", "text"),
    [("lower", "upper", "stored as the lower triangle (all values above the diagonal are 0)"),
     ("upper", "lower", "stored as the upper triangle (all values below the diagonal are 0)"),
     ("full", "upper", "a full symmetric matrix"),
     ("full", "lower", "a full symmetric matrix"),
     ("upper", "full", "stored as the upper triangle"),
     ("lower", "full", "stored as the lower triangle")],
)  # fmt: skip
def test_explicit_storage_mismatch_suggests_a_value_that_works(tmp_path, kind, setting, text):
    full, stored = _stored(kind, 4)
    path = _write_old(tmp_path / "mis.hdf", [0.005], [0.0], {"g2_00001": stored})
    with pytest.raises(DataError) as err:
        read_aps(path, 0.005, storage=setting)
    msg = str(err.value)
    assert f"{path}: /exchange/C2T_all/g2_00001 does not fit storage: {setting}" in msg
    assert text in msg and msg.endswith(f"set storage: {kind} or auto"), msg
    np.testing.assert_array_equal(read_aps(path, 0.005, storage=kind)["c2_exp"][0], full)


@pytest.mark.parametrize("setting", ["auto", "upper", "lower", "full"])
def test_storage_nothing_fits_suggests_nothing(tmp_path, setting):
    # Junk in both triangles, or a NaN below an upper triangle (homodyne: contaminates, Q8).
    junk = _sym(5, 1)
    junk[0, 3] += 0.5
    nan_below = np.triu(_sym(5, 2))
    nan_below[3, 0] = np.nan
    mats = {"g2_00001": junk, "g2_00002": nan_below}
    path = _write_old(tmp_path / "junk.hdf", [0.005, 0.006], [0.0, 0.0], mats)
    for q, key in ((0.005, "g2_00001"), (0.006, "g2_00002")):
        with pytest.raises(DataError, match="no storage setting fits") as err:
            read_aps(path, q, storage=setting, q_tolerance=0.01)
        msg = str(err.value)
        assert f"/exchange/C2T_all/{key}" in msg and "not symmetric" in msg
        assert "set storage" not in msg


# ---------------------------------------------------------------- q rings


def test_legacy_ring_with_float_noise_keeps_every_angle(tmp_path):
    # Bins of one legacy ring differ in q by ~1e-4 relative; a 1e-6 ring width kept only
    # one angle of three, silently.
    q0 = 0.005
    dq = [q0, q0 * (1 + 1e-4), q0 * (1 - 1e-4), 0.007]
    mats = {f"g2_{k:05d}": np.triu(_sym(5, k)) for k in (1, 2, 3, 4)}
    path = _write_old(tmp_path / "noise.hdf", dq, [0.0, 45.0, 90.0, 0.0], mats)
    out = read_aps(path, q0)
    src = out["source"]
    assert src["bin_labels"] == [1, 2, 3] and src["ring_grouping"] == "q_tolerance"
    np.testing.assert_array_equal(out["wavevector_q_list"], dq[:3])
    assert src["q_members"] == dq[:3]
    assert src["q_selected"] == pytest.approx(np.mean(dq[:3]), rel=1e-15)
    assert src["q_relative_spread"] == pytest.approx(2e-4, rel=1e-6)
    np.testing.assert_array_equal(out["c2_exp"], np.stack([_f32(_sym(5, k)) for k in (1, 2, 3)]))


def _two_rings(tmp_path):
    """Legacy file: rings q = 0.005 (bins 1-3) and 0.00525 (bins 4-6, 5 % above), same phi."""
    dq = [0.005] * 3 + [0.00525] * 3
    dphi = [0.0, 45.0, 90.0] * 2
    mats = {f"g2_{k:05d}": np.triu(_sym(5, k)) for k in range(1, 7)}
    return _write_old(tmp_path / "rings.hdf", dq, dphi, mats)


def test_rings_merged_by_tolerance_are_refused(tmp_path):
    path = _two_rings(tmp_path)
    with pytest.raises(DataError, match="different q rings or duplicate bins") as err:
        read_aps(path, 0.005, q_tolerance=0.1)
    msg = str(err.value)
    for needle in ("bin 1 (/exchange/C2T_all/g2_00001, q = 0.005 1/Å, phi = 0 deg)",
                   "bin 4 (/exchange/C2T_all/g2_00004, q = 0.00525 1/Å, phi = 0 deg)",
                   "lower q_tolerance (now 0.1, relative) or fix the file", str(path)):  # fmt: skip
        assert needle in msg, msg


@pytest.mark.parametrize(("q", "labels"), [(0.005, [1, 2, 3]), (0.00525, [4, 5, 6])])
def test_legacy_q_edges_define_the_ring(tmp_path, q, labels):
    # Real legacy files carry the q-bin edges (/xpcs/dqspan): each angle's bin averages
    # its own pixels' q (spread 1e-3 here), rings are 5 % apart, q_tolerance is 10 %.
    dq = [0.005, 0.005005, 0.004995, 0.00525, 0.005255, 0.005245]
    mats = {f"g2_{k:05d}": np.triu(_sym(5, k)) for k in range(1, 7)}
    path = _write_old(tmp_path / "edges.hdf", dq, [0.0, 45.0, 90.0] * 2, mats)
    with h5py.File(path, "a") as h5:
        h5["xpcs/dqspan"] = np.array([[0.004875, 0.005125, 0.005375]])
    out = read_aps(path, q, q_tolerance=0.1)
    assert out["source"]["bin_labels"] == labels
    assert out["source"]["ring_grouping"] == "dqspan"
    np.testing.assert_array_equal(out["phi_angles_list"], [0.0, 45.0, 90.0])
    np.testing.assert_array_equal(out["c2_exp"], np.stack([_f32(_sym(5, k)) for k in labels]))


@pytest.mark.parametrize(("q", "labels"), [(0.005, [1, 2, 3]), (0.00525, [4, 5, 6])])
def test_rings_apart_with_small_tolerance(tmp_path, q, labels):
    out = read_aps(_two_rings(tmp_path), q, q_tolerance=0.01)
    assert out["source"]["bin_labels"] == labels
    np.testing.assert_array_equal(out["wavevector_q_list"], [q] * 3)
    np.testing.assert_array_equal(out["phi_angles_list"], [0.0, 45.0, 90.0])
    np.testing.assert_array_equal(out["c2_exp"], np.stack([_f32(_sym(5, k)) for k in labels]))


@pytest.mark.parametrize("phis", [(30.0, 30.0), (180.0, -180.0)])
def test_legacy_duplicate_bins_refused(tmp_path, phis):
    # Same q and phi under two labels (or the same direction written as ±180°).
    mats = {f"g2_{k:05d}": np.triu(_sym(4, k)) for k in (1, 2, 3)}
    path = _write_old(tmp_path / "dup.hdf", [0.005] * 3, [phis[0], 0.0, phis[1]], mats)
    with pytest.raises(DataError, match="duplicate bins") as err:
        read_aps(path, 0.005, q_tolerance=0.0)
    msg = str(err.value)
    assert "bin 1 (/exchange/C2T_all/g2_00001" in msg and "bin 3 (/exchange/C2T_all/g2_00003" in msg


def test_aps_u_ring_is_its_q_index_not_a_tolerance(tmp_path):
    # Rings 5 % apart, tolerance 10 %: APS-U files say which bins form a ring (one dim0
    # entry), so only that ring is read; a legacy file must be told a smaller tolerance.
    path, settings, bins, _ = _simulate(tmp_path, "aps_u", q_ring_step=0.05)
    out = read_aps(path, settings.q, q_tolerance=0.1)
    _check_ring(out, settings, bins, settings.target_ring)
    assert out["source"]["ring_grouping"] == "q_index"
    old, _ = simulate_file(settings, tmp_path / "old.hdf", fmt="aps_old")
    with pytest.raises(DataError, match="lower q_tolerance"):
        read_aps(old, settings.q, q_tolerance=0.1)
    _check_ring(read_aps(old, settings.q, q_tolerance=0.01), settings, bins, settings.target_ring)


# ---------------------------------------------------------------- dt provenance


def test_dt_source_records_each_factor(tmp_path):
    mats = {"g2_00001": np.triu(_sym(4))}
    path = _write_old(tmp_path / "dt.hdf", [0.005], [0.0], mats, exposure=0.01, avg=3, stride=2)
    out = read_aps(path, 0.005)
    assert out["dt"] == pytest.approx(0.06, rel=1e-15)
    assert out["source"]["dt_source"] == {
        "kind": "file",
        "period_path": "/measurement/instrument/detector/exposure_period",
        "period_s": 0.01,
        "avg": 3,
        "avg_path": "/xpcs/avg_frames",
        "stride": 2,
        "stride_path": "/xpcs/stride_frames",
        "assumed_1": [],
    }


def test_dt_one_missing_factor(tmp_path):
    mats = {"g2_00001": np.triu(_sym(4))}
    path = _write_old(tmp_path / "dt.hdf", [0.005], [0.0], mats, avg=4, stride=None)
    with pytest.raises(DataError, match="/xpcs/stride_frames is missing") as err:
        read_aps(path, 0.005)
    msg = str(err.value)
    assert "avg_frames" not in msg and "exposure_period = 0.01 s" in msg
    out = read_aps(path, 0.005, missing_frame_factors="assume_1")
    assert out["dt"] == pytest.approx(0.04, rel=1e-15)
    assert out["source"]["dt_source"]["assumed_1"] == ["/xpcs/stride_frames"]
    assert out["source"]["dt_source"]["avg"] == 4 and out["source"]["dt_source"]["stride"] == 1


@pytest.mark.parametrize("bad", [0, 2.5])
def test_dt_bad_factor(tmp_path, bad):
    mats = {"g2_00001": np.triu(_sym(4))}
    path = _write_old(tmp_path / "dt.hdf", [0.005], [0.0], mats, avg=None)
    with h5py.File(path, "a") as h5:
        h5["xpcs/avg_frames"] = np.array([[bad]], dtype=float)
    with pytest.raises(DataError, match=r"/xpcs/avg_frames = .*expected an integer >= 1"):
        read_aps(path, 0.005)


# ---------------------------------------------------------------- time axis


@pytest.mark.parametrize("fmt", ["aps_u", "aps_old"])
def test_frames_chosen_in_load_or_filter_give_one_time_axis(tmp_path, fmt):
    # One axis: frames 11-60 start at t = 10 dt whether load or filter selects them.
    path, settings, _, truth = _simulate(tmp_path, fmt, n_frames=70)
    windowed = load_stage(
        path, settings.q, tmp_path / "w.npz", tmp_path / "w.json", start_frame=11, end_frame=60
    )
    whole = load_stage(path, settings.q, tmp_path / "a.npz", tmp_path / "a.json")
    frames = {"frames": {"start": 11, "end": 60}, "exclude_t0": False}
    trimmed, _ = apply_filter(whole, FilterSettings.from_mapping(frames))
    for key in ("t1", "t2", "c2_exp", "phi_angles_list", "wavevector_q_list"):
        np.testing.assert_array_equal(getattr(windowed, key), getattr(trimmed, key))
    assert windowed.dt == trimmed.dt
    assert windowed.t1[0] == pytest.approx(10 * truth["dt"], rel=1e-12)
    rec = json.loads((tmp_path / "w.json").read_text())
    assert rec["time_origin"] == "file" and rec["t_first_s"] == windowed.t1[0]
    # exclude_t0 drops only a frame at t = 0: none in the window, frame 1 of the whole file.
    kept, _ = apply_filter(windowed, FilterSettings.from_mapping({}))
    assert kept.n_t == 50
    kept, _ = apply_filter(whole, FilterSettings.from_mapping({}))
    assert kept.n_t == 69 and kept.t1[0] == whole.t1[1]


# ---------------------------------------------------------------- skipped bins, strict JSON


def _strict_json(text):
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_skipped_bins_recorded_as_strict_json(tmp_path):
    mats = {f"g2_{k:05d}": np.triu(_sym(4, k)) for k in (1, 2, 3, 4)}
    dq = [0.005, np.nan, 0.005, np.inf]
    path = _write_old(tmp_path / "skip.hdf", dq, [0.0, 10.0, np.nan, np.nan], mats)
    load_stage(path, 0.005, tmp_path / "d.npz", tmp_path / "d.json")
    rec = _strict_json((tmp_path / "d.json").read_text())
    assert rec["bin_labels"] == [1]
    assert rec["skipped_bins"] == [
        {"label": 2, "dataset": "/exchange/C2T_all/g2_00002", "q": None, "phi": 10.0,
         "reason": "q is NaN"},
        {"label": 3, "dataset": "/exchange/C2T_all/g2_00003", "q": 0.005, "phi": None,
         "reason": "phi is NaN"},
        {"label": 4, "dataset": "/exchange/C2T_all/g2_00004", "q": None, "phi": None,
         "reason": "q is infinite and phi is NaN"},
    ]  # fmt: skip


def test_aps_u_skipped_bins_for_nan_phi(tmp_path):
    path, settings, _, _ = _simulate(tmp_path, "aps_u")
    with h5py.File(path, "a") as h5:
        phi = h5["xpcs/qmap/dynamic_v_list_dim1"]
        phi[0] = np.nan  # PHI[0] = 90 deg in every ring
    out = read_aps(path, settings.q)
    np.testing.assert_array_equal(out["phi_angles_list"], sorted(PHI[1:]))
    skipped = out["source"]["skipped_bins"]
    assert [s["reason"] for s in skipped] == ["phi is NaN"] * settings.n_q_rings
    assert all(s["phi"] is None and s["q"] is not None for s in skipped)


# ---------------------------------------------------------------- stage


def test_load_stage_writes_npz_and_json(tmp_path):
    path, settings, bins, truth = _simulate(tmp_path, "aps_old", empty_cells=((1, 0),))
    out_npz, out_json = tmp_path / "out" / "data.npz", tmp_path / "out" / "load.json"
    data = load_stage(path, settings.q, out_npz, out_json, start_frame=3, end_frame=22)
    back = XpcsData.from_npz(out_npz)
    np.testing.assert_array_equal(back.c2_exp, data.c2_exp)
    np.testing.assert_array_equal(back.phi_angles_list, data.phi_angles_list)
    assert back.dt == pytest.approx(truth["dt"])
    rec = json.loads(out_json.read_text())
    assert rec["source"]["path"] == str(path.resolve())
    assert rec["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rec["source"]["format"] == "aps_old"
    assert rec["q"]["target"] == settings.q and rec["q"]["selected"] == pytest.approx(truth["q"])
    assert rec["phi_deg"] == sorted(truth["phi_deg_at_q"])
    assert rec["frames"] == {"start": 3, "end": 22, "n": 20, "n_in_file": N_FRAMES}
    assert rec["dt_source"]["kind"] == "file" and rec["dt_s"] == pytest.approx(truth["dt"])
    assert rec["dt_source"]["avg"] * rec["dt_source"]["stride"] * rec["dt_source"][
        "period_s"
    ] == pytest.approx(truth["dt"])
    assert rec["time_origin"] == "file" and rec["t_first_s"] == pytest.approx(2 * truth["dt"])
    assert rec["storage"] == {"setting": "auto", "found": ["upper"] * (len(PHI) - 1)}
    assert rec["q"]["members"] == [pytest.approx(truth["q"])] * (len(PHI) - 1)
    assert rec["source"]["bin_mapping"] == "suffix" and rec["skipped_bins"] == []
    assert rec["n_phi"] == len(PHI) - 1 == len(rec["bin_labels"])
    assert rec["shapes"]["c2_exp"] == [len(PHI) - 1, 20, 20]
    assert rec["duration_s"] >= 0


def test_load_stage_writes_nothing_on_failure(tmp_path):
    path, settings, _, _ = _simulate(tmp_path, "aps_u")
    out_npz, out_json = tmp_path / "out" / "data.npz", tmp_path / "out" / "load.json"
    with pytest.raises(DataError):
        load_stage(path, 10 * settings.q, out_npz, out_json)
    with pytest.raises(DataError):
        load_stage(tmp_path / "missing.hdf", settings.q, out_npz, out_json)
    assert not out_npz.exists() and not out_json.exists()


def test_cli_load_passes_the_new_keys(tmp_path, capsys):
    from homodyne_steps.cli import main

    path, settings, _, _ = _simulate(tmp_path, "aps_u")
    with h5py.File(path, "a") as h5:
        del h5["xpcs/twotime/config/stride_frame"]
    out_npz, out_json = tmp_path / "c.npz", tmp_path / "c.json"
    argv = ["load", "--input", str(path), "--out-npz", str(out_npz), "--out-json", str(out_json)]
    assert main([*argv, "--settings", json.dumps({"q": settings.q})]) == 2
    assert "stride_frame is missing" in capsys.readouterr().err
    keys = {"q": settings.q, "frames": {"start": 5, "end": -1}, "storage": "upper",
            "missing_frame_factors": "assume_1", "time_origin": "first_loaded"}  # fmt: skip
    assert main([*argv, "--settings", json.dumps(keys)]) == 0
    rec = _strict_json(out_json.read_text())
    assert rec["time_origin"] == "first_loaded" and rec["t_first_s"] == 0.0
    assert rec["storage"]["setting"] == "upper"
    assert rec["dt_source"]["assumed_1"] == ["/xpcs/twotime/config/stride_frame"]
