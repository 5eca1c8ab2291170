r"""The space a CMC shard samples: its parameters, their priors, and the coordinates.

Consensus Monte Carlo multiplies K shard posteriors, so each shard must target

    p_k(u) ∝ L_k(θ(u)) · [π(θ(u)) · |∂θ/∂u|]^(1/K)

in the coordinates u where the draws are *combined*: the prior and the Jacobian of
every change of variables are tempered together, so that the product over the K shards
counts each exactly once. Tempering only the prior and leaving a Jacobian whole counts
that Jacobian K times: for the rates coordinates |∂θ/∂u| = 1/|m_early(α) − m_late(α)|,
which grows without limit as α → 0, and for a bounded site NumPyro's own transform adds
(x − lo)(hi − x) to a power that pushes mass to the bounds.

Here every shard samples one unconstrained vector w (``ImproperUniform``), and its
log density is written out in full (:func:`shard_log_density`)::

    log L_k(θ) + (1/K)·log π(θ) + log|∂θ/∂w| − (1 − 1/K)·log|∂θ/∂u|

which is the density above expressed in w. The combination coordinates u are always
:data:`COMBINATION` (the ``rates`` coordinates, see :mod:`coordinates`, with every
bounded parameter through a logit), because there the shard posteriors are close to
Gaussian, which consensus assumes; the sampling coordinates w (``cmc.sampler.
reparameterize``) only change how efficiently NUTS explores, never the answer.

Coordinates (per parameter, in the θ column order):

- a parameter with finite bounds: z = logit((x − lo)/(hi − lo)); one lower bound:
  z = log(x − lo); none: z = x.
- ``rates`` (and :data:`COMBINATION`): each power law a·t^e + o present becomes
  (f_early, logit e, f_late) in the columns of (a, e, o); a and o are then limited by
  their prior (zero density outside the bounds), not by a transform.
- ``log_reference``: a becomes log a + e·log t_ref (the log rate at the geometric-mean
  time); e and o keep their logits.
- ``none``: every parameter through its own transform.

All functions take NumPy or JAX arrays with the parameters on the last axis.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from homodyne_steps._jax import jnp
from homodyne_steps.coordinates import POWER_LAWS, window_means

SAMPLING_COORDINATES = ("rates", "log_reference", "none")
COMBINATION = "rates"  # the coordinates in which shard draws are combined


@dataclass(frozen=True)
class SampledSpace:
    """The parameters one shard samples (θ), their priors and the time windows.

    ``columns[j]`` says where θ_j lives in the shard's posterior: (variable, index) for
    a per-angle or vector variable, (variable, None) for a scalar. Priors are
    ``Normal(mu, sigma)`` restricted to [lower, upper] (±inf: unbounded).
    """

    names: tuple[str, ...]
    columns: tuple[tuple[str, int | None], ...]
    lower: np.ndarray
    upper: np.ndarray
    prior_mu: np.ndarray
    prior_sigma: np.ndarray
    t_early: np.ndarray | None = None  # measured times (s) of the rates coordinates
    t_late: np.ndarray | None = None
    log_t_ref: float = 0.0

    @property
    def size(self) -> int:
        return len(self.names)

    def groups(self) -> list[tuple[int, int, int]]:
        """(amplitude, exponent, offset) column indices of each power law present."""
        return [
            tuple(self.names.index(n) for n in (amp, exp_name, off))
            for amp, exp_name, off, _ in POWER_LAWS
            if amp in self.names
        ]

    def to_json(self) -> str:
        def arr(x):
            return None if x is None else np.asarray(x, dtype=np.float64).tolist()

        def bound(x):  # JSON has no infinity
            return [None if not math.isfinite(v) else v for v in np.asarray(x).tolist()]

        return json.dumps(
            {
                "names": list(self.names),
                "columns": [list(c) for c in self.columns],
                "lower": bound(self.lower),
                "upper": bound(self.upper),
                "prior_mu": arr(self.prior_mu),
                "prior_sigma": arr(self.prior_sigma),
                "t_early": arr(self.t_early),
                "t_late": arr(self.t_late),
                "log_t_ref": self.log_t_ref,
                "combination": COMBINATION,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> SampledSpace:
        m = json.loads(text)

        def bound(values, inf):
            return np.array([inf if v is None else v for v in values], dtype=np.float64)

        def arr(x):
            return None if x is None else np.asarray(x, dtype=np.float64)

        return cls(
            names=tuple(m["names"]),
            columns=tuple((str(v), None if i is None else int(i)) for v, i in m["columns"]),
            lower=bound(m["lower"], -np.inf),
            upper=bound(m["upper"], np.inf),
            prior_mu=arr(m["prior_mu"]),
            prior_sigma=arr(m["prior_sigma"]),
            t_early=arr(m["t_early"]),
            t_late=arr(m["t_late"]),
            log_t_ref=float(m["log_t_ref"]),
        )


def make_space(
    names: Sequence[str],
    lower: Sequence[float],
    upper: Sequence[float],
    prior_mu: Sequence[float],
    prior_sigma: Sequence[float],
    *,
    columns: Sequence[tuple[str, int | None]] | None = None,
    t: Any = None,
) -> SampledSpace:
    """A :class:`SampledSpace`; ``t`` (the measured times, s) defines the rates windows
    and t_ref (needed only when a power law is present)."""
    from homodyne_steps.coordinates import split_times

    t_early = t_late = None
    log_t_ref = 0.0
    if t is not None:
        t = np.asarray(t, dtype=np.float64)
        t_pos = t[t > 0]
        if t_pos.size >= 2:
            t_early, t_late = split_times(t_pos)
            log_t_ref = float(np.mean(np.log(t_pos)))
    return SampledSpace(
        names=tuple(names),
        columns=tuple(columns) if columns is not None else tuple((n, None) for n in names),
        lower=np.asarray(lower, dtype=np.float64),
        upper=np.asarray(upper, dtype=np.float64),
        prior_mu=np.asarray(prior_mu, dtype=np.float64),
        prior_sigma=np.asarray(prior_sigma, dtype=np.float64),
        t_early=t_early,
        t_late=t_late,
        log_t_ref=log_t_ref,
    )


# ---------------------------------------------------------------------------------------
# One-parameter transforms z <-> x and log|dx/dz| (as a function of x)
# ---------------------------------------------------------------------------------------
def _x_from_z(z, lo: float, hi: float):
    if math.isfinite(lo) and math.isfinite(hi):
        return lo + (hi - lo) / (1.0 + jnp.exp(-z))
    if math.isfinite(lo):
        return lo + jnp.exp(z)
    if math.isfinite(hi):
        return hi - jnp.exp(-z)
    return z


def _z_from_x(x, lo: float, hi: float):
    if math.isfinite(lo) and math.isfinite(hi):
        return jnp.log(x - lo) - jnp.log(hi - x)
    if math.isfinite(lo):
        return jnp.log(x - lo)
    if math.isfinite(hi):
        return -jnp.log(hi - x)
    return x


def _log_dx_dz(x, lo: float, hi: float):
    if math.isfinite(lo) and math.isfinite(hi):
        return jnp.log(x - lo) + jnp.log(hi - x) - math.log(hi - lo)
    if math.isfinite(lo):
        return jnp.log(x - lo)
    if math.isfinite(hi):
        return jnp.log(hi - x)
    return jnp.zeros_like(x)


def _roles(space: SampledSpace, coords: str) -> list[str]:
    """What each column is in ``coords``: 'bounded' (own transform), 'early', 'late',
    'log_ref' (log amplitude at t_ref), or 'exponent' (own transform, named for clarity)."""
    if coords not in SAMPLING_COORDINATES:
        raise ValueError(f"unknown coordinates {coords!r}; expected one of {SAMPLING_COORDINATES}")
    roles = ["bounded"] * space.size
    if coords == "none":
        return roles
    for ka, ke, ko in space.groups():
        roles[ke] = "exponent"
        if coords == "rates":
            roles[ka], roles[ko] = "early", "late"
        else:
            roles[ka] = "log_ref"
    return roles


def _stack(columns):
    return jnp.stack(columns, axis=-1)


def theta_from_w(w, space: SampledSpace, coords: str):
    """θ (…, p) from the coordinates w (…, p)."""
    roles = _roles(space, coords)
    w = jnp.asarray(w)
    cols: list[Any] = [None] * space.size
    for j, role in enumerate(roles):
        if role in ("bounded", "exponent"):
            cols[j] = _x_from_z(w[..., j], space.lower[j], space.upper[j])
    for ka, ke, ko in space.groups():
        e = cols[ke]
        if roles[ka] == "early":
            m_e, m_l = window_means(e, space.t_early, space.t_late)
            amplitude = (w[..., ka] - w[..., ko]) / (m_e - m_l)
            cols[ka], cols[ko] = amplitude, w[..., ka] - amplitude * m_e
        elif roles[ka] == "log_ref":
            cols[ka] = jnp.exp(w[..., ka] - e * space.log_t_ref)
    return _stack(cols)


def w_from_theta(theta, space: SampledSpace, coords: str):
    """The coordinates w (…, p) of θ (…, p); inverse of :func:`theta_from_w`."""
    roles = _roles(space, coords)
    theta = jnp.asarray(theta)
    cols: list[Any] = [None] * space.size
    for j, role in enumerate(roles):
        if role in ("bounded", "exponent"):
            cols[j] = _z_from_x(theta[..., j], space.lower[j], space.upper[j])
    for ka, ke, ko in space.groups():
        a, e, o = theta[..., ka], theta[..., ke], theta[..., ko]
        if roles[ka] == "early":
            m_e, m_l = window_means(e, space.t_early, space.t_late)
            cols[ka], cols[ko] = a * m_e + o, a * m_l + o
        elif roles[ka] == "log_ref":
            cols[ka] = jnp.log(a) + e * space.log_t_ref
    return _stack(cols)


def log_abs_det(theta, space: SampledSpace, coords: str):
    """log|det ∂θ/∂w| at θ (…, p) for the coordinates w = ``coords``.

    Each power law's block is triangular (the exponent depends on its own coordinate
    only), so the determinant is a product of one-parameter factors and, for a power
    law, 1/|m_early − m_late| (rates) or the amplitude (log_reference).
    """
    roles = _roles(space, coords)
    theta = jnp.asarray(theta)
    total = jnp.zeros(theta.shape[:-1])
    for j, role in enumerate(roles):
        if role in ("bounded", "exponent"):
            total = total + _log_dx_dz(theta[..., j], space.lower[j], space.upper[j])
    for ka, ke, _ko in space.groups():
        if roles[ka] == "early":
            m_e, m_l = window_means(theta[..., ke], space.t_early, space.t_late)
            total = total - jnp.log(jnp.abs(m_e - m_l))
        elif roles[ka] == "log_ref":
            total = total + jnp.log(theta[..., ka])
    return total


def log_prior(theta, space: SampledSpace):
    """Σ_j log Normal(θ_j; μ_j, σ_j) up to a constant; −inf outside the bounds."""
    theta = jnp.asarray(theta)
    z = (theta - space.prior_mu) / space.prior_sigma
    inside = jnp.all((theta >= space.lower) & (theta <= space.upper), axis=-1)
    return jnp.where(inside, -0.5 * jnp.sum(jnp.where(jnp.isfinite(z), z, 0.0) ** 2, -1), -jnp.inf)


def shard_log_density(w, space: SampledSpace, coords: str, num_shards: int, loglik_fn):
    """log of L_k · [π·|∂θ/∂u|]^(1/K) expressed in the sampling coordinates w.

    Returns (log density, θ, extra) with ``loglik_fn(θ) -> (log L_k, extra)``.
    """
    temper = 1.0 / num_shards
    theta = theta_from_w(w, space, coords)
    loglik, extra = loglik_fn(theta)
    log_target = temper * log_prior(theta, space) + log_abs_det(theta, space, coords)
    if num_shards > 1 or coords != COMBINATION:
        log_target = log_target - (1.0 - temper) * log_abs_det(theta, space, COMBINATION)
    return loglik + log_target, theta, extra


def missing_prior_log_density(u, space: SampledSpace, fraction: float):
    """``fraction`` × log[π·|∂θ/∂u|] at u (…, p) in the combination coordinates: the share
    of the prior that excluded shards took with them."""
    theta = theta_from_w(u, space, COMBINATION)
    return fraction * (log_prior(theta, space) + log_abs_det(theta, space, COMBINATION))


def space_from_attrs(attrs: Mapping[str, Any]) -> SampledSpace | None:
    text = attrs.get("sampled_space")
    if text is None:
        return None
    if isinstance(text, np.ndarray):
        text = text.item()
    return SampledSpace.from_json(text)


__all__ = [
    "COMBINATION",
    "SAMPLING_COORDINATES",
    "SampledSpace",
    "log_abs_det",
    "log_prior",
    "make_space",
    "missing_prior_log_density",
    "shard_log_density",
    "space_from_attrs",
    "theta_from_w",
    "w_from_theta",
]
