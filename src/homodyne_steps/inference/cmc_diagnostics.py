"""CMC convergence and quality diagnostics: pure functions of draws and shard records.

Per parameter of the combined draws: mean, std, 94 % HDI, R-hat, bulk and tail ESS
(:func:`posterior_summary`, ArviZ) and a label (:func:`quality_label`). Per shard: its own
R-hat and ESS (:func:`shard_convergence`: a stuck shard can hide in the combined R-hat,
because consensus gives its wide posterior little weight) and its energy BFMI
(:func:`shard_bfmi`). Per run: the labels, divergences, low BFMI, excluded or
disagreeing shards, the prior weights and the agreement with NLSQ turned into one status
and plain-language warnings and advice (:func:`diagnose`, :func:`assess_quality`).

Undefined numbers (R-hat of one chain, say) are None, never NaN
(:func:`~homodyne_steps.io.serialise.finite_or_none`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from homodyne_steps.inference.consensus import (
    MIN_WEIGHT_ESS,
    PARETO_K_MAX,
    Combination,
    Selection,
    heterogeneity,
)
from homodyne_steps.io.nlsq_files import NlsqParameters
from homodyne_steps.io.serialise import finite_or_none
from homodyne_steps.io.shard_io import Shard

BFMI_WARN = 0.3  # energy BFMI below this: the sampler explores the energy poorly
HETEROGENEITY_P = 1e-3  # p-value of the shard-mean χ² below which shards disagree
NLSQ_Z_WARN = 3.0  # |z| of CMC mean − NLSQ value above which the two disagree
HDI_PROB = 0.94


class Thresholds(Protocol):
    """What the diagnostics read from the stage's settings (``CombineSettings``)."""

    @property
    def rhat_good(self) -> float: ...

    @property
    def rhat_acceptable(self) -> float: ...

    @property
    def ess_warn(self) -> float: ...

    @property
    def shard_ess_min(self) -> float: ...


# ---------------------------------------------------------------------------------------
# Draws: summaries, per-shard convergence, BFMI
# ---------------------------------------------------------------------------------------
def _flat_idata(draws: np.ndarray, names: Sequence[str]):
    import arviz as az

    return az.from_dict(posterior={n: draws[..., j] for j, n in enumerate(names)})


