"""The parameter registry: the one source of names, units, bounds, defaults and priors.

Nothing else in the package hard-codes a bound or a default; the README table, CLI help,
config defaults, fit bounds and CMC priors are all derived from :data:`REGISTRY`.

Analysis modes
--------------
``static`` (aliases ``static_isotropic``, ``static_anisotropic``) uses the three
diffusion parameters; ``laminar_flow`` adds the four shear parameters. ``contrast`` and
``offset`` are per-angle scaling parameters, present in every mode.

Priors are ``TruncatedNormal(mu, sigma)`` restricted to the bounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from homodyne_steps.errors import ParameterError

STATIC = "static"
LAMINAR_FLOW = "laminar_flow"
PER_ANGLE = "per_angle"

MODE_ALIASES: dict[str, str] = {
    "static": STATIC,
    "static_isotropic": STATIC,
    "static_anisotropic": STATIC,
    "laminar_flow": LAMINAR_FLOW,
}


@dataclass(frozen=True)
class ParameterSpec:
    """One parameter: what it is, its unit, where it may go and what we believe a priori."""

    name: str
    unit: str
    default: float
    lower: float
    upper: float
    prior_mu: float
    prior_sigma: float
    modes: tuple[str, ...]
    description: str
    log_scale: bool = False  # strictly positive, spans decades: fitted/sampled in log

    @property
    def bounds(self) -> tuple[float, float]:
        return (self.lower, self.upper)


_BOTH = (STATIC, LAMINAR_FLOW)
_FLOW = (LAMINAR_FLOW,)

# Bounds: the reference package's 2.23 audit (see shared/spec/physics.md).
DEFAULT_SPECS: tuple[ParameterSpec, ...] = (
    ParameterSpec("D0", "Å²/s", 1e4, 1e2, 1e5, 1e4, 1e4, _BOTH,
                  "diffusion prefactor in D(t) = D0 t^alpha + D_offset", log_scale=True),
    ParameterSpec("alpha", "–", 0.0, -2.0, 2.0, 0.0, 0.5, _BOTH,
                  "anomalous-diffusion exponent (0 normal, <0 sub-, >0 super-diffusive)"),
    ParameterSpec("D_offset", "Å²/s", 0.0, -1e5, 1e5, 0.0, 1e3, _BOTH,
                  "constant part of D(t)"),
    ParameterSpec("gamma_dot_t0", "1/s", 1e-3, 1e-6, 0.5, 1e-3, 1e-2, _FLOW,
                  "shear-rate prefactor in γ̇(t) = gamma_dot_t0 t^beta + gamma_dot_t_offset",
                  log_scale=True),
    ParameterSpec("beta", "–", 0.0, -2.0, 2.0, 0.0, 0.5, _FLOW,
                  "shear-rate exponent (0 constant shear)"),
    ParameterSpec("gamma_dot_t_offset", "1/s", 0.0, -0.1, 0.1, 0.0, 1e-2, _FLOW,
                  "constant part of γ̇(t)"),
    ParameterSpec("phi0", "deg", 0.0, -10.0, 10.0, 0.0, 5.0, _FLOW,
                  "angle of the flow direction relative to phi = 0"),
    ParameterSpec("contrast", "–", 0.5, 0.0, 1.0, 0.5, 0.25, (PER_ANGLE,),
                  "per-angle contrast in c2 = offset + contrast g1²"),
    ParameterSpec("offset", "–", 1.0, 0.5, 1.5, 1.0, 0.25, (PER_ANGLE,),
                  "per-angle baseline in c2 = offset + contrast g1²"),
)  # fmt: skip


def canonical_mode(mode: str) -> str:
    """Map a mode name or alias to ``static`` or ``laminar_flow``."""
    if not isinstance(mode, str) or mode not in MODE_ALIASES:
        raise ParameterError(
            f"unknown analysis mode {mode!r}; expected one of {sorted(MODE_ALIASES)}"
        )
    return MODE_ALIASES[mode]


def _check_spec(spec: ParameterSpec) -> None:
    values = (spec.default, spec.lower, spec.upper, spec.prior_mu, spec.prior_sigma)
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        raise ParameterError(f"parameter {spec.name!r}: bounds, default and prior must be finite")
    if not spec.lower < spec.upper:
        raise ParameterError(
            f"parameter {spec.name!r}: lower bound {spec.lower:g} must be below "
            f"upper bound {spec.upper:g}"
        )
    if not spec.lower <= spec.default <= spec.upper:
        raise ParameterError(
            f"parameter {spec.name!r}: default {spec.default:g} is outside its bounds "
            f"[{spec.lower:g}, {spec.upper:g}]"
        )
    if not spec.lower <= spec.prior_mu <= spec.upper:
        raise ParameterError(
            f"parameter {spec.name!r}: prior mean {spec.prior_mu:g} is outside its bounds "
            f"[{spec.lower:g}, {spec.upper:g}]"
        )
    if spec.log_scale and not spec.lower > 0:
        raise ParameterError(f"parameter {spec.name!r}: a log-scale parameter needs lower > 0")
    if not spec.prior_sigma > 0:
        raise ParameterError(
            f"parameter {spec.name!r}: prior sigma must be > 0, got {spec.prior_sigma:g}"
        )


class Registry:
    """An immutable, ordered set of parameter specs (the defaults, or user overrides)."""

    def __init__(self, specs: Sequence[ParameterSpec]):
        for spec in specs:
            _check_spec(spec)
        self._specs = {s.name: s for s in specs}
        if len(self._specs) != len(specs):
            raise ParameterError("duplicate parameter names in registry")

    # -- lookup ---------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._specs)

    def __getitem__(self, name: str) -> ParameterSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise ParameterError(
                f"unknown parameter {name!r}; known parameters: {', '.join(self._specs)}"
            ) from None

    def __iter__(self):
        return iter(self._specs.values())

    def physical_names(self, mode: str) -> tuple[str, ...]:
        """Physical parameter names of a mode, in kernel order."""
        mode = canonical_mode(mode)
        return tuple(s.name for s in self._specs.values() if mode in s.modes)

    def infer_mode(self, names: Sequence[str]) -> str:
        """The analysis mode whose physical parameters are exactly ``names``."""
        given = set(names)
        for name in given:
            self[name]  # unknown names get the "unknown parameter" error
        for mode in (STATIC, LAMINAR_FLOW):
            if given == set(self.physical_names(mode)):
                return mode
        static, flow = self.physical_names(STATIC), self.physical_names(LAMINAR_FLOW)
        raise ParameterError(
            f"cannot infer the analysis mode from parameters {sorted(given)}: expected "
            f"{len(static)} names {list(static)} (static) or {len(flow)} names "
            f"{list(flow)} (laminar_flow)"
        )

    def bounds(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of ``names`` as float64 arrays."""
        specs = [self[n] for n in names]
        return (np.array([s.lower for s in specs]), np.array([s.upper for s in specs]))

    def defaults(self, mode: str) -> dict[str, float]:
        return {n: self[n].default for n in self.physical_names(mode)}

    # -- validation -----------------------------------------------------------------
    def check_value(self, name: str, value: object, *, where: str = "") -> float:
        """Return ``value`` as a float, or raise naming the parameter and its bounds."""
        spec = self[name]
        ctx = f" ({where})" if where else ""
        try:
            x = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ParameterError(
                f"parameter {name!r}{ctx}: expected a number, got {value!r}"
            ) from None
        if not math.isfinite(x):
            raise ParameterError(f"parameter {name!r}{ctx}: expected a finite number, got {x}")
        if not spec.lower <= x <= spec.upper:
            raise ParameterError(
                f"parameter {name!r}{ctx}: value {x:g} is outside its bounds "
                f"[{spec.lower:g}, {spec.upper:g}] {spec.unit}"
            )
        return x

    def physical_vector(
        self,
        params: Mapping[str, object] | Sequence[float] | np.ndarray,
        mode: str | None = None,
        *,
        check_bounds: bool = True,
    ) -> tuple[str, np.ndarray]:
        """Validate physical parameters; return ``(mode, values in kernel order)``.

        ``params`` is a mapping name -> value (mode inferred from the names unless
        given), or a sequence of values in kernel order (then ``mode`` or the count
        decides).
        """
        if isinstance(params, Mapping):
            names = list(params)
            if mode is None:
                mode = self.infer_mode(names)
            else:
                mode = canonical_mode(mode)
                expected = self.physical_names(mode)
                for n in names:
                    self[n]
                missing = [n for n in expected if n not in params]
                extra = [n for n in names if n not in expected]
                if missing or extra:
                    parts = []
                    if missing:
                        parts.append(f"missing {missing}")
                    if extra:
                        parts.append(f"not used in {mode} mode: {extra}")
                    raise ParameterError(
                        f"parameters for {mode} mode must be exactly {list(expected)}; "
                        + "; ".join(parts)
                    )
            ordered = self.physical_names(mode)
            raw = [params[n] for n in ordered]
        else:
            raw = list(np.asarray(params, dtype=object).ravel())
            counts = {len(self.physical_names(m)): m for m in (STATIC, LAMINAR_FLOW)}
            if mode is None:
                if len(raw) not in counts:
                    raise ParameterError(
                        f"expected {' or '.join(map(str, counts))} physical parameter values, "
                        f"got {len(raw)}"
                    )
                mode = counts[len(raw)]
            mode = canonical_mode(mode)
            ordered = self.physical_names(mode)
            if len(raw) != len(ordered):
                raise ParameterError(
                    f"{mode} mode takes {len(ordered)} values {list(ordered)}, got {len(raw)}"
                )
        if check_bounds:
            values = [self.check_value(n, v) for n, v in zip(ordered, raw, strict=True)]
        else:
            values = []
            for n, v in zip(ordered, raw, strict=True):
                try:
                    values.append(float(v))
                except (TypeError, ValueError):
                    raise ParameterError(f"parameter {n!r}: expected a number, got {v!r}") from None
        return mode, np.array(values, dtype=np.float64)

    def per_angle_vector(self, name: str, value: object, n_phi: int) -> np.ndarray:
        """``contrast``/``offset`` as an (n_phi,) float64 array, each entry in bounds."""
        spec = self[name]
        if PER_ANGLE not in spec.modes:
            raise ParameterError(f"{name!r} is not a per-angle scaling parameter")
        arr = np.asarray(value, dtype=object)
        if arr.ndim == 0:
            arr = np.full(n_phi, arr.item(), dtype=object)
        if arr.ndim != 1 or arr.shape[0] != n_phi:
            raise ParameterError(
                f"{name!r} must be a scalar or one value per angle ({n_phi}), got shape {arr.shape}"
            )
        return np.array(
            [self.check_value(name, v, where=f"angle {k}") for k, v in enumerate(arr)],
            dtype=np.float64,
        )

    # -- overrides ------------------------------------------------------------------
    def with_overrides(self, overrides: Mapping[str, Mapping[str, object]] | None) -> Registry:
        """A new registry with user overrides applied.

        ``overrides`` maps a parameter name to any of ``bounds: [lower, upper]``,
        ``default: x``, ``prior: {mu: .., sigma: ..}``.
        """
        if not overrides:
            return self
        specs = dict(self._specs)
        for name, change in overrides.items():
            spec = self[name]
            if not isinstance(change, Mapping):
                raise ParameterError(
                    f"override for {name!r} must be a mapping with bounds/default/prior"
                )
            unknown = set(change) - {"bounds", "default", "prior"}
            if unknown:
                raise ParameterError(
                    f"override for {name!r}: unknown keys {sorted(unknown)}; "
                    "expected bounds, default, prior"
                )
            fields: dict[str, float] = {}
            if "bounds" in change:
                b = change["bounds"]
                if not isinstance(b, Sequence) or isinstance(b, str) or len(b) != 2:
                    raise ParameterError(
                        f"override for {name!r}: bounds must be [lower, upper], got {b!r}"
                    )
                fields["lower"], fields["upper"] = (_as_float(name, "bounds", x) for x in b)
            if "default" in change:
                fields["default"] = _as_float(name, "default", change["default"])
            if "prior" in change:
                p = change["prior"]
                if not isinstance(p, Mapping) or set(p) - {"mu", "sigma"}:
                    raise ParameterError(
                        f"override for {name!r}: prior must be {{mu: .., sigma: ..}}, got {p!r}"
                    )
                if "mu" in p:
                    fields["prior_mu"] = _as_float(name, "prior.mu", p["mu"])
                if "sigma" in p:
                    fields["prior_sigma"] = _as_float(name, "prior.sigma", p["sigma"])
            specs[name] = replace(spec, **fields)
        return Registry(list(specs.values()))

    # -- documentation --------------------------------------------------------------
    def markdown_table(self) -> str:
        """The parameter table embedded in the README (a test keeps them in sync)."""
        rows = [
            "| name | unit | default | bounds | prior TruncatedNormal(μ, σ) | modes | meaning |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in self:
            modes = "per angle" if s.modes == (PER_ANGLE,) else ", ".join(s.modes)
            rows.append(
                f"| {s.name} | {s.unit} | {s.default:g} | [{s.lower:g}, {s.upper:g}] | "
                f"{s.prior_mu:g}, {s.prior_sigma:g} | {modes} | {s.description} |"
            )
        return "\n".join(rows)


def _as_float(name: str, key: str, value: object) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ParameterError(
            f"override for {name!r}: {key} must be a number, got {value!r}"
        ) from None
    if not math.isfinite(x):
        raise ParameterError(f"override for {name!r}: {key} must be finite, got {x}")
    return x


REGISTRY = Registry(DEFAULT_SPECS)

physical_names = REGISTRY.physical_names
physical_vector = REGISTRY.physical_vector
