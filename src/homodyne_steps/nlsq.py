r"""Bounded nonlinear least squares on the one kernel, by per-angle sufficient statistics.

Problem. Points n = (i, j, a) of the upper triangle (t1 < t2; the shot-noise diagonal is
never fitted) of every angle a, with data d_n and weights w_n = 1/σ_n::

    χ²(θ, s) = Σ_n w_n² (offset_a + contrast_a G_n(θ) − d_n)²,     G = g1² of the model.

Because c2 is linear in the per-angle scaling, one pass over the data at θ accumulates,
per angle, the sums Σw²G², Σw²G, Σw², Σw²Gd, Σw²d, Σw²d² and, with H = ∂G/∂θ,
A = Σw²HHᵀ, U = Σw²HG, V = Σw²H, Y = Σw²Hd. From these the exact χ², the Gauss–Newton
normal matrix JᵀJ and gradient Jᵀr follow for *any* per-angle scaling without touching
the data again::

    JᵀJ_θθ = Σ_a c_a² A_a          Jᵀr_θ = Σ_a c_a (c_a U_a + o_a V_a − Y_a)
    JᵀJ_θc_a = c_a U_a             JᵀJ_θo_a = c_a V_a
    JᵀJ_(c,o)_a = [[ΣGG, ΣG], [ΣG, Σ1]]_a

Each scaling mode is a linear map s = Mψ + fixed (:mod:`homodyne_steps.scaling`), so
its system is Tᵀ(JᵀJ)T with T = diag(I, M). Variable projection eliminates the scaling
exactly: for each θ the per-angle 2 × 2 system gives the optimal (c_a, o_a), and the
normal matrix of θ is the Schur complement JᵀJ_θθ − JᵀJ_θs (JᵀJ_ss)⁻¹ JᵀJ_sθ (Kaufman's
Jacobian).

Memory is O(chunk × n_params) whatever the data size: the pass is a compiled
``lax.scan`` over chunks of point indices (angle-stratified, so every chunk sees every
angle), gathering from the point arrays without copying them.

Solver: Levenberg–Marquardt with Marquardt scaling (damping ∝ diag JᵀJ, so parameters of
very different magnitudes, D0 ~ 1e4 and γ̇0 ~ 1e-4, are treated alike), box bounds by
projection with an active set (a parameter on a bound whose gradient pushes outward is
held there), and a cheap value-only pass to test a trial step before paying for the
Jacobian. Convergence: relative χ² decrease < ftol on an accepted step, a scaled step
< xtol, or a scaled projected gradient < gtol.

Uncertainties: cov = (JᵀJ)⁻¹ · χ²_red over the free parameters (scipy's
``absolute_sigma=False`` convention: if σ is misestimated or the model misfits, the
errors grow with it instead of staying optimistic).

Identification (:func:`identify`): JᵀJ is judged after normalisation to unit diagonal
(D⁻¹ JᵀJ D⁻¹, D = sqrt(diag JᵀJ), so parameter units do not matter); eigenvalues below
1e-10 of the largest span directions the data do not determine. A parameter with any
weight (> 1e-6) in those directions, no information at all, or a zero / non-finite σ is
*not identified*: its covariance row is NaN (uncertainty null in the records), never a
number. A fit that stopped on a convergence test with such parameters is
``not_identified``; one whose free parameters never left the start values and that does
not identify them is ``failed``. The covariance of the identified parameters is the
pseudo-inverse over the identified directions (it does not depend on which generalised
inverse is used, because those parameters lie in the row space of JᵀJ).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, NamedTuple

import numpy as np

from homodyne_steps._jax import jax, jnp
from homodyne_steps.model import KernelGrid, g1_sq, g1_sq_and_jacobian
from homodyne_steps.scaling import ScalingMap


class FitData(NamedTuple):
    """The data of one fit on the device; points are ids, not arrays.

    Every angle shares the time grid, so the fitted points are the same upper-triangle
    pairs (i < j) for each angle: point id n = a · n_pairs + p has angle a and times
    (pair_i[p], pair_j[p]). Data and weights are gathered from ``c2`` and the per-lag
    ``weight_lag`` = 1/σ inside the compiled pass, so no per-point array is ever built
    (23 angles × 1000 frames: 11.5 M points, ~0.5 GB less). Non-finite c2 elements get
    weight 0. Ids ≥ N (= n_phi · n_pairs) are padding and contribute nothing.
    """

    c2: jax.Array  # (P, n_t, n_t)
    weight_lag: jax.Array  # (P, n_t): 1/σ of each lag; 0 where σ is unusable
    pair_i: jax.Array  # (n_pairs,) int32
    pair_j: jax.Array  # (n_pairs,) int32


def make_fit_data(c2: np.ndarray, sigma_lag: np.ndarray) -> FitData:
    """Device arrays of a fit from (P, n_t, n_t) data and (P, n_t) σ per lag."""
    c2 = np.asarray(c2, dtype=np.float64)
    sigma_lag = np.asarray(sigma_lag, dtype=np.float64)
    ok = np.isfinite(sigma_lag) & (sigma_lag > 0)
    weight = np.where(ok, 1.0 / np.where(ok, sigma_lag, 1.0), 0.0)
    weight[:, 0] = 0.0  # the diagonal is never fitted
    i, j = np.triu_indices(c2.shape[1], k=1)
    return FitData(
        c2=jnp.asarray(c2),
        weight_lag=jnp.asarray(weight),
        pair_i=jnp.asarray(i.astype(np.int32)),
        pair_j=jnp.asarray(j.astype(np.int32)),
    )


def count_points(c2: np.ndarray, sigma_lag: np.ndarray) -> int:
    """Number of points that carry weight (finite c2 above the diagonal, usable σ)."""
    n_t = c2.shape[1]
    iu = np.triu_indices(n_t, k=1)
    lag = iu[1] - iu[0]
    ok_sigma = np.isfinite(sigma_lag) & (sigma_lag > 0)
    return int(
        sum(np.count_nonzero(np.isfinite(m[iu]) & ok_sigma[k, lag]) for k, m in enumerate(c2))
    )


def stratified_blocks(n_pairs: int, n_phi: int, chunk_size: int) -> np.ndarray:
    """The angle-stratified chunk plan as (n_chunks, n_phi, m) point ids, by arithmetic.

    Chunk c holds pairs c, c + K, c + 2K, … (K chunks) of *every* angle: each chunk sees
    every angle in equal measure and spans all lags and ages. Padding ids equal N.
    """
    n_total = n_phi * n_pairs
    n_chunks = max(1, -(-n_total // max(chunk_size, 1)))
    m = -(-n_pairs // n_chunks)
    pair = np.arange(n_chunks)[:, None] + n_chunks * np.arange(m)[None, :]  # (K, m)
    dtype = np.int32 if n_total < np.iinfo(np.int32).max else np.int64
    ids = np.empty((n_chunks, n_phi, m), dtype=dtype)
    for a in range(n_phi):  # one angle at a time: no full-size temporaries
        ids[:, a, :] = a * n_pairs + pair
    np.copyto(ids, dtype(n_total), where=(pair >= n_pairs)[:, None, :])
    return ids


class Stats(NamedTuple):
    """Per-angle sufficient statistics at one θ (NumPy, float64)."""

    s_gg: np.ndarray
    s_g: np.ndarray
    s_1: np.ndarray
    s_gd: np.ndarray
    s_d: np.ndarray
    s_dd: np.ndarray
    A: np.ndarray | None = None  # (P, p, p)
    U: np.ndarray | None = None  # (P, p)
    V: np.ndarray | None = None
    Y: np.ndarray | None = None


def angle_blocks(chunks: np.ndarray, angle: np.ndarray, n_phi: int) -> np.ndarray:
    """Regroup a chunk plan into (n_chunks, n_phi, m): each chunk as per-angle blocks.

    ``chunks`` holds point ids padded with N (:class:`FitData`). Within a chunk, the
    points of angle k fill row k, padded with N to the longest row m. With a stratified
    plan the rows are balanced (m ≈ chunk / n_phi), and the per-angle sums of the pass
    become plain reductions and batched products, with no scatter.
    """
    n_points = angle.size
    n_chunks = chunks.shape[0]
    flat = chunks.ravel()
    valid = flat < n_points
    chunk_of = np.repeat(np.arange(n_chunks), chunks.shape[1])[valid]
    idx = flat[valid]
    key = chunk_of * n_phi + angle[idx]
    order = np.argsort(key, kind="stable")
    key, idx = key[order], idx[order]
    counts = np.bincount(key, minlength=n_chunks * n_phi)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(idx.size) - starts[key]
    m = max(int(counts.max()), 1)
    out = np.full((n_chunks * n_phi, m), n_points, dtype=np.int64)
    out[key, pos] = idx
    return out.reshape(n_chunks, n_phi, m)


def gather_points(data: FitData, ids):
    """(i, j, a, d, w) of point ids (any shape); padding and non-finite data get w = 0."""
    n_pairs = data.pair_i.shape[0]
    n_total = data.c2.shape[0] * n_pairs
    valid = ids < n_total
    ids = jnp.where(valid, ids, 0)
    a, pair = ids // n_pairs, ids % n_pairs
    i, j = data.pair_i[pair], data.pair_j[pair]
    d_raw = data.c2[a, i, j]
    ok = valid & jnp.isfinite(d_raw)
    return i, j, a, jnp.where(ok, d_raw, 0.0), jnp.where(ok, data.weight_lag[a, j - i], 0.0)


def block_stats(physical, grid: KernelGrid, i, j, a, d, w, with_jacobian: bool):
    """Per-angle sums over (n_phi, m) blocks of points (row k = angle k).

    The one place the fit's statistics are formed: the NLSQ pass and the CMC shard
    likelihood both call it.
    """
    if with_jacobian:
        g, h = g1_sq_and_jacobian(physical, grid, i, j, a)
    else:
        g = g1_sq(physical, grid, i, j, a)
    w2 = w * w
    out = [jnp.sum(w2 * g * g, 1), jnp.sum(w2 * g, 1), jnp.sum(w2, 1),
           jnp.sum(w2 * g * d, 1), jnp.sum(w2 * d, 1), jnp.sum(w2 * d * d, 1)]  # fmt: skip
    if with_jacobian:
        hw = h * w[..., None]  # (n_phi, m, p)
        out += [
            jnp.einsum("amk,aml->akl", hw, hw),
            jnp.einsum("amk,am->ak", hw, w * g),
            jnp.einsum("amk,am->ak", hw, w),
            jnp.einsum("amk,am->ak", hw, w * d),
        ]
    return tuple(out)


@partial(jax.jit, static_argnames=("with_jacobian",))
def _accumulate(physical, grid: KernelGrid, data: FitData, blocks, with_jacobian: bool):
    n_phi = blocks.shape[1]
    p = physical.shape[0]

    def body(carry, ids):  # ids: (n_phi, m) point ids; row k holds angle k's points
        i, j, a, d, w = gather_points(data, ids)
        out = block_stats(physical, grid, i, j, a, d, w, with_jacobian)
        return tuple(c + o for c, o in zip(carry, out, strict=True)), None

    zeros = [jnp.zeros(n_phi)] * 6
    if with_jacobian:
        zeros += [
            jnp.zeros((n_phi, p, p)),
            jnp.zeros((n_phi, p)),
            jnp.zeros((n_phi, p)),
            jnp.zeros((n_phi, p)),
        ]
    carry, _ = jax.lax.scan(body, tuple(zeros), blocks)
    return carry


def accumulate(physical, grid, data: FitData, blocks, with_jacobian) -> Stats:
    """Per-angle statistics at θ over the points of ``blocks`` (n_chunks, n_phi, m)."""
    out = _accumulate(jnp.asarray(physical), grid, data, jnp.asarray(blocks), with_jacobian)
    return Stats(*(np.asarray(x) for x in out))


# ---------------------------------------------------------------------------------------
# Normal equations from statistics
# ---------------------------------------------------------------------------------------
def chi_squared_per_angle(st: Stats, contrast, offset):
    """χ² of each angle for scaling (contrast, offset), from the statistics alone.

    Plain arithmetic, so it serves NumPy (the fit) and JAX (the CMC likelihood) alike.
    """
    c, o = contrast, offset
    return (
        c * c * st.s_gg
        + 2 * c * o * st.s_g
        + o * o * st.s_1
        - 2 * c * st.s_gd
        - 2 * o * st.s_d
        + st.s_dd
    )


def chi_squared(st: Stats, contrast: np.ndarray, offset: np.ndarray) -> float:
    return float(np.sum(chi_squared_per_angle(st, contrast, offset)))


def optimal_scaling(st: Stats) -> tuple[np.ndarray, np.ndarray]:
    """Per-angle weighted least-squares (contrast, offset) for fixed θ (exact 2 × 2)."""
    det = st.s_gg * st.s_1 - st.s_g**2
    ok = det > 1e-12 * np.maximum(st.s_gg * st.s_1, 1e-300)
    safe = np.where(ok, det, 1.0)
    contrast = np.where(ok, (st.s_1 * st.s_gd - st.s_g * st.s_d) / safe, 0.0)
    offset = np.where(ok, (st.s_gg * st.s_d - st.s_g * st.s_gd) / safe, st.s_d / st.s_1)
    return contrast, offset


def full_system(st: Stats, c: np.ndarray, o: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """JᵀJ and Jᵀr over (θ, contrast_0..P-1, offset_0..P-1)."""
    n_phi, p = st.U.shape
    n = p + 2 * n_phi
    jtj = np.zeros((n, n))
    jtj[:p, :p] = np.einsum("a,akl->kl", c * c, st.A)
    ntc = (c[:, None] * st.U).T
    nto = (c[:, None] * st.V).T
    jtj[:p, p : p + n_phi] = ntc
    jtj[:p, p + n_phi :] = nto
    jtj[p : p + n_phi, :p] = ntc.T
    jtj[p + n_phi :, :p] = nto.T
    idx = np.arange(n_phi)
    jtj[p + idx, p + idx] = st.s_gg
    jtj[p + idx, p + n_phi + idx] = st.s_g
    jtj[p + n_phi + idx, p + idx] = st.s_g
    jtj[p + n_phi + idx, p + n_phi + idx] = st.s_1
    jtr = np.concatenate(
        [
            np.einsum("a,ak->k", c, c[:, None] * st.U + o[:, None] * st.V - st.Y),
            c * st.s_gg + o * st.s_g - st.s_gd,
            c * st.s_g + o * st.s_1 - st.s_d,
        ]
    )
    return jtj, jtr


def schur_theta(jtj: np.ndarray, jtr: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Eliminate the per-angle scaling (block-diagonal 2 × 2) from the system."""
    n_phi = (jtj.shape[0] - p) // 2
    a_tt = jtj[:p, :p].copy()
    g_t = jtr[:p].copy()
    for k in range(n_phi):
        cols = [p + k, p + n_phi + k]
        b = jtj[:p, cols]
        css = jtj[np.ix_(cols, cols)]
        inv = scaled_pinv(css)
        a_tt -= b @ inv @ b.T
        g_t -= b @ inv @ jtr[cols]
    return a_tt, g_t


