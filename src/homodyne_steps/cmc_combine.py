"""The CMC combination stage: shard posteriors in, one consensus posterior and its files out.

Consensus Monte Carlo (Scott et al. 2016) splits the data into K shards and samples
each shard's posterior (:mod:`cmc_shard`, not here); this module reads the shard files,
decides which shards to use, combines their draws, applies the prior, judges
convergence and writes the results. Shards target L_k·G^(1/K) in the combination
coordinates u (:mod:`cmc_space`); their draws are mapped to u, combined there, given
the prior by importance resampling (:func:`apply_prior`) and mapped back.

Combination methods (``cmc.combine.method``):

- ``consensus_mc``: precision-weighted consensus. ``W_k`` is the inverse of shard k's
  sample covariance (over all its chains and draws); draw ``i`` of the result is
  ``(Σ W_k)⁻¹ Σ_k W_k u_k(i)``, pairing draws by (chain, draw) index. Exact when every
  shard posterior is Gaussian.
- ``robust_consensus_mc`` (default): ``consensus_mc`` after excluding shards whose mean
  of the sampled physical parameters lies further from the median of the shard means
  than the shard's own posterior covariance allows (:func:`robust_exclusion`).
- ``simple_average``: the mean over shards of ``θ_k(i)`` (a baseline for comparison; it
  is not a posterior of the full data, and no prior is applied).

Every method first drops shards whose divergence rate exceeds ``max_divergence_rate``
(:func:`divergence_exclusion`). Neither filter ever aborts the stage: when a filter
would drop all shards (divergences) or leave fewer than half of them (outliers), it
keeps them all and the outputs say what it found (warnings, ``combination_report.json``).
Each shard is also judged on its own R-hat and ESS (:func:`shard_convergence`).

Parameter vector: the sampled parameters (the shard's ``sampled_space``: physical
parameters, then sampled scaling), then derived per-angle ``contrast_a``/``offset_a``
(varpro, auto, fourier), which are combined per component with inverse-variance weights
(:func:`marginal_consensus`, approximate) and reported as ``derived``. Shard files
without a recorded space are combined as stored (physical parameters, and per-angle
scaling when it is sampled).

Output files (seed §10 names, plus ``schema_version``, ``combination_report.json`` and
``posterior.nc``): ``samples.npz``, ``posterior.nc``, ``diagnostics.json``,
``combination_report.json``, ``analysis_results_cmc.json`` and ``parameters.json``,
written last as the workflow's sentinel. Everything is computed before the first file is
written; each file is written atomically; if any write fails the files of this run are
removed, so a failed run never leaves a mixture of old and new outputs. JSON never holds
NaN: an undefined number (R-hat of one chain, say) is ``null``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from homodyne_steps.cmc_space import (
    COMBINATION,
    SampledSpace,
    log_prior_weight,
    space_from_attrs,
    theta_from_w,
    w_from_theta,
)
from homodyne_steps.errors import ConfigError, DataError
from homodyne_steps.registry import REGISTRY, canonical_mode
from homodyne_steps.serialise import (
    SerialisationError,
    atomic_path,
    read_json,
    read_json_object,
    write_json,
    write_npz,
)
from homodyne_steps.settings import check_keys, get_choice, get_number

SCHEMA_VERSION = 1
NPZ_SCHEMA_VERSION = (1, 0)
METHODS = ("robust_consensus_mc", "consensus_mc", "simple_average")
OUTPUT_FILES = (
    "samples.npz",
    "posterior.nc",
    "diagnostics.json",
    "combination_report.json",
    "analysis_results_cmc.json",
    "parameters.json",  # last: the workflow's sentinel
)
SCALING_VARIABLES = ("contrast", "offset")
SAMPLED_SCALING_MODES = ("individual",)  # per_angle_scaling modes that sample c, o per angle
BFMI_WARN = 0.3  # energy BFMI below this: the sampler explores the energy poorly
HETEROGENEITY_P = 1e-3  # p-value of the shard-mean χ² below which shards disagree
NLSQ_Z_WARN = 3.0  # |z| of CMC mean − NLSQ value above which the two disagree
HDI_PROB = 0.94
SAMPLE_STATS = ("diverging", "energy", "tree_depth", "step_size", "acceptance_rate")
SHARD_JSON_KEYS = ("shard", "num_shards", "n_points")


class ShardError(DataError):
    """Shard files are missing, unreadable, or do not belong together."""


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CombineSettings:
    method: str = "robust_consensus_mc"
    outlier_p_value: float = 0.01
    max_divergence_rate: float = 0.1
    rhat_good: float = 1.05
    rhat_acceptable: float = 1.1
    ess_warn: float = 400.0
    shard_ess_min: float = 100.0

    @classmethod
    def from_mapping(
        cls, m: Mapping[str, Any] | None, where: str = "cmc.combine"
    ) -> CombineSettings:
        m = {} if m is None else m
        if "mad_threshold" in m:
            raise ConfigError(
                f"{where}.mad_threshold: replaced by outlier_p_value (the probability that a "
                "homogeneous run loses any shard to the outlier test, default 0.01); the "
                "median-and-MAD rule excluded 4-11 % of honest shards"
            )
        check_keys(m, {f.name for f in cls.__dataclass_fields__.values()}, where)
        m = dict(m)
        d = cls()
        s = cls(
            method=get_choice(m, "method", d.method, METHODS, where),
            outlier_p_value=get_number(
                m,
                "outlier_p_value",
                d.outlier_p_value,
                where,
                minimum=0.0,
                exclusive_minimum=True,
                maximum=0.5,
            ),
            max_divergence_rate=get_number(
                m, "max_divergence_rate", d.max_divergence_rate, where, minimum=0.0, maximum=1.0
            ),
            rhat_good=get_number(m, "rhat_good", d.rhat_good, where, minimum=1.0),
            rhat_acceptable=get_number(m, "rhat_acceptable", d.rhat_acceptable, where, minimum=1.0),
            ess_warn=get_number(m, "ess_warn", d.ess_warn, where, minimum=0.0),
            shard_ess_min=get_number(m, "shard_ess_min", d.shard_ess_min, where, minimum=0.0),
        )
        if s.rhat_acceptable < s.rhat_good:
            raise ConfigError(
                f"{where}.rhat_acceptable: must be >= rhat_good ({s.rhat_good}), "
                f"got {s.rhat_acceptable}"
            )
        return s

    def to_mapping(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# Pure combination functions
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


DEGENERATE_EIGENVALUE = 1e-9  # smallest eigenvalue of a shard's draw correlation matrix


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
        cov = np.atleast_2d(np.cov(flat, rowvar=False)) if flat.shape[0] > 1 else None
        sd = np.sqrt(np.clip(np.diagonal(cov), 0.0, None)) if cov is not None else None
        ok = cov is not None and bool(np.all(sd > 0))
        # rank from the correlation matrix: round-off lets Cholesky pass a rank-deficient one
        ok = ok and float(np.linalg.eigvalsh(cov / np.outer(sd, sd))[0]) > DEGENERATE_EIGENVALUE
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


def quality_label(r_hat: float | None, settings: CombineSettings) -> str:
    """``good`` (R-hat < rhat_good), ``acceptable`` (≤ rhat_acceptable), ``poor``, or
    ``unknown`` when R-hat is undefined (one chain, constant draws)."""
    if r_hat is None or not math.isfinite(r_hat):
        return "unknown"
    if r_hat < settings.rhat_good:
        return "good"
    if r_hat <= settings.rhat_acceptable:
        return "acceptable"
    return "poor"


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


# ---------------------------------------------------------------------------------------
# Reading shards
# ---------------------------------------------------------------------------------------
@dataclass
class Shard:
    """One shard's draws (over the combined parameter vector), stats and metadata."""

    index: int
    num_shards: int
    n_points: int
    analysis_mode: str
    per_angle_scaling: str
    prior_tempering: float | None
    physical: tuple[str, ...]
    scaling: dict[str, int]  # per-angle scaling variable -> number of angles
    angle_coords: list[Any]
    names: tuple[str, ...]
    draws: np.ndarray  # (chains, draws, p)
    stats: dict[str, np.ndarray | None]
    meta: dict[str, Any]
    nc_path: Path
    json_path: Path
    ignored_variables: list[str] = field(default_factory=list)
    # what the shard sampled (its leading columns), priors and coordinates; None for
    # shard files that do not record it (then the columns are combined as they are)
    space: SampledSpace | None = None

    @property
    def scaling_derived(self) -> bool:
        """contrast/offset present but not sampled per angle (deterministics)."""
        return bool(self.scaling) and self.per_angle_scaling not in SAMPLED_SCALING_MODES

    @property
    def n_joint(self) -> int:
        """Leading columns combined jointly: the sampled ones."""
        if self.space is not None:
            return self.space.size
        return len(self.physical) if self.scaling_derived else len(self.names)

    @property
    def mean(self) -> np.ndarray:
        return self.draws.mean(axis=(0, 1))

    @property
    def std(self) -> np.ndarray:
        n = self.draws.shape[0] * self.draws.shape[1]
        return self.draws.std(axis=(0, 1), ddof=1) if n > 1 else np.zeros(self.draws.shape[2])

    @property
    def divergences(self) -> int:
        d = self.stats.get("diverging")
        if d is not None:
            return int(np.sum(d))
        return int(self.meta.get("divergences") or 0)

    @property
    def divergence_rate(self) -> float:
        d = self.stats.get("diverging")
        if d is not None and d.size:
            return float(np.mean(d))
        rate = self.meta.get("divergence_rate")
        return float(rate) if isinstance(rate, int | float) else 0.0


