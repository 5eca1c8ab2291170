"""The physics kernel against an independent NumPy implementation and exact cases."""

import math

import numpy as np
import pytest

from homodyne_steps._jax import jax, jnp
from homodyne_steps.errors import ModelInputError, ParameterError
from homodyne_steps.physics.model import (
    c2_matrix,
    c2_pairs,
    c2_pairs_jacobian,
    compute_c2,
    make_grid,
    upper_triangle_pairs,
)
from homodyne_steps.physics.registry import REGISTRY

Q, L = 0.0054, 2e6
STATIC = ("D0", "alpha", "D_offset")
LAMINAR = STATIC + ("gamma_dot_t0", "beta", "gamma_dot_t_offset", "phi0")


def reference_c2(p, t, phi_deg, q, L, contrast, offset, shear="homodyne", integral="trapezoid"):
    """The equations of shared/spec/physics.md written out directly with NumPy loops:
    the seed's form (homodyne shear, trapezoid) or the physical one (exact integrals)."""
    p = [float(x) for x in p]
    n = len(t)
    dt = t[1] - t[0]
    eps = max(dt / 2, 1e-8)
    ts = np.array([x if x > eps else eps for x in t])

    def integral_of(amp, expo, off):
        """∫_{t_0}^{t_k} (amp s^expo + off) ds in index units (÷ dt)."""
        if integral == "trapezoid":
            f = amp * ts**expo + off
            out = np.zeros(n)
            for k in range(1, n):
                out[k] = out[k - 1] + 0.5 * (f[k - 1] + f[k])
            return out
        a = expo + 1.0
        if abs(a) < 1e-12:
            prim = amp * np.log(ts) + off * ts
        else:
            prim = amp * ts**a / a + off * ts
        # below eps the power law is held at its value at eps: integrate that exactly
        prim = prim + (amp * eps**expo + off) * np.minimum(t, eps)
        return (prim - prim[0]) / dt

    i_d = integral_of(p[0], p[1], p[2])
    delta_d = np.abs(i_d[None, :] - i_d[:, None])
    g1 = np.exp(np.clip(-(0.5 * q**2 * dt) * delta_d, -700.0, 0.0))
    g1 = np.broadcast_to(g1, (len(phi_deg), n, n)).copy()
    if len(p) == 7:
        i_g = integral_of(p[3], p[4], p[5])
        delta_g = np.abs(i_g[None, :] - i_g[:, None])
        factor = q * L / (2 * math.pi) if shear == "homodyne" else q * L / 2
        for k, phi in enumerate(phi_deg):
            x = (factor * dt) * math.cos(math.radians(p[6] - phi)) * delta_g
            with np.errstate(invalid="ignore", divide="ignore"):
                sinc = np.where(np.abs(x) < 1e-4, 1 - x**2 / 6 + x**4 / 120, np.sin(x) / x)
            g1[k] *= sinc**2 if shear == "homodyne" else np.abs(sinc)
    g1 = np.where(g1 > 1e-10, g1, 1e-10)
    contrast = np.broadcast_to(np.asarray(contrast, float), (len(phi_deg),))
    offset = np.broadcast_to(np.asarray(offset, float), (len(phi_deg),))
    return offset[:, None, None] + contrast[:, None, None] * g1**2


def random_params(rng, names):
    """Random values inside the registry bounds (log-uniform for the positive scales)."""
    out = {}
    for name in names:
        lo, hi = REGISTRY[name].bounds
        if name in ("D0", "gamma_dot_t0"):
            out[name] = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        elif name in ("alpha", "beta"):
            out[name] = float(rng.uniform(-1.0, 1.0))  # keeps t^alpha finite-ish on 1e-2..1e2 s
        else:
            out[name] = float(rng.uniform(lo, hi))
    return out


