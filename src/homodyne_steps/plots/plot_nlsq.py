"""The ``plot_nlsq`` stage: the NLSQ fit against the data.

Figures (in ``results/{dataset}/plots/nlsq/``), from ``fitted_data.npz``,
``parameters.json`` and ``analysis_results_nlsq.json`` of the NLSQ stage:

- ``c2_heatmaps_phi_{angle}deg.png`` (the seed's name): per angle, experimental |
  fitted | normalised residual (data − fit)/σ. Data and fit share one colour scale;
  the residual scale is ±4 σ for every angle, so angles compare at a glance. The
  diagonal is not fitted and is left blank (grey) in the residual.
- ``g2_fit_vs_lag.png``: per angle, g2 vs lag (diagonal averages) of the data (points)
  with the fit over it (line).
- ``residual_histogram.png``: the normalised residuals of all fitted points against the
  noise model's N(0, 1); heavier tails or a width ≠ 1 mean misfit or a wrong σ.
- ``transport_coefficients.png``: D(t) = D0 t^alpha + D_offset and, under flow,
  γ̇(t) = gamma_dot_t0 t^beta + gamma_dot_t_offset, with 68 % and 95 % bands from the
  fit's covariance (2000 draws of the parameters from N(θ̂, Σ)).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.ticker import NullLocator

from homodyne_steps.io.nlsq_files import (
    AngleScaling,
    NlsqAnalysis,
    NlsqEstimate,
    NlsqFiles,
    NlsqParameters,
)
from homodyne_steps.physics.registry import REGISTRY, canonical_mode
from homodyne_steps.plots.plot_common import (
    HeatmapRow,
    PlotError,
    PlotSettings,
    angle_file_names,
    diagonal_means,
    grid_shape,
    new_figure_set,
    offdiagonal_sample,
    phi_label,
    plt,
    q_label,
    read_arrays,
    read_typed,
    robust_limits,
    status_colour,
    style,
)

HIST_SIZE = (8.0, 5.0)
RESIDUAL_SPAN = 4.0  # residual colour scale: ±4 σ
RESIDUAL_CMAP = plt.get_cmap("RdBu_r").with_extremes(bad="0.75")
N_BAND_DRAWS = 2000
FITTED_KEYS = ("phi_angles", "c2_exp", "c2_theoretical_scaled", "residuals_normalized", "t1", "q")


def _unit(name: str) -> str:
    u = REGISTRY[name].unit
    return "" if u in ("", "–", "-") else f" {u}"


def format_value(value: float | None, unc: float | None) -> str:
    """``value ± unc`` with the uncertainty to 2 significant digits."""
    if value is None:
        return "n/a"
    if unc is None or not np.isfinite(unc) or unc <= 0:
        return f"{value:.4g}"
    digits = max(0, 1 - int(np.floor(np.log10(unc))))
    if abs(value) >= 1e5 or (abs(value) < 1e-3 and value != 0):
        return f"{value:.3e} ± {unc:.2e}"
    return f"{value:.{digits}f} ± {unc:.{digits}f}"


def show_fit(row: HeatmapRow, fd: dict[str, np.ndarray], k: int, chi2_n: float) -> None:
    """Angle ``k`` into ``row``: experimental | fitted (one scale) | residual (±4 σ)."""
    exp, fit = fd["c2_exp"][k], fd["c2_theoretical_scaled"][k]
    res = np.array(fd["residuals_normalized"][k], dtype=np.float64, copy=True)
    np.fill_diagonal(res, np.nan)  # never fitted
    lim = robust_limits(offdiagonal_sample([exp, fit]))
    phi = float(fd["phi_angles"][k])
    row.show(
        [exp, fit, res],
        fd["t1"],
        [lim, lim, (-RESIDUAL_SPAN, RESIDUAL_SPAN)],
        ["viridis", "viridis", RESIDUAL_CMAP],
        ["experimental", "fitted (NLSQ)", "residual (data − fit) / σ"],
        [r"$c_2(t_1, t_2)$", r"residual / $\sigma$ (diagonal not fitted)"],
        f"NLSQ fit, {phi_label(phi)}, {q_label(float(np.ravel(fd['q'])[0]))}: "
        rf"$\chi^2/N$ = {chi2_n:.3f} for this angle",
    )


def g2_fit_vs_lag(fd: dict[str, np.ndarray], per_angle: Sequence[AngleScaling]):
    """Per angle: data diagonal averages (points) and the fit's (line) against the lag."""
    exp = diagonal_means(fd["c2_exp"])[:, 1:]
    fit = diagonal_means(fd["c2_theoretical_scaled"])[:, 1:]
    t = fd["t1"]
    dt = float(t[1] - t[0]) if t.size > 1 else 1.0
    lag = dt * np.arange(1, t.size)
    n = exp.shape[0]
    rows, cols = grid_shape(n)
    size = (4.3 * cols, 3.2 * rows + 0.7)
    fig, axes = plt.subplots(rows, cols, sharex=True, sharey=True, squeeze=False, figsize=size)
    fig.subplots_adjust(
        left=0.75 / size[0],
        right=1 - 0.2 / size[0],
        bottom=0.55 / size[1],
        top=1 - 0.75 / size[1],
        wspace=0.06,
        hspace=0.32,
    )
    for k in range(rows * cols):
        ax = axes.flat[k]
        if k >= n:
            ax.set_visible(False)
            continue
        ax.plot(lag, exp[k], "o", ms=2.5, color="0.35", alpha=0.7, label="data")
        ax.plot(lag, fit[k], "-", color="C3", lw=1.6, label="NLSQ fit")
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())  # ~0.05 s an axis; decades suffice
        title = phi_label(float(fd["phi_angles"][k]))
        if k < len(per_angle):
            c, o = per_angle[k].contrast.value, per_angle[k].offset.value
            title += f"  (contrast {c:.3f}, offset {o:.3f})"
        ax.set_title(title, fontsize=9.5)
        ax.grid(True, which="major", alpha=0.3)
        if k % cols == 0:
            ax.set_ylabel(r"$g_2(\tau)$")
        if k >= n - cols:
            ax.set_xlabel(r"lag $\tau$ (s)")
            ax.xaxis.set_tick_params(labelbottom=True)
    axes.flat[0].legend(loc="upper right")
    fig.suptitle(f"g2 vs lag: data and NLSQ fit, {q_label(float(np.ravel(fd['q'])[0]))}")
    return fig, size


