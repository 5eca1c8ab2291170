"""The ``preprocess`` stage: clean the two-time matrices c2(phi, t1, t2) before fitting.

Missing values are carried, never invented. A masked element is NaN in c2; the NLSQ
fit, CMC and the noise estimate give every non-finite element weight 0, so a NaN that
reaches them costs information but biases nothing. Every step below keeps NaN where it
was (or turns a value that cannot be a measurement into NaN); none fills one in.

Steps, in order (each leaves a provenance record; a disabled step leaves one with
``applied: false``):

1. ``format``: every array becomes float64 and C-contiguous. This runs *first* (the
   reference did it last) so the corrections below are computed in float64 even when the
   file stored float32.
2. ``masking``: ±Inf (a correlator's division by zero, never a measurement) become NaN.
   Where exactly one of c2[i, j] and c2[j, i] is NaN, the finite partner is copied into
   it: c2 is symmetric by construction (the loader rebuilds it from the stored upper
   triangle), so this copies a measured value, it invents none. Afterwards the NaN
   pattern of every matrix is symmetric. The record counts both.
3. ``diagonal_correction`` (on by default; the reference could not turn it off, Q15).
   The diagonal c2(t, t) carries a shot-noise excess, so it is replaced by an estimate
   from the off-diagonal elements. Only the diagonal changes and symmetry is kept.
   n < 2 raises :class:`DataError` (the reference silently wrote a 0 diagonal for n = 1).
   A diagonal element whose neighbours are NaN may become NaN: harmless, the diagonal
   is never fitted.

   * ``basic`` (spec hdf5-formats.md §4.8): s[i] = (C[i,i+1] + C[i+1,i]) / 2,
     d[0] = s[0], d[n-1] = s[n-2], d[i] = (s[i-1] + s[i]) / 2. Bias: one lag's drop.
   * ``statistical``: d[i] = NaN-aware median of the row neighbours C[i, i±k],
     k = 1..window, that exist. Robust to an outlier in the band; for a decaying c2 the
     median sits near lag (window+1)/2, so its bias is larger than ``basic``'s.
   * ``interpolation``: linear extrapolation along the row to lag 0 from lags 1 and 2,
     2*C[i,i+1] - C[i,i+2] (right side, where i+2 < n) and 2*C[i,i-1] - C[i,i-2] (left
     side, where i-2 >= 0), averaged over the sides that exist; elements with neither
     side (only n = 2 and the middle of n = 3) take the ``basic`` value. For
     c2 = 1 + b*exp(-lag/tau) the bias is b*(1-e^{-1/tau})^2 instead of ``basic``'s
     b*(1-e^{-1/tau}): second order instead of first. The price is noise: the estimate's
     variance is about 5/2 times one element's (per side 4+1, two sides averaged).
4. ``normalization`` (off by default), method ``baseline``: each angle's matrix is
   divided by its own baseline b, the mean of the *finite* upper-triangle elements whose
   lag j - i lies in the longest quarter of lags, [n - m, n - 1] with
   m = max(1, ceil((n-1)/4)). Afterwards those elements average exactly 1, so c2 tends
   to 1 at long lag when the correlation has decayed there. The model's per-angle
   contrast and offset absorb the factor (both scale by 1/b). A baseline that is not
   finite and > 0 (e.g. every long-lag element masked) raises DataError naming the
   angle; an angle with no finite off-diagonal element at all is left as it is (its
   baseline is recorded as null) because QC drops it. (The reference's
   mean/min_max/z_score are not offered: they change the meaning of contrast/offset in
   ways the model cannot absorb.)
5. ``noise_reduction`` (off by default) is **display-only**: the fitted c2 (``c2_exp``)
   is never smoothed. Smoothing the fitted data made the per-lag noise estimate read the
   smoothed scatter, about 50 times smaller than the real one, so σ and the CMC
   posteriors came out ~50 times too narrow. When enabled, the smoothed matrices are
   returned beside the data (:func:`run_preprocess`) and written as the extra array
   ``c2_smoothed`` of ``preprocessed.npz``, which only the data plots read; the record
   says ``display_only: true`` and why. The filter works on each angle's matrix
   separately (never across angles), boundary mode "reflect", then C = (C + C^T) / 2 so
   the result is exactly symmetric. ``gaussian``: sigma = size elements (number > 0);
   ``median`` / ``uniform``: a size x size window (integer >= 1). Masked elements do not
   leak into their neighbours: ``gaussian`` and ``uniform`` are normalised
   convolutions (the filtered values over the filtered weights of the finite
   elements); ``median`` runs on the matrix with its holes filled by that uniform
   average (the matrix median where a window holds no finite value). Masked elements
   stay NaN in the display too, so a figure shows the holes the fit sees.
6. ``validation``: shape (n_phi, n, n) matching the time and angle arrays, a symmetric
   NaN pattern and symmetric finite pairs to 1e-10 relative; a failure raises DataError
   naming the angle index. NaN is not a failure: the record lists the masked
   off-diagonal elements (upper triangle) of every angle. An angle with no finite
   off-diagonal element passes too; QC drops it.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from homodyne_steps.dataset import XpcsData
from homodyne_steps.errors import ConfigError, DataError
from homodyne_steps.serialise import to_jsonable, write_json

DIAGONAL_METHODS = ("basic", "statistical", "interpolation")
NORMALIZATION_METHODS = ("baseline",)
NOISE_METHODS = ("gaussian", "median", "uniform")
PROVENANCE_SCHEMA_VERSION = 1
# |C - C^T| allowed, relative to max|C|: float64 round-off only, not real asymmetry.
SYMMETRY_RTOL = 1e-10


# --------------------------------------------------------------------------- settings


def _is_int(v: Any) -> bool:
    # bool is an int subclass; `window: true` is a typo, not 1.
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float | np.floating)) and math.isfinite(v)


def _require(ok: bool, where: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: got {value!r}; expected {expected}")


def _check_enabled(v: Any, where: str) -> None:
    _require(isinstance(v, bool), f"{where}.enabled", v, "true or false")


def _check_method(v: Any, choices: tuple[str, ...], where: str) -> None:
    _require(isinstance(v, str) and v in choices, f"{where}.method", v, f"one of {list(choices)}")


@dataclass(frozen=True)
class DiagonalCorrectionSettings:
    enabled: bool = True
    method: str = "basic"
    window: int = 3  # statistical only: neighbours C[i, i±k], k = 1..window

    def check(self, where: str = "preprocess.diagonal_correction") -> None:
        _check_enabled(self.enabled, where)
        _check_method(self.method, DIAGONAL_METHODS, where)
        # Checked even when unused so a bad value never hides until the method changes.
        _require(
            _is_int(self.window) and self.window >= 1,
            f"{where}.window",
            self.window,
            "an integer >= 1",
        )


@dataclass(frozen=True)
class NormalizationSettings:
    enabled: bool = False
    method: str = "baseline"

    def check(self, where: str = "preprocess.normalization") -> None:
        _check_enabled(self.enabled, where)
        _check_method(self.method, NORMALIZATION_METHODS, where)


@dataclass(frozen=True)
class NoiseReductionSettings:
    enabled: bool = False
    method: str = "gaussian"
    size: float = 3  # gaussian: sigma in elements; median/uniform: window width

    def check(self, where: str = "preprocess.noise_reduction") -> None:
        _check_enabled(self.enabled, where)
        _check_method(self.method, NOISE_METHODS, where)
        if self.method == "gaussian":
            ok, expected = _is_number(self.size) and self.size > 0, "a number > 0 (sigma)"
        else:
            ok, expected = _is_int(self.size) and self.size >= 1, "an integer >= 1 (window)"
        _require(ok, f"{where}.size", self.size, f"{expected} for method {self.method!r}")


_SECTIONS: dict[str, type] = {
    "diagonal_correction": DiagonalCorrectionSettings,
    "normalization": NormalizationSettings,
    "noise_reduction": NoiseReductionSettings,
}


def _section_from_mapping(cls: type, mapping: Any, where: str) -> Any:
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where}: got {mapping!r}; expected a mapping")
    known = list(cls.__dataclass_fields__)
    for key in mapping:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key; expected one of {known}")
    obj = cls(**mapping)
    obj.check(where)
    return obj


@dataclass(frozen=True)
class PreprocessSettings:
    """Resolved settings of the preprocess stage (see the module docstring)."""

    diagonal_correction: DiagonalCorrectionSettings = field(
        default_factory=DiagonalCorrectionSettings
    )
    normalization: NormalizationSettings = field(default_factory=NormalizationSettings)
    noise_reduction: NoiseReductionSettings = field(default_factory=NoiseReductionSettings)

    @classmethod
    def from_mapping(
        cls, mapping: Mapping[str, Any] | None, where: str = "preprocess"
    ) -> PreprocessSettings:
        """Build from a config mapping; missing keys take defaults, unknown keys are errors."""
        if mapping is None:
            mapping = {}
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{where}: got {mapping!r}; expected a mapping")
        for key in mapping:
            if key not in _SECTIONS:
                raise ConfigError(f"{where}.{key}: unknown key; expected one of {list(_SECTIONS)}")
        return cls(
            **{
                name: _section_from_mapping(sec_cls, mapping.get(name), f"{where}.{name}")
                for name, sec_cls in _SECTIONS.items()
            }
        )

    def check(self, where: str = "preprocess") -> None:
        for name in _SECTIONS:
            getattr(self, name).check(f"{where}.{name}")

    def to_mapping(self) -> dict[str, dict[str, Any]]:
        """Every setting, defaults included (for provenance and reproducibility)."""
        return {
            name: {k: getattr(getattr(self, name), k) for k in cls.__dataclass_fields__}
            for name, cls in _SECTIONS.items()
        }


def _resolve(settings: PreprocessSettings | Mapping[str, Any] | None) -> PreprocessSettings:
    if isinstance(settings, PreprocessSettings):
        settings.check()  # directly constructed settings skipped from_mapping's checks
        return settings
    return PreprocessSettings.from_mapping(settings)


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


# -------------------------------------------------------------------------- pipeline


def _record(
    step: str,
    method: str,
    parameters: dict,
    before: np.ndarray,
    after: np.ndarray,
    t0: float | None,
) -> dict[str, Any]:
    return {
        "stage": "preprocess",
        "step": step,
        "method": method,
        "applied": t0 is not None,
        "parameters": parameters,
        "input_shape": list(before.shape),
        "output_shape": list(after.shape),
        "input_dtype": str(before.dtype),
        "output_dtype": str(after.dtype),
        "duration_ms": 0.0 if t0 is None else (time.perf_counter() - t0) * 1e3,
    }


DISPLAY_ONLY_REASON = (
    "smoothing is for the figures only: the noise estimate reads the fitted c2, and on "
    "smoothed data it measures the smoothed scatter (about 50x too small), so sigma, "
    "chi2 and the CMC posteriors would be wrong; preprocessed.npz c2_exp, which NLSQ and "
    "CMC fit, is unsmoothed"
)


class PreprocessResult(NamedTuple):
    """What :func:`run_preprocess` returns."""

    data: XpcsData  # the data the fit will read (never smoothed)
    records: list[dict[str, Any]]  # provenance, one record per step
    c2_smoothed: np.ndarray | None  # display-only smoothed c2, None unless enabled


def run_preprocess(
    data: XpcsData, settings: PreprocessSettings | Mapping[str, Any] | None = None
) -> PreprocessResult:
    """Run the steps of the module docstring; return the new data, the provenance
    records and the display-only smoothed matrices.

    Pure: ``data`` is not modified. Raises ConfigError for bad settings, DataError for
    data that cannot be corrected or fails output validation. NaN (masked) elements are
    carried through, never filled.
    """
    s = _resolve(settings)
    records: list[dict[str, Any]] = []

    def step(name: str, method: str, enabled: bool, params: dict, fn: Callable) -> None:
        nonlocal c
        if not enabled:
            records.append(_record(name, method, params, c, c, None))
            return
        t0 = time.perf_counter()
        out = fn(c)
        records.append(_record(name, method, params, c, out, t0))
        c = out

    c = np.asarray(data.c2_exp)

    def to_f64(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float64)

    step("format", "float64_c_contiguous", True, {"dtype": "float64", "order": "C"}, to_f64)

    mask_counts: dict[str, int] = {}

    def mask(x: np.ndarray) -> np.ndarray:
        out, counts = mask_non_finite(x)
        mask_counts.update(counts)
        return out

    step("masking", "inf_to_nan_copy_symmetric_partner", True, {}, mask)
    records[-1]["counts"] = mask_counts

    dc = s.diagonal_correction
    step(
        "diagonal_correction",
        dc.method,
        dc.enabled,
        {"window": dc.window} if dc.method == "statistical" else {},
        lambda x: correct_diagonal(x, dc.method, dc.window),
    )

    nz = s.normalization
    norm_params: dict[str, Any] = {}
    if nz.enabled and c.shape[-1] >= 2:
        norm_params["baseline_lags"] = list(baseline_lag_range(c.shape[-1]))

    def normalise(x: np.ndarray) -> np.ndarray:
        b = _baselines(x)
        # per angle, so the scaling can be undone; null for an angle with no finite value
        norm_params["baselines"] = [float(v) if np.isfinite(v) else None for v in b]
        return x / np.where(np.isfinite(b), b, 1.0)[:, None, None]

    step("normalization", nz.method, nz.enabled, norm_params, normalise)

    out = data.replace(
        wavevector_q_list=to_f64(data.wavevector_q_list),
        phi_angles_list=to_f64(data.phi_angles_list),
        t1=to_f64(data.t1),
        t2=to_f64(data.t2),
        c2_exp=to_f64(c),
        dt=float(data.dt),
    )

    # Display only: computed from the final fitted matrices, but c is left as it is.
    nr = s.noise_reduction
    smoothed: list[np.ndarray] = []

    def smooth_beside(x: np.ndarray) -> np.ndarray:
        smoothed.append(smooth_for_display(x, nr))
        return x  # the fitted matrices pass through unchanged

    step(
        "noise_reduction",
        nr.method,
        nr.enabled,
        {"size": nr.size, "mode": "reflect"},
        smooth_beside,
    )
    records[-1].update(
        display_only=True,
        output="c2_smoothed" if nr.enabled else None,
        reason=DISPLAY_ONLY_REASON,
    )

    masked: list[dict[str, Any]] = []

    def validate(x: np.ndarray) -> np.ndarray:
        masked.extend(validate_c2(out))
        return x

    step(
        "validation",
        "shape_symmetric_nan_pattern",
        True,
        {"symmetry_rtol": SYMMETRY_RTOL},
        validate,
    )
    records[-1]["masked_per_angle"] = masked
    return PreprocessResult(out, records, smoothed[0] if smoothed else None)


def preprocess(
    data: XpcsData, settings: PreprocessSettings | Mapping[str, Any] | None = None
) -> tuple[XpcsData, list[dict[str, Any]]]:
    """:func:`run_preprocess` without the display-only smoothed matrices."""
    result = run_preprocess(data, settings)
    return result.data, result.records


def preprocess_stage(
    in_npz: str | os.PathLike[str],
    out_npz: str | os.PathLike[str],
    out_json: str | os.PathLike[str],
    settings: PreprocessSettings | Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Read ``in_npz``, preprocess, write ``out_npz`` and the provenance JSON ``out_json``.

    Both files are written atomically and only after everything has been computed and
    checked, so a failure leaves neither (a failed JSON write removes the new NPZ).
    """
    s = _resolve(settings)
    data = XpcsData.from_npz(in_npz)
    result = run_preprocess(data, s)
    payload = to_jsonable(
        {
            "schema_version": PROVENANCE_SCHEMA_VERSION,
            "settings": s.to_mapping(),
            "records": result.records,
        }
    )
    # c2_smoothed is an extra array: XpcsData.from_npz reads only c2_exp, so the fit
    # never sees it; plot_data shows it.
    extra = {} if result.c2_smoothed is None else {"c2_smoothed": result.c2_smoothed}
    out_npz_path = result.data.to_npz(out_npz, **extra)
    try:
        out_json_path = write_json(out_json, payload)
    except BaseException:
        out_npz_path.unlink(missing_ok=True)
        raise
    return out_npz_path, out_json_path
