"""The bins of an APS 8-ID-I two-time file and the q ring to read: layout detection,
bin ↔ matrix pairing and ring selection (the traps of ``shared/spec/hdf5-formats.md``
§6–§7; the rules are listed in :mod:`homodyne_steps.io.aps_reader`).

Every problem raises :class:`DataError` naming the file, the HDF5 path and what was
expected.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from homodyne_steps.errors import DataError
from homodyne_steps.io.serialise import finite_or_none

PHI_ATOL_DEG = 1e-9  # two bins of one ring closer than this in phi are the same angle

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
_C2_KEY = re.compile(r"c2_(\d+)")
_LEGACY_KEY = re.compile(r"(c2|g2)_(\d+)")


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
        "q": finite_or_none(q),
        "phi": finite_or_none(phi),
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
