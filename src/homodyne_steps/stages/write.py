"""The ``write`` stage: every dataset's results in one table (the seed's "write" phase).

``results/summary.csv`` and ``results/summary.json`` hold one row per dataset (each
dataset is one q): analysis mode, q, angles and frames, the QC score, NLSQ values ±
uncertainties with the reduced χ², CMC posterior mean ± sd with the 94 % HDI, R-hat and
bulk ESS per parameter, convergence and quality flags, and the paths of the dataset's
outputs. What a user pastes into a lab notebook or a paper table.

Only the datasets' small JSON records are read (never the data or the samples), so the
table of many datasets is written in well under a second; adding a dataset reruns this
stage only. Numbers are copied unchanged from the records (the CSV writes each float in
its shortest round-trip form, so it reads back to the same value). A parameter a mode
does not have, or CMC that was not run, is an empty cell / ``null``.

``quality`` is the worst of the QC status, the NLSQ quality flag and the CMC quality
flag (good, warning, poor); ``flags`` lists every reason, ``;``-separated. A per-angle
contrast or offset out of its physical range (``nlsq_scaling_out_of_range``) makes the
NLSQ quality at least ``warning`` whatever the record says.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from homodyne_steps.errors import DataError
from homodyne_steps.io.cmc_files import CmcAnalysis, CmcParameters, CombinationReport
from homodyne_steps.io.data_files import LoadedReport, QcReport
from homodyne_steps.io.nlsq_files import AngleScaling, DatasetInfo, NlsqAnalysis, NlsqParameters
from homodyne_steps.io.record import Record, or_none
from homodyne_steps.io.serialise import SerialisationError, atomic_path, write_json
from homodyne_steps.physics.model_settings import ModelSettings
from homodyne_steps.physics.registry import REGISTRY, canonical_mode

SCHEMA_VERSION = 1
RANK = {"good": 0, "warning": 1, "poor": 2}
CMC_QUALITY = {"good": "good", "acceptable": "warning", "poor": "poor"}
# (column suffix, PosteriorStats attribute, description)
CMC_STATS = (
    ("mean", "mean", "posterior mean"),
    ("sd", "std", "posterior standard deviation"),
    ("hdi_3%", "hdi_3", "lower end of the 94 % highest-density interval"),
    ("hdi_97%", "hdi_97", "upper end of the 94 % highest-density interval"),
    ("r_hat", "r_hat", "R-hat (split, rank-normalised)"),
    ("ess_bulk", "ess_bulk", "bulk effective sample size"),
)


R = TypeVar("R", bound=Record)


class SummaryError(DataError):
    """A dataset's result record is missing or not what the write stage expects."""


# ---------------------------------------------------------------------------------------
# Reading one dataset
# ---------------------------------------------------------------------------------------
def dataset_files(results_dir: str | os.PathLike[str], dataset: str) -> dict[str, Path]:
    """The records a row is made of (``cmc_*`` may be absent) and the output folders."""
    base = Path(results_dir) / dataset
    return {
        "loaded": base / "data" / "loaded.json",
        "qc": base / "data" / "qc_report.json",
        "nlsq": base / "nlsq" / "parameters.json",
        "nlsq_analysis": base / "nlsq" / "analysis_results_nlsq.json",
        "cmc": base / "cmc" / "parameters.json",
        "cmc_analysis": base / "cmc" / "analysis_results_cmc.json",
        "cmc_report": base / "cmc" / "combination_report.json",
    }


def _read(cls: type[R], path: Path, dataset: str, *, required: bool = True) -> R | None:
    if not path.is_file():
        if not required:
            return None
        raise SummaryError(f"dataset {dataset!r}: {cls.WHAT} {path} does not exist (run its stage)")
    try:
        return cls.read(path)
    except SerialisationError as exc:
        raise SummaryError(f"dataset {dataset!r}: {exc}") from None


def _worst(*labels: str | None) -> str:
    known = [lab for lab in labels if lab in RANK]
    return max(known, key=RANK.__getitem__) if known else "good"


