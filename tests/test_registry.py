"""The parameter registry: consistency, agreement with the spec, clear errors."""

import math
import re
from pathlib import Path

import numpy as np
import pytest

from homodyne_steps.errors import ParameterError
from homodyne_steps.physics.registry import (
    LAMINAR_FLOW,
    REGISTRY,
    STATIC,
    ParameterSpec,
    Registry,
    canonical_mode,
)

SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec" / "physics.md"


def test_every_spec_is_consistent():
    for s in REGISTRY:
        assert s.unit and s.description
        assert s.lower < s.upper
        assert s.lower <= s.default <= s.upper
        assert s.lower <= s.prior_mu <= s.upper
        assert s.prior_sigma > 0
        assert all(math.isfinite(x) for x in (s.default, s.lower, s.upper))


def test_modes_and_order():
    assert REGISTRY.physical_names("static") == ("D0", "alpha", "D_offset")
    assert REGISTRY.physical_names("laminar_flow") == (
        "D0", "alpha", "D_offset", "gamma_dot_t0", "beta", "gamma_dot_t_offset", "phi0",
    )  # fmt: skip
    for alias in ("static", "static_isotropic", "static_anisotropic"):
        assert canonical_mode(alias) == STATIC
    assert canonical_mode("laminar_flow") == LAMINAR_FLOW
    assert REGISTRY.infer_mode(["phi0", "D0", "alpha", "D_offset", "beta", "gamma_dot_t0",
                                "gamma_dot_t_offset"]) == LAMINAR_FLOW  # fmt: skip


@pytest.mark.skipif(not SPEC.exists(), reason="shared/spec beside the checkout is absent")
def test_registry_matches_the_spec_table():
    rows = {}
    for line in SPEC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in REGISTRY.names:
            rows[cells[0]] = cells
    assert set(rows) == set(REGISTRY.names)
    for name, (_, unit, default, bounds, prior, modes) in rows.items():
        s = REGISTRY[name]
        assert s.unit == unit
        assert s.default == float(default)
        lo, hi = (float(x) for x in re.findall(r"[-+0-9.e]+", bounds))
        assert (s.lower, s.upper) == (lo, hi)
        mu, sigma = (float(x) for x in prior.split(","))
        assert (s.prior_mu, s.prior_sigma) == (mu, sigma)
        expected = {"both": (STATIC, LAMINAR_FLOW), "laminar_flow": (LAMINAR_FLOW,),
                    "per angle": ("per_angle",)}[modes]  # fmt: skip
        assert s.modes == expected


def test_physical_vector_orders_and_validates():
    mode, v = REGISTRY.physical_vector({"D_offset": 5.0, "D0": 2e3, "alpha": 0.1})
    assert mode == STATIC
    np.testing.assert_array_equal(v, [2e3, 0.1, 5.0])
    mode, v = REGISTRY.physical_vector([1e4, 0.0, 0.0, 1e-3, 0.0, 0.0, 1.0])
    assert mode == LAMINAR_FLOW and v.dtype == np.float64


@pytest.mark.parametrize(
    "params,mode,message",
    [
        ({"D0": 1e4, "alpha": 0.0, "Doffset": 0.0}, None, "unknown parameter 'Doffset'"),
        ({"D0": 1e6, "alpha": 0.0, "D_offset": 0.0}, None,
         r"'D0'.*1e\+06 is outside its bounds \[100, 100000\] Å²/s"),
        ({"D0": 1e4, "alpha": float("nan"), "D_offset": 0.0}, None, "'alpha'.*finite"),
        ({"D0": "fast", "alpha": 0.0, "D_offset": 0.0}, None, "'D0'.*expected a number"),
        ({"D0": 1e4, "alpha": 0.0}, None, "cannot infer the analysis mode"),
        ({"D0": 1e4, "alpha": 0.0, "D_offset": 0.0}, "laminar_flow",
         r"missing \['gamma_dot_t0', 'beta', 'gamma_dot_t_offset', 'phi0'\]"),
        ({"D0": 1e4, "alpha": 0.0, "D_offset": 0.0, "phi0": 1.0}, "static",
         r"not used in static mode: \['phi0'\]"),
        ([1.0, 2.0], None, "expected 3 or 7 physical parameter values, got 2"),
        ([1e4, 0.0, 0.0], "laminar_flow", "laminar_flow mode takes 7 values"),
        ({"D0": 1e4, "alpha": 0.0, "D_offset": 0.0}, "turbulent", "unknown analysis mode"),
    ],
)  # fmt: skip
def test_bad_parameters_are_named(params, mode, message):
    with pytest.raises(ParameterError, match=message):
        REGISTRY.physical_vector(params, mode)


def test_bounds_and_defaults_come_from_the_registry():
    lo, hi = REGISTRY.bounds(["D0", "phi0"])
    np.testing.assert_array_equal(lo, [1e2, -10.0])
    np.testing.assert_array_equal(hi, [1e5, 10.0])
    assert REGISTRY.defaults("static") == {"D0": 1e4, "alpha": 0.0, "D_offset": 0.0}


def test_overrides():
    r = REGISTRY.with_overrides({"D0": {"bounds": [1e3, 5e4], "prior": {"sigma": 2e3}}})
    assert r["D0"].bounds == (1e3, 5e4) and r["D0"].prior_sigma == 2e3
    assert REGISTRY["D0"].bounds == (1e2, 1e5)  # the default registry is untouched
    with pytest.raises(ParameterError, match="D0.*outside its bounds"):
        r.physical_vector({"D0": 500.0, "alpha": 0.0, "D_offset": 0.0})
    with pytest.raises(ParameterError, match="default 10000 is outside its bounds"):
        REGISTRY.with_overrides({"D0": {"bounds": [1, 10]}})
    with pytest.raises(ParameterError, match="unknown keys \\['bound'\\]"):
        REGISTRY.with_overrides({"D0": {"bound": [1, 10]}})
    with pytest.raises(ParameterError, match="lower bound 5 must be below upper bound 1"):
        REGISTRY.with_overrides({"alpha": {"bounds": [5, 1], "default": 2}})
    with pytest.raises(ParameterError, match="unknown parameter 'D9'"):
        REGISTRY.with_overrides({"D9": {"default": 1}})


def test_registry_rejects_inconsistent_specs():
    bad = ParameterSpec("x", "–", 0.0, -1.0, 1.0, 0.0, -1.0, (STATIC,), "x")
    with pytest.raises(ParameterError, match="prior sigma must be > 0"):
        Registry([bad])


def test_per_angle_vector():
    np.testing.assert_array_equal(REGISTRY.per_angle_vector("contrast", 0.3, 3), [0.3] * 3)
    with pytest.raises(ParameterError, match="one value per angle \\(3\\)"):
        REGISTRY.per_angle_vector("offset", [1.0, 1.0], 3)
    with pytest.raises(ParameterError, match="angle 1"):
        REGISTRY.per_angle_vector("contrast", [0.3, 1.7, 0.2], 3)
    with pytest.raises(ParameterError, match="not a per-angle"):
        REGISTRY.per_angle_vector("D0", 1e4, 3)
