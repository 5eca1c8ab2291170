"""The bad-input suite: damaged configs, crafted HDF5 layouts and process faults.

Every case asserts either the correct result or one clear error naming the file, key or
value and what was expected, with no traceback and no output (or temporary file) left
behind. Case ids are the rows of the table in the issue's closing note.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from conftest import local_snakemake_env
from homodyne_steps.errors import ConfigError
from homodyne_steps.io.serialise import write_json
from homodyne_steps.stages.simulate import reference_settings, simulate_file
from homodyne_steps.wfconfig import (
    check_config_file,
    check_stage_settings,
    stage_slice,
    validate_config,
)
from test_cli_errors import assert_clean_failure, load_args, run

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
CONFIG = yaml.safe_load((ROOT / "config" / "config.yaml").read_text(encoding="utf-8"))


def no_leftovers(folder: Path) -> list[str]:
    """Files a failed stage left in ``folder`` (outputs or temporaries)."""
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# ------------------------------------------------------------------------ configs


def _edit(path: str, value):
    """An edit of the default config: set (or, with value ..., delete) a dotted key."""

    def apply(config: dict) -> None:
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        if value is ...:
            del node[last]
        else:
            node[last] = value

    return apply


CONFIG_CASES = {
    # id: (edit, the words the one message must hold)
    "dt-zero": (_edit("datasets.demo.dt", 0), ["datasets.demo.dt: got 0", "a number > 0 (s)",
                                               "leave dt out"]),
    "dt-quoted": (_edit("datasets.demo.dt", "0.1"), ["datasets.demo.dt", "string '0.1'",
                                                     "without quotes: 0.1"]),
    "dt-negative": (_edit("datasets.demo.dt", -0.1), ["datasets.demo.dt: got -0.1"]),
    "q-quoted": (_edit("datasets.demo.q", "0.0054"), ["datasets.demo.q", "a number > 0",
                                                      "without quotes"]),
    "q-negative": (_edit("datasets.demo.q", -1), ["datasets.demo.q: got -1; expected a number"]),
    "q-missing": (_edit("datasets.demo.q", ...), ["datasets.demo.q: required key is missing"]),
    "file-missing": (_edit("datasets.demo.file", ...), ["datasets.demo.file: required key"]),
    "mode-typo": (_edit("datasets.demo.analysis_mode", "laminar"),
                  ["got 'laminar'", "laminar_flow"]),
    "num-shards-zero": (_edit("cmc.sharding.num_shards", 0),
                        ["cmc.sharding.num_shards: got 0", "'auto', or a number of shards"]),
    "num-shards-word": (_edit("cmc.sharding.num_shards", "four"), ["num_shards: got 'four'"]),
    "unknown-section": (_edit("fliter", {}), ["fliter: unknown key", "'filter'"]),
    "unknown-nested": (_edit("preprocess.noise_reduction.sise", 3),
                       ["preprocess.noise_reduction.sise: unknown key", "'size'"]),
    "q-range-one": (_edit("filter.q_range", [1]), ["filter.q_range: got [1]", "2 numbers"]),
    "min-time-float": (_edit("qc.min_time_points", 2.5),
                       ["qc.min_time_points: got 2.5", "an integer"]),
    "switch-quoted": (_edit("filter.exclude_t0", "true"),
                      ["filter.exclude_t0", "true or false", "without quotes: true"]),
    "frames-start-zero": (_edit("datasets.demo.frames", {"start": 0, "end": -1}),
                          ["datasets.demo.frames.start: got 0", ">= 1"]),
    "storage-typo": (_edit("datasets.demo.storage", "triangle"),
                     ["datasets.demo.storage: got 'triangle'", "upper"]),
    "bounds-one": (_edit("parameters.D0", {"bounds": [1.0]}), ["parameters.D0.bounds"]),
    "warmup-small": (_edit("cmc.sampler.num_warmup", 5), ["cmc.sampler.num_warmup: got 5",
                                                          ">= 10"]),
    "noise-sigma-zero": (_edit("nlsq.noise", {"method": "fixed", "sigma": 0}),
                         ["nlsq.noise.sigma: got 0", "a number > 0"]),
}  # fmt: skip


# Values each fine alone (the schema passes them) that the stage settings refuse; the
# workflow builds every stage's settings when it starts (wfconfig.check_stage_settings).
SETTINGS_CASES = {
    "rhat-order": (_edit("cmc.combine.rhat_acceptable", 1.01),
                   ["dataset 'demo'", "cmc.combine.rhat_acceptable: must be >= rhat_good"]),
    "qc-thresholds-order": (_edit("qc.thresholds", {"pass": 80, "warn": 70, "excellent": 85}),
                            ["qc.thresholds must be increasing", "pass=80.0, warn=70.0"]),
    "median-size-float": (_edit("preprocess.noise_reduction",
                                {"enabled": True, "method": "median", "size": 2.5}),
                          ["preprocess.noise_reduction.size: got 2.5", "method 'median'"]),
    "sigma-with-per-lag": (_edit("nlsq.noise", {"method": "per_lag", "sigma": 0.01}),
                           ["nlsq.noise.sigma: only used when", "remove it"]),
    "frames-end-before-start": (_edit("datasets.demo.frames", {"start": 5, "end": 3}),
                                ["dataset 'demo'", ">= start_frame (5), got 3"]),
    "override-in-dataset": (_edit("datasets.demo.cmc.combine", {"rhat_acceptable": 1.0}),
                            ["dataset 'demo'", "rhat_acceptable: must be >= rhat_good"]),
    "fixed-unknown": (_edit("nlsq.fixed_parameters", ["D1"]),
                      ["nlsq.fixed_parameters: ['D1'] are not parameters"]),
    "bounds-reversed": (_edit("parameters.D0", {"bounds": [1e5, 10.0]}),
                        ["parameter 'D0': lower bound 100000 must be below upper bound 10"]),
    "speckle-key-typo": (_edit("simulate.sp", {"method": "speckle", "speckle": {"gapp": 1}}),
                         ["simulate.sp.speckle.gapp: unknown key"]),
    "speckle-with-model-key": (_edit("simulate.sp", {"method": "speckle", "noise": 0.1}),
                               ["simulate.sp.noise: not a setting of the speckle simulator",
                                "under 'speckle:'"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SETTINGS_CASES))
def test_settings_errors_stop_the_workflow_before_any_job(case):
    edit, needles = SETTINGS_CASES[case]
    config = copy.deepcopy(CONFIG)
    edit(config)
    validate_config(config, SCHEMA)  # each value passes the schema ...
    with pytest.raises(ConfigError) as err:
        check_stage_settings(config)  # ... the settings of the stage that uses it do not
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_the_shipped_config_builds_every_stage_settings():
    check_stage_settings(CONFIG)


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_errors_say_what_was_expected(case):
    edit, needles = CONFIG_CASES[case]
    config = copy.deepcopy(CONFIG)
    edit(config)
    with pytest.raises(ConfigError) as err:
        validate_config(config, SCHEMA)
    text = str(err.value)
    assert "is not valid under any of the given schemas" not in text
    for needle in needles:
        assert needle in text, text


YAML_CASES = {
    "yaml-unclosed-list": ("datasets:\n  demo:\n    q: [0.1\n    file: x\n", "line 4, column 9"),
    "yaml-tab": ("datasets:\n\tdemo: {}\n", "line 2, column 1"),
    "yaml-unclosed-quote": ('datasets:\n  demo:\n    file: "x.hdf\n', "line 4"),
    "yaml-mapping-in-value": ("datasets: demo: x\n", "line 1, column 15"),
    "yaml-not-a-mapping": ("- datasets\n", "must be a mapping of sections"),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_yaml_syntax_errors_name_file_line_and_column(tmp_path, case):
    text, needle = YAML_CASES[case]
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        check_config_file(path)
    assert str(path) in str(err.value) and needle in str(err.value), str(err.value)


def test_a_simulate_entry_with_a_file_format_gives_the_simulator_valid_settings():
    """format goes to --format; the settings the job parses must not hold it."""
    from homodyne_steps.stages.simulate import settings_from_mapping

    config = copy.deepcopy(CONFIG)
    config["simulate"]["demo"]["format"] = "aps_old"
    validate_config(config, SCHEMA)
    entry = stage_slice(config, "simulate", "demo")
    assert "format" not in entry
    assert settings_from_mapping(entry).n_frames == CONFIG["simulate"]["demo"]["n_frames"]


def test_simulate_entry_need_not_be_a_dataset():
    """Several datasets may analyse one simulated file: its name is not a dataset's."""
    config = copy.deepcopy(CONFIG)
    config["simulate"]["shared"] = config["simulate"].pop("demo")
    config["datasets"]["demo"]["file"] = "resources/shared/shared.hdf"
    config["datasets"]["demo2"] = {**config["datasets"]["demo"], "q_tolerance": 0.2}
    validate_config(config, SCHEMA)
    assert stage_slice(config, "simulate", "shared")["seed"] == 1
    with pytest.raises(ConfigError, match="simulate.nothing: no such entry"):
        stage_slice(config, "simulate", "nothing")


