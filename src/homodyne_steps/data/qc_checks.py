"""Quality checks of two-time correlation data c2(phi, t1, t2): the scores of the ``qc`` stage.

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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from homodyne_steps.data.qc_rules import (
    _SEVERITY_ORDER,
    CHECKPOINTS,
    DEDUCTIONS,
    RECOMMENDATIONS,
)
from homodyne_steps.data.qc_settings import QcSettings
from homodyne_steps.io.data_files import QcCheckpoint, QcIssue, QcMasked, QcMaskedAngle
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.io.serialise import finite_or_none


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

    def to_record(self) -> QcIssue:
        """The report's issue (angle, phi and value left out where None)."""
        return QcIssue(**{k: v for k, v in asdict(self).items() if v is not None})


@dataclass(frozen=True)
class CheckpointReport:
    """Score (0–100), label, issues, recommendations and the points each check took."""

    checkpoint: str
    score: float
    label: str
    issues: tuple[Issue, ...] = ()
    recommendations: tuple[str, ...] = ()
    deductions: dict[str, float] = field(default_factory=dict)
    masked: dict[str, Any] = field(default_factory=dict)  # see _check_masked

    def to_record(self) -> QcCheckpoint:
        """The checkpoint's entry in the QC report."""
        m = self.masked
        return QcCheckpoint(
            score=self.score,
            label=self.label,
            issues=[i.to_record() for i in self.issues],
            recommendations=list(self.recommendations),
            deductions=dict(self.deductions),
            masked=QcMasked(
                count=m["count"],
                of=m["of"],
                fraction=m["fraction"],
                per_angle=[QcMaskedAngle(**a) for a in m["per_angle"]],
                dropped_angles=m["dropped_angles"],
            ),
        )


@dataclass(frozen=True)
class AngleStats:
    """Per-angle statistics, NaN where not measurable (too few finite elements)."""

    first_lag: float
    baseline: float
    noise: float

    @property
    def contrast(self) -> float:
        return self.first_lag - self.baseline


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


