"""Consensus Monte Carlo maths: pure functions of shard draws (no files).

Consensus Monte Carlo (Scott et al. 2016) splits the data into K shards and samples
each shard's posterior (:mod:`cmc_shard`). Shards target L_k·G^(1/K) in the combination
coordinates u (:mod:`cmc_space`); their draws are mapped to u (:func:`to_combination`),
combined there, given the prior by importance resampling (:func:`apply_prior`; where the
weights fail, by sampling the draws' Gaussian likelihood times the prior,
:mod:`prior_sampling`) and mapped back (:func:`from_combination`); :func:`combine_shards`
does the four steps.

Combination methods (``cmc.combine.method``):

- ``consensus_mc``: precision-weighted consensus. ``W_k`` is the inverse of shard k's
  sample covariance (over all its chains and draws); draw ``i`` of the result is
  ``(Σ W_k)⁻¹ Σ_k W_k u_k(i)``, pairing draws by (chain, draw) index. Exact when every
  shard posterior is Gaussian (:func:`consensus_mc`).
- ``robust_consensus_mc`` (default): ``consensus_mc`` after excluding shards whose mean
  of the sampled physical parameters lies further from the median of the shard means
  than the shard's own posterior covariance allows (:func:`robust_exclusion`).
- ``simple_average``: the mean over shards of ``θ_k(i)`` (a baseline for comparison; it
  is not a posterior of the full data, and no prior is applied).

Every method first drops shards whose draws are degenerate (:func:`degenerate_exclusion`)
and shards whose divergence rate exceeds ``max_divergence_rate``
(:func:`divergence_exclusion`). Neither filter ever aborts the stage: when a filter would
drop all shards (divergences) or leave fewer than half of them (outliers), it keeps them
all and says what it found (:class:`Selection`).

Derived per-angle ``contrast_a``/``offset_a`` (varpro, auto, fourier) are combined per
component with inverse-variance weights (:func:`marginal_consensus`, approximate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from homodyne_steps.inference.combine_settings import METHODS
from homodyne_steps.inference.prior_sampling import redraw
from homodyne_steps.io.shard_io import Shard, ShardError
from homodyne_steps.physics.cmc_space import (
    COMBINATION,
    SampledSpace,
    log_prior_weight,
    theta_from_w,
    w_from_theta,
)


class SelectionRules(Protocol):
    """What the combination reads from the stage's settings (``CombineSettings``)."""

    @property
    def method(self) -> str: ...

    @property
    def outlier_p_value(self) -> float: ...

    @property
    def max_divergence_rate(self) -> float: ...


# ---------------------------------------------------------------------------------------
# Combining draws
# ---------------------------------------------------------------------------------------
def _stack_draws(shard_draws: Sequence[np.ndarray], labels: Sequence[Any] | None) -> np.ndarray:
    """Shard draws as one (K, chains, draws, p) float64 array, or a clear error."""
    if len(shard_draws) == 0:
        raise ShardError("no shard draws to combine")
    labels = list(labels) if labels is not None else list(range(len(shard_draws)))
    arrays = [np.asarray(d, dtype=np.float64) for d in shard_draws]
    for lab, a in zip(labels, arrays, strict=True):
        if a.ndim != 3:
            raise ShardError(
                f"shard {lab}: draws must have shape (chains, draws, n_params), got {a.shape}"
            )
        if not np.all(np.isfinite(a)):
            raise ShardError(f"shard {lab}: draws contain NaN or infinite values")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        detail = ", ".join(f"shard {lab}: {a.shape}" for lab, a in zip(labels, arrays, strict=True))
        raise ShardError(
            "shards must have the same (chains, draws, n_params) to pair draws by "
            f"(chain, draw) index; got {detail}"
        )
    return np.stack(arrays)


DEGENERATE_EIGENVALUE = 1e-9  # smallest eigenvalue of a shard's draw correlation matrix


