"""Simulated APS two-time files drawn from the model, with known truth.

The clean c2 of each (q, phi) cell comes from :func:`homodyne_steps.physics.model.compute_c2`
at that cell's own q (so picking the wrong ring is visible). Noise is Gaussian with a
standard deviation ``noise × c2`` (relative), drawn on the upper triangle and mirrored so
the matrix stays symmetric. The diagonal gets a shot-noise-like excess, as real
correlators produce and the diagonal correction removes. The truth goes to a JSON file
beside the data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from homodyne_steps import __version__
from homodyne_steps.errors import HomodyneStepsError, SimulationError
from homodyne_steps.io.aps_writer import FORMATS, TwoTimeBins, write_aps_file
from homodyne_steps.io.serialise import write_json
from homodyne_steps.physics.model import compute_c2
from homodyne_steps.physics.model_settings import ModelSettings
from homodyne_steps.physics.reference import REFERENCE_CASES, REFERENCE_GEOMETRY
from homodyne_steps.physics.registry import LAMINAR_FLOW, REGISTRY, canonical_mode


@dataclass(frozen=True)
class SimulationSettings:
    """Everything that determines a simulated file (deterministic for a seed).

    Attributes:
        params: physical parameters, name -> value (mode inferred from the names).
        phi_deg: angle bin centres in degrees.
        q: target ring in 1/Å (the middle one of ``n_q_rings`` rings).
        L: stator–rotor gap in Å.  dt: C2 time step in s.  n_frames: C2 size N.
        contrast, offset: scalar or one per angle.
        noise: relative Gaussian noise level (σ = noise × c2).
        diagonal_excess: mean excess added on the diagonal (shot noise).
        n_q_rings, q_ring_step: number of rings and their relative spacing.
        empty_cells: natural (iq, iphi) cells with no pixels (left out of the file).
        avg_frames, stride_frames: correlator settings; frame_time = dt / (avg × stride).
        seed: random seed.
    """

    params: Mapping[str, float]
    phi_deg: Sequence[float]
    q: float = REFERENCE_GEOMETRY["q"]
    L: float = REFERENCE_GEOMETRY["L"]
    dt: float = REFERENCE_GEOMETRY["dt"]
    n_frames: int = 200
    contrast: float | Sequence[float] = REFERENCE_GEOMETRY["contrast"]
    offset: float | Sequence[float] = REFERENCE_GEOMETRY["offset"]
    noise: float = REFERENCE_GEOMETRY["noise"]
    diagonal_excess: float = 0.5
    n_q_rings: int = 3
    q_ring_step: float = 0.2
    empty_cells: Sequence[tuple[int, int]] = field(default_factory=tuple)
    avg_frames: int = 2
    stride_frames: int = 5
    seed: int = 0
    model: ModelSettings = field(default_factory=ModelSettings)

    @property
    def target_ring(self) -> int:
        return self.n_q_rings // 2

    def q_rings(self) -> np.ndarray:
        k = np.arange(self.n_q_rings) - self.target_ring
        return self.q * (1.0 + self.q_ring_step * k)


def reference_settings(mode: str, **overrides: Any) -> SimulationSettings:
    """Settings of the physics.md reference case of ``mode``, with overrides."""
    case = REFERENCE_CASES[canonical_mode(mode)]
    base: dict[str, Any] = {
        "params": dict(case["params"]),
        "phi_deg": case["phi_deg"],
        "n_frames": case["n_frames"],
    }
    base.update(overrides)
    return SimulationSettings(**base)


SETTINGS_KEYS = (
    "mode", "params", "phi_deg", "n_frames", "q", "L", "dt", "contrast", "offset", "noise",
    "diagonal_excess", "n_q_rings", "q_ring_step", "empty_cells", "avg_frames",
    "stride_frames", "seed", "model",
)  # fmt: skip


def settings_from_mapping(m: Mapping[str, Any], where: str = "simulate") -> SimulationSettings:
    """Settings from a config mapping: the reference case of ``mode`` with overrides.

    ``params`` overrides individual physical parameters of that case.
    """
    m = dict(m)
    method = m.pop("method", "model")
    if method != "model":
        raise SimulationError(
            f"{where}.method: {method!r} is not the model simulator's; use "
            "speckle_mapping (or method: model)"
        )
    unknown = sorted(set(m) - set(SETTINGS_KEYS))
    if unknown:
        raise SimulationError(
            f"{where}.{unknown[0]}: unknown key; expected one of {sorted(SETTINGS_KEYS)}"
        )
    mode = canonical_mode(m.get("mode", LAMINAR_FLOW))
    case = REFERENCE_CASES[mode]
    params = dict(case["params"])
    for name, value in dict(m.get("params") or {}).items():
        if name not in params:
            raise SimulationError(
                f"{where}.params.{name}: not a physical parameter of {mode} mode "
                f"({', '.join(params)})"
            )
        params[name] = value
    overrides = {k: v for k, v in m.items() if k not in ("mode", "params")}
    if "phi_deg" in overrides:
        overrides["phi_deg"] = tuple(overrides["phi_deg"])
    if "empty_cells" in overrides:
        overrides["empty_cells"] = tuple(tuple(c) for c in overrides["empty_cells"])
    if "model" in overrides:
        try:
            overrides["model"] = ModelSettings.from_mapping(overrides["model"], f"{where}.model")
        except HomodyneStepsError as exc:
            raise SimulationError(str(exc)) from None
    return reference_settings(mode, params=params, **overrides)


def _validate(s: SimulationSettings) -> tuple[str, np.ndarray]:
    mode, _ = REGISTRY.physical_vector(dict(s.params))
    phi = np.asarray(s.phi_deg, dtype=np.float64)
    if phi.ndim != 1 or phi.size == 0 or not np.all(np.isfinite(phi)):
        raise SimulationError(f"phi_deg must be a non-empty list of angles, got {s.phi_deg!r}")
    if np.unique(phi).size != phi.size:
        raise SimulationError(f"phi_deg has repeated angles: {phi.tolist()}")
    if np.any((phi <= -180.0) | (phi > 180.0)):
        raise SimulationError(f"phi_deg must lie in (-180, 180] degrees, got {phi.tolist()}")
    if not (isinstance(s.n_frames, int | np.integer) and s.n_frames >= 3):
        raise SimulationError(f"n_frames must be an integer >= 3, got {s.n_frames!r}")
    for name in ("q", "L", "dt"):
        v = getattr(s, name)
        if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise SimulationError(f"{name} must be a finite number > 0, got {v!r}")
    if not (math.isfinite(s.noise) and s.noise >= 0):
        raise SimulationError(f"noise must be >= 0 (relative level), got {s.noise!r}")
    if not (math.isfinite(s.diagonal_excess) and s.diagonal_excess >= 0):
        raise SimulationError(f"diagonal_excess must be >= 0, got {s.diagonal_excess!r}")
    if not (isinstance(s.n_q_rings, int) and s.n_q_rings >= 1):
        raise SimulationError(f"n_q_rings must be an integer >= 1, got {s.n_q_rings!r}")
    if s.n_q_rings > 1 and not (s.q_ring_step > 0 and np.all(s.q_rings() > 0)):
        raise SimulationError(
            f"q_ring_step {s.q_ring_step!r} must be > 0 and keep every one of the "
            f"{s.n_q_rings} rings at q > 0 (rings: {s.q_rings().tolist()})"
        )
    for name in ("avg_frames", "stride_frames"):
        v = getattr(s, name)
        if not (isinstance(v, int) and v >= 1):
            raise SimulationError(f"{name} must be an integer >= 1, got {v!r}")
    for cell in s.empty_cells:
        iq, ip = cell
        if not (0 <= iq < s.n_q_rings and 0 <= ip < phi.size):
            raise SimulationError(
                f"empty cell {tuple(cell)} is outside the {s.n_q_rings} × {phi.size} "
                "(q ring, phi bin) partition"
            )
    if all((s.target_ring, ip) in set(map(tuple, s.empty_cells)) for ip in range(phi.size)):
        raise SimulationError("every phi bin of the target q ring is empty: nothing to analyse")
    return mode, phi


def simulate_bins(s: SimulationSettings) -> tuple[TwoTimeBins, dict[str, Any]]:
    """Draw every non-empty (q, phi) cell; return the bins and the truth record."""
    mode, phi = _validate(s)
    n_phi = phi.size
    contrast = REGISTRY.per_angle_vector("contrast", s.contrast, n_phi)
    offset = REGISTRY.per_angle_vector("offset", s.offset, n_phi)
    t = s.dt * np.arange(s.n_frames)
    empty = {tuple(int(x) for x in c) for c in s.empty_cells}
    rng = np.random.default_rng(s.seed)
    iu = np.triu_indices(s.n_frames)
    diag = np.arange(s.n_frames)
    c2_cells: dict[tuple[int, int], np.ndarray] = {}
    for iq, q_ring in enumerate(s.q_rings()):
        clean = compute_c2(
            dict(s.params), t=t, phi_deg=phi, q=q_ring, L=s.L, contrast=contrast,
            offset=offset, dt=s.dt, shear=s.model.shear, integral=s.model.integral,
        )  # fmt: skip
        for ip in range(n_phi):
            if (iq, ip) in empty:
                continue
            c2 = clean[ip].copy()
            noisy_upper = c2[iu] * (1.0 + s.noise * rng.standard_normal(iu[0].size))
            c2[iu] = noisy_upper
            c2.T[iu] = noisy_upper  # mirror: the lower triangle equals the upper one
            c2[diag, diag] += s.diagonal_excess * (1.0 + 0.1 * rng.standard_normal(s.n_frames))
            c2_cells[(iq, ip)] = c2
    bins = TwoTimeBins(
        q_centres=s.q_rings(),
        phi_centres=phi,
        c2=c2_cells,
        frame_time_s=s.dt / (s.avg_frames * s.stride_frames),
        avg_frames=s.avg_frames,
        stride_frames=s.stride_frames,
    )
    names = REGISTRY.physical_names(mode)
    truth = {
        "params": {n: float(s.params[n]) for n in names},
        "analysis_mode": mode,
        "model": s.model.to_mapping(),
        "contrast": contrast.tolist() if np.ptp(contrast) else float(contrast[0]),
        "offset": offset.tolist() if np.ptp(offset) else float(offset[0]),
        "q": float(s.q_rings()[s.target_ring]),
        "phi_deg": phi.tolist(),
        "phi_deg_at_q": [float(phi[ip]) for ip in range(n_phi) if (s.target_ring, ip) not in empty],
        "dt": bins.dt,
        "L": float(s.L),
        "n_frames": int(s.n_frames),
        "noise": float(s.noise),
        "noise_model": "gaussian, sigma = noise * c2 (relative), symmetric",
        "diagonal_excess": float(s.diagonal_excess),
        "q_rings": s.q_rings().tolist(),
        "empty_cells": [list(c) for c in sorted(empty)],
        "frame_time": bins.frame_time_s,
        "avg_frames": s.avg_frames,
        "stride_frames": s.stride_frames,
        "seed": int(s.seed),
        "generator": f"homodyne-steps {__version__}",
    }
    return bins, truth


def simulate_file(
    settings: SimulationSettings,
    out: str | os.PathLike[str],
    *,
    fmt: str = "aps_u",
    truth_path: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path]:
    """Simulate, write the APS file ``out`` and its truth JSON; return both paths.

    ``truth_path`` defaults to ``truth.json`` beside ``out``.
    """
    out, truth_path = _output_paths(out, fmt, truth_path)  # checked before simulating
    bins, truth = simulate_bins(settings)
    return write_simulation(bins, truth, out, fmt=fmt, truth_path=truth_path)


def _output_paths(out, fmt: str, truth_path) -> tuple[Path, Path]:
    """(data file, truth file) of a simulation: a known format, two distinct paths."""
    if fmt not in FORMATS:
        raise SimulationError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
    out = Path(out)
    truth_path = Path(truth_path) if truth_path is not None else out.parent / "truth.json"
    if truth_path.resolve() == out.resolve():
        raise SimulationError(f"truth file and data file are the same path: {out}")
    return out, truth_path


def write_simulation(
    bins: TwoTimeBins,
    truth: dict[str, Any],
    out: str | os.PathLike[str],
    *,
    fmt: str = "aps_u",
    truth_path: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path]:
    """Write simulated ``bins`` as the APS file ``out`` and ``truth`` beside it (or at
    ``truth_path``); return both paths. Shared by the model and the speckle simulators."""
    out, truth_path = _output_paths(out, fmt, truth_path)
    truth = {**truth, "format": fmt, "file": out.name}
    write_aps_file(out, bins, fmt)
    write_json(truth_path, truth)
    return out, truth_path
