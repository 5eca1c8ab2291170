r"""The homodyne model under laminar flow: the one physics kernel of the package.

Equations (``shared/spec/physics.md``; ``docs/model.md`` has the derivation)::

    D(t)   = D0 t^alpha + D_offset                        [Å²/s]
    γ̇(t)   = gamma_dot_t0 t^beta + gamma_dot_t_offset     [1/s]
    t_safe = max(t, eps), eps = max(dt/2, 1e-8)           (power laws at t = 0)

    g1_diff(i, j) = exp(clip(-(q²/2) |∫_{t_i}^{t_j} D dt|, -700, 0))
    c2 = offset + contrast g1²,   g1 = max(g1_diff g1_shear, 1e-10)

Two shear forms (``shear=``), the same diffusion factor in both:

    physical:  g1_shear = |sinc(Ψ)|,  Ψ = (q L / 2)  cos(phi0 - φ) ∫ γ̇ dt   (c2 carries sinc²)
    homodyne:  g1_shear = sinc(Φ)²,   Φ = (q L / 2π) cos(phi0 - φ) ∫ γ̇ dt   (c2 carries sinc⁴)

``physical`` is a uniform velocity gradient across the gap L (first principles).
``homodyne`` is the seed's and the reference package's form. Two integrals
(``integral=``): ``exact`` evaluates the power laws' antiderivatives; ``trapezoid`` is
the cumulative trapezoid on the grid, as the reference package does.
``shear="physical", integral="exact"`` is the default; ``shear="homodyne",
integral="trapezoid"`` reproduces the seed equations exactly.
Static mode has g1_shear = 1. sinc(x) = sin(x)/x, with its Taylor series for |x| < 1e-4.

Structure: :func:`g1_from_integrals` is the only place the equations live. It evaluates
g1 on arrays of index pairs ``(i, j)`` and angle indices ``a`` (any broadcastable shapes)
from the cumulative integrals. :func:`c2_pairs` (fitting and sampling), :func:`c2_matrix`
(full (n_phi, n_t, n_t) view) and :func:`compute_c2` (NumPy convenience) are gathers
over it. The analysis mode is the length of the physical parameter vector (3 or 7), a
trace-time constant, so each mode compiles once per array shape; the model choice is a
value in the grid, so switching it does not recompile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from homodyne_steps._jax import jax, jnp
from homodyne_steps.errors import ModelInputError
from homodyne_steps.physics.model_settings import (
    DEFAULT_INTEGRAL,
    DEFAULT_SHEAR,
    INTEGRALS,
    SHEAR_FORMS,
)
from homodyne_steps.physics.registry import REGISTRY, Registry

LOG_G1_MIN = -700.0  # exp(-700) ~ 1e-304: clip the exponent, not g1
G1_FLOOR = 1e-10
SINC_TAYLOR_BELOW = 1e-4
TIME_FLOOR_MIN = 1e-8  # s
N_STATIC = 3
N_LAMINAR = 7


class KernelGrid(NamedTuple):
    """Per-dataset constants of the kernel (a JAX pytree: new values do not recompile).

    Attributes:
        t_safe: (n_t,) times in s, floored at ``max(dt/2, 1e-8)`` for the power laws.
        phi_deg: (n_phi,) scattering angles in degrees.
        diffusion_factor: ``0.5 q² dt`` in s/Å² · s (multiplies the index-unit ∫D).
        shear_factor: ``q L dt / 2`` (physical) or ``q L dt / (2π)`` (homodyne): multiplies
            the index-unit ∫γ̇.
        dt: the time step in s (turns exact integrals into index units).
        t_floor: ``eps``, the time below which the power laws are held at their value at
            ``eps``; ``t_below_floor``: ``min(t, eps)`` per frame (the exact integral of
            that held value over frames before ``eps``).
        shear_power: 1.0 (physical: g1_shear = |sinc|) or 2.0 (homodyne: sinc²).
        exact: 1.0 for the power laws' exact integrals, 0.0 for the trapezoid.
    """

    t_safe: jax.Array
    phi_deg: jax.Array
    diffusion_factor: jax.Array
    shear_factor: jax.Array
    dt: jax.Array
    t_floor: jax.Array
    t_below_floor: jax.Array
    shear_power: jax.Array
    exact: jax.Array


def check_model(shear: str, integral: str) -> tuple[str, str]:
    """``(shear, integral)`` checked against :data:`SHEAR_FORMS` and :data:`INTEGRALS`."""
    if shear not in SHEAR_FORMS:
        raise ModelInputError(f"shear must be one of {SHEAR_FORMS}, got {shear!r}")
    if integral not in INTEGRALS:
        raise ModelInputError(f"integral must be one of {INTEGRALS}, got {integral!r}")
    return shear, integral


def _positive_finite(name: str, value: object) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ModelInputError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise ModelInputError(f"{name} must be a finite number > 0, got {x}")
    return x


def infer_dt(t: np.ndarray, dt: float | None = None) -> float:
    """The uniform step of ``t`` in s (checked), or ``dt`` checked against ``t``."""
    t = np.asarray(t, dtype=np.float64)
    if t.ndim != 1 or t.size == 0:
        raise ModelInputError(f"t must be a non-empty 1-D array of times in s, got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ModelInputError("t contains NaN or Inf")
    if t.size < 2:
        if dt is None:
            raise ModelInputError("t has one point: pass dt explicitly")
        return _positive_finite("dt", dt)
    steps = np.diff(t)
    step = float(steps.mean())
    if not step > 0:
        raise ModelInputError("t must be increasing")
    # float32 input times carry ~1e-7 relative error; 1e-3 of a step still flags any
    # real non-uniformity (dropped frames, mixed strides).
    if np.max(np.abs(steps - step)) > 1e-3 * step:
        raise ModelInputError(
            f"t must be uniformly spaced; steps range from {steps.min():g} to {steps.max():g} s"
        )
    if dt is None:
        return step
    dt = _positive_finite("dt", dt)
    if abs(dt - step) > 1e-3 * step:
        raise ModelInputError(f"dt = {dt:g} s disagrees with the spacing of t ({step:g} s)")
    return dt


def make_grid(
    t: np.ndarray,
    phi_deg: np.ndarray,
    q: float,
    L: float,
    dt: float | None = None,
    *,
    shear: str = DEFAULT_SHEAR,
    integral: str = DEFAULT_INTEGRAL,
) -> KernelGrid:
    """Precompute the per-dataset constants (``t`` in s, ``q`` in 1/Å, ``L`` in Å) of the
    model ``shear`` / ``integral`` (see the module)."""
    check_model(shear, integral)
    t = np.asarray(t, dtype=np.float64)
    dt = infer_dt(t, dt)
    q = _positive_finite("q", q)
    L = _positive_finite("L", L)
    phi = np.asarray(phi_deg, dtype=np.float64)
    if phi.ndim == 0:
        phi = phi[None]
    if phi.ndim != 1 or phi.size == 0 or not np.all(np.isfinite(phi)):
        raise ModelInputError(
            f"phi_deg must be a non-empty 1-D array of finite angles, got {phi_deg!r}"
        )
    eps = max(dt / 2.0, TIME_FLOOR_MIN)
    t_safe = np.where(t > eps, t, eps)
    return KernelGrid(
        t_safe=jnp.asarray(t_safe),
        phi_deg=jnp.asarray(phi),
        diffusion_factor=jnp.asarray(0.5 * q * q * dt),
        shear_factor=jnp.asarray(
            q * L * dt / (2.0 * math.pi) if shear == "homodyne" else q * L * dt / 2.0
        ),
        dt=jnp.asarray(dt),
        t_floor=jnp.asarray(eps),
        t_below_floor=jnp.asarray(np.minimum(t, eps)),
        shear_power=jnp.asarray(2.0 if shear == "homodyne" else 1.0),
        exact=jnp.asarray(1.0 if integral == "exact" else 0.0),
    )


# ---------------------------------------------------------------------------------------
# The equations
# ---------------------------------------------------------------------------------------
def diffusion_coefficient(physical: jax.Array, t_safe: jax.Array) -> jax.Array:
    """D(t) = D0 t^alpha + D_offset in Å²/s."""
    return physical[0] * t_safe ** physical[1] + physical[2]


def shear_rate(physical: jax.Array, t_safe: jax.Array) -> jax.Array:
    """γ̇(t) = gamma_dot_t0 t^beta + gamma_dot_t_offset in 1/s (laminar_flow vector)."""
    return physical[3] * t_safe ** physical[4] + physical[5]


def cumulative_trapezoid(f: jax.Array) -> jax.Array:
    """I[k] = Σ_{m<k} (f[m] + f[m+1]) / 2, in grid-index units; I[0] = 0."""
    return jnp.concatenate([jnp.zeros((1,), f.dtype), jnp.cumsum(0.5 * (f[1:] + f[:-1]))])


def _exprel(x: jax.Array) -> jax.Array:
    """(eˣ − 1)/x, with its series near 0."""
    small = jnp.abs(x) < 1e-6
    x_safe = jnp.where(small, 1.0, x)
    return jnp.where(small, 1.0 + x / 2.0 + x * x / 6.0, jnp.expm1(x_safe) / x_safe)


def power_law_antiderivative(
    amplitude: jax.Array, exponent: jax.Array, offset: jax.Array, t_safe: jax.Array
) -> jax.Array:
    """F(t) with F' = amplitude t^exponent + offset (up to a constant), in value·s:
    amplitude (t^(e+1) − 1)/(e+1) + offset t, written as amplitude ln t · exprel((e+1) ln t)
    so that e = −1 (amplitude ln t) needs no special case."""
    log_t = jnp.log(t_safe)
    return amplitude * log_t * _exprel((exponent + 1.0) * log_t) + offset * t_safe


def _cumulative(amplitude, exponent, offset, grid: KernelGrid) -> jax.Array:
    """∫_{t_0}^{t_k} (amplitude t^exponent + offset) dt in grid-index units (÷ dt): exact
    or the trapezoid, as the grid says. Both integrate the power law held at its value at
    ``t_floor`` below it (t = 0 frames), the exact one exactly."""
    trapezoid = cumulative_trapezoid(amplitude * grid.t_safe**exponent + offset)
    held = amplitude * grid.t_floor**exponent + offset
    f = power_law_antiderivative(amplitude, exponent, offset, grid.t_safe)
    f = f + held * grid.t_below_floor
    exact = (f - f[0]) / grid.dt
    return jnp.where(grid.exact > 0.5, exact, trapezoid)


def sinc_unnormalised(x: jax.Array) -> jax.Array:
    """sin(x)/x with its Taylor series near 0 (value and gradient continuous, no NaN)."""
    small = jnp.abs(x) < SINC_TAYLOR_BELOW
    x_safe = jnp.where(small, 1.0, x)  # keeps the untaken branch's gradient finite
    x2 = x * x
    return jnp.where(small, 1.0 - x2 / 6.0 + x2 * x2 / 120.0, jnp.sin(x_safe) / x_safe)


def cumulative_integrals(physical: jax.Array, grid: KernelGrid) -> tuple[jax.Array, jax.Array]:
    """(I_D, I_γ) on the grid in index units; I_γ is zeros in static mode."""
    i_d = _cumulative(physical[0], physical[1], physical[2], grid)
    if physical.shape[0] == N_LAMINAR:
        i_g = _cumulative(physical[3], physical[4], physical[5], grid)
    else:
        i_g = jnp.zeros_like(i_d)
    return i_d, i_g


def g1_from_integrals(
    physical: jax.Array,
    i_d: jax.Array,
    i_g: jax.Array,
    grid: KernelGrid,
    i: jax.Array,
    j: jax.Array,
    a: jax.Array,
) -> jax.Array:
    """g1 at time-index pairs (i, j) and angle indices a (broadcastable integer arrays).

    The core of the model; every other evaluation is a gather over this function.
    """
    log_g1 = jnp.clip(-grid.diffusion_factor * jnp.abs(i_d[j] - i_d[i]), LOG_G1_MIN, 0.0)
    g1 = jnp.exp(log_g1)
    if physical.shape[0] == N_LAMINAR:
        cos_angle = jnp.cos(jnp.deg2rad(physical[6] - grid.phi_deg))
        phase = grid.shear_factor * cos_angle[a] * jnp.abs(i_g[j] - i_g[i])
        sinc = sinc_unnormalised(phase)
        g1 = g1 * jnp.where(grid.shear_power > 1.5, sinc * sinc, jnp.abs(sinc))
    return jnp.where(g1 > G1_FLOOR, g1, G1_FLOOR)


def _check_vector(physical: jax.Array) -> None:
    if physical.ndim != 1 or physical.shape[0] not in (N_STATIC, N_LAMINAR):
        raise ModelInputError(
            f"physical parameter vector must have {N_STATIC} (static) or {N_LAMINAR} "
            f"(laminar_flow) entries, got shape {physical.shape}"
        )


def _g1_pairs(physical, grid, i, j, a):
    _check_vector(physical)
    i_d, i_g = cumulative_integrals(physical, grid)
    return g1_from_integrals(physical, i_d, i_g, grid, i, j, a)


def _c2_and_g1_sq(physical, contrast, offset, grid, i, j, a):
    g1 = _g1_pairs(physical, grid, i, j, a)
    g1_sq = g1 * g1
    return offset[a] + contrast[a] * g1_sq, g1_sq


def _c2_pairs(physical, contrast, offset, grid, i, j, a):
    return _c2_and_g1_sq(physical, contrast, offset, grid, i, j, a)[0]


g1_pairs = jax.jit(_g1_pairs)
g1_pairs.__doc__ = "g1 at index pairs: ``g1_pairs(physical, grid, i, j, a)`` (jitted)."

c2_pairs = jax.jit(_c2_pairs)
c2_pairs.__doc__ = """c2 at index pairs (jitted): the fitters' and samplers' entry point.