def _attr(attrs: Mapping[str, Any], key: str, kind: type, path: Path) -> Any:
    if key not in attrs:
        raise ShardError(f"{path}: posterior attribute {key!r} is missing")
    value = attrs[key]
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str | bytes):
        return value.decode() if isinstance(value, bytes) else value
    raise ShardError(f"{path}: posterior attribute {key!r} must be {kind.__name__}, got {value!r}")


def read_shard(nc_path: str | os.PathLike[str], json_path: str | os.PathLike[str]) -> Shard:
    """Read one shard's ``{k}.nc`` and ``{k}.json``; check that the two agree."""
    import arviz as az

    nc_path, json_path = Path(nc_path), Path(json_path)
    if not nc_path.is_file():
        raise ShardError(f"shard posterior file {nc_path} does not exist")
    try:
        meta = read_json_object(json_path)
    except SerialisationError as exc:
        raise ShardError(f"shard summary: {exc}") from None
    for key in SHARD_JSON_KEYS:
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool):
            raise ShardError(f"{json_path}: key {key!r} must be an integer, got {meta.get(key)!r}")
    try:
        idata = az.from_netcdf(nc_path)
    except Exception as exc:  # h5py/xarray raise many types for a bad file
        raise ShardError(f"cannot read shard posterior {nc_path}: {exc}") from None
    if "posterior" not in idata.groups():
        raise ShardError(f"{nc_path}: no 'posterior' group (groups: {idata.groups()})")
    post = idata.posterior
    attrs = dict(post.attrs)
    index = _attr(attrs, "shard", int, nc_path)
    num_shards = _attr(attrs, "num_shards", int, nc_path)
    n_points = _attr(attrs, "n_points", int, nc_path)
    try:
        mode = canonical_mode(_attr(attrs, "analysis_mode", str, nc_path))
    except DataError:
        raise
    except ValueError as exc:
        raise ShardError(f"{nc_path}: {exc}") from None
    scaling_mode = _attr(attrs, "per_angle_scaling", str, nc_path)
    tempering = (
        _attr(attrs, "prior_tempering", float, nc_path) if "prior_tempering" in attrs else None
    )
    for key, value in (("shard", index), ("num_shards", num_shards), ("n_points", n_points)):
        if meta[key] != value:
            raise ShardError(
                f"{json_path} says {key} = {meta[key]} but {nc_path} says {value}: "
                "the summary and the posterior are not of the same shard"
            )
    expected = REGISTRY.physical_names(mode)
    variables = list(post.data_vars)
    other_mode = [v for v in variables if v in REGISTRY.names and v not in expected]
    other_mode = [v for v in other_mode if v not in SCALING_VARIABLES]
    if other_mode:
        raise ShardError(
            f"{nc_path}: variables {other_mode} are not parameters of {mode} mode {list(expected)}"
        )
    missing = [n for n in expected if n not in variables]
    if missing:
        raise ShardError(
            f"{nc_path}: posterior lacks {missing}; {mode} mode needs {list(expected)}"
        )
    try:
        space = space_from_attrs(attrs)
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardError(
            f"{nc_path}: posterior attribute 'sampled_space' is unreadable: {exc}"
        ) from None
    if space is not None and tuple(space.names[: len(expected)]) != tuple(expected):
        raise ShardError(
            f"{nc_path}: the sampled space {list(space.names)} does not start with the "
            f"{mode} parameters {list(expected)}"
        )
    columns, names = [], []
    sampled_vars: set[str] = set()
    if space is not None:
        for name, (var, idx) in zip(space.names, space.columns, strict=True):
            if var not in variables:
                raise ShardError(f"{nc_path}: posterior lacks the sampled variable {var!r}")
            da = post[var]
            other = [d for d in da.dims if d not in ("chain", "draw")]
            values = np.asarray(da.transpose("chain", "draw", *other).values, dtype=np.float64)
            if (idx is None) != (values.ndim == 2) or (idx is not None and idx >= values.shape[2]):
                raise ShardError(f"{nc_path}: {var!r} has dims {da.dims}; cannot hold {name}")
            columns.append(values[..., None] if idx is None else values[..., idx : idx + 1])
            names.append(name)
            sampled_vars.add(var)
    else:
        for n in expected:
            da = post[n]
            if set(da.dims) != {"chain", "draw"}:
                raise ShardError(f"{nc_path}: {n!r} must have dims (chain, draw), got {da.dims}")
            columns.append(
                np.asarray(da.transpose("chain", "draw").values, dtype=np.float64)[..., None]
            )
            names.append(n)
    scaling: dict[str, int] = {}
    angle_coords: list[Any] = []
    for n in SCALING_VARIABLES:
        if n not in variables:
            continue
        da = post[n]
        extra = [d for d in da.dims if d not in ("chain", "draw")]
        if len(extra) != 1 or "chain" not in da.dims or "draw" not in da.dims:
            raise ShardError(f"{nc_path}: {n!r} must have dims (chain, draw, angle), got {da.dims}")
        values = np.asarray(da.transpose("chain", "draw", extra[0]).values, dtype=np.float64)
        scaling[n] = values.shape[2]
        angle_coords = [c.item() if hasattr(c, "item") else c for c in da[extra[0]].values]
        if n in sampled_vars:
            continue
        columns.append(values)
        names.extend(f"{n}_{a}" for a in range(values.shape[2]))
    try:
        draws = np.concatenate(columns, axis=2)
    except ValueError:
        raise ShardError(
            f"{nc_path}: posterior variables have different (chain, draw) shapes"
        ) from None
    stats: dict[str, np.ndarray | None] = dict.fromkeys(SAMPLE_STATS)
    if "sample_stats" in idata.groups():
        ss = idata.sample_stats
        for key in SAMPLE_STATS:
            if key in ss:
                stats[key] = np.asarray(ss[key].values)
    ignored = [
        v
        for v in variables
        if v not in names and v not in expected and v not in scaling and v not in sampled_vars
    ]
    return Shard(
        index=index,
        num_shards=num_shards,
        n_points=n_points,
        analysis_mode=mode,
        per_angle_scaling=scaling_mode,
        prior_tempering=tempering,
        physical=tuple(expected),
        scaling=scaling,
        angle_coords=angle_coords,
        names=tuple(names),
        draws=draws,
        stats=stats,
        meta=meta,
        nc_path=nc_path,
        json_path=json_path,
        ignored_variables=ignored,
        space=space,
    )


