"""Per-angle scaling (contrast, offset): the modes, their parameters, initial estimates.

c2 = offset_a + contrast_a · g1² is linear in the per-angle scaling, so every mode is a
linear map from its own parameters ψ to the per-angle vector
``s = (contrast_0..contrast_{P-1}, offset_0..offset_{P-1}) = M ψ + s_fixed``:

- ``individual``: one contrast and one offset per angle (M = identity, 2P parameters);
- ``auto``: one contrast and one offset shared by all angles (2 parameters), started from
  the mean of the per-angle quantile estimates;
- ``constant``: the per-angle quantile estimates, fixed (0 parameters);
- ``fourier``: contrast(φ) and offset(φ) each a truncated Fourier series of order K
  (K = 2, lowered so that 2K + 1 ≤ P), 2(2K + 1) parameters;
- ``varpro``: the scaling is solved exactly per angle (2 × 2 weighted least squares)
  for every trial of the physical parameters (variable projection, Golub & Pereyra
  1973): the nonlinear problem has only the 3 or 7 physical parameters.

Quantile estimates (reference §7): offset = 10th percentile of c2 at the 20 % largest
lags; contrast = 90th percentile at the 20 % smallest lags minus that offset; both
clipped to the registry bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from homodyne_steps.errors import ConfigError
from homodyne_steps.physics.registry import REGISTRY, Registry

MODES = ("auto", "constant", "individual", "fourier", "varpro")
DEFAULT_MODE = "varpro"  # nlsq.per_angle_scaling when not set
FOURIER_ORDER = 2


@dataclass(frozen=True)
class ScalingMap:
    """s = M ψ + fixed for one mode; ``names`` label the columns of M (the ψ)."""

    mode: str
    matrix: np.ndarray  # (2P, n_psi)
    fixed: np.ndarray  # (2P,)
    names: tuple[str, ...]

    @property
    def n_params(self) -> int:
        return self.matrix.shape[1]

    def per_angle(self, psi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(contrast, offset), each (P,)."""
        s = self.matrix @ np.asarray(psi, dtype=np.float64) + self.fixed
        n_phi = s.size // 2
        return s[:n_phi], s[n_phi:]


def fourier_basis(phi_deg: np.ndarray, order: int) -> np.ndarray:
    """(P, 2·order + 1) columns 1, cos φ, sin φ, cos 2φ, sin 2φ, ..."""
    phi = np.deg2rad(np.asarray(phi_deg, dtype=np.float64))
    cols = [np.ones_like(phi)]
    for k in range(1, order + 1):
        cols += [np.cos(k * phi), np.sin(k * phi)]
    return np.stack(cols, axis=1)


def fourier_order(n_phi: int) -> int:
    return max(0, min(FOURIER_ORDER, (n_phi - 1) // 2))


def quantile_estimates(
    c2: np.ndarray, registry: Registry = REGISTRY
) -> tuple[np.ndarray, np.ndarray]:
    """Per-angle (contrast, offset) from quantiles of the upper triangle of ``c2``.

    ``c2`` is (n_phi, n_t, n_t). The lag thresholds (20 % and 80 % quantiles of t2 − t1
    over the fitted pairs) are pooled over all angles, as in the reference.
    """
    n_phi, n_t = c2.shape[0], c2.shape[1]
    iu = np.triu_indices(n_t, k=1)
    lag = iu[1] - iu[0]
    small, large = np.quantile(lag, [0.2, 0.8])
    near, far = lag <= small, lag >= large
    c_lo, c_hi = registry["contrast"].bounds
    o_lo, o_hi = registry["offset"].bounds
    contrast = np.empty(n_phi)
    offset = np.empty(n_phi)
    for k in range(n_phi):
        values = c2[k][iu]
        # Masked (NaN) lags: fall back to all of the angle's finite values, then to the
        # registry default, so a start value is never NaN.
        base = _finite_quantile(values[far], values, 0.1, registry["offset"].default)
        offset[k] = np.clip(base, o_lo, o_hi)
        top = _finite_quantile(values[near], values, 0.9, base + registry["contrast"].default)
        contrast[k] = np.clip(top - offset[k], c_lo, c_hi)
    return contrast, offset


def _finite_quantile(values: np.ndarray, wider: np.ndarray, q: float, default: float) -> float:
    """Quantile ``q`` of the finite ``values``, else of the finite ``wider``, else default."""
    for v in (values, wider):
        finite = v[np.isfinite(v)]
        if finite.size:
            return float(np.quantile(finite, q))
    return float(default)


def build_map(
    mode: str, phi_deg: np.ndarray, contrast0: np.ndarray, offset0: np.ndarray
) -> tuple[ScalingMap, np.ndarray]:
    """The map of ``mode`` and its initial ψ (from per-angle estimates)."""
    n_phi = len(phi_deg)
    eye = np.eye(n_phi)
    zeros = np.zeros((n_phi, n_phi))
    s0 = np.concatenate([contrast0, offset0])
    if mode in ("individual", "varpro"):
        names = tuple(f"contrast_{k}" for k in range(n_phi)) + tuple(
            f"offset_{k}" for k in range(n_phi)
        )
        return ScalingMap(
            mode, np.block([[eye, zeros], [zeros, eye]]), np.zeros(2 * n_phi), names
        ), s0.copy()
    if mode == "auto":
        ones = np.ones((n_phi, 1))
        matrix = np.block([[ones, np.zeros((n_phi, 1))], [np.zeros((n_phi, 1)), ones]])
        psi0 = np.array([contrast0.mean(), offset0.mean()])
        return ScalingMap(mode, matrix, np.zeros(2 * n_phi), ("contrast", "offset")), psi0
    if mode == "constant":
        return ScalingMap(mode, np.zeros((2 * n_phi, 0)), s0.copy(), ()), np.zeros(0)
    if mode == "fourier":
        order = fourier_order(n_phi)
        basis = fourier_basis(phi_deg, order)
        k = basis.shape[1]
        matrix = np.block([[basis, np.zeros((n_phi, k))], [np.zeros((n_phi, k)), basis]])
        labels = ["0"] + [f"{f}{m}" for m in range(1, order + 1) for f in ("cos", "sin")]
        names = tuple(f"contrast_{x}" for x in labels) + tuple(f"offset_{x}" for x in labels)
        psi0 = np.linalg.lstsq(matrix, s0, rcond=None)[0]
        return ScalingMap(mode, matrix, np.zeros(2 * n_phi), names), psi0
    raise ConfigError(f"nlsq.per_angle_scaling: got {mode!r}; expected one of {list(MODES)}")