def _scaling_out_of_range(per_angle: Sequence[AngleScaling]) -> list[str]:
    """``contrast@phi=30``-style entries for the per-angle scaling flags of the NLSQ
    record (``contrast_out_of_range``, ``offset_out_of_range``)."""
    out = []
    for entry in per_angle:
        for f in entry.flags:
            what = str(f.get("flag", "")).removesuffix("_out_of_range")
            out.append(f"{what}@phi={entry.phi_deg:g}")
    return out


@dataclass(frozen=True)
class DatasetRecords:
    """The typed records one row is made of (the CMC ones None when CMC was not run)."""

    loaded: LoadedReport
    qc: QcReport
    nlsq: NlsqParameters
    nlsq_analysis: NlsqAnalysis
    cmc: CmcParameters | None
    cmc_analysis: CmcAnalysis | None
    cmc_report: CombinationReport | None


def _read_records(files: Mapping[str, Path], dataset: str) -> DatasetRecords:
    """The dataset's JSON records (``dataset_files``)."""
    cmc = _read(CmcParameters, files["cmc"], dataset, required=False)
    ran = cmc is not None
    return DatasetRecords(
        loaded=_read(LoadedReport, files["loaded"], dataset),
        qc=_read(QcReport, files["qc"], dataset),
        nlsq=_read(NlsqParameters, files["nlsq"], dataset),
        nlsq_analysis=_read(NlsqAnalysis, files["nlsq_analysis"], dataset),
        cmc=cmc,
        cmc_analysis=_read(CmcAnalysis, files["cmc_analysis"], dataset, required=ran),
        cmc_report=_read(CombinationReport, files["cmc_report"], dataset, required=ran),
    )


def _analysis_mode(nlsq: NlsqParameters, path: Path) -> str:
    """The canonical analysis mode of the NLSQ parameters record at ``path``."""
    try:
        return canonical_mode(nlsq.analysis_mode)
    except ValueError as exc:
        raise SummaryError(f"{path}: {exc}") from None


def _qc_section(qc: QcReport) -> tuple[dict[str, Any], str, list[str]]:
    """The QC section (score, label, status, issue and repair counts), its quality, flags."""
    overall = qc.overall
    flags: list[str] = []
    status = overall.status
    if status in ("warn", "fail"):
        flags.append(f"qc_{status}")
    issues = qc.checkpoints.final.issues
    if issues:
        flags.append(f"qc_issues:{len(issues)}")
    repairs = qc.repairs
    if repairs:
        flags.append(f"qc_repaired:{len(repairs)}")
    quality = {"fail": "poor", "warn": "warning"}.get(status, "good")
    section = {
        "score": overall.score,
        "label": overall.label,
        "status": status,
        "issues": len(issues),
        "repairs": len(repairs),
    }
    return section, quality, flags


def _nlsq_section(
    nlsq: NlsqParameters, analysis: NlsqAnalysis, names: Sequence[str], path: Path
) -> tuple[dict[str, Any], list[str]]:
    """The NLSQ section (status, quality flag, χ², values ± uncertainties) and its flags."""
    params, conv = nlsq.parameters, nlsq.convergence
    missing = [n for n in names if n not in params]
    if missing:
        raise SummaryError(f"{path}: no values for {missing} ({nlsq.analysis_mode} mode)")
    quality = analysis.fit_quality.quality_flag
    flags: list[str] = []
    if not conv.converged:
        flags.append("nlsq_not_converged")
    weak = [n for n in names if params[n].weakly_identified is True]
    if weak:
        flags.append("nlsq_weakly_identified:" + ",".join(weak))
    at_bound = [n for n in names if params[n].at_bound]
    if at_bound:
        flags.append("nlsq_at_bound:" + ",".join(at_bound))
    out_of_range = _scaling_out_of_range(nlsq.per_angle)
    if out_of_range:
        flags.append("nlsq_scaling_out_of_range:" + ",".join(out_of_range))
        quality = _worst(quality, "warning")
    if quality != "good":
        flags.append(f"nlsq_{quality}")
    values = {n: {"value": params[n].value, "uncertainty": params[n].uncertainty} for n in names}
    section = {
        "status": conv.status,
        "quality_flag": quality,
        "reduced_chi_squared": nlsq.reduced_chi_squared,
        "chi_squared": nlsq.chi_squared,
        "degrees_of_freedom": nlsq.degrees_of_freedom,
        # records from before the choice: the independent-noise covariance
        "uncertainty_method": (or_none(analysis.uncertainty) or {}).get("method", "independent"),
        "parameters": values,
    }
    return section, flags


