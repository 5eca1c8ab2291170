"""The filter stage: choose which angle bins and frames go into the analysis.

Every exclusion is recorded with its reason, so a user can see why an angle is missing
from the fit. Selections:

- ``phi_ranges``: list of ``[min, max]`` in degrees; an angle is kept if it lies in any
  range. ``min > max`` wraps across ±180° (``[170, -170]`` keeps 170…180 and −180…−170).
  Angles are compared modulo 360°.
- ``q_range``: ``[min, max]`` in 1/Å on the bins' q.
- ``frames``: ``{start, end}``, 1-based inclusive, *relative to the loaded window*
  (``end: -1`` = last). Trims, e.g., an early transient without re-reading the file.
  Times keep their values (no re-basing to 0): D(t) and γ̇(t) depend on absolute time.
- ``exclude_t0``: drop the frame at t = 0 (on by default, as the reference CLI does):
  the power laws of D(t) and γ̇(t) are singular there for negative exponents. Only a
  frame whose t is 0 is dropped (t1 < dt/2), never "the first kept frame".

Time convention (one axis for the whole package): t is a frame's time since the first
frame of the *file*, t = dt · (frame − 1) with 1-based file frames; the load stage
builds it so (``time_origin: file``, its default). Frames 11–60 chosen in load
(``frames``) or here (on the whole file) therefore give identical t1/t2 and c2, and
only file frame 1 sits at t = 0. Under load's ``time_origin: first_loaded`` (the
reference package's convention, for comparisons) t = 0 is the first loaded frame, so
``exclude_t0`` drops that frame instead.
- ``quality``: optionally drop angles whose first-lag contrast (mean of the first
  off-diagonal band minus the long-lag baseline; the diagonal carries shot noise) is
  below ``min_contrast``, or with more than ``max_nonfinite_fraction`` NaN/Inf entries.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from homodyne_steps.errors import ConfigError
from homodyne_steps.io.data_files import FilterDrop, FilterKept, FilterReport
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.settings import check_keys, get_bool, get_number

MIN_FRAMES = 3


@dataclass(frozen=True)
class QualityFilter:
    enabled: bool = False
    min_contrast: float = 0.01
    max_nonfinite_fraction: float = 0.0


@dataclass(frozen=True)
class FilterSettings:
    phi_ranges: tuple[tuple[float, float], ...] | None = None
    q_range: tuple[float, float] | None = None
    frame_start: int = 1
    frame_end: int = -1
    exclude_t0: bool = True
    quality: QualityFilter = field(default_factory=QualityFilter)

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None, where: str = "filter") -> FilterSettings:
        m = dict(m or {})
        check_keys(m, {"phi_ranges", "q_range", "frames", "exclude_t0", "quality"}, where)
        phi_ranges = None
        if m.get("phi_ranges") is not None:
            raw = m["phi_ranges"]
            if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
                raise ConfigError(
                    f"{where}.phi_ranges: expected a non-empty list of [min, max] pairs in "
                    f"degrees, got {raw!r}"
                )
            phi_ranges = tuple(_pair(r, f"{where}.phi_ranges[{k}]") for k, r in enumerate(raw))
        q_range = None
        if m.get("q_range") is not None:
            q_range = _pair(m["q_range"], f"{where}.q_range")
            if q_range[0] > q_range[1]:
                raise ConfigError(f"{where}.q_range: min {q_range[0]} is above max {q_range[1]}")
        frames = dict(m.get("frames") or {})
        check_keys(frames, {"start", "end"}, f"{where}.frames")
        start = _int(frames.get("start", 1), f"{where}.frames.start")
        end = _int(frames.get("end", -1), f"{where}.frames.end")
        if start < 1:
            raise ConfigError(f"{where}.frames.start: must be >= 1 (1-based), got {start}")
        if end == 0 or end < -1:  # −5 once meant "the last frame", silently
            raise ConfigError(
                f"{where}.frames.end: {end}; expected -1 (the last frame) or a frame number "
                f">= start ({start})"
            )
        if end >= 0 and start > end:
            raise ConfigError(f"{where}.frames: start {start} is after end {end}")
        q = dict(m.get("quality") or {})
        check_keys(q, {"enabled", "min_contrast", "max_nonfinite_fraction"}, f"{where}.quality")
        quality = QualityFilter(
            enabled=get_bool(q, "enabled", False, f"{where}.quality"),
            min_contrast=get_number(q, "min_contrast", 0.01, f"{where}.quality", minimum=0.0),
            max_nonfinite_fraction=get_number(
                q, "max_nonfinite_fraction", 0.0, f"{where}.quality", minimum=0.0, maximum=1.0
            ),
        )
        return cls(
            phi_ranges=phi_ranges,
            q_range=q_range,
            frame_start=start,
            frame_end=end,
            exclude_t0=get_bool(m, "exclude_t0", True, where),
            quality=quality,
        )

    def to_mapping(self) -> dict[str, Any]:
        return {
            "phi_ranges": None if self.phi_ranges is None else [list(r) for r in self.phi_ranges],
            "q_range": None if self.q_range is None else list(self.q_range),
            "frames": {"start": self.frame_start, "end": self.frame_end},
            "exclude_t0": self.exclude_t0,
            "quality": asdict(self.quality),
        }


def _pair(value: object, where: str) -> tuple[float, float]:
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        or not all(math.isfinite(v) for v in value)
    ):
        raise ConfigError(f"{where}: expected [min, max] (two finite numbers), got {value!r}")
    return float(value[0]), float(value[1])


def _int(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return value


def wrap_deg(phi: np.ndarray) -> np.ndarray:
    """Angles mapped to [-180, 180)."""
    return (np.asarray(phi, dtype=np.float64) + 180.0) % 360.0 - 180.0


def in_phi_ranges(phi_deg: np.ndarray, ranges: Sequence[tuple[float, float]]) -> np.ndarray:
    """Boolean mask: angle lies in any [min, max] range (min > max wraps across ±180°)."""
    phi = wrap_deg(phi_deg)
    keep = np.zeros(phi.shape, dtype=bool)
    for lo, hi in ranges:
        if abs(hi - lo) >= 360.0:
            return np.ones(phi.shape, dtype=bool)
        lo_w, hi_w = wrap_deg(lo), wrap_deg(hi)
        if lo <= hi and lo_w <= hi_w:
            keep |= (phi >= lo_w) & (phi <= hi_w)
        else:  # the range crosses ±180° (given wrapped, or wrapping after normalisation)
            keep |= (phi >= lo_w) | (phi <= hi_w)
    return keep


def first_lag_contrast(c2: np.ndarray) -> float:
    """Mean of the first off-diagonal band minus the long-lag baseline (last 20 % of lags)."""
    n = c2.shape[0]
    band1 = np.nanmean(np.diagonal(c2, 1))
    lags = range(max(1, int(0.8 * n)), n)
    baseline = np.nanmedian(np.concatenate([np.diagonal(c2, k) for k in lags]))
    return float(band1 - baseline)


@dataclass
class _Drops:
    """The angles kept so far and the record of every drop, in the order they happen."""

    data: XpcsData
    keep: np.ndarray
    dropped: list[FilterDrop] = field(default_factory=list)

    def angles(self, mask: np.ndarray, reason: str) -> None:
        """Drop the kept angles where ``mask`` is False, recording ``reason``."""
        for k in np.flatnonzero(self.keep & ~mask):
            self.dropped.append(
                FilterDrop(
                    kind="angle",
                    index=int(k),
                    phi_deg=float(self.data.phi_angles_list[k]),
                    q=float(self.data.wavevector_q_list[k]),
                    reason=reason,
                )
            )
        self.keep &= mask


def apply_filter(data: XpcsData, s: FilterSettings) -> tuple[XpcsData, dict[str, Any]]:
    """Apply the selections; return the kept data and the record of what was kept and
    dropped (the report's ``kept``, ``dropped``, ``input_shape`` and ``output_shape``,
    as written)."""
    out, record = _apply(data, s)
    dropped = [d.to_json() for d in record["dropped"]]
    return out, {**record, "kept": record["kept"].to_json(), "dropped": dropped}


def _apply(data: XpcsData, s: FilterSettings) -> tuple[XpcsData, dict[str, Any]]:
    """:func:`apply_filter` with the report's fields as records (:class:`FilterReport`)."""
    drops = _Drops(data, np.ones(data.n_phi, dtype=bool))
    _select_angles(drops, s)
    idx = _select_frames(drops, s)
    c2 = data.c2_exp[:, idx[:, None], idx[None, :]]
    if s.quality.enabled:
        _select_by_quality(drops, c2, s.quality)
    keep = drops.keep
    out = XpcsData(
        wavevector_q_list=data.wavevector_q_list[keep],
        phi_angles_list=data.phi_angles_list[keep],
        t1=data.t1[idx],
        t2=data.t2[idx],
        c2_exp=c2[keep],
        dt=data.dt,
    )
    record = {
        "kept": FilterKept(
            phi_deg=out.phi_angles_list.tolist(),
            q=out.wavevector_q_list.tolist(),
            n_frames=out.n_t,
            t_first_s=float(out.t1[0]),
            t_last_s=float(out.t1[-1]),
        ),
        "dropped": drops.dropped,
        "input_shape": list(data.c2_exp.shape),
        "output_shape": list(out.c2_exp.shape),
    }
    return out, record


