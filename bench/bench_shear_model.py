"""Which shear form recovers the flow from data made the way an experiment makes them?

Speckle-level files (moving particles with a uniform spread of heights across the gap,
Poisson counts, the beamline correlator: ``homodyne-steps simulate --method speckle``)
go through load → filter → preprocess → NLSQ twice: once with the physical shear form
(``model: {shear: physical, integral: exact}``) and once with the seed's
(``{shear: homodyne, integral: trapezoid}``). The table reports γ̇0, β, φ0 (and D0) of
each fit against the truth, with the fit's σ and the reduced χ².

``--free gamma_dot_t0,phi0`` holds the other parameters at the truth and starts there:
the shear form alone decides where γ̇0 lands (the seed's form reads about π/√2 times
the physical rate). Without it every parameter is free and the fit starts from the
registry defaults (the harder problem of the next issue).

Run:  python bench/bench_shear_model.py [--seeds 3] [--frames 120] [--free NAMES]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from homodyne_steps.inference.nlsq_fit import fit
from homodyne_steps.inference.nlsq_settings import NlsqSettings
from homodyne_steps.physics.model_settings import ModelSettings
from speckle_data import speckle_dataset

MODELS = {
    "physical": ModelSettings(shear="physical", integral="exact"),
    "seed": ModelSettings(shear="homodyne", integral="trapezoid"),
}
SHOWN = ("gamma_dot_t0", "beta", "phi0", "D0")


def one_realisation(
    seed: int, n_frames: int, work: Path, free: list[str] | None
) -> tuple[dict, dict, float]:
    """(truth params, {model: (values, sigmas, chi2_red, status)}, seconds)."""
    start = time.perf_counter()
    data, truth = speckle_dataset({"n_frames": n_frames, "seed": seed}, work)
    nlsq = NlsqSettings()
    if free:
        nlsq = NlsqSettings.from_mapping(
            {
                "initial_parameters": truth["params"],
                "fixed_parameters": [n for n in truth["params"] if n not in free],
            }
        )
    fits = {}
    for label, model in MODELS.items():
        out = fit(data, "laminar_flow", truth["L"], nlsq, model=model)
        r = out.result
        values = dict(zip(out.names, (float(v) for v in r.physical), strict=True))
        sigmas = dict(zip(out.names, (float(u) for u in out.uncertainties), strict=True))
        fits[label] = (values, sigmas, float(r.reduced_chi_squared), r.status)
    return truth["params"], fits, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--free", help="comma-separated free parameters (the rest at the truth)")
    args = ap.parse_args()
    free = args.free.split(",") if args.free else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(1, args.seeds + 1):
            truth, fits, seconds = one_realisation(seed, args.frames, Path(tmp), free)
            rows.append({"seed": seed, "truth": truth, "fits": fits, "seconds": seconds})
    print(f"uniform-gap speckle data, laminar reference case, 6 angles x {args.frames} frames; "
          f"free: {args.free or 'all (start: registry defaults)'}")  # fmt: skip
    header = "| seed | model | status | χ²_red | " + " | ".join(f"{n} (truth)" for n in SHOWN)
    print(header + " |")
    print("|" + "---|" * (4 + len(SHOWN)))
    for row in rows:
        for label, (values, sigmas, chi2, status) in row["fits"].items():
            cells = []
            for n in SHOWN:
                v, s, t = values[n], sigmas[n], row["truth"][n]
                z = (v - t) / s if s and math.isfinite(s) and s > 0 else float("nan")
                cells.append(f"{v:.4g} ± {s:.2g} ({t:.4g}; z {z:+.1f})")
            print(
                f"| {row['seed']} | {label} | {status} | {chi2:.3f} | " + " | ".join(cells) + " |"
            )
    print(f"seconds per realisation (simulate + 2 fits): {[round(r['seconds'], 1) for r in rows]}")
    print_ensemble(rows)


def print_ensemble(rows: list[dict]) -> None:
    """Mean over realisations against the truth, in units of the mean's standard error
    from the spread across realisations (independent of the fits' own σ)."""
    n = len(rows)
    if n < 2:
        return
    print(f"\nmean over {n} realisations ± its standard error (spread / √n)", end="")
    print("; z = (mean − truth) / SE")
    print("| model | " + " | ".join(f"{p} (truth)" for p in SHOWN) + " |")
    print("|" + "---|" * (1 + len(SHOWN)))
    for label in MODELS:
        cells = []
        for p in SHOWN:
            x = np.array([r["fits"][label][0][p] for r in rows])
            se = x.std(ddof=1) / math.sqrt(n)
            t = rows[0]["truth"][p]
            if np.all(x == x[0]) or se <= 1e-9 * abs(t):
                cells.append(f"fixed ({t:.4g})")
                continue
            z = (x.mean() - t) / se
            cells.append(f"{x.mean():.4g} ± {se:.2g} ({t:.4g}; z {z:+.1f})")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