def test_snakemake_reports_a_yaml_error_in_one_message(tmp_path):
    from test_workflow import copy_workflow, snakemake

    cwd = copy_workflow(tmp_path)
    (cwd / "config" / "config.yaml").write_text("datasets:\n  demo: {q: [1\n", encoding="utf-8")
    done = snakemake(cwd, "-n")
    text = done.stdout + done.stderr
    assert done.returncode != 0
    assert "config/config.yaml: YAML syntax error at line" in text and "Traceback" not in text


# ------------------------------------------------------------------ process faults


@pytest.fixture(scope="module")
def static_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("static")
    out, _ = simulate_file(reference_settings("static", n_frames=30), folder / "static.hdf")
    return out


def test_unwritable_results_folder_gives_one_line(tmp_path, capsys, static_file):
    """A results/ the user cannot write: one line naming the path, not a traceback."""
    if not Path("/sys").is_dir():
        pytest.skip("needs a read-only /sys")
    target = Path("/sys/homodyne-steps-test/results")
    argv, outs = load_args(tmp_path, static_file, {"q": 0.0054})
    argv[argv.index("--out-npz") + 1] = str(target / "loaded.npz")
    argv[argv.index("--out-json") + 1] = str(target / "loaded.json")
    code, err = run(capsys, *argv)
    assert_clean_failure(code, err, [target / "loaded.npz"], "/sys/homodyne-steps-test")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_results_folder_gives_one_line(tmp_path, capsys, static_file):
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o500)
    argv, _ = load_args(results, static_file, {"q": 0.0054})
    code, err = run(capsys, *argv)
    results.chmod(0o700)
    assert_clean_failure(code, err, [], str(results), "Permission denied")
    assert no_leftovers(results) == []


