"""The options of ``homodyne-steps simulate`` (the run itself is ``cli._run_simulate``)."""

from __future__ import annotations

import argparse

from homodyne_steps.physics.model_settings import (
    DEFAULT_INTEGRAL,
    DEFAULT_SHEAR,
    INTEGRALS,
    SHEAR_FORMS,
)
from homodyne_steps.physics.registry import MODE_ALIASES, REGISTRY


def _param_assignment(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    name = name.strip()
    if name not in REGISTRY.names:
        raise argparse.ArgumentTypeError(
            f"unknown parameter {name!r}; known: {', '.join(REGISTRY.names)}"
        )
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected a number, got {value!r}") from None


def _cell(text: str) -> tuple[int, int]:
    try:
        iq, iphi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected IQ,IPHI (0-based ring and angle-bin indices), got {text!r}"
        ) from None
    return iq, iphi


def add_simulate(sub: argparse._SubParsersAction, run) -> None:
    """The ``simulate`` subcommand; ``run`` (in :mod:`homodyne_steps.cli`, where the
    stage fingerprints look for it) runs it."""
    p = sub.add_parser(
        "simulate",
        help="write a synthetic APS two-time file (and truth.json) drawn from the model",
        description=(
            "Draw c2 from the model with known parameters (default: the reference case of "
            "--mode from shared/spec/physics.md), add noise, and write an APS HDF5 file."
        ),
    )
    _add_simulate_files(p)
    _add_simulate_model(p)
    p.set_defaults(func=run)


def _add_simulate_files(p: argparse.ArgumentParser) -> None:
    """The files ``simulate`` writes and the JSON settings the workflow passes."""
    p.add_argument(
        "--method",
        choices=("model", "speckle"),
        default="model",
        help="model: c2 drawn from the model with Gaussian noise (the options below); "
        "speckle: moving particles, speckle, photon counts and the beamline correlator "
        '(settings from --settings, e.g. \'{"gap": "uniform", "n_frames": 120}\'; '
        "defaults: the laminar reference case, 6 angles x 120 frames)",
    )
    p.add_argument("--out", required=True, help="HDF5 file to write")
    p.add_argument("--truth", help="truth JSON (default: truth.json beside --out)")
    p.add_argument("--format", choices=["aps_u", "aps_old"], default="aps_u")
    p.add_argument(
        "--settings",
        metavar="JSON",
        help="all simulation settings as a JSON object (what the workflow passes); "
        "replaces the options above except --out, --truth and --format",
    )


def _add_simulate_model(p: argparse.ArgumentParser) -> None:
    """The simulated experiment: mode, parameters, geometry, noise, correlator."""
    from homodyne_steps.physics.reference import REFERENCE_GEOMETRY

    g = REFERENCE_GEOMETRY
    p.add_argument(
        "--mode",
        choices=sorted(MODE_ALIASES),
        default="laminar_flow",
        help="analysis mode whose reference case gives the defaults",
    )
    p.add_argument(
        "--param",
        action="append",
        type=_param_assignment,
        default=[],
        metavar="NAME=VALUE",
        help="override one physical parameter (repeatable)",
    )
    p.add_argument(
        "--phi",
        type=float,
        nargs="+",
        metavar="DEG",
        help="phi bin centres in degrees (default: the reference case's)",
    )
    p.add_argument("--frames", type=int, help="C2 size N (default: the reference case's)")
    p.add_argument("--q", type=float, default=g["q"], help="target q ring in 1/Å")
    p.add_argument("--L", type=float, default=g["L"], help="stator–rotor gap in Å")
    p.add_argument("--dt", type=float, default=g["dt"], help="C2 time step in s")
    p.add_argument(
        "--contrast",
        type=float,
        nargs="+",
        default=[g["contrast"]],
        help="contrast (one value, or one per angle)",
    )
    p.add_argument(
        "--offset",
        type=float,
        nargs="+",
        default=[g["offset"]],
        help="offset (one value, or one per angle)",
    )
    p.add_argument(
        "--noise",
        type=float,
        default=g["noise"],
        help="relative Gaussian noise level (sigma = noise * c2)",
    )
    p.add_argument(
        "--diagonal-excess", type=float, default=0.5, help="shot-noise excess added on the diagonal"
    )
    p.add_argument("--q-rings", type=int, default=3, help="number of q rings")
    p.add_argument("--q-ring-step", type=float, default=0.2, help="relative spacing of the q rings")
    p.add_argument(
        "--empty-cell",
        action="append",
        type=_cell,
        default=[],
        metavar="IQ,IPHI",
        help="leave a (ring, angle-bin) cell empty (repeatable)",
    )
    p.add_argument("--avg-frames", type=int, default=2)
    p.add_argument("--stride-frames", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--shear",
        choices=SHEAR_FORMS,
        default=DEFAULT_SHEAR,
        help="shear form the data are drawn from: physical (uniform gradient across the "
        "gap, sinc²) or homodyne (the seed's sinc⁴)",
    )
    p.add_argument(
        "--integral",
        choices=INTEGRALS,
        default=DEFAULT_INTEGRAL,
        help="exact power-law integrals or the seed's trapezoid",
    )


__all__ = ["add_simulate"]
