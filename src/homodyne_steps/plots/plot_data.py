"""The ``plot_data`` stage: the data before and after preprocessing.

Figures (in ``results/{dataset}/plots/data/``):

- ``c2_data_phi_{angle}deg.png``: per angle, c2(t1, t2) before (``filtered.npz``) and
  after (``preprocessed.npz``) preprocessing on one colour scale, and after − before.
  The scale spans the 0.5–99.5 percentiles of the off-diagonal values of both, so the
  diagonal's shot-noise excess saturates instead of washing out the decay; the third
  panel shows what preprocessing changed in the fitted data (the diagonal, for the
  diagonal correction). When ``preprocess.noise_reduction`` is on, the "after" panel
  shows the display-only smoothed matrices (``c2_smoothed`` in ``preprocessed.npz``; the
  fit reads the unsmoothed ``c2_exp``) and its title says so. Masked (NaN) elements are
  left blank.
- ``g2_vs_lag.png``: g2 at each lag τ = t2 − t1 (diagonal averages of c2 after
  preprocessing), one line per angle, τ on a log axis: the decay and the baseline.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from matplotlib.ticker import NullLocator

from homodyne_steps.errors import DataError
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.plots.plot_common import (
    HeatmapRow,
    PlotError,
    PlotSettings,
    angle_colours,
    angle_file_names,
    diagonal_means,
    new_figure_set,
    offdiagonal_sample,
    phi_label,
    plt,
    q_label,
    robust_limits,
    style,
)

G2_SIZE = (8.0, 5.0)


SMOOTHED_KEY = "c2_smoothed"  # display-only array written by preprocess


def _load(path, what: str) -> XpcsData:
    try:
        return XpcsData.from_npz(path)
    except DataError as exc:
        raise PlotError(f"plot_data: {what}: {exc}") from None


def _load_smoothed(path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The display-only smoothed c2 of ``preprocessed.npz``, or None when there is none."""
    try:
        # np.load of an .npz reads a member only when asked: c2_exp is not read twice.
        with np.load(path, allow_pickle=False) as npz:
            smoothed = npz[SMOOTHED_KEY] if SMOOTHED_KEY in npz.files else None
    except (OSError, ValueError) as exc:
        raise PlotError(f"plot_data: cannot read {SMOOTHED_KEY} from {path}: {exc}") from None
    if smoothed is not None and smoothed.shape != shape:
        raise PlotError(
            f"plot_data: {path}: {SMOOTHED_KEY} has shape {smoothed.shape}, expected c2_exp's "
            f"{shape}"
        )
    return smoothed


def show_before_after(
    row: HeatmapRow,
    before: XpcsData,
    after: XpcsData,
    k: int,
    smoothed: np.ndarray | None = None,
) -> None:
    """Angle ``k`` into ``row``: before | after preprocessing (one colour scale) | after −
    before (what preprocessing changed, symmetric diverging scale). ``smoothed``: the
    display-only smoothed matrices, shown in the "after" panel; the difference is always
    that of the fitted data."""
    b, a = before.c2_exp[k], after.c2_exp[k]
    shown = a if smoothed is None else smoothed[k]
    lim = robust_limits(offdiagonal_sample([b, shown]))
    diff = a - b
    finite = diff[np.isfinite(diff)]
    span = float(np.max(np.abs(finite))) if finite.size else 0.0
    span = span if span > 0 else 1e-3
    changed = int(np.count_nonzero(finite))
    after_title = (
        "after preprocessing"
        if smoothed is None
        else "after preprocessing, smoothed\n(display only; the fit is unsmoothed)"
    )
    row.show(
        [b, shown, diff],
        after.t1,
        [lim, lim, (-span, span)],
        ["viridis", "viridis", "RdBu_r"],
        ["before preprocessing", after_title, f"after − before ({changed} changed)"],
        [r"$c_2(t_1, t_2)$", r"$\Delta c_2$"],
        f"{phi_label(after.phi_angles_list[k])}, {q_label(after.wavevector_q_list[k])}: "
        r"two-time correlation $c_2$ before and after preprocessing",
    )


def g2_vs_lag(data: XpcsData):
    """g2(τ) per angle from the diagonal averages of c2 (lag 0, the diagonal, left out)."""
    g2 = diagonal_means(data.c2_exp)[:, 1:]
    lag = data.dt * np.arange(1, data.n_t)
    fig, ax = plt.subplots(figsize=G2_SIZE)
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.11, top=0.93)
    for k, colour in enumerate(angle_colours(data.n_phi)):
        ax.plot(lag, g2[k], "-", color=colour, lw=1.3, label=phi_label(data.phi_angles_list[k]))
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())  # ~0.05 s an axis; decades suffice
    ax.set_xlabel(r"lag $\tau = t_2 - t_1$ (s)")
    ax.set_ylabel(r"$g_2(\tau)$ = mean of $c_2(t, t + \tau)$ over $t$")
    ax.set_title(f"g2 vs lag after preprocessing, {q_label(data.q)}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(ncols=2 if data.n_phi > 6 else 1, title="angle", loc="best")
    return fig


def plot_data_stage(
    filtered_npz: str | os.PathLike[str],
    preprocessed_npz: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    settings: PlotSettings | None = None,
) -> dict[str, Any]:
    """Write the data figures into ``out_dir``; returns the ``figures.json`` index."""
    s = settings or PlotSettings()
    before = _load(filtered_npz, "data before preprocessing")
    after = _load(preprocessed_npz, "data after preprocessing")
    if before.c2_exp.shape != after.c2_exp.shape or not np.allclose(
        before.phi_angles_list, after.phi_angles_list
    ):
        raise PlotError(
            f"plot_data: {filtered_npz} ({before.c2_exp.shape}, angles "
            f"{before.phi_angles_list.tolist()}) and {preprocessed_npz} "
            f"({after.c2_exp.shape}, angles {after.phi_angles_list.tolist()}) do not hold "
            "the same angles and frames"
        )
    smoothed = _load_smoothed(preprocessed_npz, after.c2_exp.shape)
    figs = new_figure_set(out_dir, s, "plot_data")
    with style():
        row = HeatmapRow(s.max_pixels)
        try:
            for k, name in enumerate(angle_file_names("c2_data", after.phi_angles_list)):
                show_before_after(row, before, after, k, smoothed)
                phi = float(after.phi_angles_list[k])
                figs.save(
                    row.fig,
                    name,
                    HeatmapRow.SIZE,
                    f"c2 before and after preprocessing, phi = {phi:.1f} deg",
                    "c2(t1, t2) of one angle before and after preprocessing on one colour "
                    "scale (0.5-99.5 percentiles of the off-diagonal values), and their "
                    "difference (what preprocessing changed)",
                    close=False,
                )
        finally:
            row.close()
        figs.save(
            g2_vs_lag(after),
            "g2_vs_lag.png",
            G2_SIZE,
            "g2 vs lag per angle",
            "diagonal averages of c2 after preprocessing against the lag (log axis), one "
            "line per angle",
        )
    return figs.finish(
        inputs={"before": str(filtered_npz), "after": str(preprocessed_npz)},
        n_angles=after.n_phi,
        n_frames=after.n_t,
        smoothed_for_display=smoothed is not None,
    )
