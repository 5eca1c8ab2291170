"""Data-stage benchmark: wall time and peak memory of load → filter → preprocess → qc.

Run: ``python bench/bench_data_stages.py`` (default: a 23-angle × 1000-frame laminar_flow
APS-U file with 3 q rings, i.e. 69 C2 matrices on disk). Each stage runs as its own
``homodyne-steps`` process, exactly as the workflow runs it; peak RSS is that process's
``ru_maxrss`` (from ``os.wait4``), wall time includes interpreter start and imports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path


def run_stage(argv: list[str]) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out = proc.stdout.read().decode() if proc.stdout else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:2])} failed:\n{out}")
    return wall, usage.ru_maxrss / 1024.0  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--angles", type=int, default=23)
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--workdir", default=None, help="keep files here (default: temp)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        phi = [-180.0 + (k + 0.5) * 360.0 / args.angles for k in range(args.angles)]
        settings = {"mode": "laminar_flow", "n_frames": args.frames, "phi_deg": phi, "seed": 3}
        data = work / "bench.hdf"
        sim_wall, sim_rss = run_stage(
            ["homodyne-steps", "simulate", "--out", str(data), "--settings", json.dumps(settings)]
        )
        size_mb = data.stat().st_size / 2**20
        d = {k: str(work / k) for k in ("loaded", "filtered", "preprocessed", "qc")}
        stages = [
            (
                "load",
                [
                    "--input",
                    str(data),
                    "--out-npz",
                    d["loaded"] + ".npz",
                    "--out-json",
                    d["loaded"] + ".json",
                    "--settings",
                    '{"q": 0.0054}',
                ],
            ),
            (
                "filter",
                [
                    "--input",
                    d["loaded"] + ".npz",
                    "--out-npz",
                    d["filtered"] + ".npz",
                    "--out-json",
                    d["filtered"] + ".json",
                ],
            ),
            (
                "preprocess",
                [
                    "--input",
                    d["filtered"] + ".npz",
                    "--out-npz",
                    d["preprocessed"] + ".npz",
                    "--out-json",
                    d["preprocessed"] + ".json",
                ],
            ),
            (
                "qc",
                [
                    "--raw",
                    d["loaded"] + ".npz",
                    "--filtered",
                    d["filtered"] + ".npz",
                    "--preprocessed",
                    d["preprocessed"] + ".npz",
                    "--out-json",
                    d["qc"] + ".json",
                    "--out-npz",
                    d["qc"] + ".npz",
                ],
            ),
        ]
        print(
            f"{args.angles} angles x {args.frames} frames at the target q "
            f"(file: 3 rings, {size_mb:.0f} MiB; simulated in {sim_wall:.1f} s, "
            f"{sim_rss:.0f} MiB peak)"
        )
        print(f"{'stage':12s} {'wall [s]':>9s} {'peak RSS [MiB]':>15s}")
        for name, argv in stages:
            wall, rss = run_stage(["homodyne-steps", name, *argv])
            print(f"{name:12s} {wall:9.2f} {rss:15.0f}")


if __name__ == "__main__":
    main()
