"""Settings of the ``nlsq`` stage (config section ``nlsq``), checked when built."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from homodyne_steps.errors import ConfigError
from homodyne_steps.inference.noise import NoiseSettings
from homodyne_steps.inference.stratify import ChunkingSettings
from homodyne_steps.physics.registry import REGISTRY
from homodyne_steps.physics.scaling import DEFAULT_MODE, MODES
from homodyne_steps.settings import check_keys, get_choice, get_int, get_number


@dataclass(frozen=True)
class SolverSettings:
    """Levenberg–Marquardt stopping rules and start damping (``nlsq.solver``)."""

    max_iterations: int = 300
    ftol: float = 1e-10
    xtol: float = 1e-10
    gtol: float = 1e-8
    dchi2_tol: float = 1e-3
    #: χ² decrease over the last DRIFT_WINDOW (20) iterations below which the objective is
    #: flat where the fit stands: it stops there (on a direction the data do not fix)
    flat_dchi2: float = 0.1
    initial_damping: float = 1e-3


@dataclass(frozen=True)
class MultistartSettings:
    enabled: bool = False
    n_starts: int = 8
    seed: int = 0


UNCERTAINTY_METHODS = ("auto", "independent", "speckle")


@dataclass(frozen=True)
class UncertaintySettings:
    """How the fit's covariance is computed (``nlsq.uncertainty``).

    ``independent``: (JᵀJ)⁻¹·χ²_red, every point's noise independent; ``speckle``: the
    sandwich with the speckle noise model of :mod:`homodyne_steps.inference.speckle_noise`
    (noise shared through frames), refusing data it does not describe; ``auto``
    (default): ``speckle`` where the model describes the data (a correlator's two-time
    matrix), else ``independent`` with the reason recorded.
    """

    method: str = "auto"

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None, where: str) -> UncertaintySettings:
        m = dict(m or {})
        check_keys(m, {"method"}, where)
        return cls(method=get_choice(m, "method", "auto", UNCERTAINTY_METHODS, where))


@dataclass(frozen=True)
class NlsqSettings:
    per_angle_scaling: str = DEFAULT_MODE
    strategy: str = "joint"
    #: where the parameters without initial_parameters start: ``data`` (a coarse χ² search,
    #: :mod:`homodyne_steps.inference.start_values`) or ``registry`` (the defaults)
    start: str = "data"
    initial_parameters: Mapping[str, float] = field(default_factory=dict)
    fixed_parameters: tuple[str, ...] = ()
    noise: NoiseSettings = field(default_factory=NoiseSettings)
    chunking: ChunkingSettings = field(default_factory=ChunkingSettings)
    solver: SolverSettings = field(default_factory=SolverSettings)
    multistart: MultistartSettings = field(default_factory=MultistartSettings)
    uncertainty: UncertaintySettings = field(default_factory=UncertaintySettings)
    min_success_rate: float = 0.5
    on_failure: str = "error"

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None, where: str = "nlsq") -> NlsqSettings:
        m = dict(m or {})
        check_keys(
            m,
            {
                "per_angle_scaling",
                "strategy",
                "start",
                "initial_parameters",
                "fixed_parameters",
                "noise",
                "chunking",
                "solver",
                "multistart",
                "uncertainty",
                "min_success_rate",
                "on_failure",
            },
            where,
        )
        init = dict(m.get("initial_parameters") or {})
        for name, value in init.items():
            if name not in REGISTRY.names:
                raise ConfigError(
                    f"{where}.initial_parameters.{name}: unknown parameter; known: "
                    f"{list(REGISTRY.names)}"
                )
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigError(f"{where}.initial_parameters.{name}: expected a number")
        fixed = m.get("fixed_parameters") or []
        if not isinstance(fixed, list | tuple) or not all(isinstance(x, str) for x in fixed):
            raise ConfigError(f"{where}.fixed_parameters: expected a list of parameter names")
        unknown = [n for n in fixed if n not in REGISTRY.names]
        if unknown:
            raise ConfigError(
                f"{where}.fixed_parameters: {unknown} are not parameters; known: "
                f"{list(REGISTRY.names)}"
            )
        solver = dict(m.get("solver") or {})
        w = f"{where}.solver"
        check_keys(solver, {"max_iterations", "dchi2_tol", "flat_dchi2", "ftol", "xtol", "gtol"}, w)
        d = SolverSettings()
        ms = dict(m.get("multistart") or {})
        check_keys(ms, {"enabled", "n_starts", "seed"}, f"{where}.multistart")
        enabled = ms.get("enabled", False)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{where}.multistart.enabled: expected true or false")
        return cls(
            per_angle_scaling=get_choice(m, "per_angle_scaling", DEFAULT_MODE, MODES, where),
            strategy=get_choice(m, "strategy", "joint", ("joint", "sequential"), where),
            start=get_choice(m, "start", "data", ("data", "registry"), where),
            initial_parameters=init,
            fixed_parameters=tuple(fixed),
            noise=NoiseSettings.from_mapping(m.get("noise"), f"{where}.noise"),
            chunking=ChunkingSettings.from_mapping(m.get("chunking"), f"{where}.chunking"),
            solver=SolverSettings(
                max_iterations=get_int(solver, "max_iterations", d.max_iterations, w, minimum=1),
                dchi2_tol=get_number(solver, "dchi2_tol", d.dchi2_tol, w, minimum=0.0),
                flat_dchi2=get_number(solver, "flat_dchi2", d.flat_dchi2, w, minimum=0.0),
                ftol=get_number(solver, "ftol", d.ftol, w, minimum=0.0),
                xtol=get_number(solver, "xtol", d.xtol, w, minimum=0.0),
                gtol=get_number(solver, "gtol", d.gtol, w, minimum=0.0),
            ),
            multistart=MultistartSettings(
                enabled=enabled,
                n_starts=get_int(ms, "n_starts", 8, f"{where}.multistart", minimum=1),
                seed=get_int(ms, "seed", 0, f"{where}.multistart", minimum=0),
            ),
            uncertainty=UncertaintySettings.from_mapping(
                m.get("uncertainty"), f"{where}.uncertainty"
            ),
            min_success_rate=get_number(
                m, "min_success_rate", 0.5, where, minimum=0.0, maximum=1.0
            ),
            on_failure=get_choice(m, "on_failure", "error", ("error", "warn"), where),
        )
