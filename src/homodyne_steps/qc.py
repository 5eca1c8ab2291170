"""Quality control of two-time correlation data c2(phi, t1, t2): the ``qc`` stage.

The data are scored (0–100) at four checkpoints: ``raw`` (as loaded), ``filtered``
(after angle/q/frame selection), ``preprocessed`` (after diagonal correction etc.) and
``final`` (the preprocessed data after the auto-repairs and angle drops below: the data
the fit reads, ``qc.npz``). The final score decides whether the workflow goes on.

QC never invents data. A masked element is NaN; the NLSQ fit, CMC and the noise
estimate give every non-finite element weight 0, so a NaN costs information and biases
nothing, while a filled-in value would be fitted at full weight as if it were measured
(30 lost frames once became 8 535 invented points, σ 0.0077 instead of 0.0100, and QC
said "excellent"). So the repairs mask what is not a measurement and transform only
measured values; the score charges the masked fraction.

Scoring starts at 100; each check that finds a problem deducts points (table
:data:`DEDUCTIONS`), and the score is floored at 0. Per-angle checks deduct
``weight × affected angles / all angles``, so one poor angle among many costs little while
a dataset that is bad everywhere loses the full weight. Checks (all skip the main
diagonal t1 == t2, which carries the correlator's shot-noise excess until the diagonal
correction removes it, so it would otherwise flag every raw file):

Checks, with the points each deducts (per-angle checks: × affected/all angles):

- ``too_few_times`` (30): fewer than ``min_time_points`` frames.
- ``infinite`` (10 + 200 × fraction of elements, at most 40): ±Inf, counted per angle.
  Inf is no measurement (a division by zero upstream): a sign of a broken file.
- ``masked`` (40 × masked fraction): an off-diagonal pair (i < j) is masked when
  neither c2[i, j] nor c2[j, i] is finite, i.e. the fit will not use it; the fraction is
  over every angle's upper triangle, and at the ``final`` checkpoint an angle dropped
  for too many masked elements counts as wholly masked. One issue (warning) per angle
  with masked pairs, naming the count and fraction.
- ``negative`` (10 + 100 × fraction, at most 30): finite c2 < 0; intensity correlations
  cannot be negative, so this is background subtraction or a sign/normalisation error.
- ``asymmetric`` (10, per angle): max |c2 − c2ᵀ| > ``symmetry_tolerance`` × median |c2|.
- ``first_lag_high`` / ``first_lag_low`` (25, per angle): mean of the first off-diagonal
  band (lag = dt) above ``g2_ceiling`` or below ``g2_floor`` (NaN counts as out of range).
- ``baseline`` (25, per angle): median c2 at long lags (lag ≥ n_t/2) with
  |b − 1| > ``baseline_tolerance``: data in percent, counts, g2 − 1...
- ``no_decay`` (30, per angle): contrast = first lag − baseline is not above
  ``min_contrast_snr`` × noise and ``min_contrast`` × |baseline|.
- ``high_noise`` (15, per angle): noise / |baseline| > ``max_relative_noise``.
- ``outlier`` (10, per angle): contrast or baseline differs from the median over angles by
  more than ``outlier_tolerance`` × the median contrast. Only angles without another
  per-angle issue are tested (one bad angle is not charged twice); needs ≥ 3 angles.
- ``no_correlation_decay`` (100, dataset): *every* angle fails ``no_decay``: c2 is flat
  (e.g. constant 1 + noise), there is nothing to fit, and the dataset fails whatever the
  other checks say (per angle, no_decay alone would leave 70, "good").
- ``all_angles_masked`` (100, final checkpoint): every angle was dropped (below); the
  stage then fails even with ``on_fail: warn``, since nothing is left to fit.

The noise is estimated per angle from differences of neighbouring elements along each
lag band (c2[i+1, j+1] − c2[i, j]): the signal barely changes along a band, so the robust
spread (1.4826 × MAD / √2) of these differences is the per-element noise.

Angle drops: after the repairs, an angle whose masked fraction exceeds
``max_masked_fraction`` (default 0.5), or that has no finite off-diagonal element at
all, is removed from the final data and listed in the report's ``dropped_angles`` (angle
index, phi, q, masked count and fraction, reason). Issues of the final checkpoint name
the angles by their index in the preprocessed data.

Labels: ``excellent`` (≥ excellent), ``good`` (≥ warn), ``acceptable`` (≥ pass), ``poor``.
The overall status is ``excellent``, ``pass``, ``warn`` or ``fail`` on the same cut points.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from homodyne_steps.dataset import XpcsData
from homodyne_steps.errors import ConfigError, QualityError
from homodyne_steps.serialise import write_json

SCHEMA_VERSION = 1
CHECKPOINTS = ("raw", "filtered", "preprocessed", "final")

# Points per check (see the module docstring for how each is applied).
DEDUCTIONS: dict[str, float] = {
    "too_few_times": 30.0,
    "infinite": 40.0,  # cap; base 10 + 200 × fraction of elements
    "masked": 40.0,  # × masked fraction of the off-diagonal upper triangle
    "negative": 30.0,  # cap; base 10 + 100 × fraction of elements
    "asymmetric": 10.0,
    "first_lag": 25.0,
    "baseline": 25.0,
    "no_decay": 30.0,
    "high_noise": 15.0,
    "outlier": 10.0,
    "no_correlation_decay": 100.0,  # dataset: no angle decays
    "all_angles_masked": 100.0,  # final: every angle dropped
}
# Dataset-level verdicts that fail the data on their own (not part of the usual budget).
FATAL_CHECKS = ("no_correlation_decay", "all_angles_masked")

# What to do about each issue; shown once per code in a checkpoint's recommendations.
RECOMMENDATIONS: dict[str, str] = {
    "too_few_times": "Use more frames (widen start_frame/end_frame) so the decay is sampled.",
    "infinite": "Inf elements are no measurements: they are masked (NaN, not fitted). Check "
    "the correlator output (a division by zero?).",
    "masked": "Masked (NaN) elements are not fitted and nothing is filled in; many of them "
    "(lost frames, detector gaps) cost information. Check the frame range; angles above "
    "qc.max_masked_fraction are dropped.",
    "negative": "Negative correlations are masked by auto_repair (NaN, not fitted); check "
    "background subtraction and the normalisation of c2.",
    "asymmetric": "c2 should be symmetric; auto_repair averages c2 and its transpose. Check "
    "how the matrix was reconstructed from its upper triangle.",
    "first_lag_high": "c2 at the first lag exceeds g2_ceiling: check the normalisation "
    "(percent or counts instead of g2?) or hot pixels in that angle bin.",
    "first_lag_low": "c2 at the first lag is below g2_floor: the data may be g2 - 1 or "
    "normalised wrongly.",
    "baseline": "The long-lag baseline is far from 1: check the normalisation (data in "
    "percent are rescaled by auto_repair; counts or g2 - 1 must be fixed upstream).",
    "no_decay": "No decay above the noise: the angle carries no dynamics in this time "
    "window (too slow, too noisy, or empty bin). Consider excluding it.",
    "high_noise": "Noisy data: consider more frames, wider angle bins, or noise reduction.",
    "outlier": "One angle differs strongly from the others: check its phi bin (mask, beam "
    "stop, detector gap) or exclude it.",
    "no_correlation_decay": "No angle shows a correlation decay: c2 is flat, so there is "
    "nothing to fit. Check the q ring, the frame range and time step (dynamics much faster "
    "or slower than the window?), or whether the file holds correlations at all.",
    "all_angles_masked": "Every angle has more masked elements than qc.max_masked_fraction "
    "allows: check the frame range and the correlator output, or raise "
    "qc.max_masked_fraction.",
}

_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class QcSettings:
    """Settings of the ``qc`` stage (config section ``qc``).

    Attributes:
        pass_threshold, warn_threshold, excellent_threshold: score cut points
            (``thresholds: {pass, warn, excellent}``), 0 ≤ pass < warn < excellent ≤ 100.
        on_fail: ``"error"`` stops the workflow when the final score < pass; ``"warn"``
            writes the outputs anyway with status ``fail``.
        auto_repair: for ``final``, mask Inf and negative values (NaN), copy a NaN's
            finite symmetric partner, symmetrise, rescale percent data. Nothing is filled.
        g2_ceiling, g2_floor: allowed range of the mean c2 at the first non-zero lag
            (g2 ≤ 2 for chaotic light; far below 1 means a wrong normalisation).
        baseline_tolerance: allowed |long-lag baseline − 1|.
        min_contrast_snr: an angle decays if its contrast exceeds this × its noise ...
        min_contrast: ... and this × its baseline (relative; guards noiseless data).
        max_relative_noise: allowed per-element noise / baseline.
        outlier_tolerance: allowed deviation of an angle's contrast or baseline from the
            median over angles, in units of the median contrast.
        symmetry_tolerance: allowed max |c2 − c2ᵀ| relative to the median |c2|.
        min_time_points: fewest frames for a usable two-time matrix.
        max_masked_fraction: an angle with a larger fraction of masked off-diagonal
            pairs (in [0, 1]) is dropped from the final data.
    """

    pass_threshold: float = 50.0
    warn_threshold: float = 70.0
    excellent_threshold: float = 85.0
    on_fail: str = "error"
    auto_repair: bool = True
    g2_ceiling: float = 2.0
    g2_floor: float = 0.5
    baseline_tolerance: float = 0.5
    min_contrast_snr: float = 3.0
    min_contrast: float = 0.01
    max_relative_noise: float = 0.1
    outlier_tolerance: float = 0.5
    symmetry_tolerance: float = 1e-6
    min_time_points: int = 20
    max_masked_fraction: float = 0.5

    def __post_init__(self) -> None:
        _validate(asdict(self), "qc")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None, where: str = "qc") -> QcSettings:
        """Build from a config mapping; unknown keys and wrong types raise ConfigError."""
        if mapping is None:
            mapping = {}
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {type(mapping).__name__}")
        simple = {f.name for f in fields(cls)} - {
            "pass_threshold",
            "warn_threshold",
            "excellent_threshold",
        }
        kwargs: dict[str, Any] = {}
        for key, value in mapping.items():
            path = f"{where}.{key}"
            if key == "thresholds":
                kwargs.update(_thresholds(value, path))
            elif key not in simple:
                allowed = sorted(simple | {"thresholds"})
                raise ConfigError(f"unknown key {path}; allowed keys: {allowed}")
            elif key == "on_fail":
                if value not in ("error", "warn"):
                    raise ConfigError(f'{path} must be "error" or "warn", got {value!r}')
                kwargs[key] = value
            elif key == "auto_repair":
                if not isinstance(value, bool):
                    raise ConfigError(f"{path} must be true or false, got {value!r}")
                kwargs[key] = value
            else:
                kwargs[key] = _number(value, path, integer=key == "min_time_points")
        # Range checks first, so errors name the caller's key path (not the default "qc").
        _validate({**asdict(cls()), **kwargs}, where)
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """The config mapping that :meth:`from_mapping` turns back into these settings."""
        out = asdict(self)
        out = {
            "thresholds": {
                "pass": out.pop("pass_threshold"),
                "warn": out.pop("warn_threshold"),
                "excellent": out.pop("excellent_threshold"),
            },
            **out,
        }
        return out


def _thresholds(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping with pass/warn/excellent")
    names = {"pass": "pass_threshold", "warn": "warn_threshold", "excellent": "excellent_threshold"}
    out = {}
    for key, v in value.items():
        if key not in names:
            raise ConfigError(f"unknown key {where}.{key}; allowed keys: {sorted(names)}")
        out[names[key]] = _number(v, f"{where}.{key}")
    return out


def _number(value: Any, where: str, *, integer: bool = False) -> float | int:
    # bool is an int subclass; `true` for a threshold is a config mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where} must be {kind}, got {type(value).__name__} {value!r}")
    if integer and not float(value).is_integer():
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if not math.isfinite(float(value)):
        raise ConfigError(f"{where} must be finite, got {value!r}")
    return int(value) if integer else float(value)


def _validate(v: Mapping[str, Any], where: str) -> None:
    """Cross-field and range checks on the settings' values (field name -> value)."""
    t = (v["pass_threshold"], v["warn_threshold"], v["excellent_threshold"])
    if not (0 <= t[0] < t[1] < t[2] <= 100):
        raise ConfigError(
            f"{where}.thresholds must be increasing within 0-100 (pass < warn < excellent), "
            f"got pass={t[0]}, warn={t[1]}, excellent={t[2]}"
        )
    if v["on_fail"] not in ("error", "warn"):
        raise ConfigError(f'{where}.on_fail must be "error" or "warn", got {v["on_fail"]!r}')
    if not isinstance(v["auto_repair"], bool):
        raise ConfigError(f"{where}.auto_repair must be true or false, got {v['auto_repair']!r}")
    if not (0 < v["g2_floor"] < v["g2_ceiling"]):
        raise ConfigError(
            f"{where}.g2_floor must be > 0 and < {where}.g2_ceiling, "
            f"got g2_floor={v['g2_floor']}, g2_ceiling={v['g2_ceiling']}"
        )
    for name in (
        "baseline_tolerance",
        "min_contrast_snr",
        "max_relative_noise",
        "outlier_tolerance",
        "symmetry_tolerance",
    ):
        if not v[name] > 0:
            raise ConfigError(f"{where}.{name} must be > 0, got {v[name]}")
    if not v["min_contrast"] >= 0:
        raise ConfigError(f"{where}.min_contrast must be >= 0, got {v['min_contrast']}")
    n = v["min_time_points"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError(f"{where}.min_time_points must be an integer >= 2, got {n!r}")
    f = v["max_masked_fraction"]
    if not 0 <= f <= 1:
        raise ConfigError(f"{where}.max_masked_fraction must be in [0, 1], got {f!r}")


# --------------------------------------------------------------------------- assessment


@dataclass(frozen=True)
class Issue:
    """One finding: ``code`` (see DEDUCTIONS), ``severity`` (error|warning), a message that
    names the angle and value, and the angle index / phi / value where there is one."""

    code: str
    severity: str
    message: str
    angle_index: int | None = None
    phi: float | None = None
    value: float | None = None

    def to_mapping(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class CheckpointReport:
    """Score (0–100), label, issues, recommendations and the points each check took."""

    checkpoint: str
    score: float
    label: str
    issues: tuple[Issue, ...] = ()
    recommendations: tuple[str, ...] = ()
    deductions: dict[str, float] = field(default_factory=dict)
    masked: dict[str, Any] = field(default_factory=dict)  # see masked_summary

    def to_mapping(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "label": self.label,
            "issues": [i.to_mapping() for i in self.issues],
            "recommendations": list(self.recommendations),
            "deductions": dict(self.deductions),
            "masked": self.masked,
        }


@dataclass(frozen=True)
class AngleStats:
    """Per-angle statistics, NaN where not measurable (too few finite elements)."""

    first_lag: float
    baseline: float
    noise: float

    @property
    def contrast(self) -> float:
        return self.first_lag - self.baseline


def _finite_or_none(x: float) -> float | None:
    # The report is strict JSON: an unmeasurable value is null, never NaN.
    return float(x) if math.isfinite(x) else None


MAX_STAT_SAMPLES = 100_000


def _sample(values: np.ndarray) -> np.ndarray:
    """A deterministic strided subsample of at most MAX_STAT_SAMPLES values.

    Medians and MADs of 10⁶ noisy elements differ from those of an even 10⁵-subsample
    far below any QC threshold, at a tenth of the cost (23 × 1000² data: 7 s → <1 s).
    """
    step = -(-values.size // MAX_STAT_SAMPLES)
    return values[::step] if step > 1 else values


@functools.lru_cache(maxsize=8)
def _triu(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, k=k)


def _nan_stat(func, values: np.ndarray) -> float:
    values = _sample(values)
    values = values[np.isfinite(values)]
    return float(func(values)) if values.size else math.nan


def angle_stats(c: np.ndarray) -> AngleStats:
    """First-lag mean, long-lag median and noise of one (n_t, n_t) matrix, off-diagonal."""
    n = c.shape[0]
    first_lag = _nan_stat(np.mean, np.diagonal(c, 1)) if n >= 2 else math.nan
    i, j = _triu(n, max(1, n // 2))  # long lags: the upper half of lag range
    baseline = _nan_stat(np.median, c[i, j]) if i.size else math.nan
    noise = math.nan
    if n >= 3:
        # Difference of neighbours along each lag band (k ≥ 1): the signal cancels.
        d = c[1:, 1:] - c[:-1, :-1]
        d = _sample(d[_triu(n - 1, 1)])
        d = d[np.isfinite(d)]
        if d.size:
            noise = float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))
    return AngleStats(first_lag, baseline, noise)


def masked_pairs(c: np.ndarray) -> int:
    """Off-diagonal pairs (i < j) of one matrix the fit cannot use: neither c[i, j] nor
    c[j, i] is finite (a lone NaN takes its finite partner in preprocess and repair)."""
    i, j = _triu(c.shape[0], 1)
    return int(np.count_nonzero(~(np.isfinite(c[i, j]) | np.isfinite(c[j, i]))))


def masked_counts(c2: np.ndarray) -> np.ndarray:
    """:func:`masked_pairs` of every angle of (n_phi, n_t, n_t) data."""
    return np.array([masked_pairs(m) for m in c2], dtype=np.int64)


def _n_pairs(n_t: int) -> int:
    return n_t * (n_t - 1) // 2


def _label(score: float, s: QcSettings) -> str:
    if score >= s.excellent_threshold:
        return "excellent"
    if score >= s.warn_threshold:
        return "good"
    if score >= s.pass_threshold:
        return "acceptable"
    return "poor"


def _status(score: float, s: QcSettings) -> str:
    if score >= s.excellent_threshold:
        return "excellent"
    if score >= s.warn_threshold:
        return "pass"
    if score >= s.pass_threshold:
        return "warn"
    return "fail"


def assess(
    data: XpcsData,
    checkpoint: str,
    settings: QcSettings | None = None,
    *,
    dropped: Sequence[Mapping[str, Any]] = (),
    angle_ids: Sequence[int] | None = None,
) -> CheckpointReport:
    """Score ``data`` at ``checkpoint`` (raw|filtered|preprocessed|final); pure function.

    The same checks run at every checkpoint: none of them looks at the diagonal, so raw
    data (diagonal not yet corrected) are judged on the same footing as the final data,
    and the scores of the four checkpoints are comparable (the report shows what each
    stage improved or broke). ``dropped``: angles removed before this checkpoint (records
    of :func:`drop_masked_angles`), charged as wholly masked. ``angle_ids``: the index
    each angle of ``data`` is named by in the issues (default 0, 1, ...).
    """
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {checkpoint!r}; expected one of {CHECKPOINTS}")
    s = settings or QcSettings()
    c2 = np.asarray(data.c2_exp, dtype=float)
    phis = np.asarray(data.phi_angles_list, dtype=float)
    n_phi, n_t = data.n_phi, data.n_t
    ids = list(range(n_phi)) if angle_ids is None else [int(a) for a in angle_ids]
    issues: list[Issue] = []
    deductions: dict[str, float] = {}
    bad: dict[str, list[int]] = {}  # per-angle check -> angles it flagged

    def flag(code: str, severity: str, a: int, message: str, value: float | None) -> None:
        value = None if value is None else _finite_or_none(value)
        where = f"angle {ids[a]} (phi={phis[a]:g} deg)"
        issues.append(Issue(code, severity, f"{where}: {message}", ids[a], float(phis[a]), value))
        bad.setdefault(code.removesuffix("_high").removesuffix("_low"), []).append(a)

    if n_t < s.min_time_points:
        message = f"only {n_t} time points (min_time_points = {s.min_time_points})"
        issues.append(Issue("too_few_times", "error", message, value=float(n_t)))
        deductions["too_few_times"] = DEDUCTIONS["too_few_times"]

    # Element counts: Inf and negative values, per angle.
    n_inf = n_negative = 0
    for a in range(n_phi):
        pos, neg_inf = int(np.isposinf(c2[a]).sum()), int(np.isneginf(c2[a]).sum())
        if pos or neg_inf:
            n_inf += pos + neg_inf
            flag("infinite", "error", a, f"{pos} +Inf and {neg_inf} -Inf elements", pos + neg_inf)
        finite = c2[a][np.isfinite(c2[a])]
        neg = int((finite < 0).sum())  # -Inf is counted as infinite, not here
        if neg:
            n_negative += neg
            lowest = float(finite.min())
            flag("negative", "error", a, f"{neg} negative elements (lowest {lowest:.4g})", lowest)
    total = max(c2.size, 1)
    if n_inf:
        deductions["infinite"] = min(DEDUCTIONS["infinite"], 10 + 200 * n_inf / total)
    if n_negative:
        deductions["negative"] = min(DEDUCTIONS["negative"], 10 + 100 * n_negative / total)

    # Masked pairs: what the fit will not use, charged by the fraction of all pairs.
    masked = masked_counts(c2)
    n_pairs = _n_pairs(n_t)
    for a in np.flatnonzero(masked):
        frac = masked[a] / n_pairs
        above = (
            f" (above max_masked_fraction {s.max_masked_fraction:g}: dropped from the final data)"
            if frac > s.max_masked_fraction or masked[a] == n_pairs
            else ""
        )
        flag("masked", "warning", int(a),
             f"{masked[a]} of {n_pairs} off-diagonal pairs masked ({100 * frac:.1f} %; "
             f"not fitted){above}", frac)  # fmt: skip
    for d in dropped:
        issues.append(
            Issue(
                "masked",
                "warning",
                f"angle {d['angle_index']} (phi={d['phi']:g} deg): dropped from the final "
                f"data: {d['reason']}",
                int(d["angle_index"]),
                float(d["phi"]),
                _finite_or_none(float(d["masked_fraction"])),
            )
        )
    all_pairs = (n_phi + len(dropped)) * n_pairs
    n_masked = int(masked.sum()) + len(dropped) * n_pairs
    masked_fraction = n_masked / all_pairs if all_pairs else 0.0
    if n_masked:
        deductions["masked"] = DEDUCTIONS["masked"] * masked_fraction
    summary = {
        "count": n_masked,
        "of": all_pairs,
        "fraction": masked_fraction,
        "per_angle": [
            {
                "angle_index": ids[a],
                "phi": float(phis[a]),
                "masked": int(masked[a]),
                "fraction": float(masked[a] / n_pairs) if n_pairs else 0.0,
            }
            for a in range(n_phi)
        ],
        "dropped_angles": [int(d["angle_index"]) for d in dropped],
    }
    for code in ("infinite", "negative", "masked"):
        bad.pop(code, None)  # element checks are charged by fraction, not by angle

    # Per-angle checks. A statistic that cannot be measured (NaN) fails its check, so an
    # angle with no usable values cannot pass by default (comparisons are written so).
    stats = [angle_stats(c2[a]) for a in range(n_phi)]
    for a, st in enumerate(stats):
        rel = _asymmetry(c2[a])
        if rel > s.symmetry_tolerance:
            flag("asymmetric", "warning", a,
                 f"max |c2 - c2^T| is {rel:.3g} of the median |c2| "
                 f"(tolerance {s.symmetry_tolerance:g})", rel)  # fmt: skip
        if not s.g2_floor <= st.first_lag <= s.g2_ceiling:
            code = "first_lag_low" if st.first_lag < s.g2_floor else "first_lag_high"
            flag(code, "error", a,
                 f"mean c2 at the first non-zero lag is {st.first_lag:.4g}, outside "
                 f"[{s.g2_floor:g}, {s.g2_ceiling:g}]", st.first_lag)  # fmt: skip
        if not abs(st.baseline - 1.0) <= s.baseline_tolerance:
            flag("baseline", "error", a,
                 f"long-lag baseline is {st.baseline:.4g}, expected 1 ± "
                 f"{s.baseline_tolerance:g} (scale problem?)", st.baseline)  # fmt: skip
        noise = st.noise if math.isfinite(st.noise) else 0.0  # n_t < 3: cannot tell
        if not (
            st.contrast > s.min_contrast_snr * noise
            and st.contrast > s.min_contrast * abs(st.baseline)
        ):
            flag("no_decay", "error", a,
                 f"no decay: contrast (first lag - baseline) {st.contrast:.3g} is not above "
                 f"{s.min_contrast_snr:g} x noise {noise:.3g}", st.contrast)  # fmt: skip
        rel_noise = noise / abs(st.baseline) if st.baseline else math.inf
        if not rel_noise <= s.max_relative_noise:
            flag("high_noise", "warning", a,
                 f"noise {noise:.3g} is {rel_noise:.3g} of the baseline "
                 f"(max {s.max_relative_noise:g})", rel_noise)  # fmt: skip

    # Outliers among the otherwise healthy angles, against the median over all angles.
    flagged = {a for angles in bad.values() for a in angles}
    contrasts = np.array([st.contrast for st in stats])
    baselines = np.array([st.baseline for st in stats])
    ok = np.isfinite(contrasts) & np.isfinite(baselines)
    if ok.sum() >= 3:
        med_c, med_b = float(np.median(contrasts[ok])), float(np.median(baselines[ok]))
        limit = s.outlier_tolerance * med_c
        for a in np.flatnonzero(ok):
            dev = max(abs(contrasts[a] - med_c), abs(baselines[a] - med_b))
            # med_c <= 0: no common decay, so nothing to be an outlier from.
            if a not in flagged and med_c > 0 and dev > limit:
                flag("outlier", "warning", int(a),
                     f"contrast {contrasts[a]:.3g} / baseline {baselines[a]:.3g} deviate from "
                     f"the median over angles ({med_c:.3g} / {med_b:.3g}) by {dev:.3g} > "
                     f"{limit:.3g}", dev)  # fmt: skip

    for code, angles in bad.items():
        deductions[code] = DEDUCTIONS[code] * len(set(angles)) / n_phi

    # Dataset-level verdicts: no angle decays, or no angle is left.
    if n_phi and len(set(bad.get("no_decay", []))) == n_phi:
        issues.append(
            Issue(
                "no_correlation_decay",
                "error",
                f"no correlation decay at any of the {n_phi} angles: c2 does not fall from "
                "the first lag to the long-lag baseline by more than the noise anywhere, so "
                "there is nothing to fit",
            )
        )
        deductions["no_correlation_decay"] = DEDUCTIONS["no_correlation_decay"]
    if not n_phi and dropped:
        issues.append(
            Issue(
                "all_angles_masked",
                "error",
                f"no angle left: all {len(dropped)} angles were dropped for masked elements "
                f"(max_masked_fraction {s.max_masked_fraction:g}); nothing to fit",
            )
        )
        deductions["all_angles_masked"] = DEDUCTIONS["all_angles_masked"]

    score = round(max(0.0, 100.0 - sum(deductions.values())), 1)
    # Errors first; within a severity, dataset-level issues before the per-angle ones.
    issues.sort(
        key=lambda i: (
            _SEVERITY_ORDER.get(i.severity, 9),
            -1 if i.angle_index is None else i.angle_index,
        )
    )
    recommendations = list(dict.fromkeys(RECOMMENDATIONS[i.code] for i in issues))
    return CheckpointReport(
        checkpoint,
        score,
        _label(score, s),
        tuple(issues),
        tuple(recommendations),
        {k: round(v, 2) for k, v in deductions.items()},
        summary,
    )


def _asymmetry(c: np.ndarray) -> float:
    """max |c − cᵀ| over finite pairs, relative to the median |c| (0 for empty/zero data)."""
    with np.errstate(invalid="ignore"):
        diff = np.abs(c - c.T)
    diff = diff[np.isfinite(diff)]
    sample = _sample(c.ravel())
    mags = np.abs(sample[np.isfinite(sample)])
    if not diff.size or not mags.size:
        return 0.0
    scale = float(np.median(mags)) or 1.0
    return float(diff.max()) / scale


# --------------------------------------------------------------------------- repairs


def repair(data: XpcsData, settings: QcSettings | None = None) -> tuple[XpcsData, list[dict]]:
    """Repair what can be repaired without inventing data; return the new data and one
    record per repair.

    Order matters: Inf first (so a later average never sees Inf − Inf), then NaN, then
    symmetry (finite pairs), then scale (so the negative check sees the final units),
    then negatives. Each record has what, angle_index, phi, count, method, before, after.
    Every repair writes c2[i, j] and c2[j, i] together, so symmetry is kept.

    - ``inf``: ±Inf → NaN (masked). Inf is no measurement; capping it at the matrix's
      max/min put an invented value into the fit at full weight.
    - ``nan``: a NaN whose symmetric partner is finite takes the partner's value (c2 is
      symmetric by construction: a measured value, copied); every other NaN stays NaN
      (masked, weight 0 in the fit). Nothing is interpolated.
    - ``asymmetric``: (c2 + c2ᵀ) / 2 (NaN stay NaN; their pattern is symmetric by now).
    - ``scale``: an angle whose baseline is ~100 (|b/100 − 1| ≤ baseline_tolerance while
      |b − 1| is not) is in percent and is divided by 100. Other scale errors (counts,
      g2 − 1) are ambiguous and left to the user (reported, not guessed).
    - ``negative``: → NaN (masked), with the partner. Intensity correlations cannot be
      negative, so the value is no usable measurement; replacing it by a band median
      invented one.

    An angle with no finite value is left as it is (all masked; :func:`run_qc` drops it).
    """
    s = settings or QcSettings()
    c2 = np.array(data.c2_exp, dtype=float, copy=True)
    phis = np.asarray(data.phi_angles_list, dtype=float)
    records: list[dict] = []

    def record(what, a, count, method, before, after):
        records.append(
            {
                "what": what,
                "angle_index": a,
                "phi": float(phis[a]),
                "count": int(count),
                "method": method,
                "before": before,
                "after": after,
            }
        )

    for a in range(data.n_phi):
        c = c2[a]
        if not np.isfinite(c).any():
            continue  # nothing measured: nothing to repair (dropped later, and recorded)
        # Inf → NaN.
        pos, neg = np.isposinf(c), np.isneginf(c)
        if pos.any() or neg.any():
            n_inf = int(pos.sum() + neg.sum())
            c[pos | neg] = np.nan
            record(
                "inf",
                a,
                n_inf,
                "masked: set to NaN (no measurement; not fitted)",
                {"pos_inf": int(pos.sum()), "neg_inf": int(neg.sum())},
                {"inf": 0, "masked": n_inf},
            )
        # NaN → the finite symmetric partner, else stays masked.
        nan = np.isnan(c)
        if nan.any():
            n_nan = int(nan.sum())
            from_partner = nan & ~nan.T
            c[from_partner] = c.T[from_partner]
            left = int(np.isnan(c).sum())
            record(
                "nan",
                a,
                n_nan,
                "copied from the symmetric element where that is finite; the rest stay "
                "masked (NaN, not fitted; nothing interpolated)",
                {"nan": n_nan},
                {"nan": left, "from_symmetric": int(from_partner.sum()), "masked": left},
            )
        # Asymmetry → average with the transpose.
        rel = _asymmetry(c)
        if rel > s.symmetry_tolerance:
            n_asym = int(np.count_nonzero(np.isfinite(c) & (c != c.T)))
            c[:] = 0.5 * (c + c.T)
            record(
                "asymmetric",
                a,
                n_asym,
                "replaced by (c2 + c2^T) / 2",
                {"max_rel_asymmetry": rel},
                {"max_rel_asymmetry": _asymmetry(c)},
            )
        # Percent → divide by 100.
        b = angle_stats(c).baseline
        if (
            math.isfinite(b)
            and abs(b - 1.0) > s.baseline_tolerance
            and abs(b / 100.0 - 1.0) <= s.baseline_tolerance
        ):
            c /= 100.0
            record(
                "scale",
                a,
                c.size,
                "divided by 100 (data in percent)",
                {"baseline": b},
                {"baseline": angle_stats(c).baseline},
            )
        # Negative → NaN, with the partner (a negative c2[i, j] makes c2[j, i] suspect).
        with np.errstate(invalid="ignore"):
            negative = c < 0
        negative |= negative.T
        if negative.any():
            lowest = float(np.nanmin(c[negative]))
            n_neg = int(negative.sum())
            c[negative] = np.nan
            record(
                "negative",
                a,
                n_neg,
                "masked: set to NaN with the symmetric element (not fitted)",
                {"min": lowest},
                {"negative": 0, "masked": n_neg},
            )
    return data.replace(c2_exp=c2), records


def drop_masked_angles(
    data: XpcsData, settings: QcSettings | None = None
) -> tuple[XpcsData, list[dict[str, Any]], list[int]]:
    """Remove the angles with too many masked pairs; return the kept data, one record
    per dropped angle and the indices (in ``data``) of the kept angles.

    An angle is dropped when its masked fraction exceeds ``max_masked_fraction`` or when
    it has no usable off-diagonal pair at all (nothing to fit there, whatever the
    setting).
    """
    s = settings or QcSettings()
    n_pairs = _n_pairs(data.n_t)
    masked = masked_counts(np.asarray(data.c2_exp, dtype=float))
    kept: list[int] = []
    dropped: list[dict[str, Any]] = []
    for a, m in enumerate(masked):
        frac = float(m / n_pairs) if n_pairs else 0.0
        if n_pairs and m == n_pairs:
            reason = "no finite off-diagonal element: nothing was measured at this angle"
        elif frac > s.max_masked_fraction:
            reason = (
                f"{100 * frac:.1f} % of its off-diagonal pairs are masked (NaN), above "
                f"qc.max_masked_fraction = {s.max_masked_fraction:g}"
            )
        else:
            kept.append(a)
            continue
        dropped.append(
            {
                "angle_index": a,
                "phi": float(data.phi_angles_list[a]),
                "q": float(data.wavevector_q_list[a]),
                "masked": int(m),
                "of": n_pairs,
                "masked_fraction": frac,
                "reason": reason,
            }
        )
    if not dropped:
        return data, [], kept
    idx = np.array(kept, dtype=np.int64)
    out = data.replace(
        wavevector_q_list=np.asarray(data.wavevector_q_list)[idx],
        phi_angles_list=np.asarray(data.phi_angles_list)[idx],
        c2_exp=np.asarray(data.c2_exp)[idx],
    )
    return out, dropped, kept


# --------------------------------------------------------------------------- stage


def run_qc(
    raw: XpcsData,
    filtered: XpcsData,
    preprocessed: XpcsData,
    settings: QcSettings | None = None,
) -> tuple[dict[str, Any], XpcsData]:
    """Assess the three inputs, repair the preprocessed data, drop the angles with too
    many masked pairs, and assess the rest as ``final``.

    Returns (report, final data). The overall score is the final checkpoint's. The final
    data keep NaN at every masked element; with every angle dropped they hold no angle.
    """
    s = settings or QcSettings()
    reports = {
        "raw": assess(raw, "raw", s),
        "filtered": assess(filtered, "filtered", s),
        "preprocessed": assess(preprocessed, "preprocessed", s),
    }
    repaired, repairs = repair(preprocessed, s) if s.auto_repair else (preprocessed, [])
    final, dropped, kept = drop_masked_angles(repaired, s)
    reports["final"] = assess(final, "final", s, dropped=dropped, angle_ids=kept)
    score = reports["final"].score
    report = {
        "schema_version": SCHEMA_VERSION,
        "thresholds": s.to_mapping()["thresholds"],
        "settings": s.to_mapping(),
        "checkpoints": {name: r.to_mapping() for name, r in reports.items()},
        "repairs": repairs,
        "dropped_angles": dropped,
        "overall": {
            "score": score,
            "label": reports["final"].label,
            "status": _status(score, s),
            "passed": score >= s.pass_threshold,
        },
    }
    return report, final


def failed_report_path(out_json: str | os.PathLike[str]) -> Path:
    """Where a failing run's report goes (``qc_report.json`` → ``qc_report.failed.json``)."""
    return Path(out_json).with_suffix(".failed.json")


def qc_stage(
    raw_npz: str | os.PathLike[str],
    filtered_npz: str | os.PathLike[str],
    preprocessed_npz: str | os.PathLike[str],
    out_json: str | os.PathLike[str],
    out_npz: str | os.PathLike[str],
    settings: QcSettings | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run QC on three NPZ files; write the report JSON and the final data NPZ.

    A final score below ``pass`` with ``on_fail: error`` raises QualityError and writes
    only ``<out_json stem>.failed.json``, so the workflow sees no outputs (and stale ones
    from an earlier run are removed, so a rerun cannot pick them up). With every angle
    dropped for masked elements it does so whatever ``on_fail`` says.
    """
    s = settings if isinstance(settings, QcSettings) else QcSettings.from_mapping(settings)
    report, final = run_qc(
        XpcsData.from_npz(raw_npz),
        XpcsData.from_npz(filtered_npz),
        XpcsData.from_npz(preprocessed_npz),
        s,
    )
    failed = failed_report_path(out_json)
    overall = report["overall"]
    if final.n_phi == 0:
        # on_fail: warn cannot help: there is no angle left to write for the fit.
        Path(out_json).unlink(missing_ok=True)
        Path(out_npz).unlink(missing_ok=True)
        write_json(failed, report)
        raise QualityError(
            f"quality control failed: no angle left. Every angle has more than "
            f"qc.max_masked_fraction = {s.max_masked_fraction:g} of its off-diagonal pairs "
            f"masked (NaN) and was dropped ({len(report['dropped_angles'])} angles; reasons "
            f"in {failed}). Check the frame range and the correlator output, or raise "
            "qc.max_masked_fraction."
        )
    if not overall["passed"] and s.on_fail == "error":
        Path(out_json).unlink(missing_ok=True)
        Path(out_npz).unlink(missing_ok=True)
        write_json(failed, report)
        top = report["checkpoints"]["final"]["issues"][:3]  # sorted: errors first
        listed = "; ".join(i["message"] for i in top) or "no single issue"
        raise QualityError(
            f"quality control failed: final score {overall['score']} is below the pass "
            f"threshold {s.pass_threshold:g}. Top issues: {listed}. Full report: {failed}. "
            "Fix the data, or set qc.on_fail: warn to continue anyway."
        )
    failed.unlink(missing_ok=True)
    final.to_npz(out_npz)
    write_json(out_json, report)
    return report
