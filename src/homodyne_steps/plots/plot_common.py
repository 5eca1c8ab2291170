"""What every plot stage shares: settings, block-mean downsampling, atomic PNG writing.

Matplotlib runs on the Agg backend (set here, before pyplot is imported), so plots work
on cluster nodes without a display. Every figure has a fixed size in inches, so its PNG
is exactly ``size × dpi`` pixels; each plot stage writes its PNGs into one directory with
a ``figures.json`` index (file, title, what it shows, pixel size) and removes PNGs of an
earlier run that are no longer produced (an angle dropped by a new filter, say).

Large matrices are never drawn point by point: :func:`block_mean` averages
non-overlapping f × f blocks down to at most ``max_pixels`` per side. A block mean is a
box filter followed by decimation, so structure finer than a block is averaged rather
than aliased into false patterns (plain striding would pick every f-th noisy element).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display needed, same output everywhere

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402

from homodyne_steps.errors import DataError  # noqa: E402
from homodyne_steps.io.record import Record  # noqa: E402
from homodyne_steps.io.serialise import (  # noqa: E402
    SerialisationError,
    atomic_path,
    read_json_object,
    write_json,
)
from homodyne_steps.plots.plot_settings import PlotSettings  # noqa: E402

R = TypeVar("R", bound=Record)

INDEX_FILE = "figures.json"
ANGLE_DIR = "angles"  # the per-angle figures of a plot stage
PNG_COMPRESS_LEVEL = 1
SCHEMA_VERSION = 1
STYLE = {
    "font.size": 10,
    "axes.titlesize": 10.5,
    "axes.labelsize": 10,
    "legend.fontsize": 8.5,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "figure.titlesize": 12,
    "image.origin": "lower",
    "axes.grid": False,
    "savefig.facecolor": "white",
    "figure.facecolor": "white",
}
STATUS_COLOURS = {
    "good": "#2e7d32",
    "excellent": "#2e7d32",
    "pass": "#558b2f",
    "acceptable": "#f9a825",
    "warning": "#f9a825",
    "warn": "#ef6c00",
    "poor": "#c62828",
    "fail": "#c62828",
    "converged": "#2e7d32",
    "converged_with_warnings": "#ef6c00",
    "not_converged": "#c62828",
    "failed": "#c62828",
    "not_identified": "#c62828",
    "weakly_identified": "#ef6c00",
    "max_iterations": "#c62828",
}


class PlotError(DataError):
    """A plot stage's input is missing or not what the stage expects."""


@dataclass
class FigureRecord:
    """One written figure, as listed in ``figures.json``."""

    file: str
    title: str
    shows: str
    size_px: list[int]  # [width, height]


@dataclass
class FigureSet:
    """The figures one plot stage writes into ``out_dir``."""

    out_dir: Path
    settings: PlotSettings
    stage: str
    records: list[FigureRecord] = field(default_factory=list)

    def save(
        self, fig, name: str, size: tuple[float, float], title: str, shows: str, *, close=True
    ) -> Path:
        """Write ``fig`` as ``name`` (PNG, ``size`` inches at the stage's dpi), atomically;
        ``close=False`` keeps the figure open to be updated and saved again."""
        if any(r.file == name for r in self.records):
            raise ValueError(f"figure {name} written twice")
        (self.out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        path = save_png(fig, self.out_dir / name, size, self.settings.dpi, close=close)
        w, h = (round(x * self.settings.dpi) for x in size)
        self.records.append(FigureRecord(name, title, shows, [w, h]))
        return path

    def finish(self, **extra: Any) -> dict[str, Any]:
        """Write ``figures.json`` and remove PNGs of an earlier run not written now."""
        keep = {r.file for r in self.records}
        for old in [*self.out_dir.glob("*.png"), *self.out_dir.glob(f"{ANGLE_DIR}/*.png")]:
            if old.relative_to(self.out_dir).as_posix() not in keep:
                old.unlink(missing_ok=True)
        index = {
            "schema_version": SCHEMA_VERSION,
            "stage": self.stage,
            "settings": self.settings.to_mapping(),
            "figures": [asdict(r) for r in self.records],
            **extra,
        }
        write_json(self.out_dir / INDEX_FILE, index)
        return index


def new_figure_set(out_dir: str | os.PathLike[str], settings: PlotSettings, stage: str):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return FigureSet(out, settings, stage)


def save_png(fig, path: Path, size: tuple[float, float], dpi: int, *, close: bool = True) -> Path:
    """Save ``fig`` at exactly ``size`` inches × ``dpi`` pixels (never a tight bbox, so
    the pixel size is known) through a temporary name renamed on success; close it.

    Rendered once with Agg and written as opaque RGB with fast zlib settings: the same
    image as ``savefig`` at ~60 % of its time (noisy heatmaps barely compress anyway).
    """
    from PIL import Image

    try:
        fig.set_size_inches(*size, forward=False)
        fig.set_dpi(dpi)
        canvas = FigureCanvasAgg(fig) if not isinstance(fig.canvas, FigureCanvasAgg) else fig.canvas
        canvas.draw()
        rgb = np.asarray(canvas.buffer_rgba())[..., :3]
        with atomic_path(path) as tmp:
            Image.fromarray(rgb).save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    finally:
        if close:
            plt.close(fig)
    return path


def style():
    """Context manager with the package's matplotlib style."""
    return plt.rc_context(STYLE)


# ---------------------------------------------------------------------------------------
# Display helpers
# ---------------------------------------------------------------------------------------
def block_factor(n: int, max_pixels: int) -> int:
    """Smallest block size f with ceil(n / f) <= max_pixels."""
    return max(1, math.ceil(n / max_pixels))


def block_mean(matrix: np.ndarray, max_pixels: int) -> tuple[np.ndarray, int]:
    """Average non-overlapping f × f blocks so that no side exceeds ``max_pixels``.

    Returns (reduced matrix, f). NaN elements are ignored in their block's mean (a block
    of NaN stays NaN); a partial last block averages the elements it has. f = 1 returns
    the input unchanged (no copy).
    """
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"block_mean expects a 2-D matrix, got shape {a.shape}")
    f = max(block_factor(a.shape[0], max_pixels), block_factor(a.shape[1], max_pixels))
    if f == 1:
        return a, 1
    n0, n1 = math.ceil(a.shape[0] / f), math.ceil(a.shape[1] / f)
    padded = np.full((n0 * f, n1 * f), np.nan)
    padded[: a.shape[0], : a.shape[1]] = a
    blocks = padded.reshape(n0, f, n1, f)
    finite = np.isfinite(blocks)
    count = finite.sum(axis=(1, 3))
    total = np.where(finite, blocks, 0.0).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan), f


