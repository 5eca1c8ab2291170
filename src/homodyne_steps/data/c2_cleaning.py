"""The preprocessing maths on c2 stacks (K, n, n): masking, diagonal correction, baseline
normalisation, display-only smoothing and validation. Pure functions of arrays; the
order of the steps and why each one is as it is: :mod:`homodyne_steps.stages.preprocess`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import ndimage

from homodyne_steps.data.preprocess_settings import DIAGONAL_METHODS, NoiseReductionSettings
from homodyne_steps.errors import ConfigError, DataError
from homodyne_steps.io.dataset import XpcsData

# |C - C^T| allowed, relative to max|C|: float64 round-off only, not real asymmetry.
SYMMETRY_RTOL = 1e-10


# ------------------------------------------------------------------------- masking


def mask_non_finite(c2: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Return a float64 copy of ``c2`` (K, n, n) with ±Inf set to NaN and the symmetric
    partner copied into a NaN whose partner is finite; and the counts of both.

    Inf is no measurement (a correlator's division by zero), so it is masked rather than
    capped. The partner copy keeps a measured value: c2 is symmetric by construction.
    """
    c = np.array(c2, dtype=np.float64, order="C")  # always a copy
    inf = np.isinf(c)
    c[inf] = np.nan
    nan = np.isnan(c)
    from_partner = nan & ~np.swapaxes(nan, 1, 2)
    c[from_partner] = np.swapaxes(c, 1, 2)[from_partner]
    return c, {"inf_masked": int(inf.sum()), "nan_from_partner": int(from_partner.sum())}


def masked_per_angle(c2: np.ndarray) -> np.ndarray:
    """Number of NaN off-diagonal elements in the upper triangle (t1 < t2) of each angle:
    the points the fit will not use."""
    n = c2.shape[-1]
    i, j = np.triu_indices(n, k=1)
    return np.array([int(np.isnan(m[i, j]).sum()) for m in c2], dtype=np.int64)


# --------------------------------------------------------------- diagonal correction


def _diagonal_basic(c: np.ndarray) -> np.ndarray:
    s = 0.5 * (np.diagonal(c, 1, 1, 2) + np.diagonal(c, -1, 1, 2))  # (K, n-1)
    d = np.empty(c.shape[:2])
    d[:, 0] = s[:, 0]
    d[:, -1] = s[:, -1]
    d[:, 1:-1] = 0.5 * (s[:, :-1] + s[:, 1:])
    return d


def _diagonal_statistical(c: np.ndarray, window: int) -> np.ndarray:
    n = c.shape[-1]
    i = np.arange(n)[:, None]
    offsets = np.concatenate([np.arange(-window, 0), np.arange(1, window + 1)])
    j = i + offsets[None, :]  # (n, 2w)
    valid = (j >= 0) & (j < n)
    vals = c[:, i, np.clip(j, 0, n - 1)]  # (K, n, 2w)
    vals = np.where(valid, vals, np.nan)
    with warnings.catch_warnings():
        # A row whose neighbours are all NaN gives NaN; output validation reports it.
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(vals, axis=-1)


def _diagonal_interpolation(c: np.ndarray) -> np.ndarray:
    n = c.shape[-1]
    acc = np.zeros(c.shape[:2])
    count = np.zeros(n)
    if n >= 3:
        # right side, rows 0..n-3: 2*C[i,i+1] - C[i,i+2]
        acc[:, : n - 2] += 2.0 * np.diagonal(c, 1, 1, 2)[:, : n - 2] - np.diagonal(c, 2, 1, 2)
        count[: n - 2] += 1
        # left side, rows 2..n-1: 2*C[i,i-1] - C[i,i-2]
        acc[:, 2:] += 2.0 * np.diagonal(c, -1, 1, 2)[:, 1:] - np.diagonal(c, -2, 1, 2)
        count[2:] += 1
    # Elements with no side holding two neighbours fall back to the basic value.
    return np.where(count > 0, acc / np.maximum(count, 1), _diagonal_basic(c))