@dataclass
class _Findings:
    """What the checks of one checkpoint found so far (filled in check order)."""

    ids: list[int]  # the index each angle is named by in the issues
    phis: np.ndarray
    issues: list[Issue] = field(default_factory=list)
    deductions: dict[str, float] = field(default_factory=dict)
    bad: dict[str, list[int]] = field(default_factory=dict)  # per-angle check -> angles

    def flag(self, code: str, severity: str, a: int, message: str, value: float | None) -> None:
        value = None if value is None else finite_or_none(value)
        where = f"angle {self.ids[a]} (phi={self.phis[a]:g} deg)"
        self.issues.append(
            Issue(code, severity, f"{where}: {message}", self.ids[a], float(self.phis[a]), value)
        )
        self.bad.setdefault(code.removesuffix("_high").removesuffix("_low"), []).append(a)


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
    of :func:`~homodyne_steps.data.qc_repair.drop_masked_angles`), charged as wholly masked.
    ``angle_ids``: the index each angle of ``data`` is named by in the issues (default
    0, 1, ...).
    """
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {checkpoint!r}; expected one of {CHECKPOINTS}")
    s = settings or QcSettings()
    c2 = np.asarray(data.c2_exp, dtype=float)
    ids = list(range(data.n_phi)) if angle_ids is None else [int(a) for a in angle_ids]
    found = _Findings(ids, np.asarray(data.phi_angles_list, dtype=float))
    _check_size(found, data.n_t, s)
    _check_elements(found, c2)
    summary = _check_masked(found, c2, s, dropped)
    for code in ("infinite", "negative", "masked"):
        found.bad.pop(code, None)  # element checks are charged by fraction, not by angle
    stats = [angle_stats(c2[a]) for a in range(data.n_phi)]
    _check_angles(found, c2, stats, s)
    _check_outliers(found, stats, s)
    for code, angles in found.bad.items():
        found.deductions[code] = DEDUCTIONS[code] * len(set(angles)) / data.n_phi
    _check_dataset(found, data.n_phi, s, dropped)
    return _report(found, checkpoint, s, summary)


def _check_size(found: _Findings, n_t: int, s: QcSettings) -> None:
    if n_t < s.min_time_points:
        message = f"only {n_t} time points (min_time_points = {s.min_time_points})"
        found.issues.append(Issue("too_few_times", "error", message, value=float(n_t)))
        found.deductions["too_few_times"] = DEDUCTIONS["too_few_times"]


def _check_elements(found: _Findings, c2: np.ndarray) -> None:
    """Inf and negative values, per angle, charged by their fraction of all elements."""
    n_inf = n_negative = 0
    for a in range(c2.shape[0]):
        pos, neg_inf = int(np.isposinf(c2[a]).sum()), int(np.isneginf(c2[a]).sum())
        if pos or neg_inf:
            n_inf += pos + neg_inf
            found.flag("infinite", "error", a, f"{pos} +Inf and {neg_inf} -Inf elements",
                       pos + neg_inf)  # fmt: skip
        finite = c2[a][np.isfinite(c2[a])]
        neg = int((finite < 0).sum())  # -Inf is counted as infinite, not here
        if neg:
            n_negative += neg
            lowest = float(finite.min())
            found.flag("negative", "error", a, f"{neg} negative elements (lowest {lowest:.4g})",
                       lowest)  # fmt: skip
    total = max(c2.size, 1)
    if n_inf:
        found.deductions["infinite"] = min(DEDUCTIONS["infinite"], 10 + 200 * n_inf / total)
    if n_negative:
        found.deductions["negative"] = min(DEDUCTIONS["negative"], 10 + 100 * n_negative / total)


def _check_masked(
    found: _Findings, c2: np.ndarray, s: QcSettings, dropped: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Masked pairs (what the fit will not use), charged by the fraction of all pairs;
    returns the checkpoint's ``masked`` summary."""
    n_phi, n_t = c2.shape[0], c2.shape[1]
    masked = masked_counts(c2)
    n_pairs = _n_pairs(n_t)
    for a in np.flatnonzero(masked):
        frac = masked[a] / n_pairs
        above = (
            f" (above max_masked_fraction {s.max_masked_fraction:g}: dropped from the final data)"
            if frac > s.max_masked_fraction or masked[a] == n_pairs
            else ""
        )
        found.flag("masked", "warning", int(a),
                   f"{masked[a]} of {n_pairs} off-diagonal pairs masked ({100 * frac:.1f} %; "
                   f"not fitted){above}", frac)  # fmt: skip
    for d in dropped:
        found.issues.append(
            Issue(
                "masked",
                "warning",
                f"angle {d['angle_index']} (phi={d['phi']:g} deg): dropped from the final "
                f"data: {d['reason']}",
                int(d["angle_index"]),
                float(d["phi"]),
                finite_or_none(float(d["masked_fraction"])),
            )
        )
    all_pairs = (n_phi + len(dropped)) * n_pairs
    n_masked = int(masked.sum()) + len(dropped) * n_pairs
    masked_fraction = n_masked / all_pairs if all_pairs else 0.0
    if n_masked:
        found.deductions["masked"] = DEDUCTIONS["masked"] * masked_fraction
    return {
        "count": n_masked,
        "of": all_pairs,
        "fraction": masked_fraction,
        "per_angle": [
            {
                "angle_index": found.ids[a],
                "phi": float(found.phis[a]),
                "masked": int(masked[a]),
                "fraction": float(masked[a] / n_pairs) if n_pairs else 0.0,
            }
            for a in range(n_phi)
        ],
        "dropped_angles": [int(d["angle_index"]) for d in dropped],
    }


