"""The solver's jump along a power-law valley (used by :mod:`homodyne_steps.inference.lm`).

Where the data fix D(t) (or γ̇(t)) but hardly its parts, Levenberg–Marquardt creeps: the
valley of (D0, alpha, D_offset) is curved, each Gauss–Newton step leaves it and is cut
short, and hundreds of iterations move the parameters a few per cent (1392 iterations on
one laminar speckle file). In the rates coordinates (each power law as its means over the
early and the late half of the times, and its exponent) the valley is nearly straight, so
the displacement of the last iterations, extrapolated there, stays in it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from homodyne_steps.physics.coordinates import POWER_LAWS, from_rates, split_times, to_rates

VALLEY_STRIDES = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)  # multiples of the last window


def valley_coordinates(names: Sequence[str], t, fixed):
    """(x → u, u → x, groups): each power law in ``names`` (the first entries of x)
    whose members are all free in its rates coordinates (:func:`to_rates`), everything
    else unchanged."""
    names = list(names)
    t_early, t_late = split_times(t)
    groups = [
        tuple(names.index(n) for n in (amp, exp_name, off))
        for amp, exp_name, off, _ in POWER_LAWS
        if {amp, exp_name, off} <= set(names)
        and not np.asarray(fixed)[[names.index(n) for n in (amp, exp_name, off)]].any()
    ]
    # a law with a fixed member keeps θ: hide its names from the rates map
    moved = {k for g in groups for k in g}
    shown = [n if k in moved else "" for k, n in enumerate(names)]
    return (
        lambda x: to_rates(x, shown, t_early, t_late),
        lambda u: from_rates(u, shown, t_early, t_late),
        groups,
    )


def valley_jump(
    x_now: np.ndarray,
    x_back: np.ndarray,
    chi2_now: float,
    chi2_of: Callable[[np.ndarray], float],
    names: Sequence[str],
    t,
    lower: np.ndarray,
    upper: np.ndarray,
    fixed: np.ndarray,
) -> np.ndarray | None:
    """A point further along the way the fit moved from ``x_back`` to ``x_now``, or None.

    The displacement in the rates coordinates is extrapolated by :data:`VALLEY_STRIDES`;
    the longest stride that keeps lowering χ² (``chi2_of``: a value pass) is taken. A
    stride that leaves the bounds is shortened to them, and a power law with a member on
    a bound stays where it is (D0 held at 1e5 while the shear law goes on).
    """
    to_u, to_x, groups = valley_coordinates(names, t, fixed)
    u_now, step = to_u(x_now), to_u(x_now) - to_u(x_back)
    on_bound = (x_now <= lower) | (x_now >= upper)
    for group in groups:
        if on_bound[list(group)].any():
            step[list(group)] = 0.0
    step[on_bound] = 0.0

    def inside(x) -> bool:
        return bool(np.all(np.isfinite(x)) and np.all((x >= lower) & (x <= upper)))

    def at(stride: float) -> np.ndarray:
        return to_x(u_now + (stride - 1.0) * step)

    best, best_chi2, last_ok = None, chi2_now, 1.0
    for stride in VALLEY_STRIDES:
        x_try = at(stride)
        if not inside(x_try):  # shorten to the bounds (bisection on the stride)
            lo, hi = last_ok, stride
            for _ in range(30):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if inside(at(mid)) else (lo, mid)
            x_try = at(lo)
            if lo <= last_ok or not inside(x_try):
                break
        chi2 = chi2_of(x_try)
        if not (np.isfinite(chi2) and chi2 < best_chi2):
            break
        best, best_chi2, last_ok = x_try, chi2, stride
        if not inside(at(stride)):
            break  # landed on a bound
    return best


__all__ = ["VALLEY_STRIDES", "valley_coordinates", "valley_jump"]