GRIDS = [
    (20, 0.1, (0.0,)),
    (57, 0.5, (-30.0, 0.0, 45.0, 90.0)),
    (120, 0.01, (10.0, 170.0, -95.0)),
]


MODELS = [("homodyne", "trapezoid", 1e-12), ("physical", "exact", 1e-9),
          ("physical", "trapezoid", 1e-12), ("homodyne", "exact", 1e-9)]  # fmt: skip


@pytest.mark.parametrize("names", [STATIC, LAMINAR], ids=["static", "laminar_flow"])
@pytest.mark.parametrize("n_t,dt,phi", GRIDS)
@pytest.mark.parametrize("shear,integral,rtol", MODELS, ids=[f"{a}-{b}" for a, b, _ in MODELS])
def test_kernel_matches_independent_numpy(names, n_t, dt, phi, shear, integral, rtol):
    """The seed's form (homodyne, trapezoid) to 1e-12, as the reference package computes
    it; the exact integrals to 1e-9 (the kernel's log/expm1 form of t^(a+1)/(a+1) rounds
    differently from the direct power)."""
    rng = np.random.default_rng(n_t + len(names))
    t = dt * np.arange(n_t)
    for _ in range(4):
        params = random_params(rng, names)
        contrast = rng.uniform(0.05, 0.9, size=len(phi))
        offset = rng.uniform(0.8, 1.2, size=len(phi))
        got = compute_c2(params, t=t, phi_deg=np.array(phi), q=Q, L=L, contrast=contrast,
                         offset=offset, shear=shear, integral=integral)  # fmt: skip
        want = reference_c2([params[n] for n in names], t, phi, Q, L, contrast, offset,
                            shear=shear, integral=integral)  # fmt: skip
        assert got.shape == (len(phi), n_t, n_t) and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=rtol, atol=0)


def test_exact_integral_matches_quadrature_where_the_trapezoid_does_not():
    """alpha < 0: the trapezoid over-counts the first frames (t^alpha is steep there);
    the exact integral equals adaptive quadrature."""
    from scipy.integrate import quad

    t = 0.1 * np.arange(1, 40)
    d = {"D0": 1e4, "alpha": -0.8, "D_offset": 100.0}
    kw = dict(t=t, phi_deg=[0.0], q=Q, L=L, contrast=0.5, offset=1.0)
    exact = (compute_c2(d, integral="exact", **kw)[0] - 1.0) / 0.5  # g1²
    trap = (compute_c2(d, integral="trapezoid", **kw)[0] - 1.0) / 0.5
    for i, j in [(0, 1), (0, 5), (3, 30)]:
        area = quad(lambda s: d["D0"] * s ** d["alpha"] + d["D_offset"], t[i], t[j])[0]
        assert exact[i, j] == pytest.approx(math.exp(-(Q**2) * area), rel=1e-9)
    # first-frame pairs: the trapezoid is off by far more than the quadrature's error
    assert abs(trap[0, 1] - exact[0, 1]) > 1e-3 * exact[0, 1]


def test_constant_rates_make_both_integrals_equal():
    t = 0.1 * np.arange(1, 50)
    p = {"D0": 2e4, "alpha": 0.0, "D_offset": 300.0, "gamma_dot_t0": 1e-3, "beta": 0.0,
         "gamma_dot_t_offset": 2e-4, "phi0": 10.0}  # fmt: skip
    kw = dict(t=t, phi_deg=[0.0, 40.0], q=Q, L=L)
    np.testing.assert_allclose(
        compute_c2(p, integral="exact", **kw), compute_c2(p, integral="trapezoid", **kw), rtol=1e-10
    )


