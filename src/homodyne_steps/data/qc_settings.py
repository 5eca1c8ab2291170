"""Settings of the ``qc`` stage (config section ``qc``), checked when built."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from homodyne_steps.errors import ConfigError


@dataclass(frozen=True)
class QcSettings:
    """Settings of the ``qc`` stage (config section ``qc``).

    Attributes:
        pass_threshold, warn_threshold, excellent_threshold: score cut points
            (``thresholds: {pass, warn, excellent}``), 0 ≤ pass < warn < excellent ≤ 100.
        on_fail: ``"error"`` stops the workflow when the final score < pass; ``"warn"``
            writes the outputs anyway with status ``fail``.
        auto_repair: for ``final``, mask Inf and negative values (NaN), copy a NaN's
            finite symmetric partner, symmetrise, rescale percent data. Nothing is filled.
        g2_ceiling, g2_floor: allowed range of the mean c2 at the first non-zero lag
            (g2 ≤ 2 for chaotic light; far below 1 means a wrong normalisation).
        baseline_tolerance: allowed |long-lag baseline − 1|.
        min_contrast_snr: an angle decays if its contrast exceeds this × its noise ...
        min_contrast: ... and this × its baseline (relative; guards noiseless data).
        max_relative_noise: allowed per-element noise / baseline.
        outlier_tolerance: allowed deviation of an angle's contrast or baseline from the
            median over angles, in units of the median contrast.
        symmetry_tolerance: allowed max |c2 − c2ᵀ| relative to the median |c2|.
        min_time_points: fewest frames for a usable two-time matrix.
        max_masked_fraction: an angle with a larger fraction of masked off-diagonal
            pairs (in [0, 1]) is dropped from the final data.
    """

    pass_threshold: float = 50.0
    warn_threshold: float = 70.0
    excellent_threshold: float = 85.0
    on_fail: str = "error"
    auto_repair: bool = True
    g2_ceiling: float = 2.0
    g2_floor: float = 0.5
    baseline_tolerance: float = 0.5
    min_contrast_snr: float = 3.0
    min_contrast: float = 0.01
    max_relative_noise: float = 0.1
    outlier_tolerance: float = 0.5
    symmetry_tolerance: float = 1e-6
    min_time_points: int = 20
    max_masked_fraction: float = 0.5

    def __post_init__(self) -> None:
        _validate(asdict(self), "qc")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None, where: str = "qc") -> QcSettings:
        """Build from a config mapping; unknown keys and wrong types raise ConfigError."""
        if mapping is None:
            mapping = {}
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {type(mapping).__name__}")
        simple = {f.name for f in fields(cls)} - {
            "pass_threshold",
            "warn_threshold",
            "excellent_threshold",
        }
        kwargs: dict[str, Any] = {}
        for key, value in mapping.items():
            path = f"{where}.{key}"
            if key == "thresholds":
                kwargs.update(_thresholds(value, path))
            elif key not in simple:
                allowed = sorted(simple | {"thresholds"})
                raise ConfigError(f"unknown key {path}; allowed keys: {allowed}")
            elif key == "on_fail":
                if value not in ("error", "warn"):
                    raise ConfigError(f'{path} must be "error" or "warn", got {value!r}')
                kwargs[key] = value
            elif key == "auto_repair":
                if not isinstance(value, bool):
                    raise ConfigError(f"{path} must be true or false, got {value!r}")
                kwargs[key] = value
            else:
                kwargs[key] = _number(value, path, integer=key == "min_time_points")
        # Range checks first, so errors name the caller's key path (not the default "qc").
        _validate({**asdict(cls()), **kwargs}, where)
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """The config mapping that :meth:`from_mapping` turns back into these settings."""
        out = asdict(self)
        out = {
            "thresholds": {
                "pass": out.pop("pass_threshold"),
                "warn": out.pop("warn_threshold"),
                "excellent": out.pop("excellent_threshold"),
            },
            **out,
        }
        return out


def _thresholds(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping with pass/warn/excellent")
    names = {"pass": "pass_threshold", "warn": "warn_threshold", "excellent": "excellent_threshold"}
    out = {}
    for key, v in value.items():
        if key not in names:
            raise ConfigError(f"unknown key {where}.{key}; allowed keys: {sorted(names)}")
        out[names[key]] = _number(v, f"{where}.{key}")
    return out


def _number(value: Any, where: str, *, integer: bool = False) -> float | int:
    # bool is an int subclass; `true` for a threshold is a config mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where} must be {kind}, got {type(value).__name__} {value!r}")
    if integer and not float(value).is_integer():
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if not math.isfinite(float(value)):
        raise ConfigError(f"{where} must be finite, got {value!r}")
    return int(value) if integer else float(value)


def _validate(v: Mapping[str, Any], where: str) -> None:
    """Cross-field and range checks on the settings' values (field name -> value)."""
    t = (v["pass_threshold"], v["warn_threshold"], v["excellent_threshold"])
    if not (0 <= t[0] < t[1] < t[2] <= 100):
        raise ConfigError(
            f"{where}.thresholds must be increasing within 0-100 (pass < warn < excellent), "
            f"got pass={t[0]}, warn={t[1]}, excellent={t[2]}"
        )
    if v["on_fail"] not in ("error", "warn"):
        raise ConfigError(f'{where}.on_fail must be "error" or "warn", got {v["on_fail"]!r}')
    if not isinstance(v["auto_repair"], bool):
        raise ConfigError(f"{where}.auto_repair must be true or false, got {v['auto_repair']!r}")
    if not (0 < v["g2_floor"] < v["g2_ceiling"]):
        raise ConfigError(
            f"{where}.g2_floor must be > 0 and < {where}.g2_ceiling, "
            f"got g2_floor={v['g2_floor']}, g2_ceiling={v['g2_ceiling']}"
        )
    for name in (
        "baseline_tolerance",
        "min_contrast_snr",
        "max_relative_noise",
        "outlier_tolerance",
        "symmetry_tolerance",
    ):
        if not v[name] > 0:
            raise ConfigError(f"{where}.{name} must be > 0, got {v[name]}")
    if not v["min_contrast"] >= 0:
        raise ConfigError(f"{where}.min_contrast must be >= 0, got {v['min_contrast']}")
    n = v["min_time_points"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError(f"{where}.min_time_points must be an integer >= 2, got {n!r}")
    f = v["max_masked_fraction"]
    if not 0 <= f <= 1:
        raise ConfigError(f"{where}.max_masked_fraction must be in [0, 1], got {f!r}")