def correct_diagonal(c2: np.ndarray, method: str = "basic", window: int = 3) -> np.ndarray:
    """Return a float64 copy of ``c2`` ((n, n) or (K, n, n)) with the diagonal replaced.

    Off-diagonal elements are copied unchanged. Raises DataError when n < 2 and
    ConfigError for an unknown method.
    """
    c = np.array(c2, dtype=np.float64, order="C")  # always a copy
    single = c.ndim == 2
    if single:
        c = c[None]
    if c.ndim != 3 or c.shape[1] != c.shape[2]:
        raise DataError(f"diagonal correction needs square matrices, got shape {np.shape(c2)}")
    n = c.shape[-1]
    if n < 2:
        raise DataError(
            f"diagonal correction needs matrices of size n >= 2 (no off-diagonal element "
            f"to estimate the diagonal from), got n = {n}; disable "
            "preprocess.diagonal_correction or load more frames"
        )
    if method == "basic":
        d = _diagonal_basic(c)
    elif method == "statistical":
        d = _diagonal_statistical(c, window)
    elif method == "interpolation":
        d = _diagonal_interpolation(c)
    else:
        raise ConfigError(
            f"diagonal correction method {method!r}; expected one of {DIAGONAL_METHODS}"
        )
    idx = np.arange(n)
    c[:, idx, idx] = d
    return c[0] if single else c


# ---------------------------------------------------------- normalization and filters


def baseline_lag_range(n: int) -> tuple[int, int]:
    """Lags [lo, hi] (inclusive) whose elements define the ``baseline`` normalization."""
    m = max(1, math.ceil((n - 1) / 4))
    return n - m, n - 1


def _baselines(c: np.ndarray) -> np.ndarray:
    n = c.shape[-1]
    if n < 2:
        raise DataError(f"baseline normalization needs n >= 2 (off-diagonal lags), got n = {n}")
    lo, _ = baseline_lag_range(n)
    lag = np.subtract.outer(np.arange(n), np.arange(n)) * -1  # j - i
    long = c[:, lag >= lo]  # (K, elements): the longest lags, upper triangle
    finite = np.isfinite(long)
    count = finite.sum(axis=1)
    # Mean of the finite elements only: a masked element is no measurement of the baseline.
    b = np.where(finite, long, 0.0).sum(axis=1) / np.maximum(count, 1)
    b[count == 0] = np.nan
    empty = _empty_angles(c)
    for k, bk in enumerate(b):
        if empty[k]:
            continue  # nothing measured at this angle: QC drops it, nothing to normalise
        if not (np.isfinite(bk) and bk > 0):
            raise DataError(
                f"c2_exp angle index {k}: long-lag baseline (mean of the {int(count[k])} "
                f"finite elements at lags {lo}..{n - 1}) is {bk}; baseline normalization "
                "needs a finite value > 0 (are all long-lag elements masked?)"
            )
    return b


def _empty_angles(c: np.ndarray) -> np.ndarray:
    """True for each angle without a single finite off-diagonal element."""
    # Per angle, so no (K, n²) copy of the data is made: finite elements minus finite
    # diagonal elements.
    return np.array(
        [np.isfinite(m).sum() == np.isfinite(np.diagonal(m)).sum() for m in c], dtype=bool
    )


# A normalised convolution whose finite weight is below this is "no data nearby".
_MIN_WEIGHT = 1e-6


def _linear_filter(x: np.ndarray, method: str, size: float) -> np.ndarray:
    # Size 0 along the angle axis: each angle's matrix is filtered on its own.
    if method == "gaussian":
        return ndimage.gaussian_filter(x, sigma=(0, size, size), mode="reflect")
    return ndimage.uniform_filter(x, size=(1, int(size), int(size)), mode="reflect")


