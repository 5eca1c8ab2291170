"""Typed records of the CMC stages' JSON files that other stages read.

``plan.json`` (:class:`CmcPlan`, the ``cmc_plan`` checkpoint) is read by the workflow
(the number of shards); the combination's ``parameters.json`` (:class:`CmcParameters`,
its sentinel) by the fitted data, the summary and the plots; ``combination_report.json``
(:class:`CombinationReport`) by the plots and the summary; ``analysis_results_cmc.json``
(:class:`CmcAnalysis`) and ``diagnostics.json`` (:class:`CmcDiagnostics`) by the
summary. Parts no other stage reads (the plan's stratification, the prior weights,
timings) stay plain mappings. The builders are :mod:`homodyne_steps.stages.cmc_plan`
and :mod:`homodyne_steps.stages.cmc_records`.

JSON never holds NaN: a number that can be undefined in a real run (R-hat of one chain,
the ESS of constant draws, the χ² of one kept shard, ...) is ``float | None``. Keys
that files written before 2026-11-29 lack default to :data:`~.record.ABSENT`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from homodyne_steps.io.record import ABSENT, Record


# ---------------------------------------------------------------------------------------
# plan.json
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class PlanDecision(Record):
    """One decision of the plan (``num_shards``, ``assignment``), its value and why."""

    decision: str
    value: int | str
    reason: str


@dataclass(frozen=True, kw_only=True)
class CmcPlan(Record):
    """``cmc/plan.json``: how many shards, how points were dealt, and why."""

    WHAT = "CMC plan.json"

    schema_version: int
    num_shards: int
    n_points: int
    #: points with non-finite c2, in no shard (older plans lack it)
    n_masked: int = ABSENT
    n_angles: int
    n_time_points: int
    n_sampled_parameters: int
    analysis_mode: str
    per_angle_scaling: str
    #: older plans lack it; they sampled in the rates coordinates
    sampling_coordinates: str = ABSENT
    points_per_shard: list[int]
    seed: int
    #: the ``cmc.sharding`` settings (``num_shards`` is ``"auto"`` or a count)
    settings: dict[str, Any]
    decisions: list[PlanDecision]
    #: :meth:`homodyne_steps.inference.stratify.StratificationDiagnostics.to_dict`
    stratification: dict[str, Any]
    point_ids: str
    duration_s: float


# ---------------------------------------------------------------------------------------
# parameters.json
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class PosteriorStats(Record):
    """One parameter's combined posterior: mean, std, 94 % HDI, R-hat, bulk and tail ESS
    (each null where undefined: one chain, constant draws), its unit and its equal-tailed
    intervals."""

    mean: float | None
    std: float | None
    hdi_3: float | None = field(metadata={"key": "hdi_3%"})
    hdi_97: float | None = field(metadata={"key": "hdi_97%"})
    r_hat: float | None
    ess_bulk: float | None
    ess_tail: float | None
    #: equal-tailed 68 % and 95 % credible intervals (the draws' 16/84 and 2.5/97.5 %
    #: quantiles): under a bound-cut posterior mean ± sd is not the interval
    interval_68: list[float] | None = ABSENT
    interval_95: list[float] | None = ABSENT
    #: posterior sd over the prior's within the bounds
    #: (:func:`homodyne_steps.inference.identification.prior_sd_ratio`) and whether it
    #: exceeds 0.5 (the data did not halve the prior's width); physical parameters only
    prior_sd_ratio: float | None = ABSENT
    weakly_identified: bool = ABSENT
    unit: str


@dataclass(frozen=True, kw_only=True)
class AnglePosterior(Record):
    """One angle's contrast and offset; ``derived``: deterministics of the physical
    parameters (varpro), not sampled. A variable the shards lack is absent."""

    angle: int
    #: the shards' angle coordinate (the angle index when they record none)
    coordinate: float | str
    derived: bool
    contrast: PosteriorStats = ABSENT
    offset: PosteriorStats = ABSENT


@dataclass(frozen=True, kw_only=True)
class CmcConvergence(Record):
    status: str
    all_converged: bool
    quality_flag: str
    min_r_hat: float | None
    max_r_hat: float | None
    min_ess: float | None
    min_ess_tail: float | None
    acceptance_rate: float | None
    divergences: int
    #: the physical parameters whose posterior is mostly their prior (PosteriorStats)
    weakly_identified: list[str] = ABSENT
    summary: str


@dataclass(frozen=True, kw_only=True)
class TimeSpread(Record):
    """Sum and maximum over the shards (null when no shard recorded its time)."""

    sum: float | None
    max: float | None


@dataclass(frozen=True, kw_only=True)
class SamplingSummary(Record):
    n_chains: int
    n_samples: int
    #: from the first shard's record (null when it has none)
    n_warmup: int | None
    total_samples: int
    num_shards: int
    num_shards_used: int
    combination_method: str
    shard_sampling_time_s: TimeSpread
    combine_time_s: float


@dataclass(frozen=True, kw_only=True)
class CmcParameters(Record):
    """``cmc/parameters.json``, the combination stage's sentinel (written last)."""

    WHAT = "CMC parameters.json"

    schema_version: int
    method: str
    analysis_mode: str
    #: the kernel's shear form and integral, from the shards (null: shards without it)
    model: dict[str, str] | None = ABSENT
    combination_method: str
    parameters: dict[str, PosteriorStats]
    #: null when the shards hold no per-angle scaling
    per_angle: list[AnglePosterior] | None
    per_angle_scaling: str
    convergence: CmcConvergence
    sampling_summary: SamplingSummary
    #: how σ was scaled (:func:`homodyne_steps.inference.noise.noise_scale_record`); null
    #: when the shards do not say, absent from older files
    noise_scale: dict[str, Any] | None = ABSENT
    #: the parameters whose likelihood the NLSQ record's speckle σ calibrated
    #: (:mod:`homodyne_steps.inference.curvature`); null: none
    curvature_adjustment: list[str] | None = ABSENT

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.parameters)


