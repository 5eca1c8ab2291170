r"""Curvature adjustment of a likelihood whose noise model is too simple.

The CMC likelihood treats the elements of a two-time matrix as independent given σ. On
data made from speckle, they are not: each frame's intensity enters a whole row and
column, so the likelihood is a *composite* likelihood. Its maximum is still a good
estimate, but its curvature H = V_model⁻¹ (V_model: the NLSQ covariance under independent
noise) overstates the information by a factor of up to several hundred; the sampling
covariance of the estimate is the sandwich V (:mod:`speckle_noise`).

The adjustment (Chandler & Bate 2007, "Inference for clustered data using the
independence loglikelihood") keeps the likelihood's shape but moves its argument::

    ℓ_adj(u) = ℓ(û + C (u − û)),        Cᵀ H C = V⁻¹,

so the adjusted log-likelihood has its maximum at û and curvature V⁻¹: a posterior under
a flat prior then has covariance V to second order. The map is affine, so applying it to
every shard's ℓ_k adjusts their sum exactly: Σ_k ℓ_k(û + C(u − û)) = ℓ_adj(u).

The coordinates u matter once V is wide. In (D0, alpha, D_offset) the likelihood is a
curved valley; an affine stretch there turns the valley's few-σ neighbourhood into a
Gaussian in θ that crosses alpha = 0 and leaves the bounds. In CMC's combination
coordinates (:mod:`homodyne_steps.physics.coordinates`) the likelihood is close to
Gaussian, so the stretch there keeps its shape: NLSQ records θ̂ and the two covariances
over θ, and the sampler carries them to its u with J = ∂u/∂θ at θ̂
(:meth:`CurvatureAdjustment.affine_map`).

C = M⁻¹ M_adj with H = MᵀM and V⁻¹ = M_adjᵀ M_adj (Cholesky factors), computed in
coordinates scaled by √diag V so that parameters of scale 1e4 and 1e-4 do not meet in one
factorisation. Only parameters with a finite σ under both models are adjusted; the rest
(fixed, not identified) keep the identity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from homodyne_steps._jax import jax
from homodyne_steps.errors import DataError


def adjustment_matrix(cov_model: np.ndarray, cov_target: np.ndarray) -> np.ndarray:
    """C with Cᵀ cov_model⁻¹ C = cov_target⁻¹ (module docstring); both positive definite."""
    cov_model = np.asarray(cov_model, dtype=np.float64)
    cov_target = np.asarray(cov_target, dtype=np.float64)
    s = np.sqrt(np.diag(cov_target))
    scale = np.outer(s, s)
    # H = MᵀM ⇔ V_model = M⁻¹M⁻ᵀ: M⁻¹ is V_model's lower Cholesky factor (M_adj⁻¹ that
    # of V_target), so C = M⁻¹ M_adj needs neither H nor V⁻¹.
    m_inv = np.linalg.cholesky(cov_model / scale)
    m_adj_inv = np.linalg.cholesky(cov_target / scale)
    c_scaled = m_inv @ np.linalg.inv(m_adj_inv)
    return c_scaled * np.outer(s, 1.0 / s)


@dataclass(frozen=True)
class CurvatureAdjustment:
    """θ̂ and the covariances of the model (independent noise) and the target (speckle)
    over ``parameters``: what the NLSQ record carries. A sampler builds its C from them
    in its own coordinates (:meth:`affine_map`)."""

    parameters: tuple[str, ...]
    center: np.ndarray
    cov_model: np.ndarray
    cov_target: np.ndarray

    def to_mapping(self) -> dict[str, Any]:
        return {
            "parameters": list(self.parameters),
            "center": self.center.tolist(),
            "covariance_model": self.cov_model.tolist(),
            "covariance_target": self.cov_target.tolist(),
            "description": (
                "CMC evaluates its independent-noise likelihood at û + C·(u − û) in its "
                "combination coordinates u, with Cᵀ(J·covariance_model·Jᵀ)⁻¹C = "
                "(J·covariance_target·Jᵀ)⁻¹, J = ∂u/∂θ at center: its posterior then has "
                "the speckle covariance (Chandler & Bate 2007)"
            ),
        }

    @classmethod
    def of_mapping(cls, record: Mapping[str, Any], where: str) -> CurvatureAdjustment:
        try:
            names = tuple(str(n) for n in record["parameters"])
            arrays = [np.asarray(record[k], dtype=np.float64)
                      for k in ("center", "covariance_model", "covariance_target")]  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{where}: curvature_adjustment needs parameters, center, covariance_model "
                f"and covariance_target ({exc})"
            ) from None
        k = len(names)
        shapes = [a.shape for a in arrays]
        if shapes != [(k,), (k, k), (k, k)] or not all(np.all(np.isfinite(a)) for a in arrays):
            raise DataError(
                f"{where}: curvature_adjustment over {k} parameters needs a finite center "
                f"of {k} and finite {k}×{k} covariances; it has shapes {shapes}"
            )
        return cls(names, *arrays)

    def affine_map(self, names: Sequence[str], theta0, signs, to_coords, fill: np.ndarray):
        """(û, C) over the coordinates u = ``to_coords``(θ) of the sampled θ (``names``
        first, as many entries as ``theta0``): C from the covariances carried to u
        through J = ∂u/∂θ at ``theta0``.

        ``theta0`` is θ̂ in the sampler's sign convention, ``signs`` (±1 per name) how it
        differs from the record's (a mirror image θ → signs·θ: V → S V S). Entries that
        are not adjusted (other parameters, the sampled scaling) get the same variance
        ``fill`` in both covariances, so C leaves their directions alone.
        """
        names = list(names)
        missing = [n for n in self.parameters if n not in names]
        if missing:
            raise DataError(
                f"curvature_adjustment names {missing}, which this fit does not sample ({names})"
            )
        idx = [names.index(n) for n in self.parameters]
        sign = np.asarray(signs, dtype=np.float64)[idx]
        cov_m, cov_t = np.diag(fill).astype(np.float64), np.diag(fill).astype(np.float64)
        block = np.ix_(idx, idx)
        cov_m[block] = self.cov_model * np.outer(sign, sign)
        cov_t[block] = self.cov_target * np.outer(sign, sign)
        theta0 = np.asarray(theta0, dtype=np.float64)
        jac = np.asarray(jax.jacfwd(to_coords)(theta0))
        u0 = np.asarray(to_coords(theta0))
        try:
            matrix = adjustment_matrix(jac @ cov_m @ jac.T, jac @ cov_t @ jac.T)
        except np.linalg.LinAlgError:
            matrix = None
        if matrix is None or not np.all(np.isfinite(matrix)):
            raise DataError(
                "the NLSQ record's curvature_adjustment covariances are not positive definite "
                "in the sampler's coordinates: rerun NLSQ with nlsq.uncertainty.method "
                "independent, or fix the parameters the data do not determine"
            )
        return u0, matrix


def _positive_semidefinite(cov: np.ndarray, tol: float = 1e-9) -> bool:
    """Whether a covariance is finite and positive semidefinite up to round-off (its
    correlation matrix's eigenvalues ≥ −``tol``)."""
    sd = np.sqrt(np.diag(cov))
    if not (np.all(np.isfinite(cov)) and np.all(sd > 0)):
        return False
    return bool(np.linalg.eigvalsh(cov / np.outer(sd, sd))[0] >= -tol)


def curvature_adjustment(
    names: Sequence[str], center: np.ndarray, cov_model: np.ndarray, cov_target: np.ndarray
) -> CurvatureAdjustment | None:
    """The record of the adjustment from the model's to the target covariance over the
    parameters both determine (finite, positive σ); None when there are none or either
    block is not positive definite there (then no adjustment can be trusted)."""
    cov_model = np.asarray(cov_model, dtype=np.float64)
    cov_target = np.asarray(cov_target, dtype=np.float64)
    d_m, d_t = np.diag(cov_model), np.diag(cov_target)
    ok = np.isfinite(d_m) & np.isfinite(d_t) & (d_m > 0) & (d_t > 0)
    if not ok.any():
        return None
    block = np.ix_(ok, ok)
    # Where the data fix D(t) but not its parts, D0 and D_offset are correlated to within
    # round-off (correlation eigenvalue −2e-12 on a laminar speckle file): in θ the blocks
    # are singular to working precision, in the shards' coordinates u they are not, and
    # C is built there. Refused only when a block is indefinite beyond round-off.
    if not (_positive_semidefinite(cov_model[block]) and _positive_semidefinite(cov_target[block])):
        return None
    chosen = tuple(np.asarray(list(names))[ok].tolist())
    center = np.asarray(center, dtype=np.float64)[ok]
    return CurvatureAdjustment(chosen, center, cov_model[block], cov_target[block])


def recorded_adjustment(record: Mapping[str, Any] | None, where: str):
    """The :class:`CurvatureAdjustment` of an NLSQ record, or None (σ made under
    independent noise: the likelihood already has their curvature)."""
    return None if record is None else CurvatureAdjustment.of_mapping(record, where)


def adjustment_in(record, names, theta0, nlsq_theta, to_coords, fill):
    """((û, C), adjusted names) of an NLSQ record's adjustment in a sampler's coordinates
    u = ``to_coords``(θ) (:meth:`CurvatureAdjustment.affine_map`), or (None, ()) without
    one. ``theta0`` is θ̂ in the sampler's sign convention, ``nlsq_theta`` the physical
    part as NLSQ wrote it: entries that differ are the mirror image (sign −1)."""
    adjustment = recorded_adjustment(record, "NLSQ")
    if adjustment is None:
        return None, ()
    signs = np.where(np.asarray(theta0)[: len(names)] == np.asarray(nlsq_theta), 1.0, -1.0)
    return adjustment.affine_map(names, theta0, signs, to_coords, fill), adjustment.parameters


__all__ = [
    "CurvatureAdjustment",
    "adjustment_in",
    "adjustment_matrix",
    "curvature_adjustment",
    "recorded_adjustment",
]