# ---------------------------------------------------------------------------------------
# Levenberg–Marquardt
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SolverSettings:
    max_iterations: int = 100
    ftol: float = 1e-10
    xtol: float = 1e-10
    gtol: float = 1e-8
    dchi2_tol: float = 1e-3
    initial_damping: float = 1e-3


@dataclass
class FitResult:
    """Outcome of one fit; ``x`` holds θ then ψ (none for varpro)."""

    physical: np.ndarray
    psi: np.ndarray
    contrast: np.ndarray
    offset: np.ndarray
    chi_squared: float
    n_points: int
    n_fitted: int  # parameters counted in the degrees of freedom
    covariance: np.ndarray  # over (θ, contrast_0.., offset_0..) (full per-angle form)
    covariance_x: np.ndarray  # over the fitted vector x (θ, ψ)
    free: np.ndarray  # mask over x
    at_lower: np.ndarray
    at_upper: np.ndarray
    status: str
    reason: str
    iterations: int
    value_passes: int
    jacobian_passes: int
    history: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    gradient: np.ndarray | None = None
    not_identified: tuple[str, ...] = ()  # free parameters the data cannot fix
    information: np.ndarray | None = None  # JᵀJ over x, identified directions only

    @property
    def dof(self) -> int:
        return max(self.n_points - self.n_fitted, 1)

    @property
    def reduced_chi_squared(self) -> float:
        return self.chi_squared / self.dof

    @property
    def converged(self) -> bool:
        return self.status == "converged"


