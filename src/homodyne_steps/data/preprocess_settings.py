"""Settings of the ``preprocess`` stage (config section ``preprocess``), checked when built.

The steps they control are described in :mod:`homodyne_steps.stages.preprocess`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from homodyne_steps.errors import ConfigError

DIAGONAL_METHODS = ("basic", "statistical", "interpolation")
NORMALIZATION_METHODS = ("baseline",)
NOISE_METHODS = ("gaussian", "median", "uniform")


def _is_int(v: Any) -> bool:
    # bool is an int subclass; `window: true` is a typo, not 1.
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float | np.floating)) and math.isfinite(v)


def _require(ok: bool, where: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: got {value!r}; expected {expected}")


def _check_enabled(v: Any, where: str) -> None:
    _require(isinstance(v, bool), f"{where}.enabled", v, "true or false")


def _check_method(v: Any, choices: tuple[str, ...], where: str) -> None:
    _require(isinstance(v, str) and v in choices, f"{where}.method", v, f"one of {list(choices)}")


@dataclass(frozen=True)
class DiagonalCorrectionSettings:
    enabled: bool = True
    method: str = "basic"
    window: int = 3  # statistical only: neighbours C[i, i±k], k = 1..window

    def check(self, where: str = "preprocess.diagonal_correction") -> None:
        _check_enabled(self.enabled, where)
        _check_method(self.method, DIAGONAL_METHODS, where)
        # Checked even when unused so a bad value never hides until the method changes.
        _require(
            _is_int(self.window) and self.window >= 1,
            f"{where}.window",
            self.window,
            "an integer >= 1",
        )


@dataclass(frozen=True)
class NormalizationSettings:
    enabled: bool = False
    method: str = "baseline"

    def check(self, where: str = "preprocess.normalization") -> None:
        _check_enabled(self.enabled, where)
        _check_method(self.method, NORMALIZATION_METHODS, where)


@dataclass(frozen=True)
class NoiseReductionSettings:
    enabled: bool = False
    method: str = "gaussian"
    size: float = 3  # gaussian: sigma in elements; median/uniform: window width

    def check(self, where: str = "preprocess.noise_reduction") -> None:
        _check_enabled(self.enabled, where)
        _check_method(self.method, NOISE_METHODS, where)
        if self.method == "gaussian":
            ok, expected = _is_number(self.size) and self.size > 0, "a number > 0 (sigma)"
        else:
            ok, expected = _is_int(self.size) and self.size >= 1, "an integer >= 1 (window)"
        _require(ok, f"{where}.size", self.size, f"{expected} for method {self.method!r}")


_SECTIONS: dict[str, type] = {
    "diagonal_correction": DiagonalCorrectionSettings,
    "normalization": NormalizationSettings,
    "noise_reduction": NoiseReductionSettings,
}


def _section_from_mapping(cls: type, mapping: Any, where: str) -> Any:
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where}: got {mapping!r}; expected a mapping")
    known = list(cls.__dataclass_fields__)
    for key in mapping:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key; expected one of {known}")
    obj = cls(**mapping)
    obj.check(where)
    return obj


@dataclass(frozen=True)
class PreprocessSettings:
    """Resolved settings of the preprocess stage (see the module docstring)."""

    diagonal_correction: DiagonalCorrectionSettings = field(
        default_factory=DiagonalCorrectionSettings
    )
    normalization: NormalizationSettings = field(default_factory=NormalizationSettings)
    noise_reduction: NoiseReductionSettings = field(default_factory=NoiseReductionSettings)

    @classmethod
    def from_mapping(
        cls, mapping: Mapping[str, Any] | None, where: str = "preprocess"
    ) -> PreprocessSettings:
        """Build from a config mapping; missing keys take defaults, unknown keys are errors."""
        if mapping is None:
            mapping = {}
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{where}: got {mapping!r}; expected a mapping")
        for key in mapping:
            if key not in _SECTIONS:
                raise ConfigError(f"{where}.{key}: unknown key; expected one of {list(_SECTIONS)}")
        return cls(
            **{
                name: _section_from_mapping(sec_cls, mapping.get(name), f"{where}.{name}")
                for name, sec_cls in _SECTIONS.items()
            }
        )

    def check(self, where: str = "preprocess") -> None:
        for name in _SECTIONS:
            getattr(self, name).check(f"{where}.{name}")

    def to_mapping(self) -> dict[str, dict[str, Any]]:
        """Every setting, defaults included (for provenance and reproducibility)."""
        return {
            name: {k: getattr(getattr(self, name), k) for k in cls.__dataclass_fields__}
            for name, cls in _SECTIONS.items()
        }


def _resolve(settings: PreprocessSettings | Mapping[str, Any] | None) -> PreprocessSettings:
    if isinstance(settings, PreprocessSettings):
        settings.check()  # directly constructed settings skipped from_mapping's checks
        return settings
    return PreprocessSettings.from_mapping(settings)
