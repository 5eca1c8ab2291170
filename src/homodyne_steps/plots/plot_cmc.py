"""The ``plot_cmc`` stage: ArviZ diagnostics of the combined posterior and of its shards.

Figures (in ``results/{dataset}/plots/cmc/``), drawn by ArviZ's own plotting functions
on the physical parameters:

- ``trace.png`` (``az.plot_trace``): combined draws per chain (right) and their
  densities (left); chains that wander or disagree show here first.
- ``rank.png`` (``az.plot_rank``): rank histograms per chain; flat when the chains mix.
- ``pair.png`` (``az.plot_pair``): pairwise scatter with marginals and the NLSQ optimum
  as reference markers; the curved D0/alpha/D_offset valley is visible here.
- ``forest.png`` (``az.plot_forest``): 94 % HDI of the combined posterior and of every
  shard, one panel per parameter on its own scale, with the NLSQ value ± 1 σ overlaid.
- ``energy.png`` (``az.plot_energy``): marginal energy vs energy transition per shard,
  with BFMI (only shard files carry sample stats; the combined posterior has none).
- ``ess.png`` (``az.plot_ess``, ``kind="evolution"``): bulk and tail ESS of the combined
  posterior as draws accumulate, against the ``ess_warn`` line.
- ``shard_posteriors.png`` (``az.plot_density``): every shard's posterior density over
  the combined one; shards that disagree (heterogeneity) stand apart at a glance.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from homodyne_steps.inference.cmc_diagnostics import BFMI_WARN  # below: poor exploration
from homodyne_steps.io.cmc_files import CmcParameters, CombinationReport
from homodyne_steps.io.nlsq_files import NlsqParameters
from homodyne_steps.physics.registry import REGISTRY, canonical_mode
from homodyne_steps.plots.plot_common import (
    PlotError,
    PlotSettings,
    grid_shape,
    new_figure_set,
    plt,
    read_typed,
    status_colour,
    style,
)

HDI_PROB = 0.94
ARVIZ_RC = {"plot.max_subplots": 400}


def read_idata(path: Path, names: Sequence[str], what: str, stats: Sequence[str] = ("energy",)):
    """InferenceData with the ``names`` posterior variables and ``stats`` sample stats of a
    netCDF file written by ArviZ (``to_netcdf``), plus the posterior attributes.

    Reads only those variables with h5py (ArviZ's reader opens every group and variable:
    ~20× slower for shard files with their log-likelihood and observed data groups).
    """
    import arviz as az
    import h5py

    path = Path(path)
    if not path.is_file():
        raise PlotError(f"{what}: {path} does not exist")
    try:
        with h5py.File(path, "r") as h5:
            if "posterior" not in h5:
                raise PlotError(f"{what}: {path} has no 'posterior' group")
            group = h5["posterior"]
            missing = [n for n in names if n not in group]
            if missing:
                raise PlotError(f"{what}: {path} lacks posterior variables {missing}")
            posterior = {n: np.asarray(group[n][()], dtype=np.float64) for n in names}
            attrs = {k: _plain(v) for k, v in group.attrs.items()}
            sample_stats = None
            if "sample_stats" in h5:
                ss = h5["sample_stats"]
                sample_stats = {k: np.asarray(ss[k][()]) for k in stats if k in ss} or None
    except PlotError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise PlotError(f"{what}: cannot read {path}: {exc}") from None
    bad = [n for n, v in posterior.items() if v.ndim != 2]
    if bad:
        raise PlotError(f"{what}: {path}: {bad} must have dims (chain, draw)")
    idata = az.from_dict(posterior=posterior, sample_stats=sample_stats)
    idata.posterior.attrs.update(attrs)
    return idata


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.item()
    return value


def _figure_of(axes):
    return np.ravel(np.asarray(axes, dtype=object))[0].get_figure()


def _title(fig, text: str, status: str | None) -> None:
    """Suptitle coloured by convergence status, wrapped to the figure width."""
    import textwrap

    width = int(fig.get_size_inches()[0] * 11)  # ~characters per line at 12 pt
    fig.suptitle(
        "\n".join(textwrap.wrap(text, width)),
        y=0.995,
        va="top",
        color=status_colour(status) if status else "black",
    )


def _adjust(fig, size, *, left=0.75, right=0.25, top=0.75, bottom=0.55, wspace=0.3, hspace=0.5):
    """Margins in inches (a layout engine costs ~0.5 s per figure); fewer x ticks so long
    tick labels (-0.375, 0.00015) do not run into each other."""
    from matplotlib.ticker import MaxNLocator

    w, h = size
    fig.subplots_adjust(
        left=left / w,
        right=1 - right / w,
        top=1 - top / h,
        bottom=bottom / h,
        wspace=wspace,
        hspace=hspace,
    )
    for ax in fig.axes:
        if ax.get_xscale() == "linear" and isinstance(ax.xaxis.get_major_locator(), MaxNLocator):
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5))


def trace(post, names: Sequence[str]):
    import arviz as az

    size = (12.0, 1.75 * len(names) + 1.0)
    axes = az.plot_trace(post, var_names=list(names), compact=True, legend=True, figsize=size)
    fig = _figure_of(axes)
    rows = np.atleast_2d(axes)
    rows[-1, 1].set_xlabel("draw")
    rows[-1, 0].set_xlabel("parameter value")
    _adjust(fig, size, left=0.5, top=0.6, bottom=0.5, hspace=0.75, wspace=0.22)
    return fig, size


def rank(post, names: Sequence[str]):
    import arviz as az

    rows, cols = grid_shape(len(names), 3)
    size = (4.3 * cols, 2.8 * rows + 0.8)
    axes = az.plot_rank(post, var_names=list(names), figsize=size)
    fig = _figure_of(axes)
    _adjust(fig, size, left=0.5, hspace=0.55, wspace=0.2)
    return fig, size


def pair(post, names: Sequence[str], nlsq: dict[str, float]):
    import arviz as az

    p = len(names)
    side = max(7.0, 1.75 * p + 0.8)
    axes = az.plot_pair(
        post,
        var_names=list(names),
        kind="scatter",
        marginals=True,
        figsize=(side, side),
        textsize=9 if p > 4 else 11,
        scatter_kwargs={"alpha": 0.35, "s": 5},
        reference_values={n: v for n, v in nlsq.items() if n in names} or None,
        reference_values_kwargs={
            "color": "C3",
            "markeredgecolor": "C3",
            "marker": "x",
            "markersize": 8,
            "markeredgewidth": 2,
        },
    )
    fig = _figure_of(axes)
    _adjust(fig, (side, side), left=1.2, bottom=1.0, top=0.45, right=0.15, hspace=0.16, wspace=0.1)
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.tick_params(axis="x", labelrotation=35)
        if not ax.get_subplotspec().is_first_col() or ax.get_ylabel():
            ax.ticklabel_format(style="plain", useOffset=False)  # no 1e-5 over the panel
    return fig, (side, side)


def forest(post, shards: Sequence, labels: Sequence[str], names: Sequence[str], nlsq: dict):
    """One panel per parameter (own scale): combined (black) and shard (blue; excluded:
    grey) HDIs, NLSQ value ± 1 σ (red)."""
    import arviz as az

    rows, cols = grid_shape(len(names), 2)
    height = max(1.8, 0.2 * (len(shards) + 1) + 0.8)
    size = (13.0, height * rows + 1.0)
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=size)
    data = [post, *shards]
    model_names = ["combined", *labels]
    colours = ["black"] + ["0.6" if "excluded" in lab else "C0" for lab in labels]
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.set_visible(False)
            continue
        n = names[k]
        az.plot_forest(
            [d.posterior[[n]] for d in data],  # this parameter only: ~2x faster
            model_names=model_names,
            var_names=[n],
            combined=True,
            hdi_prob=HDI_PROB,
            ax=ax,
            legend=False,
            textsize=9,
            colors=colours,
        )
        value, sd = nlsq.get(n, (None, None))
        if value is not None:
            if sd:
                ax.axvspan(value - sd, value + sd, color="C3", alpha=0.15, lw=0)
            ax.axvline(value, color="C3", ls="--", lw=1.3)
        ax.set_yticks(ax.get_yticks(), [t.get_text().split(":")[0] for t in ax.get_yticklabels()])
        unit = REGISTRY[n].unit
        ax.set_title(f"{n}" + (f" ({unit})" if unit not in ("", "–") else ""), fontsize=10)
    handles = [
        plt.Line2D([], [], color="black", lw=2, label="combined posterior"),
        plt.Line2D([], [], color="C0", lw=2, label="shard posteriors"),
        plt.Line2D([], [], color="C3", ls="--", label="NLSQ value"),
        plt.Rectangle((0, 0), 1, 1, color="C3", alpha=0.15, label="NLSQ ± 1σ"),
    ]
    fig.legend(handles=handles, loc="lower center", ncols=4, fontsize=9, frameon=False)
    _adjust(fig, size, left=1.0, top=0.65, bottom=0.75, hspace=0.45, wspace=0.25)
    return fig, size


def energy(shards: Sequence, labels: Sequence[str]):
    import arviz as az

    usable = [
        (s, lab)
        for s, lab in zip(shards, labels, strict=True)
        if "sample_stats" in s.groups() and "energy" in s.sample_stats
    ]
    rows, cols = grid_shape(max(len(usable), 1), 4)
    size = (3.6 * cols, 2.7 * rows + 1.2)
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=size)
    for k, ax in enumerate(axes.flat):
        if k >= len(usable):
            if usable:
                ax.set_visible(False)
            else:
                ax.text(
                    0.5,
                    0.5,
                    "no shard file has energy sample stats",
                    ha="center",
                    transform=ax.transAxes,
                )
                ax.set_axis_off()
            continue
        s, lab = usable[k]
        az.plot_energy(s, ax=ax, legend=False, bfmi=False, textsize=8.5, bw="scott")
        bfmi = np.atleast_1d(az.bfmi(s))
        low = bool(np.any(bfmi < BFMI_WARN))
        ax.set_title(
            f"{lab}: BFMI " + ", ".join(f"{b:.2f}" for b in bfmi),
            fontsize=9.5,
            color=status_colour("fail" if low else "good"),
        )
        ax.set_xlabel("energy − mean")
    handles = [
        plt.Rectangle((0, 0), 1, 1, color="C0", label="marginal energy"),
        plt.Rectangle((0, 0), 1, 1, color="C5", alpha=0.75, label="energy transition"),
    ]
    fig.legend(handles=handles, loc="lower center", ncols=2, fontsize=9, frameon=False)
    _adjust(fig, size, left=0.3, right=0.15, top=1.0, bottom=0.85, hspace=0.45, wspace=0.12)
    return fig, size


def ess(post, names: Sequence[str], ess_warn: float):
    import arviz as az

    rows, cols = grid_shape(len(names), 3)
    size = (4.3 * cols, 2.8 * rows + 0.8)
    axes = az.plot_ess(
        post,
        var_names=list(names),
        kind="evolution",
        n_points=12,
        min_ess=int(ess_warn),
        figsize=size,
        textsize=9,
    )
    fig = _figure_of(axes)
    _adjust(fig, size, left=0.7, hspace=0.6, wspace=0.3)
    return fig, size


def shard_densities(post, shards: Sequence, labels: Sequence[str], names: Sequence[str]):
    """Every shard's marginal posterior (colours; excluded shards grey) under the combined
    one (black): a shard far from the others is heterogeneity at a glance."""
    import arviz as az

    rows, cols = grid_shape(len(names), 3)
    size = (4.3 * cols, 2.9 * rows + 1.0)
    cmap = plt.get_cmap("viridis")
    colours = ["black"] + [
        "0.6" if "excluded" in lab else cmap(0.9 * k / max(len(labels) - 1, 1))
        for k, lab in enumerate(labels)
    ]
    axes = az.plot_density(
        [post, *shards],
        data_labels=["combined", *labels],
        var_names=list(names),
        bw="scott",  # near-Gaussian shard posteriors; ArviZ's default costs 2x here
        hdi_prob=0.995,
        outline=True,
        shade=0.0,
        colors=colours,
        figsize=size,
        textsize=9,
    )
    fig = _figure_of(axes)
    flat = np.ravel(axes)
    legend = flat[0].get_legend()
    handles, texts = flat[0].get_legend_handles_labels()
    if legend is not None:
        legend.remove()
    spare = [ax for ax in flat[len(names) :]]
    if spare:  # the legend goes where a panel would be
        spare[0].legend(
            handles,
            texts,
            loc="center",
            ncols=2 if len(texts) > 8 else 1,
            fontsize=8.5,
            title="posterior (99.5 % HDI)",
        )
    else:
        fig.legend(handles, texts, loc="lower center", ncols=min(len(texts), 7), fontsize=8.5)
    _adjust(
        fig,
        size,
        left=0.3,
        right=0.2,
        top=0.7,
        bottom=0.5 if spare else 1.0,
        hspace=0.5,
        wspace=0.12,
    )
    return fig, size


def _nlsq_values(path: Path | None) -> dict[str, tuple[float, float | None]]:
    if path is None:
        return {}
    rec = read_typed(NlsqParameters, path)
    return {n: (p.value, p.uncertainty) for n, p in rec.parameters.items()}


def _read_cmc_records(cmc_dir: Path) -> tuple[CmcParameters, CombinationReport, str]:
    """The CMC parameters and combination report of ``cmc_dir``, and its analysis mode."""
    params = read_typed(CmcParameters, cmc_dir / "parameters.json")
    report = read_typed(CombinationReport, cmc_dir / "combination_report.json")
    try:
        mode = canonical_mode(params.analysis_mode)
    except ValueError as exc:
        raise PlotError(f"{cmc_dir / 'parameters.json'}: no valid analysis_mode ({exc})") from None
    return params, report, mode


def _read_shards(paths: Sequence[Path], names: Sequence[str], report: CombinationReport):
    """The shards' posteriors and their labels (``shard k``, `` (excluded)`` if not kept)."""
    kept = {row.shard: row.kept for row in report.per_shard}
    shards, labels = [], []
    for path in paths:
        idata = read_idata(path, names, "CMC shard")
        k = idata.posterior.attrs.get("shard", path.stem)
        k = int(k) if isinstance(k, int | np.integer) else k
        shards.append(idata)
        labels.append(f"shard {k}" + ("" if kept.get(k, True) else " (excluded)"))
    return shards, labels


