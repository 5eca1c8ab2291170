"""The ``qc`` stage: score the data at four checkpoints, mask what is not a measurement,
drop angles with too much masked, and write the report and the data the fit reads.

The checks and the score are in :mod:`homodyne_steps.data.qc_checks` (its docstring is the
table of checks), the repairs and angle drops in :mod:`homodyne_steps.data.qc_repair`, the
points per check in :mod:`homodyne_steps.data.qc_rules`, the settings in
:mod:`homodyne_steps.data.qc_settings`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from homodyne_steps.data.qc_checks import _status, assess
from homodyne_steps.data.qc_repair import drop_masked_angles, repair
from homodyne_steps.data.qc_settings import QcSettings
from homodyne_steps.errors import QualityError
from homodyne_steps.io.data_files import (
    QcCheckpoints,
    QcDroppedAngle,
    QcOverall,
    QcRepair,
    QcReport,
    QcThresholds,
)
from homodyne_steps.io.dataset import XpcsData

SCHEMA_VERSION = 1


def run_qc(
    raw: XpcsData,
    filtered: XpcsData,
    preprocessed: XpcsData,
    settings: QcSettings | None = None,
) -> tuple[dict[str, Any], XpcsData]:
    """Assess the three inputs, repair the preprocessed data, drop the angles with too
    many masked pairs, and assess the rest as ``final``.

    Returns (report, final data), the report as written (:func:`qc_record`'s mapping).
    """
    report, final = qc_record(raw, filtered, preprocessed, settings)
    return report.to_json(), final


def qc_record(
    raw: XpcsData,
    filtered: XpcsData,
    preprocessed: XpcsData,
    settings: QcSettings | None = None,
) -> tuple[QcReport, XpcsData]:
    """:func:`run_qc` with the report as a record.

    The overall score is the final checkpoint's. The final data keep NaN at every masked
    element; with every angle dropped they hold no angle.
    """
    s = settings or QcSettings()
    reports = {
        "raw": assess(raw, "raw", s),
        "filtered": assess(filtered, "filtered", s),
        "preprocessed": assess(preprocessed, "preprocessed", s),
    }
    repaired, repairs = repair(preprocessed, s) if s.auto_repair else (preprocessed, [])
    final, dropped, kept = drop_masked_angles(repaired, s)
    reports["final"] = assess(final, "final", s, dropped=dropped, angle_ids=kept)
    score = reports["final"].score
    report = QcReport(
        schema_version=SCHEMA_VERSION,
        thresholds=QcThresholds(
            pass_=s.pass_threshold, warn=s.warn_threshold, excellent=s.excellent_threshold
        ),
        settings=s.to_mapping(),
        checkpoints=QcCheckpoints(**{name: r.to_record() for name, r in reports.items()}),
        repairs=[QcRepair(**r) for r in repairs],
        dropped_angles=[QcDroppedAngle(**d) for d in dropped],
        overall=QcOverall(
            score=score,
            label=reports["final"].label,
            status=_status(score, s),
            passed=score >= s.pass_threshold,
        ),
    )
    return report, final


def failed_report_path(out_json: str | os.PathLike[str]) -> Path:
    """Where a failing run's report goes (``qc_report.json`` → ``qc_report.failed.json``)."""
    return Path(out_json).with_suffix(".failed.json")


def qc_stage(
    raw_npz: str | os.PathLike[str],
    filtered_npz: str | os.PathLike[str],
    preprocessed_npz: str | os.PathLike[str],
    out_json: str | os.PathLike[str],
    out_npz: str | os.PathLike[str],
    settings: QcSettings | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run QC on three NPZ files; write the report JSON and the final data NPZ, and
    return the report's mapping (as written).

    A final score below ``pass`` with ``on_fail: error`` raises QualityError and writes
    only ``<out_json stem>.failed.json``, so the workflow sees no outputs (and stale ones
    from an earlier run are removed, so a rerun cannot pick them up). With every angle
    dropped for masked elements it does so whatever ``on_fail`` says.
    """
    s = settings if isinstance(settings, QcSettings) else QcSettings.from_mapping(settings)
    report, final = qc_record(
        XpcsData.from_npz(raw_npz),
        XpcsData.from_npz(filtered_npz),
        XpcsData.from_npz(preprocessed_npz),
        s,
    )
    failed = failed_report_path(out_json)
    overall = report.overall
    if final.n_phi == 0:
        # on_fail: warn cannot help: there is no angle left to write for the fit.
        Path(out_json).unlink(missing_ok=True)
        Path(out_npz).unlink(missing_ok=True)
        report.write(failed)
        raise QualityError(
            f"quality control failed: no angle left. Every angle has more than "
            f"qc.max_masked_fraction = {s.max_masked_fraction:g} of its off-diagonal pairs "
            f"masked (NaN) and was dropped ({len(report.dropped_angles)} angles; reasons "
            f"in {failed}). Check the frame range and the correlator output, or raise "
            "qc.max_masked_fraction."
        )
    if not overall.passed and s.on_fail == "error":
        Path(out_json).unlink(missing_ok=True)
        Path(out_npz).unlink(missing_ok=True)
        report.write(failed)
        top = report.checkpoints.final.issues[:3]  # sorted: errors first
        listed = "; ".join(i.message for i in top) or "no single issue"
        raise QualityError(
            f"quality control failed: final score {overall.score} is below the pass "
            f"threshold {s.pass_threshold:g}. Top issues: {listed}. Full report: {failed}. "
            "Fix the data, or set qc.on_fail: warn to continue anyway."
        )
    failed.unlink(missing_ok=True)
    final.to_npz(out_npz)
    report.write(out_json)
    return report.to_json()
