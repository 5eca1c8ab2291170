r"""Bounded Levenberg–Marquardt on the likelihood statistics, assembled from named parts.

The objective is :class:`Problem` (χ², JᵀJ and Jᵀr from the per-angle statistics of
:mod:`homodyne_steps.inference.likelihood`); the solver :func:`levenberg_marquardt` combines

- :func:`in_log_coordinates`: the system in u = log x for the log-scale parameters
  (D0, γ̇0), where D0·t^alpha = const is a straight line;
- :func:`active_set`: box bounds by projection, with an active set (a parameter on a
  bound whose gradient pushes outward is held there) and :func:`apply_bounded_step`;
- :func:`marquardt_step` (:func:`marquardt_scale`, :func:`damped_step`): the damped
  Gauss–Newton step with Marquardt scaling (damping ∝ diag JᵀJ, so parameters of very
  different magnitudes, D0 ~ 1e4 and γ̇0 ~ 1e-4, are treated alike);
- :func:`_search`: trial steps tested with a cheap value-only pass before paying for the
  Jacobian, accepted on a decrease of χ² (:func:`is_decrease`), the damping updated by
  the gain ratio (:func:`damping_after_accept`, :func:`damping_after_reject`);
- five convergence tests: a scaled projected gradient < gtol (:func:`gradient_small`),
  the χ² decrease a full Gauss–Newton step would bring < dchi2_tol
  (:func:`newton_decrement`), a relative χ² decrease < ftol on an accepted step
  (:func:`decrease_small`), a scaled step < xtol (:func:`step_small`), and a χ² that
  fell by less than flat_dchi2 over the last 20 iterations (the fit creeping along a
  valley the data do not determine: speckle-level data put the minimum of
  D0 t^alpha + D_offset or of the shear law far along it, and Gauss–Newton steps then
  shrink to a crawl; the identification verdict below says what the data fix);
- :func:`~homodyne_steps.inference.valley.valley_jump`: every 20 iterations, the last
  window's displacement extrapolated in the power laws' rates coordinates, where that
  valley is nearly straight;
- :func:`_finish`: the covariance and the verdict.

Uncertainties: cov = (JᵀJ)⁻¹ · χ²_red over the free parameters (scipy's
``absolute_sigma=False`` convention: if σ is misestimated or the model misfits, the
errors grow with it instead of staying optimistic). Parameters the data do not determine
(:func:`homodyne_steps.inference.identification.identify`, judged with the power laws
in their rates coordinates, :func:`rates_transform`) get NaN covariance rows. A fit that
stopped on a convergence test with such parameters is ``not_identified``; one whose free
parameters never left the start values and that does not identify them is ``failed``.
Physical parameters the data fix only to within a large part of their bounds are listed
in ``weakly_identified`` (:func:`~homodyne_steps.inference.identification.weakly_identified`);
the status stays as the solver found it and the records and the summary carry the flag.

The damped step and the acceptance test are shared with the CMC shard's mode search
(:func:`homodyne_steps.inference.shard_mode.shard_mode`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import numpy as np

from homodyne_steps._jax import jnp
from homodyne_steps.inference.identification import identify, scaled_pinv, weakly_identified
from homodyne_steps.inference.likelihood import (
    FitData,
    Stats,
    accumulate,
    chi_squared,
    full_system,
    optimal_scaling,
    schur_theta,
)
from homodyne_steps.inference.nlsq_settings import SolverSettings
from homodyne_steps.inference.valley import valley_jump
from homodyne_steps.physics.coordinates import rates_jacobian
from homodyne_steps.physics.model import KernelGrid
from homodyne_steps.physics.scaling import ScalingMap


@dataclass
class FitResult:
    """Outcome of one fit; ``x`` holds θ then ψ (none for varpro)."""

    physical: np.ndarray
    psi: np.ndarray
    contrast: np.ndarray
    offset: np.ndarray
    chi_squared: float
    n_points: int
    n_fitted: int  # parameters counted in the degrees of freedom
    covariance: np.ndarray  # over (θ, contrast_0.., offset_0..) (full per-angle form)
    covariance_x: np.ndarray  # over the fitted vector x (θ, ψ)
    free: np.ndarray  # mask over x
    at_lower: np.ndarray
    at_upper: np.ndarray
    status: str
    reason: str
    iterations: int
    value_passes: int
    jacobian_passes: int
    history: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    gradient: np.ndarray | None = None
    not_identified: tuple[str, ...] = ()  # free parameters the data cannot fix
    weakly_identified: tuple[str, ...] = ()  # fixed by the data only to within the bounds
    information: np.ndarray | None = None  # JᵀJ over x, identified directions only

    @property
    def dof(self) -> int:
        return max(self.n_points - self.n_fitted, 1)

    @property
    def reduced_chi_squared(self) -> float:
        return self.chi_squared / self.dof

    @property
    def converged(self) -> bool:
        return self.status == "converged"


class Problem:
    """One fit: data, chunk blocks, scaling map, bounds, fixed mask."""

    def __init__(
        self,
        grid: KernelGrid,
        data: FitData,
        blocks: np.ndarray,
        n_points: int,
        n_phi: int,
        scaling: ScalingMap,
        lower: np.ndarray,
        upper: np.ndarray,
        fixed: np.ndarray,
        log_scale: np.ndarray | None = None,
        theta_names: tuple[str, ...] | None = None,
    ):
        self.grid, self.data, self.n_points, self.n_phi = grid, data, n_points, n_phi
        self.blocks = jnp.asarray(blocks)
        self.scaling = scaling
        self.varpro = scaling.mode == "varpro"
        self.lower, self.upper, self.fixed = lower, upper, fixed
        # Steps are taken in log x for these (D0, γ̇0): D0·t^alpha = const is a straight
        # line in (log D0, alpha) but a curved valley in (D0, alpha).
        self.log_scale = np.zeros(lower.size, bool) if log_scale is None else log_scale
        # Labels of θ then of the scaling (ψ; per-angle contrast and offset for varpro).
        p = lower.size - (0 if self.varpro else scaling.n_params)
        self.names = tuple(theta_names or (f"theta_{k}" for k in range(p))) + scaling.names
        self.value_passes = 0
        self.jacobian_passes = 0

    def stats(self, theta: np.ndarray, with_jacobian: bool) -> Stats:
        if with_jacobian:
            self.jacobian_passes += 1
        else:
            self.value_passes += 1
        return accumulate(theta, self.grid, self.data, self.blocks, with_jacobian)

    def split(self, x: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
        return x[:p], x[p:]

    def scaling_of(self, st: Stats, psi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return optimal_scaling(st) if self.varpro else self.scaling.per_angle(psi)

    def system(self, st: Stats, x: np.ndarray, p: int):
        """(χ², JᵀJ, Jᵀr) over x, and the per-angle scaling used."""
        theta, psi = self.split(x, p)
        c, o = self.scaling_of(st, psi)
        jtj, jtr = full_system(st, c, o)
        if self.varpro:
            a, g = schur_theta(jtj, jtr, p)
        else:
            t = np.zeros((jtj.shape[0], p + self.scaling.n_params))
            t[:p, :p] = np.eye(p)
            t[p:, p:] = self.scaling.matrix
            a, g = t.T @ jtj @ t, t.T @ jtr
        return chi_squared(st, c, o), a, g, (c, o, jtj)


# ---------------------------------------------------------------------------------------
# Solver parts
# ---------------------------------------------------------------------------------------
def in_log_coordinates(a, g, x, log_scale) -> tuple[np.ndarray, np.ndarray]:
    """JᵀJ and Jᵀr over u, u = log x on the log-scale entries (x elsewhere)."""
    jac_u = np.where(log_scale, x, 1.0)  # dx/du
    return a * np.outer(jac_u, jac_u), g * jac_u


def active_set(x, g, lo, hi) -> np.ndarray:
    """Parameters on a bound whose gradient pushes outward: held there this iteration."""
    return ((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0))


def marquardt_scale(diag: np.ndarray) -> np.ndarray:
    """The Marquardt scaling sqrt(diag), floored so that a zero diagonal stays finite."""
    return np.sqrt(np.clip(diag, 1e-300, None))


def scale_system(a: np.ndarray, g: np.ndarray, scale: np.ndarray):
    """(D⁻¹ a D⁻¹, D⁻¹ g) for D = diag(scale)."""
    return a / np.outer(scale, scale), g / scale


def damped_step(a_s: np.ndarray, g_s: np.ndarray, lam: float) -> np.ndarray:
    """The step s of (a_s + lam I) s = −g_s, in the scaled coordinates."""
    m = a_s + lam * np.eye(a_s.shape[0])
    try:
        return np.linalg.solve(m, -g_s)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(m, -g_s, rcond=None)[0]


def marquardt_step(a: np.ndarray, g: np.ndarray, lam: float) -> np.ndarray:
    """The damped Gauss–Newton step of system (a, g), damping lam · diag a."""
    scale = marquardt_scale(np.diag(a))
    a_s, g_s = scale_system(a, g, scale)
    return damped_step(a_s, g_s, lam) / scale


def apply_bounded_step(x, step, log_scale, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """x moved by ``step`` (in log x where ``log_scale``) and clipped to the bounds;
    returns the new x and the step actually taken, in the same internal units."""
    x_new = x + np.where(log_scale, 0.0, step)
    lin = ~log_scale
    x_new[lin] = np.clip(x_new[lin], lo[lin], hi[lin])
    du = x_new - x
    if log_scale.any():
        lx, llo, lhi = np.log(x[log_scale]), np.log(lo[log_scale]), np.log(hi[log_scale])
        u_new = np.clip(lx + step[log_scale], llo, lhi)  # clipping in log: no overflow
        # exp(log(bound)) can land one rounding step outside the bound: clip again.
        x_new[log_scale] = np.clip(np.exp(u_new), lo[log_scale], hi[log_scale])
        du[log_scale] = u_new - lx
    return x_new, du


def predicted_decrease(g_u, a_u, du) -> float:
    """Decrease of χ²/2 the quadratic model predicts for step ``du``."""
    return -(g_u @ du + 0.5 * du @ a_u @ du)


def is_decrease(f, f_new) -> bool:
    """A trial is accepted when its objective is finite and lower."""
    return bool(np.isfinite(f_new) and f - f_new > 0)


def damping_after_accept(lam: float, rho: float) -> float:
    """New damping after an accepted step with gain ratio ``rho`` (actual / predicted).

    Shrink fast on good steps: the degenerate D0–alpha–D_offset and γ̇0–beta–γ̇_offset
    valleys need nearly undamped Gauss–Newton steps.
    """
    lam = lam / 10.0 if rho > 0.75 else (lam * 2.0 if rho < 0.25 else lam)
    return max(lam, 1e-12)


def damping_after_reject(lam: float, nu: float) -> tuple[float, float]:
    """(damping, growth factor) after a rejected trial: the growth doubles each time."""
    return lam * nu, nu * 2.0


MAX_DAMPING = 1e16  # beyond this no step reduces χ²: the search gives up


def gradient_small(g_u, scale, free, chi2, gtol) -> bool:
    """gtol: the scaled projected gradient is below tolerance."""
    proj_grad = np.where(free, g_u / scale, 0.0)
    return bool(np.max(np.abs(proj_grad)) <= gtol * np.sqrt(max(chi2, 1e-300)))


def newton_decrement(g_u, a_u, free) -> float:
    """χ² decrease a full Gauss–Newton step would still bring: gᵀ A⁺ g over the free
    parameters; below dchi2_tol the point is within ~sqrt(dchi2_tol) standard deviations
    of the optimum. gᵀ A⁺ g ≥ 0 even where A is singular (D0 and D_offset are collinear
    at alpha = 0)."""
    return g_u[free] @ scaled_pinv(a_u[np.ix_(free, free)]) @ g_u[free]


def step_small(du, scale, chi2, xtol) -> bool:
    """xtol: the scaled step is below tolerance."""
    return bool(np.max(np.abs(du) * scale) <= xtol * np.sqrt(max(chi2, 1e-300)))


def decrease_small(chi2_prev, chi2, ftol) -> bool:
    """ftol: the relative χ² decrease of the accepted step is below tolerance."""
    return bool(chi2_prev - chi2 <= ftol * chi2)


class _Iterate(NamedTuple):
    """The current point: x, its statistics (with the Jacobian) and its system."""

    x: np.ndarray
    st: Stats
    chi2: float
    a: np.ndarray  # JᵀJ over x
    g: np.ndarray  # Jᵀr over x
    scaling: tuple  # (contrast, offset, full JᵀJ over (θ, contrast, offset))


def _evaluate(prob: Problem, x: np.ndarray, p: int, st: Stats | None = None) -> _Iterate:
    """The iterate at x: one Jacobian pass (unless ``st`` is given) and its system."""
    st = prob.stats(x[:p], with_jacobian=True) if st is None else st
    return _Iterate(x, st, *prob.system(st, x, p))


def _trial_chi2(prob: Problem, cur: _Iterate, x_new: np.ndarray, p: int) -> float:
    """χ² at a trial point from a value-only pass (none when only the scaling moved)."""
    if x_new[:p].tobytes() == cur.x[:p].tobytes():
        st_new = cur.st  # only the scaling moved: no data pass needed
    else:
        st_new = prob.stats(x_new[:p], with_jacobian=False)
    theta_psi = prob.split(x_new, p)
    return chi_squared(st_new, *prob.scaling_of(st_new, theta_psi[1]))


def _search(prob: Problem, cur: _Iterate, a_u, g_u, free, lam: float, nu: float, p: int):
    """Damped steps from ``cur``, the damping raised until one lowers χ².

    Returns (accepted, x_new, du, lam, nu); not accepted once the damping exceeds
    :data:`MAX_DAMPING`.
    """
    while True:
        step = np.zeros_like(cur.x)
        step[free] = marquardt_step(a_u[np.ix_(free, free)], g_u[free], lam)
        x_new, du = apply_bounded_step(cur.x, step, prob.log_scale, prob.lower, prob.upper)
        predicted = predicted_decrease(g_u, a_u, du)
        chi2_new = _trial_chi2(prob, cur, x_new, p)
        if is_decrease(cur.chi2, chi2_new):
            rho = (cur.chi2 - chi2_new) / max(2.0 * predicted, 1e-300)
            return True, x_new, du, damping_after_accept(lam, rho), 2.0
        lam, nu = damping_after_reject(lam, nu)
        if lam > MAX_DAMPING:
            return False, x_new, du, lam, nu


def levenberg_marquardt(
    prob: Problem, theta0: np.ndarray, psi0: np.ndarray, settings: SolverSettings | None = None
) -> FitResult:
    """Minimise χ² from (θ0, ψ0) within bounds; never raises on non-convergence. A run
    that reaches the iteration limit while sliding along a valley says so
    (:func:`drift_report`)."""
    settings = settings or SolverSettings()
    t_start = time.perf_counter()
    p = theta0.size
    x = np.concatenate([theta0, np.zeros(0) if prob.varpro else psi0]).astype(np.float64)
    x = np.clip(x, prob.lower, prob.upper)
    x_start = x.copy()
    st = prob.stats(x[:p], with_jacobian=True)
    t_first = time.perf_counter() - t_start
    cur = _evaluate(prob, x, p, st)
    history = [cur.chi2]
    recent = deque([cur.x], maxlen=DRIFT_WINDOW + 1)  # iterates behind the drift report
    lam, nu = settings.initial_damping, 2.0
    status, reason = "max_iterations", f"no convergence in {settings.max_iterations} iterations"
    iterations = 0
    if not np.isfinite(cur.chi2):
        status, reason = "failed", "χ² is not finite at the starting point"
    for iterations in range(1, settings.max_iterations + 1):  # noqa: B007
        if status == "failed":
            break
        a_u, g_u = in_log_coordinates(cur.a, cur.g, cur.x, prob.log_scale)
        free = ~prob.fixed & ~active_set(cur.x, cur.g, prob.lower, prob.upper)
        scale = marquardt_scale(np.diag(a_u))
        if gradient_small(g_u, scale, free, cur.chi2, settings.gtol):
            status, reason = "converged", "gtol: scaled projected gradient below tolerance"
            break
        if newton_decrement(g_u, a_u, free) <= settings.dchi2_tol:
            status = "converged"
            reason = f"dchi2: a Gauss–Newton step would lower χ² by < {settings.dchi2_tol:g}"
            break
        accepted, x_new, du, lam, nu = _search(prob, cur, a_u, g_u, free, lam, nu, p)
        if not accepted:
            status, reason = "stalled", "no step reduces χ² (damping exhausted)"
            break
        small = step_small(du, scale, cur.chi2, settings.xtol)
        chi2_prev = cur.chi2
        cur = _evaluate(prob, x_new, p)
        history.append(cur.chi2)
        recent.append(cur.x)
        if decrease_small(chi2_prev, cur.chi2, settings.ftol):
            status, reason = "converged", "ftol: relative χ² decrease below tolerance"
            break
        if small:
            status, reason = "converged", "xtol: scaled step below tolerance"
            break
        if iterations % DRIFT_WINDOW == 0 and len(recent) > DRIFT_WINDOW:
            jumped = valley_jump(
                cur.x, recent[0], cur.chi2, partial(_trial_chi2, prob, cur, p=p),
                prob.names[:p], prob.grid.t_safe, prob.lower, prob.upper, prob.fixed,
            )  # fmt: skip
            if jumped is not None:
                cur = _evaluate(prob, jumped, p)
                history.append(cur.chi2)
                recent.append(cur.x)
                continue
        if (
            len(history) > DRIFT_WINDOW
            and history[-DRIFT_WINDOW - 1] - cur.chi2 < settings.flat_dchi2
        ):
            status = "converged"
            reason = (
                f"flat: χ² fell by {history[-DRIFT_WINDOW - 1] - cur.chi2:.3g} over the last "
                f"{DRIFT_WINDOW} iterations (< {settings.flat_dchi2:g}): the parameters still "
                "moving do so along a valley the data do not determine"
            )
            break
    stop = (status, reason, iterations)
    result = _finish(prob, cur, p, x_start, stop, history, (t_start, t_first))
    if status == "max_iterations" and len(recent) > 1:
        result.reason += drift_report(result, recent[0], history[-len(recent)], prob.names[:p])
    return result


DRIFT_WINDOW = 20  # iterations over which a run that did not converge reports its drift


def drift_report(result: FitResult, x_earlier: np.ndarray, chi2_earlier: float, names) -> str:
    """Why a run did not converge: how much χ² still fell over the last iterations and
    which physical parameters moved most, in units of their σ. Creeping along a flat,
    curved valley (the data fix a combination such as D(t) or γ̇(t), not its parts)
    shows as a slow χ² decrease with parameters moving together."""
    p = len(names)
    sd = np.sqrt(np.abs(np.diag(result.covariance_x)))[:p]
    with np.errstate(divide="ignore", invalid="ignore"):
        moved = (result.physical - x_earlier[:p]) / sd
    order = [k for k in np.argsort(-np.abs(np.nan_to_num(moved))) if np.isfinite(moved[k])]
    steps = ", ".join(f"{names[k]} {moved[k]:+.2g}σ" for k in order[:3])
    return (
        f"; over its last iterations χ² still fell by {chi2_earlier - result.chi_squared:.3g} "
        f"(moving most: {steps or 'parameters without σ'}), a slow descent along a valley "
        "the data barely determine: more solver.max_iterations, fixed parameters or other "
        "initial_parameters may finish it"
    )


def _finish(prob: Problem, cur: _Iterate, p: int, x_start, stop, history, clock) -> FitResult:
    """The :class:`FitResult` at the final iterate: covariance, identification, verdict.

    ``stop`` is the solver's (status, reason, iterations), ``clock`` (start time, time of
    the first pass)."""
    status, reason, iterations = stop
    t_start, t_first = clock
    x, chi2, a = cur.x, cur.chi2, cur.a
    c, o, jtj_full = cur.scaling
    free = ~prob.fixed
    n_fitted = int(free.sum()) + (2 * prob.n_phi if prob.varpro else 0)
    red = chi2 / max(prob.n_points - n_fitted, 1)
    cov_x, cov_full, ident, names = _covariances(prob, x, a, jtj_full, free, red)
    not_identified = tuple(np.asarray(names)[ident.unidentified].tolist())
    moved = bool(np.any(x[free] != x_start[free]))
    status, reason = _verdict(status, reason, moved, not_identified, ident.why)
    total = time.perf_counter() - t_start
    return FitResult(
        physical=x[:p].copy(),
        psi=x[p:].copy(),
        contrast=c,
        offset=o,
        chi_squared=chi2,
        n_points=prob.n_points,
        n_fitted=n_fitted,
        covariance=cov_full,
        covariance_x=cov_x,
        free=free,
        at_lower=x <= prob.lower,
        at_upper=x >= prob.upper,
        status=status,
        reason=reason,
        iterations=iterations,
        value_passes=prob.value_passes,
        jacobian_passes=prob.jacobian_passes,
        history=history,
        timings={"first_pass_s": t_first, "total_s": total},
        gradient=cur.g,
        not_identified=not_identified,
        weakly_identified=_weak(prob, x, cov_x, p),
        information=_information(prob, a, jtj_full, free, p),
    )


def _weak(prob: Problem, x: np.ndarray, cov_x: np.ndarray, p: int) -> tuple[str, ...]:
    """Names of the physical parameters :func:`weakly_identified` flags."""
    sd = np.sqrt(np.abs(np.diag(cov_x)))[:p]
    weak = weakly_identified(x[:p], sd, prob.lower[:p], prob.upper[:p], prob.log_scale[:p])
    return tuple(np.asarray(prob.names[:p])[weak].tolist())


def information_at(prob: Problem, theta: np.ndarray):
    """(χ², JᵀJ over θ restricted to the directions identified there, contrast, offset)
    of a varpro problem at θ: one Jacobian pass."""
    assert prob.varpro, "information_at needs the varpro form (x = θ)"
    st = prob.stats(theta, with_jacobian=True)
    chi2, a, _, (c, o, jtj_full) = prob.system(st, theta, theta.size)
    return chi2, _information(prob, a, jtj_full, ~prob.fixed, theta.size), c, o


def rates_transform(prob: Problem, theta: np.ndarray, size: int, free: np.ndarray) -> np.ndarray:
    """∂x/∂u over the ``free`` of ``size`` parameters (θ first), u with each power law
    in its rates coordinates (:func:`rates_jacobian`): where identification is judged."""
    p = theta.size
    t = np.eye(size)
    t[:p, :p] = rates_jacobian(prob.names[:p], theta, prob.grid.t_safe, free[:p])
    return t[np.ix_(free, free)]


def _covariances(prob: Problem, x, a, jtj_full, free, red):
    """(cov over x, cov over (θ, contrast, offset), identification, its parameter names).

    varpro is judged on the full system (θ with every angle's contrast and offset, whose
    diagonal is raw sums), the other modes on the system of x; both in the power laws'
    rates coordinates (:func:`rates_transform`). NaN marks what is fixed or not
    identified, and what depends on it.
    """
    p = jtj_full.shape[0] - 2 * prob.n_phi
    cov_x = np.full((free.size, free.size), np.nan)
    if prob.varpro:
        full_free = np.r_[free, np.ones(2 * prob.n_phi, bool)]
        to_u = rates_transform(prob, x[:p], jtj_full.shape[0], full_free)
        ident = identify(jtj_full[np.ix_(full_free, full_free)], red, transform=to_u)
        cov_full = np.full(jtj_full.shape, np.nan)
        cov_full[np.ix_(full_free, full_free)] = ident.covariance(red)
        cov_x[np.ix_(free, free)] = cov_full[:p, :p][np.ix_(free, free)]
        return cov_x, cov_full, ident, [n for n, f in zip(prob.names, full_free, strict=True) if f]
    to_u = rates_transform(prob, x[:p], free.size, free)
    ident = identify(a[np.ix_(free, free)], red, transform=to_u)
    cov_x[np.ix_(free, free)] = ident.covariance(red)
    t = np.zeros((jtj_full.shape[0], free.size))
    t[:p, :p] = np.eye(p)
    t[p:, p:] = prob.scaling.matrix
    cov_full = t @ np.nan_to_num(cov_x) @ t.T
    unknown = np.any(t[:, ~np.isfinite(np.diag(cov_x))] != 0, axis=1)
    cov_full[unknown, :] = np.nan
    cov_full[:, unknown] = np.nan
    return cov_x, cov_full, ident, [n for n, f in zip(prob.names, free, strict=True) if f]


def _information(prob: Problem, a, jtj_full, free, p) -> np.ndarray:
    """JᵀJ over x restricted to the directions the fit identifies (0 elsewhere).

    For varpro ``a`` is the Schur complement (the scaling profiled out), normalised by
    the diagonal before elimination (:func:`identify`).
    """
    scale = np.sqrt(np.clip(np.diag(jtj_full)[:p], 0.0, None))[free[:p]] if prob.varpro else None
    info = np.zeros_like(a)
    info[np.ix_(free, free)] = identify(a[np.ix_(free, free)], scale=scale).information
    return info


def _verdict(status, reason, moved, not_identified, why) -> tuple[str, str]:
    """The final status: a stop on a convergence test is ``converged`` only if the data
    identify every free parameter; ``not_identified`` names those they do not (``failed``
    when the parameters never left the start). A start that already is an identified
    optimum stays converged."""
    if not not_identified:
        if status == "converged" and not moved:
            reason += "; the start values are already an optimum"
        return status, reason
    what = f"the data do not determine {', '.join(not_identified)} ({why})"
    if status != "converged":
        return status, f"{reason}; {what}"
    if not moved:
        return "failed", f"never moved from the start values: {what}"
    return "not_identified", f"{what}; the solver stopped on {reason}"


def describe(result: FitResult) -> dict[str, Any]:
    return {
        "status": result.status,
        "reason": result.reason,
        "iterations": result.iterations,
        "chi_squared": result.chi_squared,
        "reduced_chi_squared": result.reduced_chi_squared,
    }
