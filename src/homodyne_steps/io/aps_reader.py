"""Read one q ring of an APS 8-ID-I two-time HDF5 file (what the load stage runs).

Why a reader of our own: the reference loader (homodyne ``XPCSDataLoader``) mislabels
bins of real files. It ignores ``dynamic_index_mapping`` (Q1), pairs legacy keys with
``dqlist`` by position only (Q2), mixes q rings (Q3), selects NaN q (Q4), never reads dt
(Q5), starts t at 0 whatever the first frame (Q6), doubles matrices stored in full (Q8)
and detects layouts by name only (Q12); see ``shared/spec/hdf5-formats.md`` §6–§7. This
reader:

* detects the layout by structure, checking group/dataset kinds and companions;
* ``aps_u``: ``c2_k`` belongs to ``processed_bins[k-1]``; compressed label ``c`` maps via
  ``/xpcs/qmap/dynamic_index_mapping[c-1]`` to the natural index ``q_idx * P + phi_idx``
  (``c - 1`` when the mapping is absent); ``map_names`` must be ``[q, phi]``; a ring is
  one ``q_idx`` (the file defines it exactly);
* ``aps_old``: members ``g2_NNNNN`` or ``c2_NNNNN`` (one prefix per file) belong to
  ``dqlist[0, NNNNN-1]`` when every suffix is a distinct label 1..B; otherwise, when there
  is one member per bin, to ``dqlist[0, k]`` by position (sorted by suffix: the reference
  package's fixtures number from 0); a ring is every bin within ``q_tolerance``
  (relative) of the bin nearest the target, because legacy bins of one ring differ in q
  by float noise (~1e-4 relative);
* bins whose q or phi is NaN/Inf are skipped and reported; two bins of the chosen ring
  with the same phi (different rings merged, or duplicate bins) are refused;
* accepts the ring when its mean q is within ``q_tolerance`` (relative) of the target,
  returns its phi bins with rows sorted by phi ascending, and reads only those matrices
  (only the requested frame window of each);
* rebuilds each matrix by its storage (``auto`` detects per matrix): a triangle ``T``
  (the other triangle exactly 0) becomes ``T + Tᵀ - diag(T)``; a full matrix must be
  symmetric within float32 rounding and is used as is;
* slices frames 1-based inclusive; the time axis is the frames' time since the first
  frame of the file, ``t = dt * (start_frame - 1 + arange(n))`` (``time_origin: file``),
  so trimming frames here or in the filter stage gives the same t; ``first_loaded``
  starts at 0 like the reference package;
* takes dt from the file (frame period × averaging × stride) unless one is given, and
  refuses a period without its averaging/stride factors unless told to assume 1.

``c2_exp`` keeps the file's floating dtype (float32 for real files; integer data becomes
float64) and is NOT diagonal-corrected: that is a later stage. Units: q in 1/Å, phi in
degrees, t and dt in s. Every input problem raises :class:`DataError` naming the file,
the HDF5 path and what was expected.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from homodyne_steps.errors import DataError
from homodyne_steps.io.aps_bins import (
    _Bin,
    _bins_aps_old,
    _bins_aps_u,
    _detect_format,
    _is_int,
    _node,
    _relative_spread,
    _scalar,
    _select_ring,
)

STORAGES = ("auto", "upper", "lower", "full")
MISSING_FACTOR_POLICIES = ("error", "assume_1")
TIME_ORIGINS = ("file", "first_loaded")
SYMMETRY_RTOL = 8 * float(np.finfo(np.float32).eps)  # "full" storage symmetry check

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
_LAYOUT_TEXT = {
    "upper": "stored as the upper triangle (all values below the diagonal are 0)",
    "lower": "stored as the lower triangle (all values above the diagonal are 0)",
    "full": "a full symmetric matrix (non-zero values in both triangles)",
}


# ---------------------------------------------------------------- matrices


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


def _layout(m: np.ndarray) -> str:
    """``upper``/``lower`` when the other strict triangle is exactly 0 (NaN is not), else
    ``full``; a matrix with both strict triangles 0 counts as ``upper``."""
    if not np.any(np.tril(m, -1) != 0):
        return "upper"
    if not np.any(np.triu(m, 1) != 0):
        return "lower"
    return "full"


def _is_symmetric(m: np.ndarray) -> bool:
    """C = Cᵀ within float32 rounding of the largest value (NaN pairs count as equal)."""
    finite = np.abs(m[np.isfinite(m)])
    scale = float(finite.max()) if finite.size else 0.0
    return bool(np.allclose(m, m.T, rtol=SYMMETRY_RTOL, atol=SYMMETRY_RTOL * scale, equal_nan=True))


def _fits(setting: str, m: np.ndarray) -> bool:
    if setting == "upper":
        return not np.any(np.tril(m, -1) != 0)
    if setting == "lower":
        return not np.any(np.triu(m, 1) != 0)
    return _is_symmetric(m)


def _storage_found(m: np.ndarray, setting: str, where: str) -> str:
    """How ``m`` is stored under ``setting``; DataError (with a setting that works) if not."""
    if setting != "auto" and _fits(setting, m):
        return setting
    kind = _layout(m)
    if kind == "full" and not _is_symmetric(m):
        # Why no suggestion: no storage value fits, and suggesting one that fails misleads.
        raise DataError(
            f"{where} has non-zero values in both triangles but is not symmetric within "
            "float32 rounding, so it is neither a stored triangle nor a full C2 matrix "
            f"(storage: {setting}); no storage setting fits: fix the file"
        )
    if setting == "auto":
        return kind
    raise DataError(
        f"{where} does not fit storage: {setting}; it is {_LAYOUT_TEXT[kind]}; "
        f"set storage: {kind} or auto"
    )


def _symmetrise(m: np.ndarray, found: str) -> np.ndarray:
    """Full matrix: a triangle T (other triangle 0) becomes T + Tᵀ - diag(T), exactly."""
    if found == "full":
        return m
    full = m + m.T
    np.fill_diagonal(full, np.diagonal(m))
    return full


# ---------------------------------------------------------------- dt and time


def _frame_factor(h5: h5py.File, path: str, name: str) -> int | None:
    """Frame averaging or stride at ``path`` (an integer >= 1); None when absent."""
    value = _scalar(h5, path, name)
    if value is None:
        return None
    if not (math.isfinite(value) and value >= 1 and value == round(value)):
        raise DataError(f"{name}: {path} = {value}; expected an integer >= 1")
    return int(value)


def _file_dt(h5: h5py.File, fmt: str, name: str, missing_factors: str) -> tuple[float, dict]:
    """C2 step in s from the file (period × avg × stride) and where each factor came from."""
    period_path, avg_path, stride_path = DT_PATHS[fmt]
    period = _scalar(h5, period_path, name)
    if period is None:
        raise DataError(
            f"{name}: no time step in the file ({period_path} is missing); set dt (s) in the "
            "dataset entry"
        )
    if not (math.isfinite(period) and period > 0):
        raise DataError(f"{name}: {period_path} = {period} s; expected > 0 (or set dt)")
    avg, stride = _frame_factor(h5, avg_path, name), _frame_factor(h5, stride_path, name)
    missing = [p for p, v in ((avg_path, avg), (stride_path, stride)) if v is None]
    if missing and missing_factors != "assume_1":
        # Why refuse: the step is period × avg × stride; guessing 1 silently scales time.
        raise DataError(
            f"{name}: found the frame period {period_path} = {period:g} s but "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing, so the "
            "C2 time step (period × averaging × stride) is unknown; set dt (s) in the "
            "dataset entry, or set missing_frame_factors: assume_1 to take the missing "
            "factor as 1"
        )
    avg, stride = avg or 1, stride or 1
    source = {
        "kind": "file",
        "period_path": period_path,
        "period_s": period,
        "avg": avg,
        "avg_path": avg_path,
        "stride": stride,
        "stride_path": stride_path,
        "assumed_1": missing,
    }
    return period * avg * stride, source


def _time_axis(step: float, first_index: int, n: int, origin: str) -> np.ndarray:
    """Times in s of loaded frames ``first_index..first_index+n-1`` (0-based in the file).

    ``file``: since the file's first frame, so a window gives the same t as trimming later;
    ``first_loaded``: from 0 at the first loaded frame (the reference package).
    """
    offset = first_index if origin == "file" else 0
    return step * (offset + np.arange(n, dtype=np.float64))


# ---------------------------------------------------------------- arguments


def _choice(value: Any, allowed: tuple[str, ...], key: str) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise DataError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _check_arguments(
    q, start_frame, end_frame, dt, q_tolerance, storage, missing_frame_factors, time_origin
) -> None:
    if isinstance(q, bool) or not isinstance(q, int | float | np.number) or not q > 0:
        raise DataError(f"target q must be a number > 0 in 1/Å, got {q!r}")
    if not math.isfinite(q):
        raise DataError(f"target q must be finite, got {q!r}")
    if isinstance(q_tolerance, bool) or not isinstance(q_tolerance, int | float | np.number):
        raise DataError(f"q_tolerance must be a number (relative), got {q_tolerance!r}")
    if not (math.isfinite(q_tolerance) and q_tolerance >= 0):
        raise DataError(f"q_tolerance must be finite and >= 0 (relative), got {q_tolerance!r}")
    _choice(storage, STORAGES, "storage")
    _choice(missing_frame_factors, MISSING_FACTOR_POLICIES, "missing_frame_factors")
    _choice(time_origin, TIME_ORIGINS, "time_origin")
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


def _open_checked(path: str | os.PathLike[str]) -> Path:
    """The path of an existing HDF5 file (DataError otherwise)."""
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
    return p


def read_aps(
    path: str | os.PathLike[str],
    q: float,
    *,
    start_frame: int = 1,
    end_frame: int = -1,
    dt: float | None = None,
    q_tolerance: float = 0.1,
    storage: str = "auto",
    missing_frame_factors: str = "error",
    time_origin: str = "file",
) -> dict[str, Any]:
    """Read the q ring nearest ``q`` from an APS 8-ID-I two-time file.

    Args:
        path: the HDF5 result file (layout ``aps_u`` or ``aps_old``, detected).
        q: target wavevector in 1/Å.
        start_frame, end_frame: 1-based inclusive frame window; ``end_frame`` −1 = last.
        dt: C2 time step in s; read from the file when None.
        q_tolerance: relative; accepted |q_selected - q| / q, and for legacy files the
            width of a ring around the bin nearest ``q``.
        storage: ``"auto"`` (detected per matrix), ``"upper"`` (triangle + zeros, as APS
            writes), ``"lower"`` or ``"full"`` (symmetric).
        missing_frame_factors: ``"error"`` or ``"assume_1"``: what to do when the file has
            a frame period but not its averaging or stride factor (and ``dt`` is None).
        time_origin: ``"file"`` (t = 0 at the file's first frame) or ``"first_loaded"``
            (t = 0 at ``start_frame``, the reference package's convention).

    Returns:
        dict with ``wavevector_q_list`` and ``phi_angles_list`` (n_phi,) float64 in 1/Å
        and deg (rows sorted by phi ascending), ``t1``/``t2`` (n,) float64 in s,
        ``c2_exp`` (n_phi, n, n) symmetric in the file's float dtype, not
        diagonal-corrected, ``dt`` (s), ``format`` and ``source`` (how the ring was
        read: :func:`_source`).

    Raises:
        DataError: for any problem with the arguments or the file.
    """
    _check_arguments(
        q, start_frame, end_frame, dt, q_tolerance, storage, missing_frame_factors, time_origin
    )
    q, q_tolerance = float(q), float(q_tolerance)
    p = _open_checked(path)
    name = str(p)
    try:
        with h5py.File(p, "r") as h5:
            fmt = _detect_format(h5, name)
            found_bins = _bins_aps_u(h5, name) if fmt == "aps_u" else _bins_aps_old(h5, name)
            ring_rule = "q_index" if fmt == "aps_u" else "dqspan"
            ring = _select_ring(found_bins.bins, q, q_tolerance, name, ring_rule)
            n_file, dtype = _matrix_shape(h5, ring.members, name)
            s, e = _frame_window(n_file, start_frame, end_frame, name)
            c2, layouts = _read_ring(h5, ring.members, s, e, dtype, storage, name)
            if dt is None:
                step, dt_source = _file_dt(h5, fmt, name, missing_frame_factors)
            else:
                step, dt_source = float(dt), {"kind": "config"}
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise DataError(f"{name}: cannot read HDF5 content: {exc}") from None
    n = e - s
    t = _time_axis(step, s, n, time_origin)
    member_q = [b.q for b in ring.members]
    source = _source(p, q, q_tolerance, ring, found_bins, dt_source, time_origin, t)
    source.update(n_frames_file=n_file, start_frame=s + 1, end_frame=e, n_frames=n,
                  storage={"setting": storage, "found": layouts})  # fmt: skip
    return {
        "wavevector_q_list": np.array(member_q, dtype=np.float64),
        "phi_angles_list": np.array([b.phi for b in ring.members], dtype=np.float64),
        "t1": t,
        "t2": t.copy(),
        "c2_exp": c2,
        "dt": step,
        "format": fmt,
        "source": source,
    }


def _source(
    p: Path, q: float, q_tolerance: float, ring, found_bins, dt_source: dict, time_origin: str,
    t: np.ndarray,
) -> dict[str, Any]:  # fmt: skip
    """How the ring was read (``read_aps``'s ``source``; ``loaded.json`` records it): the
    file, the q target/tolerance/selected/available/members and their spread, how the
    ring was grouped, bin labels and datasets, how matrices were paired with bins,
    skipped bins, where dt came from (``kind`` "file" or "config"), the time origin and
    first time. ``read_aps`` adds the frames and the storage found per row."""
    member_q = [b.q for b in ring.members]
    return {
        "path": str(p.resolve()),
        "q_target": q,
        "q_tolerance": q_tolerance,
        "q_selected": ring.q,
        "q_available": ring.available,
        "q_members": member_q,
        "q_relative_spread": _relative_spread(member_q, ring.q),
        "ring_grouping": ring.grouping,
        "bin_labels": [b.label for b in ring.members],
        "datasets": [b.dataset for b in ring.members],
        "bin_mapping": found_bins.bin_mapping,
        "member_prefix": found_bins.member_prefix,
        "skipped_bins": found_bins.skipped,
        "dt_source": dt_source,
        "time_origin": time_origin,
        "t_first_s": float(t[0]),
    }


def _read_ring(
    h5: h5py.File, members: list[_Bin], s: int, e: int, dtype: np.dtype, storage: str, name: str
) -> tuple[np.ndarray, list[str]]:
    """The ring's symmetric matrices, frames [s, e) only, and the storage found for each."""
    c2 = np.empty((len(members), e - s, e - s), dtype=dtype)
    layouts = []
    for row, b in enumerate(members):  # only the selected ring, only the window
        block = np.asarray(h5[b.dataset][s:e, s:e], dtype=dtype)
        layouts.append(_storage_found(block, storage, f"{name}: {b.dataset}"))
        c2[row] = _symmetrise(block, layouts[-1])
    return c2, layouts