def _cmc_flags(
    cmc: CmcParameters,
    analysis: CmcAnalysis,
    report: CombinationReport,
    values: Mapping[str, Mapping[str, Any]],
    names: Sequence[str],
) -> list[str]:
    """Flags of a CMC run: convergence, R-hat, ESS, divergences, shards, NLSQ agreement."""
    cconv, settings = cmc.convergence, analysis.settings
    flags: list[str] = []
    if cconv.status == "not_converged":
        flags.append("cmc_not_converged")
    elif cconv.status == "converged_with_warnings":
        flags.append("cmc_warnings")
    high_r = [n for n in names if (values[n]["r_hat"] or 0) > settings.rhat_acceptable]
    if high_r:
        flags.append("cmc_r_hat:" + ",".join(high_r))
    low_ess = [
        n
        for n in names
        if values[n]["ess_bulk"] is not None and values[n]["ess_bulk"] < settings.ess_warn
    ]
    if low_ess:
        flags.append("cmc_low_ess:" + ",".join(low_ess))
    if cconv.divergences:
        flags.append(f"cmc_divergences:{cconv.divergences}")
    if report.excluded_shards:
        flags.append(f"cmc_excluded_shards:{len(report.excluded_shards)}")
    het = report.heterogeneity.heterogeneous_parameters
    if het:
        flags.append("cmc_heterogeneous:" + ",".join(het))
    if analysis.nlsq_comparison is not None and analysis.nlsq_comparison.consistent is False:
        flags.append("cmc_vs_nlsq_disagree")
    return flags


def _cmc_section(
    records: DatasetRecords, names: Sequence[str], path: Path
) -> tuple[dict[str, Any], str | None, list[str]]:
    """The CMC section (convergence summary, posterior statistics), its quality, flags."""
    cmc, analysis, report = records.cmc, records.cmc_analysis, records.cmc_report
    if cmc is None or analysis is None or report is None:
        return {"run": False, "parameters": {}}, None, ["cmc_not_run"]
    missing = [n for n in names if n not in cmc.parameters]
    if missing:
        raise SummaryError(f"{path}: no posterior of {missing}")
    values = {
        n: {col: getattr(cmc.parameters[n], attr) for col, attr, _ in CMC_STATS} for n in names
    }
    cconv, summ = cmc.convergence, cmc.sampling_summary
    comparison = analysis.nlsq_comparison
    section = {
        "run": True,
        "status": cconv.status,
        "quality_flag": cconv.quality_flag,
        "num_shards": summ.num_shards,
        "num_shards_used": summ.num_shards_used,
        "max_r_hat": cconv.max_r_hat,
        "min_ess_bulk": cconv.min_ess,
        "divergences": cconv.divergences,
        "nlsq_max_abs_z": None if comparison is None else comparison.max_abs_z_score,
        "parameters": values,
    }
    quality = CMC_QUALITY.get(cconv.quality_flag)
    return section, quality, _cmc_flags(cmc, analysis, report, values, names)


def _data_section(loaded: LoadedReport, info: DatasetInfo) -> dict[str, Any]:
    """The data section: source file and checksum, q, angles, frames, time step, gap."""
    return {
        "source_file": loaded.source.path,
        "source_sha256": loaded.source.sha256,
        "q": info.q,
        "n_angles": info.n_angles,
        "phi_deg": info.phi_deg,
        "n_frames": info.n_time_points,
        "dt": info.dt,
        "L": info.L,
    }


