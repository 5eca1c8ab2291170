"""The simulator and the APS writers: file layout, numbering, time step, truth and noise.

Each test checks a documented fact (``aps_writer`` module docstring,
``shared/spec/hdf5-formats.md`` §2, §3, §5) or a statistical property of the simulated
data, so a wrong path, dtype, label, time step or noise model makes it fail.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from homodyne_steps import cli
from homodyne_steps.errors import HomodyneStepsError, ParameterError, SimulationError
from homodyne_steps.io import aps_writer
from homodyne_steps.physics.model import compute_c2
from homodyne_steps.stages.simulate import (
    REFERENCE_CASES,
    REFERENCE_GEOMETRY,
    SimulationSettings,
    reference_settings,
    simulate_bins,
    simulate_file,
)

FORMATS = ("aps_u", "aps_old")
C2_GROUP = {"aps_u": "xpcs/twotime/correlation_map", "aps_old": "exchange/C2T_all"}
C2_NAME = {"aps_u": re.compile(r"^c2_(\d{5})$"), "aps_old": re.compile(r"^g2_(\d{5})$")}
EMPTY = ((1, 0), (0, 2))  # one empty cell on the target ring, one on another ring


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def small(mode: str = "static", **overrides) -> SimulationSettings:
    """A reference case shrunk to a few-second test size."""
    overrides.setdefault("n_frames", 40)
    return reference_settings(mode, **overrides)


def dataset_paths(h5: h5py.File) -> dict[str, h5py.Dataset]:
    """Every dataset in the file, by path without the leading slash."""
    found: dict[str, h5py.Dataset] = {}

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset):
            found[name] = obj

    h5.visititems(visit)
    return found


def documented_layout(fmt: str) -> tuple[set[str], str]:
    """(fixed dataset paths, C2 group) as listed in the aps_writer module docstring."""
    doc = aps_writer.__doc__
    assert doc is not None
    start_u, start_old = doc.index("``aps_u``"), doc.index("``aps_old``")
    block = doc[start_u:start_old] if fmt == "aps_u" else doc[start_old:]
    fixed: set[str] = set()
    c2_groups: set[str] = set()
    for line in block.splitlines():
        text = line.strip()
        if not text.startswith("/"):
            continue
        first, *rest = re.split(r"\s{2,}", text)[0].split(", ")
        parent = first.rsplit("/", 1)[0]
        for entry in [first, *(r if r.startswith("/") else f"{parent}/{r}" for r in rest)]:
            path = entry.lstrip("/")
            group, name = path.rsplit("/", 1)
            if name.startswith(("c2_", "g2_")):
                c2_groups.add(group)
            else:
                fixed.add(path)
    assert len(c2_groups) == 1, c2_groups
    return fixed, c2_groups.pop()


def c2_datasets(h5: h5py.File, fmt: str) -> dict[int, np.ndarray]:
    """The C2 datasets of a file by the number in their name (c2_k or g2_label)."""
    group = h5[C2_GROUP[fmt]]
    out = {}
    for name, ds in group.items():
        m = C2_NAME[fmt].match(name)
        assert m, f"unexpected member {name!r} in {C2_GROUP[fmt]}"
        out[int(m.group(1))] = ds[()]
    return out


def cells_in_file(h5: h5py.File, fmt: str) -> dict[tuple[int, int], np.ndarray]:
    """Stored upper triangles keyed by natural (iq, iphi), decoded from the file alone."""
    if fmt == "aps_u":
        n_phi = int(h5["xpcs/qmap/dynamic_num_pts"][1])
        mapping = h5["xpcs/qmap/dynamic_index_mapping"][()]
        processed = h5["xpcs/twotime/processed_bins"][()]
        out = {}
        for k, data in c2_datasets(h5, fmt).items():
            label = int(processed[k - 1])  # c2_k belongs to processed_bins[k-1]
            natural = int(mapping[label - 1])  # compressed label c -> mapping[c-1]
            out[divmod(natural, n_phi)] = data
        return out
    n_phi = int(h5["xpcs/dnophi"][0, 0])
    return {divmod(label - 1, n_phi): data for label, data in c2_datasets(h5, fmt).items()}


def full_from_triu(upper: np.ndarray) -> np.ndarray:
    u = upper.astype(np.float64)
    return u + u.T - np.diag(np.diag(u))


def clean_cells(s: SimulationSettings) -> dict[tuple[int, int], np.ndarray]:
    """The noiseless model c2 of every natural cell, computed independently of the simulator."""
    t = s.dt * np.arange(s.n_frames)
    out = {}
    for iq, q in enumerate(s.q_rings()):
        c2 = compute_c2(
            dict(s.params), t=t, phi_deg=np.asarray(s.phi_deg), q=float(q), L=s.L,
            contrast=s.contrast, offset=s.offset, dt=s.dt,
        )  # fmt: skip
        for ip in range(len(s.phi_deg)):
            out[(iq, ip)] = c2[ip]
    return out


# ---------------------------------------------------------------------------------------
# 1. Layout: exact dataset set, kinds, dtypes, shapes
# ---------------------------------------------------------------------------------------
def test_docstring_lists_the_expected_paths():
    """The layout parsed from the docstring is the one the spec describes (§2.1, §3.1)."""
    fixed_u, group_u = documented_layout("aps_u")
    assert group_u == C2_GROUP["aps_u"]
    assert fixed_u == {
        "entry/instrument/detector_1/frame_time",
        "xpcs/qmap/dynamic_v_list_dim0",
        "xpcs/qmap/dynamic_v_list_dim1",
        "xpcs/qmap/dynamic_index_mapping",
        "xpcs/qmap/dynamic_num_pts",
        "xpcs/qmap/map_names",
        "xpcs/qmap/map_units",
        "xpcs/twotime/processed_bins",
        "xpcs/twotime/config/avg_frame",
        "xpcs/twotime/config/stride_frame",
    }
    fixed_old, group_old = documented_layout("aps_old")
    assert group_old == C2_GROUP["aps_old"]
    assert fixed_old == {
        "xpcs/dqlist",
        "xpcs/dphilist",
        "xpcs/dnoq",
        "xpcs/dnophi",
        "xpcs/avg_frames",
        "xpcs/stride_frames",
        "xpcs/qphi_bin_to_process",
        "xpcs/Version",
        "xpcs/analysis_type",
        "xpcs/output_data",
        "measurement/instrument/detector/exposure_period",
    }


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("empty", [(), EMPTY], ids=["full", "empty_cells"])
def test_file_holds_exactly_the_documented_datasets(tmp_path, fmt, empty):
    s = small(n_frames=24, empty_cells=empty)
    out, _ = simulate_file(s, tmp_path / "sim.hdf", fmt=fmt)
    n_q, n_phi = s.n_q_rings, len(s.phi_deg)
    k = n_q * n_phi - len(empty)
    fixed, group = documented_layout(fmt)
    prefix = "c2_" if fmt == "aps_u" else "g2_"
    if fmt == "aps_u":
        c2_names = {f"{group}/c2_{i:05d}" for i in range(1, k + 1)}
    else:
        c2_names = {
            f"{group}/g2_{iq * n_phi + ip + 1:05d}"
            for iq in range(n_q)
            for ip in range(n_phi)
            if (iq, ip) not in empty
        }
    with h5py.File(out, "r") as h5:
        datasets = dataset_paths(h5)
        assert set(datasets) == fixed | c2_names
        assert isinstance(h5[group], h5py.Group)
        assert len(h5[group]) == k
        for name, ds in datasets.items():
            if name.rsplit("/", 1)[-1].startswith(prefix):
                assert ds.dtype == np.float32, name
                assert ds.shape == (s.n_frames, s.n_frames), name


@pytest.mark.parametrize("empty", [(), EMPTY], ids=["full", "empty_cells"])
def test_aps_u_dtypes_shapes_and_values(tmp_path, empty):
    s = small(n_frames=24, empty_cells=empty, phi_deg=(-30.0, 0.0, 45.0, 90.0))
    out, _ = simulate_file(s, tmp_path / "sim.hdf", fmt="aps_u")
    n_q, n_phi = s.n_q_rings, len(s.phi_deg)
    k = n_q * n_phi - len(empty)
    with h5py.File(out, "r") as h5:
        expect = {
            "entry/instrument/detector_1/frame_time": (np.float64, ()),
            "xpcs/qmap/dynamic_v_list_dim0": (np.float64, (n_q,)),
            "xpcs/qmap/dynamic_v_list_dim1": (np.float64, (n_phi,)),
            "xpcs/qmap/dynamic_index_mapping": (np.uint32, (k,)),
            "xpcs/qmap/dynamic_num_pts": (np.int64, (2,)),
            "xpcs/twotime/processed_bins": (np.int32, (k,)),
            "xpcs/twotime/config/avg_frame": (np.int64, ()),
            "xpcs/twotime/config/stride_frame": (np.int64, ()),
        }
        for path, (dtype, shape) in expect.items():
            ds = h5[path]
            assert isinstance(ds, h5py.Dataset), path
            assert ds.dtype == dtype, (path, ds.dtype)
            assert ds.shape == shape, (path, ds.shape)
        for path, values in (("map_names", ["q", "phi"]), ("map_units", ["Å⁻¹", "deg"])):
            ds = h5[f"xpcs/qmap/{path}"]
            assert h5py.check_string_dtype(ds.dtype) is not None
            assert ds.shape == (2,)
            assert [v.decode() if isinstance(v, bytes) else v for v in ds[()]] == values
        assert isinstance(h5["xpcs/twotime/correlation_map"], h5py.Group)
        assert "hash" in h5["xpcs/qmap"].attrs  # the viewer's QMapManager needs it
        np.testing.assert_array_equal(h5["xpcs/qmap/dynamic_v_list_dim0"][()], s.q_rings())
        np.testing.assert_array_equal(h5["xpcs/qmap/dynamic_v_list_dim1"][()], s.phi_deg)
        np.testing.assert_array_equal(h5["xpcs/qmap/dynamic_num_pts"][()], [n_q, n_phi])
        # processed_bins: ascending compressed labels 1..K (every surviving cell has C2)
        np.testing.assert_array_equal(h5["xpcs/twotime/processed_bins"][()], np.arange(1, k + 1))
        surviving = [iq * n_phi + ip for iq in range(n_q) for ip in range(n_phi)]
        surviving = [c for c in surviving if divmod(c, n_phi) not in empty]
        np.testing.assert_array_equal(h5["xpcs/qmap/dynamic_index_mapping"][()], surviving)


@pytest.mark.parametrize("empty", [(), EMPTY], ids=["full", "empty_cells"])
def test_aps_old_dtypes_shapes_and_values(tmp_path, empty):
    s = small(n_frames=24, empty_cells=empty, phi_deg=(-30.0, 0.0, 45.0, 90.0))
    out, _ = simulate_file(s, tmp_path / "sim.hdf", fmt="aps_old")
    n_q, n_phi = s.n_q_rings, len(s.phi_deg)
    k = n_q * n_phi - len(empty)
    with h5py.File(out, "r") as h5:
        expect = {
            "xpcs/dqlist": (np.float64, (1, n_q * n_phi)),
            "xpcs/dphilist": (np.float64, (1, n_q * n_phi)),
            "xpcs/dnoq": (np.float64, (1, 1)),
            "xpcs/dnophi": (np.float64, (1, 1)),
            "xpcs/avg_frames": (np.uint64, (1, 1)),
            "xpcs/stride_frames": (np.uint64, (1, 1)),
            "xpcs/qphi_bin_to_process": (np.uint64, (k, 1)),
            "measurement/instrument/detector/exposure_period": (np.float64, (1, 1)),
        }
        for path, (dtype, shape) in expect.items():
            ds = h5[path]
            assert isinstance(ds, h5py.Dataset), path
            assert ds.dtype == dtype, (path, ds.dtype)
            assert ds.shape == shape, (path, ds.shape)
        for path, value in (("Version", "1.0"), ("analysis_type", "Twotime"),
                            ("output_data", "/exchange")):  # fmt: skip
            ds = h5[f"xpcs/{path}"]
            assert h5py.check_string_dtype(ds.dtype) is not None, path
            assert ds.shape == ()
            raw = ds[()]
            assert (raw.decode() if isinstance(raw, bytes) else raw) == value
        assert isinstance(h5["exchange/C2T_all"], h5py.Group)
        assert h5["xpcs/dnoq"][0, 0] == n_q
        assert h5["xpcs/dnophi"][0, 0] == n_phi
        labels = [
            iq * n_phi + ip + 1 for iq in range(n_q) for ip in range(n_phi) if (iq, ip) not in empty
        ]
        np.testing.assert_array_equal(h5["xpcs/qphi_bin_to_process"][:, 0], labels)
        # C2T_all members sort lexically in numeric (= list) order (spec §5.2)
        names = list(h5["exchange/C2T_all"])
        assert sorted(names) == [f"g2_{lab:05d}" for lab in labels]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("n", "compressed"), [(90, False), (91, True)])
def test_large_c2_is_lzf_compressed_with_full_chunks(tmp_path, fmt, n, compressed):
    """BC compresses C2 arrays of more than 8192 elements with LZF, chunk (N, N) (§3.1)."""
    s = small(n_frames=n, n_q_rings=1, phi_deg=(0.0,))
    out, _ = simulate_file(s, tmp_path / "sim.hdf", fmt=fmt)
    with h5py.File(out, "r") as h5:
        (ds,) = h5[C2_GROUP[fmt]].values()
        assert ds.compression == ("lzf" if compressed else None)
        assert ds.chunks == ((n, n) if compressed else None)


# ---------------------------------------------------------------------------------------
# 2. Upper-triangle storage and reconstruction
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_c2_is_upper_triangle_and_reconstructs_the_simulated_matrix(tmp_path, fmt):
    s = small("laminar_flow", n_frames=30, phi_deg=(0.0, 45.0, 90.0))
    bins, _ = simulate_bins(s)
    out, _ = simulate_file(s, tmp_path / "sim.hdf", fmt=fmt)
    with h5py.File(out, "r") as h5:
        stored = cells_in_file(h5, fmt)
    assert set(stored) == set(bins.c2)
    for cell, upper in stored.items():
        sim = bins.c2[cell]
        assert sim.dtype == np.float64
        assert upper.dtype == np.float32
        lower = np.tril_indices(s.n_frames, k=-1)
        assert np.all(upper[lower] == 0.0), cell
        np.testing.assert_array_equal(np.triu(upper), upper)
        full = full_from_triu(upper)
        np.testing.assert_allclose(full, sim, rtol=1e-6, atol=0, err_msg=str(cell))
        # the upper triangle is the float32 rounding of the simulated one, exactly
        iu = np.triu_indices(s.n_frames)
        np.testing.assert_array_equal(upper[iu], sim[iu].astype(np.float32))


# ---------------------------------------------------------------------------------------
# 3. Numbering (running counter vs natural label), with empty cells
# ---------------------------------------------------------------------------------------
def test_cells_are_physically_distinct():
    """Precondition of the numbering tests: a mislabelled cell would not match."""
    s = small("laminar_flow", n_frames=30, noise=0.0, diagonal_excess=0.0)
    cells = clean_cells(s)
    keys = sorted(cells)
    for a in range(len(keys)):
        for b in range(a + 1, len(keys)):
            diff = np.max(np.abs(cells[keys[a]] - cells[keys[b]]))
            assert diff > 1e-3, (keys[a], keys[b], diff)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("empty", [(), EMPTY, ((1, 0), (0, 2), (2, 5), (1, 3))])
def test_every_stored_matrix_carries_its_own_cell_label(tmp_path, fmt, empty):
    s = small("laminar_flow", n_frames=30, noise=0.0, diagonal_excess=0.0, empty_cells=empty)
    model = clean_cells(s)
    bins, _ = simulate_bins(s)
    out, _ = simulate_file(s, tmp_path / "sim.hdf", fmt=fmt)
    n_phi = len(s.phi_deg)
    with h5py.File(out, "r") as h5:
        stored = cells_in_file(h5, fmt)
        if fmt == "aps_u":
            mapping = h5["xpcs/qmap/dynamic_index_mapping"][()]
            assert not {iq * n_phi + ip for iq, ip in empty} & set(mapping.tolist())
        else:
            dq, dphi = h5["xpcs/dqlist"][0], h5["xpcs/dphilist"][0]
            nan_at = {divmod(int(i), n_phi) for i in np.flatnonzero(np.isnan(dq))}
            assert nan_at == set(empty)
            np.testing.assert_array_equal(np.isnan(dphi), np.isnan(dq))
            for iq in range(s.n_q_rings):
                for ip in range(n_phi):
                    if (iq, ip) not in empty:
                        assert dq[iq * n_phi + ip] == s.q_rings()[iq]
                        assert dphi[iq * n_phi + ip] == s.phi_deg[ip]
            for iq, ip in empty:
                assert f"g2_{iq * n_phi + ip + 1:05d}" not in h5["exchange/C2T_all"]
    expected_cells = {(iq, ip) for iq in range(s.n_q_rings) for ip in range(n_phi)} - set(empty)
    assert set(stored) == expected_cells
    for cell, upper in stored.items():
        full = full_from_triu(upper)
        np.testing.assert_allclose(full, bins.c2[cell], rtol=1e-6, atol=0, err_msg=str(cell))
        # and noise=0: it is the model at this cell's own (q ring, phi)
        np.testing.assert_allclose(full, model[cell], rtol=1e-6, atol=0, err_msg=str(cell))


def test_aps_u_counter_differs_from_label_when_cells_are_empty(tmp_path):
    """With empty cells, c2_k is not natural bin k: the mapping must be used (§3.2, Q1)."""
    s = small("laminar_flow", n_frames=20, empty_cells=EMPTY)
    out, _ = simulate_file(s, tmp_path / "sim.hdf", fmt="aps_u")
    n_phi = len(s.phi_deg)
    with h5py.File(out, "r") as h5:
        mapping = h5["xpcs/qmap/dynamic_index_mapping"][()]
    first_gap = min(iq * n_phi + ip for iq, ip in EMPTY)
    # before the first empty cell the counter and the natural index agree, after it not
    np.testing.assert_array_equal(mapping[:first_gap], np.arange(first_gap))
    assert np.all(mapping[first_gap:] > np.arange(first_gap, mapping.size))


# ---------------------------------------------------------------------------------------
# 4. Time step
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("dt", "avg", "stride"), [(0.1, 2, 5), (0.013, 3, 7), (2.5, 1, 1)])
def test_dt_is_frame_time_times_avg_times_stride(tmp_path, fmt, dt, avg, stride):
    s = small(n_frames=20, dt=dt, avg_frames=avg, stride_frames=stride)
    out, truth_path = simulate_file(s, tmp_path / "sim.hdf", fmt=fmt)
    with h5py.File(out, "r") as h5:
        if fmt == "aps_u":
            frame_time = float(h5["entry/instrument/detector_1/frame_time"][()])
            a = int(h5["xpcs/twotime/config/avg_frame"][()])
            st = int(h5["xpcs/twotime/config/stride_frame"][()])
        else:
            frame_time = float(h5["measurement/instrument/detector/exposure_period"][0, 0])
            a = int(h5["xpcs/avg_frames"][0, 0])
            st = int(h5["xpcs/stride_frames"][0, 0])
    assert (a, st) == (avg, stride)
    assert frame_time == pytest.approx(dt / (avg * stride), rel=1e-14)
    assert frame_time * a * st == pytest.approx(dt, rel=1e-14)
    truth = json.loads(truth_path.read_text())
    assert truth["dt"] == pytest.approx(dt, rel=1e-14)
    assert truth["frame_time"] == pytest.approx(frame_time, rel=1e-14)


# ---------------------------------------------------------------------------------------
# 5. truth.json
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["static", "laminar_flow"])
def test_truth_json_records_the_settings(tmp_path, mode):
    s = small(mode, n_frames=20, q=0.007, contrast=0.25, offset=1.02, noise=0.02, seed=17,
              empty_cells=((1, 0),))  # fmt: skip
    out, truth_path = simulate_file(s, tmp_path / "data" / "sim.hdf", fmt="aps_old")
    assert truth_path == out.parent / "truth.json"
    truth = json.loads(truth_path.read_text(encoding="utf-8"))
    for key in ("params", "contrast", "offset", "q", "phi_deg", "dt", "noise", "seed"):
        assert key in truth, key
    assert truth["params"] == REFERENCE_CASES[mode]["params"]
    assert truth["analysis_mode"] == mode
    assert truth["contrast"] == 0.25
    assert truth["offset"] == 1.02
    assert truth["q"] == 0.007
    assert truth["q"] == s.q_rings()[s.n_q_rings // 2]  # the middle ring
    assert truth["q_rings"][1] == truth["q"]
    assert truth["q_rings"][0] < truth["q"] < truth["q_rings"][2]
    assert truth["phi_deg"] == list(REFERENCE_CASES[mode]["phi_deg"])
    assert truth["phi_deg_at_q"] == list(REFERENCE_CASES[mode]["phi_deg"])[1:]
    assert truth["dt"] == REFERENCE_GEOMETRY["dt"]
    assert truth["noise"] == 0.02
    assert truth["seed"] == 17
    assert truth["n_frames"] == 20
    assert truth["L"] == REFERENCE_GEOMETRY["L"]
    assert truth["empty_cells"] == [[1, 0]]
    assert truth["format"] == "aps_old"
    assert truth["file"] == "sim.hdf"


def test_truth_json_per_angle_scaling_and_custom_path(tmp_path):
    s = small(n_frames=20, contrast=(0.2, 0.3, 0.4), offset=(1.0, 1.1, 0.9))
    truth_path = tmp_path / "elsewhere" / "t.json"
    out, got = simulate_file(s, tmp_path / "sim.hdf", truth_path=truth_path)
    assert got == truth_path and truth_path.is_file()
    assert not (tmp_path / "truth.json").exists()
    truth = json.loads(truth_path.read_text())
    assert truth["contrast"] == [0.2, 0.3, 0.4]
    assert truth["offset"] == [1.0, 1.1, 0.9]


def test_truth_path_equal_to_data_path_is_rejected(tmp_path):
    with pytest.raises(SimulationError, match="same path"):
        simulate_file(small(n_frames=20), tmp_path / "x.hdf", truth_path=tmp_path / "x.hdf")
    assert not (tmp_path / "x.hdf").exists()


# ---------------------------------------------------------------------------------------
# 6. Determinism
# ---------------------------------------------------------------------------------------
def _c2_bytes(path: Path, fmt: str) -> dict[int, bytes]:
    with h5py.File(path, "r") as h5:
        return {k: v.tobytes() for k, v in c2_datasets(h5, fmt).items()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_seed_same_bytes_different_seed_different(tmp_path, fmt):
    a, _ = simulate_file(small(n_frames=24, seed=3), tmp_path / "a" / "s.hdf", fmt=fmt)
    b, _ = simulate_file(small(n_frames=24, seed=3), tmp_path / "b" / "s.hdf", fmt=fmt)
    c, _ = simulate_file(small(n_frames=24, seed=4), tmp_path / "c" / "s.hdf", fmt=fmt)
    ba, bb, bc = _c2_bytes(a, fmt), _c2_bytes(b, fmt), _c2_bytes(c, fmt)
    assert ba == bb
    assert ba.keys() == bc.keys()
    assert all(ba[k] != bc[k] for k in ba)  # every cell gets fresh noise


# ---------------------------------------------------------------------------------------
# 7. Noise and diagonal statistics
# ---------------------------------------------------------------------------------------
def test_relative_noise_has_the_requested_level():
    noise = 0.01
    s = small("laminar_flow", n_frames=60, noise=noise, diagonal_excess=0.0, seed=11)
    noisy, _ = simulate_bins(s)
    model = clean_cells(s)
    iu = np.triu_indices(s.n_frames)
    residuals = []
    for cell, c2 in noisy.c2.items():
        np.testing.assert_array_equal(c2, c2.T)  # exactly symmetric
        residuals.append((c2[iu] - model[cell][iu]) / model[cell][iu])
    r = np.concatenate(residuals)
    assert r.size == 18 * 60 * 61 // 2
    assert np.std(r) == pytest.approx(noise, rel=0.05)
    assert abs(np.mean(r)) < 5 * noise / np.sqrt(r.size)
    # Gaussian: about 68 % within one sigma, no absurd outliers
    assert np.mean(np.abs(r) < noise) == pytest.approx(0.6827, abs=0.02)
    assert np.max(np.abs(r)) < 6 * noise


def test_noise_scales_with_the_requested_level():
    model = None
    stds = []
    for noise in (0.005, 0.02):
        s = small(n_frames=50, noise=noise, diagonal_excess=0.0, seed=2)
        model = clean_cells(s)
        bins, _ = simulate_bins(s)
        iu = np.triu_indices(s.n_frames)
        r = np.concatenate([(c[iu] - model[k][iu]) / model[k][iu] for k, c in bins.c2.items()])
        stds.append(np.std(r))
    assert stds[1] / stds[0] == pytest.approx(4.0, rel=0.05)


def test_without_noise_the_matrix_is_the_model():
    s = small("laminar_flow", n_frames=40, noise=0.0, diagonal_excess=0.0)
    bins, _ = simulate_bins(s)
    model = clean_cells(s)
    for cell, c2 in bins.c2.items():
        np.testing.assert_array_equal(c2, model[cell])


def test_diagonal_excess_is_added_only_on_the_diagonal():
    excess = 0.5
    s = small(n_frames=50, noise=0.0, diagonal_excess=excess, contrast=0.3, offset=1.0)
    bins, _ = simulate_bins(s)
    model = clean_cells(s)
    off = ~np.eye(s.n_frames, dtype=bool)
    diag_excess = []
    for cell, c2 in bins.c2.items():
        np.testing.assert_array_equal(c2[off], model[cell][off])
        np.testing.assert_array_equal(c2, c2.T)
        # the clean diagonal is offset + contrast (g1 = 1 at zero lag)
        np.testing.assert_allclose(np.diag(model[cell]), 1.0 + 0.3, rtol=1e-12)
        diag_excess.append(np.diag(c2) - (1.0 + 0.3))
    d = np.concatenate(diag_excess)
    assert np.all(d > 0)
    assert np.mean(d) == pytest.approx(excess, abs=0.02)
    assert np.std(d) == pytest.approx(0.1 * excess, rel=0.25)


def test_decay_is_faster_on_outer_rings():
    """Each ring uses its own q: at a fixed lag g1² decays more at larger q."""
    s = small(n_frames=40, noise=0.0, diagonal_excess=0.0, phi_deg=(0.0,))
    bins, _ = simulate_bins(s)
    lagged = [bins.c2[(iq, 0)][0, -1] for iq in range(s.n_q_rings)]
    assert lagged[0] > lagged[1] > lagged[2]
    assert all(1.0 < v < 1.3 for v in lagged)  # between offset and offset + contrast


# ---------------------------------------------------------------------------------------
# 8. Bad settings
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        ({"params": {"D0": 1e9, "alpha": -0.3, "D_offset": 1e3}}, ParameterError, r"D0.*1e\+09"),
        ({"params": {"D0": 1e4, "alpha": 5.0, "D_offset": 1e3}}, ParameterError, r"alpha.*5"),
        ({"params": {"D0": 1e4, "alpha": 0.0}}, ParameterError, r"D0.*alpha"),
        ({"n_frames": 2}, SimulationError, r"n_frames.*got 2"),
        ({"n_frames": 20.0}, SimulationError, r"n_frames.*20\.0"),
        ({"empty_cells": ((3, 0),)}, SimulationError, r"\(3, 0\)"),
        ({"empty_cells": ((0, -1),)}, SimulationError, r"\(0, -1\)"),
        ({"empty_cells": ((1, 0), (1, 1), (1, 2))}, SimulationError, r"target q ring"),
        ({"phi_deg": (0.0, 45.0, 45.0)}, SimulationError, r"repeated.*45\.0"),
        ({"phi_deg": (-180.0, 0.0)}, SimulationError, r"-180"),
        ({"phi_deg": ()}, SimulationError, r"phi_deg"),
        ({"noise": -0.1}, SimulationError, r"noise.*-0\.1"),
        ({"diagonal_excess": -1.0}, SimulationError, r"diagonal_excess.*-1\.0"),
        ({"dt": 0.0}, SimulationError, r"dt.*0\.0"),
        ({"q": -0.005}, SimulationError, r"q .*-0\.005"),
        ({"avg_frames": 0}, SimulationError, r"avg_frames.*0"),
        ({"n_q_rings": 3, "q_ring_step": 1.0}, SimulationError, r"q_ring_step.*1\.0"),
    ],
)
def test_bad_settings_raise_naming_the_value(tmp_path, overrides, error, pattern):
    out = tmp_path / "bad.hdf"
    with pytest.raises(error, match=pattern):
        simulate_file(SimulationSettings(**{**_base_kwargs(), **overrides}), out)
    assert not out.exists()
    assert not (tmp_path / "truth.json").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary leftovers either


def _base_kwargs() -> dict:
    case = REFERENCE_CASES["static"]
    return {"params": dict(case["params"]), "phi_deg": case["phi_deg"], "n_frames": 20}


def test_all_errors_are_input_errors():
    """Everything a user can get wrong is a HomodyneStepsError (the CLI prints one line)."""
    assert issubclass(SimulationError, HomodyneStepsError)
    assert issubclass(ParameterError, HomodyneStepsError)


def test_last_phi_bin_at_180_is_allowed():
    bins, _ = simulate_bins(small(n_frames=20, phi_deg=(0.0, 180.0), n_q_rings=1))
    assert set(bins.c2) == {(0, 0), (0, 1)}


def test_empty_cells_away_from_the_target_ring_may_empty_a_whole_ring():
    bins, truth = simulate_bins(small(n_frames=20, empty_cells=((0, 0), (0, 1), (0, 2))))
    assert {iq for iq, _ in bins.c2} == {1, 2}
    assert truth["phi_deg_at_q"] == [0.0, 45.0, 90.0]


@pytest.mark.parametrize("fmt", ["aps_x", "APS_U", "npz"])
def test_unknown_format_is_rejected_before_writing(tmp_path, fmt):
    with pytest.raises(SimulationError, match=re.escape(repr(fmt))):
        simulate_file(small(n_frames=20), tmp_path / "x.hdf", fmt=fmt)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("n_rings", "step"), [(2, 1.5), (4, 0.6)])
def test_even_ring_count_with_too_large_step_names_q_ring_step(n_rings, step):
    with pytest.raises(SimulationError, match="q_ring_step"):
        simulate_bins(small(n_frames=20, n_q_rings=n_rings, q_ring_step=step))


# ---------------------------------------------------------------------------------------
# 9. Command line
# ---------------------------------------------------------------------------------------
def test_cli_simulate_writes_file_and_truth(tmp_path, capsys):
    out = tmp_path / "x.hdf"
    rc = cli.main(["simulate", "--out", str(out), "--mode", "static", "--frames", "50"])
    assert rc == 0
    assert out.is_file()
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["analysis_mode"] == "static"
    assert truth["params"] == REFERENCE_CASES["static"]["params"]
    assert truth["n_frames"] == 50
    assert truth["format"] == "aps_u"
    with h5py.File(out, "r") as h5:
        stored = c2_datasets(h5, "aps_u")
        assert len(stored) == 3 * len(REFERENCE_CASES["static"]["phi_deg"])
        assert all(v.shape == (50, 50) and v.dtype == np.float32 for v in stored.values())
    assert str(out) in capsys.readouterr().out


def test_cli_simulate_options_reach_the_file(tmp_path):
    out = tmp_path / "old.hdf"
    truth_path = tmp_path / "t.json"
    argv = [
        "simulate", "--out", str(out), "--truth", str(truth_path), "--format", "aps_old",
        "--mode", "laminar_flow", "--frames", "20", "--phi", "-20", "10", "40",
        "--param", "phi0=-2", "--empty-cell", "0,1", "--seed", "5", "--dt", "0.2",
        "--avg-frames", "4", "--stride-frames", "1", "--contrast", "0.2", "0.25", "0.3",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    truth = json.loads(truth_path.read_text())
    assert truth["params"]["phi0"] == -2.0
    assert truth["seed"] == 5
    assert truth["contrast"] == [0.2, 0.25, 0.3]
    assert truth["empty_cells"] == [[0, 1]]
    with h5py.File(out, "r") as h5:
        assert "g2_00002" not in h5["exchange/C2T_all"]
        assert np.isnan(h5["xpcs/dqlist"][0, 1])
        ft = h5["measurement/instrument/detector/exposure_period"][0, 0]
        assert ft * h5["xpcs/avg_frames"][0, 0] * h5["xpcs/stride_frames"][0, 0] == (
            pytest.approx(0.2, rel=1e-14)
        )
        np.testing.assert_array_equal(h5["xpcs/dphilist"][0, 3:6], [-20.0, 10.0, 40.0])


def test_cli_unknown_param_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["simulate", "--out", str(tmp_path / "x.hdf"), "--param", "FOO=1"])
    assert info.value.code == 2
    assert "FOO" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--param", "D0=1e9"], "D0"),
        (["--param", "gamma_dot_t0=1e-3"], "gamma_dot_t0"),  # not a static-mode parameter
        (["--empty-cell", "7,0"], "(7, 0)"),
        (["--phi", "10", "10"], "repeated"),
    ],
)
def test_cli_bad_value_prints_one_line_and_returns_2(tmp_path, capsys, extra, needle):
    out = tmp_path / "x.hdf"
    argv = ["simulate", "--out", str(out), "--mode", "static", "--frames", "20", *extra]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert needle in lines[0]
    assert lines[0].startswith("homodyne-steps simulate: error:")
    assert "Traceback" not in captured.err
    assert not out.exists()


def test_building_the_parser_does_not_import_jax_or_h5py():
    code = (
        "import sys\n"
        "from homodyne_steps.cli import build_parser\n"
        "build_parser()\n"
        "print(sorted(m for m in ('jax', 'h5py') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "[]"


def test_speckle_method_writes_a_file_the_load_stage_reads(tmp_path, capsys):
    """``simulate --method speckle``: an APS-U file of correlator two-time matrices with a
    truth naming the physical model; load finds the ring and every angle."""
    from homodyne_steps.stages.load import load_stage

    settings = {"n_frames": 30, "n_particles": 256, "pixels_per_cell": 40, "seed": 2}
    argv = ["simulate", "--method", "speckle", "--out", str(tmp_path / "s.hdf"),
            "--settings", json.dumps(settings)]  # fmt: skip
    assert cli.main(argv) == 0
    assert "speckle" in capsys.readouterr().out
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["method"] == "speckle" and truth["model"] == {
        "shear": "physical",
        "integral": "exact",
    }
    data = load_stage(tmp_path / "s.hdf", truth["q_rings"][0], tmp_path / "l.npz",
                      tmp_path / "l.json")  # fmt: skip
    assert data.c2_exp.shape == (len(truth["phi_deg"]), 30, 30)
    np.testing.assert_allclose(data.phi_angles_list, truth["phi_deg"])
    # correlator output: symmetric, off-diagonal near 1 + contrast at the first lag
    c2 = np.asarray(data.c2_exp)
    np.testing.assert_allclose(c2, np.swapaxes(c2, 1, 2), rtol=1e-6)
    first_lag = np.mean([np.diagonal(m, 1).mean() for m in c2])
    assert 1.0 < first_lag < 1.0 + 1.5 * truth["contrast"]
    # the workflow passes the whole simulate entry: {method: speckle, speckle: {...}}
    entry = {"method": "speckle", "speckle": settings}
    argv = ["simulate", "--out", str(tmp_path / "w.hdf"), "--truth", str(tmp_path / "w.json"),
            "--settings", json.dumps(entry)]  # fmt: skip
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "w.json").read_text())["method"] == "speckle"
    # a bad key is one line naming it
    bad = ["simulate", "--method", "speckle", "--out", str(tmp_path / "b.hdf"),
           "--settings", '{"gapp": "uniform"}']  # fmt: skip
    assert cli.main(bad) == 2
    assert "simulate.speckle.gapp: unknown key" in capsys.readouterr().err