def spans_every_direction(cov: np.ndarray) -> bool:
    """Whether a sample covariance has full rank, judged on its correlation matrix's
    smallest eigenvalue (round-off lets Cholesky pass a rank-deficient one)."""
    sd = np.sqrt(np.clip(np.diagonal(cov), 0.0, None))
    if not np.all(sd > 0):
        return False
    return float(np.linalg.eigvalsh(cov / np.outer(sd, sd))[0]) > DEGENERATE_EIGENVALUE


def consensus_mc(
    shard_draws: Sequence[np.ndarray], *, labels: Sequence[Any] | None = None
) -> np.ndarray:
    """Precision-weighted consensus of shard draws (Scott et al. 2016).

    ``shard_draws[k]`` has shape (chains, draws, p); the result has the same shape, draw
    ``i`` being ``(Σ_k W_k)⁻¹ Σ_k W_k θ_k(i)`` with ``W_k`` the inverse sample covariance
    of shard k over all of its draws. The algebra is done on parameters divided by their
    pooled standard deviation (the combination is invariant to that rescaling, and it
    keeps D0 ~ 1e4 and contrast ~ 0.1 from spoiling the matrix inversions).
    """
    x = _stack_draws(shard_draws, labels)
    labels = list(labels) if labels is not None else list(range(x.shape[0]))
    K, C, D, p = x.shape
    if C * D < p + 1:
        raise ShardError(
            f"consensus_mc needs more draws per shard ({C * D}) than parameters ({p}) to "
            "estimate each shard's covariance"
        )
    flat = x.reshape(K, C * D, p)
    covs = np.stack([np.atleast_2d(np.cov(flat[k], rowvar=False)) for k in range(K)])
    scale = np.sqrt(np.mean(np.diagonal(covs, axis1=1, axis2=2), axis=0))
    if np.any(scale <= 0):
        raise ShardError(
            f"parameters at positions {np.flatnonzero(scale <= 0).tolist()} are constant in "
            "every shard; consensus weights need a non-zero posterior variance"
        )
    z = flat / scale
    covs_z = covs / np.outer(scale, scale)
    eye = np.eye(p)
    precision_sum = np.zeros((p, p))
    weighted = np.zeros((C * D, p))
    for k in range(K):
        try:
            if not spans_every_direction(covs_z[k]):  # Cholesky may pass it on round-off
                raise np.linalg.LinAlgError
            chol = np.linalg.cholesky(covs_z[k])
        except np.linalg.LinAlgError:
            raise ShardError(
                f"shard {labels[k]}: the sample covariance of its draws is singular "
                "(a parameter is constant or parameters are perfectly correlated); "
                "cannot compute its consensus weight"
            ) from None
        inv_chol = np.linalg.solve(chol, eye)
        w = inv_chol.T @ inv_chol  # (L Lᵀ)⁻¹
        precision_sum += w
        weighted += z[k] @ w  # W symmetric: (W z_i)ᵀ = z_iᵀ W
    combined = np.linalg.solve(precision_sum, weighted.T).T
    return (combined * scale).reshape(C, D, p)


def marginal_consensus(
    shard_draws: Sequence[np.ndarray], *, labels: Sequence[Any] | None = None
) -> np.ndarray:
    """Per-component consensus: draw ``i`` of parameter j is ``Σ_k w_kj θ_kj(i) / Σ_k
    w_kj`` with ``w_kj = 1 / var_k(θ_j)``. For derived quantities whose joint covariance
    is singular; exact only for independent Gaussian components."""
    x = _stack_draws(shard_draws, labels)
    var = (
        x.var(axis=(1, 2), ddof=1)
        if x.shape[1] * x.shape[2] > 1
        else np.zeros((x.shape[0], x.shape[3]))
    )
    with np.errstate(divide="ignore"):
        w = np.where(var > 0, 1.0 / var, 0.0)
    w = np.where(w.sum(axis=0) > 0, w, 1.0)  # constant in every shard: equal weights
    return np.einsum("kcdp,kp->cdp", x, w) / w.sum(axis=0)


