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
from homodyne_steps.plots.plot_common import (
    PlotError,
    PlotSettings,
    new_figure_set,
    plt,
    read_record,
    status_colour,
    style,
)

PAGE_SIZE = (11.0, 7.5)
CHECKPOINTS = ("raw", "filtered", "preprocessed", "final")
MAX_LINES = 22  # issue/repair lines on the page; the rest is counted
WRAP = 138  # characters of 8.5 pt monospace that fit the page's 10.1 in text width


def _lines(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(colour, text) lines: final issues, recommendations, repairs, resolved issues."""
    out: list[tuple[str, str]] = []
    final = report["checkpoints"].get("final") or {}
    issues = final.get("issues") or []
    out.append(("black", f"Issues at the final checkpoint ({len(issues)}):"))
    for i in issues:
        colour = status_colour("fail" if i.get("severity") == "error" else "warn")
        out.append((colour, f"  [{i.get('severity', '?')}] {i.get('message', '')}"))
    if not issues:
        out.append((status_colour("good"), "  none"))
    recs = final.get("recommendations") or []
    if recs:
        out.append(("black", "Recommendations:"))
        out.extend(("0.25", f"  - {r}") for r in recs)
    repairs = report.get("repairs") or []
    out.append(("black", f"Repairs applied ({len(repairs)}):"))
    for r in repairs:
        where = f"angle {r.get('angle_index')} (phi={r.get('phi', float('nan')):g} deg)"
        out.append(
            ("0.25", f"  {r.get('what')}: {where}, {r.get('count')} elements, {r.get('method')}")
        )
    if not repairs:
        out.append((status_colour("good"), "  none needed"))
    masked = final.get("masked") or {}
    if masked.get("count"):
        out.append(
            (
                "black",
                f"Masked (NaN, not fitted) at the final checkpoint: {masked['count']} of "
                f"{masked.get('of')} off-diagonal pairs ({100 * masked.get('fraction', 0):.1f} %)",
            )
        )
    dropped = report.get("dropped_angles") or []
    if dropped:
        out.append(("black", f"Angles dropped from the final data ({len(dropped)}):"))
        for d in dropped:
            where = f"angle {d.get('angle_index')} (phi={d.get('phi', float('nan')):g} deg)"
            out.append((status_colour("warn"), f"  {where}: {d.get('reason')}"))
    earlier = []
    final_codes = {(i.get("code"), i.get("angle_index")) for i in issues}
    for name in CHECKPOINTS[:-1]:
        for i in (report["checkpoints"].get(name) or {}).get("issues") or []:
            if (i.get("code"), i.get("angle_index")) not in final_codes:
                earlier.append(f"  {name}: {i.get('message', '')}")
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


def _score_panel(ax, report: dict[str, Any]) -> None:
    """Draws the score at each checkpoint as bars against the pass/warn/excellent lines."""
    thresholds = report.get("thresholds") or {}
    scores = [(report["checkpoints"].get(c) or {}).get("score") for c in CHECKPOINTS]
    labels = [(report["checkpoints"].get(c) or {}).get("label") for c in CHECKPOINTS]
    x = range(len(CHECKPOINTS))
    bars = ax.bar(
        x, [s or 0 for s in scores], color=[status_colour(lab) for lab in labels], width=0.6
    )
    for b, s, lab in zip(bars, scores, labels, strict=True):
        ax.text(
            b.get_x() + b.get_width() / 2,
            (s or 0) + 1.5,
            "n/a" if s is None else f"{s:.1f}\n{lab}",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    for key, style_ in (("pass", ":"), ("warn", "--"), ("excellent", "-.")):
        if key in thresholds:
            ax.axhline(thresholds[key], color="0.3", ls=style_, lw=1)
            ax.text(
                len(CHECKPOINTS) + 0.25,
                thresholds[key] + 0.8,
                f"{key} {thresholds[key]:g}",
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


def _deduction_panel(ax, report: dict[str, Any]) -> None:
    """Draws the points each check took at the final checkpoint, out of its maximum."""
    deductions = (report["checkpoints"].get("final") or {}).get("deductions") or {}
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


def _page_title(fig, overall: dict[str, Any], dataset: str | None) -> None:
    """Writes the page title: overall score, label and status, coloured by the status."""
    name = f"{dataset}: " if dataset else ""
    fig.suptitle(
        f"{name}QC score {overall.get('score', float('nan')):.1f} / 100 — {overall.get('label')} "
        f"(status {overall.get('status')}, {'passed' if overall.get('passed') else 'FAILED'})",
        color=status_colour(overall.get("status")),
        fontsize=14,
        fontweight="bold",
    )


def qc_page(report: dict[str, Any], dataset: str | None = None):
    """Draws the QC summary page of ``report`` (scores, deductions, issues, title)."""
    overall = report["overall"]
    fig, ax_scores, ax_deduct, ax_text = _page_axes()
    _score_panel(ax_scores, report)
    _deduction_panel(ax_deduct, report)
    _text_panel(ax_text, _lines(report))
    _page_title(fig, overall, dataset)
    return fig


def plot_qc_stage(
    qc_report: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    settings: PlotSettings | None = None,
    *,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Write ``qc_summary.png`` for ``qc_report``; returns the index."""
    s = settings or PlotSettings()
    report = read_record(qc_report, "QC report")
    for key in ("checkpoints", "overall"):
        if not isinstance(report.get(key), dict):
            raise PlotError(f"{qc_report}: not a QC report (no {key!r} mapping)")
    figs = new_figure_set(out_dir, s, "plot_qc")
    with style():
        figs.save(
            qc_page(report, dataset),
            "qc_summary.png",
            PAGE_SIZE,
            "QC summary",
            "QC score per checkpoint against the thresholds, deductions, issues and repairs",
        )
    return figs.finish(inputs={"qc_report": str(qc_report)}, score=report["overall"].get("score"))
