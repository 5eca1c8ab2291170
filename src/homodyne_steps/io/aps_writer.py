"""Write two-time correlation results as real APS 8-ID-I HDF5 files (both layouts).

Layouts follow ``shared/spec/hdf5-formats.md`` §2, §3 and §5; these are the paths we
write (and the tests check that a file holds exactly these):

``aps_u`` (boost_corr / NeXus, 2025+)::

    /entry/instrument/detector_1/frame_time     float64 scalar, s
    /xpcs/qmap/dynamic_v_list_dim0              float64 (Q,)  q bin centres, 1/Å
    /xpcs/qmap/dynamic_v_list_dim1              float64 (P,)  phi bin centres, deg
    /xpcs/qmap/dynamic_index_mapping            uint32 (M,)   natural flat index q*P+phi
                                                              of compressed label c at [c-1]
    /xpcs/qmap/dynamic_num_pts                  int64 (2,) = [Q, P]
    /xpcs/qmap/map_names, map_units             vlen str (2,) = [q, phi], [Å⁻¹, deg]
    /xpcs/twotime/processed_bins                int32 (K,)    ascending compressed labels
    /xpcs/twotime/config/avg_frame, stride_frame  int64 scalars
    /xpcs/twotime/correlation_map/c2_00001..K   float32 (N, N) upper triangle incl. diagonal;
                                                c2_k belongs to processed_bins[k-1]

``aps_old`` (xpcs-eigen / Matlab era)::

    /xpcs/dqlist, /xpcs/dphilist                float64 (1, B)  per natural bin, NaN if empty
    /xpcs/dnoq, /xpcs/dnophi                    float64 (1, 1)
    /xpcs/avg_frames, /xpcs/stride_frames       uint64 (1, 1)
    /xpcs/qphi_bin_to_process                   uint64 (K, 1)   1-based labels with C2
    /xpcs/Version, analysis_type, output_data   str "1.0", "Twotime", "/exchange"
    /measurement/instrument/detector/exposure_period  float64 (1, 1), s
    /exchange/C2T_all/g2_NNNNN                  float32 (N, N) upper triangle, NNNNN = label

One C2 row/column step is frame_time × avg × stride. Files are written to a temporary
name and renamed, so a reader never sees a half-written file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from homodyne_steps.io.serialise import atomic_path

FORMATS = ("aps_u", "aps_old")
LZF_MIN_ELEMENTS = 8192  # boost_corr compresses C2 arrays larger than this


@dataclass(frozen=True)
class TwoTimeBins:
    """Two-time matrices on a (q, phi) partition, as a correlator produces them.

    Attributes:
        q_centres: (Q,) ring centres in 1/Å.
        phi_centres: (P,) angle centres in degrees.
        c2: natural cell (iq, iphi) -> (N, N) symmetric matrix; absent cells are empty.
        frame_time_s: detector frame period in s.
        avg_frames, stride_frames: frame averaging and striding before correlation.
    """

    q_centres: np.ndarray
    phi_centres: np.ndarray
    c2: dict[tuple[int, int], np.ndarray]
    frame_time_s: float
    avg_frames: int
    stride_frames: int

    @property
    def dt(self) -> float:
        return self.frame_time_s * self.avg_frames * self.stride_frames

    def natural_cells(self) -> list[tuple[int, int]]:
        """Non-empty cells in natural (q-major) order."""
        n_phi = len(self.phi_centres)
        return sorted(self.c2, key=lambda c: c[0] * n_phi + c[1])


def upper_triangle_f32(c2: np.ndarray) -> np.ndarray:
    """What correlators store: triu(C2) in float32, strictly lower part exactly 0."""
    return np.triu(np.asarray(c2, dtype=np.float32))


def _c2_dataset(group: h5py.Group, name: str, c2: np.ndarray) -> None:
    data = upper_triangle_f32(c2)
    if data.size > LZF_MIN_ELEMENTS:
        group.create_dataset(name, data=data, compression="lzf", chunks=data.shape)
    else:
        group.create_dataset(name, data=data)


def _write_aps_u(h5: h5py.File, bins: TwoTimeBins) -> None:
    n_phi = len(bins.phi_centres)
    cells = bins.natural_cells()
    mapping = np.array([iq * n_phi + ip for iq, ip in cells], dtype=np.uint32)

    det = h5.create_group("entry/instrument/detector_1")
    det.create_dataset("frame_time", data=np.float64(bins.frame_time_s))

    qmap = h5.create_group("xpcs/qmap")
    qmap.create_dataset("dynamic_v_list_dim0", data=np.asarray(bins.q_centres, np.float64))
    qmap.create_dataset("dynamic_v_list_dim1", data=np.asarray(bins.phi_centres, np.float64))
    qmap.create_dataset("dynamic_index_mapping", data=mapping)
    qmap.create_dataset(
        "dynamic_num_pts", data=np.array([len(bins.q_centres), n_phi], dtype=np.int64)
    )
    str_dt = h5py.string_dtype("utf-8")
    qmap.create_dataset("map_names", data=np.array(["q", "phi"], dtype=object), dtype=str_dt)
    qmap.create_dataset("map_units", data=np.array(["Å⁻¹", "deg"], dtype=object), dtype=str_dt)
    qmap.attrs["hash"] = hashlib.sha256(mapping.tobytes() + bins.q_centres.tobytes()).hexdigest()

    twotime = h5.create_group("xpcs/twotime")
    twotime.create_dataset("processed_bins", data=np.arange(1, len(cells) + 1, dtype=np.int32))
    config = twotime.create_group("config")
    config.create_dataset("avg_frame", data=np.int64(bins.avg_frames))
    config.create_dataset("stride_frame", data=np.int64(bins.stride_frames))
    cmap = twotime.create_group("correlation_map")
    # c2_k is numbered by a running counter over processed_bins, not by bin label.
    for k, cell in enumerate(cells, start=1):
        _c2_dataset(cmap, f"c2_{k:05d}", bins.c2[cell])


def _write_aps_old(h5: h5py.File, bins: TwoTimeBins) -> None:
    n_q, n_phi = len(bins.q_centres), len(bins.phi_centres)
    dq = np.full((1, n_q * n_phi), np.nan)
    dphi = np.full((1, n_q * n_phi), np.nan)
    cells = bins.natural_cells()
    for iq, ip in cells:
        dq[0, iq * n_phi + ip] = bins.q_centres[iq]
        dphi[0, iq * n_phi + ip] = bins.phi_centres[ip]
    labels = np.array([iq * n_phi + ip + 1 for iq, ip in cells], dtype=np.uint64)

    xpcs = h5.create_group("xpcs")
    xpcs.create_dataset("dqlist", data=dq)
    xpcs.create_dataset("dphilist", data=dphi)
    xpcs.create_dataset("dnoq", data=np.array([[n_q]], dtype=np.float64))
    xpcs.create_dataset("dnophi", data=np.array([[n_phi]], dtype=np.float64))
    xpcs.create_dataset("avg_frames", data=np.array([[bins.avg_frames]], dtype=np.uint64))
    xpcs.create_dataset("stride_frames", data=np.array([[bins.stride_frames]], dtype=np.uint64))
    xpcs.create_dataset("qphi_bin_to_process", data=labels.reshape(-1, 1))
    xpcs.create_dataset("Version", data="1.0")
    xpcs.create_dataset("analysis_type", data="Twotime")
    xpcs.create_dataset("output_data", data="/exchange")
    det = h5.create_group("measurement/instrument/detector")
    det.create_dataset("exposure_period", data=np.array([[bins.frame_time_s]], dtype=np.float64))

    c2t = h5.create_group("exchange/C2T_all")
    # Legacy keys carry the 1-based natural bin label, as xpcs-eigen wrote them.
    for (iq, ip), label in zip(cells, labels, strict=True):
        _c2_dataset(c2t, f"g2_{int(label):05d}", bins.c2[(iq, ip)])


def write_aps_file(path: str | os.PathLike[str], bins: TwoTimeBins, fmt: str = "aps_u") -> Path:
    """Write ``bins`` to ``path`` in layout ``fmt`` (``aps_u`` or ``aps_old``), atomically."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown APS layout {fmt!r}; expected one of {FORMATS}")
    writer = _write_aps_u if fmt == "aps_u" else _write_aps_old
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            writer(h5, bins)
    return Path(path)
