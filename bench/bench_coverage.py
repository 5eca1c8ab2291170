"""Do the reported uncertainties hold on data made the way a beamline makes them?

Each realisation is a speckle-level file (``homodyne-steps simulate --method speckle``:
moving particles, speckle, Poisson counts, the beamline correlator, written as APS-U)
taken through the real load → filter → preprocess stages and fitted by NLSQ once per
uncertainty method (``nlsq.uncertainty.method``). For every physical parameter the
table gives the fraction of converged runs whose ±1σ and ±1.96σ intervals hold the
truth (the target is 0.55–0.80 and 0.88–1.0), and the spread of z = (fit − truth)/σ
(1.4826·MAD, robust to a few runs far along a valley; 1 when calibrated).

Sets (``--sets``): ``static`` (3 φ × 200 frames, the reference static case) and
``laminar`` (6 φ × 120 frames, the reference laminar case) at the simulator's realistic
defaults (180 pixels per cell, 10 photons per pixel and frame, 4 modes), and each
``_noisy`` (3 photons, 90 pixels) and ``_clean`` (30 photons, 720 pixels).
``--start truth`` (default) isolates the uncertainty question; ``--start defaults``
starts from the registry defaults as a user would (issue 14, part 2).

Run:  python bench/bench_coverage.py [--sets static,laminar] [--runs 30] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from homodyne_steps.inference.nlsq_fit import fit
from homodyne_steps.inference.nlsq_settings import NlsqSettings
from homodyne_steps.physics.reference import REFERENCE_CASES
from speckle_data import speckle_dataset

STATIC = REFERENCE_CASES["static"]
SETS: dict[str, dict] = {
    "static": {"params": STATIC["params"], "phi_centres": list(STATIC["phi_deg"]),
               "n_frames": STATIC["n_frames"]},
    "laminar": {"n_frames": 120},
}  # fmt: skip
NOISE = {"noisy": {"photons_per_pixel": 3.0, "pixels_per_cell": 90},
         "clean": {"photons_per_pixel": 30.0, "pixels_per_cell": 720}}  # fmt: skip
METHODS = ("independent", "frame_blocks")


def set_settings(name: str) -> tuple[str, dict]:
    """(analysis mode, speckle settings) of a set name such as ``static_noisy``."""
    base, _, noise = name.partition("_")
    if base not in SETS or (noise and noise not in NOISE):
        raise SystemExit(f"unknown set {name!r}: use static|laminar, optionally _noisy|_clean")
    mode = "static" if base == "static" else "laminar_flow"
    return mode, {**SETS[base], **NOISE.get(noise, {})}


def one_run(name: str, seed: int, start: str, work: Path) -> dict:
    mode, speckle = set_settings(name)
    t0 = time.perf_counter()
    data, truth = speckle_dataset({**speckle, "seed": seed}, work)
    t_sim = time.perf_counter() - t0
    row: dict = {"seed": seed, "truth": truth["params"], "simulate_s": t_sim, "fits": {}}
    for method in METHODS:
        m: dict = {"uncertainty": {"method": method}}
        if start == "truth":
            m["initial_parameters"] = truth["params"]
        t1 = time.perf_counter()
        out = fit(data, mode, truth["L"], NlsqSettings.from_mapping(m))
        row["fits"][method] = {
            "status": out.result.status,
            "value": dict(zip(out.names, map(float, out.result.physical), strict=True)),
            "sd": dict(zip(out.names, map(float, out.uncertainties), strict=True)),
            "reduced_chi2": float(out.result.reduced_chi_squared),
            "weakly_identified": list(out.result.weakly_identified),
            "seconds": time.perf_counter() - t1,
        }
    return row


def summarise(rows: list[dict], method: str) -> dict:
    names = list(rows[0]["fits"][method]["value"])
    used = [r for r in rows if r["fits"][method]["status"] == "converged"]
    out = {"n_runs": len(rows), "n_converged": len(used), "parameters": {}}
    for n in names:
        z = np.array([(r["fits"][method]["value"][n] - r["truth"][n]) / r["fits"][method]["sd"][n]
                      for r in used])  # fmt: skip
        z = z[np.isfinite(z)]
        med = np.median(z) if z.size else np.nan
        out["parameters"][n] = {
            "n": int(z.size),
            "cover_68": float(np.mean(np.abs(z) < 1)) if z.size else None,
            "cover_95": float(np.mean(np.abs(z) < 1.96)) if z.size else None,
            "z_spread": float(1.4826 * np.median(np.abs(z - med))) if z.size else None,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="static,laminar")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--start", choices=("truth", "defaults"), default="truth")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    report: dict = {"start": args.start, "sets": {}}
    t_all = time.perf_counter()
    for name in args.sets.split(","):
        t_set = time.perf_counter()
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for seed in range(1, args.runs + 1):
                rows.append(one_run(name, seed, args.start, Path(tmp)))
        wall = time.perf_counter() - t_set
        report["sets"][name] = {"wall_s": wall, "runs": rows,
                                "summary": {m: summarise(rows, m) for m in METHODS}}  # fmt: skip
        print(f"\n## {name}: {args.runs} realisations, start {args.start}, {wall:.0f} s")
        print("| method | converged | parameter | ±1σ covers | ±1.96σ covers | z spread |")
        print("|---|---|---|---|---|---|")
        for m in METHODS:
            s = report["sets"][name]["summary"][m]
            for n, p in s["parameters"].items():
                cells = [f"{p[k]:.2f}" if p[k] is not None else "–"
                         for k in ("cover_68", "cover_95", "z_spread")]  # fmt: skip
                runs = f"{s['n_converged']}/{s['n_runs']}"
                print(f"| {m} | {runs} | {n} | " + " | ".join(cells) + " |")
    print(f"\ntotal wall {time.perf_counter() - t_all:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