def simple_average(
    shard_draws: Sequence[np.ndarray], *, labels: Sequence[Any] | None = None
) -> np.ndarray:
    """Mean over shards of draw ``i`` (paired by (chain, draw) index)."""
    return _stack_draws(shard_draws, labels).mean(axis=0)


def combine_draws(
    shard_draws: Sequence[np.ndarray],
    method: str,
    n_joint: int | None = None,
    *,
    labels: Sequence[Any] | None = None,
) -> np.ndarray:
    """Combine with ``method``; for the consensus methods the first ``n_joint`` columns
    (default: all) jointly (:func:`consensus_mc`), the rest per component
    (:func:`marginal_consensus`)."""
    if method not in METHODS:
        raise ValueError(f"unknown combination method {method!r}; expected one of {METHODS}")
    if method == "simple_average":
        return simple_average(shard_draws, labels=labels)
    x = _stack_draws(shard_draws, labels)
    n_joint = x.shape[3] if n_joint is None else n_joint
    joint = consensus_mc(list(x[..., :n_joint]), labels=labels)
    if n_joint == x.shape[3]:
        return joint
    rest = marginal_consensus(list(x[..., n_joint:]), labels=labels)
    return np.concatenate([joint, rest], axis=2)


# ---------------------------------------------------------------------------------------
# Which shards are combined
# ---------------------------------------------------------------------------------------
def robust_exclusion(
    shard_means: np.ndarray,
    shard_covs: np.ndarray,
    p_value: float,
    *,
    names: Sequence[str] | None = None,
    labels: Sequence[Any] | None = None,
) -> tuple[np.ndarray, list[str | None]]:
    """Flag shards whose posterior mean is an outlier; return ``(kept, reasons)``.

    Judged on the sampled physical parameters in the combination coordinates, where the
    shard posteriors are near-Gaussian. Each shard sees 1/K of the data, so under
    homogeneity its mean scatters around the full-data mean with about its own
    posterior covariance Σ_k; the median of the K means (the robust centre) adds
    about (π/2)/K of that. A shard is an outlier when its squared Mahalanobis distance
    from the median, d² = δᵀ Σ_k⁻¹ δ / (1 + (π/2 − 1)/K), exceeds the χ²(p) quantile at
    1 − ``p_value``/K (Bonferroni): a homogeneous run then loses any shard with
    probability about ``p_value``.

    ``reasons[k]`` is None for an unflagged shard, otherwise why it was flagged. When
    excluding the flagged shards would leave fewer than half of them, all are kept
    (``kept`` all True) and the reasons of the flagged shards end in "kept: ..." — the
    caller reports heterogeneity instead of combining a minority.
    """
    from scipy.stats import chi2 as chi2_dist

    means = np.asarray(shard_means, dtype=np.float64)
    covs = np.asarray(shard_covs, dtype=np.float64)
    if means.ndim != 2 or covs.shape != (*means.shape, means.shape[1]):
        raise ValueError(
            f"shard_means must be (K, p) and shard_covs (K, p, p); got {means.shape}, {covs.shape}"
        )
    K, p = means.shape
    names = list(names) if names is not None else [f"param_{j}" for j in range(p)]
    labels = list(labels) if labels is not None else list(range(K))
    reasons: list[str | None] = [None] * K
    if K < 3:  # with two shards the median sits halfway: nobody can be an outlier
        return np.ones(K, dtype=bool), reasons
    centre = np.median(means, axis=0)
    inflate = 1.0 + (math.pi / 2 - 1.0) / K
    threshold = float(chi2_dist.isf(p_value / K, p))
    for k in range(K):
        delta = means[k] - centre
        sd = np.sqrt(np.diag(covs[k]))
        try:
            d2 = float(delta @ np.linalg.solve(covs[k], delta)) / inflate
        except np.linalg.LinAlgError:
            d2 = float(np.sum((delta / sd) ** 2)) / inflate
        if not d2 > threshold:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            z = delta / sd
        worst = np.argsort(-np.abs(z))[: min(3, p)]
        parts = ", ".join(f"{names[j]} {z[j]:+.2g} sd" for j in worst)
        reasons[k] = (
            f"its mean lies {math.sqrt(d2):.3g} (Mahalanobis, shard covariance) from the median "
            f"of the shard means, beyond {math.sqrt(threshold):.3g} (χ²({p}) at 1 − "
            f"{p_value:g}/{K}); largest deviations: {parts}"
        )
    flagged = np.array([r is not None for r in reasons])
    kept = ~flagged
    if kept.sum() < K / 2:
        n = int(flagged.sum())
        note = (
            f"kept: excluding the {n} flagged shards of {K} would leave fewer than half; "
            "the shards disagree (heterogeneity) rather than a few being outliers"
        )
        reasons = [f"{r}; {note}" if r is not None else None for r in reasons]
        kept = np.ones(K, dtype=bool)
    return kept, reasons