def _check_angles(found: _Findings, c2: np.ndarray, stats: list[AngleStats], s: QcSettings) -> None:
    """Per-angle checks. A statistic that cannot be measured (NaN) fails its check, so an
    angle with no usable values cannot pass by default (comparisons are written so)."""
    for a, st in enumerate(stats):
        rel = _asymmetry(c2[a])
        if rel > s.symmetry_tolerance:
            found.flag("asymmetric", "warning", a,
                       f"max |c2 - c2^T| is {rel:.3g} of the median |c2| "
                       f"(tolerance {s.symmetry_tolerance:g})", rel)  # fmt: skip
        if not s.g2_floor <= st.first_lag <= s.g2_ceiling:
            code = "first_lag_low" if st.first_lag < s.g2_floor else "first_lag_high"
            found.flag(code, "error", a,
                       f"mean c2 at the first non-zero lag is {st.first_lag:.4g}, outside "
                       f"[{s.g2_floor:g}, {s.g2_ceiling:g}]", st.first_lag)  # fmt: skip
        if not abs(st.baseline - 1.0) <= s.baseline_tolerance:
            found.flag("baseline", "error", a,
                       f"long-lag baseline is {st.baseline:.4g}, expected 1 ± "
                       f"{s.baseline_tolerance:g} (scale problem?)", st.baseline)  # fmt: skip
        noise = st.noise if math.isfinite(st.noise) else 0.0  # n_t < 3: cannot tell
        if not (
            st.contrast > s.min_contrast_snr * noise
            and st.contrast > s.min_contrast * abs(st.baseline)
        ):
            found.flag("no_decay", "error", a,
                       f"no decay: contrast (first lag - baseline) {st.contrast:.3g} is not "
                       f"above {s.min_contrast_snr:g} x noise {noise:.3g}",
                       st.contrast)  # fmt: skip
        rel_noise = noise / abs(st.baseline) if st.baseline else math.inf
        if not rel_noise <= s.max_relative_noise:
            found.flag("high_noise", "warning", a,
                       f"noise {noise:.3g} is {rel_noise:.3g} of the baseline "
                       f"(max {s.max_relative_noise:g})", rel_noise)  # fmt: skip


def _check_outliers(found: _Findings, stats: list[AngleStats], s: QcSettings) -> None:
    """Outliers among the otherwise healthy angles, against the median over all angles."""
    flagged = {a for angles in found.bad.values() for a in angles}
    contrasts = np.array([st.contrast for st in stats])
    baselines = np.array([st.baseline for st in stats])
    ok = np.isfinite(contrasts) & np.isfinite(baselines)
    if ok.sum() < 3:
        return
    med_c, med_b = float(np.median(contrasts[ok])), float(np.median(baselines[ok]))
    limit = s.outlier_tolerance * med_c
    for a in np.flatnonzero(ok):
        dev = max(abs(contrasts[a] - med_c), abs(baselines[a] - med_b))
        # med_c <= 0: no common decay, so nothing to be an outlier from.
        if a not in flagged and med_c > 0 and dev > limit:
            found.flag("outlier", "warning", int(a),
                       f"contrast {contrasts[a]:.3g} / baseline {baselines[a]:.3g} deviate "
                       f"from the median over angles ({med_c:.3g} / {med_b:.3g}) by "
                       f"{dev:.3g} > {limit:.3g}", dev)  # fmt: skip


def _check_dataset(
    found: _Findings, n_phi: int, s: QcSettings, dropped: Sequence[Mapping[str, Any]]
) -> None:
    """Dataset-level verdicts: no angle decays, or no angle is left."""
    if n_phi and len(set(found.bad.get("no_decay", []))) == n_phi:
        found.issues.append(
            Issue(
                "no_correlation_decay",
                "error",
                f"no correlation decay at any of the {n_phi} angles: c2 does not fall from "
                "the first lag to the long-lag baseline by more than the noise anywhere, so "
                "there is nothing to fit",
            )
        )
        found.deductions["no_correlation_decay"] = DEDUCTIONS["no_correlation_decay"]
    if not n_phi and dropped:
        found.issues.append(
            Issue(
                "all_angles_masked",
                "error",
                f"no angle left: all {len(dropped)} angles were dropped for masked elements "
                f"(max_masked_fraction {s.max_masked_fraction:g}); nothing to fit",
            )
        )
        found.deductions["all_angles_masked"] = DEDUCTIONS["all_angles_masked"]


def _report(
    found: _Findings, checkpoint: str, s: QcSettings, summary: dict[str, Any]
) -> CheckpointReport:
    score = round(max(0.0, 100.0 - sum(found.deductions.values())), 1)
    # Errors first; within a severity, dataset-level issues before the per-angle ones.
    issues = sorted(
        found.issues,
        key=lambda i: (
            _SEVERITY_ORDER.get(i.severity, 9),
            -1 if i.angle_index is None else i.angle_index,
        ),
    )
    recommendations = list(dict.fromkeys(RECOMMENDATIONS[i.code] for i in issues))
    return CheckpointReport(
        checkpoint,
        score,
        _label(score, s),
        tuple(issues),
        tuple(recommendations),
        {k: round(v, 2) for k, v in found.deductions.items()},
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
