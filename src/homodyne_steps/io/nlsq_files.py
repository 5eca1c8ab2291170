"""Typed records of the NLSQ stage's JSON files that other stages read.

``parameters.json`` (:class:`NlsqParameters`) is read by the CMC shards (start values,
surrogate widths, σ scale), the CMC combination (the NLSQ comparison), the summary and
the plots; ``analysis_results_nlsq.json`` (:class:`NlsqAnalysis`) by the summary and
the plots. Parts no other stage reads (the stratification, the solver history) stay
plain mappings. The builders are in :mod:`homodyne_steps.stages.nlsq_records`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from homodyne_steps.io.record import ABSENT, Record
from homodyne_steps.physics.scaling import DEFAULT_MODE


@dataclass(frozen=True, kw_only=True)
class NlsqEstimate(Record):
    """One physical parameter: value, 1σ (null where undefined) and its status."""

    value: float
    uncertainty: float | None
    unit: str
    at_bound: bool
    fixed: bool
    identified: bool
    #: σ wider than a quarter of the bound range (in log for D0, γ̇0): the data fix it
    #: only weakly (:func:`homodyne_steps.inference.identification.weakly_identified`)
    weakly_identified: bool = ABSENT
    #: central 68 % and 95 % intervals that follow the valley of the power laws
    #: (:mod:`homodyne_steps.inference.intervals`); null without a σ
    interval_68: list[float] | None = ABSENT
    interval_95: list[float] | None = ABSENT


@dataclass(frozen=True, kw_only=True)
class ValueWithUncertainty(Record):
    value: float
    uncertainty: float | None


@dataclass(frozen=True, kw_only=True)
class AngleScaling(Record):
    """One angle's contrast and offset; ``flags`` lists values out of physical range
    (``{"flag": "contrast_out_of_range", "value": ..., "allowed": ...}``)."""

    phi_deg: float
    contrast: ValueWithUncertainty
    offset: ValueWithUncertainty
    chi_squared: float
    flags: list[dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class NlsqConvergence(Record):
    status: str
    reason: str
    iterations: int
    converged: bool
    not_identified: list[str]
    weakly_identified: list[str] = ABSENT


@dataclass(frozen=True, kw_only=True)
class NamedMatrix(Record):
    """A parameter covariance or correlation; null where undefined (not identified)."""

    names: list[str]
    matrix: list[list[float | None]]


@dataclass(frozen=True, kw_only=True)
class NlsqParameters(Record):
    """``nlsq/parameters.json``, the NLSQ stage's sentinel (written last)."""

    WHAT = "NLSQ parameters.json"

    schema_version: int
    analysis_mode: str
    #: the kernel's ``shear`` and ``integral`` (:mod:`homodyne_steps.physics.model_settings`);
    #: records written before the choice existed used the seed's homodyne/trapezoid
    model: dict[str, str] = ABSENT
    parameters: dict[str, NlsqEstimate]
    per_angle: list[AngleScaling]
    #: older records lack it; they were fitted with varpro scaling
    per_angle_scaling: str = ABSENT
    chi_squared: float
    reduced_chi_squared: float
    degrees_of_freedom: int
    uncertainty_convention: str
    #: how σ was scaled (:func:`homodyne_steps.inference.noise.noise_scale_record`)
    noise_scale: dict[str, Any]
    #: with speckle σ, how CMC's likelihood is calibrated to them
    #: (:mod:`homodyne_steps.inference.curvature`); null with independent σ
    curvature_adjustment: dict[str, Any] | None = ABSENT
    #: the physical parameters' covariance as reported (older records lack it); the CMC
    #: shards place their surrogate prior with it (:mod:`homodyne_steps.inference.surrogate`)
    covariance: NamedMatrix = ABSENT
    convergence: NlsqConvergence

    @property
    def scaling_mode(self) -> str:
        return self.per_angle_scaling or DEFAULT_MODE

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.parameters)


@dataclass(frozen=True, kw_only=True)
class FitQuality(Record):
    chi_squared: float
    reduced_chi_squared: float
    degrees_of_freedom: int
    quality_flag: str


@dataclass(frozen=True, kw_only=True)
class DatasetInfo(Record):
    n_angles: int
    n_time_points: int
    total_data_points: int
    q: float
    dt: float
    L: float
    phi_deg: list[float]


@dataclass(frozen=True, kw_only=True)
class NlsqAnalysis(Record):
    """``nlsq/analysis_results_nlsq.json``: fit quality, data, covariance, noise."""

    WHAT = "NLSQ analysis_results_nlsq.json"

    schema_version: int
    method: str
    strategy: str
    analysis_mode: str
    model: dict[str, str] = ABSENT
    per_angle_scaling: str
    fit_quality: FitQuality
    dataset_info: DatasetInfo
    optimization_summary: dict[str, Any]
    covariance: NamedMatrix
    correlation: NamedMatrix
    noise: dict[str, Any]
    #: ``nlsq.uncertainty`` as used: method (and, for speckle, each angle's noise levels)
    uncertainty: dict[str, Any] = ABSENT
    stratification: Any
    multistart: Any
    sequential: Any


@dataclass(frozen=True)
class NlsqFiles:
    """The NLSQ outputs a later stage reads, each named exactly (a workflow rule lists
    them as its inputs); :meth:`in_dir` gives the stage's own names in one folder."""

    parameters: Path
    analysis: Path
    fitted: Path

    NAMES: ClassVar[dict[str, str]] = {
        "parameters": "parameters.json",
        "analysis": "analysis_results_nlsq.json",
        "fitted": "fitted_data.npz",
    }

    @classmethod
    def in_dir(cls, nlsq_dir: str | os.PathLike[str]) -> NlsqFiles:
        return cls(**{k: Path(nlsq_dir) / name for k, name in cls.NAMES.items()})

    @classmethod
    def of(cls, nlsq: NlsqFiles | str | os.PathLike[str]) -> NlsqFiles:
        """``nlsq`` itself, or the files in the folder ``nlsq``."""
        return nlsq if isinstance(nlsq, NlsqFiles) else cls.in_dir(nlsq)


__all__ = [
    "NlsqFiles",
    "AngleScaling",
    "DatasetInfo",
    "FitQuality",
    "NamedMatrix",
    "NlsqAnalysis",
    "NlsqConvergence",
    "NlsqEstimate",
    "NlsqParameters",
    "ValueWithUncertainty",
]
