r"""Starting values of the physical parameters estimated from the data.

The registry defaults (D0 = 1e4 Å²/s, γ̇0 = 1e-3 1/s, …) can lie decades from a sample's
values, and from there Levenberg–Marquardt walks the curved D0/alpha/D_offset and
γ̇0/beta/γ̇_offset valleys for hundreds of iterations or stops in another basin. The data
say where to start: how fast c2 decays with lag fixes D(t) (and how that rate changes with
age its exponent), and how the decay differs between angles fixes γ̇ and the flow angle.

Method: a coarse search of the weighted χ² — the fit's own objective with each angle's
contrast and offset solved exactly (variable projection) — on a fixed subsample of the
points (every angle, stratified over lag and age; ``SUBSAMPLE`` per angle, whatever the
data size), over grids of candidates evaluated in batches:

1. diffusion: D0 on a log grid × alpha on a grid, with D_offset = 0 and no shear (under
   flow: each angle alone, keeping the slowest D(t): the angle nearest perpendicular to
   the flow, where the shear adds least to the decay);
2. laminar flow: γ̇0 on a log grid × phi0 on a grid (γ̇_offset = 0) at that D(t), then
   beta on a grid;
3. laminar flow: the diffusion grid again, under that shear.

The exponents' grids leave out 0, where amplitude and offset of a power law are one
parameter (the fit's Jacobian would start singular).

Parameters the user gave (``nlsq.initial_parameters``) or fixed are never changed, and
stay at their values during the search. Where no candidate beats "no decay at all"
(c2 = offset) by :data:`NO_DECAY_MARGIN`, the data carry no dynamics to start from: the
defaults stay, and the fit reports what it can determine (typically nothing: failed).
The grid's best point is a start, not an estimate: the fit takes over from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from homodyne_steps._jax import jax, jnp
from homodyne_steps.physics.model import KernelGrid, diffusion_coefficient, g1_sq

SUBSAMPLE = 1500  # points per angle in the search
N_RATE = 25  # log-grid points of D0 and γ̇0 over their bounds
# alpha candidates (clipped to the bounds); not 0, where D0 and D_offset are one parameter
EXPONENTS = np.array([-1.4, -1.0, -0.7, -0.45, -0.25, -0.1, 0.1, 0.25, 0.45, 0.7, 1.0, 1.4])
SHEAR_EXPONENTS = np.array([-0.5, -0.25, -0.1, 0.1, 0.25, 0.5])  # beta candidates
N_FLOW_ANGLE = 9  # phi0 candidates over its bounds
BATCH = 64  # candidates per compiled evaluation
# χ² the best candidate must gain over "no decay" (c2 = offset) for the data to show
# dynamics; otherwise the start stays at the defaults and the fit says what it can
NO_DECAY_MARGIN = 25.0
ROUNDS = 3  # alternations of the shear and diffusion searches


@dataclass(frozen=True)
class StartSearch:
    """The chosen start over the physical names, and how it was found."""

    theta: np.ndarray
    chi2_reduced: float  # the best candidate's χ²_red on the subsample
    chi2_reduced_default: float  # the registry defaults' χ²_red on the subsample
    estimated: tuple[str, ...]  # empty: the data show no decay, the defaults stay
    chi2_reduced_no_decay: float = float("nan")  # c2 = offset alone

    def to_record(self, names: Sequence[str]) -> dict[str, Any]:
        return {
            "method": "data" if self.estimated else "registry (the data show no decay)",
            "estimated": list(self.estimated),
            "subsample_reduced_chi2_no_decay": self.chi2_reduced_no_decay,
            "values": {n: float(v) for n, v in zip(names, self.theta, strict=True)},
            "subsample_reduced_chi2": self.chi2_reduced,
            "subsample_reduced_chi2_at_defaults": self.chi2_reduced_default,
        }


def subsample(c2: np.ndarray, weight_lag: np.ndarray, n: int = SUBSAMPLE, seed: int = 0):
    """(i, j, a, d, w) of up to ``n`` usable upper-triangle points per angle: half drawn
    uniformly over the triangle, half uniformly over log-lag (short lags, where the
    decay is, hold few of the pairs)."""
    rng = np.random.default_rng(seed)
    n_phi, n_t, _ = c2.shape
    iu, ju = np.triu_indices(n_t, 1)
    lag = ju - iu
    out = []
    for a in range(n_phi):
        w = weight_lag[a][lag]
        ok = np.flatnonzero((w > 0) & np.isfinite(c2[a][iu, ju]))
        if ok.size <= n:
            pick = ok
        else:
            uniform = rng.choice(ok, n // 2, replace=False)
            lag_ok = lag[ok]
            p = 1.0 / (lag_ok * np.bincount(lag_ok)[lag_ok])  # uniform in log-lag
            short = rng.choice(ok, n - n // 2, replace=False, p=p / p.sum())
            pick = np.unique(np.r_[uniform, short])
        out.append((iu[pick], ju[pick], np.full(pick.size, a), c2[a][iu[pick], ju[pick]],
                    weight_lag[a][lag[pick]]))  # fmt: skip
    return tuple(np.concatenate(col) for col in zip(*out, strict=True))


def _chi2_batch(grid: KernelGrid, n_phi: int, points):
    """A compiled χ²(candidates): each candidate θ's (batch, p) varpro χ² per angle."""
    i, j, a, d, w = (jnp.asarray(x) for x in points)
    w2 = w * w

    def one(theta):
        g = g1_sq(theta, grid, i, j, a)

        def per_angle(x):
            return jax.ops.segment_sum(x, a, num_segments=n_phi)

        s1, sg, sgg = per_angle(w2), per_angle(w2 * g), per_angle(w2 * g * g)
        sd, sgd, sdd = per_angle(w2 * d), per_angle(w2 * g * d), per_angle(w2 * d * d)
        det = sgg * s1 - sg * sg
        ok = det > 1e-12 * jnp.maximum(sgg * s1, 1e-300)
        safe = jnp.where(ok, det, 1.0)
        c = jnp.where(ok, (s1 * sgd - sg * sd) / safe, 0.0)
        o = jnp.where(ok, (sgg * sd - sg * sgd) / safe, sd / s1)
        # a negative contrast is no decay at all: score it as the offset alone
        c, o = jnp.where(c > 0, c, 0.0), jnp.where(c > 0, o, sd / s1)
        return c * c * sgg + 2 * c * o * sg + o * o * s1 - 2 * c * sgd - 2 * o * sd + sdd

    return jax.jit(jax.vmap(one))


