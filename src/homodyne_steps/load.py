"""Load stage: read one q ring of an APS 8-ID-I two-time HDF5 file.

Why a reader of our own: the reference loader (homodyne ``XPCSDataLoader``) mislabels
bins of real files. It ignores ``dynamic_index_mapping`` (Q1), pairs legacy keys with
``dqlist`` by position (Q2), mixes q rings (Q3), selects NaN q (Q4), never reads dt (Q5),
doubles matrices stored in full (Q8) and detects layouts by name only (Q12); see
``shared/spec/hdf5-formats.md`` §6–§7. This reader:

* detects the layout by structure, checking group/dataset kinds and companions;
* ``aps_u``: ``c2_k`` belongs to ``processed_bins[k-1]``; compressed label ``c`` maps via
  ``/xpcs/qmap/dynamic_index_mapping[c-1]`` to the natural index ``q_idx * P + phi_idx``
  (``c - 1`` when the mapping is absent); ``map_names`` must be ``[q, phi]``;
* ``aps_old``: ``g2_NNNNN`` belongs to ``dqlist[0, NNNNN-1]`` by its suffix; bins whose q
  or phi is NaN are skipped;
* picks the ring whose q is nearest the target (accepted within ``q_tolerance`` relative),
  returns all of its phi bins with rows sorted by phi ascending, and reads only those
  matrices (only the requested frame window of each);
* verifies the storage (``upper``: strictly-lower triangle exactly 0, then
  ``C = U + Uᵀ - diag(U)``; ``full``: symmetric within float32 rounding, used as is);
* slices frames 1-based inclusive, builds ``t = dt * arange(n)`` from 0 and takes dt from
  the file (frame period × averaging × stride) unless one is given.

``c2_exp`` keeps the file's floating dtype (float32 for real files; integer data becomes
float64) and is NOT diagonal-corrected: that is a later stage. Units: q in 1/Å, phi in
degrees, t and dt in s. Every input problem raises :class:`DataError` naming the file,
the HDF5 path and what was expected.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from homodyne_steps import __version__
from homodyne_steps.dataset import XpcsData
from homodyne_steps.errors import DataError
from homodyne_steps.serialise import write_json

STORAGES = ("upper", "full")
RING_RTOL = 1e-6  # q values this close (relative) are one ring: float noise, not a new ring
SYMMETRY_RTOL = 8 * float(np.finfo(np.float32).eps)  # "full" storage symmetry check

APS_U_PATHS = {
    "/xpcs/qmap/dynamic_v_list_dim0": h5py.Dataset,
    "/xpcs/qmap/dynamic_v_list_dim1": h5py.Dataset,
    "/xpcs/twotime/processed_bins": h5py.Dataset,
    "/xpcs/twotime/correlation_map": h5py.Group,
}
APS_OLD_PATHS = {
    "/xpcs/dqlist": h5py.Dataset,
    "/xpcs/dphilist": h5py.Dataset,
    "/exchange/C2T_all": h5py.Group,
}
# (frame period [s], averaging, stride); one C2 step is their product.
DT_PATHS = {
    "aps_u": (
        "/entry/instrument/detector_1/frame_time",
        "/xpcs/twotime/config/avg_frame",
        "/xpcs/twotime/config/stride_frame",
    ),
    "aps_old": (
        "/measurement/instrument/detector/exposure_period",
        "/xpcs/avg_frames",
        "/xpcs/stride_frames",
    ),
}
_C2_KEY = re.compile(r"c2_(\d+)")
_G2_KEY = re.compile(r"g2_(\d+)")


@dataclass(frozen=True)
class _Bin:
    """One (q, phi) bin that has a C2 matrix in the file."""

    q: float  # 1/Å
    phi: float  # deg
    label: int  # aps_u: compressed label; aps_old: 1-based natural label
    dataset: str  # HDF5 path of its matrix


# ---------------------------------------------------------------- small readers


def _node(h5: h5py.File, path: str) -> h5py.Group | h5py.Dataset | None:
    """The object at ``path``, or None when any component is missing or not a group."""
    obj: Any = h5
    for part in path.strip("/").split("/"):
        try:
            if not isinstance(obj, h5py.Group) or part not in obj:
                return None
            obj = obj[part]
        except (KeyError, OSError):  # broken links
            return None
    return obj


def _numbers(h5: h5py.File, path: str, name: str) -> np.ndarray:
    """Read the numeric dataset at ``path`` as float64 (DataError if absent/non-numeric)."""
    ds = _node(h5, path)
    if not isinstance(ds, h5py.Dataset):
        what = "missing" if ds is None else "a group"
        raise DataError(f"{name}: {path} is {what}; expected a numeric dataset")
    arr = np.asarray(ds[()])
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{name}: {path} has dtype {arr.dtype}; expected numbers")
    return arr.astype(np.float64)


def _labels(arr: np.ndarray, path: str, name: str, minimum: int) -> np.ndarray:
    """Check a 1-D list of integer labels >= ``minimum``; return it as int64."""
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(f"{name}: {path} has shape {arr.shape}; expected a non-empty 1-D list")
    if not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)) and arr.min() >= minimum):
        raise DataError(f"{name}: {path} must hold integers >= {minimum}, got {arr.tolist()}")
    return arr.astype(np.int64)


def _scalar(h5: h5py.File, path: str, name: str) -> float | None:
    """A one-element numeric dataset as float; None when absent."""
    if _node(h5, path) is None:
        return None
    arr = _numbers(h5, path, name)
    if arr.size != 1:
        raise DataError(f"{name}: {path} has shape {arr.shape}; expected a single value")
    return float(arr.reshape(-1)[0])


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


# ---------------------------------------------------------------- layout and bins


def _detect_format(h5: h5py.File, name: str) -> str:
    """``aps_u`` or ``aps_old`` by structure (kinds checked); DataError otherwise."""
    problems = {}
    for fmt, required in (("aps_u", APS_U_PATHS), ("aps_old", APS_OLD_PATHS)):
        nodes = {p: _node(h5, p) for p in required}
        bad = [
            f"{p} is {'missing' if obj is None else 'a ' + type(obj).__name__.lower()}, "
            f"expected a {kind.__name__.lower()}"
            for (p, kind), obj in zip(required.items(), nodes.values(), strict=True)
            if not isinstance(obj, kind)
        ]
        if not bad:
            return fmt
        problems[fmt] = (bad, any(obj is not None for obj in nodes.values()))
    for fmt, (bad, partial) in problems.items():
        if partial:
            raise DataError(f"{name}: looks like an {fmt} file but " + "; ".join(bad))
    xpcs = _node(h5, "/xpcs")
    xpcs_keys = sorted(xpcs.keys()) if isinstance(xpcs, h5py.Group) else []
    raise DataError(
        f"{name}: unknown layout; expected APS aps_u ({', '.join(APS_U_PATHS)}) or aps_old "
        f"({', '.join(APS_OLD_PATHS)}); found top-level keys {sorted(h5.keys())} and "
        f"/xpcs keys {xpcs_keys}"
    )


def _bins_aps_u(h5: h5py.File, name: str) -> list[_Bin]:
    """Bins of an APS-U file: c2_k ↔ processed_bins[k-1] ↔ (q, phi) via the index map."""
    q_c = _numbers(h5, "/xpcs/qmap/dynamic_v_list_dim0", name)
    phi_c = _numbers(h5, "/xpcs/qmap/dynamic_v_list_dim1", name)
    for path, arr in (("dynamic_v_list_dim0", q_c), ("dynamic_v_list_dim1", phi_c)):
        if arr.ndim != 1 or arr.size == 0:
            raise DataError(f"{name}: /xpcs/qmap/{path} has shape {arr.shape}; expected (n,)")
    n_q, n_p = q_c.size, phi_c.size
    names_ds = _node(h5, "/xpcs/qmap/map_names")
    if isinstance(names_ds, h5py.Dataset):
        raw = np.asarray(names_ds[()]).reshape(-1).tolist()
        found = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in raw]
        if [v.strip().lower() for v in found] != ["q", "phi"]:
            raise DataError(
                f"{name}: /xpcs/qmap/map_names is {found}; expected ['q', 'phi'] "
                "(only a q/phi partition can be analysed)"
            )
    num_pts = _node(h5, "/xpcs/qmap/dynamic_num_pts")
    if isinstance(num_pts, h5py.Dataset):
        pts = _numbers(h5, "/xpcs/qmap/dynamic_num_pts", name).reshape(-1).tolist()
        if pts != [n_q, n_p]:
            raise DataError(
                f"{name}: /xpcs/qmap/dynamic_num_pts is {pts} but dynamic_v_list_dim0/dim1 "
                f"have {[n_q, n_p]} entries"
            )
    pb_path = "/xpcs/twotime/processed_bins"
    processed = _labels(_numbers(h5, pb_path, name), pb_path, name, 1)
    map_path = "/xpcs/qmap/dynamic_index_mapping"
    mapping = None
    if _node(h5, map_path) is not None:
        mapping = _labels(_numbers(h5, map_path, name), map_path, name, 0)

    group = h5["/xpcs/twotime/correlation_map"]
    keyed = {}
    for key in group:
        m = _C2_KEY.fullmatch(key)
        if m:
            k = int(m.group(1))
            if k in keyed:
                raise DataError(f"{name}: correlation_map has both {keyed[k]} and {key}")
            keyed[k] = key
    if len(keyed) != processed.size:
        raise DataError(
            f"{name}: /xpcs/twotime/correlation_map holds {len(keyed)} c2_NNNNN matrices but "
            f"{pb_path} lists {processed.size} bins; expected one matrix per processed bin"
        )
    bins, seen = [], {}
    for k in sorted(keyed):
        if not 1 <= k <= processed.size:
            raise DataError(
                f"{name}: correlation_map/{keyed[k]} has counter {k}, outside 1..{processed.size} "
                f"(c2_k belongs to {pb_path}[k-1])"
            )
        label = int(processed[k - 1])
        if mapping is not None:
            if label > mapping.size:
                raise DataError(
                    f"{name}: processed bin label {label} exceeds the {mapping.size} entries "
                    f"of {map_path}"
                )
            idx = int(mapping[label - 1])
        else:
            idx = label - 1
        if idx >= n_q * n_p:
            raise DataError(
                f"{name}: bin label {label} maps to natural index {idx}, outside the "
                f"{n_q} × {n_p} (q, phi) partition of /xpcs/qmap"
            )
        if idx in seen:
            raise DataError(f"{name}: bin labels {seen[idx]} and {label} map to the same cell")
        seen[idx] = label
        q_val, phi_val = float(q_c[idx // n_p]), float(phi_c[idx % n_p])
        if math.isfinite(q_val) and math.isfinite(phi_val):
            dataset = f"/xpcs/twotime/correlation_map/{keyed[k]}"
            bins.append(_Bin(q_val, phi_val, label, dataset))
    return bins


def _bins_aps_old(h5: h5py.File, name: str) -> list[_Bin]:
    """Bins of a legacy file: g2_NNNNN ↔ dqlist[0, NNNNN-1] by suffix; NaN bins skipped."""
    dq = _numbers(h5, "/xpcs/dqlist", name)
    dphi = _numbers(h5, "/xpcs/dphilist", name)
    if dq.ndim != 2 or dq.shape[0] != 1:
        raise DataError(
            f"{name}: /xpcs/dqlist has shape {dq.shape}; legacy files store it 2-D as (1, B)"
        )
    if dphi.shape != dq.shape:
        raise DataError(
            f"{name}: /xpcs/dphilist has shape {dphi.shape}; expected {dq.shape} like dqlist"
        )
    n_bins = dq.shape[1]
    bins, labels = [], set()
    for key in h5["/exchange/C2T_all"]:
        m = _G2_KEY.fullmatch(key)
        if not m:
            continue
        label = int(m.group(1))
        if not 1 <= label <= n_bins:
            raise DataError(
                f"{name}: /exchange/C2T_all/{key} names bin label {label}, but /xpcs/dqlist "
                f"has {n_bins} bins (labels 1..{n_bins})"
            )
        if label in labels:
            raise DataError(f"{name}: /exchange/C2T_all has two datasets for bin label {label}")
        labels.add(label)
        q_val, phi_val = float(dq[0, label - 1]), float(dphi[0, label - 1])
        if math.isfinite(q_val) and math.isfinite(phi_val):
            bins.append(_Bin(q_val, phi_val, label, f"/exchange/C2T_all/{key}"))
    if not labels:
        raise DataError(f"{name}: /exchange/C2T_all holds no g2_NNNNN datasets")
    return bins


def _select_ring(
    bins: list[_Bin], q: float, q_tolerance: float, name: str
) -> tuple[float, list[_Bin], list[float]]:
    """The bins of the ring nearest ``q`` (relative tolerance), sorted by phi."""
    if not bins:
        raise DataError(f"{name}: no bin with a C2 matrix has a finite q and phi")
    qs = np.array([b.q for b in bins])
    available = np.unique(qs).tolist()
    nearest = qs[np.argmin(np.abs(qs - q))]
    members = [b for b in bins if abs(b.q - nearest) <= RING_RTOL * abs(nearest)]
    q_sel = float(np.mean([b.q for b in members]))
    if not abs(q_sel - q) <= q_tolerance * q:
        shown = ", ".join(f"{v:.6g}" for v in available)
        raise DataError(
            f"{name}: no q ring within {q_tolerance:g} (relative) of the target q = {q:.6g} "
            f"1/Å; nearest is {q_sel:.6g}; available q (1/Å): [{shown}]"
        )
    return q_sel, sorted(members, key=lambda b: (b.phi, b.label)), available


# ---------------------------------------------------------------- matrices, frames, dt


def _frame_window(n_file: int, start_frame: int, end_frame: int, name: str) -> tuple[int, int]:
    """0-based half-open [s, e) of 1-based inclusive frames start..end (end −1: last)."""
    end = n_file if end_frame == -1 else end_frame
    if end > n_file:
        raise DataError(
            f"{name}: end_frame = {end_frame} is beyond the data: the matrices have "
            f"{n_file} frames (use 1..{n_file}, or -1 for the last)"
        )
    if start_frame > end:
        raise DataError(f"{name}: start_frame = {start_frame} is after end_frame = {end}")
    return start_frame - 1, end


def _matrix_shape(h5: h5py.File, bins: list[_Bin], name: str) -> tuple[int, np.dtype]:
    """Common size N of the selected (N, N) datasets and their result dtype."""
    n_file, first, dtypes = None, None, []
    for b in bins:
        ds = _node(h5, b.dataset)
        if not isinstance(ds, h5py.Dataset):
            raise DataError(f"{name}: {b.dataset} is not a dataset; expected an (N, N) matrix")
        if ds.ndim != 2 or ds.shape[0] != ds.shape[1]:
            raise DataError(
                f"{name}: {b.dataset} has shape {ds.shape}; expected a square (N, N) matrix"
            )
        if ds.dtype.kind not in "biuf":
            raise DataError(f"{name}: {b.dataset} has dtype {ds.dtype}; expected numbers")
        if n_file is None:
            n_file, first = ds.shape[0], b.dataset
        elif ds.shape[0] != n_file:
            raise DataError(
                f"{name}: matrices of one ring differ in size: {first} is {n_file}×{n_file}, "
                f"{b.dataset} is {ds.shape[0]}×{ds.shape[1]}"
            )
        dtypes.append(ds.dtype)
    dtype = np.result_type(*dtypes)
    return int(n_file), (dtype if dtype.kind == "f" else np.dtype(np.float64))


def _reconstruct(m: np.ndarray, storage: str, where: str) -> np.ndarray:
    """Full symmetric matrix from the stored one (see module docstring)."""
    if storage == "upper":
        lower = np.tril(m, -1)
        if np.any(lower != 0):  # NaN counts as non-zero
            raise DataError(
                f"{where} has {int(np.count_nonzero(lower))} non-zero values below the "
                "diagonal; the file seems to store full matrices; set storage: full"
            )
        full = m + m.T
        np.fill_diagonal(full, np.diagonal(m))  # exact: U + Uᵀ - diag(U)
        return full
    finite = np.abs(m[np.isfinite(m)])
    scale = float(finite.max()) if finite.size else 0.0
    if not np.allclose(m, m.T, rtol=SYMMETRY_RTOL, atol=SYMMETRY_RTOL * scale, equal_nan=True):
        raise DataError(
            f"{where} is not symmetric (storage: full expects C2 = C2ᵀ within float32 "
            "rounding); if only the upper triangle is stored, set storage: upper"
        )
    return m


def _file_dt(h5: h5py.File, fmt: str, name: str) -> float | None:
    """C2 step in s from the file (period × avg × stride); None if the period is absent."""
    period_path, avg_path, stride_path = DT_PATHS[fmt]
    period = _scalar(h5, period_path, name)
    if period is None:
        return None
    if not (math.isfinite(period) and period > 0):
        raise DataError(f"{name}: {period_path} = {period} s; expected > 0 (or set dt)")
    step = period
    for path in (avg_path, stride_path):
        factor = _scalar(h5, path, name)
        if factor is not None:
            if not (math.isfinite(factor) and factor >= 1):
                raise DataError(f"{name}: {path} = {factor}; expected an integer >= 1")
            step *= factor
    return step


def _check_arguments(q, start_frame, end_frame, dt, q_tolerance, storage) -> None:
    if isinstance(q, bool) or not isinstance(q, int | float | np.number) or not q > 0:
        raise DataError(f"target q must be a number > 0 in 1/Å, got {q!r}")
    if not math.isfinite(q):
        raise DataError(f"target q must be finite, got {q!r}")
    if isinstance(q_tolerance, bool) or not isinstance(q_tolerance, int | float | np.number):
        raise DataError(f"q_tolerance must be a number (relative), got {q_tolerance!r}")
    if not (math.isfinite(q_tolerance) and q_tolerance >= 0):
        raise DataError(f"q_tolerance must be finite and >= 0 (relative), got {q_tolerance!r}")
    if storage not in STORAGES:
        raise DataError(f"storage must be one of {list(STORAGES)}, got {storage!r}")
    if not _is_int(start_frame) or start_frame < 1:
        raise DataError(f"start_frame must be an integer >= 1 (1-based), got {start_frame!r}")
    if not _is_int(end_frame) or not (end_frame == -1 or end_frame >= start_frame):
        raise DataError(
            f"end_frame must be -1 (the last frame) or a frame number >= start_frame "
            f"({start_frame}), got {end_frame!r}"
        )
    if dt is not None:
        if isinstance(dt, bool) or not isinstance(dt, int | float | np.number):
            raise DataError(f"dt must be a number of seconds, got {dt!r}")
        if not (math.isfinite(dt) and dt > 0):
            raise DataError(f"dt must be finite and > 0 s, got {dt!r}")


# ---------------------------------------------------------------- public API


def read_aps(
    path: str | os.PathLike[str],
    q: float,
    *,
    start_frame: int = 1,
    end_frame: int = -1,
    dt: float | None = None,
    q_tolerance: float = 0.1,
    storage: str = "upper",
) -> dict[str, Any]:
    """Read the q ring nearest ``q`` from an APS 8-ID-I two-time file.

    Args:
        path: the HDF5 result file (layout ``aps_u`` or ``aps_old``, detected).
        q: target wavevector in 1/Å.
        start_frame, end_frame: 1-based inclusive frame window; ``end_frame`` −1 = last.
        dt: C2 time step in s; read from the file when None.
        q_tolerance: accepted |q_selected - q| as a fraction of ``q``.
        storage: ``"upper"`` (triangle + zeros, as APS writes) or ``"full"``.

    Returns:
        dict with ``wavevector_q_list`` and ``phi_angles_list`` (n_phi,) float64 in 1/Å
        and deg (rows sorted by phi ascending), ``t1``/``t2`` (n,) float64 in s from 0,
        ``c2_exp`` (n_phi, n, n) symmetric in the file's float dtype, not
        diagonal-corrected, ``dt`` (s), ``format`` and ``source`` (a dict: ``path``,
        ``q_target``, ``q_selected``, ``q_available``, ``bin_labels``, ``datasets``,
        ``dt_source`` ("file"/"config"), ``n_frames_file``, ``start_frame``,
        ``end_frame``, ``n_frames``, ``storage``).

    Raises:
        DataError: for any problem with the arguments or the file.
    """
    _check_arguments(q, start_frame, end_frame, dt, q_tolerance, storage)
    q, q_tolerance = float(q), float(q_tolerance)
    p = Path(path)
    name = str(p)
    if not p.exists():
        raise DataError(f"data file not found: {name}")
    if not p.is_file():
        raise DataError(f"data path {name} is not a file; expected an APS HDF5 result file")
    try:
        is_hdf5 = h5py.is_hdf5(p)
    except OSError as exc:
        raise DataError(f"cannot read data file {name}: {exc}") from None
    if not is_hdf5:
        raise DataError(f"{name} is not an HDF5 file; expected an APS 8-ID-I result (.hdf/.h5)")
    try:
        with h5py.File(p, "r") as h5:
            fmt = _detect_format(h5, name)
            bins = _bins_aps_u(h5, name) if fmt == "aps_u" else _bins_aps_old(h5, name)
            q_sel, ring, available = _select_ring(bins, q, q_tolerance, name)
            n_file, dtype = _matrix_shape(h5, ring, name)
            s, e = _frame_window(n_file, start_frame, end_frame, name)
            c2 = np.empty((len(ring), e - s, e - s), dtype=dtype)
            for row, b in enumerate(ring):  # only the selected ring, only the window
                block = np.asarray(h5[b.dataset][s:e, s:e], dtype=dtype)
                c2[row] = _reconstruct(block, storage, f"{name}: {b.dataset}")
            if dt is None:
                step, dt_source = _file_dt(h5, fmt, name), "file"
                if step is None:
                    raise DataError(
                        f"{name}: no time step in the file ({DT_PATHS[fmt][0]} is missing); "
                        "set dt (s) in the config"
                    )
            else:
                step, dt_source = float(dt), "config"
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise DataError(f"{name}: cannot read HDF5 content: {exc}") from None
    n = e - s
    t = step * np.arange(n, dtype=np.float64)
    return {
        "wavevector_q_list": np.array([b.q for b in ring], dtype=np.float64),
        "phi_angles_list": np.array([b.phi for b in ring], dtype=np.float64),
        "t1": t,
        "t2": t.copy(),
        "c2_exp": c2,
        "dt": step,
        "format": fmt,
        "source": {
            "path": str(p.resolve()),
            "q_target": q,
            "q_tolerance": q_tolerance,
            "q_selected": q_sel,
            "q_available": available,
            "bin_labels": [b.label for b in ring],
            "datasets": [b.dataset for b in ring],
            "dt_source": dt_source,
            "n_frames_file": n_file,
            "start_frame": s + 1,
            "end_frame": e,
            "n_frames": n,
            "storage": storage,
        },
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_stage(
    data_path: str | os.PathLike[str],
    q: float,
    out_npz: str | os.PathLike[str],
    out_json: str | os.PathLike[str],
    *,
    start_frame: int = 1,
    end_frame: int = -1,
    dt: float | None = None,
    q_tolerance: float = 0.1,
    storage: str = "upper",
) -> XpcsData:
    """The ``load`` stage: :func:`read_aps`, then write ``out_npz`` and its JSON record.

    The record holds the source (absolute path, sha256, format), q target/selected, phi
    list, bin labels, dt and its source, frames, shapes and the stage duration in s.
    Nothing is written when reading fails; the NPZ is removed if the JSON cannot be.
    """
    started = time.perf_counter()
    out_npz, out_json = Path(out_npz), Path(out_json)
    if out_npz.resolve() == out_json.resolve():
        raise DataError(f"out_npz and out_json are the same path: {out_npz}")
    res = read_aps(
        data_path, q, start_frame=start_frame, end_frame=end_frame, dt=dt,
        q_tolerance=q_tolerance, storage=storage,
    )  # fmt: skip
    src = res["source"]
    data = XpcsData(
        wavevector_q_list=res["wavevector_q_list"],
        phi_angles_list=res["phi_angles_list"],
        t1=res["t1"],
        t2=res["t2"],
        c2_exp=res["c2_exp"],
        dt=res["dt"],
    )
    record = {
        "stage": "load",
        "generator": f"homodyne-steps {__version__}",
        "source": {
            "path": src["path"],
            "sha256": _sha256(Path(src["path"])),
            "format": res["format"],
            "datasets": src["datasets"],
        },
        "q": {
            "target": src["q_target"],
            "selected": src["q_selected"],
            "tolerance": src["q_tolerance"],
            "available": src["q_available"],
        },
        "phi_deg": data.phi_angles_list.tolist(),
        "bin_labels": src["bin_labels"],
        "dt_s": data.dt,
        "dt_source": src["dt_source"],
        "frames": {
            "start": src["start_frame"],
            "end": src["end_frame"],
            "n": src["n_frames"],
            "n_in_file": src["n_frames_file"],
        },
        "n_phi": data.n_phi,
        "storage": src["storage"],
        "diagonal_corrected": False,
        "shapes": {k: list(np.shape(getattr(data, k))) for k in ("c2_exp", "t1", "t2")},
        "c2_dtype": str(data.c2_exp.dtype),
        "outputs": {"npz": str(out_npz.resolve())},
    }
    data.to_npz(out_npz)
    try:
        record["duration_s"] = time.perf_counter() - started
        write_json(out_json, record)
    except BaseException:
        out_npz.unlink(missing_ok=True)
        raise
    return data
