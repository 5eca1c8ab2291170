"""Per-point noise σ of the two-time correlation c2, estimated from the data.

Why: the fit weights each upper-triangle point (t1 < t2) by 1/σ, and the reduced χ² it
reports is only meaningful when σ matches the real scatter of the data. A σ that is too
small inflates χ²_red (and shrinks no uncertainty honestly); a σ that is too large hides
a bad fit. Files do not carry per-point errors, so σ is estimated here from c2 itself.

Why per lag: the noise of an XPCS correlator depends on the lag k = t2 − t1 (in frames):
each element c2[i, i+k] averages intensity products of one pair of frames over the
pixels of the bin, and the speckle and shot-noise contributions change with the
correlation left at that lag (and with c2's level, for relative noise). Along one lag
band, all elements are built the same way, so one σ per (angle, lag) is the natural
granularity; ``sigma_lag[a, k]`` is the σ of every element ``c2[a, i, i+k]``.

Why differences along the age direction: along a band (fixed lag, varying age
t1 = i·dt) the signal changes only slowly (ageing, D(t) and γ̇(t) drifting with time)
while the noise of neighbouring elements is independent. The difference of neighbouring
elements ``d_i = c2[i+1, i+1+k] − c2[i, i+k]`` therefore removes the signal to first
order, and for independent noise of equal σ its variance is 2σ². The spread of the
band's values themselves (rather than of their differences) would be inflated by the
ageing trend. The spread is measured robustly — σ = 1.4826 · MAD(d) / √2, with
MAD(d) = median(|d − median(d)|) — so a few outliers (hot pixels, glitches) do not move
it; subtracting median(d) also removes a residual linear trend. Neighbouring differences
share one element (correlation −½); that leaves the MAD consistent but makes the
estimate somewhat noisier than for independent samples.

Pooling rule (``min_samples``, default 64): a band of lag k has n_t − k elements and
n_t − k − 1 differences, so long lags have few. For each angle separately, let n(a, k)
be the number of *finite* differences of band k (a difference is finite when both of
its elements are finite). If n(a, k) ≥ min_samples the band is used alone. Otherwise a
window of adjacent lags ``[max(1, k − r), min(n_t − 1, k + r)]`` is grown one lag on each
side at a time (r = 1, 2, …; clipped at lags 1 and n_t − 1, so near the longest lags it
grows towards shorter lags only) until the window holds ≥ min_samples finite
differences; the differences of all bands in the window are pooled into one MAD, which
becomes σ of lag k. Windows of neighbouring lags overlap (a sliding window), so σ stays
smooth at long lags. If an angle has fewer than min_samples finite differences in total
it has no usable noise estimate: :class:`~homodyne_steps.errors.DataError` names it.

Conventions: only the upper triangle (t1 < t2) is read (c2 is symmetric); NaN and ±Inf
elements are ignored; ``sigma_lag[:, 0]`` (the diagonal, which carries shot noise and is
never fitted) is NaN. An estimate of 0 (e.g. noise-free data, where c2 is exactly
constant along a band) cannot weight a fit and raises DataError.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from homodyne_steps.errors import ConfigError, DataError
from homodyne_steps.settings import check_keys, get_choice, get_int, get_number

METHODS = ("per_lag", "fixed")
SETTINGS_KEYS = ("method", "sigma", "min_samples")
DEFAULT_MIN_SAMPLES = 64
MAD_TO_SIGMA = 1.4826  # σ / MAD for a Gaussian
_SQRT2 = math.sqrt(2.0)
_LAG_BLOCK = 64  # lags copied out of the skew view at a time


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoiseSettings:
    """How the fit's σ is obtained.

    Attributes:
        method: ``"per_lag"`` (estimate σ per angle and lag from the data, default) or
            ``"fixed"`` (one σ for every point).
        sigma: the fixed σ in absolute c2 units (> 0); required for ``"fixed"``, must be
            left out (None) for ``"per_lag"``.
        min_samples: minimum number of finite differences per lag group (>= 2); shorter
            bands are pooled with neighbouring lags (module docstring).
    """

    method: str = "per_lag"
    sigma: float | None = None
    min_samples: int = DEFAULT_MIN_SAMPLES

    def __post_init__(self) -> None:
        # Direct construction gets the same checks as from_mapping.
        _parse(self.to_mapping(), "NoiseSettings")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None, where: str = "nlsq.noise") -> NoiseSettings:
        """Parse a config mapping; every error names the key path under ``where``."""
        return cls(**_parse(m, where))

    def to_mapping(self) -> dict[str, Any]:
        """JSON-friendly mapping that :meth:`from_mapping` reads back to an equal object."""
        return {"method": self.method, "sigma": self.sigma, "min_samples": self.min_samples}


def _parse(m: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    m = {} if m is None else m
    check_keys(m, SETTINGS_KEYS, where)
    method = get_choice(m, "method", "per_lag", METHODS, where)
    sigma = get_number(
        m, "sigma", None, where, minimum=0.0, exclusive_minimum=True, allow_none=True
    )
    min_samples = get_int(m, "min_samples", DEFAULT_MIN_SAMPLES, where, minimum=2)
    if method == "fixed" and sigma is None:
        raise ConfigError(f"{where}.sigma: required when {where}.method is 'fixed'")
    if method != "fixed" and sigma is not None:
        raise ConfigError(
            f"{where}.sigma: only used when {where}.method is 'fixed' "
            f"(method is {method!r}); remove it"
        )
    return {"method": method, "sigma": sigma, "min_samples": min_samples}


# ---------------------------------------------------------------------------------------
# Estimator
# ---------------------------------------------------------------------------------------
def _check_c2(c2: Any) -> np.ndarray:
    c2 = np.asarray(c2, dtype=np.float64)
    if c2.ndim != 3 or c2.shape[1] != c2.shape[2]:
        raise DataError(f"c2 must have shape (n_phi, n_t, n_t), got {c2.shape}")
    if c2.shape[0] < 1:
        raise DataError("c2 has no angles")
    if c2.shape[1] < 3:
        raise DataError(
            f"c2 has n_t = {c2.shape[1]} frames; at least 3 are needed to estimate noise"
        )
    return c2


def _row_median(d: np.ndarray, missing: np.ndarray | None) -> np.ndarray:
    """Median of each row of ``d`` over its non-missing entries (NaN for an empty row).

    One ``np.partition`` for all rows although their counts n differ: in a row of width
    m, q = (m − 1)//2 − (n − 1)//2 missing entries become −inf and the others +inf, which
    puts the finite order statistic (n − 1)//2 at the common position (m − 1)//2; for
    even n the upper middle value is the smallest entry after that position.
    """
    m = d.shape[1]
    kth = (m - 1) // 2
    if missing is None:  # every row has n = m entries
        p = np.partition(d, kth, axis=1)
        return p[:, kth] if m % 2 else 0.5 * (p[:, kth] + p[:, kth + 1 :].min(axis=1))
    n = m - missing.sum(axis=1)
    q = (m - 1) // 2 - (np.maximum(n, 1) - 1) // 2
    rank = np.cumsum(missing, axis=1)  # 1-based rank of each missing entry in its row
    x = np.where(missing, np.where(rank <= q[:, None], -np.inf, np.inf), d)
    p = np.partition(x, kth, axis=1)
    lower = p[:, kth]
    upper = p[:, kth + 1 :].min(axis=1) if m > 1 else lower
    med = np.where(n % 2 == 1, lower, 0.5 * (lower + upper))
    return np.where(n > 0, med, np.nan)


def _row_mad_sigma(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """σ = 1.4826·MAD/√2 of each row of differences (non-finite ignored), finite counts."""
    if d.shape[1] == 0:
        return np.full(d.shape[0], np.nan), np.zeros(d.shape[0], dtype=np.int64)
    missing = ~np.isfinite(d)
    if missing.any():
        n = d.shape[1] - missing.sum(axis=1)
    else:
        n = np.full(d.shape[0], d.shape[1])
        missing = None
    med = _row_median(d, missing)
    mad = _row_median(np.abs(d - med[:, None]), missing)
    return MAD_TO_SIGMA * mad / _SQRT2, n


def _band_differences(c2: np.ndarray, k: int) -> np.ndarray:
    """(n_phi, n_t − k − 1) differences of neighbours along the k-th upper band."""
    band = np.diagonal(c2, offset=k, axis1=1, axis2=2)
    return band[:, 1:] - band[:, :-1]


def _pool_windows(counts: np.ndarray, min_samples: int) -> np.ndarray:
    """Half-width r(a, k) of the smallest symmetric lag window with >= min_samples.

    ``counts`` is (n_phi, n_t) finite differences per lag (column 0 unused, = 0). The
    window of lag k is [max(1, k − r), min(n_t − 1, k + r)]; r = 0 for lags that have
    enough on their own. Column 0 of the result is 0 (unused).
    """
    n_phi, n_t = counts.shape
    prefix = np.zeros((n_phi, n_t + 1), dtype=np.int64)
    np.cumsum(counts, axis=1, out=prefix[:, 1:])  # prefix[:, x] = sum of counts[:, :x]
    radius = np.zeros((n_phi, n_t), dtype=np.int64)
    a_idx, k_idx = np.nonzero(counts[:, 1:] < min_samples)
    k_idx = k_idx + 1
    r = 0
    while a_idx.size:
        r += 1
        lo = np.maximum(k_idx - r, 1)
        hi = np.minimum(k_idx + r, n_t - 1)
        total = prefix[a_idx, hi + 1] - prefix[a_idx, lo]
        done = total >= min_samples
        radius[a_idx[done], k_idx[done]] = r
        a_idx, k_idx = a_idx[~done], k_idx[~done]
        if r > n_t:  # unreachable: callers check each angle's total first
            raise AssertionError("lag window did not reach min_samples")
    return radius


def estimate_sigma_per_lag(c2: np.ndarray, min_samples: int = DEFAULT_MIN_SAMPLES) -> np.ndarray:
    """Robust per-(angle, lag) noise σ from differences along the age direction.

    Args:
        c2: (n_phi, n_t, n_t) two-time correlation matrices (upper triangle is read;
            NaN/Inf elements are ignored).
        min_samples: minimum number of finite differences per lag group; shorter bands
            are pooled with neighbouring lags (see the module docstring for the rule).

    Returns:
        (n_phi, n_t) array; ``[a, k]`` is σ of every element c2[a, i, i+k] (k >= 1);
        ``[:, 0]`` is NaN.

    Raises:
        DataError: bad shape; an angle with fewer than ``min_samples`` finite
            differences in total (named by its index); or a zero estimate.
    """
    c2 = np.ascontiguousarray(_check_c2(c2))
    if isinstance(min_samples, bool) or not isinstance(min_samples, int | np.integer):
        raise ConfigError(f"min_samples: expected an integer, got {min_samples!r}")
    if min_samples < 2:
        raise ConfigError(f"min_samples: must be >= 2, got {min_samples}")
    sigma, counts = _band_sigmas(c2)
    totals = counts.sum(axis=1)
    for a in range(c2.shape[0]):
        if totals[a] < min_samples:
            raise DataError(
                f"angle index {a}: only {int(totals[a])} finite neighbour differences along "
                f"the lag bands of c2 (need >= {min_samples} to estimate the noise); "
                "is the angle empty or mostly NaN?"
            )
    _pool_short_bands(c2, sigma, _pool_windows(counts, min_samples))
    sigma[:, 0] = np.nan
    bad = ~(sigma[:, 1:] > 0)  # zero or NaN
    if bad.any():
        a, k = (int(x) for x in np.argwhere(bad)[0])
        raise DataError(
            f"angle index {a}, lag {k + 1}: noise estimate is {sigma[a, k + 1]!r}; the data "
            "have no scatter along the lag band (noise-free or constant c2?) and cannot be "
            "used to weight a fit — use a fixed sigma instead"
        )
    return sigma


def _band_sigmas(c2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """σ and the count of finite differences of every band on its own, (n_phi, n_t) each.

    Vectorised over angles, one Python step per lag. The bands are first copied, a block
    of lags at a time, from a strided "skew" view skew[a, k, i] = c2[a, i, i + k]
    (i <= n_t − 2; entries with i + k >= n_t are other in-bounds elements, never read)
    into contiguous rows: reading np.diagonal of a large matrix element by element is
    dominated by cache and TLB misses. Lag n_t − 1 is a single element: count 0.
    """
    n_phi, n_t, _ = c2.shape
    sigma = np.full((n_phi, n_t), np.nan)
    counts = np.zeros((n_phi, n_t), dtype=np.int64)
    skew = as_strided(
        c2,
        shape=(n_phi, n_t, n_t - 1),
        strides=(c2.strides[0], c2.strides[2], c2.strides[1] + c2.strides[2]),
        writeable=False,
    )
    for k0 in range(1, n_t - 1, _LAG_BLOCK):
        k1 = min(k0 + _LAG_BLOCK, n_t - 1)
        block = skew[:, k0:k1, : n_t - k0].copy()  # band k uses block[:, k - k0, : n_t - k]
        for k in range(k0, k1):
            band = block[:, k - k0, : n_t - k]
            sigma[:, k], counts[:, k] = _row_mad_sigma(band[:, 1:] - band[:, :-1])
    return sigma, counts


def _pool_short_bands(c2: np.ndarray, sigma: np.ndarray, radius: np.ndarray) -> None:
    """Short bands (``radius`` > 0): σ of the pooled window of adjacent lags, in place."""
    n_t = c2.shape[1]
    pooled_lags = np.nonzero((radius > 0).any(axis=0))[0]
    if not pooled_lags.size:
        return
    lags = np.arange(n_t)
    lo_all = np.maximum(lags[None, :] - radius, 1)
    hi_all = np.minimum(lags[None, :] + radius, n_t - 1)
    first = int(lo_all[:, pooled_lags].min())
    # Differences of bands first .. n_t − 2, concatenated: band l occupies columns
    # offsets[l - first] .. offsets[l - first + 1] (contiguous, so a lag window is a
    # column slice).
    band_lags = np.arange(first, n_t)
    lengths = np.maximum(n_t - band_lags - 1, 0)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    flat = np.concatenate([_band_differences(c2, int(k)) for k in band_lags], axis=1)
    column_lag = np.repeat(band_lags, lengths)
    for k in pooled_lags:
        angles = np.nonzero(radius[:, k] > 0)[0]
        lo, hi = lo_all[angles, k], hi_all[angles, k]
        start = offsets[lo.min() - first]
        stop = offsets[hi.max() - first + 1]
        d = flat[angles, start:stop]
        cl = column_lag[start:stop][None, :]
        d = np.where((cl >= lo[:, None]) & (cl <= hi[:, None]), d, np.nan)
        sigma[angles, k], _ = _row_mad_sigma(d)


def sigma_for_pairs(sigma_lag: np.ndarray, i: Any, j: Any, a: Any) -> np.ndarray:
    """σ of each point (i, j) of angle a: ``sigma_lag[a, |j − i|]`` (NaN where i == j).

    ``i, j, a`` are index arrays as from :func:`homodyne_steps.physics.model.upper_triangle_pairs`
    (t1 < t2, so j − i is the lag); |j − i| makes lower-triangle pairs of the symmetric
    c2 read the same σ instead of wrapping around to a wrong lag.
    """
    sigma_lag = np.asarray(sigma_lag)
    i, j, a = np.asarray(i), np.asarray(j), np.asarray(a)
    return sigma_lag[a, np.abs(j - i)]


def noise_sigma(c2: np.ndarray, settings: NoiseSettings) -> np.ndarray:
    """(n_phi, n_t) σ per angle and lag as ``settings`` asks (lag-0 column NaN)."""
    if settings.method == "per_lag":
        return estimate_sigma_per_lag(c2, settings.min_samples)
    c2 = _check_c2(c2)
    sigma = np.full(c2.shape[:2], float(settings.sigma))
    sigma[:, 0] = np.nan
    return sigma


def summary(sigma_lag: np.ndarray) -> dict[str, Any]:
    """Per-angle median, min and max σ over lags >= 1 (JSON-friendly; None if no value)."""
    sigma_lag = np.asarray(sigma_lag, dtype=np.float64)
    if sigma_lag.ndim != 2:
        raise DataError(f"sigma_lag must have shape (n_phi, n_t), got {sigma_lag.shape}")
    values = sigma_lag[:, 1:]
    out: dict[str, Any] = {
        "n_phi": int(sigma_lag.shape[0]),
        "n_lags": int(values.shape[1]),
        "median": [],
        "min": [],
        "max": [],
    }
    for row in values:
        row = row[np.isfinite(row)]
        for key, fn in (("median", np.median), ("min", np.min), ("max", np.max)):
            out[key].append(float(fn(row)) if row.size else None)
    return out


NOISE_SCALE_TREATMENT = "sigma_times_sqrt_reduced_chi2"


def noise_scale_record(reduced_chi_squared: float) -> dict[str, Any]:
    """The one noise treatment of the NLSQ and CMC stages: σ × √χ²_red.

    σ(angle, lag) is estimated from the data; the NLSQ covariance is (JᵀJ)⁻¹·χ²_red and the
    CMC likelihood uses σ·√χ²_red of the same fit. Both therefore widen together when the
    model misfits or σ is underestimated (and narrow together when σ is overestimated),
    so their uncertainties agree on any data.
    """
    factor = math.sqrt(reduced_chi_squared) if reduced_chi_squared > 0 else float("nan")
    return {
        "treatment": NOISE_SCALE_TREATMENT,
        "reduced_chi_squared": float(reduced_chi_squared),
        "sigma_factor": factor,
        "description": (
            "σ(angle, lag) from the data, multiplied by √χ²_red of the NLSQ fit: NLSQ's "
            "covariance (JᵀJ)⁻¹·χ²_red and CMC's likelihood use the same scale"
        ),
    }
