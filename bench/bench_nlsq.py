"""NLSQ benchmark: the whole ``homodyne-steps nlsq`` process on the reference cases.

Run: ``python bench/bench_nlsq.py`` (add ``--large`` for the 23-angle × 1000-frame
laminar fit, ``--modes`` for the per-angle scaling comparison).

Each dataset goes through the real data stages (simulate → load → filter → preprocess →
qc) once; then the nlsq process is timed twice: with an empty JAX compilation cache
(cold: compiles) and again with the cache it filled (warm: the everyday case of a
re-run). Peak RSS is the process's ``ru_maxrss``. Accuracy is |fit − truth| / reported σ.
The reference package needs about 51 s (laminar, 6 × 410) and 13 s (static, 3 × 200) of
process wall on this 2-core machine (issue #4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

REFERENCE_WALL = {"laminar_flow": 51.0, "static": 13.0}


def run(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall s, peak RSS MiB, output) of one process; fails loudly."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out = proc.stdout.read().decode() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed:\n{out}")
    return wall, usage.ru_maxrss / 1024.0, out


def prepare(work: Path, name: str, sim: dict) -> tuple[Path, dict]:
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    hs = "homodyne-steps"
    run([hs, "simulate", "--out", str(d / "data.hdf"), "--settings", json.dumps(sim)])
    truth = json.loads((d / "truth.json").read_text())
    run(
        [
            hs,
            "load",
            "--input",
            str(d / "data.hdf"),
            "--out-npz",
            str(d / "loaded.npz"),
            "--out-json",
            str(d / "loaded.json"),
            "--settings",
            json.dumps({"q": truth["q"]}),
        ]
    )
    run(
        [
            hs,
            "filter",
            "--input",
            str(d / "loaded.npz"),
            "--out-npz",
            str(d / "filtered.npz"),
            "--out-json",
            str(d / "filter.json"),
        ]
    )
    run(
        [
            hs,
            "preprocess",
            "--input",
            str(d / "filtered.npz"),
            "--out-npz",
            str(d / "pre.npz"),
            "--out-json",
            str(d / "pre.json"),
        ]
    )
    run(
        [
            hs,
            "qc",
            "--raw",
            str(d / "loaded.npz"),
            "--filtered",
            str(d / "filtered.npz"),
            "--preprocessed",
            str(d / "pre.npz"),
            "--out-json",
            str(d / "qc.json"),
            "--out-npz",
            str(d / "qc.npz"),
        ]
    )
    return d, truth


def nlsq_process(d: Path, truth: dict, cache: Path, nlsq: dict | None = None) -> dict:
    env = {**os.environ, "HOMODYNE_STEPS_JAX_CACHE": str(cache)}
    settings = {"analysis_mode": truth["analysis_mode"], "L": truth["L"], "nlsq": nlsq or {}}
    out_dir = d / "nlsq"
    wall, rss, _ = run(
        [
            "homodyne-steps",
            "nlsq",
            "--input",
            str(d / "qc.npz"),
            "--out-dir",
            str(out_dir),
            "--settings",
            json.dumps(settings),
        ],
        env,
    )
    params = json.loads((out_dir / "parameters.json").read_text())
    conv = json.loads((out_dir / "convergence_metrics.json").read_text())["convergence"]
    z = [
        abs(p["value"] - truth["params"][n]) / p["uncertainty"]
        for n, p in params["parameters"].items()
    ]
    return {
        "wall": wall,
        "rss": rss,
        "fit": conv["execution_time"],
        "first_pass": conv["first_pass_time_incl_compile"],
        "iterations": conv["iterations"],
        "status": conv["status"],
        "chi2_red": params["reduced_chi_squared"],
        "max_z": max(z),
    }


def reference_rows(work: Path) -> None:
    cases = {
        "static": {"mode": "static", "n_frames": 200, "seed": 11},
        "laminar_flow": {"mode": "laminar_flow", "n_frames": 410, "seed": 12},
    }
    print("\nWhole `homodyne-steps nlsq` process (imports + compile + fit + outputs)")
    print(
        f"{'case':14s} {'cache':6s} {'wall [s]':>9s} {'target':>7s} {'fit [s]':>8s} "
        f"{'1st pass':>9s} {'iter':>5s} {'RSS [MiB]':>10s} {'chi2_red':>9s} {'max|z|':>7s}"
    )
    for name, sim in cases.items():
        d, truth = prepare(work, name, sim)
        cache = work / f"cache-{name}"
        for label in ("cold", "warm"):
            r = nlsq_process(d, truth, cache)
            print(
                f"{name:14s} {label:6s} {r['wall']:9.2f} {REFERENCE_WALL[name] / 10:7.1f} "
                f"{r['fit']:8.2f} {r['first_pass']:9.2f} {r['iterations']:5d} {r['rss']:10.0f} "
                f"{r['chi2_red']:9.4f} {r['max_z']:7.2f}"
            )


def large_row(work: Path) -> None:
    phi = [-180.0 + (k + 0.5) * 360.0 / 23 for k in range(23)]
    d, truth = prepare(
        work,
        "large",
        {"mode": "laminar_flow", "n_frames": 1000, "phi_deg": phi, "n_q_rings": 1, "seed": 13},
    )
    r = nlsq_process(d, truth, work / "cache-large")
    print(
        f"\n23 angles x 1000 frames laminar_flow ({23 * 999 * 998 // 2:,} points): wall "
        f"{r['wall']:.1f} s, fit {r['fit']:.1f} s, {r['iterations']} iterations, peak RSS "
        f"{r['rss']:.0f} MiB (target < 2048), chi2_red {r['chi2_red']:.4f}, "
        f"max|z| {r['max_z']:.2f}"
    )


def mode_rows(work: Path) -> None:
    """Per-angle scaling modes on the reference cases with angle-dependent contrast."""
    print("\nPer-angle scaling modes, warm cache (contrast differs by angle, as on real detectors)")
    print(
        f"{'case':14s} {'mode':11s} {'fit [s]':>8s} {'iter':>5s} {'status':>15s} "
        f"{'chi2_red':>9s} {'max|z|':>7s}"
    )
    cases = {
        "static": {"mode": "static", "n_frames": 200, "seed": 21, "contrast": [0.25, 0.3, 0.35]},
        "laminar_flow": {
            "mode": "laminar_flow",
            "n_frames": 410,
            "seed": 22,
            "contrast": [0.25, 0.27, 0.29, 0.31, 0.33, 0.35],
        },
    }
    for name, sim in cases.items():
        d, truth = prepare(work, f"modes-{name}", sim)
        for mode in ("varpro", "individual", "auto", "fourier", "constant"):  # fill the cache
            nlsq_process(
                d,
                truth,
                work / f"cache-modes-{name}",
                {"per_angle_scaling": mode, "on_failure": "warn"},
            )
        for mode in ("varpro", "individual", "auto", "fourier", "constant"):
            r = nlsq_process(
                d,
                truth,
                work / f"cache-modes-{name}",
                {"per_angle_scaling": mode, "on_failure": "warn"},
            )
            print(
                f"{name:14s} {mode:11s} {r['fit']:8.2f} {r['iterations']:5d} "
                f"{r['status']:>15s} {r['chi2_red']:9.4f} {r['max_z']:7.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--large", action="store_true", help="also the 23 x 1000 fit")
    parser.add_argument("--modes", action="store_true", help="also compare scaling modes")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_reference:
            reference_rows(work)
        if args.modes:
            mode_rows(work)
        if args.large:
            large_row(work)
    np.set_printoptions()


if __name__ == "__main__":
    main()
