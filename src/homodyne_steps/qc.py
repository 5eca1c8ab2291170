"""Quality control of two-time correlation data c2(phi, t1, t2): the ``qc`` stage.

The data are scored (0–100) at four checkpoints: ``raw`` (as loaded), ``filtered``
(after angle/q/frame selection), ``preprocessed`` (after diagonal correction etc.) and
``final`` (the preprocessed data after the auto-repairs below). The final score decides
whether the workflow goes on.

Scoring starts at 100; each check that finds a problem deducts points (table
:data:`DEDUCTIONS`), and the score is floored at 0. Per-angle checks deduct
``weight × affected angles / all angles``, so one poor angle among many costs little while
a dataset that is bad everywhere loses the full weight. Checks (all skip the main
diagonal t1 == t2, which carries the correlator's shot-noise excess until the diagonal
correction removes it, so it would otherwise flag every raw file):

Checks, with the points each deducts (per-angle checks: × affected/all angles):

- ``too_few_times`` (30): fewer than ``min_time_points`` frames.
- ``non_finite`` (10 + 200 × fraction of elements, at most 40): NaN/Inf, counted per angle.
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

The noise is estimated per angle from differences of neighbouring elements along each
lag band (c2[i+1, j+1] − c2[i, j]): the signal barely changes along a band, so the robust
spread (1.4826 × MAD / √2) of these differences is the per-element noise.

Labels: ``excellent`` (≥ excellent), ``good`` (≥ warn), ``acceptable`` (≥ pass), ``poor``.
The overall status is ``excellent``, ``pass``, ``warn`` or ``fail`` on the same cut points.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
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
    "non_finite": 40.0,  # cap; base 10 + 200 × fraction of elements
    "negative": 30.0,  # cap; base 10 + 100 × fraction of elements
    "asymmetric": 10.0,
    "first_lag": 25.0,
    "baseline": 25.0,
    "no_decay": 30.0,
    "high_noise": 15.0,
    "outlier": 10.0,
}

# What to do about each issue; shown once per code in a checkpoint's recommendations.
RECOMMENDATIONS: dict[str, str] = {
    "too_few_times": "Use more frames (widen start_frame/end_frame) so the decay is sampled.",
    "non_finite": "NaN/Inf elements are filled by auto_repair; check the correlator output "
    "or the frame range if there are many.",
    "negative": "Negative correlations are replaced by auto_repair; check background "
    "subtraction and the normalisation of c2.",
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
        auto_repair: repair NaN/Inf/negative/asymmetric/percent-scaled data for ``final``.
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

    def to_mapping(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "label": self.label,
            "issues": [i.to_mapping() for i in self.issues],
            "recommendations": list(self.recommendations),
            "deductions": dict(self.deductions),
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


def assess(data: XpcsData, checkpoint: str, settings: QcSettings | None = None) -> CheckpointReport:
    """Score ``data`` at ``checkpoint`` (raw|filtered|preprocessed|final); pure function.

    The same checks run at every checkpoint: none of them looks at the diagonal, so raw
    data (diagonal not yet corrected) are judged on the same footing as the final data,
    and the scores of the four checkpoints are comparable (the report shows what each
    stage improved or broke).
    """
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {checkpoint!r}; expected one of {CHECKPOINTS}")
    s = settings or QcSettings()
    c2 = np.asarray(data.c2_exp, dtype=float)
    phis = np.asarray(data.phi_angles_list, dtype=float)
    n_phi, n_t = data.n_phi, data.n_t
    issues: list[Issue] = []
    deductions: dict[str, float] = {}
    bad: dict[str, list[int]] = {}  # per-angle check -> angles it flagged

    def flag(code: str, severity: str, a: int, message: str, value: float | None) -> None:
        value = None if value is None else _finite_or_none(value)
        where = f"angle {a} (phi={phis[a]:g} deg)"
        issues.append(Issue(code, severity, f"{where}: {message}", a, float(phis[a]), value))
        bad.setdefault(code.removesuffix("_high").removesuffix("_low"), []).append(a)

    if n_t < s.min_time_points:
        message = f"only {n_t} time points (min_time_points = {s.min_time_points})"
        issues.append(Issue("too_few_times", "error", message, value=float(n_t)))
        deductions["too_few_times"] = DEDUCTIONS["too_few_times"]

    # Element counts: NaN/Inf and negative values, per angle.
    n_nonfinite = n_negative = 0
    for a in range(n_phi):
        nan, inf = int(np.isnan(c2[a]).sum()), int(np.isinf(c2[a]).sum())
        if nan or inf:
            n_nonfinite += nan + inf
            flag("non_finite", "error", a, f"{nan} NaN and {inf} Inf elements", nan + inf)
        finite = c2[a][np.isfinite(c2[a])]
        neg = int((finite < 0).sum())  # -Inf is counted as non-finite, not here
        if neg:
            n_negative += neg
            lowest = float(finite.min())
            flag("negative", "error", a, f"{neg} negative elements (lowest {lowest:.4g})", lowest)
    total = max(c2.size, 1)
    if n_nonfinite:
        deductions["non_finite"] = min(DEDUCTIONS["non_finite"], 10 + 200 * n_nonfinite / total)
    if n_negative:
        deductions["negative"] = min(DEDUCTIONS["negative"], 10 + 100 * n_negative / total)
    bad.pop("non_finite", None)  # element checks are charged by fraction, not by angle
    bad.pop("negative", None)

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
    score = round(max(0.0, 100.0 - sum(deductions.values())), 1)
    issues.sort(key=lambda i: (_SEVERITY_ORDER.get(i.severity, 9), i.angle_index or 0))
    recommendations = list(dict.fromkeys(RECOMMENDATIONS[i.code] for i in issues))
    return CheckpointReport(
        checkpoint,
        score,
        _label(score, s),
        tuple(issues),
        tuple(recommendations),
        {k: round(v, 2) for k, v in deductions.items()},
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
    """Repair what can be repaired safely; return the new data and one record per repair.

    Order matters: Inf first (so a later average never sees Inf − Inf), then NaN, then
    symmetry (both partners now finite), then scale (so the negative check sees the final
    units), then negatives. Each record has what, angle_index, phi, count, method, before,
    after. Every repair writes c2[i, j] and c2[j, i] together, so symmetry is kept.

    - ``inf``: +Inf → the finite max of that angle's matrix, −Inf → its finite min (a value
      that exists in the data, not an invented one).
    - ``nan``: copy the symmetric partner when it is finite; else interpolate linearly
      along the element's lag band (same t1 − t2, where c2 varies slowly), holding the end
      values flat; a band without finite values takes the median of the matrix.
    - ``asymmetric``: (c2 + c2ᵀ) / 2.
    - ``scale``: an angle whose baseline is ~100 (|b/100 − 1| ≤ baseline_tolerance while
      |b − 1| is not) is in percent and is divided by 100. Other scale errors (counts,
      g2 − 1) are ambiguous and left to the user (reported, not guessed).
    - ``negative``: replaced by the median of the non-negative values of the same lag band
      (0 if there are none). Clipping to 0 would put a value 1 below a ~1 baseline, itself
      an outlier; the band median is the expected value at that lag.
    An angle with no finite value at all cannot be repaired; that is recorded and stays
    visible in the final checkpoint.
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
        finite = np.isfinite(c)
        if not finite.any():
            record(
                "unrepairable",
                a,
                c.size,
                "none: no finite value to repair from",
                {"non_finite": int(c.size)},
                {"non_finite": int(c.size)},
            )
            continue
        # Inf → cap.
        pos, neg = np.isposinf(c), np.isneginf(c)
        if pos.any() or neg.any():
            hi, lo = float(c[finite].max()), float(c[finite].min())
            c[pos], c[neg] = hi, lo
            record(
                "inf",
                a,
                pos.sum() + neg.sum(),
                "capped to the finite max/min of the matrix",
                {"pos_inf": int(pos.sum()), "neg_inf": int(neg.sum())},
                {"cap_high": hi, "cap_low": lo, "inf": 0},
            )
        # NaN → symmetric partner, then band interpolation.
        nan = np.isnan(c)
        if nan.any():
            n_nan = int(nan.sum())
            from_partner = nan & ~np.isnan(c.T)
            c[from_partner] = c.T[from_partner]
            n_interp = _fill_bands(c)
            record(
                "nan",
                a,
                n_nan,
                "copied from the symmetric element, else interpolated along the lag band",
                {"nan": n_nan},
                {
                    "nan": int(np.isnan(c).sum()),
                    "from_symmetric": int(from_partner.sum()),
                    "interpolated": n_interp,
                },
            )
        # Asymmetry → average with the transpose.
        rel = _asymmetry(c)
        if rel > s.symmetry_tolerance:
            n_asym = int((c != c.T).sum())
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
        # Negative → band median of the non-negative values.
        negative = c < 0
        if negative.any():
            lowest = float(c[negative].min())
            _replace_negative(c)
            record(
                "negative",
                a,
                negative.sum(),
                "replaced by the median of the non-negative values of the same lag band",
                {"min": lowest},
                {"min": float(c.min())},
            )
    return data.replace(c2_exp=c2), records


