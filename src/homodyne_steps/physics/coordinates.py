r"""Sampling coordinates of the two power laws, D(t) and γ̇(t).

The model has f(t) = a·t^e + o for D(t) (a = D0, e = alpha, o = D_offset) and for γ̇(t)
(a = gamma_dot_t0, e = beta, o = gamma_dot_t_offset). The data constrain the integral
of f over the measured times, not a and o separately: the posterior of (a, e, o) is a
narrow *curved* valley (a and o trade off, more so the nearer e is to 0), in which NUTS
needs hundreds of leapfrog steps per draw and chains started together drift apart.

The ``rates`` coordinates replace (a, o) by the means of f over the early and the late
half of the measured times::

    f_early = a·m_early(e) + o,    f_late = a·m_late(e) + o,    m_half(e) = mean(t^e)

For fixed e this map is linear, and the two means are what the data measure, so the
posterior in (e, f_early, f_late) is close to Gaussian. The inverse is
a = (f_early − f_late)/(m_early − m_late), o = f_early − a·m_early, with
|∂(a, o)/∂(f_early, f_late)| = 1/|m_early − m_late| (singular at e = 0, where a and o are
the same thing).

All functions work on NumPy and JAX arrays; ``exponent`` and the values may carry
leading (chain, draw) dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# ``cmc.sampler.reparameterize``: the coordinates a shard's sampler moves in
SAMPLING_COORDINATES = ("rates", "log_reference", "none")
DEFAULT_COORDINATES = "rates"  # cmc.sampler.reparameterize when not set
# Those whose shards may be combined: they reach every rate of D(t) and γ̇(t) and so
# cross exponent = 0 (at fixed rates the amplitude passes through ±∞ there). In
# ``log_reference`` and ``none`` the amplitude is a coordinate: a shard cannot reach the
# far side of exponent = 0 and is cut wherever its posterior gets there (near alpha = 0,
# or whenever a shard's alpha sd is comparable with |alpha|), and a cut shard is not
# Gaussian, which consensus needs (measured with cut shards: K = 8 sds 15–24 % too wide).
SHARDABLE_COORDINATES = ("rates",)

# (amplitude, exponent, offset, (early mean, late mean)) of D(t) and γ̇(t)
POWER_LAWS = (
    ("D0", "alpha", "D_offset", ("D_early", "D_late")),
    ("gamma_dot_t0", "beta", "gamma_dot_t_offset", ("gamma_dot_early", "gamma_dot_late")),
)


def split_times(t: Any) -> tuple[np.ndarray, np.ndarray]:
    """The positive measured times (s), split into an early and a late half."""
    t = np.asarray(t, dtype=np.float64)
    t = np.sort(t[t > 0])
    if t.size < 2:
        raise ValueError("the rates coordinates need at least two positive times")
    return t[: t.size // 2], t[t.size // 2 :]


def window_means(exponent, t_early, t_late):
    """mean(t^exponent) over the early and the late half of the times."""
    e = exponent[..., None] if hasattr(exponent, "ndim") else exponent
    return (t_early**e).mean(axis=-1), (t_late**e).mean(axis=-1)


def power_law_from_rates(early, late, exponent, t_early, t_late):
    """(amplitude, offset, gap) with gap = m_early − m_late; the Jacobian of the map is
    |∂(amplitude, offset)/∂(early, late)| = 1/|gap|."""
    m_e, m_l = window_means(exponent, t_early, t_late)
    gap = m_e - m_l
    amplitude = (early - late) / gap
    return amplitude, early - amplitude * m_e, gap


def rates_from_power_law(amplitude, exponent, offset, t_early, t_late):
    """(early, late): the means of amplitude·t^exponent + offset over the two halves."""
    m_e, m_l = window_means(exponent, t_early, t_late)
    return amplitude * m_e + offset, amplitude * m_l + offset


def rates_jacobian(names: Sequence[str], theta: Any, t: Any, free: Any = None) -> np.ndarray:
    """∂θ/∂u at θ (p × p), u the rates coordinates of each power law in ``names`` (the
    amplitude's column becomes f_early, the offset's f_late; the exponent and every other
    parameter stay themselves); the identity for a law with a fixed member (``free``
    False) or with its exponent at 0, where the map is singular.

    In θ the amplitude's and the offset's columns of a Jacobian become collinear as the
    exponent goes to 0 (t^e ≈ 1 + e·log t), so a normal matrix looks singular where the
    data still fix f(t) well; in u it does not (:func:`homodyne_steps.inference.
    identification.identify`, ``transform``).
    """
    names = list(names)
    theta = np.asarray(theta, dtype=np.float64)
    free = np.ones(theta.size, bool) if free is None else np.asarray(free, bool)
    jac = np.eye(theta.size)
    t_early, t_late = split_times(t)
    for amp, exp_name, off, _ in POWER_LAWS:
        if not {amp, exp_name, off} <= set(names):
            continue
        ka, ke, ko = (names.index(n) for n in (amp, exp_name, off))
        a, e = theta[ka], theta[ke]
        m_e, m_l = window_means(e, t_early, t_late)
        gap = m_e - m_l
        if not (free[ka] and free[ke] and free[ko]) or abs(gap) < 1e-12 * abs(m_e):
            continue
        dm_e = np.mean(t_early**e * np.log(t_early))  # ∂m/∂e
        dm_l = np.mean(t_late**e * np.log(t_late))
        da_de = -a * (dm_e - dm_l) / gap
        jac[ka, [ka, ke, ko]] = 1.0 / gap, da_de, -1.0 / gap
        jac[ko, [ka, ke, ko]] = 1.0 - m_e / gap, -(da_de * m_e + a * dm_e), m_e / gap
    return jac


def to_rates(draws: np.ndarray, names: Sequence[str], t_early, t_late) -> np.ndarray:
    """Draws (..., p) with columns ``names``: amplitude columns replaced by the early
    means and offset columns by the late means, for each power law present."""
    out = np.array(draws, dtype=np.float64, copy=True)
    for amp, exp_name, off, _ in POWER_LAWS:
        if amp in names:
            ka, ke, ko = (names.index(n) for n in (amp, exp_name, off))
            out[..., ka], out[..., ko] = rates_from_power_law(
                draws[..., ka], draws[..., ke], draws[..., ko], t_early, t_late
            )
    return out


def from_rates(draws: np.ndarray, names: Sequence[str], t_early, t_late) -> np.ndarray:
    """Inverse of :func:`to_rates`."""
    out = np.array(draws, dtype=np.float64, copy=True)
    for amp, exp_name, off, _ in POWER_LAWS:
        if amp in names:
            ka, ke, ko = (names.index(n) for n in (amp, exp_name, off))
            out[..., ka], out[..., ko], _ = power_law_from_rates(
                draws[..., ka], draws[..., ko], draws[..., ke], t_early, t_late
            )
    return out