def _no_decay_chi2(points, n_phi: int) -> float:
    """χ² of c2 = offset alone (each angle's weighted mean): no dynamics at all."""
    _, _, a, d, w = points
    w2 = w * w
    s1, sd = np.bincount(a, w2, n_phi), np.bincount(a, w2 * d, n_phi)
    sdd = np.bincount(a, w2 * d * d, n_phi)
    return float(np.sum(sdd - sd * sd / np.where(s1 > 0, s1, 1.0)))


def _per_angle(evaluate, candidates: np.ndarray) -> np.ndarray:
    """χ² (n_candidates, n_phi), +inf where not finite."""
    values = []
    for k in range(0, candidates.shape[0], BATCH):
        chunk = candidates[k : k + BATCH]
        pad = BATCH - chunk.shape[0]
        batch = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
        values.append(np.asarray(evaluate(jnp.asarray(batch)))[: chunk.shape[0]])
    chi2 = np.concatenate(values)
    return np.where(np.isfinite(chi2), chi2, np.inf)


def _best(evaluate, candidates: np.ndarray) -> tuple[np.ndarray, float]:
    chi2 = _per_angle(evaluate, candidates).sum(axis=1)
    k = int(np.argmin(chi2))
    return candidates[k], float(chi2[k])


def _slowest_angle_best(evaluate, candidates: np.ndarray, rate) -> np.ndarray:
    """Each angle's best candidate alone; the one whose D(t) is slowest: at the angle
    nearest perpendicular to the flow the shear adds least to the decay."""
    chi2 = _per_angle(evaluate, candidates)
    best = candidates[np.argmin(chi2, axis=0)]  # (n_phi, p)
    return best[int(np.argmin([rate(b) for b in best]))]