def read_shards(
    shard_nc: Sequence[str | os.PathLike[str]], shard_json: Sequence[str | os.PathLike[str]]
) -> list[Shard]:
    """Read all shards, pairing ``{k}.nc`` with ``{k}.json`` by file stem, and check that
    they form one complete set: same num_shards, analysis mode, parameter names and draw
    shape; every index 0..K-1 exactly once. Returned in shard-index order."""
    if len(shard_nc) == 0:
        raise ShardError("no shard files given")
    if len(shard_nc) != len(shard_json):
        raise ShardError(
            f"got {len(shard_nc)} shard posterior files but {len(shard_json)} shard summaries"
        )
    nc_paths, json_paths = [Path(p) for p in shard_nc], [Path(p) for p in shard_json]
    by_stem = {p.stem: p for p in json_paths}
    if len(by_stem) == len(json_paths) and {p.stem for p in nc_paths} == set(by_stem):
        pairs = [(p, by_stem[p.stem]) for p in nc_paths]
    else:  # names do not pair up: take the lists in the order given
        pairs = list(zip(nc_paths, json_paths, strict=True))
    shards = [read_shard(nc, js) for nc, js in pairs]
    check_shard_set(shards)
    return sorted(shards, key=lambda s: s.index)


def check_shard_set(shards: Sequence[Shard]) -> None:
    """Raise :class:`ShardError` unless the shards belong to one CMC run."""
    first = shards[0]

    def _differ(attr: str) -> None:
        values = {repr(getattr(s, attr)) for s in shards}
        if len(values) > 1:
            detail = ", ".join(f"{s.nc_path.name}: {getattr(s, attr)!r}" for s in shards)
            raise ShardError(f"shards do not belong together: {attr} differs ({detail})")

    for attr in ("num_shards", "analysis_mode", "per_angle_scaling", "names"):
        _differ(attr)

    spaces = {None if sh.space is None else sh.space.to_json() for sh in shards}
    if len(spaces) > 1:
        raise ShardError(
            "shards do not belong together: they sampled different spaces (parameters, "
            "bounds, priors or time windows differ)"
        )
    K = first.num_shards
    indices = [s.index for s in shards]
    dupes = sorted({i for i in indices if indices.count(i) > 1})
    if dupes:
        files = [str(s.nc_path) for s in shards if s.index in dupes]
        raise ShardError(f"shard indices {dupes} appear more than once ({files})")
    missing = sorted(set(range(K)) - set(indices))
    extra = sorted(set(indices) - set(range(K)))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing shards {missing}")
        if extra:
            parts.append(f"indices {extra} outside 0..{K - 1}")
        raise ShardError(f"incomplete shard set (num_shards = {K}): " + "; ".join(parts))
    shapes = {s.draws.shape for s in shards}
    if len(shapes) > 1:
        detail = ", ".join(f"shard {s.index}: {s.draws.shape[:2]}" for s in shards)
        raise ShardError(
            "shards have different (chains, draws); the consensus pairs draws by index and "
            f"needs equal shapes ({detail})"
        )


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
# Shard selection
# ---------------------------------------------------------------------------------------
@dataclass
class Selection:
    """Which shards are combined. ``flagged_kept``: flagged by a filter but kept because
    excluding them would leave no shard (divergences) or fewer than half (robust)."""

    kept: list[Shard]
    excluded: dict[int, str]  # shard index -> reason
    excluded_by: dict[int, str]  # shard index -> "degenerate" | "divergence" | "outlier"
    flagged_kept: dict[int, str]