def _headline(report: CombinationReport, status: str, shown: int, total: int):
    """The title head (method, shards, status) and the note when not all shards are shown."""
    head = f"CMC {report.method}, {report.num_shards} shards: {status}"
    note = f" (first {shown} of {total} shards shown)" if shown < total else ""
    return head, note


def _draw_figures(figs, post, shards, labels, names, nlsq, ess_warn, head, note, status) -> None:
    """Draws and saves the seven CMC figures, in the index's order, titled ``head``."""
    fig, size = trace(post, names)
    _title(fig, head + ": trace of the combined posterior", status)
    figs.save(fig, "trace.png", size, "trace plot", "combined draws per chain and densities")
    fig, size = rank(post, names)
    _title(fig, head + ": rank plots (flat = chains mix)", status)
    figs.save(fig, "rank.png", size, "rank plot", "rank histograms of the chains")
    fig, size = pair(post, names, {n: v for n, (v, _) in nlsq.items()})
    _title(fig, head + ": pair plot (red × = NLSQ optimum)", status)
    figs.save(
        fig,
        "pair.png",
        size,
        "pair plot",
        "pairwise scatter and marginals of the combined posterior, NLSQ optimum",
    )
    fig, size = forest(post, shards, labels, names, nlsq)
    _title(fig, head + f": {int(HDI_PROB * 100)} % HDI, combined and per shard" + note, status)
    figs.save(
        fig,
        "forest.png",
        size,
        "forest plot",
        "94 % HDI of the combined posterior and each shard, NLSQ value ± 1 sigma",
    )
    fig, size = energy(shards, labels)
    _title(fig, head + ": energy per shard (BFMI < 0.3: poor exploration)" + note, status)
    figs.save(
        fig,
        "energy.png",
        size,
        "energy plot",
        "marginal and transition energy per shard, with BFMI",
    )
    fig, size = ess(post, names, ess_warn)
    _title(fig, head + f": ESS as draws accumulate (line: {ess_warn:g})", status)
    figs.save(fig, "ess.png", size, "ESS evolution", "bulk and tail ESS vs draws")
    fig, size = shard_densities(post, shards, labels, names)
    _title(fig, head + ": shard posteriors against the combined one" + note, status)
    figs.save(
        fig,
        "shard_posteriors.png",
        size,
        "shard posteriors",
        "posterior density of every shard and of the combination",
    )