# ---------------------------------------------------------------------------------------
# analysis_results_cmc.json
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SamplingQuality(Record):
    convergence_status: str
    all_converged: bool
    quality_flag: str
    summary: str
    warnings: list[str]
    recommendations: list[str]


@dataclass(frozen=True, kw_only=True)
class CmcDatasetInfo(Record):
    analysis_mode: str
    per_angle_scaling: str
    #: null when neither the shards' scaling nor NLSQ tell the angles
    n_phi: int | None
    total_data_points: int
    data_points_used: int
    #: shard index (as a string) -> its points
    n_points_per_shard: dict[str, int]
    num_shards: int
    #: per shard, the power of its prior (null when the shard file does not record it)
    prior_tempering: list[float | None]
    noise_scale: dict[str, Any] | None = ABSENT
    shard_files: list[str]


@dataclass(frozen=True, kw_only=True)
class Prior(Record):
    mu: float
    sigma: float


@dataclass(frozen=True, kw_only=True)
class ParameterSpace(Record):
    bounds: list[float]
    unit: str
    prior: Prior


@dataclass(frozen=True, kw_only=True)
class NlsqAgreement(Record):
    """One parameter's CMC mean against the NLSQ value."""

    nlsq_value: float
    nlsq_uncertainty: float | None
    cmc_mean: float | None
    cmc_std: float | None
    difference: float | None
    z_score: float | None


@dataclass(frozen=True, kw_only=True)
class NlsqComparison(Record):
    file: str
    z_score_definition: str
    parameters: dict[str, NlsqAgreement]
    max_abs_z_score: float | None
    #: null when no z-score is defined
    consistent: bool | None


@dataclass(frozen=True, kw_only=True)
class CombineSettingsRecord(Record):
    """The ``cmc.combine`` settings of the run (``CombineSettings.to_mapping``)."""

    method: str
    outlier_p_value: float
    max_divergence_rate: float
    rhat_good: float
    rhat_acceptable: float
    ess_warn: float
    shard_ess_min: float = ABSENT


@dataclass(frozen=True, kw_only=True)
class CmcAnalysis(Record):
    """``cmc/analysis_results_cmc.json``: quality in words, data, sampling, priors, NLSQ."""

    WHAT = "CMC analysis_results_cmc.json"

    schema_version: int
    method: str
    analysis_mode: str
    combination_method: str
    sampling_quality: SamplingQuality
    dataset_info: CmcDatasetInfo
    sampling_summary: SamplingSummary
    parameter_space: dict[str, ParameterSpace]
    #: null when the stage was not given the NLSQ parameters
    nlsq_comparison: NlsqComparison | None
    settings: CombineSettingsRecord


# ---------------------------------------------------------------------------------------
# combination_report.json
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ExcludedShard(Record):
    shard: int
    #: the test that excluded it (``outlier``, ``divergence``, ``degenerate``, ...)
    excluded_by: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class ShardNote(Record):
    shard: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class ShardProblem(Record):
    shard: int
    problem: str


@dataclass(frozen=True, kw_only=True)
class ShardAgreement(Record):
    """One shard's means and stds, and its z-scores against the combined mean."""

    shard: int
    kept: bool
    means: dict[str, float | None]
    stds: dict[str, float | None]
    z_vs_combined: dict[str, float | None]


@dataclass(frozen=True, kw_only=True)
class ParameterHeterogeneity(Record):
    """Null numbers: undefined (one kept shard, dof 0)."""

    chi2: float | None
    reduced_chi2: float | None
    p_value: float | None
    heterogeneous: bool


