"""Data-path checks: the silent wrong results of the data stages, measured.

Run: ``python bench/data_path_checks.py`` (about a minute on 2 cores). Each case runs
the real stages (load → filter → preprocess → qc → nlsq, in-process) on a simulated
static APS-U file (3 angles, D0 = 1e4 Å²/s, alpha = -0.3, D_offset = 1e3, relative
noise 0.01), damages it the way a beamline file can be damaged, and prints what comes
out: the error a user now gets, or the fitted numbers next to the truth.

- ``dt``: the file lacks ``avg_frame`` (averaging 2 × stride 5 = 10 frame periods).
- ``time axis``: frames 11–60 chosen in ``load`` or with ``filter.frames``.
- ``hole``: 30 frames lost (NaN rows and columns in every matrix).
- ``smoothing``: ``preprocess.noise_reduction`` (gaussian, 1 element) on.
- ``constant``: c2 = 1 + noise at every angle (no decay).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import h5py
import numpy as np

from homodyne_steps.data.preprocess_settings import PreprocessSettings
from homodyne_steps.errors import HomodyneStepsError
from homodyne_steps.inference.nlsq_settings import NlsqSettings
from homodyne_steps.inference.noise import estimate_sigma_per_lag
from homodyne_steps.stages.filter import FilterSettings, filter_stage
from homodyne_steps.stages.load import load_stage
from homodyne_steps.stages.nlsq_stage import nlsq_stage
from homodyne_steps.stages.preprocess import preprocess_stage
from homodyne_steps.stages.qc import qc_stage
from homodyne_steps.stages.simulate import reference_settings, simulate_file

Q = 0.0054
MATRICES = "/xpcs/twotime/correlation_map"


def run_stages(work: Path, source: Path, load=None, filt=None, prep=None) -> dict:
    """load → filter → preprocess → qc → nlsq; the numbers a user would read."""
    work.mkdir(parents=True, exist_ok=True)
    load = load or {}
    frames = load.pop("frames", {})
    load_stage(source, Q, work / "loaded.npz", work / "loaded.json",
               start_frame=frames.get("start", 1), end_frame=frames.get("end", -1),
               **load)  # fmt: skip
    filter_stage(work / "loaded.npz", work / "filtered.npz", work / "filter.json",
                 FilterSettings.from_mapping(filt))  # fmt: skip
    preprocess_stage(work / "filtered.npz", work / "preprocessed.npz", work / "prov.json",
                     PreprocessSettings.from_mapping(prep))  # fmt: skip
    report = qc_stage(work / "loaded.npz", work / "filtered.npz", work / "preprocessed.npz",
                      work / "qc.json", work / "qc.npz", {"on_fail": "warn"})  # fmt: skip
    with np.load(work / "qc.npz") as npz:
        c2 = npz["c2_exp"]
        t1 = npz["t1"]
    nlsq_stage(work / "qc.npz", work / "nlsq", mode="static", L=2e6,
                     settings=NlsqSettings.from_mapping({}))  # fmt: skip
    params = json.loads((work / "nlsq" / "parameters.json").read_text())
    iu = np.triu_indices(c2.shape[1], 1)
    return {
        "qc": (report["overall"]["score"], report["overall"]["status"]),
        "t_first_s": float(t1[0]),
        "sigma": float(np.nanmedian(estimate_sigma_per_lag(c2)[:, 1:])),
        "masked_points": int(sum(np.count_nonzero(~np.isfinite(m[iu])) for m in c2)),
        "chi2_red": params["reduced_chi_squared"],
        "params": {k: (v["value"], v["uncertainty"]) for k, v in params["parameters"].items()},
    }


def show(label: str, res: dict, truth: dict) -> None:
    fit = ", ".join(
        f"{k} {v:.6g} ± {s:.2g} (truth {truth[k]:g})" for k, (v, s) in res["params"].items()
    )
    print(f"  {label}: QC {res['qc'][0]:.1f} {res['qc'][1]}; σ {res['sigma']:.5f}; masked "
          f"{res['masked_points']}; χ²_red {res['chi2_red']:.3f}; {fit}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=120)
    args = parser.parse_args()
    settings = reference_settings("static", n_frames=args.frames, seed=7)
    truth = settings.params
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        good, _ = simulate_file(settings, tmp / "good.hdf")

        print("dt: /xpcs/twotime/config/avg_frame removed (true step = 10 frame periods)")
        no_avg = tmp / "no_avg.hdf"
        no_avg.write_bytes(good.read_bytes())
        with h5py.File(no_avg, "a") as h5:
            del h5["/xpcs/twotime/config/avg_frame"]
        try:
            run_stages(tmp / "dt_default", no_avg)
            print("  default: loaded (WRONG: should have stopped)")
        except HomodyneStepsError as exc:
            print(f"  default: error: {exc}")
        show("missing_frame_factors: assume_1 (the old silent default)",
             run_stages(tmp / "dt_assumed", no_avg, load={"missing_frame_factors": "assume_1"}),
             truth)  # fmt: skip
        show("dt: 0.1 set in the config",
             run_stages(tmp / "dt_set", no_avg, load={"dt": settings.dt}), truth)  # fmt: skip

        print("time axis: frames 11-60")
        a = run_stages(tmp / "t_load", good, load={"frames": {"start": 11, "end": 60}})
        b = run_stages(tmp / "t_filter", good, filt={"frames": {"start": 11, "end": 60}})
        show(f"chosen in load (t from {a['t_first_s']:g} s)", a, truth)
        show(f"chosen in filter (t from {b['t_first_s']:g} s)", b, truth)
        try:
            c = run_stages(tmp / "t_ref", good, load={"frames": {"start": 11, "end": 60},
                                                      "time_origin": "first_loaded"})  # fmt: skip
            show(f"time_origin: first_loaded (t from {c['t_first_s']:g} s)", c, truth)
        except HomodyneStepsError as exc:
            print(f"  time_origin: first_loaded: {str(exc)[:200]}")
        diff = max(abs(a["params"][k][0] / b["params"][k][0] - 1) for k in a["params"])
        print(f"  load vs filter: max relative parameter difference {diff:.2e}")

        print("hole: 30 frames lost (NaN rows and columns)")
        hole = tmp / "hole.hdf"
        hole.write_bytes(good.read_bytes())
        with h5py.File(hole, "a") as h5:
            for key in h5[MATRICES]:
                m = h5[f"{MATRICES}/{key}"][()]
                m[40:70, :] = np.nan
                m[:, 40:70] = np.nan
                h5[f"{MATRICES}/{key}"][...] = np.triu(m)
        show("intact", run_stages(tmp / "intact", good), truth)
        show("30 frames lost", run_stages(tmp / "hole", hole), truth)

        print("smoothing: preprocess.noise_reduction gaussian, size 1")
        smooth = {"noise_reduction": {"enabled": True, "method": "gaussian", "size": 1}}
        show("smoothing on", run_stages(tmp / "smooth", good, prep=smooth), truth)

        print("constant c2 (no decay at any angle)")
        flat = tmp / "flat.hdf"
        flat.write_bytes(good.read_bytes())
        rng = np.random.default_rng(1)
        with h5py.File(flat, "a") as h5:
            for key in h5[MATRICES]:
                n = h5[f"{MATRICES}/{key}"].shape[0]
                h5[f"{MATRICES}/{key}"][...] = np.triu(1 + 0.01 * rng.standard_normal((n, n)))
        work = tmp / "flat"
        work.mkdir()
        load_stage(flat, Q, work / "l.npz", work / "l.json")
        filter_stage(work / "l.npz", work / "f.npz", work / "f.json", FilterSettings())
        preprocess_stage(work / "f.npz", work / "p.npz", work / "p.json")
        try:
            qc_stage(work / "l.npz", work / "f.npz", work / "p.npz", work / "q.json",
                     work / "q.npz")  # fmt: skip
            print("  QC passed (WRONG)")
        except HomodyneStepsError as exc:
            print(f"  QC: {str(exc)[:240]}")


if __name__ == "__main__":
    main()