def select_shards(shards: Sequence[Shard], settings: CombineSettings) -> Selection:
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
# Coordinates, prior restoration and per-shard convergence
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
        raise ShardError(
            "every combined draw lies outside the prior bounds: the data and the prior "
            "do not overlap"
        )
    flat = log_w.reshape(-1)
    smoothed, k_hat = az.psislw(np.where(inside.reshape(-1), flat, -1e300), reff=1.0)
    weights = np.exp(smoothed - smoothed.max()).reshape(C, D)
    weights = np.where(inside, weights, 0.0)
    ess = float(weights.sum() ** 2 / np.sum(weights**2))
    rng = np.random.default_rng(seed)
    out = np.array(draws_u, copy=True)
    for c in range(C):
        w = weights[c]
        if w.sum() <= 0:  # a chain entirely outside the bounds: use the pooled weights
            w = weights.reshape(-1)
            pool = draws_u.reshape(C * D, -1)
        else:
            pool = draws_u[c]
        cdf = np.cumsum(w / w.sum())
        positions = (rng.uniform() + np.arange(D)) / D
        out[c] = pool[np.minimum(np.searchsorted(cdf, positions), cdf.size - 1)]
    k_hat = float(k_hat)
    record = {
        "method": "pareto_smoothed_importance_resampling",
        "weights": (
            f"π(θ(u))·|∂θ/∂u| / G(u)^{surrogate_fraction:.4g} in the combination coordinates"
        ),
        "pareto_k": k_hat,
        "ess": ess,
        "ess_fraction": ess / (C * D),
        "draws_outside_bounds": int((~inside).sum()),
        "reliable": bool(k_hat <= PARETO_K_MAX),
        "summary": (
            f"prior applied to the combined draws by importance resampling: Pareto k̂ "
            f"{k_hat:.2f}, weight ESS {ess:.0f} of {C * D}"
        ),
    }
    return out, record


