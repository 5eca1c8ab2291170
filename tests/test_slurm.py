"""The cluster path: the whole workflow submitted through profiles/slurm to a real Slurm.

The fixture starts a one-node Slurm on localhost with tools/slurm-local.sh (installing it
with apt-get when it is missing and we are root) and stops what it started. Without root
or apt the end-to-end test is skipped, saying why.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "tools" / "slurm-local.sh"
PROFILE = ROOT / "profiles" / "slurm"
STATE = Path(os.environ.get("SLURM_LOCAL_STATE", "/tmp/slurm-local"))

# A small static dataset and a short CMC (2 shards): the whole workflow in ~2-3 minutes.
TINY = {
    "datasets": {
        "tiny": {
            "file": "resources/tiny/tiny.hdf",
            "q": 0.0054,
            "L": 2.0e6,
            "analysis_mode": "static",
        }
    },
    "simulate": {
        "tiny": {"mode": "static", "n_frames": 50, "phi_deg": [0.0, 45.0, 90.0], "n_q_rings": 1}
    },
    "cmc": {
        "sharding": {"num_shards": 2, "min_points_per_parameter": 100},
        "sampler": {"num_warmup": 20, "num_samples": 20, "num_chains": 1},
        "resources": {"threads": 1, "mem_mb": 1500, "runtime": 7},
    },
}
# The analysis (data stages, NLSQ, CMC); figures are left out to keep the test short: every
# Slurm job costs seconds of polling, and the plot rules are light rules like the others.
TARGETS = ("results/tiny/data/qc_report.json", "results/tiny/cmc/parameters.json")
# Rules without resources of their own: the profile's default-resources.
LIGHT = ("simulate", "load", "filter", "preprocess", "qc", "cmc_plan", "cmc_combine")
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)")


def _run(cmd, timeout=120, **kwargs):
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def _slurm_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        done = _run(["sinfo", "-h", "-o", "%T"], timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and re.search(r"^(idle|mixed|allocated)", done.stdout, re.M)


def _ours_running() -> bool:
    pid_file = STATE / "slurmctld.pid"
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


@pytest.fixture(scope="module")
def slurm():
    """A local Slurm for the test: {"gpus": bool}; stopped at the end if we started it."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip(
            "snakemake-executor-plugin-slurm is not installed (pip install -e '.[cluster]')"
        )
    started = False
    if _slurm_answers():
        if not _ours_running():
            pytest.skip(
                "a Slurm that tools/slurm-local.sh did not start answers here; "
                "not submitting test jobs to it"
            )
    else:
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            pytest.skip("starting a local Slurm (tools/slurm-local.sh) needs root")
        needed = ("sinfo", "sbatch", "squeue", "scontrol", "slurmctld", "slurmd", "munged")
        if not all(shutil.which(n) or Path("/usr/sbin", n).exists() for n in needed):
            if shutil.which("apt-get") is None:
                pytest.skip("Slurm is not installed and there is no apt-get to install it")
            done = _run(["bash", LAUNCHER, "install"], timeout=900)
            if done.returncode != 0:
                pytest.skip(f"could not install Slurm with apt-get: {done.stderr[-800:]}")
        env = {**os.environ, "SLURM_LOCAL_FAKE_GPU": "1"}
        done = _run(["bash", LAUNCHER, "start"], env=env, timeout=120)
        started = True
        if done.returncode != 0:
            _run(["bash", LAUNCHER, "stop"], timeout=120)
            pytest.fail(f"local Slurm did not start:\n{done.stdout}\n{done.stderr}")
    gres = _run(["sinfo", "-h", "-o", "%G"], timeout=20).stdout
    try:
        yield {"gpus": "gpu" in gres}
    finally:
        if started:
            _run(["bash", LAUNCHER, "stop"], timeout=120)


def _snakemake_slurm(cwd: Path) -> subprocess.CompletedProcess:
    # The repository's profile, as a user runs it; the test only shortens the waits and fits
    # NLSQ's threads to this node (its 4 would stay pending on a 2-core machine).
    return _run(
        [
            "snakemake",
            "--profile",
            PROFILE,
            "--set-threads",
            "nlsq=2",
            "--slurm-init-seconds-before-status-checks",
            "1",
            "--seconds-between-status-checks",
            "1",
            *TARGETS,
        ],
        cwd=cwd,
        timeout=600,
    )


def _submissions(text: str) -> list[tuple[str, str]]:
    """(rule, Slurm job id) of every job the run submitted with sbatch."""
    out = []
    for _, slurm_id, log in SUBMITTED.findall(text):
        rule = re.search(r"/(?:rule|group)_(\w+)/", log).group(1)
        out.append((rule, slurm_id))
    return out


def _slurm_job(slurm_id: str) -> dict[str, str]:
    done = _run(["scontrol", "show", "job", "-o", slurm_id], timeout=20)
    assert done.returncode == 0, done.stderr
    return dict(re.findall(r"(\w[\w/:]*)=(\S*)", done.stdout))


def _profile_defaults() -> dict:
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text(encoding="utf-8"))
    res = profile["default-resources"]
    return {
        "mem_mb": eval(str(res["mem_mb"]), {}, {"attempt": 1}),
        "runtime": int(res["runtime"]),
        "nlsq": profile["set-resources"]["nlsq"],
    }


def _mb(text: str) -> float:
    """scontrol's memory (1500M, 1.50G) in MB."""
    return float(text[:-1]) * {"M": 1, "G": 1024, "T": 1024**2}[text[-1]]