@dataclass(frozen=True, kw_only=True)
class Heterogeneity(Record):
    definition: str
    dof: int
    per_parameter: dict[str, ParameterHeterogeneity]
    heterogeneous_parameters: list[str]
    detected: bool


@dataclass(frozen=True, kw_only=True)
class CombinationReport(Record):
    """``cmc/combination_report.json``: which shards were combined, how, and how they agree."""

    WHAT = "CMC combination_report.json"

    schema_version: int
    method: str
    settings: CombineSettingsRecord
    num_shards: int
    kept_shards: list[int]
    excluded_shards: list[ExcludedShard]
    flagged_but_kept: list[ShardNote]
    parameter_names: list[str]
    combination_coordinates: str
    #: how the prior was applied to the combined draws (``consensus.apply_prior``); null
    #: when the combination method applies none
    prior_application: dict[str, Any] | None = ABSENT
    not_converged_shards: list[ShardProblem] = ABSENT
    jointly_combined: list[str]
    combined_per_component: list[str]
    ignored_variables: list[str]
    per_shard: list[ShardAgreement]
    combined_mean: dict[str, float | None]
    heterogeneity: Heterogeneity


# ---------------------------------------------------------------------------------------
# diagnostics.json
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DiagnosticsConvergence(Record):
    r_hat_threshold: float
    r_hat_good: float
    ess_threshold: float
    status: str
    all_converged: bool


@dataclass(frozen=True, kw_only=True)
class DiagnosticThresholds(Record):
    r_hat_good: float
    r_hat_acceptable: float
    ess_warn: float
    bfmi_warn: float
    max_divergence_rate: float
    outlier_p_value: float
    outlier_test: str
    shard_ess_min: float = ABSENT
    heterogeneity_p_value: float


@dataclass(frozen=True, kw_only=True)
class ParameterDiagnostics(Record):
    """One assessed parameter: R-hat and ESS (null where undefined), its label."""

    name: str
    r_hat: float | None
    ess_bulk: float | None
    ess_tail: float | None
    #: good, acceptable, poor or unknown (R-hat undefined)
    quality: str
    converged: bool
    warnings: list[str]


@dataclass(frozen=True, kw_only=True)
class SamplingEfficiency(Record):
    """Over the kept shards; null where no shard recorded the sample stat."""

    acceptance_rate: float | None
    divergences: int
    divergence_rate: float | None
    mean_tree_depth: float | None
    max_tree_depth: float | None
    mean_step_size: float | None


@dataclass(frozen=True, kw_only=True)
class ShardSummary(Record):
    """One shard: its draws, sampler health, convergence on its own and its fate."""

    shard: int
    file: str
    n_points: int
    n_chains: int
    n_samples: int
    means: dict[str, float | None]
    std: dict[str, float | None]
    divergences: int
    divergence_rate: float
    #: energy BFMI per chain; null without energy sample stats
    bfmi: list[float | None] | None
    min_bfmi: float | None
    max_r_hat: float | None
    min_ess: float | None
    converged: bool
    convergence_problem: str | None = ABSENT
    acceptance_rate: float | None
    mean_tree_depth: float | None
    step_size: float | None
    #: the shard's own timings (seconds), null when its record has none
    timings: dict[str, Any] | None
    seed: int | None
    excluded: bool
    excluded_by: str | None
    reason: str | None
    flagged_but_kept: str | None


@dataclass(frozen=True, kw_only=True)
class CmcSpecific(Record):
    combination_method: str
    num_shards: int
    num_shards_used: int
    shard_summary: list[ShardSummary]


@dataclass(frozen=True, kw_only=True)
class CmcDiagnostics(Record):
    """``cmc/diagnostics.json``: thresholds, per-parameter labels, sampler, shards."""

    WHAT = "CMC diagnostics.json"

    schema_version: int
    convergence: DiagnosticsConvergence
    thresholds: DiagnosticThresholds
    per_parameter_diagnostics: list[ParameterDiagnostics]
    sampling_efficiency: SamplingEfficiency
    cmc_specific: CmcSpecific


__all__ = [
    "AnglePosterior",
    "CmcAnalysis",
    "CmcConvergence",
    "CmcDatasetInfo",
    "CmcDiagnostics",
    "CmcParameters",
    "CmcPlan",
    "CmcSpecific",
    "CombinationReport",
    "CombineSettingsRecord",
    "DiagnosticThresholds",
    "DiagnosticsConvergence",
    "ExcludedShard",
    "Heterogeneity",
    "NlsqAgreement",
    "NlsqComparison",
    "ParameterDiagnostics",
    "ParameterHeterogeneity",
    "ParameterSpace",
    "PlanDecision",
    "PosteriorStats",
    "Prior",
    "SamplingEfficiency",
    "SamplingQuality",
    "SamplingSummary",
    "ShardAgreement",
    "ShardNote",
    "ShardProblem",
    "ShardSummary",
    "TimeSpread",
]