def _select_angles(drops: _Drops, s: FilterSettings) -> None:
    """``phi_ranges`` and ``q_range``; each must leave at least one angle."""
    data = drops.data
    if s.phi_ranges is not None:
        drops.angles(
            in_phi_ranges(data.phi_angles_list, s.phi_ranges),
            f"outside filter.phi_ranges {[list(r) for r in s.phi_ranges]}",
        )
        _require_any(drops.keep, "filter.phi_ranges", data)
    if s.q_range is not None:
        q = data.wavevector_q_list
        drops.angles(
            (q >= s.q_range[0]) & (q <= s.q_range[1]), f"q outside filter.q_range {list(s.q_range)}"
        )
        _require_any(drops.keep, "filter.q_range", data)


def _select_frames(drops: _Drops, s: FilterSettings) -> np.ndarray:
    """Indices of the kept frames: the relative trim first, then the t = 0 frame."""
    data = drops.data
    n_t = data.n_t
    end = n_t if s.frame_end == -1 else s.frame_end
    if end > n_t:
        raise ConfigError(f"filter.frames.end = {s.frame_end} is beyond the {n_t} loaded frames")
    frame_keep = np.zeros(n_t, dtype=bool)
    frame_keep[s.frame_start - 1 : end] = True
    if not frame_keep.all():
        drops.dropped.append(
            FilterDrop(
                kind="frames",
                count=int(n_t - frame_keep.sum()),
                reason=f"outside filter.frames [{s.frame_start}, {s.frame_end}] "
                "(1-based, relative to the loaded window)",
            )
        )
    if s.exclude_t0:
        at_zero = frame_keep & (data.t1 < 0.5 * data.dt)
        if at_zero.any():
            frame_keep &= ~at_zero
            drops.dropped.append(
                FilterDrop(
                    kind="frames",
                    count=int(at_zero.sum()),
                    reason="t = 0 excluded (filter.exclude_t0): power laws are singular there",
                )
            )
    if frame_keep.sum() < MIN_FRAMES:
        raise ConfigError(
            f"filter.frames/exclude_t0 leave {int(frame_keep.sum())} frames; at least "
            f"{MIN_FRAMES} are needed"
        )
    return np.flatnonzero(frame_keep)


