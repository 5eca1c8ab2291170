"""The ``preprocess`` stage: clean the two-time matrices c2(phi, t1, t2) before fitting.

Steps, in order (each leaves a provenance record; a disabled step leaves one with
``applied: false``):

1. ``format``: every array becomes float64 and C-contiguous. This runs *first* (the
   reference did it last) so the corrections below are computed in float64 even when the
   file stored float32.
2. ``diagonal_correction`` (on by default; the reference could not turn it off, Q15).
   The diagonal c2(t, t) carries a shot-noise excess, so it is replaced by an estimate
   from the off-diagonal elements. Only the diagonal changes and symmetry is kept.
   n < 2 raises :class:`DataError` (the reference silently wrote a 0 diagonal for n = 1).

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
3. ``normalization`` (off by default), method ``baseline``: each angle's matrix is
   divided by its own baseline b, the mean of the upper-triangle elements whose lag
   j - i lies in the longest quarter of lags, [n - m, n - 1] with m = max(1, ceil((n-1)/4)).
   Afterwards those elements average exactly 1, so c2 tends to 1 at long lag when the
   correlation has decayed there. The model's per-angle contrast and offset absorb the
   factor (both scale by 1/b). A baseline that is not finite and > 0 raises DataError.
   (The reference's mean/min_max/z_score are not offered: they change the meaning of
   contrast/offset in ways the model cannot absorb.)
4. ``noise_reduction`` (off by default): a scipy.ndimage filter on each angle's matrix
   separately (never across angles), boundary mode "reflect", then C = (C + C^T) / 2 so
   the result is exactly symmetric. ``gaussian``: sigma = size elements (number > 0);
   ``median`` / ``uniform``: a size x size window (integer >= 1). Smoothing also blurs
   the cusp of c2 at the diagonal, lowering the near-diagonal values; keep size small.
5. ``validation``: shape (n_phi, n, n) matching the time and angle arrays, all finite,
   symmetric to 1e-10 relative; a failure raises DataError naming the angle index.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    b = c[:, lag >= lo].mean(axis=1)
    for k, bk in enumerate(b):
        if not (np.isfinite(bk) and bk > 0):
            raise DataError(
                f"c2_exp angle index {k}: long-lag baseline is {bk}; baseline normalization "
                "needs a finite value > 0"
            )
    return b


def _noise_filter(c: np.ndarray, s: NoiseReductionSettings) -> np.ndarray:
    # Size 0 along the angle axis: each angle's matrix is filtered on its own.
    if s.method == "gaussian":
        out = ndimage.gaussian_filter(c, sigma=(0, s.size, s.size), mode="reflect")
    elif s.method == "median":
        out = ndimage.median_filter(c, size=(1, s.size, s.size), mode="reflect")
    else:
        out = ndimage.uniform_filter(c, size=(1, s.size, s.size), mode="reflect")
    # Separable filters sum in a different order at (i, j) and (j, i): restore exact symmetry.
    return 0.5 * (out + np.swapaxes(out, 1, 2))


# ------------------------------------------------------------------------ validation


def validate_c2(data: XpcsData) -> None:
    """Raise DataError unless c2_exp is (n_phi, n, n), finite and symmetric."""
    c = data.c2_exp
    if c.ndim != 3 or c.shape != (data.n_phi, data.n_t, data.n_t) or 0 in c.shape:
        raise DataError(
            f"c2_exp has shape {c.shape}; expected non-empty {(data.n_phi, data.n_t, data.n_t)}"
        )
    for k in range(c.shape[0]):
        m = c[k]
        where = f"c2_exp angle index {k} (phi = {data.phi_angles_list[k]:g} deg)"
        bad = ~np.isfinite(m)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise DataError(
                f"{where}: {int(bad.sum())} non-finite values after preprocessing, "
                f"first at (t1 index {i}, t2 index {j})"
            )
        asym = np.abs(m - m.T)
        tol = SYMMETRY_RTOL * max(1.0, float(np.abs(m).max()))
        if asym.max() > tol:
            i, j = np.unravel_index(np.argmax(asym), asym.shape)
            raise DataError(
                f"{where}: not symmetric, |C - C^T| = {asym.max():.3g} at ({i}, {j}) "
                f"(tolerance {tol:.3g}); the loader should symmetrise c2"
            )


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


def preprocess(
    data: XpcsData, settings: PreprocessSettings | Mapping[str, Any] | None = None
) -> tuple[XpcsData, list[dict[str, Any]]]:
    """Run the steps of the module docstring; return new data and provenance records.

    Pure: ``data`` is not modified. Raises ConfigError for bad settings, DataError for
    data that cannot be corrected or fails output validation.
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
        norm_params["baselines"] = b.tolist()  # per angle, so the scaling can be undone
        return x / b[:, None, None]

    step("normalization", nz.method, nz.enabled, norm_params, normalise)

    nr = s.noise_reduction
    step(
        "noise_reduction",
        nr.method,
        nr.enabled,
        {"size": nr.size, "mode": "reflect"},
        lambda x: _noise_filter(x, nr),
    )

    out = data.replace(
        wavevector_q_list=to_f64(data.wavevector_q_list),
        phi_angles_list=to_f64(data.phi_angles_list),
        t1=to_f64(data.t1),
        t2=to_f64(data.t2),
        c2_exp=to_f64(c),
        dt=float(data.dt),
    )

    def validate(x: np.ndarray) -> np.ndarray:
        validate_c2(out)
        return x

    step("validation", "shape_finite_symmetric", True, {"symmetry_rtol": SYMMETRY_RTOL}, validate)
    return out, records


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
    result, records = preprocess(data, s)
    payload = to_jsonable(
        {
            "schema_version": PROVENANCE_SCHEMA_VERSION,
            "settings": s.to_mapping(),
            "records": records,
        }
    )
    out_npz_path = result.to_npz(out_npz)
    try:
        out_json_path = write_json(out_json, payload)
    except BaseException:
        out_npz_path.unlink(missing_ok=True)
        raise
    return out_npz_path, out_json_path