def matrix_extent(t: np.ndarray, n_blocks: int, f: int) -> list[float]:
    """imshow extent (x0, x1, y0, y1) of a block-mean image over the time grid ``t``."""
    t = np.asarray(t, dtype=np.float64)
    dt = float(t[1] - t[0]) if t.size > 1 else 1.0
    lo = float(t[0]) - dt / 2
    hi = lo + n_blocks * f * dt
    return [lo, hi, lo, hi]


def offdiagonal_sample(matrices: Iterable[np.ndarray], max_values: int = 200_000) -> np.ndarray:
    """Finite upper-triangle (lag >= 1) values of square matrices, strided to at most
    ``max_values`` in all (for colour limits and histograms)."""
    out = []
    mats = list(matrices)
    per = max(1, max_values // max(len(mats), 1))
    for m in mats:
        n = m.shape[0]
        i, j = np.triu_indices(n, k=1)
        step = max(1, i.size // per)
        v = m[i[::step], j[::step]]
        out.append(v[np.isfinite(v)])
    return np.concatenate(out) if out else np.zeros(0)


def robust_limits(values: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> tuple[float, float]:
    """Percentile colour limits; a constant or empty sample gets a small range around it."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    a, b = (float(x) for x in np.percentile(v, [lo, hi]))
    if not b > a:
        pad = max(abs(a) * 1e-3, 1e-12)
        a, b = a - pad, b + pad
    return a, b


def diagonal_means(c2: np.ndarray) -> np.ndarray:
    """g2 vs lag: mean of c2[i, i + k] over i for k = 0..n-1, per angle ((P, n) -> (P, n)).

    NaN elements are skipped; a lag with none finite is NaN.
    """
    c2 = np.asarray(c2, dtype=np.float64)
    if c2.ndim == 2:
        return diagonal_means(c2[None])[0]
    n = c2.shape[-1]
    out = np.full(c2.shape[:-2] + (n,), np.nan)
    for k in range(n):
        d = np.diagonal(c2, offset=k, axis1=-2, axis2=-1)
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(d)
            cnt = finite.sum(axis=-1)
            s = np.where(finite, d, 0.0).sum(axis=-1)
            out[..., k] = np.where(cnt > 0, s / np.maximum(cnt, 1), np.nan)
    return out


def angle_tag(phi: float) -> str:
    """File-name form of an angle: one decimal, '-' kept (``-30.0``)."""
    return f"{float(phi):.1f}"


def angle_file_names(prefix: str, phis: Sequence[float]) -> list[str]:
    """``angles/{prefix}_phi_{angle}deg.png`` per angle (relative to the stage's folder);
    equal angles get ``_{index}`` appended. Their number follows the data, so they sit in
    a folder of their own: the workflow names every other file of a plot stage exactly."""
    tags = [angle_tag(p) for p in phis]
    names = []
    for k, tag in enumerate(tags):
        unique = tags.count(tag) == 1
        name = f"{prefix}_phi_{tag}deg.png" if unique else f"{prefix}_phi_{tag}deg_{k}.png"
        names.append(f"{ANGLE_DIR}/{name}")
    return names


def q_label(q: float) -> str:
    return rf"$q$ = {q:.4g} Å$^{{-1}}$"


def phi_label(phi: float) -> str:
    return rf"$\varphi$ = {phi:.1f}°"


def time_label(axis: str) -> str:
    return rf"$t_{{{axis}}}$ (s)"


def angle_colours(n: int) -> list:
    cmap = plt.get_cmap("viridis" if n > 10 else "tab10")
    if n > 10:
        return [cmap(x) for x in np.linspace(0.0, 0.92, n)]
    return [cmap(k) for k in range(n)]


def grid_shape(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(max_cols, max(n, 1))
    return math.ceil(max(n, 1) / cols), cols


def read_record(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """A JSON object from ``path``; a missing or malformed file is a PlotError naming it."""
    try:
        return read_json_object(path)
    except SerialisationError as exc:
        raise PlotError(f"{what}: {exc}") from None


def read_typed(cls: type[R], path: str | os.PathLike[str]) -> R:
    """The typed record (:mod:`homodyne_steps.io.record`) in ``path``; a missing or
    malformed file is a PlotError naming the file and the key."""
    try:
        return cls.read(path)
    except SerialisationError as exc:
        raise PlotError(str(exc)) from None


def read_arrays(path: str | os.PathLike[str], keys: Sequence[str], what: str) -> dict[str, Any]:
    """Only ``keys`` of an .npz (large files hold arrays a figure does not need)."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise PlotError(f"{what}: {p} lacks arrays {missing}; it has {sorted(data.files)}")
            return {k: data[k] for k in keys}
    except (OSError, ValueError) as exc:
        raise PlotError(f"{what}: cannot read NPZ file {p}: {exc}") from None


def status_colour(label: str | None) -> str:
    return STATUS_COLOURS.get(str(label), "#455a64")


def draw_matrix(ax, matrix: np.ndarray, t: np.ndarray, max_pixels: int, **imshow_kw):
    """Block-mean ``matrix`` for display and draw it over the time grid ``t``; returns
    (image, block size)."""
    shown, f = block_mean(matrix, max_pixels)
    im = ax.imshow(
        shown,
        extent=matrix_extent(t, shown.shape[0], f),
        origin="lower",
        aspect="equal",
        interpolation="nearest",
        **imshow_kw,
    )
    ax.set_xlabel(time_label("1"))
    ax.set_ylabel(time_label("2"))
    return im, f


def block_note(f: int) -> str:
    return "" if f == 1 else f" (block mean {f}×{f})"


class HeatmapRow:
    """A reusable figure of three heatmaps on a fixed layout: panels 1 and 2 share a colour
    bar, panel 3 has its own. Built once per stage and updated per angle (``show``):
    re-drawing into fixed axes is ~3× faster than a new figure with a layout engine.
    """

    SIZE = (15.0, 4.9)  # inches
    _PANEL = 3.55  # side of a panel, inches
    _X = (0.75, 4.75, 10.1)  # left edge of each panel
    _CBAR = (8.45, 13.8)  # left edge of the two colour bars
    _Y = 0.6

    def __init__(self, max_pixels: int):
        w, h = self.SIZE
        self.max_pixels = max_pixels
        self.fig = plt.figure(figsize=self.SIZE)
        self.axes = [
            self.fig.add_axes((x / w, self._Y / h, self._PANEL / w, self._PANEL / h))
            for x in self._X
        ]
        self.caxes = [
            self.fig.add_axes((x / w, self._Y / h, 0.16 / w, self._PANEL / h)) for x in self._CBAR
        ]
        self.images: list = []
        self.suptitle = self.fig.suptitle("", y=0.975)

    def show(self, matrices, t, limits, cmaps, titles, cbar_labels, suptitle) -> None:
        """Draw three matrices (block-mean downsampled) with (vmin, vmax) ``limits`` each
        (panels 1 and 2 share a colour bar: give them the same limits)."""
        shown = [block_mean(m, self.max_pixels) for m in matrices]
        if not self.images:
            for k, (ax, (m, f)) in enumerate(zip(self.axes, shown, strict=True)):
                im = ax.imshow(
                    m,
                    extent=matrix_extent(t, m.shape[0], f),
                    origin="lower",
                    interpolation="nearest",
                    cmap=cmaps[k],
                    vmin=limits[k][0],
                    vmax=limits[k][1],
                )
                ax.set_xlabel(time_label("1"))
                if k != 1:
                    ax.set_ylabel(time_label("2"))
                self.images.append(im)
            for cax, im, label in zip(self.caxes, self.images[1:], cbar_labels, strict=True):
                self.fig.colorbar(im, cax=cax, extend="both", label=label)
        else:
            for im, (m, f), (lo, hi) in zip(self.images, shown, limits, strict=True):
                im.set_data(m)
                im.set_extent(matrix_extent(t, m.shape[0], f))
                im.set_clim(lo, hi)
        for ax, title, (_, f) in zip(self.axes, titles, shown, strict=True):
            ax.set_title(title + block_note(f))
        self.suptitle.set_text(suptitle)

    def close(self) -> None:
        plt.close(self.fig)