def _minutes(limit: str) -> int:
    h, m, s = (int(x) for x in limit.split(":"))
    return 60 * h + m


@pytest.mark.slow
def test_workflow_runs_through_slurm_with_the_configured_resources(slurm, tmp_path):
    cwd = tmp_path / "wf"
    cwd.mkdir()
    for name in ("Snakefile", "workflow", "config", "profiles", "envs"):  # profiles/default too
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, cwd / name)
    config = json.loads(json.dumps(TINY))
    (cwd / "config" / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")

    t0 = time.monotonic()
    done = _snakemake_slurm(cwd)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    for out in (
        "results/tiny/data/qc_report.json",
        "results/tiny/nlsq/parameters.json",
        "results/tiny/cmc/plan.json",
        "results/tiny/cmc/K2/shards/1.json",
        "results/tiny/cmc/parameters.json",
    ):
        assert (cwd / out).is_file(), out

    # Every job of the run went through sbatch.
    jobs = _submissions(log)
    rules = [rule for rule, _ in jobs]
    finished = re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", log)
    assert sorted(finished) == sorted(rules), log[-4000:]
    assert set(rules) >= {*LIGHT, "nlsq", "cmc_shard"} and rules.count("cmc_shard") == 2, rules

    # What Slurm was asked for: cmc_shard from the config's cmc.resources, NLSQ from the
    # profile's set-threads / set-resources, light rules from its default-resources.
    defaults = _profile_defaults()
    shard = TINY["cmc"]["resources"]
    for rule, slurm_id in jobs:
        job = _slurm_job(slurm_id)
        assert job["JobState"] == "COMPLETED", (rule, job)
        assert job["Comment"].startswith(f"rule_{rule}"), (rule, job["Comment"])
        assert "gpu" not in job.get("TresPerJob", ""), (rule, job.get("TresPerJob"))
        if rule == "cmc_shard":
            want = (shard["threads"], shard["mem_mb"], shard["runtime"])
        elif rule == "nlsq":
            want = (2, defaults["nlsq"]["mem_mb"], defaults["nlsq"]["runtime"])
        elif rule in LIGHT:
            want = (1, defaults["mem_mb"], defaults["runtime"])
        else:
            continue
        got = (int(job["NumCPUs"]), _mb(job["MinMemoryNode"]), _minutes(job["TimeLimit"]))
        assert got == pytest.approx(want, abs=1), (rule, got, want)
    first_run_s = time.monotonic() - t0

    # Editing a CMC sampler setting resubmits the shards, the combination and what is
    # downstream of it (as `--forcerun cmc_combine` plans), nothing upstream; a GPU request
    # in cmc.resources becomes --gpus (the local Slurm has two fake GPUs).
    plan = _run(["snakemake", "-n", *TARGETS, "--forcerun", "cmc_combine"], cwd=cwd)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    downstream = [r for r in re.findall(r"^rule (\w+):", plan.stdout, re.M) if r != "all"]
    config["cmc"]["sampler"]["num_samples"] = 25
    if slurm["gpus"]:
        config["cmc"]["resources"]["gpu"] = 1
    (cwd / "config" / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    done = _snakemake_slurm(cwd)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    jobs = _submissions(log)
    rerun = sorted(rule for rule, _ in jobs)
    assert rerun == sorted(["cmc_shard", "cmc_shard", *downstream]), (rerun, downstream)
    assert not set(rerun) & {*LIGHT, "nlsq"} - {"cmc_combine"}, rerun
    for rule, slurm_id in jobs:
        gpus = _slurm_job(slurm_id).get("TresPerJob", "")
        if rule == "cmc_shard" and slurm["gpus"]:
            assert gpus.endswith("gpu:1"), (rule, gpus)
        else:
            assert "gpu" not in gpus, (rule, gpus)
    params = json.loads((cwd / "results/tiny/cmc/parameters.json").read_text(encoding="utf-8"))
    assert set(params["parameters"]) >= {"D0", "alpha", "D_offset"}
    print(f"first run {first_run_s:.0f} s, CMC rerun {time.monotonic() - t0 - first_run_s:.0f} s")


def test_thread_pinning_stays_inside_the_allowed_cpus(tmp_path):
    """Under Slurm the affinity mask is the allocation: --threads picks only from it."""
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    cpus = sorted(os.sched_getaffinity(0))
    code = (
        "import json, os, sys\n"
        "os.sched_setaffinity(0, json.loads(sys.argv[1]))\n"
        "from homodyne_steps.cpu_pinning import pin_threads\n"
        "pin_threads(int(sys.argv[2]))\n"
        "print(sorted(os.sched_getaffinity(0)))\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # private core locks
    # Hold every core lock, as concurrent jobs would: the oversubscribed path must still
    # stay inside the mask.
    import fcntl

    lock_dir = tmp_path / f"homodyne-steps-cores-{os.getuid()}"
    lock_dir.mkdir()
    held = []
    try:
        for cpu in cpus:
            fh = open(lock_dir / f"cpu{cpu}.lock", "w")  # noqa: SIM115
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(fh)
        # the whole mask, and one that leaves a CPU out (as a Slurm allocation does)
        for mask in (cpus, cpus[1:] or cpus):
            for n in range(1, len(mask) + 2):
                done = _run([sys.executable, "-c", code, json.dumps(mask), n], env=env)
                assert done.returncode == 0, done.stderr
                got = json.loads(done.stdout)
                assert set(got) <= set(mask) and len(got) == min(n, len(mask)), (n, mask, got)
    finally:
        for fh in held:
            fh.close()