``c2_pairs(physical, contrast, offset, grid, i, j, a)`` with ``physical`` (3,) or (7,)
in registry order, ``contrast``/``offset`` (n_phi,) per-angle scaling, ``i``/``j`` time
indices and ``a`` angle indices (same shape). Differentiable with ``jax.jacfwd``.
"""


def _c2_with_aux(physical, contrast, offset, grid, i, j, a):
    c2, g1_sq = _c2_and_g1_sq(physical, contrast, offset, grid, i, j, a)
    return c2, (c2, g1_sq)


@jax.jit
def c2_pairs_jacobian(
    physical: jax.Array,
    contrast: jax.Array,
    offset: jax.Array,
    grid: KernelGrid,
    i: jax.Array,
    j: jax.Array,
    a: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """c2 at index pairs with its forward-mode Jacobian (one pass, jitted).

    Returns ``(c2 (N,), dc2/dphysical (N, n_params), g1² (N,))``. The scaling
    derivatives are not materialised as dense (N, n_phi) blocks: dc2/dcontrast of a
    point is ``g1²`` in its own angle ``a`` (0 elsewhere), dc2/doffset is 1 there.
    """
    jac, (c2, g1_sq) = jax.jacfwd(_c2_with_aux, has_aux=True)(
        physical, contrast, offset, grid, i, j, a
    )
    return c2, jac, g1_sq


def _g1_sq_with_aux(physical, grid, i, j, a):
    g1 = _g1_pairs(physical, grid, i, j, a)
    g1_sq = g1 * g1
    return g1_sq, g1_sq


def g1_sq_and_jacobian(
    physical: jax.Array, grid: KernelGrid, i: jax.Array, j: jax.Array, a: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """g1² at index pairs and its Jacobian d(g1²)/dphysical (N, n_params), one pass.

    Not jitted: fitters call it inside their own compiled loops. Because c2 is linear in
    (contrast, offset), fitters accumulate statistics of g1² and apply any scaling later.
    """
    jac, g1_sq = jax.jacfwd(_g1_sq_with_aux, has_aux=True)(physical, grid, i, j, a)
    return g1_sq, jac


def g1_sq(
    physical: jax.Array, grid: KernelGrid, i: jax.Array, j: jax.Array, a: jax.Array
) -> jax.Array:
    """g1² at index pairs (not jitted; for use inside compiled loops)."""
    g1 = _g1_pairs(physical, grid, i, j, a)
    return g1 * g1


@jax.jit
def c2_matrix(
    physical: jax.Array, contrast: jax.Array, offset: jax.Array, grid: KernelGrid
) -> jax.Array:
    """The full (n_phi, n_t, n_t) c2, as a broadcast gather over the pair kernel."""
    idx = jnp.arange(grid.t_safe.shape[0])
    a = jnp.arange(grid.phi_deg.shape[0])[:, None, None]
    return _c2_pairs(physical, contrast, offset, grid, idx[None, :, None], idx[None, None, :], a)


def upper_triangle_pairs(n_t: int, n_phi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index arrays (i, j, a) of every t1 < t2 pair of every angle (diagonal excluded).

    Angle-major order: all pairs of angle 0, then angle 1, ... (int32).
    """
    i, j = np.triu_indices(n_t, k=1)
    n_pairs = i.size
    a = np.repeat(np.arange(n_phi, dtype=np.int32), n_pairs)
    return (
        np.tile(i.astype(np.int32), n_phi),
        np.tile(j.astype(np.int32), n_phi),
        a,
    )


