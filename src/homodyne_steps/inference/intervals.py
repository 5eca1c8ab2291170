r"""Intervals that follow the D(t) and γ̇(t) valleys: the NLSQ covariance propagated
through the rates coordinates.

±σ from a covariance is a straight line through a curved valley. On speckle files the
data fix D(t) over the measured window, and an optimum at alpha = −1.1 (truth −0.3) has
D_offset = 6200 ± 1050 (truth 1000): along the valley D_offset falls to 1000 within one σ
of alpha, but the local slope ∂D_offset/∂alpha is small there, so ±1.96σ missed the
truth in 7 of 30 static files (z up to 5.3); likewise gamma_dot_t0 at beta ≈ 1.1.

In the rates coordinates u (each power law as its means over the early and the late half
of the times, and its exponent; :mod:`homodyne_steps.physics.coordinates`) the valley is
nearly straight and the likelihood close to Gaussian. So the covariance is carried to u
(V_u = A⁻¹ V A⁻ᵀ, A = ∂θ/∂u), draws from N(û, V_u) are mapped back through the exact,
non-linear map, draws outside the bounds are dropped, and the intervals are the draws'
central 68 % and 95 % quantiles: asymmetric where the valley bends, ±σ where it does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from homodyne_steps.physics.coordinates import (
    POWER_LAWS,
    rates_jacobian,
    split_times,
    to_rates,
    window_means,
)

LEVELS = {"68": (0.15865525393145707, 0.8413447460685429),
          "95": (0.025, 0.975)}  # fmt: skip
N_DRAWS = 100_000  # the 97.5 % point of a heavy tail (D0 near alpha = 0) needs many
MIN_ACCEPTED = 0.01  # fewer draws inside the bounds: the Gaussian says nothing there


def valley_intervals(
    names: Sequence[str],
    theta: Any,
    covariance: Any,
    t: Any,
    lower: Any,
    upper: Any,
    seed: int = 0,
    n_draws: int = N_DRAWS,
) -> dict[str, dict[str, tuple[float, float]]]:
    """{name: {"68": (lo, hi), "95": (lo, hi)}} for every parameter with a finite σ.

    ``covariance`` is over ``names`` (NaN rows: fixed or not identified, skipped, and
    so is any power law one of whose members has no σ); ``t`` the measured times (s).
    Where fewer than :data:`MIN_ACCEPTED` of the draws fall inside the bounds the
    intervals are ±σ cut to the bounds.
    """
    names = list(names)
    theta = np.asarray(theta, dtype=np.float64)
    cov = np.asarray(covariance, dtype=np.float64)
    lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
    ok = np.isfinite(np.diag(cov)) & (np.diag(cov) > 0)
    if not ok.any():
        return {}
    idx = np.flatnonzero(ok)
    sub_names = [names[k] for k in idx]
    a = rates_jacobian(sub_names, theta[idx], t)
    a_inv = np.linalg.inv(a)
    v_u = a_inv @ cov[np.ix_(idx, idx)] @ a_inv.T
    u_hat = _to_u(sub_names, theta[idx], a, t)
    rng = np.random.default_rng(seed)
    scale = np.sqrt(np.diag(v_u))
    corr = v_u / np.outer(scale, scale)
    eig, vec = np.linalg.eigh(corr)
    root = vec * np.sqrt(np.clip(eig, 0.0, None))
    u = u_hat + (rng.standard_normal((n_draws, idx.size)) @ root.T) * scale
    draws = _to_theta(sub_names, u, a, t)
    inside = np.all(np.isfinite(draws), axis=1) & np.all(
        (draws >= lower[idx]) & (draws <= upper[idx]), axis=1
    )
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for j, name in enumerate(sub_names):
        sd = float(np.sqrt(cov[idx[j], idx[j]]))
        out[name] = {}
        for level, (q_lo, q_hi) in LEVELS.items():
            if inside.mean() >= MIN_ACCEPTED:
                lo, hi = np.quantile(draws[inside, j], [q_lo, q_hi])
            else:
                z = {"68": 1.0, "95": 1.959963984540054}[level]
                lo = max(theta[idx[j]] - z * sd, lower[idx[j]])
                hi = min(theta[idx[j]] + z * sd, upper[idx[j]])
            out[name][level] = (float(lo), float(hi))
    return out


def _groups(names: list[str], a: np.ndarray):
    """(amplitude, exponent, offset) columns of the power laws ``a`` puts in rates."""
    for amp, exp_name, off, _ in POWER_LAWS:
        if {amp, exp_name, off} <= set(names):
            ka, ke, ko = (names.index(n) for n in (amp, exp_name, off))
            if a[ka, ko] != 0.0:  # else rates_jacobian kept it in θ (exponent at 0)
                yield ka, ke, ko


def _to_u(names: list[str], theta: np.ndarray, a: np.ndarray, t) -> np.ndarray:
    moved = {k for g in _groups(names, a) for k in g}
    shown = [n if k in moved else "" for k, n in enumerate(names)]
    return to_rates(theta, shown, *split_times(t))


def _to_theta(names: list[str], u: np.ndarray, a: np.ndarray, t) -> np.ndarray:
    """θ of the draws u (n, p): :func:`from_rates` with the window means of t^e
    interpolated on a fine grid of e (exact, mean(t^e) over 1000 times for 1e5 draws
    takes seconds)."""
    t_early, t_late = split_times(t)
    theta = u.copy()
    for ka, ke, ko in _groups(names, a):
        e = u[:, ke]
        grid = np.linspace(e.min(), e.max(), 2001)
        m_grid = window_means(grid, t_early, t_late)
        m_e, m_l = (np.interp(e, grid, m) for m in m_grid)
        with np.errstate(divide="ignore", invalid="ignore"):
            amplitude = (u[:, ka] - u[:, ko]) / (m_e - m_l)
        theta[:, ka], theta[:, ko] = amplitude, u[:, ka] - amplitude * m_e
    return theta


__all__ = ["LEVELS", "valley_intervals"]
