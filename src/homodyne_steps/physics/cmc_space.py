r"""The space a CMC shard samples: its parameters, their priors, and the coordinates.

Consensus Monte Carlo multiplies K shard posteriors. The textbook recipe gives each
shard the prior tempered to π^(1/K); then the product is the full posterior, but only
if every shard posterior is Gaussian where the draws are combined, and a tempered prior
is what makes them skewed: near alpha = 0 the data fix D(t) but not D0 and D_offset
separately, D0 = (D_early − D_late)/(m_early(α) − m_late(α)) runs off to ±∞, and it is
the prior on D0 and D_offset that holds alpha there, a strongly non-Gaussian factor
(measured: 1 posterior sd between K = 1 and K = 4 on 3 φ × 150 frames, α = −0.1).

So the prior is applied once, after the combination, and exactly:

1. Each shard targets L_k(θ(u)) · G(u)^(1/K) in the combination coordinates u, with G a
   Gaussian *surrogate* prior in u (centred on the approximate posterior mode, NLSQ's
   Gaussian likelihood times π, and 3 of its standard deviations wide,
   :mod:`homodyne_steps.inference.surrogate`: it keeps the target proper and near the
   posterior, and being Gaussian it leaves the shard posteriors as Gaussian as the
   likelihood, which is close to Gaussian in u). The power laws' bounds are not
   imposed on the shards (a shard cut by a bound is not Gaussian); they act in the
   prior, after the combination. The shards keep only the sign convention of the shear
   rate (:func:`shear_sign_ok`).
2. The Gaussian consensus of the shards is then a draw of L·G^(K_used/K).
3. Importance weights π(θ(u))·|∂θ/∂u| / G(u)^(K_used/K) (Pareto-smoothed) turn those
   draws into draws of the full posterior L·π; the Pareto k̂ says whether they can.
   Where they cannot, the Gaussian likelihood the draws imply times π is sampled
   afresh (:mod:`homodyne_steps.inference.prior_sampling`).

Whatever the sampling coordinates w (``cmc.sampler.reparameterize``), the shard target
is the same measure: in w it carries log|∂θ/∂w| − log|∂θ/∂u| (:func:`shard_log_density`).
The combination coordinates u are always :data:`COMBINATION`, the ``rates`` coordinates
(see :mod:`coordinates`) with every bounded parameter through a logit.

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
from homodyne_steps.physics.coordinates import POWER_LAWS, SAMPLING_COORDINATES, window_means

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
    # the shards' surrogate prior G: independent normals in the combination coordinates
    surrogate_mu: np.ndarray | None = None
    surrogate_sd: np.ndarray | None = None

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
                "surrogate_mu": arr(self.surrogate_mu),
                "surrogate_sd": arr(self.surrogate_sd),
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
            surrogate_mu=arr(m.get("surrogate_mu")),
            surrogate_sd=arr(m.get("surrogate_sd")),
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
    from homodyne_steps.physics.coordinates import split_times

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


SURROGATE_WIDTH = 3.0  # the surrogate prior's width in NLSQ standard deviations


def with_surrogate(
    space: SampledSpace, theta0: Any, sd_theta: Any, width: float = SURROGATE_WIDTH
) -> SampledSpace:
    """``space`` with the surrogate prior G centred on θ0 in u, each sd ``width`` × the
    θ standard deviations ``sd_theta`` carried to u (correlations ignored, which only
    widens it)."""
    from dataclasses import replace

    from homodyne_steps._jax import jax

    theta0 = jnp.asarray(np.asarray(theta0, dtype=np.float64))
    jac = np.asarray(jax.jacfwd(lambda x: w_from_theta(x, space, COMBINATION))(theta0))
    sd_u = width * np.sqrt((jac**2) @ (np.asarray(sd_theta, dtype=np.float64) ** 2))
    u0 = np.asarray(w_from_theta(theta0, space, COMBINATION))
    if not (np.all(np.isfinite(u0)) and np.all(np.isfinite(sd_u)) and np.all(sd_u > 0)):
        raise ValueError(
            f"cannot centre the shards' surrogate prior on {np.asarray(theta0).tolist()} "
            f"(sd {np.asarray(sd_theta).tolist()}): a value on a bound or a zero width"
        )
    return replace(space, surrogate_mu=u0, surrogate_sd=sd_u)


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


def log_surrogate(u, space: SampledSpace):
    """log G(u) up to a constant: the shards' broad Gaussian surrogate prior."""
    if space.surrogate_mu is None or space.surrogate_sd is None:
        raise ValueError("the sampled space has no surrogate prior (surrogate_mu/sd)")
    z = (jnp.asarray(u) - space.surrogate_mu) / space.surrogate_sd
    return -0.5 * jnp.sum(z * z, axis=-1)


