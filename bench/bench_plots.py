"""Plot benchmark: every figure of the laminar reference case (6 angles x 410 frames).

Run: ``python bench/bench_plots.py`` (``--keep DIR`` keeps the inputs and figures there
and reuses inputs found there on a second run).

Inputs are made by the real stages run as processes (simulate -> load -> filter ->
preprocess -> qc -> nlsq, cmc-plan with the default sharding). The CMC shard posteriors
are NOT sampled (NUTS on 11 laminar shards takes tens of minutes on 2 cores, issue #5):
each shard holds 2 chains x 500 draws from the NLSQ Laplace approximation N(theta, K
Sigma), with NUTS-like sample stats, and goes through the real ``cmc-combine``; the
plots see files of exactly the workflow's layout and size. Then each plot stage runs as
the workflow runs it, one ``homodyne-steps plot-*`` process each (imports included), and
the four are timed one after the other; ``parallel`` is the wall time of the four
started together on the machine's cores, as ``snakemake --cores 2`` would run them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_nlsq import nlsq_process, prepare, run  # noqa: E402

TARGET_S = 15.0
CASE = {"mode": "laminar_flow", "n_frames": 410, "seed": 12}


def laplace_shards(d: Path, k_shards: int, n_chains: int = 2, n_draws: int = 500) -> list[Path]:
    """Shard files in cmc_shard's layout with draws from the NLSQ Laplace approximation."""
    import arviz as az

    params = json.loads((d / "nlsq" / "parameters.json").read_text())
    cov_rec = json.loads((d / "nlsq" / "analysis_results_nlsq.json").read_text())["covariance"]
    names = cov_rec["names"]
    theta = np.array([params["parameters"][n]["value"] for n in names])
    cov = np.asarray(cov_rec["matrix"]) * k_shards
    n_phi = len(params["per_angle"])
    out = d / "cmc" / f"K{k_shards}" / "shards"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(k_shards):
        rng = np.random.default_rng(100 + k)
        x = rng.multivariate_normal(theta, cov, size=(n_chains, n_draws))
        shape = (n_chains, n_draws)
        posterior = {n: x[..., j] for j, n in enumerate(names)}
        posterior["contrast"] = np.broadcast_to(
            [p["contrast"]["value"] for p in params["per_angle"]], (*shape, n_phi)
        ) + 1e-4 * rng.standard_normal((*shape, n_phi))
        posterior["offset"] = np.broadcast_to(
            [p["offset"]["value"] for p in params["per_angle"]], (*shape, n_phi)
        ) + 1e-4 * rng.standard_normal((*shape, n_phi))
        stats = {
            "diverging": np.zeros(shape, dtype=bool),
            "energy": rng.normal(10.0, 2.6, shape),
            "tree_depth": np.full(shape, 3, dtype=np.int64),
            "n_steps": np.full(shape, 7, dtype=np.int64),
            "step_size": np.full(shape, 0.4),
            "acceptance_rate": rng.uniform(0.7, 0.95, shape),
        }
        idata = az.from_dict(posterior=posterior, sample_stats=stats)
        idata.posterior.attrs.update(
            shard=k,
            num_shards=k_shards,
            n_points=45_000,
            analysis_mode="laminar_flow",
            per_angle_scaling="varpro",
            prior_tempering=1.0 / k_shards,
        )
        nc = out / f"{k}.nc"
        idata.to_netcdf(str(nc))
        meta = {
            "shard": k,
            "num_shards": k_shards,
            "n_points": 45_000,
            "num_chains": n_chains,
            "num_warmup": 300,
            "num_samples": n_draws,
            "seed": k,
            "divergences": 0,
            "divergence_rate": 0.0,
            "timings": {"total_s": 60.0},
        }
        nc.with_suffix(".json").write_text(json.dumps(meta))
        paths.append(nc)
    return paths


