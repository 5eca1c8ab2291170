"""Typed records of the data stages' JSON reports that other stages read.

``loaded.json`` (:class:`LoadedReport`, written by :mod:`homodyne_steps.stages.load`) is
read by the write stage (source file and checksum); ``filter_report.json``
(:class:`FilterReport`, :mod:`homodyne_steps.stages.filter`) says what was kept and
why the rest was dropped; ``qc_report.json`` (:class:`QcReport`,
:mod:`homodyne_steps.stages.qc`, also written as ``qc_report.failed.json`` by a failing
run, with the same keys) is read by the QC plot and the write stage. Parts no other
stage reads (the settings echoed back, the before/after values of a repair) stay plain
mappings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from homodyne_steps.io.record import ABSENT, Record

# ---------------------------------------------------------------- loaded.json


@dataclass(frozen=True, kw_only=True)
class LoadedSource(Record):
    """The file read: absolute path, sha256, layout (``aps_u``/``aps_old``), the HDF5
    datasets of the ring's matrices and how they were paired with the bins."""

    path: str
    sha256: str
    format: str
    datasets: list[str]
    bin_mapping: str
    member_prefix: str


@dataclass(frozen=True, kw_only=True)
class LoadedQ(Record):
    """The q ring (1/Å): target, selected (mean of the members), relative tolerance, every
    q with a matrix, each member's q, their spread (null for a ring at q = 0) and how
    the ring was grouped (``q_index``, ``dqspan`` or ``q_tolerance``)."""

    target: float
    selected: float
    tolerance: float
    available: list[float]
    members: list[float]
    relative_spread: float | None
    grouping: str


@dataclass(frozen=True, kw_only=True)
class SkippedBin(Record):
    """A bin with a matrix but a non-finite q or phi (null), not read."""

    label: int
    dataset: str
    q: float | None
    phi: float | None
    reason: str


@dataclass(frozen=True, kw_only=True)
class DtSource(Record):
    """Where dt came from: ``kind`` "config" (only that key) or "file" (the frame period
    × averaging × stride, with the HDF5 paths and the factors taken as 1 because the
    file lacks them)."""

    kind: str
    period_path: str = ABSENT
    period_s: float = ABSENT
    avg: int = ABSENT
    avg_path: str = ABSENT
    stride: int = ABSENT
    stride_path: str = ABSENT
    assumed_1: list[str] = ABSENT


@dataclass(frozen=True, kw_only=True)
class LoadedFrames(Record):
    """The frame window read: 1-based inclusive start/end, frames read, frames in file."""

    start: int
    end: int
    n: int
    n_in_file: int


@dataclass(frozen=True, kw_only=True)
class LoadedStorage(Record):
    """The ``storage`` setting and the layout found for each matrix (row order)."""

    setting: str
    found: list[str]


@dataclass(frozen=True, kw_only=True)
class LoadedShapes(Record):
    c2_exp: list[int]
    t1: list[int]
    t2: list[int]


@dataclass(frozen=True, kw_only=True)
class LoadedReport(Record):
    """``data/loaded.json``, the load stage's record of how the ring was read."""

    WHAT = "loaded.json"

    stage: str
    generator: str
    source: LoadedSource
    q: LoadedQ
    phi_deg: list[float]
    bin_labels: list[int]
    skipped_bins: list[SkippedBin]
    dt_s: float
    dt_source: DtSource
    time_origin: str
    t_first_s: float
    frames: LoadedFrames
    n_phi: int
    storage: LoadedStorage
    diagonal_corrected: bool
    shapes: LoadedShapes
    c2_dtype: str
    outputs: dict[str, str]
    duration_s: float


# ---------------------------------------------------------------- filter_report.json


@dataclass(frozen=True, kw_only=True)
class FilterKept(Record):
    """What the filter kept: the angles (deg) and their q (1/Å), frames and time span (s)."""

    phi_deg: list[float]
    q: list[float]
    n_frames: int
    t_first_s: float
    t_last_s: float


@dataclass(frozen=True, kw_only=True)
class FilterDrop(Record):
    """One exclusion, in the order it happened: ``kind`` "angle" (with the angle's index,
    phi and q) or "frames" (with the count of frames); always a reason."""

    kind: str
    index: int = ABSENT
    phi_deg: float = ABSENT
    q: float = ABSENT
    count: int = ABSENT
    reason: str