class Problem:
    """One fit: data, chunk blocks, scaling map, bounds, fixed mask."""

    def __init__(
        self,
        grid: KernelGrid,
        data: FitData,
        blocks: np.ndarray,
        n_points: int,
        n_phi: int,
        scaling: ScalingMap,
        lower: np.ndarray,
        upper: np.ndarray,
        fixed: np.ndarray,
        log_scale: np.ndarray | None = None,
        theta_names: tuple[str, ...] | None = None,
    ):
        self.grid, self.data, self.n_points, self.n_phi = grid, data, n_points, n_phi
        self.blocks = jnp.asarray(blocks)
        self.scaling = scaling
        self.varpro = scaling.mode == "varpro"
        self.lower, self.upper, self.fixed = lower, upper, fixed
        # Steps are taken in log x for these (D0, γ̇0): D0·t^alpha = const is a straight
        # line in (log D0, alpha) but a curved valley in (D0, alpha).
        self.log_scale = np.zeros(lower.size, bool) if log_scale is None else log_scale
        # Labels of θ then of the scaling (ψ; per-angle contrast and offset for varpro).
        p = lower.size - (0 if self.varpro else scaling.n_params)
        self.names = tuple(theta_names or (f"theta_{k}" for k in range(p))) + scaling.names
        self.value_passes = 0
        self.jacobian_passes = 0

    def stats(self, theta: np.ndarray, with_jacobian: bool) -> Stats:
        if with_jacobian:
            self.jacobian_passes += 1
        else:
            self.value_passes += 1
        return accumulate(theta, self.grid, self.data, self.blocks, with_jacobian)

    def split(self, x: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
        return x[:p], x[p:]

    def scaling_of(self, st: Stats, psi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return optimal_scaling(st) if self.varpro else self.scaling.per_angle(psi)

    def system(self, st: Stats, x: np.ndarray, p: int):
        """(χ², JᵀJ, Jᵀr) over x, and the per-angle scaling used."""
        theta, psi = self.split(x, p)
        c, o = self.scaling_of(st, psi)
        jtj, jtr = full_system(st, c, o)
        if self.varpro:
            a, g = schur_theta(jtj, jtr, p)
        else:
            t = np.zeros((jtj.shape[0], p + self.scaling.n_params))
            t[:p, :p] = np.eye(p)
            t[p:, p:] = self.scaling.matrix
            a, g = t.T @ jtj @ t, t.T @ jtr
        return chi_squared(st, c, o), a, g, (c, o, jtj)


def scaled_pinv(a: np.ndarray) -> np.ndarray:
    """Inverse of a normal matrix computed in Marquardt-scaled form.

    Parameters span ~20 decades of scale (D0 ~ 1e4 Å²/s, γ̇0 ~ 1e-4 1/s): a plain pinv's
    relative cut-off would discard the directions of the large-valued parameters.
    """
    scale = np.sqrt(np.clip(np.diag(a), 1e-300, None))
    return np.linalg.pinv(a / np.outer(scale, scale), rcond=1e-13, hermitian=True) / np.outer(
        scale, scale
    )


IDENTIFY_RTOL = 1e-10  # eigenvalue cut of the normalised JᵀJ, relative to the largest
NULL_WEIGHT_TOL = 1e-6  # weight in the undetermined directions that unidentifies a parameter


@dataclass(frozen=True)
class Identification:
    """What a normal (information) matrix determines (module docstring, Identification).

    ``inverse`` is its pseudo-inverse over the identified eigen-directions, ``information``
    the matrix with the undetermined directions removed; ``unidentified`` marks the
    parameters the data cannot fix and ``why`` says why (empty when all are identified).
    """

    inverse: np.ndarray
    information: np.ndarray
    unidentified: np.ndarray
    rank: int
    why: str

    def covariance(self, factor: float = 1.0) -> np.ndarray:
        """``inverse · factor`` with NaN rows and columns for the unidentified."""
        cov = self.inverse * factor
        cov[self.unidentified, :] = np.nan
        cov[:, self.unidentified] = np.nan
        return cov


def identify(a: np.ndarray, factor: float = 1.0, scale: np.ndarray | None = None) -> Identification:
    """Identification of the parameters of normal matrix ``a`` (covariance = a⁻¹ · factor).

    ``scale`` normalises ``a`` (default sqrt(diag a)); a Schur complement should be
    normalised by the diagonal before elimination, so that a direction whose information
    the elimination removed shows as round-off, not as a unit entry.
    """
    n = a.shape[0]
    if not np.all(np.isfinite(a)):
        nan = np.full((n, n), np.nan)
        return Identification(nan, nan, np.ones(n, bool), 0, "JᵀJ is not finite")
    d = np.sqrt(np.clip(np.diag(a), 0.0, None)) if scale is None else np.asarray(scale)
    s = np.where(d > 0, d, 1.0)
    a_s = np.where(np.outer(d > 0, d > 0), a / np.outer(s, s), 0.0)
    lam, v = np.linalg.eigh(a_s) if n else (np.zeros(0), np.zeros((0, 0)))
    keep = lam > IDENTIFY_RTOL * lam.max() if n and lam.max() > 0 else np.zeros(n, bool)
    vk = v[:, keep]
    inverse = (vk / lam[keep]) @ vk.T / np.outer(s, s)
    information = (vk * lam[keep]) @ vk.T * np.outer(s, s)
    bad = np.sum(v[:, ~keep] ** 2, axis=1) > NULL_WEIGHT_TOL
    why = f"JᵀJ has rank {int(keep.sum())} of {n}" if bad.any() else ""
    with np.errstate(invalid="ignore"):
        zero_sd = ~bad & ~(np.sqrt(np.diag(inverse) * factor) > 0)
    if zero_sd.any():
        bad |= zero_sd
        why = "; ".join(filter(None, [why, f"σ is zero or not finite (χ²_red = {factor:.3g})"]))
    return Identification(inverse, information, bad, int(keep.sum()), why)


def combine_information(
    values: np.ndarray, infos: np.ndarray, log_scale: np.ndarray
) -> tuple[np.ndarray, Identification]:
    """Combine independent estimates by summing their Fisher information.

    ``values`` (K, p) are the estimates, ``infos`` (K, p, p) their information matrices
    (JᵀJ / χ²_red, zero in every direction an estimate does not determine). With
    χ²_k(θ) ≈ χ²_k(θ_k) + (θ − θ_k)ᵀ F_k (θ − θ_k) the total is minimised by
    θ = (Σ F_k)⁻¹ Σ F_k θ_k with covariance (Σ F_k)⁻¹: generalised least squares with the
    full covariances, where an estimate enters only through the directions it
    identifies, so estimates that each fix only some directions can fix all together.
    Log-scale parameters are combined in log (where the quadratic form is accurate).
    Directions no estimate determines stay at the mean of the estimates and are reported
    by the returned :class:`Identification` (covariance in the units of ``values``).
    """
    values, log_scale = np.asarray(values, dtype=np.float64), np.asarray(log_scale, bool)
    du = np.where(log_scale, values, 1.0)  # dx/du, u = log x on log-scale entries
    u = np.where(log_scale, np.log(np.where(log_scale, values, 1.0)), values)
    f_u = infos * du[:, :, None] * du[:, None, :]
    total = f_u.sum(0)
    b = np.einsum("kij,kj->i", f_u, u)
    ident = identify(total)
    u_ref = u.mean(0)
    u_hat = u_ref + ident.inverse @ (b - total @ u_ref)
    x_hat = u_hat.copy()
    x_hat[log_scale] = np.exp(u_hat[log_scale])
    jac = np.where(log_scale, x_hat, 1.0)
    inverse = ident.inverse * np.outer(jac, jac)
    return x_hat, replace(ident, inverse=inverse, information=total / np.outer(jac, jac))


def _solve_damped(a: np.ndarray, g: np.ndarray, lam: float) -> np.ndarray:
    scale = np.sqrt(np.clip(np.diag(a), 1e-300, None))
    a_s = a / np.outer(scale, scale)
    g_s = g / scale
    m = a_s + lam * np.eye(a_s.shape[0])
    try:
        step = np.linalg.solve(m, -g_s)
    except np.linalg.LinAlgError:
        step = np.linalg.lstsq(m, -g_s, rcond=None)[0]
    return step / scale


def _apply_step(x, step, log_scale, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """x moved by ``step`` (in log x where ``log_scale``) and clipped to the bounds;
    returns the new x and the step actually taken, in the same internal units."""
    x_new = x + np.where(log_scale, 0.0, step)
    lin = ~log_scale
    x_new[lin] = np.clip(x_new[lin], lo[lin], hi[lin])
    du = x_new - x
    if log_scale.any():
        lx, llo, lhi = np.log(x[log_scale]), np.log(lo[log_scale]), np.log(hi[log_scale])
        u_new = np.clip(lx + step[log_scale], llo, lhi)  # clipping in log: no overflow
        # exp(log(bound)) can land one rounding step outside the bound: clip again.
        x_new[log_scale] = np.clip(np.exp(u_new), lo[log_scale], hi[log_scale])
        du[log_scale] = u_new - lx
    return x_new, du


def levenberg_marquardt(
    prob: Problem, theta0: np.ndarray, psi0: np.ndarray, settings: SolverSettings = SolverSettings()
) -> FitResult:
    """Minimise χ² from (θ0, ψ0) within bounds; never raises on non-convergence."""
    t_start = time.perf_counter()
    p = theta0.size
    x = np.concatenate([theta0, np.zeros(0) if prob.varpro else psi0]).astype(np.float64)
    lo, hi = prob.lower, prob.upper
    x = np.clip(x, lo, hi)
    x_start = x.copy()
    st = prob.stats(x[:p], with_jacobian=True)
    t_first = time.perf_counter() - t_start
    chi2, a, g, scal = prob.system(st, x, p)
    history = [chi2]
    lam, nu = settings.initial_damping, 2.0
    status, reason = "max_iterations", f"no convergence in {settings.max_iterations} iterations"
    iterations = 0
    if not np.isfinite(chi2):
        status, reason = "failed", "χ² is not finite at the starting point"
    for iterations in range(1, settings.max_iterations + 1):  # noqa: B007
        if status == "failed":
            break
        jac_u = np.where(prob.log_scale, x, 1.0)  # dx/du, u = log x on log-scale entries
        a_u, g_u = a * np.outer(jac_u, jac_u), g * jac_u
        active = ((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0))
        free = ~prob.fixed & ~active
        scale = np.sqrt(np.clip(np.diag(a_u), 1e-300, None))
        proj_grad = np.where(free, g_u / scale, 0.0)
        if np.max(np.abs(proj_grad)) <= settings.gtol * np.sqrt(max(chi2, 1e-300)):
            status, reason = "converged", "gtol: scaled projected gradient below tolerance"
            break
        # χ² decrease a full Gauss–Newton step would still bring; below dchi2_tol the
        # point is within ~sqrt(dchi2_tol) standard deviations of the optimum.
        # gᵀ A⁺ g ≥ 0 even where A is singular (D0 and D_offset are collinear at alpha = 0).
        decrement = g_u[free] @ scaled_pinv(a_u[np.ix_(free, free)]) @ g_u[free]
        if decrement <= settings.dchi2_tol:
            status, reason = (
                "converged",
                (f"dchi2: a Gauss–Newton step would lower χ² by < {settings.dchi2_tol:g}"),
            )
            break
        accepted = False
        while not accepted:
            step = np.zeros_like(x)
            step[free] = _solve_damped(a_u[np.ix_(free, free)], g_u[free], lam)
            x_new, du = _apply_step(x, step, prob.log_scale, lo, hi)
            predicted = -(g_u @ du + 0.5 * du @ a_u @ du)  # predicted decrease of χ²/2
            if x_new[:p].tobytes() == x[:p].tobytes():
                st_new = st  # only the scaling moved: no data pass needed
            else:
                st_new = prob.stats(x_new[:p], with_jacobian=False)
            theta_psi = prob.split(x_new, p)
            chi2_new = chi_squared(st_new, *prob.scaling_of(st_new, theta_psi[1]))
            actual = chi2 - chi2_new
            if np.isfinite(chi2_new) and actual > 0:
                accepted = True
                rho = actual / max(2.0 * predicted, 1e-300)
                # Shrink fast on good steps: the degenerate D0–alpha–D_offset and
                # γ̇0–beta–γ̇_offset valleys need nearly undamped Gauss–Newton steps.
                lam = lam / 10.0 if rho > 0.75 else (lam * 2.0 if rho < 0.25 else lam)
                lam = max(lam, 1e-12)
                nu = 2.0
            else:
                lam *= nu
                nu *= 2.0
                if lam > 1e16:
                    break
        if not accepted:
            status, reason = "stalled", "no step reduces χ² (damping exhausted)"
            break
        small_step = np.max(np.abs(du) * scale) <= settings.xtol * np.sqrt(max(chi2, 1e-300))
        x = x_new
        st = prob.stats(x[:p], with_jacobian=True)
        chi2_prev = chi2
        chi2, a, g, scal = prob.system(st, x, p)
        history.append(chi2)
        if chi2_prev - chi2 <= settings.ftol * chi2:
            status, reason = "converged", "ftol: relative χ² decrease below tolerance"
            break
        if small_step:
            status, reason = "converged", "xtol: scaled step below tolerance"
            break

    c, o, jtj_full = scal
    free = ~prob.fixed
    n_fitted = int(free.sum()) + (2 * prob.n_phi if prob.varpro else 0)
    red = chi2 / max(prob.n_points - n_fitted, 1)
    cov_x, cov_full, ident, names = _covariances(prob, a, jtj_full, free, red)
    not_identified = tuple(np.asarray(names)[ident.unidentified].tolist())
    moved = bool(np.any(x[free] != x_start[free]))
    status, reason = _verdict(status, reason, moved, not_identified, ident.why)
    total = time.perf_counter() - t_start
    return FitResult(
        physical=x[:p].copy(),
        psi=x[p:].copy(),
        contrast=c,
        offset=o,
        chi_squared=chi2,
        n_points=prob.n_points,
        n_fitted=n_fitted,
        covariance=cov_full,
        covariance_x=cov_x,
        free=free,
        at_lower=x <= lo,
        at_upper=x >= hi,
        status=status,
        reason=reason,
        iterations=iterations,
        value_passes=prob.value_passes,
        jacobian_passes=prob.jacobian_passes,
        history=history,
        timings={"first_pass_s": t_first, "total_s": total},
        gradient=g,
        not_identified=not_identified,
        information=_information(prob, a, jtj_full, free, p),
    )


def information_at(prob: Problem, theta: np.ndarray):
    """(χ², JᵀJ over θ restricted to the directions identified there, contrast, offset)
    of a varpro problem at θ: one Jacobian pass."""
    assert prob.varpro, "information_at needs the varpro form (x = θ)"
    st = prob.stats(theta, with_jacobian=True)
    chi2, a, _, (c, o, jtj_full) = prob.system(st, theta, theta.size)
    return chi2, _information(prob, a, jtj_full, ~prob.fixed, theta.size), c, o


def _covariances(prob: Problem, a, jtj_full, free, red):
    """(cov over x, cov over (θ, contrast, offset), identification, its parameter names).

    varpro is judged on the full system (θ with every angle's contrast and offset, whose
    diagonal is raw sums), the other modes on the system of x; NaN marks what is fixed
    or not identified, and what depends on it.
    """
    p = jtj_full.shape[0] - 2 * prob.n_phi
    cov_x = np.full((free.size, free.size), np.nan)
    if prob.varpro:
        full_free = np.r_[free, np.ones(2 * prob.n_phi, bool)]
        ident = identify(jtj_full[np.ix_(full_free, full_free)], red)
        cov_full = np.full(jtj_full.shape, np.nan)
        cov_full[np.ix_(full_free, full_free)] = ident.covariance(red)
        cov_x[np.ix_(free, free)] = cov_full[:p, :p][np.ix_(free, free)]
        return cov_x, cov_full, ident, [n for n, f in zip(prob.names, full_free, strict=True) if f]
    ident = identify(a[np.ix_(free, free)], red)
    cov_x[np.ix_(free, free)] = ident.covariance(red)
    t = np.zeros((jtj_full.shape[0], free.size))
    t[:p, :p] = np.eye(p)
    t[p:, p:] = prob.scaling.matrix
    cov_full = t @ np.nan_to_num(cov_x) @ t.T
    unknown = np.any(t[:, ~np.isfinite(np.diag(cov_x))] != 0, axis=1)
    cov_full[unknown, :] = np.nan
    cov_full[:, unknown] = np.nan
    return cov_x, cov_full, ident, [n for n, f in zip(prob.names, free, strict=True) if f]


def _information(prob: Problem, a, jtj_full, free, p) -> np.ndarray:
    """JᵀJ over x restricted to the directions the fit identifies (0 elsewhere).

    For varpro ``a`` is the Schur complement (the scaling profiled out), normalised by
    the diagonal before elimination (:func:`identify`).
    """
    scale = np.sqrt(np.clip(np.diag(jtj_full)[:p], 0.0, None))[free[:p]] if prob.varpro else None
    info = np.zeros_like(a)
    info[np.ix_(free, free)] = identify(a[np.ix_(free, free)], scale=scale).information
    return info


def _verdict(status, reason, moved, not_identified, why) -> tuple[str, str]:
    """The final status: a stop on a convergence test is ``converged`` only if the data
    identify every free parameter; ``not_identified`` names those they do not (``failed``
    when the parameters never left the start). A start that already is an identified
    optimum stays converged."""
    if not not_identified:
        if status == "converged" and not moved:
            reason += "; the start values are already an optimum"
        return status, reason
    what = f"the data do not determine {', '.join(not_identified)} ({why})"
    if status != "converged":
        return status, f"{reason}; {what}"
    if not moved:
        return "failed", f"never moved from the start values: {what}"
    return "not_identified", f"{what}; the solver stopped on {reason}"


def describe(result: FitResult) -> dict[str, Any]:
    return {
        "status": result.status,
        "reason": result.reason,
        "iterations": result.iterations,
        "chi_squared": result.chi_squared,
        "reduced_chi_squared": result.reduced_chi_squared,
    }
