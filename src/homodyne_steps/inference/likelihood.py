r"""The likelihood statistics of one fit: per-angle sufficient statistics of χ².

Shared by the NLSQ solver (:mod:`homodyne_steps.inference.lm`) and the CMC shard likelihood
(:mod:`homodyne_steps.stages.cmc_shard`), which both call :func:`block_stats`.

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

Each scaling mode is a linear map s = Mψ + fixed (:mod:`homodyne_steps.physics.scaling`), so
its system is Tᵀ(JᵀJ)T with T = diag(I, M). Variable projection eliminates the scaling
exactly: for each θ the per-angle 2 × 2 system gives the optimal (c_a, o_a), and the
normal matrix of θ is the Schur complement JᵀJ_θθ − JᵀJ_θs (JᵀJ_ss)⁻¹ JᵀJ_sθ (Kaufman's
Jacobian).

Memory is O(chunk × n_params) whatever the data size: the pass is a compiled
``lax.scan`` over chunks of point indices (angle-stratified, so every chunk sees every
angle), gathering from the point arrays without copying them.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import numpy as np

from homodyne_steps._jax import jax, jnp
from homodyne_steps.inference.identification import scaled_pinv
from homodyne_steps.physics.model import KernelGrid, g1_sq, g1_sq_and_jacobian


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