def _normalised_filter(c: np.ndarray, finite: np.ndarray, method: str, size: float):
    """Filter of the finite elements divided by the filter of their weights, so a NaN
    neither spreads nor counts as 0; NaN where a window holds (almost) no finite value."""
    num = _linear_filter(np.where(finite, c, 0.0), method, size)
    den = _linear_filter(finite.astype(np.float64), method, size)
    ok = den > _MIN_WEIGHT
    return np.where(ok, num / np.where(ok, den, 1.0), np.nan)


def smooth_for_display(c: np.ndarray, s: NoiseReductionSettings) -> np.ndarray:
    """The smoothed copy of ``c`` (K, n, n) that only the data plots show (never fitted).

    Masked (NaN) elements stay NaN and do not leak into their neighbours (module
    docstring, step 5).
    """
    finite = np.isfinite(c)
    if s.method == "median":
        filled = c
        if not finite.all():
            # The median filter cannot skip NaN: fill the holes for it, then re-mask.
            around = _normalised_filter(c, finite, "uniform", s.size)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN angle
                level = np.nanmedian(c.reshape(c.shape[0], -1), axis=1)
            level = np.where(np.isfinite(level), level, 0.0)[:, None, None]
            filled = np.where(finite, c, np.where(np.isfinite(around), around, level))
        out = ndimage.median_filter(filled, size=(1, s.size, s.size), mode="reflect")
    else:
        out = _normalised_filter(c, finite, s.method, s.size)
    out[~finite] = np.nan  # the display shows the holes the fit sees
    # Separable filters sum in a different order at (i, j) and (j, i): restore exact symmetry.
    return 0.5 * (out + np.swapaxes(out, 1, 2))


# ------------------------------------------------------------------------ validation


def validate_c2(data: XpcsData) -> list[dict[str, Any]]:
    """Check c2_exp: (n_phi, n, n), symmetric NaN pattern, symmetric finite pairs.

    Raises DataError naming the angle otherwise. NaN (a masked element) is allowed;
    returns, per angle, the masked off-diagonal elements of the upper triangle (the
    points the fit will not use) for the provenance record.
    """
    c = data.c2_exp
    if c.ndim != 3 or c.shape != (data.n_phi, data.n_t, data.n_t) or 0 in c.shape:
        raise DataError(
            f"c2_exp has shape {c.shape}; expected non-empty {(data.n_phi, data.n_t, data.n_t)}"
        )
    n = c.shape[-1]
    n_pairs = n * (n - 1) // 2
    masked = masked_per_angle(c)
    out = []
    for k in range(c.shape[0]):
        m = c[k]
        phi = float(data.phi_angles_list[k])
        where = f"c2_exp angle index {k} (phi = {phi:g} deg)"
        if np.isinf(m).any():  # the masking step turned every Inf into NaN
            i, j = np.argwhere(np.isinf(m))[0]
            raise DataError(f"{where}: Inf at (t1 index {i}, t2 index {j}) after preprocessing")
        nan = np.isnan(m)
        lone = nan & ~nan.T
        if lone.any():
            i, j = np.argwhere(lone)[0]
            raise DataError(
                f"{where}: NaN at (t1 index {i}, t2 index {j}) but not at its symmetric "
                f"element ({j}, {i}); the masking step should have made the pattern symmetric"
            )
        if not nan.all():
            with np.errstate(invalid="ignore"):
                asym = np.where(nan, 0.0, np.abs(m - m.T))
            tol = SYMMETRY_RTOL * max(1.0, float(np.nanmax(np.abs(m))))
            if asym.max() > tol:
                i, j = np.unravel_index(np.argmax(asym), asym.shape)
                raise DataError(
                    f"{where}: not symmetric, |C - C^T| = {asym.max():.3g} at ({i}, {j}) "
                    f"(tolerance {tol:.3g}); the loader should symmetrise c2"
                )
        out.append(
            {
                "angle_index": k,
                "phi": phi,
                "masked": int(masked[k]),
                "of": n_pairs,
                "fraction": float(masked[k] / n_pairs) if n_pairs else 0.0,
            }
        )
    return out