def _outputs_section(
    results_dir: str | os.PathLike[str], dataset: str, files: Mapping[str, Path], cmc_run: bool
) -> dict[str, str | None]:
    """The outputs section: the dataset's result folders and main records (CMC: if run)."""
    base = Path(results_dir) / dataset
    return {
        "data_dir": str(base / "data"),
        "nlsq_dir": str(base / "nlsq"),
        "cmc_dir": str(base / "cmc"),
        "plots_dir": str(base / "plots"),
        "qc_report": str(files["qc"]),
        "nlsq_parameters": str(files["nlsq"]),
        "cmc_parameters": str(files["cmc"]) if cmc_run else None,
        "cmc_posterior": str(base / "cmc" / "posterior.nc") if cmc_run else None,
    }


def summary_row(results_dir: str | os.PathLike[str], dataset: str) -> dict[str, Any]:
    """One dataset's row, nested by section (``flat_row`` makes the table row)."""
    files = dataset_files(results_dir, dataset)
    records = _read_records(files, dataset)
    mode = _analysis_mode(records.nlsq, files["nlsq"])
    names = REGISTRY.physical_names(mode)
    qc, qc_quality, qc_flags = _qc_section(records.qc)
    nlsq, nlsq_flags = _nlsq_section(records.nlsq, records.nlsq_analysis, names, files["nlsq"])
    cmc, cmc_quality, cmc_flags = _cmc_section(records, names, files["cmc"])
    return {
        "dataset": dataset,
        "analysis_mode": mode,
        "model": ModelSettings.of_record(or_none(records.nlsq.model)).to_mapping(),
        "parameter_names": list(names),
        "data": _data_section(records.loaded, records.nlsq_analysis.dataset_info),
        "qc": qc,
        "nlsq": nlsq,
        "cmc": cmc,
        "quality": _worst(qc_quality, nlsq["quality_flag"], cmc_quality),
        "flags": qc_flags + nlsq_flags + cmc_flags,
        "outputs": _outputs_section(results_dir, dataset, files, records.cmc is not None),
    }


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------
def columns(parameter_names: Sequence[str]) -> list[dict[str, str]]:
    """Table columns: name, unit and meaning (the JSON carries them; the CSV the names)."""

    def col(name: str, unit: str, meaning: str) -> dict[str, str]:
        return {"name": name, "unit": unit, "description": meaning}

    out = [
        col("dataset", "", "dataset name in the config"),
        col("analysis_mode", "", "static or laminar_flow"),
        col(
            "model",
            "",
            "the kernel fitted: shear form/integral (physical or homodyne; exact or trapezoid)",
        ),
        col("q", "1/Å", "wavevector of the analysed ring"),
        col("n_angles", "", "number of angle bins fitted"),
        col("phi_deg", "deg", "angle bins, ';'-separated"),
        col("n_frames", "", "number of time points after filtering"),
        col("dt", "s", "time step"),
        col("L", "Å", "stator-rotor gap"),
        col("qc_score", "", "QC score of the final data (0-100)"),
        col("qc_status", "", "excellent | pass | warn | fail"),
        col("nlsq_status", "", "NLSQ convergence status"),
        col("nlsq_reduced_chi2", "", "χ²/dof of the NLSQ fit (≈ 1 for a good fit)"),
        col(
            "nlsq_uncertainty",
            "",
            "how the NLSQ σ were made: independent (noise independent between elements; far "
            "too small on speckle data) or speckle (noise shared through frames)",
        ),
        col("cmc_status", "", "CMC convergence status (empty: not run)"),
        col("cmc_max_r_hat", "", "largest R-hat over all sampled parameters"),
        col("cmc_min_ess_bulk", "", "smallest bulk ESS over all sampled parameters"),
        col("cmc_divergences", "", "divergent transitions in the kept shards"),
        col("cmc_num_shards", "", "CMC shards planned"),
        col("cmc_num_shards_used", "", "CMC shards combined"),
    ]
    for n in parameter_names:
        unit = REGISTRY[n].unit
        unit = "" if unit in ("–", "-") else unit
        out.append(col(f"nlsq_{n}", unit, f"NLSQ estimate of {n}"))
        out.append(col(f"nlsq_{n}_sd", unit, f"NLSQ standard uncertainty of {n}"))
        for suffix, _, meaning in CMC_STATS:
            u = "" if suffix in ("r_hat", "ess_bulk") else unit
            out.append(col(f"cmc_{n}_{suffix}", u, f"CMC {meaning} of {n}"))
    out += [
        col("quality", "", "worst of QC status, NLSQ and CMC quality: good | warning | poor"),
        col("flags", "", "every reason for concern, ';'-separated (empty: none)"),
        col("source_file", "", "the dataset's input file"),
        col("source_sha256", "", "SHA-256 of the input file"),
        col("data_dir", "", "loaded, filtered, preprocessed and QC'd data"),
        col("nlsq_dir", "", "NLSQ results"),
        col("cmc_dir", "", "CMC results"),
        col("plots_dir", "", "figures (data/, qc/, nlsq/, cmc/)"),
    ]
    return out