def _grid(base: np.ndarray, axes: dict[int, np.ndarray], free: np.ndarray) -> np.ndarray:
    """Candidates: ``base`` with the free ones among ``axes`` (index → values) varied."""
    axes = {k: v for k, v in axes.items() if free[k]}
    if not axes:
        return base[None, :]
    mesh = np.meshgrid(*axes.values(), indexing="ij")
    out = np.repeat(base[None, :], mesh[0].size, 0)
    for k, m in zip(axes, mesh, strict=True):
        out[:, k] = m.ravel()
    return out


def search_start(
    grid: KernelGrid,
    c2: np.ndarray,
    sigma_lag: np.ndarray,
    names: Sequence[str],
    theta0: np.ndarray,
    free: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
) -> StartSearch:
    """The data's start (module docstring). ``theta0``: the values of the parameters not
    searched (``free`` False) and the defaults of the others; bounds over ``names``."""
    names = list(names)
    idx = {n: names.index(n) for n in names}
    sigma_lag = np.asarray(sigma_lag, np.float64)
    ok = np.isfinite(sigma_lag) & (sigma_lag > 0)
    weight_lag = np.where(ok, 1.0 / np.where(ok, sigma_lag, 1.0), 0.0)
    weight_lag[:, 0] = 0.0  # the diagonal is never fitted
    points = subsample(np.asarray(c2, np.float64), weight_lag)
    evaluate = _chi2_batch(grid, c2.shape[0], points)
    dof = max(points[0].size - len(names) - 2 * c2.shape[0], 1)
    theta = np.asarray(theta0, dtype=np.float64).copy()
    _, chi2_default = _best(evaluate, theta[None, :])
    chi2 = chi2_default
    for n, v in (("D_offset", 0.0), ("beta", 0.1), ("gamma_dot_t_offset", 0.0)):
        if n in idx and free[idx[n]]:
            theta[idx[n]] = np.clip(v, lower[idx[n]], upper[idx[n]])
    rates = {n: np.geomspace(lower[idx[n]], upper[idx[n]], N_RATE)
             for n in ("D0", "gamma_dot_t0") if n in idx}  # fmt: skip
    diffusion = {idx["D0"]: rates["D0"],
                 idx["alpha"]: np.unique(np.clip(EXPONENTS, lower[idx["alpha"]],
                                                 upper[idx["alpha"]]))}  # fmt: skip
    shear_on = "gamma_dot_t0" in idx
    if shear_on:  # no shear while D(t) is found: the slowest angle's decay is diffusion
        saved = theta[idx["gamma_dot_t0"]]
        if free[idx["gamma_dot_t0"]]:
            theta[idx["gamma_dot_t0"]] = lower[idx["gamma_dot_t0"]]
    if shear_on:  # D(t) from the slowest angle, where shear adds least to the decay
        t_mid = np.array([np.median(np.asarray(grid.t_safe))])

        def rate(th):
            return float(diffusion_coefficient(jnp.asarray(th), jnp.asarray(t_mid))[0])

        theta = _slowest_angle_best(evaluate, _grid(theta, diffusion, free), rate)
    else:
        theta, chi2 = _best(evaluate, _grid(theta, diffusion, free))
    if shear_on:
        if not free[idx["gamma_dot_t0"]]:
            theta[idx["gamma_dot_t0"]] = saved
        k0 = idx["phi0"]
        flow = {idx["gamma_dot_t0"]: rates["gamma_dot_t0"],
                k0: np.linspace(lower[k0], upper[k0], N_FLOW_ANGLE)}  # fmt: skip
        kb = idx["beta"]
        beta = {kb: np.unique(np.clip(SHEAR_EXPONENTS, lower[kb], upper[kb]))}
        for _ in range(ROUNDS):  # diffusion and shear trade off at angles along the flow
            theta, chi2 = _best(evaluate, _grid(theta, flow, free))
            theta, chi2 = _best(evaluate, _grid(theta, beta, free))
            theta, chi2 = _best(evaluate, _grid(theta, diffusion, free))
    estimated = tuple(n for n in names if free[idx[n]])
    no_decay = _no_decay_chi2(points, c2.shape[0])
    if no_decay - chi2 < max(NO_DECAY_MARGIN, 1e-3 * no_decay):  # nothing to start from
        theta = np.asarray(theta0, dtype=np.float64).copy()
        estimated = ()
    return StartSearch(theta, chi2 / dof, chi2_default / dof, estimated, no_decay / dof)


__all__ = ["StartSearch", "search_start", "subsample"]
