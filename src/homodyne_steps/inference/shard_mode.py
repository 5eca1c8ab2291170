"""Where a shard's sampling starts: the mode of its log density by damped Newton (the
parts of :mod:`homodyne_steps.inference.lm`), and the Laplace metric NUTS starts from."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from homodyne_steps._jax import jax
from homodyne_steps.inference.lm import damped_step, is_decrease, marquardt_scale, scale_system


@dataclass
class ShardMode:
    """The shard posterior's mode in the sampled coordinates w and the inverse Hessian
    of the potential there (the Laplace covariance: NUTS's metric)."""

    w: np.ndarray
    inverse_mass: np.ndarray | None
    status: str
    iterations: int
    potential: float
    seconds: float
    # 1/|diag H|: the starting metric NUTS adapts when H is not positive definite
    inverse_mass_diagonal: np.ndarray | None = None


def shard_mode(potential, w0: np.ndarray, max_iterations: int = 40) -> ShardMode:
    """Damped Newton on the potential (−log target) in the unconstrained coordinates.

    The Hessian is exact (JAX), so the metric includes the prior, the varpro log-det
    term and the curvature of the transforms: the Gaussian NUTS actually sees. The step
    (Marquardt-scaled, damped) and the acceptance test are the NLSQ solver's
    (:mod:`homodyne_steps.inference.lm`); unlike there, the Hessian may be indefinite (the damping
    is shifted past its smallest eigenvalue) and the damping moves tenfold.
    """
    t0 = time.perf_counter()
    value_and_grad = jax.jit(jax.value_and_grad(potential))
    hessian = jax.jit(jax.hessian(potential))
    x = np.asarray(w0, dtype=np.float64)
    f, g = (np.asarray(v, dtype=np.float64) for v in value_and_grad(x))
    status, it, lam = "max_iterations", 0, 1e-3
    for it in range(1, max_iterations + 1):  # noqa: B007
        if not (np.isfinite(f) and np.all(np.isfinite(g))):
            status = "failed"
            break
        h = np.asarray(hessian(x), dtype=np.float64)
        h = 0.5 * (h + h.T)
        scale = marquardt_scale(np.abs(np.diag(h)))
        hs, gs = scale_system(h, g, scale)
        evals = np.linalg.eigvalsh(hs)
        if evals[0] > 0 and gs @ np.linalg.solve(hs, gs) < 1e-6:
            status = "converged"
            break
        accepted = False
        while lam < 1e12:
            shift = lam + max(0.0, -evals[0] * 1.01)
            step = damped_step(hs, gs, shift) / scale
            f_new, g_new = (np.asarray(v, dtype=np.float64) for v in value_and_grad(x + step))
            if is_decrease(f, f_new):
                x, f, g, accepted = x + step, f_new, g_new, True
                lam = max(lam / 10.0, 1e-9)
                break
            lam *= 10.0
        if not accepted:
            status = "stalled"
            break
    inverse_mass = diagonal = None
    if status != "failed":
        inverse_mass, diagonal = laplace_metric(np.asarray(hessian(x), dtype=np.float64))
    return ShardMode(x, inverse_mass, status, it, float(f), time.perf_counter() - t0, diagonal)


def laplace_metric(hessian: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(inverse Hessian, or None where it is not positive definite; 1/|diag H|).

    The coordinates differ in scale by up to 1e10 (a rate of D(t) ~1e4 Å²/s against one
    of γ̇(t) ~1e-4 1/s), so H's eigenvalues span ~1e16 and an unscaled eigensolver
    returns a smallest one of either sign (measured on a laminar shard: −1e-5 against
    +1.6e-5); the decomposition is done on the diagonally scaled H.
    """
    h = 0.5 * (hessian + hessian.T)
    d = np.abs(np.diag(h))
    if not (np.all(np.isfinite(h)) and np.all(d > 0)):
        return None, None
    scale = np.sqrt(d)
    evals, evecs = np.linalg.eigh(h / np.outer(scale, scale))
    if not evals[0] > 1e-12 * evals[-1]:
        return None, 1.0 / d
    return ((evecs / evals) @ evecs.T) / np.outer(scale, scale), 1.0 / d