def _fill_bands(c: np.ndarray) -> int:
    """Fill NaNs of a matrix whose NaNs are symmetric, band by band; return count filled."""
    n = c.shape[0]
    fallback = float(np.median(c[np.isfinite(c)]))
    filled = 0
    for k in range(n):
        idx = np.arange(n - k)
        band = c[idx, idx + k]
        bad = np.isnan(band)
        if not bad.any():
            continue
        good = ~bad
        band[bad] = np.interp(idx[bad], idx[good], band[good]) if good.any() else fallback
        c[idx, idx + k] = band
        c[idx + k, idx] = band  # mirror: the lower band is the transpose of the upper one
        filled += int(bad.sum()) * (1 if k == 0 else 2)
    return filled


def _replace_negative(c: np.ndarray) -> None:
    n = c.shape[0]
    for k in range(n):
        idx = np.arange(n - k)
        upper, lower = c[idx, idx + k], c[idx + k, idx]
        bad = (upper < 0) | (lower < 0)
        if not bad.any():
            continue
        ok = np.concatenate([upper[~bad], lower[~bad]])
        value = float(np.median(ok)) if ok.size else 0.0
        upper[bad] = value
        lower[bad] = value
        c[idx, idx + k] = upper
        c[idx + k, idx] = lower


# --------------------------------------------------------------------------- stage


def run_qc(
    raw: XpcsData,
    filtered: XpcsData,
    preprocessed: XpcsData,
    settings: QcSettings | None = None,
) -> tuple[dict[str, Any], XpcsData]:
    """Assess the three inputs, repair the preprocessed data, assess it as ``final``.

    Returns (report, final data). The overall score is the final checkpoint's.
    """
    s = settings or QcSettings()
    reports = {
        "raw": assess(raw, "raw", s),
        "filtered": assess(filtered, "filtered", s),
        "preprocessed": assess(preprocessed, "preprocessed", s),
    }
    final, repairs = repair(preprocessed, s) if s.auto_repair else (preprocessed, [])
    reports["final"] = assess(final, "final", s)
    score = reports["final"].score
    report = {
        "schema_version": SCHEMA_VERSION,
        "thresholds": s.to_mapping()["thresholds"],
        "settings": s.to_mapping(),
        "checkpoints": {name: r.to_mapping() for name, r in reports.items()},
        "repairs": repairs,
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
    from an earlier run are removed, so a rerun cannot pick them up).
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