def test_results_path_through_a_file_gives_one_line(tmp_path, capsys, static_file):
    (tmp_path / "results").write_text("a file where a folder should be")
    argv, _ = load_args(tmp_path / "results" / "demo", static_file, {"q": 0.0054})
    code, err = run(capsys, *argv)
    assert_clean_failure(code, err, [], str(tmp_path / "results"))


_WRITER = """
import sys, time
from homodyne_steps.io.serialise import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half")
    print(tmp, flush=True)
    time.sleep(60)
"""


def _killed_writer(final: Path) -> Path:
    """Start a writer of ``final``, SIGKILL it mid-write; return the temp it left."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(final)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    tmp = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    return tmp


def test_a_killed_write_leaves_no_temp_after_the_rerun(tmp_path):
    final = tmp_path / "parameters.json"
    left = _killed_writer(final)
    assert left.exists() and not final.exists()  # what SIGKILL leaves: a temp, no output
    write_json(final, {"D0": 1.0})
    assert not left.exists() and json.loads(final.read_text()) == {"D0": 1.0}
    assert no_leftovers(tmp_path) == ["parameters.json"]


def test_temps_of_running_writers_are_left_alone(tmp_path):
    final = tmp_path / "samples.npz"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(final)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        live = Path(proc.stdout.readline().strip())
        write_json(tmp_path / "samples.json", {})  # another output: not its temp
        from homodyne_steps.io.serialise import remove_stale_temps

        assert remove_stale_temps(final) == [] and live.exists()
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


_PIN = "from homodyne_steps.cpu_pinning import pin_threads; pin_threads(1)"


def _pin_in(tmpdir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    return subprocess.run([sys.executable, "-c", _PIN], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


needs_two_cores = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="CPU pinning needs >= 2 allowed cores",
)


@needs_two_cores
def test_core_lock_folder_is_private(tmp_path):
    done = _pin_in(tmp_path)
    assert done.returncode == 0, done.stderr
    lock_dir = tmp_path / f"homodyne-steps-cores-{os.getuid()}"
    assert lock_dir.is_dir() and (lock_dir.stat().st_mode & 0o777) == 0o700
    # A folder of ours with a loose mode (an older version's) is tightened.
    lock_dir.chmod(0o755)
    assert _pin_in(tmp_path).returncode == 0 and (lock_dir.stat().st_mode & 0o777) == 0o700


@needs_two_cores
def test_planted_symlinks_cannot_make_a_run_truncate_files(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock_dir = tmp_path / f"homodyne-steps-cores-{os.getuid()}"
    lock_dir.mkdir(mode=0o700)
    for cpu in os.sched_getaffinity(0):
        (lock_dir / f"cpu{cpu}.lock").symlink_to(victim)
    done = _pin_in(tmp_path)
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "precious"


@needs_two_cores
def test_a_lock_folder_that_is_a_symlink_is_not_used(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / f"homodyne-steps-cores-{os.getuid()}").symlink_to(elsewhere)
    done = _pin_in(tmp_path)
    assert done.returncode == 0 and "pinning cores without locks" in done.stderr
    assert list(elsewhere.iterdir()) == []


# ------------------------------------------------------- stage inputs that are not ours


def _stage(capsys, stage, in_path, folder, settings=None):
    outs = [folder / f"{stage}.npz", folder / f"{stage}.json"]
    argv = [stage, "--input", str(in_path), "--out-npz", str(outs[0]), "--out-json",
            str(outs[1]), "--settings", json.dumps(settings or {})]  # fmt: skip
    return (*run(capsys, *argv), outs)


def _text(path: Path) -> Path:
    path.write_text("hello")
    return path


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _good_arrays(n_phi=2, n_t=8):
    t = 0.1 * np.arange(n_t)
    lag = np.abs(np.subtract.outer(t, t))
    c2 = 1.0 + 0.3 * np.exp(-lag)[None].repeat(n_phi, 0)
    return {"wavevector_q_list": np.full(n_phi, 0.0054), "phi_angles_list": np.arange(n_phi) * 30.0,
            "t1": t, "t2": t.copy(), "c2_exp": c2, "dt": np.float64(0.1)}  # fmt: skip


NPZ_CASES = {
    "npz-not-a-zip": (_text, ["cannot read NPZ file", "in.npz"]),
    "npz-missing-c2": (lambda p: _npz(p, **{k: v for k, v in _good_arrays().items()
                                            if k != "c2_exp"}), ["lacks arrays ['c2_exp']"]),
    "npz-pickled-object": (lambda p: _npz(p, **{**_good_arrays(),
                                                "c2_exp": np.array([{"a": 1}], dtype=object)}),
                           ["cannot read NPZ file"]),
    "npz-shape-mismatch": (lambda p: _npz(p, **{**_good_arrays(), "t1": np.arange(5.0)}),
                           ["inconsistent dataset", "t1 (5,)"]),
    "npz-dt-zero": (lambda p: _npz(p, **{**_good_arrays(), "dt": np.float64(0.0)}),
                    ["dt must be > 0"]),
    "npz-absent": (lambda p: p, ["in.npz"]),
}  # fmt: skip


@pytest.mark.parametrize("stage", ["filter", "preprocess"])
@pytest.mark.parametrize("case", sorted(NPZ_CASES))
def test_stage_inputs_that_are_not_ours(tmp_path, capsys, case, stage):
    make, needles = NPZ_CASES[case]
    source = make(tmp_path / "in.npz")
    out = tmp_path / "out"
    code, err, outs = _stage(capsys, stage, source, out)
    assert_clean_failure(code, err, outs, *needles)
    assert no_leftovers(out) == []


FILTER_CASES = {
    "frames-end-beyond": ({"frames": {"start": 1, "end": 99}}, ["filter.frames.end = 99",
                                                                 "8 loaded frames"]),
    "frames-end-minus-five": ({"frames": {"start": 1, "end": -5}},
                              ["filter.frames.end: -5", "-1 (the last frame)"]),
    "frames-too-few": ({"frames": {"start": 1, "end": 3}}, ["leave 2 frames", "at least 3"]),
    "phi-removes-all": ({"phi_ranges": [[100, 120]]}, ["removes every angle", "0.0, 30.0"]),
    "q-range-removes-all": ({"q_range": [0.01, 0.02]}, ["filter.q_range removes every angle"]),
    "q-range-reversed": ({"q_range": [0.02, 0.01]}, ["filter.q_range: min 0.02 is above max"]),
    "phi-range-not-pair": ({"phi_ranges": [[10]]}, ["filter.phi_ranges[0]: expected [min, max]"]),
    "settings-not-mapping": ([1, 2], ["filter"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(FILTER_CASES))
def test_filter_settings_that_cannot_apply(tmp_path, capsys, case):
    settings, needles = FILTER_CASES[case]
    source = _npz(tmp_path / "in.npz", **_good_arrays())
    code, err, outs = _stage(capsys, "filter", source, tmp_path / "out", settings)
    assert_clean_failure(code, err, outs, *needles)


# --------------------------------------------------------------- crafted HDF5 files

N = 6  # frames of the crafted legacy files
PERIOD_S = 0.01


def _sym6(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.random((N, N)) + 1.0
    return ((a + a.T) / 2).astype(np.float32)


def _legacy(path: Path, dq, dphi, mats: dict, *, factors=(1, 1), period=PERIOD_S, edit=None):
    """A legacy (aps_old) file written directly with h5py, not by our writer."""
    with h5py.File(path, "w") as h5:
        h5["xpcs/dqlist"] = np.asarray(dq, float).reshape(1, -1)
        h5["xpcs/dphilist"] = np.asarray(dphi, float).reshape(1, -1)
        if period is not None:
            h5["measurement/instrument/detector/exposure_period"] = np.array([[period]])
        for key, value in zip(("avg_frames", "stride_frames"), factors, strict=True):
            if value is not None:
                h5[f"xpcs/{key}"] = np.array([[value]], dtype=np.uint64)
        grp = h5.create_group("exchange/C2T_all")
        for key, m in mats.items():
            grp[key] = m
        if edit:
            edit(h5)
    return path


def _three(prefix="g2_", first=1, store=np.triu):
    return {f"{prefix}{first + k:05d}": store(_sym6(k)) for k in range(3)}


Q3, PHI3 = [0.005] * 3, [0.0, 45.0, 90.0]

H5_OK = {
    # id: (file maker, load settings, check of (loaded.json, loaded.npz arrays))
    "legacy-c2-zero-based": (
        lambda p: _legacy(p, Q3, PHI3, _three("c2_", 0)), {},
        lambda rec, arr: rec["source"]["bin_mapping"] == "position"
        and np.array_equal(arr["c2_exp"][1], _sym6(1))),
    "legacy-c2-one-based": (
        lambda p: _legacy(p, Q3, PHI3, _three("c2_", 1)), {},
        lambda rec, arr: rec["source"]["bin_mapping"] == "suffix"
        and rec["source"]["member_prefix"] == "c2"),
    "lower-triangle": (
        lambda p: _legacy(p, Q3, PHI3, _three(store=np.tril)), {},
        lambda rec, arr: rec["storage"]["found"] == ["lower"] * 3
        and np.array_equal(arr["c2_exp"][2], _sym6(2))),
    "full-symmetric": (
        lambda p: _legacy(p, Q3, PHI3, _three(store=lambda m: m)), {},
        lambda rec, arr: rec["storage"]["found"] == ["full"] * 3),
    "ring-float-spread": (
        lambda p: _legacy(p, [0.005, 0.0050005, 0.0049995], PHI3, _three()), {},
        lambda rec, arr: rec["phi_deg"] == PHI3 and rec["q"]["grouping"] == "q_tolerance"),
    "legacy-q-edges": (
        lambda p: _legacy(p, [0.005, 0.005005, 0.00525, 0.005255], [0.0, 45.0] * 2,
                          {f"g2_{k:05d}": np.triu(_sym6(k)) for k in range(1, 5)},
                          edit=lambda h5: h5.create_dataset(
                              "xpcs/dqspan", data=[[0.004875, 0.005125, 0.005375]])), {},
        lambda rec, arr: rec["bin_labels"] == [1, 2] and rec["q"]["grouping"] == "dqspan"),
    "nan-q-bin-recorded": (
        lambda p: _legacy(p, [0.005, np.nan, 0.005], PHI3, _three()), {},
        lambda rec, arr: rec["phi_deg"] == [0.0, 90.0]
        and rec["skipped_bins"][0]["label"] == 2 and rec["skipped_bins"][0]["q"] is None),
    "integer-matrices": (
        lambda p: _legacy(p, Q3, PHI3, {k: (m * 100).astype(np.int32)
                                         for k, m in _three().items()}), {},
        lambda rec, arr: arr["c2_exp"].dtype == np.float64),
    "dt-factors-opt-in": (
        lambda p: _legacy(p, Q3, PHI3, _three(), factors=(None, 2)),
        {"missing_frame_factors": "assume_1"},
        lambda rec, arr: np.isclose(rec["dt_s"], 2 * PERIOD_S)
        and rec["dt_source"]["assumed_1"] == ["/xpcs/avg_frames"]),
    "dt-from-factors": (
        lambda p: _legacy(p, Q3, PHI3, _three(), factors=(5, 2)), {},
        lambda rec, arr: np.isclose(rec["dt_s"], 10 * PERIOD_S)),
    "time-since-file-start": (
        lambda p: _legacy(p, Q3, PHI3, _three()), {"frames": {"start": 3, "end": -1}},
        lambda rec, arr: np.isclose(arr["t1"][0], 2 * PERIOD_S) and rec["time_origin"] == "file"),
    "time-reference-convention": (
        lambda p: _legacy(p, Q3, PHI3, _three()),
        {"frames": {"start": 3, "end": -1}, "time_origin": "first_loaded"},
        lambda rec, arr: arr["t1"][0] == 0.0 and rec["t_first_s"] == 0.0),
    "nan-values-kept-not-invented": (
        lambda p: _legacy(p, Q3, PHI3, {**_three(), "g2_00002": np.where(
            np.eye(N, k=2, dtype=bool), np.nan, np.triu(_sym6(1))).astype(np.float32)}), {},
        lambda rec, arr: int(np.isnan(arr["c2_exp"][1]).sum()) == 2 * (N - 2)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(H5_OK))
def test_files_the_beamline_writes_load_right(tmp_path, capsys, case):
    make, settings, check = H5_OK[case]
    source = make(tmp_path / "in.hdf")
    argv, outs = load_args(tmp_path, source, {"q": 0.005, **settings})
    code, err = run(capsys, *argv)
    assert code == 0, err
    record = json.loads(outs[1].read_text())
    with np.load(outs[0]) as npz:
        arrays = {k: npz[k] for k in npz.files}
    assert check(record, arrays), record


def _link_to_nowhere(h5):
    del h5["exchange/C2T_all/g2_00002"]
    h5["exchange/C2T_all/g2_00002"] = h5py.ExternalLink("absent.h5", "/m")


H5_BAD = {
    # id: (file maker, load settings, words the one message must hold)
    "mixed-prefixes": (lambda p: _legacy(p, Q3, PHI3, {**_three(), "c2_00004": _sym6(4)}), {},
                       ["c2_", "g2_"]),
    "upper-on-lower-file": (lambda p: _legacy(p, Q3, PHI3, _three(store=np.tril)),
                            {"storage": "upper"}, ["g2_00001", "storage: lower"]),
    "asymmetric-full": (lambda p: _legacy(p, Q3, PHI3, {**_three(), "g2_00001": np.arange(
                            N * N, dtype=np.float32).reshape(N, N) + 1}), {},
                        ["/exchange/C2T_all/g2_00001"]),
    "duplicate-bins": (lambda p: _legacy(p, Q3, [30.0, 0.0, 30.0], _three()), {},
                       ["g2_00001", "g2_00003", "duplicate bins"]),
    "rings-merged": (lambda p: _legacy(p, [0.005, 0.00525], [0.0, 0.0],
                                       {"g2_00001": np.triu(_sym6(1)),
                                        "g2_00002": np.triu(_sym6(2))}), {},
                     ["lower q_tolerance"]),
    "dt-factor-missing": (lambda p: _legacy(p, Q3, PHI3, _three(), factors=(None, 1)), {},
                          ["/xpcs/avg_frames", "dt", "missing_frame_factors: assume_1"]),
    "dt-period-missing": (lambda p: _legacy(p, Q3, PHI3, _three(), period=None), {},
                          ["exposure_period", "set dt"]),
    "dt-period-zero": (lambda p: _legacy(p, Q3, PHI3, _three(), period=0.0), {},
                       ["exposure_period = 0.0"]),
    "broken-external-link": (lambda p: _legacy(p, Q3, PHI3, _three(), edit=_link_to_nowhere),
                             {}, ["g2_00002"]),
    "string-matrix": (lambda p: _legacy(p, Q3, PHI3, {**_three(), "g2_00003": np.array(
                          [["a"] * N] * N, dtype="S1")}), {}, ["g2_00003", "expected numbers"]),
    "non-square": (lambda p: _legacy(p, Q3, PHI3, {**_three(), "g2_00003": np.ones(
                       (N, N + 1), np.float32)}), {}, ["g2_00003", "square"]),
    "frames-end-minus-five": (lambda p: _legacy(p, Q3, PHI3, _three()),
                              {"frames": {"start": 1, "end": -5}}, ["end_frame", "-5"]),
    "storage-typo": (lambda p: _legacy(p, Q3, PHI3, _three()), {"storage": "triangle"},
                     ["storage", "'triangle'"]),
    "factors-typo": (lambda p: _legacy(p, Q3, PHI3, _three()),
                     {"missing_frame_factors": "one"}, ["missing_frame_factors", "'one'"]),
    "time-origin-typo": (lambda p: _legacy(p, Q3, PHI3, _three()), {"time_origin": "zero"},
                         ["time_origin", "'zero'"]),
    "q-far-from-rings": (lambda p: _legacy(p, Q3, PHI3, _three()), {"q": 0.05},
                         ["no q ring within", "0.005"]),
    "empty-file": (lambda p: p.write_bytes(b"") and p or p, {}, ["not an HDF5 file"]),
    "truncated-file": (lambda p: p.write_bytes(_legacy(p, Q3, PHI3, _three()).read_bytes()[
                           :1500]) and p, {}, ["in.hdf"]),
    "folder-not-file": (lambda p: p.mkdir() or p, {}, ["is not a file"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(H5_BAD))
def test_crafted_files_get_one_clear_error(tmp_path, capsys, case):
    make, settings, needles = H5_BAD[case]
    source = make(tmp_path / "in.hdf")
    out = tmp_path / "out"
    argv, outs = load_args(out, source, {"q": 0.005, **settings})
    code, err = run(capsys, *argv)
    assert_clean_failure(code, err, outs, *needles)
    assert no_leftovers(out) == []


# --------------------------------------------------------------- a killed workflow


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.mark.slow
def test_a_killed_workflow_resumes_after_unlock(tmp_path):
    """kill -9 mid-run: the rerun stops on the lock; after --unlock it finishes, and its
    outputs equal an uninterrupted run's, bit for bit."""
    from test_workflow import copy_workflow, snakemake

    target = "results/demo/nlsq/parameters.json"
    (tmp_path / "killed").mkdir()
    (tmp_path / "clean").mkdir()
    killed = copy_workflow(tmp_path / "killed")
    proc = subprocess.Popen(["snakemake", "--cores", "1", target], cwd=killed,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=local_snakemake_env())  # fmt: skip
    deadline = time.monotonic() + 300
    while not (killed / "logs" / "demo" / "load.log").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before the kill"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / target).exists()

    blocked = snakemake(killed, target)
    assert blocked.returncode != 0 and "LockException" in blocked.stdout + blocked.stderr
    assert snakemake(killed, "--unlock").returncode == 0
    resumed = snakemake(killed, target)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    clean = copy_workflow(tmp_path / "clean")
    assert snakemake(clean, target).returncode == 0
    for name in ("loaded", "filtered", "preprocessed", "qc"):
        a = _npz_arrays(killed / f"results/demo/data/{name}.npz")
        b = _npz_arrays(clean / f"results/demo/data/{name}.npz")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True)
                                            for k in a), name  # fmt: skip
    fit = [json.loads((d / target).read_text())["parameters"] for d in (killed, clean)]
    assert fit[0] == fit[1]
    leftovers = [p for p in (killed / "results").rglob(".*.tmp.*")]
    assert leftovers == []


