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

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from homodyne_steps.data.c2_cleaning import (
    SYMMETRY_RTOL,
    _baselines,
    baseline_lag_range,
    correct_diagonal,
    mask_non_finite,
    smooth_for_display,
    validate_c2,
)
from homodyne_steps.data.preprocess_settings import PreprocessSettings, _resolve
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.io.serialise import to_jsonable, write_json

PROVENANCE_SCHEMA_VERSION = 1


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


class _Steps:
    """Runs the steps in order on the c2 stack, one provenance record per step."""

    def __init__(self, c2: np.ndarray) -> None:
        self.c = c2
        self.records: list[dict[str, Any]] = []

    def run(self, name: str, method: str, enabled: bool, params: dict, fn: Callable) -> None:
        if not enabled:
            self.records.append(_record(name, method, params, self.c, self.c, None))
            return
        t0 = time.perf_counter()
        out = fn(self.c)
        self.records.append(_record(name, method, params, self.c, out, t0))
        self.c = out


def _to_f64(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float64)


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
    steps = _Steps(np.asarray(data.c2_exp))
    steps.run("format", "float64_c_contiguous", True, {"dtype": "float64", "order": "C"},
              _to_f64)  # fmt: skip
    _mask(steps)
    before = steps.c
    dc = s.diagonal_correction
    steps.run(
        "diagonal_correction",
        dc.method,
        dc.enabled,
        {"window": dc.window} if dc.method == "statistical" else {},
        lambda x: correct_diagonal(x, dc.method, dc.window),
    )
    _normalise(steps, s)
    out = data.replace(
        wavevector_q_list=_to_f64(data.wavevector_q_list),
        phi_angles_list=_to_f64(data.phi_angles_list),
        t1=_to_f64(data.t1),
        t2=_to_f64(data.t2),
        c2_exp=_to_f64(steps.c),
        dt=float(data.dt),
        c2_diagonal=_diagonal_on_final_scale(before, steps.c),
    )
    smoothed = _smooth_beside(steps, s)
    _validate(steps, out)
    return PreprocessResult(out, steps.records, smoothed)


def _diagonal_on_final_scale(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The diagonal of ``before`` (masked, uncorrected) on ``after``'s scale: the steps
    after masking change off-diagonal elements only by a per-angle factor (the
    normalisation), read off the first off-diagonal."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.diagonal(after, 1, 1, 2) / np.diagonal(before, 1, 1, 2)
    factor = np.ones(before.shape[0])
    for a, row in enumerate(ratio):
        finite = row[np.isfinite(row)]
        if finite.size:
            factor[a] = np.median(finite)
    return _to_f64(np.diagonal(before, 0, 1, 2) * factor[:, None])


def _mask(steps: _Steps) -> None:
    counts: dict[str, int] = {}

    def mask(x: np.ndarray) -> np.ndarray:
        out, found = mask_non_finite(x)
        counts.update(found)
        return out

    steps.run("masking", "inf_to_nan_copy_symmetric_partner", True, {}, mask)
    steps.records[-1]["counts"] = counts


def _normalise(steps: _Steps, s: PreprocessSettings) -> None:
    nz = s.normalization
    params: dict[str, Any] = {}
    if nz.enabled and steps.c.shape[-1] >= 2:
        params["baseline_lags"] = list(baseline_lag_range(steps.c.shape[-1]))

    def normalise(x: np.ndarray) -> np.ndarray:
        b = _baselines(x)
        # per angle, so the scaling can be undone; null for an angle with no finite value
        params["baselines"] = [float(v) if np.isfinite(v) else None for v in b]
        return x / np.where(np.isfinite(b), b, 1.0)[:, None, None]

    steps.run("normalization", nz.method, nz.enabled, params, normalise)


def _smooth_beside(steps: _Steps, s: PreprocessSettings) -> np.ndarray | None:
    """Display only: smoothed from the final fitted matrices, which pass unchanged."""
    nr = s.noise_reduction
    smoothed: list[np.ndarray] = []

    def smooth_beside(x: np.ndarray) -> np.ndarray:
        smoothed.append(smooth_for_display(x, nr))
        return x

    steps.run("noise_reduction", nr.method, nr.enabled, {"size": nr.size, "mode": "reflect"},
              smooth_beside)  # fmt: skip
    steps.records[-1].update(
        display_only=True,
        output="c2_smoothed" if nr.enabled else None,
        reason=DISPLAY_ONLY_REASON,
    )
    return smoothed[0] if smoothed else None


def _validate(steps: _Steps, out: XpcsData) -> None:
    masked: list[dict[str, Any]] = []

    def validate(x: np.ndarray) -> np.ndarray:
        masked.extend(validate_c2(out))
        return x

    steps.run("validation", "shape_symmetric_nan_pattern", True,
              {"symmetry_rtol": SYMMETRY_RTOL}, validate)  # fmt: skip
    steps.records[-1]["masked_per_angle"] = masked


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
