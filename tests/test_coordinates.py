"""The rates coordinates of the power laws: exact inverse and the Jacobian the prior needs."""

import numpy as np
import pytest

from homodyne_steps.physics.coordinates import (
    POWER_LAWS,
    from_rates,
    power_law_from_rates,
    rates_from_power_law,
    rates_jacobian,
    split_times,
    to_rates,
)
from homodyne_steps.physics.registry import REGISTRY

T_EARLY, T_LATE = split_times(0.1 * np.arange(0, 121))


def test_split_times_drops_t0_and_halves_in_order():
    assert T_EARLY.size == T_LATE.size == 60
    assert T_EARLY[0] == pytest.approx(0.1) and T_EARLY[-1] < T_LATE[0]
    with pytest.raises(ValueError, match="two positive times"):
        split_times([0.0, 1.0])


@pytest.mark.parametrize("amplitude,exponent,offset", [(1e4, -0.2, 500.0), (2e-4, 0.25, 2e-5)])
def test_rates_are_window_means_and_invert_exactly(amplitude, exponent, offset):
    early, late = rates_from_power_law(amplitude, exponent, offset, T_EARLY, T_LATE)
    # independent reference: the mean of f over each half's times
    assert early == pytest.approx(np.mean(amplitude * T_EARLY**exponent + offset), rel=1e-12)
    assert late == pytest.approx(np.mean(amplitude * T_LATE**exponent + offset), rel=1e-12)
    a, o, _ = power_law_from_rates(early, late, exponent, T_EARLY, T_LATE)
    assert a == pytest.approx(amplitude, rel=1e-10)
    assert o == pytest.approx(offset, rel=1e-8, abs=1e-12 * abs(amplitude))


def test_jacobian_matches_finite_differences():
    early, late, exponent = 9000.0, 7000.0, -0.3
    _, _, gap = power_law_from_rates(early, late, exponent, T_EARLY, T_LATE)
    h = 1e-3
    cols = []
    for de, dl in ((h, 0.0), (0.0, h)):
        plus = power_law_from_rates(early + de, late + dl, exponent, T_EARLY, T_LATE)[:2]
        minus = power_law_from_rates(early - de, late - dl, exponent, T_EARLY, T_LATE)[:2]
        cols.append((np.array(plus) - np.array(minus)) / (2 * h))
    det = abs(np.linalg.det(np.array(cols).T))
    assert det == pytest.approx(1.0 / abs(gap), rel=1e-6)


@pytest.mark.parametrize("exponent", [-0.3, 0.25, -0.004])
def test_rates_jacobian_matches_finite_differences_of_the_inverse_map(exponent):
    # θ = (D0, alpha, D_offset, contrast); u = (D_early, alpha, D_late, contrast)
    names = ["D0", "alpha", "D_offset", "contrast"]
    t = 0.1 * np.arange(0, 121)
    theta = np.array([1e4, exponent, 500.0, 0.3])
    early, late = rates_from_power_law(theta[0], exponent, theta[2], T_EARLY, T_LATE)
    u = np.array([early, exponent, late, 0.3])

    def theta_of(u):
        a, o, _ = power_law_from_rates(u[0], u[2], u[1], T_EARLY, T_LATE)
        return np.array([a, u[1], o, u[3]])

    h = np.abs(u) * 1e-6 + 1e-9
    numeric = np.stack(
        [(theta_of(u + h[j] * np.eye(4)[j]) - theta_of(u - h[j] * np.eye(4)[j])) / (2 * h[j])
         for j in range(4)], axis=1)  # fmt: skip
    jac = rates_jacobian(names, theta, t)
    np.testing.assert_allclose(jac, numeric, rtol=1e-5, atol=1e-9 * np.abs(numeric).max())
    # a fixed member keeps the whole law in θ; so does an exponent exactly at 0
    np.testing.assert_array_equal(rates_jacobian(names, theta, t, [1, 1, 0, 1]), np.eye(4))
    np.testing.assert_array_equal(rates_jacobian(names, [1e4, 0.0, 5.0, 0.3], t), np.eye(4))


def test_draw_arrays_round_trip_for_every_mode():
    rng = np.random.default_rng(0)
    for mode in ("static", "laminar_flow"):
        names = list(REGISTRY.physical_names(mode))
        truth = np.array([REGISTRY[n].default for n in names], dtype=float)
        truth[names.index("alpha")] = -0.3
        if "beta" in names:
            truth[names.index("beta")] = 0.4
        draws = truth * (1 + 0.01 * rng.standard_normal((2, 50, len(names))))
        back = from_rates(to_rates(draws, names, T_EARLY, T_LATE), names, T_EARLY, T_LATE)
        np.testing.assert_allclose(back, draws, rtol=1e-9, atol=1e-9)
        rates = to_rates(draws, names, T_EARLY, T_LATE)
        unchanged = [k for k, n in enumerate(names) if n not in {g[0] for g in POWER_LAWS}
                     and n not in {g[2] for g in POWER_LAWS}]  # fmt: skip
        np.testing.assert_array_equal(rates[..., unchanged], draws[..., unchanged])