# ------------------------------------------------------- data that must not be fitted


def _decay_arrays(n_phi=3, n_t=40, seed=0, flat=False):
    """c2 = 1 + 0.3 exp(-lag / 0.5 s) + N(0, 0.01²), made here, not by our simulator."""
    rng = np.random.default_rng(seed)
    t = 0.1 * np.arange(n_t)
    lag = np.abs(np.subtract.outer(t, t))
    signal = 1.0 + (0.0 if flat else 0.3) * np.exp(-lag / 0.5)
    noise = np.triu(rng.normal(0.0, 0.01, (n_phi, n_t, n_t)), 1)
    c2 = signal[None] + noise + np.swapaxes(noise, 1, 2)
    return {**_good_arrays(n_phi, n_t), "c2_exp": c2, "t1": t, "t2": t.copy()}


def _qc(capsys, folder: Path, arrays: dict, settings=None):
    folder.mkdir(exist_ok=True)
    src = _npz(folder / "pre.npz", **arrays)
    outs = [folder / "qc.json", folder / "qc.npz"]
    argv = ["qc", "--raw", str(src), "--filtered", str(src), "--preprocessed", str(src),
            "--out-json", str(outs[0]), "--out-npz", str(outs[1]),
            "--settings", json.dumps(settings or {})]  # fmt: skip
    return (*run(capsys, *argv), outs)