def test_small_shear_seed_rate_is_pi_over_root_two_times_the_physical_one():
    """sinc²(Ψ) ≈ 1 − Ψ²/3 and sinc⁴(Φ) ≈ 1 − 2Φ²/3 agree when γ̇_seed = (π/√2) γ̇_phys."""
    t = 0.1 * np.arange(1, 60)
    base = {"D0": 100.0, "alpha": 0.0, "D_offset": 0.0, "beta": 0.0, "gamma_dot_t_offset": 0.0,
            "phi0": 0.0}  # fmt: skip
    rate = 2e-6  # Ψ ≲ 0.065 over the window: the quadratic terms dominate
    kw = dict(t=t, phi_deg=[0.0], q=Q, L=L, contrast=0.5, offset=1.0, check_bounds=False)
    physical = compute_c2(base | {"gamma_dot_t0": rate}, shear="physical", **kw)
    seed = compute_c2(base | {"gamma_dot_t0": rate * math.pi / math.sqrt(2)}, shear="homodyne",
                      **kw)  # fmt: skip
    static = compute_c2({k: base[k] for k in ("D0", "alpha", "D_offset")}, **kw)
    shear_decay = static - physical
    assert shear_decay.max() > 1e-4  # the shear matters ...
    # ... equally in both, up to the quartic terms (relative size ~ Ψ² ~ 4e-3)
    assert np.max(np.abs(seed - physical)) < 1e-2 * shear_decay.max()


def test_unknown_model_names_are_errors():
    t = 0.1 * np.arange(5)
    with pytest.raises(ModelInputError, match="shear must be one of"):
        compute_c2({"D0": 1e4, "alpha": 0.0, "D_offset": 0.0}, t=t, phi_deg=[0.0], q=Q, L=L,
                   shear="sinc4")  # fmt: skip
    with pytest.raises(ModelInputError, match="integral must be one of"):
        make_grid(t, [0.0], Q, L, integral="simpson")


def test_pure_diffusion_is_single_exponential():
    """alpha = 0, D_offset = 0 => g1 = exp(-0.5 q² D0 |t2 - t1|) (trapezoid is exact)."""
    t = 0.1 * np.arange(80)
    d0 = 3e4
    c2 = compute_c2({"D0": d0, "alpha": 0.0, "D_offset": 0.0}, t=t, phi_deg=[0.0], q=Q, L=L,
                    contrast=0.4, offset=1.0)[0]  # fmt: skip
    lag = np.abs(t[None, :] - t[:, None])
    g1 = np.exp(-0.5 * Q**2 * d0 * lag)
    np.testing.assert_allclose(c2, 1.0 + 0.4 * g1**2, rtol=1e-12)


def test_zero_shear_equals_static():
    t = 0.1 * np.arange(60)
    phi = np.array([-30.0, 0.0, 60.0])
    diff = {"D0": 2e4, "alpha": -0.3, "D_offset": 800.0}
    flow = diff | {"gamma_dot_t0": 0.0, "beta": 0.4, "gamma_dot_t_offset": 0.0, "phi0": 4.0}
    static = compute_c2(diff, t=t, phi_deg=phi, q=Q, L=L, contrast=0.3, offset=1.0)
    laminar = compute_c2(flow, t=t, phi_deg=phi, q=Q, L=L, contrast=0.3, offset=1.0,
                         check_bounds=False)  # fmt: skip
    # (the two modes compile separately: XLA may round the last bit differently)
    np.testing.assert_allclose(laminar, static, rtol=1e-14, atol=0)


def test_perpendicular_to_flow_has_no_shear_decay():
    t = 0.1 * np.arange(60)
    diff = {"D0": 2e4, "alpha": -0.3, "D_offset": 800.0}
    flow = diff | {"gamma_dot_t0": 0.05, "beta": 0.2, "gamma_dot_t_offset": 1e-3, "phi0": 5.0}
    phi = np.array([95.0, -85.0, 5.0])  # phi - phi0 = ±90° for the first two
    static = compute_c2(diff, t=t, phi_deg=phi, q=Q, L=L)
    laminar = compute_c2(flow, t=t, phi_deg=phi, q=Q, L=L)
    np.testing.assert_allclose(laminar[:2], static[:2], rtol=1e-12)
    # ...while along the flow the shear decay is strong: the test can tell them apart.
    assert np.max(static[2] - laminar[2]) > 0.05