def compute_c2(
    params: Mapping[str, float] | Sequence[float] | np.ndarray,
    *,
    t: np.ndarray,
    phi_deg: np.ndarray,
    q: float,
    L: float,
    contrast: float | Sequence[float] | np.ndarray | None = None,
    offset: float | Sequence[float] | np.ndarray | None = None,
    mode: str | None = None,
    dt: float | None = None,
    registry: Registry = REGISTRY,
    check_bounds: bool = True,
    shear: str = DEFAULT_SHEAR,
    integral: str = DEFAULT_INTEGRAL,
) -> np.ndarray:
    """c2(phi, t1, t2) of the homodyne model as a NumPy float64 array.

    Args:
        params: physical parameters, name -> value (3 names for static, 7 for
            laminar_flow; the mode is inferred from the names unless ``mode`` is given)
            or a vector in registry order.
        t: (n_t,) uniform times in s.
        phi_deg: (n_phi,) scattering angles in degrees.
        q: wavevector in 1/Å.  L: stator–rotor gap in Å.
        contrast, offset: scalar or (n_phi,); registry defaults when omitted.
        dt: time step in s (inferred from ``t`` when omitted; checked against it).
        check_bounds: reject parameters outside the registry bounds.
        shear: ``"physical"`` (the default) or ``"homodyne"`` (the seed's sinc⁴ form).
        integral: ``"exact"`` (the default) or ``"trapezoid"`` (the seed's).

    Returns:
        (n_phi, n_t, n_t) symmetric float64 array.
    """
    _, physical = registry.physical_vector(params, mode, check_bounds=check_bounds)
    grid = make_grid(t, phi_deg, q, L, dt, shear=shear, integral=integral)
    n_phi = grid.phi_deg.shape[0]
    contrast_v = registry.per_angle_vector(
        "contrast", registry["contrast"].default if contrast is None else contrast, n_phi
    )
    offset_v = registry.per_angle_vector(
        "offset", registry["offset"].default if offset is None else offset, n_phi
    )
    out = c2_matrix(jnp.asarray(physical), jnp.asarray(contrast_v), jnp.asarray(offset_v), grid)
    return np.asarray(out, dtype=np.float64)
