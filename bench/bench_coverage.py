"""Do the reported uncertainties hold on data made the way a beamline makes them?

Each realisation is a speckle-level file (``homodyne-steps simulate --method speckle``:
moving particles, speckle, Poisson counts, the beamline correlator, written as APS-U)
taken through the real load → filter → preprocess stages and fitted by NLSQ once per
uncertainty method (``nlsq.uncertainty.method``). For every
physical parameter the table gives the fraction of converged runs whose ±1σ and ±1.96σ
intervals hold the truth (the target is 0.55–0.80 and 0.88–1.0), the same for the 68 %
and 95 % intervals NLSQ reports (``interval_68``/``interval_95``: the covariance
propagated through the power laws' rates coordinates, following the valley), the spread of
z = (fit − truth)/σ (1.4826·MAD, robust to a few runs far along a valley; 1 when
calibrated), and the ratio of the estimates' standard deviation across runs to the mean
reported σ (1 when calibrated; it needs no truth, only many realisations).

Sets (``--sets``): ``static`` (3 φ × 200 frames, the reference static case) and
``laminar`` (6 φ × 120 frames, the reference laminar case) at the simulator's realistic
defaults (180 pixels per cell, 10 photons per pixel and frame, 4 modes), and each
``_noisy`` (3 photons, 90 pixels) and ``_clean`` (30 photons, 720 pixels).
``--cmc`` also runs the CMC stages (plan, shards as processes, combine; default settings)
on each realisation after an NLSQ stage with ``--cmc-after`` σ (default ``speckle``: the
CMC likelihood then carries the NLSQ record's curvature adjustment), and
reports the coverage of the posterior mean ± 1 and 1.96 posterior sd and of the
equal-tailed 68 % and 95 % credible intervals CMC reports (slow: about a minute per
static realisation on 2 cores). ``--start truth`` (default) isolates the
uncertainty question; ``--start defaults``
starts from the registry defaults as a user would (issue 14, part 2). ``--free D0``
holds the other physical parameters at the truth: σ of a parameter the data fix well,
without the D0/alpha/D_offset valley. ``--particles N`` sets the simulator's particles
per file (default 16384; with 2048 the particles' own shared noise biased alpha and phi0:
docs/model.md, "The simulator's particles").

Run:  python bench/bench_coverage.py [--sets static,laminar] [--runs 30] [--free NAMES]
      [--start truth|defaults] [--cmc] [--particles N] [--out F.json]
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
from homodyne_steps.stages.nlsq_records import parameters_record
from homodyne_steps.stages.nlsq_stage import nlsq_stage
from speckle_data import speckle_dataset

STATIC = REFERENCE_CASES["static"]
SETS: dict[str, dict] = {
    "static": {"params": STATIC["params"], "phi_centres": list(STATIC["phi_deg"]),
               "n_frames": STATIC["n_frames"]},
    "laminar": {"n_frames": 120},
}  # fmt: skip
NOISE = {"noisy": {"photons_per_pixel": 3.0, "pixels_per_cell": 90},
         "clean": {"photons_per_pixel": 30.0, "pixels_per_cell": 720}}  # fmt: skip
METHODS = ("independent", "speckle")  # nlsq.uncertainty.method


def set_settings(name: str) -> tuple[str, dict]:
    """(analysis mode, speckle settings) of a set name such as ``static_noisy``."""
    base, _, noise = name.partition("_")
    if base not in SETS or (noise and noise not in NOISE):
        raise SystemExit(f"unknown set {name!r}: use static|laminar, optionally _noisy|_clean")
    mode = "static" if base == "static" else "laminar_flow"
    return mode, {**SETS[base], **NOISE.get(noise, {})}


def cmc_run(data, truth: dict, mode: str, start: str, work: Path, method: str) -> dict:
    """The CMC stages on one realisation, after the NLSQ stage they start from (its σ by
    ``method``: with ``speckle`` CMC's likelihood gets the curvature adjustment)."""
    from bench_cmc import cmc

    data.to_npz(work / "qc.npz")
    m: dict = {"initial_parameters": truth["params"]} if start == "truth" else {}
    m["uncertainty"] = {"method": method}
    nlsq_stage(work / "qc.npz", work / "nlsq", mode=mode, L=truth["L"],
               settings=NlsqSettings.from_mapping({**m, "on_failure": "warn"}))  # fmt: skip
    t0 = time.perf_counter()
    try:
        _, params, _ = cmc(work, "cmc", {}, {}, mode=mode, L=truth["L"])
    except SystemExit as exc:  # a stage that refused: recorded, the next run goes on
        nan = {n: float("nan") for n in truth["params"]}
        return {"status": "failed", "reason": str(exc)[-300:], "value": nan, "sd": nan,
                "seconds": time.perf_counter() - t0}  # fmt: skip
    stats = params["parameters"]
    return {
        "status": params["convergence"]["status"],
        "value": {n: float(stats[n]["mean"]) for n in truth["params"]},
        "sd": {n: float(stats[n]["std"]) for n in truth["params"]},
        "interval_68": {n: stats[n].get("interval_68") for n in truth["params"]},
        "interval_95": {n: stats[n].get("interval_95") for n in truth["params"]},
        "seconds": time.perf_counter() - t0,
    }


def one_run(
    name: str, seed: int, start: str, free: list[str] | None, work: Path,
    cmc_after: str | None = None, particles: int | None = None,
) -> dict:  # fmt: skip
    mode, speckle = set_settings(name)
    if particles:
        speckle = {**speckle, "n_particles": particles}
    t0 = time.perf_counter()
    data, truth = speckle_dataset({**speckle, "seed": seed}, work)
    t_sim = time.perf_counter() - t0
    row: dict = {"seed": seed, "truth": truth["params"], "simulate_s": t_sim, "fits": {}}
    for method in METHODS:
        m: dict = {"uncertainty": {"method": method}}
        if start == "truth" or free:
            m["initial_parameters"] = truth["params"]
        if free:
            m["fixed_parameters"] = [n for n in truth["params"] if n not in free]
        t1 = time.perf_counter()
        out = fit(data, mode, truth["L"], NlsqSettings.from_mapping(m))
        estimates = parameters_record(out).parameters
        row["fits"][method] = {
            "status": out.result.status,
            "value": dict(zip(out.names, map(float, out.result.physical), strict=True)),
            "sd": dict(zip(out.names, map(float, out.uncertainties), strict=True)),
            "reduced_chi2": float(out.result.reduced_chi_squared),
            "weakly_identified": list(out.result.weakly_identified),
            "interval_68": {n: e.interval_68 for n, e in estimates.items()},
            "interval_95": {n: e.interval_95 for n, e in estimates.items()},
            "seconds": time.perf_counter() - t1,
        }
    if cmc_after:
        (work / "nlsq").mkdir(exist_ok=True)
        row["fits"]["cmc"] = cmc_run(data, truth, mode, start, work, cmc_after)
    return row


def summarise(rows: list[dict], method: str) -> dict:
    # CMC's "converged_with_warnings" (an R-hat or ESS warning) is converged
    used = [r for r in rows if r["fits"][method]["status"].startswith("converged")]
    first = (used or rows)[0]["fits"][method]
    names = [n for n in first["value"] if np.isfinite(first["sd"][n])]
    out = {"n_runs": len(rows), "n_converged": len(used), "parameters": {}}
    for n in names:
        z = np.array([(r["fits"][method]["value"][n] - r["truth"][n]) / r["fits"][method]["sd"][n]
                      for r in used])  # fmt: skip
        z = z[np.isfinite(z)]
        med = np.median(z) if z.size else np.nan
        est = np.array([r["fits"][method]["value"][n] for r in used])
        sd = np.array([r["fits"][method]["sd"][n] for r in used])
        covers = {}
        for level in ("68", "95"):
            inside = [lo <= r["truth"][n] <= hi for r in used
                      if (iv := r["fits"][method].get(f"interval_{level}", {}).get(n))
                      for lo, hi in [iv]]  # fmt: skip
            covers[level] = float(np.mean(inside)) if inside else None
        out["parameters"][n] = {
            "n": int(z.size),
            "interval_68": covers["68"],
            "interval_95": covers["95"],
            "cover_68": float(np.mean(np.abs(z) < 1)) if z.size else None,
            "cover_95": float(np.mean(np.abs(z) < 1.96)) if z.size else None,
            "z_median": float(med) if z.size else None,
            "z_spread": float(1.4826 * np.median(np.abs(z - med))) if z.size else None,
            "spread_over_sigma": float(est.std(ddof=1) / np.nanmean(sd)) if est.size > 2 else None,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="static,laminar")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--start", choices=("truth", "defaults"), default="truth")
    ap.add_argument("--free", help="comma-separated free parameters (the rest at the truth)")
    ap.add_argument("--cmc", action="store_true", help="also run CMC (slow)")
    ap.add_argument("--cmc-after", choices=METHODS, default="speckle",
                    help="the NLSQ uncertainty method CMC starts from")  # fmt: skip
    ap.add_argument(
        "--particles", type=int, help="particles per file (default: the simulator's, 16384)"
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    free = args.free.split(",") if args.free else None
    report: dict = {"start": args.start, "free": free, "sets": {}}
    t_all = time.perf_counter()
    for name in args.sets.split(","):
        t_set = time.perf_counter()
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for seed in range(1, args.runs + 1):
                cmc_after = args.cmc_after if args.cmc else None
                rows.append(
                    one_run(name, seed, args.start, free, Path(tmp), cmc_after, args.particles)
                )
                fits = rows[-1]["fits"]
                print(f"{name} {seed}: " + ", ".join(
                    f"{m} {f['status']} {f['seconds']:.0f} s" for m, f in fits.items()
                ), flush=True)  # fmt: skip
        wall = time.perf_counter() - t_set
        methods = [*METHODS, *(["cmc"] if args.cmc else [])]
        report["sets"][name] = {"wall_s": wall, "runs": rows,
                                "summary": {m: summarise(rows, m) for m in methods}}  # fmt: skip
        print(f"\n## {name}: {args.runs} realisations, start {args.start}, {wall:.0f} s")
        head = ("| method | converged | parameter | ±1σ covers | ±1.96σ covers | 68 % interval "
                "covers | 95 % interval covers | z median | z spread | sd/σ |")  # fmt: skip
        print(head)
        print("|---|---|---|---|---|---|---|---|---|---|")
        for m in methods:
            s = report["sets"][name]["summary"][m]
            for n, p in s["parameters"].items():
                keys = ("cover_68", "cover_95", "interval_68", "interval_95", "z_median",
                        "z_spread", "spread_over_sigma")  # fmt: skip
                cells = [f"{p[k]:.2f}" if p[k] is not None else "–" for k in keys]
                runs = f"{s['n_converged']}/{s['n_runs']}"
                print(f"| {m} | {runs} | {n} | " + " | ".join(cells) + " |")
    print(f"\ntotal wall {time.perf_counter() - t_all:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