@pytest.mark.parametrize("names", [STATIC, LAMINAR], ids=["static", "laminar_flow"])
def test_symmetry_diagonal_and_range(names):
    rng = np.random.default_rng(7)
    t = 0.2 * np.arange(90)
    phi = np.array([-30.0, 0.0, 30.0, 60.0])
    contrast = np.array([0.2, 0.3, 0.4, 0.5])
    offset = np.array([0.9, 1.0, 1.05, 1.1])
    for _ in range(3):
        c2 = compute_c2(random_params(rng, names), t=t, phi_deg=phi, q=Q, L=L,
                        contrast=contrast, offset=offset)  # fmt: skip
        np.testing.assert_array_equal(c2, np.swapaxes(c2, 1, 2))
        diag = np.diagonal(c2, axis1=1, axis2=2)
        np.testing.assert_allclose(diag, np.broadcast_to((offset + contrast)[:, None], diag.shape),
                                   rtol=1e-15)  # fmt: skip
        assert np.all(c2 >= offset[:, None, None]) and np.all(
            c2 <= (offset + contrast)[:, None, None]
        )


def test_pairs_are_a_gather_of_the_matrix_view():
    t = 0.1 * np.arange(40)
    phi = np.array([-30.0, 0.0, 30.0])
    params = {"D0": 1e4, "alpha": -0.2, "D_offset": 500.0, "gamma_dot_t0": 2e-4, "beta": 0.25,
              "gamma_dot_t_offset": 2e-5, "phi0": 3.0}  # fmt: skip
    _, p = REGISTRY.physical_vector(params)
    grid = make_grid(t, phi, Q, L)
    contrast, offset = jnp.array([0.3, 0.35, 0.4]), jnp.array([1.0, 1.01, 0.99])
    full = np.asarray(c2_matrix(jnp.asarray(p), contrast, offset, grid))
    i, j, a = upper_triangle_pairs(len(t), len(phi))
    assert i.size == len(phi) * len(t) * (len(t) - 1) // 2 and np.all(i < j)
    pairs = np.asarray(c2_pairs(jnp.asarray(p), contrast, offset, grid, i, j, a))
    np.testing.assert_array_equal(pairs, full[a, i, j])


@pytest.mark.parametrize(
    "params",
    [
        {"D0": 1.5e4, "alpha": -0.3, "D_offset": 900.0},
        {"D0": 1e4, "alpha": -0.2, "D_offset": 500.0, "gamma_dot_t0": 2e-4, "beta": 0.25,
         "gamma_dot_t_offset": 2e-5, "phi0": 3.0},
    ],
    ids=["static", "laminar_flow"],
)  # fmt: skip
def test_jacobian_matches_central_differences(params):
    t = 0.1 * (1 + np.arange(60))  # starts at dt, as after t = 0 exclusion
    phi = np.array([-30.0, 0.0, 30.0, 90.0])
    grid = make_grid(t, phi, Q, L)
    i, j, a = (jnp.asarray(x) for x in upper_triangle_pairs(len(t), len(phi)))
    _, p0 = REGISTRY.physical_vector(params)
    contrast, offset = jnp.array([0.3, 0.32, 0.28, 0.31]), jnp.array([1.0, 1.02, 0.98, 1.0])

    def f(p):
        return np.asarray(c2_pairs(jnp.asarray(p), contrast, offset, grid, i, j, a))

    value, jac_p, g1_sq = (np.asarray(x) for x in c2_pairs_jacobian(
        jnp.asarray(p0), contrast, offset, grid, i, j, a))  # fmt: skip
    np.testing.assert_allclose(value, f(p0), rtol=1e-14)
    for k in range(p0.size):
        h = 1e-5 * max(abs(p0[k]), 1e-3)
        up, down = p0.copy(), p0.copy()
        up[k] += h
        down[k] -= h
        fd = (f(up) - f(down)) / (2 * h)
        scale = np.max(np.abs(fd))
        assert scale > 0, f"parameter {k} has no effect: the test would be vacuous"
        np.testing.assert_allclose(jac_p[:, k], fd, rtol=1e-6, atol=1e-7 * scale)
    # c2 is linear in contrast/offset: dc2/dcontrast of a point is g1² in its own angle.
    a_np = np.asarray(a)
    g1_sq_fd = (f(p0) - np.asarray(offset)[a_np]) / np.asarray(contrast)[a_np]
    # (c2 - offset) cancels: absolute rounding ~1e-16 / contrast
    np.testing.assert_allclose(g1_sq, g1_sq_fd, rtol=1e-10, atol=1e-14)