def flat_row(row: Mapping[str, Any], parameter_names: Sequence[str]) -> dict[str, Any]:
    """The table row of a nested row, over the columns of ``parameter_names``."""
    d, qc, nl, cm = row["data"], row["qc"], row["nlsq"], row["cmc"]
    out: dict[str, Any] = {
        "dataset": row["dataset"],
        "analysis_mode": row["analysis_mode"],
        "model": f"{row['model']['shear']}/{row['model']['integral']}",
        "q": d["q"],
        "n_angles": d["n_angles"],
        "phi_deg": ";".join(f"{p:g}" for p in d["phi_deg"]),
        "n_frames": d["n_frames"],
        "dt": d["dt"],
        "L": d["L"],
        "qc_score": qc["score"],
        "qc_status": qc["status"],
        "nlsq_status": nl["status"],
        "nlsq_reduced_chi2": nl["reduced_chi_squared"],
        "nlsq_uncertainty": nl["uncertainty_method"],
        "cmc_status": cm.get("status"),
        "cmc_max_r_hat": cm.get("max_r_hat"),
        "cmc_min_ess_bulk": cm.get("min_ess_bulk"),
        "cmc_divergences": cm.get("divergences"),
        "cmc_num_shards": cm.get("num_shards"),
        "cmc_num_shards_used": cm.get("num_shards_used"),
    }
    for n in parameter_names:
        p = nl["parameters"].get(n) or {}
        out[f"nlsq_{n}"] = p.get("value")
        out[f"nlsq_{n}_sd"] = p.get("uncertainty")
        c = cm["parameters"].get(n) or {}
        for suffix, _, _ in CMC_STATS:
            out[f"cmc_{n}_{suffix}"] = c.get(suffix)
    out.update(
        quality=row["quality"],
        flags=";".join(row["flags"]),
        source_file=d["source_file"],
        source_sha256=d["source_sha256"],
        data_dir=row["outputs"]["data_dir"],
        nlsq_dir=row["outputs"]["nlsq_dir"],
        cmc_dir=row["outputs"]["cmc_dir"],
        plots_dir=row["outputs"]["plots_dir"],
    )
    return out


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # shortest round-trip form
    return str(value)


def csv_text(table: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    for row in table:
        w.writerow([_cell(row.get(n)) for n in names])
    return buf.getvalue()


def write_stage(
    results_dir: str | os.PathLike[str],
    datasets: Sequence[str],
    out_csv: str | os.PathLike[str],
    out_json: str | os.PathLike[str],
) -> list[dict[str, Any]]:
    """Write ``summary.csv`` and ``summary.json`` for ``datasets``; returns the table rows."""
    if not datasets:
        raise SummaryError("write: no datasets given")
    dupes = sorted({d for d in datasets if list(datasets).count(d) > 1})
    if dupes:
        raise SummaryError(f"write: datasets {dupes} are listed more than once")
    rows = [summary_row(results_dir, d) for d in datasets]
    names = [n for n in REGISTRY.names if any(n in r["parameter_names"] for r in rows)]
    cols = columns(names)
    table = [flat_row(r, names) for r in rows]
    col_names = [c["name"] for c in cols]
    text = csv_text(table, col_names)
    with atomic_path(out_csv) as tmp:
        tmp.write_text(text, encoding="utf-8")
    write_json(
        out_json,
        {
            "schema_version": SCHEMA_VERSION,
            "columns": cols,
            "rows": table,
            "datasets": rows,
        },
    )
    return table
