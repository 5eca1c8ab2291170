"""QC repairs that invent nothing, and the angle drops: the ``final`` data of the ``qc`` stage.

Masked elements are NaN; see :mod:`homodyne_steps.data.qc_checks` for why nothing is filled.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from homodyne_steps.data.qc_checks import _asymmetry, _n_pairs, angle_stats, masked_counts
from homodyne_steps.data.qc_settings import QcSettings
from homodyne_steps.io.dataset import XpcsData


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
    for a in range(data.n_phi):
        c = c2[a]  # a view: every repair works in place
        if not np.isfinite(c).any():
            continue  # nothing measured: nothing to repair (dropped later, and recorded)
        for step in (_mask_inf, _take_partner, _symmetrise, _rescale_percent, _mask_negative):
            found = step(c, s)
            if found is not None:
                what, count, method, before, after = found
                records.append({"what": what, "angle_index": a, "phi": float(phis[a]),
                                "count": int(count), "method": method, "before": before,
                                "after": after})  # fmt: skip
    return data.replace(c2_exp=c2), records


# Each repair step changes one angle's matrix in place and returns
# (what, count, method, before, after) when it changed something, else None.
_Repair = tuple[str, int, str, dict[str, Any], dict[str, Any]] | None


def _mask_inf(c: np.ndarray, s: QcSettings) -> _Repair:
    pos, neg = np.isposinf(c), np.isneginf(c)
    if not (pos.any() or neg.any()):
        return None
    n_inf = int(pos.sum() + neg.sum())
    c[pos | neg] = np.nan
    return ("inf", n_inf, "masked: set to NaN (no measurement; not fitted)",
            {"pos_inf": int(pos.sum()), "neg_inf": int(neg.sum())},
            {"inf": 0, "masked": n_inf})  # fmt: skip


def _take_partner(c: np.ndarray, s: QcSettings) -> _Repair:
    """NaN → the finite symmetric partner, else it stays masked."""
    nan = np.isnan(c)
    if not nan.any():
        return None
    n_nan = int(nan.sum())
    from_partner = nan & ~nan.T
    c[from_partner] = c.T[from_partner]
    left = int(np.isnan(c).sum())
    return ("nan", n_nan,
            "copied from the symmetric element where that is finite; the rest stay "
            "masked (NaN, not fitted; nothing interpolated)",
            {"nan": n_nan},
            {"nan": left, "from_symmetric": int(from_partner.sum()), "masked": left})  # fmt: skip


def _symmetrise(c: np.ndarray, s: QcSettings) -> _Repair:
    rel = _asymmetry(c)
    if not rel > s.symmetry_tolerance:
        return None
    n_asym = int(np.count_nonzero(np.isfinite(c) & (c != c.T)))
    c[:] = 0.5 * (c + c.T)
    return ("asymmetric", n_asym, "replaced by (c2 + c2^T) / 2", {"max_rel_asymmetry": rel},
            {"max_rel_asymmetry": _asymmetry(c)})  # fmt: skip


def _rescale_percent(c: np.ndarray, s: QcSettings) -> _Repair:
    b = angle_stats(c).baseline
    if not (
        math.isfinite(b)
        and abs(b - 1.0) > s.baseline_tolerance
        and abs(b / 100.0 - 1.0) <= s.baseline_tolerance
    ):
        return None
    c /= 100.0
    return ("scale", c.size, "divided by 100 (data in percent)", {"baseline": b},
            {"baseline": angle_stats(c).baseline})  # fmt: skip


def _mask_negative(c: np.ndarray, s: QcSettings) -> _Repair:
    """Negative → NaN, with the partner (a negative c2[i, j] makes c2[j, i] suspect)."""
    with np.errstate(invalid="ignore"):
        negative = c < 0
    negative |= negative.T
    if not negative.any():
        return None
    lowest = float(np.nanmin(c[negative]))
    n_neg = int(negative.sum())
    c[negative] = np.nan
    return ("negative", n_neg, "masked: set to NaN with the symmetric element (not fitted)",
            {"min": lowest}, {"negative": 0, "masked": n_neg})  # fmt: skip


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
    return data.select_angles(np.array(kept, dtype=np.int64)), dropped, kept