def test_constant_c2_fails_qc_with_no_correlation_decay(tmp_path, capsys):
    code, err, outs = _qc(capsys, tmp_path, _decay_arrays(flat=True))
    assert_clean_failure(code, err, outs, "no correlation decay")


def test_every_angle_masked_fails_qc_even_when_told_to_warn(tmp_path, capsys):
    arrays = _decay_arrays()
    arrays["c2_exp"] = np.full_like(arrays["c2_exp"], np.nan)
    code, err, outs = _qc(capsys, tmp_path, arrays, {"on_fail": "warn"})
    assert_clean_failure(code, err, outs, "quality control failed")


def test_a_hole_stays_a_hole_in_what_is_fitted(tmp_path, capsys):
    arrays = _decay_arrays()
    arrays["c2_exp"][:, 10:20, :] = np.nan
    arrays["c2_exp"][:, :, 10:20] = np.nan
    code, err, outs = _qc(capsys, tmp_path, arrays)
    assert code == 0, err
    with np.load(outs[1]) as npz:
        final = npz["c2_exp"]
    iu = np.triu_indices(40, 1)
    hole = np.zeros((40, 40), bool)
    hole[10:20, :] = hole[:, 10:20] = True
    assert all(np.array_equal(~np.isfinite(m[iu]), hole[iu]) for m in final)
    report = json.loads(outs[0].read_text())
    assert report["overall"]["score"] < 100