def degenerate_exclusion(
    shard_draws: Sequence[np.ndarray],
) -> tuple[np.ndarray, list[str | None]]:
    """Exclude shards whose draws do not span every sampled direction; ``(kept, reasons)``.

    A sampler that stopped moving (a step size collapsed in a short warmup) leaves a few
    repeated points: their sample covariance is singular, so the shard has no consensus
    weight and no outlier test, and the run is not_converged with the shard named. If every shard
    is degenerate, all are kept (the consensus then refuses with the shard named).
    """
    reasons: list[str | None] = []
    for draws in shard_draws:
        flat = np.asarray(draws, dtype=np.float64).reshape(-1, draws.shape[-1])
        ok = flat.shape[0] > 1 and spans_every_direction(np.atleast_2d(np.cov(flat, rowvar=False)))
        reasons.append(
            None
            if ok
            else (
                "its draws do not vary in every sampled direction (the sampler stopped "
                "moving): no consensus weight"
            )
        )
    kept = np.array([r is None for r in reasons], dtype=bool)
    if kept.size and not kept.any():
        kept[:] = True
        reasons = [None] * kept.size
    return kept, reasons


def divergence_exclusion(
    divergence_rates: Sequence[float], max_rate: float
) -> tuple[np.ndarray, list[str | None]]:
    """Exclude shards whose divergence rate exceeds ``max_rate``; ``(kept, reasons)``.

    If every shard would be excluded, all are kept and each reason ends in "kept: ...".
    """
    rates = np.asarray(divergence_rates, dtype=np.float64)
    reasons: list[str | None] = [
        f"divergence rate {r:.3g} > max_divergence_rate {max_rate:g}" if r > max_rate else None
        for r in rates
    ]
    kept = np.array([r is None for r in reasons], dtype=bool)
    if rates.size and not kept.any():
        reasons = [f"{r}; kept: every shard exceeds the limit" for r in reasons]
        kept[:] = True
    return kept, reasons


@dataclass
class Selection:
    """Which shards are combined. ``flagged_kept``: flagged by a filter but kept because
    excluding them would leave no shard (divergences) or fewer than half (robust)."""

    kept: list[Shard]
    excluded: dict[int, str]  # shard index -> reason
    excluded_by: dict[int, str]  # shard index -> "degenerate" | "divergence" | "outlier"
    flagged_kept: dict[int, str]