@dataclass(frozen=True, kw_only=True)
class FilterReport(Record):
    """``data/filter_report.json``: settings, what was kept and every drop with its reason."""

    WHAT = "filter_report.json"

    schema_version: int
    stage: str
    input: str
    #: the filter settings as configured (:meth:`FilterSettings.to_mapping`)
    settings: dict[str, Any]
    kept: FilterKept
    dropped: list[FilterDrop]
    input_shape: list[int]
    output_shape: list[int]
    duration_ms: float


# ---------------------------------------------------------------- qc_report.json


@dataclass(frozen=True, kw_only=True)
class QcIssue(Record):
    """One finding: code, severity (error|warning), message, and the angle index, phi
    (deg) and value where there is one (absent otherwise, and a non-finite value)."""

    code: str
    severity: str
    message: str
    angle_index: int = ABSENT
    phi: float = ABSENT
    value: float = ABSENT


@dataclass(frozen=True, kw_only=True)
class QcMaskedAngle(Record):
    angle_index: int
    phi: float
    masked: int
    fraction: float


@dataclass(frozen=True, kw_only=True)
class QcMasked(Record):
    """Masked off-diagonal pairs of a checkpoint: count of all, fraction, per angle, and
    the angles dropped before it (indices, counted as wholly masked)."""

    count: int
    of: int
    fraction: float
    per_angle: list[QcMaskedAngle]
    dropped_angles: list[int]


@dataclass(frozen=True, kw_only=True)
class QcCheckpoint(Record):
    """Score (0–100) and label at one checkpoint, its issues (errors first), the
    recommendations, the points each check deducted and the masked pairs."""

    score: float
    label: str
    issues: list[QcIssue]
    recommendations: list[str]
    deductions: dict[str, float]
    masked: QcMasked


@dataclass(frozen=True, kw_only=True)
class QcCheckpoints(Record):
    raw: QcCheckpoint
    filtered: QcCheckpoint
    preprocessed: QcCheckpoint
    final: QcCheckpoint


@dataclass(frozen=True, kw_only=True)
class QcRepair(Record):
    """One repair of one angle: what, where, how many elements, the method, and the
    values before/after (their keys depend on ``what``)."""

    what: str
    angle_index: int
    phi: float
    count: int
    method: str
    before: dict[str, Any]
    after: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class QcDroppedAngle(Record):
    """An angle removed from the final data for too many masked pairs."""

    angle_index: int
    phi: float
    q: float
    masked: int
    of: int
    masked_fraction: float
    reason: str


@dataclass(frozen=True, kw_only=True)
class QcThresholds(Record):
    """The score cut points (0–100): the labels and the status change at these."""

    pass_: float = field(metadata={"key": "pass"})
    warn: float
    excellent: float


@dataclass(frozen=True, kw_only=True)
class QcOverall(Record):
    """The final checkpoint's score and label, the status and whether QC passed."""

    score: float
    label: str
    status: str
    passed: bool


@dataclass(frozen=True, kw_only=True)
class QcReport(Record):
    """``data/qc_report.json`` (or ``qc_report.failed.json``), the QC stage's report."""

    WHAT = "QC report"

    schema_version: int
    thresholds: QcThresholds
    #: the QC settings as configured (:meth:`QcSettings.to_mapping`)
    settings: dict[str, Any]
    checkpoints: QcCheckpoints
    repairs: list[QcRepair]
    dropped_angles: list[QcDroppedAngle]
    overall: QcOverall


__all__ = [
    "DtSource",
    "FilterDrop",
    "FilterKept",
    "FilterReport",
    "LoadedFrames",
    "LoadedQ",
    "LoadedReport",
    "LoadedShapes",
    "LoadedSource",
    "LoadedStorage",
    "QcCheckpoint",
    "QcCheckpoints",
    "QcDroppedAngle",
    "QcIssue",
    "QcMasked",
    "QcMaskedAngle",
    "QcOverall",
    "QcRepair",
    "QcReport",
    "QcThresholds",
    "SkippedBin",
]