def _select_by_quality(drops: _Drops, c2: np.ndarray, q: QualityFilter) -> None:
    """The optional quality filter: non-finite fraction, then first-lag contrast."""
    contrast = np.array([first_lag_contrast(m) for m in c2])
    nonfinite = np.array([1.0 - np.isfinite(m).mean() for m in c2])
    drops.angles(nonfinite <= q.max_nonfinite_fraction,
                 f"non-finite fraction above {q.max_nonfinite_fraction}")  # fmt: skip
    ok_contrast = ~(contrast < q.min_contrast)  # NaN contrast counts as failing
    ok_contrast &= np.isfinite(contrast)
    drops.angles(ok_contrast, f"first-lag contrast below {q.min_contrast}")
    _require_any(drops.keep, "filter.quality", drops.data)


def _require_any(keep: np.ndarray, name: str, data: XpcsData) -> None:
    if not keep.any():
        raise ConfigError(
            f"{name} removes every angle bin; available phi (deg): "
            f"{np.round(data.phi_angles_list, 3).tolist()}, q (1/Å): "
            f"{np.unique(np.round(data.wavevector_q_list, 6)).tolist()}"
        )


def filter_stage(
    in_npz: str | os.PathLike[str],
    out_npz: str | os.PathLike[str],
    out_json: str | os.PathLike[str],
    settings: FilterSettings,
) -> XpcsData:
    """Read loaded data, filter it, write ``filtered.npz`` and its report (atomically)."""
    start = time.perf_counter()
    data = XpcsData.from_npz(in_npz)
    out, record = _apply(data, settings)
    out.to_npz(out_npz)
    FilterReport(
        schema_version=1,
        stage="filter",
        input=os.fspath(in_npz),
        settings=settings.to_mapping(),
        **record,
        duration_ms=1e3 * (time.perf_counter() - start),
    ).write(out_json)
    return out