def make_inputs(work: Path) -> tuple[Path, list[Path]]:
    d = work / "laminar"
    if (d / "cmc" / "parameters.json").is_file():
        return d, sorted((d / "cmc").glob("K*/shards/*.nc"))
    d, truth = prepare(work, "laminar", CASE)
    nlsq_process(d, truth, work / "jax-cache")
    hs = "homodyne-steps"
    plan = {"analysis_mode": "laminar_flow", "per_angle_scaling": "varpro", "sharding": {}}
    run(
        [
            hs,
            "cmc-plan",
            "--input",
            str(d / "qc.npz"),
            "--out-json",
            str(d / "cmc" / "plan.json"),
            "--out-npz",
            str(d / "cmc" / "plan.npz"),
            "--settings",
            json.dumps(plan),
        ]
    )
    k = json.loads((d / "cmc" / "plan.json").read_text())["num_shards"]
    shards = laplace_shards(d, k)
    run(
        [
            hs,
            "cmc-combine",
            "--input",
            str(d / "qc.npz"),
            "--shards",
            *map(str, shards),
            "--nlsq-dir",
            str(d / "nlsq"),
            "--out-dir",
            str(d / "cmc"),
            "--settings",
            json.dumps({"analysis_mode": "laminar_flow", "L": truth["L"], "combine": {}}),
        ]
    )
    return d, shards


def timed(argv: list[str]) -> tuple[float, float, float]:
    """(wall s, CPU s = user + sys, peak RSS MiB) of one process; fails loudly."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        out = proc.stdout.read().decode() if proc.stdout else ""
        raise SystemExit(f"{' '.join(argv[:2])} failed:\n{out}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


def plot_commands(d: Path, shards: list[Path]) -> dict[str, list[str]]:
    hs, p = "homodyne-steps", d / "plots"
    return {
        "plot-data": [
            hs,
            "plot-data",
            "--filtered",
            str(d / "filtered.npz"),
            "--preprocessed",
            str(d / "pre.npz"),
            "--out-dir",
            str(p / "data"),
        ],
        "plot-qc": [hs, "plot-qc", "--input", str(d / "qc.json"), "--out-dir", str(p / "qc")],
        "plot-nlsq": [hs, "plot-nlsq", "--nlsq-dir", str(d / "nlsq"), "--out-dir", str(p / "nlsq")],
        "plot-cmc": [
            hs,
            "plot-cmc",
            "--cmc-dir",
            str(d / "cmc"),
            "--shards",
            *map(str, shards),
            "--nlsq-dir",
            str(d / "nlsq"),
            "--out-dir",
            str(p / "cmc"),
        ],
    }


def bench(work: Path) -> None:
    d, shards = make_inputs(work)
    n_phi = len(json.loads((d / "nlsq" / "parameters.json").read_text())["per_angle"])
    print(f"laminar_flow, {n_phi} angles x {CASE['n_frames']} frames, {len(shards)} CMC shards")
    commands = plot_commands(d, shards)
    load = os.getloadavg()[0]
    run(commands["plot-qc"])  # warm the OS file cache and matplotlib's font cache
    total_wall = total_cpu = 0.0
    print(f"{'stage':10s} {'wall [s]':>9s} {'CPU [s]':>8s} {'RSS [MiB]':>10s} {'figures':>8s}")
    for name, argv in commands.items():
        wall, cpu, rss = timed(argv)
        total_wall, total_cpu = total_wall + wall, total_cpu + cpu
        index = json.loads((d / "plots" / name.removeprefix("plot-") / "figures.json").read_text())
        print(f"{name:10s} {wall:9.2f} {cpu:8.2f} {rss:10.0f} {len(index['figures']):8d}")
    print(f"{'one by one':10s} {total_wall:9.2f} {total_cpu:8.2f}   (target < {TARGET_S:.0f} s)")
    start = time.perf_counter()
    procs = [subprocess.Popen(a, stdout=subprocess.DEVNULL) for a in commands.values()]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a plot process failed")
    parallel = time.perf_counter() - start
    print(f"{'parallel':10s} {parallel:9.2f}   (the four at once on {os.cpu_count()} cores)")
    if load > 0.5:
        print(f"note: load average {load:.1f} before the run: other processes share the CPU")
    print(f"figures in {d / 'plots'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", type=Path, help="keep inputs and figures in this directory")
    args = ap.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        bench(args.keep)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            bench(Path(tmp))


if __name__ == "__main__":
    main()