def shard_convergence(shard: Shard, settings: CombineSettings) -> dict[str, Any]:
    """R-hat and ESS of one shard's sampled parameters, and what is wrong if anything.

    A shard whose chains disagree (R-hat > rhat_acceptable) or whose ESS is below
    ``shard_ess_min`` did not sample its posterior; consensus would give its wide or
    bimodal draws little weight, hiding the failure in the combined R-hat.
    """
    import warnings

    import arviz as az

    n = shard.n_joint
    names = shard.names[:n]
    idata = _flat_idata(shard.draws[..., :n], names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rhat = az.rhat(idata) if shard.draws.shape[0] > 1 else None
        ess_b = az.ess(idata, method="bulk")
        ess_t = az.ess(idata, method="tail")

    def col(ds) -> list[float | None]:
        return [_num(float(ds[x].values)) for x in names]

    r = col(rhat) if rhat is not None else [None] * n
    eb, et = col(ess_b), col(ess_t)
    problems = []
    bad_r = [(x, v) for x, v in zip(names, r, strict=True) if v and v > settings.rhat_acceptable]
    if bad_r:
        problems.append(
            "R-hat "
            + ", ".join(f"{x} {v:.3g}" for x, v in bad_r)
            + f" > {settings.rhat_acceptable:g} (its chains disagree)"
        )
    ess = [
        min((e for e in pair if e is not None), default=None) for pair in zip(eb, et, strict=True)
    ]
    bad_e = [
        (x, e) for x, e in zip(names, ess, strict=True) if e is None or e < settings.shard_ess_min
    ]
    if bad_e:
        problems.append(
            "ESS "
            + ", ".join(f"{x} {'undefined' if e is None else f'{e:.0f}'}" for x, e in bad_e)
            + f" < shard_ess_min {settings.shard_ess_min:g}"
        )
    finite_r = [v for v in r if v is not None]
    finite_e = [e for e in ess if e is not None]
    return {
        "max_r_hat": max(finite_r) if finite_r else None,
        "min_ess": min(finite_e) if finite_e else None,
        "problem": "; ".join(problems) or None,
    }


# ---------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------
def _flat_idata(draws: np.ndarray, names: Sequence[str]):
    import arviz as az

    return az.from_dict(posterior={n: draws[..., j] for j, n in enumerate(names)})


def posterior_summary(draws: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-parameter mean, std, 94 % HDI, R-hat, bulk and tail ESS (ArviZ), as arrays."""
    import warnings

    import arviz as az

    idata = _flat_idata(draws, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one chain / constant draws: NaN
        rhat = az.rhat(idata)
        ess_bulk = az.ess(idata, method="bulk")
        ess_tail = az.ess(idata, method="tail")
        hdi = az.hdi(idata, hdi_prob=HDI_PROB)

    def col(ds) -> np.ndarray:
        return np.array([float(ds[n].values) for n in names])

    return {
        "mean": draws.mean(axis=(0, 1)),
        "std": draws.std(axis=(0, 1), ddof=1)
        if draws.shape[0] * draws.shape[1] > 1
        else np.zeros(draws.shape[2]),
        "hdi_3%": np.array([float(hdi[n].sel(hdi="lower")) for n in names]),
        "hdi_97%": np.array([float(hdi[n].sel(hdi="higher")) for n in names]),
        "r_hat": col(rhat),
        "ess_bulk": col(ess_bulk),
        "ess_tail": col(ess_tail),
    }


def shard_bfmi(shard: Shard) -> np.ndarray | None:
    """Energy BFMI per chain of a shard (ArviZ), or None without energy."""
    import arviz as az

    energy = shard.stats.get("energy")
    if energy is None or energy.ndim != 2 or energy.shape[1] < 2:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(az.bfmi(energy), dtype=np.float64)


def _num(x: Any) -> float | None:
    """A finite float, else None (JSON null)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _clean(value: Any) -> Any:
    """Recursively: numpy -> Python, non-finite floats -> None."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return _num(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def assess_quality(
    names: Sequence[str],
    summary: Mapping[str, np.ndarray],
    settings: CombineSettings,
    *,
    divergences: int = 0,
    n_draws_total: int = 0,
    low_bfmi: Mapping[int, float] | None = None,
    excluded: Mapping[int, str] | None = None,
    flagged_kept: Mapping[int, str] | None = None,
    heterogeneous: Sequence[str] = (),
    stuck_shards: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Labels per parameter, an overall status, and plain-language warnings/advice.

    Status: ``not_converged`` when any R-hat is > rhat_acceptable or undefined, or any
    shard did not converge on its own (``stuck_shards``: the combined draws of a stuck
    shard can look well mixed, because consensus gives its wide posterior little weight);
    ``converged_with_warnings`` when any R-hat is only acceptable, an ESS is below
    ``ess_warn``, there are divergences, low BFMI, excluded or disagreeing shards;
    ``converged`` otherwise.
    """
    warnings_: list[str] = []
    recs: list[str] = []

    def rec(text: str) -> None:
        if text not in recs:
            recs.append(text)

    per_param = []
    labels = []
    low_ess = []
    for j, n in enumerate(names):
        r = _num(summary["r_hat"][j])
        eb, et = _num(summary["ess_bulk"][j]), _num(summary["ess_tail"][j])
        label = quality_label(r, settings)
        labels.append(label)
        notes = []
        if label == "acceptable":
            notes.append(
                f"R-hat of {n} is {r:.3f} (between {settings.rhat_good:g} and "
                f"{settings.rhat_acceptable:g})"
            )
        elif label == "poor":
            notes.append(
                f"R-hat of {n} is {r:.3f} (> {settings.rhat_acceptable:g}): the chains "
                "disagree and this parameter has not converged"
            )
        elif label == "unknown":
            notes.append(
                f"R-hat of {n} is undefined (needs at least 2 chains with varying draws): "
                "convergence cannot be confirmed"
            )
        ess_min = min((e for e in (eb, et) if e is not None), default=None)
        if ess_min is None or ess_min < settings.ess_warn:
            low_ess.append(n)
            shown = "undefined" if ess_min is None else f"{ess_min:.0f}"
            notes.append(f"effective sample size of {n} is {shown} (< {settings.ess_warn:g})")
        warnings_.extend(notes)
        per_param.append(
            {
                "name": n,
                "r_hat": r,
                "ess_bulk": eb,
                "ess_tail": et,
                "quality": label,
                "converged": label in ("good", "acceptable"),
                "warnings": notes,
            }
        )
    if any(lab in ("acceptable", "poor", "unknown") for lab in labels):
        rec("increase num_warmup (and check the chains' trace plots)")
    if "unknown" in labels:
        rec("run at least 2 chains per shard so that R-hat can be computed")
    if low_ess:
        rec("increase num_samples (or num_chains) to raise the effective sample size")
    if divergences:
        rate = divergences / n_draws_total if n_draws_total else float("nan")
        warnings_.append(
            f"{divergences} divergent transitions in the kept shards (rate {rate:.3g})"
        )
        rec("raise the target acceptance probability or reparameterise to remove divergences")
    for k, b in sorted((low_bfmi or {}).items()):
        warnings_.append(
            f"shard {k}: energy BFMI {b:.3f} < {BFMI_WARN:g}; the sampler explores the "
            "posterior poorly"
        )
        rec("increase num_warmup or reparameterise (low BFMI)")
    if excluded:
        ids = sorted(excluded)
        for k in ids:
            warnings_.append(f"shard {k} excluded: {excluded[k]}")
        rec(f"check shard heterogeneity: shards {ids} excluded")
    if flagged_kept:
        ids = sorted(flagged_kept)
        for k in ids:
            warnings_.append(f"shard {k} flagged but kept: {flagged_kept[k]}")
        rec(f"check shard heterogeneity: shards {ids} were flagged but kept")
    if heterogeneous:
        warnings_.append(
            f"shard means of {list(heterogeneous)} scatter more than their posterior widths "
            "allow (χ² p-value < {:g}): the shards disagree".format(HETEROGENEITY_P)
        )
        rec("check shard heterogeneity (data differ between shards, or the model misfits)")
    for k, problem in sorted((stuck_shards or {}).items()):
        warnings_.append(f"shard {k} did not converge: {problem}")
        rec(f"rerun shard {k} with more warmup/samples, or check its trace plots")
    poor = [n for n, lab in zip(names, labels, strict=True) if lab in ("poor", "unknown")]
    all_converged = not poor and not stuck_shards
    if not all_converged:
        status = "not_converged"
        parts = []
        if poor:
            parts.append(f"R-hat is above {settings.rhat_acceptable:g} or undefined for {poor}")
        if stuck_shards:
            parts.append(f"shards {sorted(stuck_shards)} did not converge on their own")
        summary_text = (
            f"NOT CONVERGED: {'; '.join(parts)}. Do not use these estimates; re-run with "
            "more warmup/samples."
        )
        flag = "poor"
    elif warnings_:
        status = "converged_with_warnings"
        summary_text = "Converged, with warnings (see 'warnings')."
        flag = "acceptable"
    else:
        status = "converged"
        summary_text = (
            f"Converged: all R-hat < {settings.rhat_good:g} and all ESS >= "
            f"{settings.ess_warn:g}; no divergences."
        )
        flag = "good"
    return {
        "convergence_status": status,
        "all_converged": all_converged,
        "quality_flag": flag,
        "summary": summary_text,
        "warnings": warnings_,
        "recommendations": recs,
        "per_parameter": per_param,
    }


# ---------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------
@dataclass
class CombineOutcome:
    """What the stage found and wrote."""

    analysis_mode: str
    method: str
    names: tuple[str, ...]
    draws: np.ndarray  # (chains, draws, p)
    summary: dict[str, np.ndarray]
    kept: list[int]
    excluded: dict[int, str]
    flagged_kept: dict[int, str]
    quality: dict[str, Any]
    files: list[Path] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.quality["convergence_status"]


def _read_nlsq(path: Path, mode: str) -> dict[str, Any]:
    try:
        rec = read_json(path)
    except SerialisationError as exc:
        raise DataError(f"NLSQ parameters: {exc}") from None
    params = rec.get("parameters") if isinstance(rec, dict) else None
    if not isinstance(params, dict):
        raise DataError(f"{path}: expected NLSQ parameters.json with a 'parameters' mapping")
    nlsq_mode = rec.get("analysis_mode")
    if nlsq_mode is not None and canonical_mode(nlsq_mode) != mode:
        raise DataError(
            f"{path}: NLSQ analysis_mode {nlsq_mode!r} differs from the shards' {mode!r}"
        )
    return rec


def _nlsq_comparison(
    rec: dict[str, Any], path: Path, names: Sequence[str], summary: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    zs = []
    for j, n in enumerate(names):
        entry = rec["parameters"].get(n)
        if not isinstance(entry, dict) or _num(entry.get("value")) is None:
            continue
        value, unc = float(entry["value"]), _num(entry.get("uncertainty"))
        mean, std = float(summary["mean"][j]), float(summary["std"][j])
        sd = math.sqrt(std**2 + (unc or 0.0) ** 2)
        z = (mean - value) / sd if sd > 0 else None
        if z is not None:
            zs.append(abs(z))
        out[n] = {
            "nlsq_value": value,
            "nlsq_uncertainty": unc,
            "cmc_mean": mean,
            "cmc_std": std,
            "difference": mean - value,
            "z_score": z,
        }
    max_z = max(zs) if zs else None
    return {
        "file": str(path),
        "z_score_definition": "(cmc_mean - nlsq_value) / sqrt(cmc_std² + nlsq_uncertainty²)",
        "parameters": out,
        "max_abs_z_score": max_z,
        "consistent": None if max_z is None else bool(max_z <= NLSQ_Z_WARN),
    }


def _stat_mean(shards: Sequence[Shard], key: str) -> float | None:
    vals = [np.asarray(s.stats[key], dtype=np.float64) for s in shards if s.stats[key] is not None]
    return _num(np.mean(np.concatenate([v.ravel() for v in vals]))) if vals else None


def _combined_idata(draws: np.ndarray, shard: Shard, attrs: Mapping[str, Any]):
    """The combined posterior in the shards' layout (per-angle scaling with an angle dim)."""
    import arviz as az

    post: dict[str, np.ndarray] = {}
    j = 0
    for n in shard.physical:
        post[n] = draws[..., j]
        j += 1
    dims, coords = {}, {}
    for n, n_angle in shard.scaling.items():
        post[n] = draws[..., j : j + n_angle]
        j += n_angle
        dims[n] = ["angle"]
    if shard.scaling:
        coords["angle"] = shard.angle_coords
    idata = az.from_dict(posterior=post, dims=dims, coords=coords or None)
    idata.posterior.attrs.update(attrs)
    return idata


def _remove_outputs(out_dir: Path) -> None:
    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)


def combine_stage(
    shard_nc: Sequence[str | os.PathLike[str]],
    shard_json: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    settings: CombineSettings | None = None,
    *,
    nlsq_parameters: str | os.PathLike[str] | None = None,
) -> CombineOutcome:
    """Combine shard posteriors and write the six output files into ``out_dir``.

    Raises :class:`ShardError` (before writing anything) when the shards are unreadable
    or do not belong together. A combination that does not converge is still written;
    its files say so (``convergence.status == "not_converged"``).
    """
    start = time.perf_counter()
    s = settings or CombineSettings()
    out_dir = Path(out_dir)
    shards = read_shards(shard_nc, shard_json)
    first = shards[0]
    mode, names, K = first.analysis_mode, first.names, first.num_shards
    nlsq_path = Path(nlsq_parameters) if nlsq_parameters is not None else None
    nlsq_rec = _read_nlsq(nlsq_path, mode) if nlsq_path is not None else None

    # -- exclusion and combination in the combination coordinates -------------------------
    # Shard posteriors are near-Gaussian there (the rates coordinates, bounded parameters
    # through their logits), and each shard targeted L_k·[π·|∂θ/∂u|]^(1/K) there
    # (cmc_space), so the Gaussian consensus of these draws is the full posterior.
    space, n_joint = first.space, first.n_joint
    in_u = [replace(sh, draws=to_combination(sh.draws, space, n_joint, sh.index)) for sh in shards]
    selection = select_shards(in_u, s)
    kept_u = selection.kept
    by_index = {sh.index: sh for sh in shards}
    selection.kept = [by_index[sh.index] for sh in selection.kept]
    kept, excluded = selection.kept, selection.excluded
    excluded_stage, flagged_kept = selection.excluded_by, selection.flagged_kept
    shard_means = {sh.index: sh.mean for sh in shards}
    shard_stds = {sh.index: sh.std for sh in shards}

    # -- combination ---------------------------------------------------------------------
    labels = [sh.index for sh in kept]
    draws_u = combine_draws([sh.draws for sh in kept_u], s.method, n_joint, labels=labels)
    restoration = None
    if s.method != "simple_average":
        powers = [sh.prior_tempering for sh in kept]
        fraction = sum(powers) if all(x is not None for x in powers) else len(kept) / K
        draws_u, restoration = apply_prior(draws_u, space, n_joint, fraction)
    draws = from_combination(draws_u, space, n_joint)
    shard_verdicts = {sh.index: shard_convergence(sh, s) for sh in shards}
    stuck = {k: v["problem"] for k, v in shard_verdicts.items() if v["problem"]}
    for k, stage in excluded_stage.items():  # ESS of a few repeated points can look fine
        if stage == "degenerate" and k not in stuck:
            stuck[k] = excluded[k]
    summary = posterior_summary(draws, names)

    # -- diagnostics ---------------------------------------------------------------------
    het = heterogeneity(
        np.stack([shard_means[sh.index] for sh in kept]),
        np.stack([shard_stds[sh.index] ** 2 for sh in kept]),
        summary["mean"],
    )
    # Derived varpro scaling (each shard's conditional optimum, not a sampled parameter)
    # is reported but not assessed: its spread within a shard ignores its own uncertainty,
    # so its ESS and its scatter between shards say nothing about convergence.
    assessed = names[: first.n_joint] if first.scaling_derived else names
    heterogeneous = [
        n
        for j, n in enumerate(assessed)
        if het["dof"] > 0 and np.isfinite(het["p_value"][j]) and het["p_value"][j] < HETEROGENEITY_P
    ]
    bfmi = {sh.index: shard_bfmi(sh) for sh in shards}
    low_bfmi = {
        sh.index: float(np.nanmin(bfmi[sh.index]))
        for sh in kept
        if bfmi[sh.index] is not None
        and np.any(np.isfinite(bfmi[sh.index]))
        and np.nanmin(bfmi[sh.index]) < BFMI_WARN
    }
    divergences = int(sum(sh.divergences for sh in kept))
    n_draws_kept = int(sum(sh.draws.shape[0] * sh.draws.shape[1] for sh in kept))
    quality = assess_quality(
        assessed,
        {k: v[: len(assessed)] for k, v in summary.items()},
        s,
        divergences=divergences,
        n_draws_total=n_draws_kept,
        low_bfmi=low_bfmi,
        excluded=excluded,
        flagged_kept=flagged_kept,
        heterogeneous=heterogeneous,
        stuck_shards=stuck,
    )
    if restoration is not None and restoration.get("reliable") is False:
        quality["warnings"].append(
            f"the prior weights of the combined draws have Pareto k̂ "
            f"{restoration['pareto_k']:.2f} > {PARETO_K_MAX}: the prior and the data disagree "
            "(or a parameter is not identified), and the posterior cannot be trusted"
        )
        quality["convergence_status"] = "not_converged"
        quality["all_converged"] = False
        quality["quality_flag"] = "poor"
        quality["summary"] = (
            "NOT CONVERGED: the prior could not be applied to the combined draws (Pareto "
            f"k̂ {restoration['pareto_k']:.2f}). Do not use these estimates."
        )
    tempering = [sh.prior_tempering for sh in shards]
    if any(t is not None and not math.isclose(t, 1.0 / K, rel_tol=1e-6) for t in tempering):
        quality["warnings"].append(
            f"shard prior_tempering {sorted({t for t in tempering if t is not None})} is not "
            f"1/K = {1.0 / K:.6g}: the consensus then counts the prior a different number "
            "of times than once"
        )
    comparison = (
        _nlsq_comparison(nlsq_rec, nlsq_path, names, summary) if nlsq_rec is not None else None
    )
    if comparison and comparison["consistent"] is False:
        far = [n for n, c in comparison["parameters"].items() if abs(c["z_score"] or 0) > 3]
        quality["warnings"].append(
            f"CMC and NLSQ disagree by more than {NLSQ_Z_WARN:g} σ for {far}"
        )
    combine_s = time.perf_counter() - start

    # -- records -------------------------------------------------------------------------
    n_chains, n_samples = int(draws.shape[0]), int(draws.shape[1])
    n_phi = max(first.scaling.values()) if first.scaling else None
    if n_phi is None and nlsq_rec is not None and isinstance(nlsq_rec.get("per_angle"), list):
        n_phi = len(nlsq_rec["per_angle"])
    n_phi_value = -1 if n_phi is None else int(n_phi)  # -1: not known from the inputs

    def stat_entry(j: int) -> dict[str, Any]:
        return {
            key: _num(summary[key][j])
            for key in ("mean", "std", "hdi_3%", "hdi_97%", "r_hat", "ess_bulk", "ess_tail")
        }

    parameters = {
        n: {**stat_entry(j), "unit": REGISTRY[n].unit} for j, n in enumerate(first.physical)
    }
    per_angle = None
    if first.scaling:
        n_angles = max(first.scaling.values())
        per_angle = []
        for a in range(n_angles):
            row: dict[str, Any] = {
                "angle": a,
                "coordinate": first.angle_coords[a] if a < len(first.angle_coords) else a,
                "derived": first.scaling_derived,
            }
            for var in first.scaling:
                if a < first.scaling[var]:
                    row[var] = {**stat_entry(names.index(f"{var}_{a}")), "unit": REGISTRY[var].unit}
            per_angle.append(row)
    r_hats = [x for x in (_num(v) for v in summary["r_hat"]) if x is not None]
    ess_all = [x for x in (_num(v) for v in summary["ess_bulk"]) if x is not None]
    timings = [sh.meta.get("timings") or {} for sh in shards]
    total_times = [_num(t.get("total_s")) for t in timings]
    total_times = [t for t in total_times if t is not None]
    sampling_summary = {
        "n_chains": n_chains,
        "n_samples": n_samples,
        "n_warmup": first.meta.get("num_warmup"),
        "total_samples": n_chains * n_samples,
        "num_shards": K,
        "num_shards_used": len(kept),
        "combination_method": s.method,
        "shard_sampling_time_s": {
            "sum": sum(total_times) if total_times else None,
            "max": max(total_times) if total_times else None,
        },
        "combine_time_s": combine_s,
    }
    convergence = {
        "status": quality["convergence_status"],
        "all_converged": quality["all_converged"],
        "quality_flag": quality["quality_flag"],
        "min_r_hat": min(r_hats) if r_hats else None,
        "max_r_hat": max(r_hats) if r_hats else None,
        "min_ess": min(ess_all) if ess_all else None,
        "min_ess_tail": min(
            (x for x in (_num(v) for v in summary["ess_tail"]) if x is not None), default=None
        ),
        "acceptance_rate": _stat_mean(kept, "acceptance_rate"),
        "divergences": divergences,
        "summary": quality["summary"],
    }
    params_rec = {
        "schema_version": SCHEMA_VERSION,
        "method": "cmc",
        "analysis_mode": mode,
        "combination_method": s.method,
        "parameters": parameters,
        "per_angle": per_angle,
        "per_angle_scaling": first.per_angle_scaling,
        "convergence": convergence,
        "sampling_summary": sampling_summary,
        "noise_scale": first.meta.get("noise_scale"),
    }
    dataset_info = {
        "analysis_mode": mode,
        "per_angle_scaling": first.per_angle_scaling,
        "n_phi": n_phi,
        "total_data_points": int(sum(sh.n_points for sh in shards)),
        "data_points_used": int(sum(sh.n_points for sh in kept)),
        "n_points_per_shard": {str(sh.index): sh.n_points for sh in shards},
        "num_shards": K,
        "prior_tempering": tempering,
        "noise_scale": first.meta.get("noise_scale"),
        "shard_files": [str(sh.nc_path) for sh in shards],
    }
    analysis = {
        "schema_version": SCHEMA_VERSION,
        "method": "cmc",
        "analysis_mode": mode,
        "combination_method": s.method,
        "sampling_quality": {
            "convergence_status": quality["convergence_status"],
            "all_converged": quality["all_converged"],
            "quality_flag": quality["quality_flag"],
            "summary": quality["summary"],
            "warnings": quality["warnings"],
            "recommendations": quality["recommendations"],
        },
        "dataset_info": dataset_info,
        "sampling_summary": sampling_summary,
        "parameter_space": {
            n: {
                "bounds": list(REGISTRY[n].bounds),
                "unit": REGISTRY[n].unit,
                "prior": {"mu": REGISTRY[n].prior_mu, "sigma": REGISTRY[n].prior_sigma},
            }
            for n in first.physical
        },
        "nlsq_comparison": comparison,
        "settings": s.to_mapping(),
    }

    def shard_entry(sh: Shard) -> dict[str, Any]:
        b = bfmi[sh.index]
        return {
            "shard": sh.index,
            "file": str(sh.nc_path),
            "n_points": sh.n_points,
            "n_chains": int(sh.draws.shape[0]),
            "n_samples": int(sh.draws.shape[1]),
            "means": dict(zip(names, shard_means[sh.index].tolist(), strict=True)),
            "std": dict(zip(names, shard_stds[sh.index].tolist(), strict=True)),
            "divergences": sh.divergences,
            "divergence_rate": sh.divergence_rate,
            "bfmi": None if b is None else b.tolist(),
            "min_bfmi": None if b is None or not np.any(np.isfinite(b)) else float(np.nanmin(b)),
            "max_r_hat": shard_verdicts[sh.index]["max_r_hat"],
            "min_ess": shard_verdicts[sh.index]["min_ess"],
            "converged": shard_verdicts[sh.index]["problem"] is None,
            "convergence_problem": shard_verdicts[sh.index]["problem"],
            "acceptance_rate": _stat_mean([sh], "acceptance_rate"),
            "mean_tree_depth": _stat_mean([sh], "tree_depth"),
            "step_size": _stat_mean([sh], "step_size"),
            "timings": sh.meta.get("timings"),
            "seed": sh.meta.get("seed"),
            "excluded": sh.index in excluded,
            "excluded_by": excluded_stage.get(sh.index),
            "reason": excluded.get(sh.index),
            "flagged_but_kept": flagged_kept.get(sh.index),
        }

    shard_summary = [shard_entry(sh) for sh in shards]
    tree = [
        np.asarray(sh.stats["tree_depth"]).ravel()
        for sh in kept
        if sh.stats["tree_depth"] is not None
    ]
    diagnostics = {
        "schema_version": SCHEMA_VERSION,
        "convergence": {
            "r_hat_threshold": s.rhat_acceptable,
            "r_hat_good": s.rhat_good,
            "ess_threshold": s.ess_warn,
            "status": quality["convergence_status"],
            "all_converged": quality["all_converged"],
        },
        "thresholds": {
            "r_hat_good": s.rhat_good,
            "r_hat_acceptable": s.rhat_acceptable,
            "ess_warn": s.ess_warn,
            "bfmi_warn": BFMI_WARN,
            "max_divergence_rate": s.max_divergence_rate,
            "outlier_p_value": s.outlier_p_value,
            "outlier_test": (
                "squared Mahalanobis distance of a shard's mean from the median of the shard "
                "means (sampled physical parameters, combination coordinates, shard "
                "covariance) against χ²(p) at 1 − outlier_p_value/K"
            ),
            "shard_ess_min": s.shard_ess_min,
            "heterogeneity_p_value": HETEROGENEITY_P,
        },
        "per_parameter_diagnostics": quality["per_parameter"],
        "sampling_efficiency": {
            "acceptance_rate": _stat_mean(kept, "acceptance_rate"),
            "divergences": divergences,
            "divergence_rate": divergences / n_draws_kept if n_draws_kept else None,
            "mean_tree_depth": _stat_mean(kept, "tree_depth"),
            "max_tree_depth": float(np.max(np.concatenate(tree))) if tree else None,
            "mean_step_size": _stat_mean(kept, "step_size"),
        },
        "cmc_specific": {
            "combination_method": s.method,
            "num_shards": K,
            "num_shards_used": len(kept),
            "shard_summary": shard_summary,
        },
    }
    all_het = heterogeneity(
        np.stack([shard_means[sh.index] for sh in shards]),
        np.stack([shard_stds[sh.index] ** 2 for sh in shards]),
        summary["mean"],
    )
    report = {
        "schema_version": SCHEMA_VERSION,
        "method": s.method,
        "settings": s.to_mapping(),
        "num_shards": K,
        "kept_shards": [sh.index for sh in kept],
        "excluded_shards": [
            {"shard": k, "excluded_by": excluded_stage[k], "reason": excluded[k]}
            for k in sorted(excluded)
        ],
        "flagged_but_kept": [{"shard": k, "reason": flagged_kept[k]} for k in sorted(flagged_kept)],
        "parameter_names": list(names),
        "combination_coordinates": (
            f"{COMBINATION} coordinates of the sampled parameters (cmc_space): power laws as "
            "(mean over the early half, logit exponent, mean over the late half), other "
            "bounded parameters through their logits"
            if space is not None
            else "the parameters as stored (the shard files record no sampled space)"
        ),
        "prior_application": restoration,
        "not_converged_shards": [{"shard": k, "problem": stuck[k]} for k in sorted(stuck)],
        "jointly_combined": list(names[: first.n_joint]),
        "combined_per_component": list(names[first.n_joint :]),
        "ignored_variables": first.ignored_variables,
        "per_shard": [
            {
                "shard": sh.index,
                "kept": sh.index not in excluded,
                "means": dict(zip(names, shard_means[sh.index].tolist(), strict=True)),
                "stds": dict(zip(names, shard_stds[sh.index].tolist(), strict=True)),
                "z_vs_combined": dict(zip(names, all_het["z"][i].tolist(), strict=True)),
            }
            for i, sh in enumerate(shards)
        ],
        "combined_mean": dict(zip(names, summary["mean"].tolist(), strict=True)),
        "heterogeneity": {
            "definition": (
                "chi2 = Σ_k (mean_k − combined_mean)² / var_k over the kept shards "
                "(var_k: shard k's posterior variance, ≈ K × the full-data variance); "
                "≈ χ²(K−1) when the shards agree"
            ),
            "dof": het["dof"],
            "per_parameter": {
                n: {
                    "chi2": het["chi2"][j],
                    "reduced_chi2": het["reduced_chi2"][j],
                    "p_value": het["p_value"][j],
                    "heterogeneous": n in heterogeneous,
                }
                for j, n in enumerate(names)
            },
            "heterogeneous_parameters": heterogeneous,
            "detected": bool(heterogeneous or flagged_kept),
        },
    }
    attrs = {
        "schema_version": SCHEMA_VERSION,
        "analysis_mode": mode,
        "per_angle_scaling": first.per_angle_scaling,
        "combination_method": s.method,
        "num_shards": K,
        "kept_shards": ",".join(str(k) for k in labels),
        "convergence_status": quality["convergence_status"],
    }
    combined_idata = _combined_idata(draws, first, attrs)
    npz = {
        "posterior_samples": draws,
        "param_names": np.array(names, dtype=str),
        "r_hat": summary["r_hat"],
        "ess_bulk": summary["ess_bulk"],
        "ess_tail": summary["ess_tail"],
        "divergences": np.array([divergences], dtype=np.int64),
        "analysis_mode": np.array([mode], dtype=str),
        "n_phi": np.array([n_phi_value], dtype=np.int64),
        "n_chains": np.array([n_chains], dtype=np.int64),
        "n_samples": np.array([n_samples], dtype=np.int64),
        "schema_version": np.array(NPZ_SCHEMA_VERSION, dtype=np.int64),
    }
    # Everything serialisable is checked before the first write.
    records = {
        "diagnostics.json": _clean(diagnostics),
        "combination_report.json": _clean(report),
        "analysis_results_cmc.json": _clean(analysis),
        "parameters.json": _clean(params_rec),
    }

    # -- writing (all or nothing) --------------------------------------------------------
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_outputs(out_dir)
    written: list[Path] = []
    try:
        written.append(write_npz(out_dir / "samples.npz", **npz))
        with atomic_path(out_dir / "posterior.nc") as tmp:
            combined_idata.to_netcdf(str(tmp))
        written.append(out_dir / "posterior.nc")
        for name in OUTPUT_FILES[2:]:
            written.append(write_json(out_dir / name, records[name]))
    except BaseException:
        _remove_outputs(out_dir)
        raise
    return CombineOutcome(
        analysis_mode=mode,
        method=s.method,
        names=tuple(names),
        draws=draws,
        summary=summary,
        kept=labels,
        excluded=excluded,
        flagged_kept=flagged_kept,
        quality=quality,
        files=written,
    )
