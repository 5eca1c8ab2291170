r"""Uncertainties that allow for the noise a two-time matrix shares along its frames.

Why. A cell's c2(t1, t2) is formed from the speckle patterns of frames t1 and t2, so
every point of row t1 (and column t1) carries frame t1's pattern, and frames closer than
the decorrelation time carry nearly the same pattern. The noise of the matrix is
therefore correlated along rows, columns and neighbourhoods; the independent-noise
covariance (JᵀJ)⁻¹·χ²_red counts N²/2 points as independent and, on data made the way a
beamline makes them (:mod:`homodyne_steps.physics.speckle`), is 5–20 times too narrow.

Estimator: the sandwich of the least-squares estimator with a *dyadic* cluster-robust
meat (Fafchamps & Gubert 2007; Aronow, Samii & Assenova 2015), the frames grouped into
``n_b`` blocks of consecutive frames. Point n = (i, j, angle) has the score
s_n = w_n² r_n ∂μ_n/∂z (z = θ, then every angle's contrast, then every offset;
r = μ − d) and belongs to the blocks of both its frames. Every pair of points that share
a block enters the meat once::

    S_bb'   = Σ_{n: block(i) = b, block(j) = b'} s_n          (b ≤ b', the upper triangle)
    g_b     = Σ_{b'} S_{min(b,b'), max(b,b')}                  (all points touching b)
    M       = n_b/(n_b − 1) · [Σ_b g_b g_bᵀ − Σ_{b<b'} S_bb' S_bb'ᵀ]
    V       = H⁻¹ M H⁻¹,   H = JᵀJ over z (the Gauss–Newton normal matrix, w = 1/σ)

(a pair of points in the same two distinct blocks appears in both g's, hence the
subtraction). With independent noise and a correct σ, M → H and V → H⁻¹; the scale of σ
cancels, so V needs no χ²_red. Blocks: ``ceil(n_t / 25)`` frames each by default (about
25 clusters: longer blocks capture correlation over more frames, fewer blocks make M
noisier; chosen on the speckle coverage study of ``bench/bench_coverage.py``).

The pass is compiled like the fit's (:mod:`homodyne_steps.inference.likelihood`): a
``lax.scan`` over chunks of point ids, each chunk's scores scattered into the
(n_b², K) block-pair sums, so memory does not grow with the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np

from homodyne_steps._jax import jax, jnp
from homodyne_steps.inference.identification import identify
from homodyne_steps.inference.likelihood import FitData, full_system, gather_points
from homodyne_steps.inference.lm import FitResult, Problem
from homodyne_steps.physics.model import KernelGrid, g1_sq_and_jacobian

TARGET_BLOCKS = 25  # default number of frame blocks


def default_block_frames(n_t: int) -> int:
    """Frames per block by default: about :data:`TARGET_BLOCKS` blocks."""
    return max(1, math.ceil(n_t / TARGET_BLOCKS))


def frame_block_index(n_t: int, block_frames: int) -> np.ndarray:
    """Block of each frame (consecutive frames, the last block may be shorter)."""
    return np.arange(n_t) // max(1, int(block_frames))


@partial(jax.jit, static_argnames=("n_blocks",))
def _block_scores(physical, contrast, offset, grid: KernelGrid, data: FitData, blocks,
                  frame_block, n_blocks: int):  # fmt: skip
    n_phi, p = blocks.shape[1], physical.shape[0]

    def body(acc, ids):  # ids: (n_phi, m) point ids
        i, j, a, d, w = gather_points(data, ids)
        g, h = g1_sq_and_jacobian(physical, grid, i, j, a)
        c = contrast[a]
        wr = w * w * (offset[a] + c * g - d)  # 0 on padding and missing data
        key = frame_block[i] * n_blocks + frame_block[j]
        acc_theta, acc_c, acc_o = acc
        return (
            acc_theta.at[key].add((wr * c)[..., None] * h),
            acc_c.at[key, a].add(wr * g),
            acc_o.at[key, a].add(wr),
        ), None

    nn = n_blocks * n_blocks
    zeros = (jnp.zeros((nn, p)), jnp.zeros((nn, n_phi)), jnp.zeros((nn, n_phi)))
    (s_theta, s_c, s_o), _ = jax.lax.scan(body, zeros, blocks)
    return jnp.concatenate([s_theta, s_c, s_o], axis=1)


def block_scores(
    physical: np.ndarray,
    contrast: np.ndarray,
    offset: np.ndarray,
    grid: KernelGrid,
    data: FitData,
    blocks: np.ndarray,
    frame_block: np.ndarray,
) -> np.ndarray:
    """(n_b, n_b, K) sums of the points' scores by the blocks of their two frames
    (i < j, so only b ≤ b' is filled); K = p + 2·n_phi, ordered (θ, contrast, offset)."""
    n_b = int(np.max(frame_block)) + 1
    out = _block_scores(
        jnp.asarray(physical),
        jnp.asarray(contrast),
        jnp.asarray(offset),
        grid,
        data,
        jnp.asarray(blocks),
        jnp.asarray(frame_block, dtype=jnp.int32),
        n_b,
    )
    return np.asarray(out).reshape(n_b, n_b, -1)


def dyadic_meat(scores: np.ndarray) -> np.ndarray:
    """M from the block-pair score sums (module docstring); ``scores`` (n_b, n_b, K)
    with b ≤ b' filled (any lower-triangle entries are folded in)."""
    n_b = scores.shape[0]
    upper = np.triu_indices(n_b, 1)
    pair = scores[upper] + np.swapaxes(scores, 0, 1)[upper]  # (n_pairs, K), b < b'
    within = np.einsum("bbk->bk", scores)
    touching = within.copy()
    np.add.at(touching, upper[0], pair)
    np.add.at(touching, upper[1], pair)
    meat = touching.T @ touching - pair.T @ pair
    return meat * (n_b / (n_b - 1)) if n_b > 1 else meat * np.nan


def psd_part(meat: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """M with its negative eigenvalues (in the metric of diag H) set to zero.

    The subtraction in :func:`dyadic_meat` leaves M indefinite in directions where few
    blocks carry information; as for multiway cluster-robust estimators, the negative
    part is dropped (Cameron, Gelbach & Miller 2011)."""
    d = np.sqrt(np.clip(np.diag(normal), 1e-300, None))
    lam, vec = np.linalg.eigh(meat / np.outer(d, d))
    return (vec * np.clip(lam, 0.0, None)) @ vec.T * np.outer(d, d)


def sandwich(normal: np.ndarray, meat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(V = H⁻¹ M⁺ H⁻¹ with M⁺ = :func:`psd_part` (M), mask of the entries H does not
    identify; their rows are NaN)."""
    ident = identify(normal)
    cov = ident.inverse @ psd_part(meat, normal) @ ident.inverse
    cov[ident.unidentified, :] = np.nan
    cov[:, ident.unidentified] = np.nan
    return cov, ident.unidentified


@dataclass(frozen=True)
class FrameBlockCovariance:
    """The sandwich of one fit: over the solver's x (θ then ψ) and over (θ, contrast,
    offset) per angle; NaN where a parameter is fixed or not identified."""

    covariance_x: np.ndarray
    covariance: np.ndarray
    block_frames: int
    n_blocks: int


def frame_block_covariance(
    prob: Problem, result: FitResult, block_frames: int | None = None
) -> FrameBlockCovariance:
    """V at the fit's optimum, in the coordinates of ``prob``'s scaling mode.

    The scores and JᵀJ are formed over (θ, contrast, offset) and carried to the fitted
    z = (free θ, ψ) with T = diag(I_free, M) (s = Mψ + fixed; varpro: M = I), so each
    scaling mode's estimator gets its own sandwich.
    """
    p = result.physical.size
    n_t = int(prob.data.c2.shape[1])
    frames = block_frames or default_block_frames(n_t)
    frame_block = frame_block_index(n_t, frames)
    st = prob.stats(result.physical, with_jacobian=True)
    normal, _ = full_system(st, result.contrast, result.offset)
    scores = block_scores(result.physical, result.contrast, result.offset, prob.grid,
                          prob.data, np.asarray(prob.blocks), frame_block)  # fmt: skip
    free = ~np.asarray(prob.fixed[:p], bool)
    matrix = prob.scaling.matrix
    t_z = np.zeros((p + matrix.shape[0], int(free.sum()) + matrix.shape[1]))
    t_z[:p, : free.sum()] = np.eye(p)[:, free]
    t_z[p:, free.sum() :] = matrix
    cov_z, _ = sandwich(t_z.T @ normal @ t_z, dyadic_meat(scores @ t_z))
    cov_full = t_z @ np.nan_to_num(cov_z) @ t_z.T
    unknown = np.any(t_z[:, ~np.isfinite(np.diag(cov_z))] != 0, axis=1) | np.r_[~free, np.zeros(
        matrix.shape[0], bool)]  # fmt: skip
    cov_full[unknown, :] = np.nan
    cov_full[:, unknown] = np.nan
    n_x = prob.lower.size
    cov_x = np.full((n_x, n_x), np.nan)
    x_free = ~np.asarray(prob.fixed, bool)
    if prob.varpro:
        cov_x[:p, :p] = cov_full[:p, :p]
    else:
        cov_x[np.ix_(x_free, x_free)] = cov_z
    return FrameBlockCovariance(cov_x, cov_full, int(frames), int(frame_block[-1]) + 1)


__all__ = [
    "FrameBlockCovariance",
    "frame_block_covariance",
    "TARGET_BLOCKS",
    "block_scores",
    "default_block_frames",
    "dyadic_meat",
    "frame_block_index",
    "sandwich",
]