def test_grad_of_chi_squared_matches_central_differences():
    t = 0.1 * (1 + np.arange(50))
    phi = np.array([0.0, 45.0])
    grid = make_grid(t, phi, Q, L)
    i, j, a = (jnp.asarray(x) for x in upper_triangle_pairs(len(t), len(phi)))
    contrast, offset = jnp.array([0.3, 0.3]), jnp.array([1.0, 1.0])
    p_true = jnp.array([1e4, -0.2, 500.0, 2e-4, 0.25, 2e-5, 3.0])
    data = c2_pairs(p_true, contrast, offset, grid, i, j, a)

    def chi2(p):
        r = (c2_pairs(p, contrast, offset, grid, i, j, a) - data) / 0.01
        return jnp.sum(r * r)

    p0 = np.array([1.3e4, -0.1, 300.0, 3e-4, 0.2, 1e-5, 1.0])
    g = np.asarray(jax.grad(chi2)(jnp.asarray(p0)))
    for k in range(p0.size):
        h = 1e-6 * abs(p0[k])
        e = np.zeros_like(p0)
        e[k] = h
        fd = (float(chi2(jnp.asarray(p0 + e))) - float(chi2(jnp.asarray(p0 - e)))) / (2 * h)
        assert g[k] == pytest.approx(fd, rel=1e-6)


def test_bad_inputs_give_clear_errors():
    t = 0.1 * np.arange(10)
    good = {"D0": 1e4, "alpha": 0.0, "D_offset": 0.0}
    with pytest.raises(ParameterError, match="D0.*outside its bounds"):
        compute_c2(good | {"D0": 1e9}, t=t, phi_deg=[0.0], q=Q, L=L)
    with pytest.raises(ParameterError, match="cannot infer the analysis mode"):
        compute_c2({"D0": 1e4, "alpha": 0.0}, t=t, phi_deg=[0.0], q=Q, L=L)
    with pytest.raises(ParameterError, match="unknown parameter 'D1'"):
        compute_c2(good | {"D1": 1.0}, t=t, phi_deg=[0.0], q=Q, L=L)
    with pytest.raises(ModelInputError, match="uniformly spaced"):
        compute_c2(good, t=np.r_[t, 5.0], phi_deg=[0.0], q=Q, L=L)
    with pytest.raises(ModelInputError, match="q must be a finite number > 0"):
        compute_c2(good, t=t, phi_deg=[0.0], q=-1.0, L=L)
    with pytest.raises(ModelInputError, match="disagrees"):
        compute_c2(good, t=t, phi_deg=[0.0], q=Q, L=L, dt=0.2)
    with pytest.raises(ParameterError, match="contrast.*one value per angle"):
        compute_c2(good, t=t, phi_deg=[0.0, 1.0], q=Q, L=L, contrast=[0.1, 0.2, 0.3])
    with pytest.raises(ParameterError, match="offset.*outside its bounds"):
        compute_c2(good, t=t, phi_deg=[0.0], q=Q, L=L, offset=3.0)
