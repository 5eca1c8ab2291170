"""Load stage: read one q ring of an APS 8-ID-I two-time HDF5 file.

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

import hashlib
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from homodyne_steps import __version__
from homodyne_steps.dataset import XpcsData
from homodyne_steps.errors import DataError
from homodyne_steps.serialise import write_json

STORAGES = ("auto", "upper", "lower", "full")
MISSING_FACTOR_POLICIES = ("error", "assume_1")
TIME_ORIGINS = ("file", "first_loaded")
PHI_ATOL_DEG = 1e-9  # two bins of one ring closer than this in phi are the same angle
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
_LEGACY_KEY = re.compile(r"(c2|g2)_(\d+)")
_LAYOUT_TEXT = {
    "upper": "stored as the upper triangle (all values below the diagonal are 0)",
    "lower": "stored as the lower triangle (all values above the diagonal are 0)",
    "full": "a full symmetric matrix (non-zero values in both triangles)",
}


@dataclass(frozen=True)
class _Bin:
    """One (q, phi) bin that has a C2 matrix in the file."""

    q: float  # 1/Å
    phi: float  # deg
    label: int  # aps_u: compressed label; aps_old: 1-based natural label
    dataset: str  # HDF5 path of its matrix
    ring: int | None = None  # aps_u: index into dynamic_v_list_dim0 (exact ring identity)


@dataclass(frozen=True)
class _Bins:
    """The bins of a file with a matrix, and how the matrices were paired with them."""

    bins: list[_Bin]
    bin_mapping: str  # the pairing rule used (recorded in loaded.json)
    member_prefix: str  # "c2" or "g2"
    skipped: list[dict[str, Any]] = field(default_factory=list)  # non-finite q or phi


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


def _finite_or_none(x: float) -> float | None:
    """JSON has no NaN: a non-finite value is written as null."""
    return x if math.isfinite(x) else None


def _non_finite_reason(q: float, phi: float) -> str | None:
    """Why a bin cannot be used ("q is NaN", "phi is infinite", ...); None if it can."""
    bad = [
        f"{what} is {'NaN' if math.isnan(v) else 'infinite'}"
        for what, v in (("q", q), ("phi", phi))
        if not math.isfinite(v)
    ]
    return " and ".join(bad) or None


def _skipped(label: int, dataset: str, q: float, phi: float, reason: str) -> dict[str, Any]:
    return {
        "label": label,
        "dataset": dataset,
        "q": _finite_or_none(q),
        "phi": _finite_or_none(phi),
        "reason": reason,
    }


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


def _bins_aps_u(h5: h5py.File, name: str) -> _Bins:
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
    bins, skipped, seen = [], [], {}
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
        dataset = f"/xpcs/twotime/correlation_map/{keyed[k]}"
        reason = _non_finite_reason(q_val, phi_val)
        if reason:
            skipped.append(_skipped(label, dataset, q_val, phi_val, reason))
        else:
            bins.append(_Bin(q_val, phi_val, label, dataset, ring=idx // n_p))
    rule = "dynamic_index_mapping" if mapping is not None else "label_minus_1"
    return _Bins(bins, rule, "c2", skipped)


def _legacy_members(group: h5py.Group, name: str) -> tuple[str, list[tuple[int, str]]]:
    """(prefix, [(suffix, key)] sorted by suffix) of the c2_/g2_ members of C2T_all."""
    by_prefix: dict[str, list[tuple[int, str]]] = {}
    for key in group:
        m = _LEGACY_KEY.fullmatch(key)
        if m:
            by_prefix.setdefault(m.group(1), []).append((int(m.group(2)), key))
    if not by_prefix:
        raise DataError(f"{name}: /exchange/C2T_all holds no g2_NNNNN or c2_NNNNN datasets")
    if len(by_prefix) > 1:
        examples = "; ".join(
            f"{p}_NNNNN ({', '.join(k for _, k in sorted(members)[:3])})"
            for p, members in sorted(by_prefix.items())
        )
        raise DataError(
            f"{name}: /exchange/C2T_all mixes two naming schemes: {examples}; expected one "
            "prefix, so the members cannot be paired with /xpcs/dqlist unambiguously"
        )
    prefix, members = next(iter(by_prefix.items()))
    members.sort()
    for (s0, k0), (s1, k1) in zip(members, members[1:], strict=False):
        if s0 == s1:
            raise DataError(
                f"{name}: /exchange/C2T_all/{k0} and {k1} carry the same number {s0}; "
                "expected one dataset per bin"
            )
    return prefix, members


def _pair_legacy(
    members: list[tuple[int, str]], n_bins: int, name: str
) -> tuple[list[tuple[int, str]], str]:
    """[(1-based label, key)] and the rule: by suffix if all are labels 1..B, else by position.

    Why two rules: xpcs-eigen names a member by its bin label (members may be a subset),
    the reference package's fixtures number 0..B-1 and it pairs by position.
    """
    outside = [(s, k) for s, k in members if not 1 <= s <= n_bins]
    if not outside:
        return members, "suffix"
    if len(members) == n_bins:
        return [(pos + 1, key) for pos, (_, key) in enumerate(members)], "position"
    shown = ", ".join(f"{k} (number {s})" for s, k in outside[:3])
    raise DataError(
        f"{name}: cannot pair the {len(members)} datasets of /exchange/C2T_all with the "
        f"{n_bins} bins of /xpcs/dqlist: by suffix, {shown} {'is' if len(outside) == 1 else 'are'} "
        f"outside the bin labels 1..{n_bins}; by position, {len(members)} datasets for "
        f"{n_bins} bins (pairing by position needs exactly one dataset per bin)"
    )


def _bins_aps_old(h5: h5py.File, name: str) -> _Bins:
    """Bins of a legacy file: members paired with dqlist/dphilist; NaN bins skipped."""
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
    prefix, members = _legacy_members(h5["/exchange/C2T_all"], name)
    pairs, rule = _pair_legacy(members, dq.shape[1], name)
    edges = _q_edges(h5, dq[0], name)
    bins, skipped = [], []
    for label, key in pairs:
        q_val, phi_val = float(dq[0, label - 1]), float(dphi[0, label - 1])
        dataset = f"/exchange/C2T_all/{key}"
        reason = _non_finite_reason(q_val, phi_val)
        if reason:
            skipped.append(_skipped(label, dataset, q_val, phi_val, reason))
        else:
            ring = None if edges is None else _ring_index(edges, q_val)
            bins.append(_Bin(q_val, phi_val, label, dataset, ring))
    return _Bins(bins, rule, prefix, skipped)


DQSPAN = "/xpcs/dqspan"


def _ring_index(edges: np.ndarray, q: float) -> int:
    """Index of the [edge_k, edge_k+1) interval holding q (the last one closed)."""
    return int(min(np.searchsorted(edges, q, side="right") - 1, edges.size - 2))


def _q_edges(h5: h5py.File, dq: np.ndarray, name: str) -> np.ndarray | None:
    """The legacy q-bin edges ``/xpcs/dqspan`` when they partition every finite bin q.

    They define a ring exactly, as dynamic_v_list_dim0's index does in APS-U files, so
    bins of one ring whose mean q differs (each angle's pixels average to their own q)
    stay together however close neighbouring rings are. Files without usable edges fall
    back to grouping by q_tolerance.
    """
    if _node(h5, DQSPAN) is None:
        return None
    edges = _numbers(h5, DQSPAN, name).reshape(-1)
    finite_q = dq[np.isfinite(dq)]
    if (
        edges.size < 2
        or not np.all(np.isfinite(edges))
        or not np.all(np.diff(edges) > 0)
        or (finite_q.size and (finite_q.min() < edges[0] or finite_q.max() > edges[-1]))
    ):
        return None
    return edges


# ---------------------------------------------------------------- the q ring


@dataclass(frozen=True)
class _Ring:
    q: float  # mean q of the members, 1/Å
    members: list[_Bin]  # sorted by phi ascending
    grouping: str  # "q_index" (aps_u), "dqspan" (aps_old with q edges) or "q_tolerance"
    available: list[float]  # every distinct finite q with a matrix, 1/Å


def _describe(b: _Bin) -> str:
    return f"bin {b.label} ({b.dataset}, q = {b.q:.9g} 1/Å, phi = {b.phi:.9g} deg)"


def _same_phi_pair(members: list[_Bin]) -> tuple[_Bin, _Bin] | None:
    """Two members with the same angle (modulo 360°, within PHI_ATOL_DEG), or None."""
    phi = np.array([b.phi for b in members])
    diff = np.abs((phi[:, None] - phi[None, :] + 180.0) % 360.0 - 180.0)
    i, j = np.triu_indices(phi.size, 1)
    hits = np.flatnonzero(diff[i, j] <= PHI_ATOL_DEG)
    if hits.size == 0:
        return None
    return members[int(i[hits[0]])], members[int(j[hits[0]])]


def _select_ring(
    bins: list[_Bin], q: float, q_tolerance: float, name: str, ring_rule: str = "q_index"
) -> _Ring:
    """The ring of the bin nearest ``q``: by the file's q partition (aps_u; aps_old with
    ``/xpcs/dqspan``), else the bins within ``q_tolerance`` of its q."""
    if not bins:
        raise DataError(f"{name}: no bin with a C2 matrix has a finite q and phi")
    qs = np.array([b.q for b in bins])
    available = np.unique(qs).tolist()
    nearest = bins[int(np.argmin(np.abs(qs - q)))]
    if nearest.ring is not None:
        members = [b for b in bins if b.ring == nearest.ring]
        grouping = ring_rule
    else:
        limit = q_tolerance * abs(nearest.q)
        members = [b for b in bins if abs(b.q - nearest.q) <= limit]
        grouping = "q_tolerance"
    members.sort(key=lambda b: (b.phi, b.label))
    pair = _same_phi_pair(members)
    if pair is not None:
        fix = (
            f"lower q_tolerance (now {q_tolerance:g}, relative) or fix the file"
            if grouping == "q_tolerance"
            else "fix the file"
        )
        raise DataError(
            f"{name}: {_describe(pair[0])} and {_describe(pair[1])} fall in the same q ring "
            f"but have the same phi: they are different q rings or duplicate bins; {fix}"
        )
    q_sel = float(np.mean([b.q for b in members]))
    if not abs(q_sel - q) <= q_tolerance * q:
        shown = ", ".join(f"{v:.6g}" for v in available)
        raise DataError(
            f"{name}: no q ring within {q_tolerance:g} (relative) of the target q = {q:.6g} "
            f"1/Å; nearest is {q_sel:.6g}; available q (1/Å): [{shown}]"
        )
    return _Ring(q_sel, members, grouping, available)


def _relative_spread(qs: list[float], q_ring: float) -> float | None:
    """(max - min) / ring q of the members' q; None for a ring at q = 0 (no scale)."""
    return (max(qs) - min(qs)) / abs(q_ring) if q_ring else None


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
        diagonal-corrected, ``dt`` (s), ``format`` and ``source`` (a dict: ``path``,
        ``q_target``, ``q_tolerance``, ``q_selected``, ``q_available``, ``q_members``,
        ``q_relative_spread``, ``ring_grouping``, ``bin_labels``, ``datasets``,
        ``bin_mapping``, ``member_prefix``, ``skipped_bins``, ``dt_source`` (a dict,
        ``kind`` "file" or "config"), ``time_origin``, ``t_first_s``,
        ``n_frames_file``, ``start_frame``, ``end_frame``, ``n_frames`` and ``storage``
        ({``setting``, ``found``: one layout per row})).

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
            c2 = np.empty((len(ring.members), e - s, e - s), dtype=dtype)
            layouts = []
            for row, b in enumerate(ring.members):  # only the selected ring, only the window
                block = np.asarray(h5[b.dataset][s:e, s:e], dtype=dtype)
                layouts.append(_storage_found(block, storage, f"{name}: {b.dataset}"))
                c2[row] = _symmetrise(block, layouts[-1])
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
    return {
        "wavevector_q_list": np.array(member_q, dtype=np.float64),
        "phi_angles_list": np.array([b.phi for b in ring.members], dtype=np.float64),
        "t1": t,
        "t2": t.copy(),
        "c2_exp": c2,
        "dt": step,
        "format": fmt,
        "source": {
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
            "n_frames_file": n_file,
            "start_frame": s + 1,
            "end_frame": e,
            "n_frames": n,
            "storage": {"setting": storage, "found": layouts},
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
    storage: str = "auto",
    missing_frame_factors: str = "error",
    time_origin: str = "file",
) -> XpcsData:
    """The ``load`` stage: :func:`read_aps`, then write ``out_npz`` and its JSON record.

    The record holds the source (absolute path, sha256, format, how matrices were paired
    with bins), q target/selected/members, phi list, bin labels, skipped bins, dt and
    where it came from, the time origin, frames, storage found, shapes and the stage
    duration in s. Nothing is written when reading fails; the NPZ is removed if the JSON
    cannot be.
    """
    started = time.perf_counter()
    out_npz, out_json = Path(out_npz), Path(out_json)
    if out_npz.resolve() == out_json.resolve():
        raise DataError(f"out_npz and out_json are the same path: {out_npz}")
    res = read_aps(
        data_path, q, start_frame=start_frame, end_frame=end_frame, dt=dt,
        q_tolerance=q_tolerance, storage=storage,
        missing_frame_factors=missing_frame_factors, time_origin=time_origin,
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
            "bin_mapping": src["bin_mapping"],
            "member_prefix": src["member_prefix"],
        },
        "q": {
            "target": src["q_target"],
            "selected": src["q_selected"],
            "tolerance": src["q_tolerance"],
            "available": src["q_available"],
            "members": src["q_members"],
            "relative_spread": src["q_relative_spread"],
            "grouping": src["ring_grouping"],
        },
        "phi_deg": data.phi_angles_list.tolist(),
        "bin_labels": src["bin_labels"],
        "skipped_bins": src["skipped_bins"],
        "dt_s": data.dt,
        "dt_source": src["dt_source"],
        "time_origin": src["time_origin"],
        "t_first_s": src["t_first_s"],
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
