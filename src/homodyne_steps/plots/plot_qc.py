"""The ``plot_qc`` stage: one page per dataset that says how good the data are.

Figure (in ``results/{dataset}/plots/qc/``): ``qc_summary.png``, from ``qc_report.json``:
the overall score and status, the score at each checkpoint (raw, filtered,
preprocessed, final) against the pass / warn / excellent thresholds, the points each
check deducted at the final checkpoint, and the issues, recommendations, repairs
(masked elements: NaN, never filled) and dropped angles written out.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

from homodyne_steps.data.qc_rules import DEDUCTIONS, FATAL_CHECKS
from homodyne_steps.io.data_files import QcCheckpoint, QcOverall, QcReport
from homodyne_steps.io.record import RecordError
from homodyne_steps.io.serialise import SerialisationError
from homodyne_steps.plots.plot_common import (
    PlotError,
    PlotSettings,
    new_figure_set,
    plt,
    status_colour,
    style,
)

PAGE_SIZE = (11.0, 7.5)
CHECKPOINTS = ("raw", "filtered", "preprocessed", "final")
MAX_LINES = 22  # issue/repair lines on the page; the rest is counted
WRAP = 138  # characters of 8.5 pt monospace that fit the page's 10.1 in text width


def _checkpoint(report: QcReport, name: str) -> QcCheckpoint:
    return getattr(report.checkpoints, name)


def _lines(report: QcReport) -> list[tuple[str, str]]:
    """(colour, text) lines: final issues, recommendations, repairs, resolved issues."""
    out: list[tuple[str, str]] = []
    final = report.checkpoints.final
    issues = final.issues
    out.append(("black", f"Issues at the final checkpoint ({len(issues)}):"))
    for i in issues:
        colour = status_colour("fail" if i.severity == "error" else "warn")
        out.append((colour, f"  [{i.severity}] {i.message}"))
    if not issues:
        out.append((status_colour("good"), "  none"))
    if final.recommendations:
        out.append(("black", "Recommendations:"))
        out.extend(("0.25", f"  - {r}") for r in final.recommendations)
    repairs = report.repairs
    out.append(("black", f"Repairs applied ({len(repairs)}):"))
    for r in repairs:
        where = f"angle {r.angle_index} (phi={r.phi:g} deg)"
        out.append(("0.25", f"  {r.what}: {where}, {r.count} elements, {r.method}"))
    if not repairs:
        out.append((status_colour("good"), "  none needed"))
    masked = final.masked
    if masked.count:
        out.append(
            (
                "black",
                f"Masked (NaN, not fitted) at the final checkpoint: {masked.count} of "
                f"{masked.of} off-diagonal pairs ({100 * masked.fraction:.1f} %)",
            )
        )
    dropped = report.dropped_angles
    if dropped:
        out.append(("black", f"Angles dropped from the final data ({len(dropped)}):"))
        for d in dropped:
            where = f"angle {d.angle_index} (phi={d.phi:g} deg)"
            out.append((status_colour("warn"), f"  {where}: {d.reason}"))
    earlier = []
    # angle_index is ABSENT (one object) on dataset-level issues, so the pairs compare
    final_codes = {(i.code, i.angle_index) for i in issues}
    for name in CHECKPOINTS[:-1]:
        for i in _checkpoint(report, name).issues:
            if (i.code, i.angle_index) not in final_codes:
                earlier.append(f"  {name}: {i.message}")
    if earlier:
        out.append(("black", "Found earlier, gone at the final checkpoint:"))
        out.extend(("0.35", e) for e in dict.fromkeys(earlier))
    return out


def _page_axes():
    """The page and its three panels: scores (top left), deductions (top right), text."""
    fig = plt.figure(figsize=PAGE_SIZE)
    w, h = PAGE_SIZE  # margins in inches (a layout engine costs ~0.3 s)
    gs = fig.add_gridspec(2, 2, height_ratios=[1.0, 0.95], width_ratios=[1.2, 1.0],
                          left=0.7 / w, right=1 - 0.2 / w, top=1 - 0.6 / h, bottom=0.15 / h,
                          hspace=0.3, wspace=0.3)  # fmt: skip
    return fig, fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1]), fig.add_subplot(gs[1, :])


def _score_panel(ax, report: QcReport) -> None:
    """Draws the score at each checkpoint as bars against the pass/warn/excellent lines."""
    thresholds = report.thresholds
    scores = [_checkpoint(report, c).score for c in CHECKPOINTS]
    labels = [_checkpoint(report, c).label for c in CHECKPOINTS]
    x = range(len(CHECKPOINTS))
    bars = ax.bar(x, scores, color=[status_colour(lab) for lab in labels], width=0.6)
    for b, s, lab in zip(bars, scores, labels, strict=True):
        ax.text(
            b.get_x() + b.get_width() / 2,
            s + 1.5,
            f"{s:.1f}\n{lab}",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    for key, value, style_ in (
        ("pass", thresholds.pass_, ":"),
        ("warn", thresholds.warn, "--"),
        ("excellent", thresholds.excellent, "-."),
    ):
        ax.axhline(value, color="0.3", ls=style_, lw=1)
        ax.text(
            len(CHECKPOINTS) + 0.25,
            value + 0.8,
            f"{key} {value:g}",
            va="bottom",
            ha="right",
            fontsize=8,
            color="0.3",
        )
    ax.set_xticks(list(x), CHECKPOINTS)
    ax.set_ylim(0, 118)
    ax.set_xlim(-0.6, len(CHECKPOINTS) + 0.3)
    ax.set_ylabel("QC score (0–100)")
    ax.set_title("score at each checkpoint")


def _deduction_panel(ax, report: QcReport) -> None:
    """Draws the points each check took at the final checkpoint, out of its maximum."""
    deductions = report.checkpoints.final.deductions
    # A dataset-level verdict takes all 100 points: shown only when it was taken, so the
    # usual checks keep a readable scale.
    checks = [k for k in DEDUCTIONS if k not in FATAL_CHECKS or k in deductions]
    checks += [k for k in deductions if k not in DEDUCTIONS]
    y = range(len(checks))
    top = [DEDUCTIONS[k] if k in DEDUCTIONS else deductions[k] for k in checks]
    took = [float(deductions.get(k, 0.0)) for k in checks]
    ax.barh(y, top, color="0.9", height=0.7)
    ax.barh(y, took, color=status_colour("warn"), height=0.7)
    for k, (t, m) in enumerate(zip(took, top, strict=True)):
        ax.text(
            m + 0.8,
            k,
            f"−{t:g}" if t else "passed",
            va="center",
            fontsize=8,
            color=status_colour("warn" if t else "good"),
        )
    ax.set_yticks(list(y), checks, fontsize=8.5)
    ax.invert_yaxis()
    ax.set_xlim(0, max(top) * 1.3)
    ax.set_xlabel("points deducted (grey: the most a check can take)")
    ax.set_title("checks at the final checkpoint")


def _text_panel(ax, lines: list[tuple[str, str]]) -> None:
    """Writes the issue/recommendation/repair lines, wrapped, cut to ``MAX_LINES``."""
    ax.set_axis_off()
    wrapped: list[tuple[str, str]] = []
    for colour, text in lines:
        for piece in textwrap.wrap(text, WRAP, subsequent_indent="      ") or [""]:
            wrapped.append((colour, piece))
    if len(wrapped) > MAX_LINES:
        rest = len(wrapped) - MAX_LINES + 1
        wrapped = wrapped[: MAX_LINES - 1] + [("0.3", f"... {rest} more lines in qc_report.json")]
    step = 1.0 / max(MAX_LINES, len(wrapped))
    for k, (colour, text) in enumerate(wrapped):
        ax.text(
            0.0,
            1.0 - k * step,
            text,
            color=colour,
            fontsize=8.5,
            va="top",
            family="monospace",
            transform=ax.transAxes,
        )


def _page_title(fig, overall: QcOverall, dataset: str | None) -> None:
    """Writes the page title: overall score, label and status, coloured by the status."""
    name = f"{dataset}: " if dataset else ""
    fig.suptitle(
        f"{name}QC score {overall.score:.1f} / 100 — {overall.label} "
        f"(status {overall.status}, {'passed' if overall.passed else 'FAILED'})",
        color=status_colour(overall.status),
        fontsize=14,
        fontweight="bold",
    )


def qc_page(report: QcReport, dataset: str | None = None):
    """Draws the QC summary page of ``report`` (scores, deductions, issues, title)."""
    fig, ax_scores, ax_deduct, ax_text = _page_axes()
    _score_panel(ax_scores, report)
    _deduction_panel(ax_deduct, report)
    _text_panel(ax_text, _lines(report))
    _page_title(fig, report.overall, dataset)
    return fig


def read_qc_report(path: str | os.PathLike[str]) -> QcReport:
    """The QC report at ``path``; PlotError naming the file (and the key) otherwise."""
    try:
        return QcReport.read(path)
    except RecordError as exc:
        raise PlotError(f"not a QC report: {exc}") from None
    except SerialisationError as exc:  # missing, unreadable, not JSON, not an object
        raise PlotError(f"QC report: {exc}") from None


def plot_qc_stage(
    qc_report: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    settings: PlotSettings | None = None,
    *,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Write ``qc_summary.png`` for ``qc_report``; returns the index."""
    s = settings or PlotSettings()
    report = read_qc_report(qc_report)
    figs = new_figure_set(out_dir, s, "plot_qc")
    with style():
        figs.save(
            qc_page(report, dataset),
            "qc_summary.png",
            PAGE_SIZE,
            "QC summary",
            "QC score per checkpoint against the thresholds, deductions, issues and repairs",
        )
    return figs.finish(inputs={"qc_report": str(qc_report)}, score=report.overall.score)