# The shear rate enters c2 through sinc²(·γ̇), even in γ̇: the likelihood is the same at
# γ̇(t) and −γ̇(t), which in the combination coordinates is the mirror image
# (γ̇_early, beta, γ̇_late) -> (−γ̇_early, beta, −γ̇_late). Without a convention a shard
# has both images, with a ridge at γ̇ = 0 between them. The registry's convention,
# gamma_dot_t0 > 0, is no good for the shards: at fixed rates gamma_dot_t0 changes sign
# with beta, so a shard whose beta posterior reaches 0 is cut there (235 divergences in
# 1000 draws at K = 1 on 6 φ × 80 frames, beta = 0.15 ± 0.11). The shards take the image
# whose shear rate, averaged over the early and late halves, is >= 0: a cut through the
# low-likelihood region between the images, which never bites while the data see a
# shear at all.
SHEAR_RATES = ("gamma_dot_t0", "gamma_dot_t_offset")  # (amplitude, offset) of the shear law


def with_shear_convention(theta: np.ndarray, space: SampledSpace) -> np.ndarray:
    """θ, or its mirror image −γ̇(t) (the same c2) where θ's mean shear rate is < 0."""
    theta = np.array(theta, dtype=np.float64)
    if SHEAR_RATES[0] in space.names and not bool(
        shear_sign_ok(w_from_theta(theta, space, COMBINATION), space)
    ):
        for name in SHEAR_RATES:
            theta[..., space.names.index(name)] *= -1.0
    return theta


def shear_sign_ok(u, space: SampledSpace):
    """True where the shear law's mean rate (γ̇_early + γ̇_late)/2 in the combination
    coordinates u is >= 0 (always True without a shear law): the sign convention of the
    shards and of the combined posterior (c2 cannot see the sign of γ̇)."""
    u = jnp.asarray(u)
    if SHEAR_RATES[0] not in space.names:
        return jnp.ones(u.shape[:-1], dtype=bool)
    ka, ko = (space.names.index(n) for n in SHEAR_RATES)
    return u[..., ka] + u[..., ko] >= 0.0


def shard_log_density(w, space: SampledSpace, coords: str, num_shards: int, loglik_fn):
    """log of L_k · G^(1/K) in the combination coordinates u, expressed in the sampling
    coordinates w: log L_k + (1/K)·log G(u) + log|∂θ/∂w| − log|∂θ/∂u|, restricted to
    the shear sign convention (:func:`shear_sign_ok`).

    Returns (log density, θ, extra) with ``loglik_fn(θ) -> (log L_k, extra)``.

    The shards are not held to the parameter bounds: a power law's amplitude and offset
    are linear in u and may leave them (the bounded exponent, contrast, φ0 go through
    logits and cannot). Near alpha = 0 the data fix D(t), not D0 and D_offset, and D0
    changes sign with alpha at fixed u; a shard whose alpha posterior reaches 0 would be
    cut there by the bounds of D0 (> 0), which makes it non-Gaussian and the consensus
    wrong (K = 8 on the static K-invariance case: sd +15–24 %). The bounds act once, in
    the prior applied after the combination, where a draw outside them gets weight 0.
    """
    theta = theta_from_w(w, space, coords)
    loglik, extra = loglik_fn(theta)
    if coords == COMBINATION:
        u, log_jac = w, 0.0
    else:
        u = w_from_theta(theta, space, COMBINATION)
        log_jac = log_abs_det(theta, space, coords) - log_abs_det(theta, space, COMBINATION)
    loglik = jnp.where(shear_sign_ok(u, space), loglik, -jnp.inf)
    return loglik + log_surrogate(u, space) / num_shards + log_jac, theta, extra


def log_prior_weight(u, space: SampledSpace, surrogate_fraction: float):
    """log[π(θ(u))·|∂θ/∂u| / G(u)^f]: the importance weight that turns draws of
    Π_kept L_k·G^(1/K) = L·G^f (f = kept shards / K) into draws of L·π in u (under the
    shear sign convention of :func:`shear_sign_ok`, as the shards)."""
    theta = theta_from_w(u, space, COMBINATION)
    value = (
        log_prior(theta, space)
        + log_abs_det(theta, space, COMBINATION)
        - surrogate_fraction * log_surrogate(u, space)
    )
    return jnp.where(shear_sign_ok(u, space), value, -jnp.inf)


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
    "log_prior_weight",
    "log_surrogate",
    "shard_log_density",
    "shear_sign_ok",
    "space_from_attrs",
    "with_shear_convention",
    "theta_from_w",
    "w_from_theta",
]