def residual_histogram(fd: dict[str, np.ndarray], reduced_chi2: float | None):
    """Normalised residuals of the fitted points (upper triangle) against N(0, 1)."""
    res = offdiagonal_sample(list(fd["residuals_normalized"]), max_values=2_000_000)
    fig, ax = plt.subplots(figsize=HIST_SIZE)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.11, top=0.93)
    edges = np.linspace(-6.0, 6.0, 121)
    inside = res[(res >= edges[0]) & (res <= edges[-1])]
    ax.hist(res, bins=edges, density=True, color="C0", alpha=0.65, label="residuals / σ")
    x = np.linspace(-6, 6, 400)
    ax.plot(x, np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi), "k-", lw=1.6, label="noise model N(0, 1)")
    ax.set_yscale("log")
    ax.set_ylim(1e-6, 1.0)
    ax.set_xlabel(r"normalised residual $(c_2^{\mathrm{data}} - c_2^{\mathrm{fit}}) / \sigma$")
    ax.set_ylabel("probability density")
    mean, sd = (float(np.mean(res)), float(np.std(res))) if res.size else (np.nan, np.nan)
    beyond3 = float(np.mean(np.abs(res) > 3)) if res.size else np.nan
    outside = res.size - inside.size
    lines = [
        f"points: {res.size:,}" + (" (subsample)" if res.size >= 2_000_000 else ""),
        f"mean {mean:+.3f}, sd {sd:.3f} (model: 0, 1)",
        f"|r| > 3: {100 * beyond3:.2f} % (model: 0.27 %)",
    ]
    if reduced_chi2 is not None:
        lines.append(rf"reduced $\chi^2$ = {reduced_chi2:.3f}")
    if outside:
        lines.append(f"{outside:,} beyond ±6 not shown")
    ax.text(
        0.02,
        0.97,
        "\n".join(lines),
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize=9,
        bbox={"boxstyle": "round", "fc": "white", "ec": "0.7"},
    )
    ax.legend(loc="upper right")
    ax.set_title("NLSQ residuals against the noise model σ(angle, lag)")
    return fig