def select_shards(shards: Sequence[Shard], settings: SelectionRules) -> Selection:
    """Shards whose draws are degenerate go first, then the divergence filter, then
    (``robust_consensus_mc`` only) the outlier test on the shards that passed them, on
    the sampled physical parameters of ``shards``' draws (the stage passes them in the
    combination coordinates)."""
    sel = Selection(kept=list(shards), excluded={}, excluded_by={}, flagged_kept={})

    def apply(keep: np.ndarray, reasons: list[str | None], stage: str) -> None:
        for sh, k, reason in zip(sel.kept, keep, reasons, strict=True):
            if reason is None:
                continue
            if k:
                prev = sel.flagged_kept.get(sh.index)
                sel.flagged_kept[sh.index] = f"{prev}; {reason}" if prev else reason
            else:
                sel.excluded[sh.index], sel.excluded_by[sh.index] = reason, stage
        sel.kept = [sh for sh, k in zip(sel.kept, keep, strict=True) if k]

    n_joint = sel.kept[0].n_joint
    apply(*degenerate_exclusion([sh.draws[..., :n_joint] for sh in sel.kept]), "degenerate")
    apply(
        *divergence_exclusion(
            [sh.divergence_rate for sh in sel.kept], settings.max_divergence_rate
        ),
        "divergence",
    )
    if settings.method == "robust_consensus_mc":
        n_phys = len(sel.kept[0].physical)
        flat = [sh.draws[..., :n_phys].reshape(-1, n_phys) for sh in sel.kept]
        keep, reasons = robust_exclusion(
            np.stack([f.mean(axis=0) for f in flat]),
            np.stack([np.atleast_2d(np.cov(f, rowvar=False)) for f in flat]),
            settings.outlier_p_value,
            names=sel.kept[0].names[:n_phys],
            labels=[sh.index for sh in sel.kept],
        )
        apply(keep, reasons, "outlier")
    return sel


