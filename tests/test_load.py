"""Tests of the load stage: both APS layouts, the reference reader's traps, bad inputs."""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest

from homodyne_steps.dataset import XpcsData
from homodyne_steps.errors import DataError
from homodyne_steps.load import load_stage, read_aps
from homodyne_steps.simulate import reference_settings, simulate_bins, simulate_file

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


def _write_old(path, dq, dphi, mats, exposure=0.01, dqlist_2d=True):
    """Hand-written legacy file: dq/dphi lists, g2 datasets by name."""
    with h5py.File(path, "w") as h5:
        dq = np.asarray(dq, float)
        h5["xpcs/dqlist"] = dq.reshape(1, -1) if dqlist_2d else dq
        if dphi is not None:
            h5["xpcs/dphilist"] = np.asarray(dphi, float).reshape(1, -1)
        if exposure is not None:
            h5["measurement/instrument/detector/exposure_period"] = np.array([[exposure]])
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
    assert out["source"]["dt_source"] == "file"
    np.testing.assert_allclose(out["t1"], truth["dt"] * np.arange(N_FRAMES), rtol=1e-12)
    np.testing.assert_array_equal(out["t1"], out["t2"])
    assert out["t1"].dtype == np.float64 and out["t1"][0] == 0.0
    assert out["source"]["q_selected"] == pytest.approx(truth["q"])


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
def test_frame_slicing_inclusive_time_from_zero(tmp_path, fmt):
    path, settings, bins, truth = _simulate(tmp_path, fmt)
    out = read_aps(path, settings.q, start_frame=10, end_frame=20)
    _, _, c2 = _expected(settings, bins, settings.target_ring)
    assert out["c2_exp"].shape == (len(PHI), 11, 11)
    np.testing.assert_allclose(out["c2_exp"], c2[:, 9:20, 9:20], rtol=1e-6, atol=0)
    np.testing.assert_allclose(out["t1"], truth["dt"] * np.arange(11), rtol=1e-12)
    assert out["source"]["start_frame"] == 10 and out["source"]["end_frame"] == 20
    assert read_aps(path, settings.q, end_frame=-1)["c2_exp"].shape[1] == N_FRAMES


def test_dt_override(tmp_path):
    path, settings, _, truth = _simulate(tmp_path, "aps_u")
    out = read_aps(path, settings.q, dt=0.5)
    assert out["dt"] == 0.5 and out["dt"] != truth["dt"]
    assert out["source"]["dt_source"] == "config"
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
    path, settings, bins, _ = _simulate(tmp_path, "aps_u")
    with h5py.File(path, "a") as h5:
        del h5["xpcs/twotime/config"]
    assert read_aps(path, settings.q)["dt"] == pytest.approx(bins.frame_time_s)


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
    mats = {"g2_00001": np.triu(_sym(4)), "g2_00099": np.triu(_sym(4))}
    path = _write_old(tmp_path / "range.hdf", [0.005, 0.005], [0.0, 1.0], mats)
    with pytest.raises(DataError, match="g2_00099"):
        read_aps(path, 0.005)


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
    with pytest.raises(DataError, match="storage: full") as err:
        read_aps(path, 0.005)
    assert "g2_0000" in str(err.value)
    out = read_aps(path, 0.005, storage="full")
    expected = np.stack([full[1], full[0]]).astype(np.float32)  # sorted by phi: -5, 10
    np.testing.assert_array_equal(out["c2_exp"], expected)
    np.testing.assert_array_equal(out["phi_angles_list"], [-5.0, 10.0])


def test_full_storage_rejects_asymmetric(tmp_path):
    m = _sym(5)
    m[0, 3] += 0.1
    path = _write_old(tmp_path / "asym.hdf", [0.005], [0.0], {"g2_00001": m})
    with pytest.raises(DataError, match="not symmetric"):
        read_aps(path, 0.005, storage="full")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"start_frame": 20, "end_frame": 10}, r"end_frame must be -1 .* >= start_frame \(20\)"),
     ({"end_frame": -5}, r"end_frame must be -1 \(the last frame\) .* got -5"),  # was: all
     ({"end_frame": 0}, "end_frame must be -1"),
     ({"end_frame": N_FRAMES + 1}, f"{N_FRAMES} frames"),
     ({"start_frame": 0}, "start_frame"),
     ({"start_frame": 1.5}, "start_frame"),
     ({"storage": "lower"}, "storage"),
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
    assert rec["dt_source"] == "file" and rec["dt_s"] == pytest.approx(truth["dt"])
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