def _covariance(analysis: NlsqAnalysis, names: tuple[str, ...]) -> np.ndarray:
    cov_names = analysis.covariance.names
    # null entries (undefined covariance) become NaN
    matrix = np.asarray(analysis.covariance.matrix or [], dtype=np.float64)
    out = np.zeros((len(names), len(names)))
    if matrix.ndim == 2 and matrix.shape == (len(cov_names), len(cov_names)):
        idx = [cov_names.index(n) if n in cov_names else -1 for n in names]
        for a, ia in enumerate(idx):
            for b, ib in enumerate(idx):
                if ia >= 0 and ib >= 0:
                    out[a, b] = matrix[ia, ib]
    return out


def parameter_draws(mean: np.ndarray, cov: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Draws from N(mean, cov); negative eigenvalues (round-off) are clipped to 0."""
    w, v = np.linalg.eigh(0.5 * (cov + cov.T))
    root = v * np.sqrt(np.clip(w, 0.0, None))
    z = np.random.default_rng(seed).standard_normal((n, mean.size))
    return mean + z @ root.T


def transport_coefficients(
    params: Mapping[str, NlsqEstimate], cov: np.ndarray, t: np.ndarray, mode: str
):
    """D(t) (and γ̇(t) under flow) at the NLSQ optimum with 68 %/95 % bands; below each,
    the relative half-width of the 68 % band (the bands of precise data are thin)."""
    names = REGISTRY.physical_names(mode)
    theta = np.array([params[n].value for n in names], dtype=np.float64)
    # NaN: a direction the fit could not fix (not_identified); its panel gets no band
    draws = parameter_draws(theta, np.where(np.isfinite(cov), cov, 0.0), N_BAND_DRAWS)
    dt = float(t[1] - t[0]) if t.size > 1 else 1.0
    tt = np.geomspace(max(float(t[0]), dt / 2), float(t[-1]), 200)
    panels = [("D", r"$D(t)$ (Å$^2$/s)", ("D0", "alpha", "D_offset"), 0)]
    if mode == "laminar_flow":
        flow = ("gamma_dot_t0", "beta", "gamma_dot_t_offset")
        panels.append(("gamma", r"$\dot\gamma(t)$ (s$^{-1}$)", flow, 3))
    size = (13.0, 6.0) if len(panels) == 2 else (7.0, 6.0)
    fig, axes = plt.subplots(
        2, len(panels), squeeze=False, figsize=size, sharex="col", height_ratios=[1.0, 0.38]
    )
    fig.subplots_adjust(
        left=0.9 / size[0],
        right=1 - 0.25 / size[0],
        bottom=0.55 / size[1],
        top=1 - 0.45 / size[1],
        wspace=0.25,
        hspace=0.08,
    )
    for col, (key, ylabel, pnames, j) in enumerate(panels):
        ax, ax_rel = axes[0, col], axes[1, col]
        with np.errstate(over="ignore", invalid="ignore"):
            curves = draws[:, j, None] * tt ** draws[:, j + 1, None] + draws[:, j + 2, None]
        best = theta[j] * tt ** theta[j + 1] + theta[j + 2]
        defined = bool(np.all(np.isfinite(cov[j : j + 3, j : j + 3])))
        lo95, lo68, hi68, hi95 = np.nanpercentile(curves, [2.5, 16, 84, 97.5], axis=0)
        if defined:
            ax.fill_between(tt, lo95, hi95, color="C0", alpha=0.18, lw=0, label="95 % band")
            ax.fill_between(tt, lo68, hi68, color="C0", alpha=0.38, lw=0, label="68 % band")
        else:
            hi68 = lo68 = np.full_like(tt, np.nan)
            ax_rel.text(
                0.5, 0.5, "no band: the fit did not identify these parameters",
                transform=ax_rel.transAxes, ha="center", va="center", fontsize=9,
                color=status_colour("not_identified"),
            )  # fmt: skip
        ax.plot(tt, best, "C0-", lw=2, label="NLSQ estimate")
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())  # ~0.05 s an axis; decades suffice
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
        text = "\n".join(
            f"{n} = {format_value(params[n].value, params[n].uncertainty)}{_unit(n)}"
            for n in pnames
        )
        rising = bool(best[-1] > best[0])  # keep the boxes off the curve
        ax.text(
            0.02 if rising else 0.98,
            0.97,
            text,
            transform=ax.transAxes,
            va="top",
            ha="left" if rising else "right",
            fontsize=8.5,
            bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9},
        )
        ax.legend(loc="lower right" if rising else "lower left")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 5))
        ax.set_title(
            r"diffusion coefficient $D(t) = D_0 t^\alpha + D_\mathrm{offset}$"
            if key == "D"
            else r"shear rate $\dot\gamma(t) = \dot\gamma_0 t^\beta + \dot\gamma_\mathrm{offset}$"
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = 100 * 0.5 * (hi68 - lo68) / np.abs(best)
        ax_rel.plot(tt, rel, "C0-", lw=1.5)
        ax_rel.set_ylim(bottom=0)
        ax_rel.set_ylabel("68 % half-\nwidth (%)")
        ax_rel.set_xlabel("t (s)")
        ax_rel.grid(True, which="major", alpha=0.3)
    return fig, size


def plot_nlsq_stage(
    nlsq: NlsqFiles | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    settings: PlotSettings | None = None,
) -> dict[str, Any]:
    """Write the NLSQ figures of the results ``nlsq`` (its files, or the NLSQ folder);
    returns the index."""
    s = settings or PlotSettings()
    files = NlsqFiles.of(nlsq)
    params = read_typed(NlsqParameters, files.parameters)
    analysis = read_typed(NlsqAnalysis, files.analysis)
    fd = read_arrays(files.fitted, FITTED_KEYS, "NLSQ fitted data")
    try:
        mode = canonical_mode(params.analysis_mode)
    except ValueError as exc:
        raise PlotError(f"{files.parameters}: {exc}") from None
    values = params.parameters
    names = REGISTRY.physical_names(mode)
    missing = [n for n in names if n not in values]
    if missing:
        raise PlotError(f"{files.parameters}: no values for {missing}")
    per_angle = params.per_angle
    n_phi = fd["c2_exp"].shape[0]
    if fd["c2_exp"].ndim != 3 or fd["phi_angles"].shape != (n_phi,):
        raise PlotError(f"{files.fitted}: c2_exp must be (angles, t, t)")
    n_t = fd["c2_exp"].shape[1]
    n_upper = n_t * (n_t - 1) // 2
    figs = new_figure_set(out_dir, s, "plot_nlsq")
    with style():
        row = HeatmapRow(s.max_pixels)
        try:
            for k, name in enumerate(angle_file_names("c2_heatmaps", fd["phi_angles"])):
                chi2 = per_angle[k].chi_squared if k < len(per_angle) else np.nan
                show_fit(row, fd, k, float(chi2) / max(n_upper, 1))
                phi = float(fd["phi_angles"][k])
                figs.save(
                    row.fig,
                    name,
                    HeatmapRow.SIZE,
                    f"NLSQ fit at phi = {phi:.1f} deg",
                    "experimental | fitted c2 on one colour scale | normalised residual (±4 sigma)",
                    close=False,
                )
        finally:
            row.close()
        fig, size = g2_fit_vs_lag(fd, per_angle)
        figs.save(
            fig,
            "g2_fit_vs_lag.png",
            size,
            "g2 vs lag with the NLSQ fit",
            "diagonal averages of the data (points) and of the fit (line) per angle",
        )
        figs.save(
            residual_histogram(fd, params.reduced_chi_squared),
            "residual_histogram.png",
            HIST_SIZE,
            "residual histogram",
            "normalised residuals of all fitted points against the noise model N(0, 1)",
        )
        fig, size = transport_coefficients(
            values, _covariance(analysis, names), np.asarray(fd["t1"], dtype=np.float64), mode
        )
        figs.save(
            fig,
            "transport_coefficients.png",
            size,
            "D(t) and shear rate",
            "D(t) and (laminar flow) gamma_dot(t) at the NLSQ optimum with 68 % and "
            "95 % bands from the fit covariance",
        )
    quality = analysis.fit_quality.quality_flag
    return figs.finish(
        inputs={"nlsq_dir": str(files.parameters.parent)},
        analysis_mode=mode,
        quality_flag=quality,
    )