def posterior_summary(draws: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-parameter mean, std, 94 % HDI, R-hat, bulk and tail ESS (ArviZ) and the
    equal-tailed 68 % and 95 % intervals, as arrays."""
    import warnings

    import arviz as az

    idata = _flat_idata(draws, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one chain / constant draws: NaN
        rhat = az.rhat(idata)
        ess_bulk = az.ess(idata, method="bulk")
        ess_tail = az.ess(idata, method="tail")
        hdi = az.hdi(idata, hdi_prob=HDI_PROB)

    def col(ds) -> np.ndarray:
        return np.array([float(ds[n].values) for n in names])

    return {
        "mean": draws.mean(axis=(0, 1)),
        "std": draws.std(axis=(0, 1), ddof=1)
        if draws.shape[0] * draws.shape[1] > 1
        else np.zeros(draws.shape[2]),
        "hdi_3%": np.array([float(hdi[n].sel(hdi="lower")) for n in names]),
        "hdi_97%": np.array([float(hdi[n].sel(hdi="higher")) for n in names]),
        # (P, 2): equal-tailed 68 % and 95 % intervals
        "interval_68": np.quantile(draws, [0.16, 0.84], axis=(0, 1)).T,
        "interval_95": np.quantile(draws, [0.025, 0.975], axis=(0, 1)).T,
        "r_hat": col(rhat),
        "ess_bulk": col(ess_bulk),
        "ess_tail": col(ess_tail),
    }


def shard_bfmi(shard: Shard) -> np.ndarray | None:
    """Energy BFMI per chain of a shard (ArviZ), or None without energy."""
    import arviz as az

    energy = shard.stats.get("energy")
    if energy is None or energy.ndim != 2 or energy.shape[1] < 2:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(az.bfmi(energy), dtype=np.float64)


def shard_convergence(shard: Shard, settings: Thresholds) -> dict[str, Any]:
    """R-hat and ESS of one shard's sampled parameters, and what is wrong if anything.

    A shard whose chains disagree (R-hat > rhat_acceptable) or whose ESS is below
    ``shard_ess_min`` did not sample its posterior; consensus would give its wide or
    bimodal draws little weight, hiding the failure in the combined R-hat.
    """
    import warnings

    import arviz as az

    n = shard.n_joint
    names = shard.names[:n]
    idata = _flat_idata(shard.draws[..., :n], names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rhat = az.rhat(idata) if shard.draws.shape[0] > 1 else None
        ess_b = az.ess(idata, method="bulk")
        ess_t = az.ess(idata, method="tail")

    def col(ds) -> list[float | None]:
        return [finite_or_none(float(ds[x].values)) for x in names]

    r = col(rhat) if rhat is not None else [None] * n
    eb, et = col(ess_b), col(ess_t)
    problems = []
    bad_r = [(x, v) for x, v in zip(names, r, strict=True) if v and v > settings.rhat_acceptable]
    if bad_r:
        problems.append(
            "R-hat "
            + ", ".join(f"{x} {v:.3g}" for x, v in bad_r)
            + f" > {settings.rhat_acceptable:g} (its chains disagree)"
        )
    ess = [
        min((e for e in pair if e is not None), default=None) for pair in zip(eb, et, strict=True)
    ]
    bad_e = [
        (x, e) for x, e in zip(names, ess, strict=True) if e is None or e < settings.shard_ess_min
    ]
    if bad_e:
        problems.append(
            "ESS "
            + ", ".join(f"{x} {'undefined' if e is None else f'{e:.0f}'}" for x, e in bad_e)
            + f" < shard_ess_min {settings.shard_ess_min:g}"
        )
    finite_r = [v for v in r if v is not None]
    finite_e = [e for e in ess if e is not None]
    return {
        "max_r_hat": max(finite_r) if finite_r else None,
        "min_ess": min(finite_e) if finite_e else None,
        "problem": "; ".join(problems) or None,
    }


# ---------------------------------------------------------------------------------------
# Quality: labels, warnings, advice and the overall status
# ---------------------------------------------------------------------------------------
def quality_label(r_hat: float | None, settings: Thresholds) -> str:
    """``good`` (R-hat < rhat_good), ``acceptable`` (≤ rhat_acceptable), ``poor``, or
    ``unknown`` when R-hat is undefined (one chain, constant draws)."""
    if r_hat is None or not math.isfinite(r_hat):
        return "unknown"
    if r_hat < settings.rhat_good:
        return "good"
    if r_hat <= settings.rhat_acceptable:
        return "acceptable"
    return "poor"


def _parameter_quality(
    names: Sequence[str], summary: Mapping[str, np.ndarray], settings: Thresholds
) -> tuple[list[dict[str, Any]], list[str], list[str], list[str]]:
    """Per parameter: its record, its label, whether its ESS is low, and the notes (in
    parameter order); returns ``(per_parameter, labels, low_ess_names, notes)``."""
    per_param, labels, low_ess, all_notes = [], [], [], []
    for j, n in enumerate(names):
        r = finite_or_none(summary["r_hat"][j])
        eb, et = finite_or_none(summary["ess_bulk"][j]), finite_or_none(summary["ess_tail"][j])
        label = quality_label(r, settings)
        labels.append(label)
        notes = []
        if label == "acceptable":
            notes.append(
                f"R-hat of {n} is {r:.3f} (between {settings.rhat_good:g} and "
                f"{settings.rhat_acceptable:g})"
            )
        elif label == "poor":
            notes.append(
                f"R-hat of {n} is {r:.3f} (> {settings.rhat_acceptable:g}): the chains "
                "disagree and this parameter has not converged"
            )
        elif label == "unknown":
            notes.append(
                f"R-hat of {n} is undefined (needs at least 2 chains with varying draws): "
                "convergence cannot be confirmed"
            )
        ess_min = min((e for e in (eb, et) if e is not None), default=None)
        if ess_min is None or ess_min < settings.ess_warn:
            low_ess.append(n)
            shown = "undefined" if ess_min is None else f"{ess_min:.0f}"
            notes.append(f"effective sample size of {n} is {shown} (< {settings.ess_warn:g})")
        all_notes.extend(notes)
        per_param.append(
            {
                "name": n,
                "r_hat": r,
                "ess_bulk": eb,
                "ess_tail": et,
                "quality": label,
                "converged": label in ("good", "acceptable"),
                "warnings": notes,
            }
        )
    return per_param, labels, low_ess, all_notes


def _parameter_advice(labels: Sequence[str], low_ess: Sequence[str]) -> list[str]:
    recs = []
    if any(lab in ("acceptable", "poor", "unknown") for lab in labels):
        recs.append("increase num_warmup (and check the chains' trace plots)")
    if "unknown" in labels:
        recs.append("run at least 2 chains per shard so that R-hat can be computed")
    if low_ess:
        recs.append("increase num_samples (or num_chains) to raise the effective sample size")
    return recs


def _sampler_findings(
    divergences: int, n_draws_total: int, low_bfmi: Mapping[int, float] | None
) -> tuple[list[str], list[str]]:
    """Warnings and advice about divergences and low BFMI in the kept shards."""
    warnings_, recs = [], []
    if divergences:
        rate = divergences / n_draws_total if n_draws_total else float("nan")
        warnings_.append(
            f"{divergences} divergent transitions in the kept shards (rate {rate:.3g})"
        )
        recs.append(
            "raise the target acceptance probability or reparameterise to remove divergences"
        )
    for k, b in sorted((low_bfmi or {}).items()):
        warnings_.append(
            f"shard {k}: energy BFMI {b:.3f} < {BFMI_WARN:g}; the sampler explores the "
            "posterior poorly"
        )
        recs.append("increase num_warmup or reparameterise (low BFMI)")
    return warnings_, recs


def _shard_findings(
    excluded: Mapping[int, str] | None,
    flagged_kept: Mapping[int, str] | None,
    heterogeneous: Sequence[str],
    stuck_shards: Mapping[int, str] | None,
) -> tuple[list[str], list[str]]:
    """Warnings and advice about excluded, flagged, disagreeing and stuck shards."""
    warnings_, recs = [], []
    if excluded:
        ids = sorted(excluded)
        for k in ids:
            warnings_.append(f"shard {k} excluded: {excluded[k]}")
        recs.append(f"check shard heterogeneity: shards {ids} excluded")
    if flagged_kept:
        ids = sorted(flagged_kept)
        for k in ids:
            warnings_.append(f"shard {k} flagged but kept: {flagged_kept[k]}")
        recs.append(f"check shard heterogeneity: shards {ids} were flagged but kept")
    if heterogeneous:
        warnings_.append(
            f"shard means of {list(heterogeneous)} scatter more than their posterior widths "
            "allow (χ² p-value < {:g}): the shards disagree".format(HETEROGENEITY_P)
        )
        recs.append("check shard heterogeneity (data differ between shards, or the model misfits)")
    for k, problem in sorted((stuck_shards or {}).items()):
        warnings_.append(f"shard {k} did not converge: {problem}")
        recs.append(f"rerun shard {k} with more warmup/samples, or check its trace plots")
    return warnings_, recs


def _status(
    names: Sequence[str],
    labels: Sequence[str],
    stuck_shards: Mapping[int, str] | None,
    warned: bool,
    settings: Thresholds,
) -> dict[str, Any]:
    """The overall status, its quality flag and a one-line summary."""
    poor = [n for n, lab in zip(names, labels, strict=True) if lab in ("poor", "unknown")]
    all_converged = not poor and not stuck_shards
    if not all_converged:
        status = "not_converged"
        parts = []
        if poor:
            parts.append(f"R-hat is above {settings.rhat_acceptable:g} or undefined for {poor}")
        if stuck_shards:
            parts.append(f"shards {sorted(stuck_shards)} did not converge on their own")
        summary_text = (
            f"NOT CONVERGED: {'; '.join(parts)}. Do not use these estimates; re-run with "
            "more warmup/samples."
        )
        flag = "poor"
    elif warned:
        status = "converged_with_warnings"
        summary_text = "Converged, with warnings (see 'warnings')."
        flag = "acceptable"
    else:
        status = "converged"
        summary_text = (
            f"Converged: all R-hat < {settings.rhat_good:g} and all ESS >= "
            f"{settings.ess_warn:g}; no divergences."
        )
        flag = "good"
    return {
        "convergence_status": status,
        "all_converged": all_converged,
        "quality_flag": flag,
        "summary": summary_text,
    }


def assess_quality(
    names: Sequence[str],
    summary: Mapping[str, np.ndarray],
    settings: Thresholds,
    *,
    divergences: int = 0,
    n_draws_total: int = 0,
    low_bfmi: Mapping[int, float] | None = None,
    excluded: Mapping[int, str] | None = None,
    flagged_kept: Mapping[int, str] | None = None,
    heterogeneous: Sequence[str] = (),
    stuck_shards: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Labels per parameter, an overall status, and plain-language warnings/advice.

    Status: ``not_converged`` when any R-hat is > rhat_acceptable or undefined, or any
    shard did not converge on its own (``stuck_shards``: the combined draws of a stuck
    shard can look well mixed, because consensus gives its wide posterior little weight);
    ``converged_with_warnings`` when any R-hat is only acceptable, an ESS is below
    ``ess_warn``, there are divergences, low BFMI, excluded or disagreeing shards;
    ``converged`` otherwise.
    """
    per_param, labels, low_ess, notes = _parameter_quality(names, summary, settings)
    sampler_w, sampler_r = _sampler_findings(divergences, n_draws_total, low_bfmi)
    shard_w, shard_r = _shard_findings(excluded, flagged_kept, heterogeneous, stuck_shards)
    warnings_ = notes + sampler_w + shard_w
    recs = _parameter_advice(labels, low_ess) + sampler_r + shard_r
    return {
        **_status(names, labels, stuck_shards, bool(warnings_), settings),
        "warnings": warnings_,
        "recommendations": list(dict.fromkeys(recs)),  # each piece of advice once, in order
        "per_parameter": per_param,
    }


# ---------------------------------------------------------------------------------------
# The run's diagnosis
# ---------------------------------------------------------------------------------------
@dataclass
class Diagnosis:
    """What the stage judged of the shards and of their combined draws."""

    summary: dict[str, np.ndarray]  # posterior_summary of the combined draws
    shard_means: dict[int, np.ndarray]  # every shard's, in the parameters' own coordinates
    shard_stds: dict[int, np.ndarray]
    verdicts: dict[int, dict[str, Any]]  # shard_convergence of every shard
    stuck: dict[int, str]  # shards that did not converge on their own -> why
    heterogeneity: dict[str, Any]  # of the kept shards' means around the combined mean
    heterogeneous: list[str]  # assessed parameters on which the kept shards disagree
    bfmi: dict[int, np.ndarray | None]  # per chain, every shard's
    divergences: int  # in the kept shards
    n_draws_kept: int
    quality: dict[str, Any]  # assess_quality, with the run-level checks added
    comparison: dict[str, Any] | None  # with NLSQ (nlsq_comparison), None without


def stuck_shards(verdicts: Mapping[int, Mapping[str, Any]], selection: Selection) -> dict[int, str]:
    """Shards that did not converge on their own, and degenerate ones (the ESS of a few
    repeated points can look fine)."""
    stuck = {k: v["problem"] for k, v in verdicts.items() if v["problem"]}
    for k, stage in selection.excluded_by.items():
        if stage == "degenerate" and k not in stuck:
            stuck[k] = selection.excluded[k]
    return stuck


def heterogeneous_parameters(het: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """The first ``len(names)`` parameters whose shard-mean χ² p-value < HETEROGENEITY_P."""
    return [
        n
        for j, n in enumerate(names)
        if het["dof"] > 0 and np.isfinite(het["p_value"][j]) and het["p_value"][j] < HETEROGENEITY_P
    ]


def low_bfmi(bfmi: Mapping[int, np.ndarray | None], kept: Sequence[Shard]) -> dict[int, float]:
    """Kept shards whose lowest chain BFMI is below BFMI_WARN -> that BFMI."""
    return {
        sh.index: float(np.nanmin(bfmi[sh.index]))
        for sh in kept
        if bfmi[sh.index] is not None
        and np.any(np.isfinite(bfmi[sh.index]))
        and np.nanmin(bfmi[sh.index]) < BFMI_WARN
    }


def check_prior_weights(quality: dict[str, Any], restoration: Mapping[str, Any] | None) -> None:
    """A prior that could not be applied (importance weights unusable, and the fresh
    draws of :mod:`prior_sampling` divergent or without a start) makes the run
    not_converged."""
    if restoration is None or restoration.get("reliable") is not False:
        return
    weights = restoration.get("importance_weights", restoration)
    crossed = restoration.get("bounds_crossed") or []
    cut = (
        f"; the combined draws cross the bounds ({'; '.join(crossed)}): a posterior cut by a "
        "bound inside its bulk, which Gaussian shards cannot carry"
        if crossed
        else ""
    )
    if "divergence_rate" in restoration:
        afresh = (
            "; drawing the Gaussian likelihood of the combined draws times the prior afresh "
            f"diverged in {restoration['divergence_rate']:.0%} of its draws"
        )
    elif restoration.get("method") == "gaussian_likelihood_times_prior":
        afresh = "; no combined draw lies inside the bounds to draw afresh from"
    else:
        afresh = ""
    quality["warnings"].append(
        f"the prior weights of the combined draws are unusable (Pareto k̂ "
        f"{weights['pareto_k']:.2f}, limit {PARETO_K_MAX}; {weights['ess']:.0f} effective "
        f"draws, at least {MIN_WEIGHT_ESS:.0f} needed): the prior and the data disagree (or "
        f"a parameter is not identified), and the posterior cannot be trusted{cut}{afresh}"
    )
    quality["convergence_status"] = "not_converged"
    quality["all_converged"] = False
    quality["quality_flag"] = "poor"
    quality["summary"] = (
        "NOT CONVERGED: the prior could not be applied to the combined draws (Pareto "
        f"k̂ {weights['pareto_k']:.2f}). Do not use these estimates."
    )


def check_tempering(quality: dict[str, Any], shards: Sequence[Shard]) -> None:
    """Warn when the shards' prior power is not 1/K (the prior then counts other than once)."""
    K = shards[0].num_shards
    tempering = [sh.prior_tempering for sh in shards]
    if any(t is not None and not math.isclose(t, 1.0 / K, rel_tol=1e-6) for t in tempering):
        quality["warnings"].append(
            f"shard prior_tempering {sorted({t for t in tempering if t is not None})} is not "
            f"1/K = {1.0 / K:.6g}: the consensus then counts the prior a different number "
            "of times than once"
        )


def check_nlsq_agreement(quality: dict[str, Any], comparison: Mapping[str, Any] | None) -> None:
    """Warn when CMC and NLSQ disagree (:func:`nlsq_comparison`)."""
    if comparison and comparison["consistent"] is False:
        far = [n for n, c in comparison["parameters"].items() if abs(c["z_score"] or 0) > 3]
        quality["warnings"].append(
            f"CMC and NLSQ disagree by more than {NLSQ_Z_WARN:g} σ for {far}"
        )


def diagnose(
    shards: Sequence[Shard],
    combination: Combination,
    settings: Thresholds,
    nlsq: tuple[NlsqParameters, Path] | None = None,
) -> Diagnosis:
    """Judge one run: every shard on its own, the combined draws, the shards' agreement,
    the prior weights and, with ``nlsq`` (its parameters record and path), NLSQ."""
    first, selection = shards[0], combination.selection
    kept, names = selection.kept, first.names
    shard_means = {sh.index: sh.mean for sh in shards}
    shard_stds = {sh.index: sh.std for sh in shards}
    verdicts = {sh.index: shard_convergence(sh, settings) for sh in shards}
    stuck = stuck_shards(verdicts, selection)
    summary = posterior_summary(combination.draws, names)
    het = heterogeneity(
        np.stack([shard_means[sh.index] for sh in kept]),
        np.stack([shard_stds[sh.index] ** 2 for sh in kept]),
        summary["mean"],
    )
    # Derived varpro scaling (each shard's conditional optimum, not a sampled parameter)
    # is reported but not assessed: its spread within a shard ignores its own uncertainty,
    # so its ESS and its scatter between shards say nothing about convergence.
    assessed = names[: first.n_joint] if first.scaling_derived else names
    heterogeneous = heterogeneous_parameters(het, assessed)
    bfmi = {sh.index: shard_bfmi(sh) for sh in shards}
    divergences = int(sum(sh.divergences for sh in kept))
    n_draws_kept = int(sum(sh.draws.shape[0] * sh.draws.shape[1] for sh in kept))
    quality = assess_quality(
        assessed,
        {k: v[: len(assessed)] for k, v in summary.items()},
        settings,
        divergences=divergences,
        n_draws_total=n_draws_kept,
        low_bfmi=low_bfmi(bfmi, kept),
        excluded=selection.excluded,
        flagged_kept=selection.flagged_kept,
        heterogeneous=heterogeneous,
        stuck_shards=stuck,
    )
    check_prior_weights(quality, combination.restoration)
    check_tempering(quality, shards)
    comparison = nlsq_comparison(nlsq[0], nlsq[1], names, summary) if nlsq is not None else None
    check_nlsq_agreement(quality, comparison)
    return Diagnosis(
        summary=summary,
        shard_means=shard_means,
        shard_stds=shard_stds,
        verdicts=verdicts,
        stuck=stuck,
        heterogeneity=het,
        heterogeneous=heterogeneous,
        bfmi=bfmi,
        divergences=divergences,
        n_draws_kept=n_draws_kept,
        quality=quality,
        comparison=comparison,
    )


# ---------------------------------------------------------------------------------------
# Agreement with NLSQ
# ---------------------------------------------------------------------------------------
def nlsq_comparison(
    rec: NlsqParameters, path: Path, names: Sequence[str], summary: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    zs = []
    for j, n in enumerate(names):
        entry = rec.parameters.get(n)
        if entry is None or finite_or_none(entry.value) is None:
            continue
        value, unc = float(entry.value), finite_or_none(entry.uncertainty)
        mean, std = float(summary["mean"][j]), float(summary["std"][j])
        sd = math.sqrt(std**2 + (unc or 0.0) ** 2)
        z = (mean - value) / sd if sd > 0 else None
        if z is not None:
            zs.append(abs(z))
        out[n] = {
            "nlsq_value": value,
            "nlsq_uncertainty": unc,
            "cmc_mean": mean,
            "cmc_std": std,
            "difference": mean - value,
            "z_score": z,
        }
    max_z = max(zs) if zs else None
    return {
        "file": str(path),
        "z_score_definition": "(cmc_mean - nlsq_value) / sqrt(cmc_std² + nlsq_uncertainty²)",
        "parameters": out,
        "max_abs_z_score": max_z,
        "consistent": None if max_z is None else bool(max_z <= NLSQ_Z_WARN),
    }
