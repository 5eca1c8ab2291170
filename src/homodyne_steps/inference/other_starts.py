"""Fits from other starts than the first: the Latin-hypercube multistart over the bounds,
and the check of a fit from a given start against a fit from the data's start.

A fit started where the user said (``nlsq.initial_parameters``) can slide along a
degenerate valley onto a bound and stop there: a local optimum that looks converged
(laminar flow from D0 = 1e5 ends on gamma_dot_t_offset = -0.1 with χ² 3300 above the
optimum). Such a fit, or one that did not converge, is fitted once more from the data's
start (:mod:`homodyne_steps.inference.start_values`), and the lower χ² is kept; the
record says both, so a user who gave the start sees that it was overruled and why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from homodyne_steps.inference.lm import FitResult
from homodyne_steps.physics.registry import Registry

#: χ² by which the data's start must beat the given one to be kept
CHI2_MARGIN = 1.0


def latin_hypercube(names: Sequence[str], registry: Registry, n: int, seed: int) -> np.ndarray:
    """``n`` starts spread over the bounds (log-spaced for log-scale parameters)."""
    from scipy.stats import qmc

    u = qmc.LatinHypercube(d=len(names), seed=seed).random(n)
    out = np.empty_like(u)
    for k, name in enumerate(names):
        lo, hi = registry[name].bounds
        if registry[name].log_scale:
            out[:, k] = np.exp(np.log(lo) + u[:, k] * (np.log(hi) - np.log(lo)))
        else:
            out[:, k] = lo + u[:, k] * (hi - lo)
    return out


def distinct_minima(results: list[FitResult]) -> list[int]:
    """Indices of results that are distinct minima: χ² apart by > 1, or any parameter
    farther than 3 standard deviations (of the best fit) from every kept minimum."""
    order = sorted(range(len(results)), key=lambda k: results[k].chi_squared)
    best = results[order[0]]
    sd = np.sqrt(np.abs(np.diag(best.covariance_x)))[: best.physical.size]
    kept: list[int] = []
    for k in order:
        r = results[k]
        if not np.isfinite(r.chi_squared):
            continue
        same = any(
            abs(r.chi_squared - results[m].chi_squared) <= 1.0
            and np.all(np.abs(r.physical - results[m].physical) <= 3 * np.where(sd > 0, sd, np.inf))
            for m in kept
        )
        if not same:
            kept.append(k)
    return kept


def start_check_reason(result: FitResult, names: Sequence[str]) -> str | None:
    """Why a fit from a given start must be checked against the data's start, or None."""
    p = len(names)
    on_bound = ((result.at_lower | result.at_upper) & result.free)[:p]
    if on_bound.any():
        where = ", ".join(n for n, b in zip(names, on_bound, strict=True) if b)
        return f"ended on a bound ({where})"
    if not result.converged:
        return f"did not converge ({result.status})"
    return None


def _summary(result: FitResult, names: Sequence[str]) -> dict[str, Any]:
    return {
        "chi_squared": float(result.chi_squared),
        "status": result.status,
        "parameters": {n: float(v) for n, v in zip(names, result.physical, strict=True)},
    }


def checked_start(
    result: FitResult,
    names: Sequence[str],
    fit_from_data: Callable[[], tuple[FitResult, dict[str, Any]]],
) -> tuple[FitResult, dict[str, Any] | None]:
    """``result`` or the fit from the data's start, whichever has the lower χ² (by more
    than :data:`CHI2_MARGIN`), and the record of the check (None: no check was needed).
    ``fit_from_data`` runs the other fit and returns it with its start record."""
    reason = start_check_reason(result, names)
    if reason is None:
        return result, None
    other, other_start = fit_from_data()
    better = np.isfinite(other.chi_squared) and (
        not np.isfinite(result.chi_squared) or other.chi_squared < result.chi_squared - CHI2_MARGIN
    )
    record = {
        "reason": f"the fit from the given start {reason}",
        "given_start": _summary(result, names),
        "data_start": {**_summary(other, names), "start": other_start},
        "kept": "data_start" if better else "given_start",
    }
    return (other if better else result), record


__all__ = [
    "CHI2_MARGIN",
    "checked_start",
    "distinct_minima",
    "latin_hypercube",
    "start_check_reason",
]