def plot_cmc_stage(
    cmc_dir: str | os.PathLike[str],
    shard_files: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    settings: PlotSettings | None = None,
    *,
    nlsq_parameters: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write the CMC figures of ``cmc_dir`` (``posterior.nc``, ``parameters.json``,
    ``combination_report.json``) and its shard ``.nc`` files; returns the index."""
    import arviz as az

    s = settings or PlotSettings()
    cmc_dir = Path(cmc_dir)
    params, report, mode = _read_cmc_records(cmc_dir)
    names = list(REGISTRY.physical_names(mode))
    post = read_idata(cmc_dir / "posterior.nc", names, "CMC posterior")
    shard_paths = sorted((Path(p) for p in shard_files), key=lambda p: (len(p.stem), p.stem))
    shards, labels = _read_shards(shard_paths[: s.max_shards], names, report)
    nlsq = _nlsq_values(Path(nlsq_parameters) if nlsq_parameters else None)
    status = params.convergence.status
    ess_warn = float(report.settings.ess_warn)
    head, note = _headline(report, status, len(shards), len(shard_paths))
    figs = new_figure_set(out_dir, s, "plot_cmc")
    with style(), az.rc_context(rc=ARVIZ_RC), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns about short chains, bandwidths, ...
        _draw_figures(figs, post, shards, labels, names, nlsq, ess_warn, head, note, status)
    return figs.finish(
        inputs={"cmc_dir": str(cmc_dir), "shards": [str(p) for p in shard_paths]},
        analysis_mode=mode,
        convergence_status=status,
    )