def test_qc_masked_fraction_setting_out_of_range(tmp_path, capsys):
    code, err, outs = _qc(capsys, tmp_path, _decay_arrays(), {"max_masked_fraction": 1.5})
    assert_clean_failure(code, err, outs, "max_masked_fraction", "1.5")


def test_smoothing_never_reaches_the_fitted_data(tmp_path, capsys):
    source = _npz(tmp_path / "in.npz", **_decay_arrays())
    smooth = {"noise_reduction": {"enabled": True, "method": "gaussian", "size": 2}}
    code, err, outs = _stage(capsys, "preprocess", source, tmp_path / "out", smooth)
    assert code == 0, err
    with np.load(outs[0]) as npz:
        fitted, shown = npz["c2_exp"], npz["c2_smoothed"]
    with np.load(source) as npz:
        raw = npz["c2_exp"]
    off = ~np.eye(40, dtype=bool)
    assert np.array_equal(fitted[:, off], raw[:, off]) and not np.allclose(shown, fitted)
    steps = json.loads(outs[1].read_text())["records"]
    assert any(r["step"] == "noise_reduction" and r.get("display_only") for r in steps)


def test_normalisation_without_a_finite_baseline_names_the_angle(tmp_path, capsys):
    arrays = _decay_arrays()
    lag = np.abs(np.subtract.outer(np.arange(40), np.arange(40)))
    arrays["c2_exp"][1][lag >= 25] = np.nan
    source = _npz(tmp_path / "in.npz", **arrays)
    settings = {"normalization": {"enabled": True, "method": "baseline"}}
    code, err, outs = _stage(capsys, "preprocess", source, tmp_path / "out", settings)
    assert_clean_failure(code, err, outs, "angle index 1", "baseline")