# ---------------------------------------------------------------------------------------
# Coordinates and prior restoration
# ---------------------------------------------------------------------------------------
def to_combination(
    draws: np.ndarray, space: SampledSpace | None, n_joint: int, label: Any = None
) -> np.ndarray:
    """Draws with their first ``n_joint`` (sampled) columns in the combination
    coordinates; unchanged without a recorded space."""
    if space is None:
        return draws
    out = np.array(draws, dtype=np.float64, copy=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[..., :n_joint] = np.asarray(w_from_theta(draws[..., :n_joint], space, COMBINATION))
    if not np.all(np.isfinite(out[..., :n_joint])):
        raise ShardError(
            f"shard {label}: draws on or outside the parameter bounds cannot be mapped to the "
            "combination coordinates"
        )
    return out


def from_combination(draws: np.ndarray, space: SampledSpace | None, n_joint: int) -> np.ndarray:
    """Inverse of :func:`to_combination`."""
    if space is None:
        return draws
    out = np.array(draws, dtype=np.float64, copy=True)
    out[..., :n_joint] = np.asarray(theta_from_w(draws[..., :n_joint], space, COMBINATION))
    return out


PARETO_K_MAX = 0.7  # Pareto k̂ of the prior weights above which importance sampling fails
# Fewer effective draws than this (the combination's shard_ess_min) cannot describe the
# posterior either, whatever k̂ (a laminar file: k̂ 0.64, ESS 27 of 2000, and the
# resampled chains had R-hat 1.27)
MIN_WEIGHT_ESS = 100.0


def apply_prior(
    draws_u: np.ndarray,
    space: SampledSpace | None,
    n_joint: int,
    surrogate_fraction: float,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Turn combined draws of L·G^f into draws of the full posterior L·π (cmc_space).

    Pareto-smoothed importance weights π(θ(u))·|∂θ/∂u| / G(u)^f (ArviZ ``psislw``), then
    systematic resampling within each chain (draw order kept, so autocorrelation and
    R-hat keep their meaning). The record gives the Pareto k̂ (> 0.7: the prior and the
    data disagree so much that the weights cannot be trusted) and the weights' ESS.
    Weights with k̂ > 0.7 or fewer than :data:`MIN_WEIGHT_ESS` effective draws are
    replaced by fresh draws (:func:`prior_sampling.redraw`); where those fail too the record says
    ``reliable: false`` (and where none could start, the resampled draws are returned).
    """
    if space is None or space.surrogate_mu is None:
        return draws_u, {
            "method": "none",
            "summary": "the shard files record no surrogate prior: draws combined as stored",
        }
    import arviz as az

    C, D = draws_u.shape[:2]
    with np.errstate(all="ignore"):
        log_w = np.asarray(
            log_prior_weight(draws_u[..., :n_joint], space, surrogate_fraction), dtype=float
        )
    log_w = np.where(np.isfinite(log_w), log_w, -np.inf)
    inside = np.isfinite(log_w)
    if not inside.any():
        raise ShardError(_outside_bounds(draws_u[..., :n_joint], space))
    flat = log_w.reshape(-1)
    smoothed, k_hat = az.psislw(np.where(inside.reshape(-1), flat, -1e300), reff=1.0)
    weights = np.exp(smoothed - smoothed.max()).reshape(C, D)
    weights = np.where(inside, weights, 0.0)
    ess = float(weights.sum() ** 2 / np.sum(weights**2))
    out = resample_within_chains(draws_u, weights, np.random.default_rng(seed))
    k_hat = float(k_hat)
    record: dict[str, Any] = {
        "method": "pareto_smoothed_importance_resampling",
        "weights": (
            f"π(θ(u))·|∂θ/∂u| / G(u)^{surrogate_fraction:.4g} in the combination coordinates"
        ),
        "pareto_k": k_hat,
        "ess": ess,
        "ess_fraction": ess / (C * D),
        "draws_outside_bounds": int((~inside).sum()),
        # a posterior cut by a bound inside its bulk is what Gaussian shards cannot carry
        "bounds_crossed": bounds_crossed(draws_u[..., :n_joint], space),
        "reliable": bool(k_hat <= PARETO_K_MAX and ess >= MIN_WEIGHT_ESS),
        "summary": (
            f"prior applied to the combined draws by importance resampling: Pareto k̂ "
            f"{k_hat:.2f}, weight ESS {ess:.0f} of {C * D}"
        ),
    }
    if record["reliable"]:
        return out, record
    fresh, record = redraw(draws_u, space, n_joint, surrogate_fraction, seed, record)
    return (out if fresh is None else fresh), record


def bounds_crossed(draws_u: np.ndarray, space: SampledSpace) -> list[str]:
    """Which prior bounds the combined draws (combination coordinates) cross, and how
    often: "gamma_dot_t0 below 1e-06 in 41% of the draws"."""
    theta = np.asarray(theta_from_w(draws_u, space, COMBINATION)).reshape(-1, space.size)
    crossed = []
    for j, name in enumerate(space.names):
        lo, hi = space.lower[j], space.upper[j]
        for side, out, bound in (("below", theta[:, j] < lo, lo), ("above", theta[:, j] > hi, hi)):
            if out.any():
                share = f"{out.mean():.0%}" if out.mean() >= 0.005 else "<1%"
                crossed.append(f"{name} {side} {bound:g} in {share} of the draws")
    return crossed


def _outside_bounds(draws_u: np.ndarray, space: SampledSpace) -> str:
    """Why no combined draw can carry the prior: which bounds the draws cross."""
    crossed = bounds_crossed(draws_u, space)
    return (
        "every combined draw lies outside the prior bounds ("
        + ("; ".join(crossed) or "the shear sign convention")
        + "): the shards' likelihood sits beyond them. The usual cause is data that fix "
        "D(t) (or γ̇(t)) but not its parts, with the NLSQ optimum on a bound "
        "(parameters.json `at_bound`, `weakly_identified`): fix alpha (or beta), widen the "
        "bounds, or report the NLSQ result with those flags"
    )


def resample_within_chains(
    draws: np.ndarray, weights: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Systematic resampling of each chain by its own ``weights`` (chains, draws), keeping
    the draw order; a chain whose weights are all zero draws from the pooled chains. One
    ``rng.uniform()`` per chain, in chain order."""
    C, D = weights.shape
    out = np.array(draws, copy=True)
    for c in range(C):
        w = weights[c]
        if w.sum() <= 0:  # a chain entirely outside the bounds: use the pooled weights
            w = weights.reshape(-1)
            pool = draws.reshape(C * D, -1)
        else:
            pool = draws[c]
        cdf = np.cumsum(w / w.sum())
        positions = (rng.uniform() + np.arange(D)) / D
        out[c] = pool[np.minimum(np.searchsorted(cdf, positions), cdf.size - 1)]
    return out


@dataclass
class Combination:
    """The combined posterior: which shards were used and the draws (chains, draws, p) in
    the parameters' own coordinates; ``restoration``: the prior application record
    (:func:`apply_prior`), None for ``simple_average``."""

    selection: Selection
    draws: np.ndarray
    restoration: dict[str, Any] | None


def combine_shards(shards: Sequence[Shard], rules: SelectionRules) -> Combination:
    """Select and combine one run's shards (:func:`read_shards` order), then apply the prior.

    Shard posteriors are near-Gaussian in the combination coordinates (the rates
    coordinates, bounded parameters through their logits), and each shard targeted
    L_k·[π·|∂θ/∂u|]^(1/K) there (cmc_space), so the Gaussian consensus of these draws is
    the full posterior. Selection (:func:`select_shards`) is judged there too.
    """
    first = shards[0]
    K = first.num_shards
    space, n_joint = first.space, first.n_joint
    in_u = [replace(sh, draws=to_combination(sh.draws, space, n_joint, sh.index)) for sh in shards]
    selection = select_shards(in_u, rules)
    kept_u = selection.kept
    by_index = {sh.index: sh for sh in shards}
    selection.kept = [by_index[sh.index] for sh in selection.kept]
    kept = selection.kept
    labels = [sh.index for sh in kept]
    draws_u = combine_draws([sh.draws for sh in kept_u], rules.method, n_joint, labels=labels)
    restoration = None
    if rules.method != "simple_average":
        powers = [sh.prior_tempering for sh in kept]
        fraction = sum(powers) if all(x is not None for x in powers) else len(kept) / K
        draws_u, restoration = apply_prior(draws_u, space, n_joint, fraction)
    return Combination(selection, from_combination(draws_u, space, n_joint), restoration)


# ---------------------------------------------------------------------------------------
# Agreement between shards
# ---------------------------------------------------------------------------------------
def heterogeneity(
    shard_means: np.ndarray, shard_vars: np.ndarray, combined_mean: np.ndarray
) -> dict[str, np.ndarray]:
    """χ² of shard means around the combined mean, relative to the shard variances.

    Each shard sees 1/K of the data, so its posterior variance is about K times the
    full-data one, and under homogeneity the shard means scatter around the combined
    mean with about that variance: ``chi2 = Σ_k (m_k − m)² / v_k`` follows χ² with
    K − 1 degrees of freedom. Returns chi2, dof, reduced chi2, p-value and per-shard
    z-scores ``(m_k − m) / √v_k``.
    """
    from scipy.stats import chi2 as chi2_dist

    m = np.asarray(shard_means, dtype=np.float64)
    v = np.asarray(shard_vars, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (m - combined_mean) / np.sqrt(v)
    stat = np.sum(z**2, axis=0)
    dof = m.shape[0] - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        reduced = stat / dof if dof > 0 else np.full(stat.shape, np.nan)
    p_value = chi2_dist.sf(stat, dof) if dof > 0 else np.full(stat.shape, np.nan)
    return {"chi2": stat, "dof": dof, "reduced_chi2": reduced, "p_value": p_value, "z": z}
