"""The Snakemake workflow: config validation, end-to-end demo run, rerun semantics."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import check_figure_dir, local_snakemake_env
from homodyne_steps.errors import ConfigError
from homodyne_steps.wfconfig import (
    STAGES,
    code_fingerprint,
    stage_settings,
    validate_config,
)

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
CONFIG = yaml.safe_load((ROOT / "config" / "config.yaml").read_text(encoding="utf-8"))
PLOT_KINDS = ("data", "qc", "nlsq", "cmc")


def copy_workflow(dest: Path) -> Path:
    for name in ("Snakefile", "workflow", "config", "profiles", "envs"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        else:
            shutil.copy2(src, dest / name)
    return dest


def snakemake(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["snakemake", "--cores", "2", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env=local_snakemake_env(env),
    )


def planned_jobs(cwd: Path, env: dict | None = None) -> dict[str, int]:
    """Rule -> job count of a dry run ({} when nothing is to be done)."""
    done = snakemake(cwd, "-n", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout + done.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def write_config(cwd: Path, config: dict) -> None:
    (cwd / "config" / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")


def test_default_config_is_valid():
    validate_config(CONFIG, SCHEMA)


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda c: c["preprocess"]["diagonal_correction"].update(methd="basic"),
            "preprocess.diagonal_correction.methd: unknown key",
        ),
        (
            lambda c: c["datasets"]["demo"].update(L="2.0e6"),
            "datasets.demo.L: got '2.0e6'; expected a number > 0 (the value is the string",
        ),
        (lambda c: c["datasets"]["demo"].update(qq=1.0), "datasets.demo.qq: unknown key"),
        (lambda c: c["datasets"]["demo"].pop("L"), "datasets.demo.L: required key is missing"),
        (lambda c: c.update(filtr={}), "filtr: unknown key"),
        (lambda c: c["filter"].update(phi_ranges=[[0, 10, 20]]), "filter.phi_ranges"),
        (
            lambda c: c["qc"].update(on_fail="ignore"),
            "qc.on_fail: got 'ignore'; expected one of ['error', 'warn']",
        ),
        (lambda c: c["datasets"]["demo"]["frames"].update(start=0), "datasets.demo.frames.start"),
    ],
)
def test_config_errors_name_the_key(edit, message):
    config = copy.deepcopy(CONFIG)
    edit(config)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(config, SCHEMA)


def test_stage_slices_are_canonical_and_minimal():
    reordered = copy.deepcopy(CONFIG)
    reordered["preprocess"] = dict(reversed(list(reordered["preprocess"].items())))
    for stage in ("load", "filter", "preprocess", "qc"):
        assert stage_settings(CONFIG, stage, "demo") == stage_settings(reordered, stage, "demo")
    load = json.loads(stage_settings(CONFIG, "load", "demo"))
    assert set(load) <= {"q", "dt", "frames", "q_tolerance", "storage"}
    # A dataset's own section overrides the global one key by key.
    override = copy.deepcopy(CONFIG)
    override["datasets"]["demo"]["filter"] = {"phi_ranges": [[-40, 40]]}
    merged = json.loads(stage_settings(override, "filter", "demo"))
    assert merged["phi_ranges"] == [[-40, 40]] and merged["exclude_t0"] is True


def test_load_slice_holds_exactly_the_load_settings():
    from homodyne_steps.stages.load import SETTINGS_KEYS
    from homodyne_steps.wfconfig import LOAD_KEYS

    assert set(LOAD_KEYS) == set(SETTINGS_KEYS)


def test_code_fingerprints_name_the_version_and_differ_by_stage():
    prints = {s: code_fingerprint(s) for s in STAGES}
    assert len(set(prints.values())) == len(prints)
    assert all("+" in p for p in prints.values())


def _fingerprints(src: Path) -> dict[str, str]:
    """Every stage's code fingerprint as computed from the package under ``src``."""
    code = (
        "import json; from homodyne_steps.wfconfig import STAGES, code_fingerprint; "
        "print(json.dumps({s: code_fingerprint(s) for s in STAGES}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def test_code_edits_change_exactly_the_stages_that_import_the_module(tmp_path):
    """The fingerprints follow the real imports: edit a module in a copy, see who changes."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "homodyne_steps", src / "homodyne_steps")
    pkg = src / "homodyne_steps"
    before = _fingerprints(src)

    def changed_after(edit) -> set[str]:
        nonlocal before
        edit()
        after = _fingerprints(src)
        out = {s for s in after if after[s] != before[s]}
        before = after
        return out

    def append(name: str, text: str) -> None:
        with open(pkg / f"{name}.py", "a", encoding="utf-8") as fh:
            fh.write(text)

    # reference.py holds the simulator's reference cases: only `simulate` reads it.
    assert changed_after(lambda: append("physics/reference", "\n# edited\n")) == {"simulate"}
    # The noise model: the fit and the shards (the combine reads σ from NLSQ's output).
    assert changed_after(lambda: append("inference/noise", "\n# edited\n")) == {"nlsq", "cmc_shard"}
    # cli.py holds the command line: every stage runs through it.
    assert changed_after(lambda: append("cli", "\n# edited\n")) == set(STAGES)
    # A new import is followed: once filter imports reference, editing reference reruns it.
    new_import = "\nfrom homodyne_steps.physics import reference  # noqa: E402, F401\n"
    assert changed_after(lambda: append("stages/filter", new_import)) == {"filter"}
    assert changed_after(lambda: append("physics/reference", "# again\n")) == {"simulate", "filter"}


def test_conda_env_matches_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    env = yaml.safe_load((ROOT / "envs" / "homodyne-steps.yaml").read_text(encoding="utf-8"))

    def name(spec: str) -> str:
        return re.split(r"[<>=!~ \[]", spec, maxsplit=1)[0].lower()

    wanted = {name(d): d.replace(" ", "") for d in pyproject["project"]["dependencies"]}
    conda = {name(d): d.replace(" ", "") for d in env["dependencies"] if isinstance(d, str)}
    conda.pop("python")
    conda.pop("pip")
    assert conda == wanted


@pytest.mark.parametrize(
    "edit, message",
    [
        # the schema's verdict
        (
            lambda c: c["preprocess"]["noise_reduction"].update(sise=3),
            "preprocess.noise_reduction.sise: unknown key",
        ),
        # each value valid alone: the stage settings, built when the workflow starts
        (
            lambda c: c["cmc"]["combine"].update(rhat_acceptable=1.01),
            "dataset 'demo': cmc.combine.rhat_acceptable: must be >= rhat_good",
        ),
    ],
    ids=["schema", "settings"],
)
def test_snakemake_names_a_bad_key_and_stops(tmp_path, edit, message):
    cwd = copy_workflow(tmp_path)
    config = copy.deepcopy(CONFIG)
    edit(config)
    write_config(cwd, config)
    done = snakemake(cwd, "-n")
    assert done.returncode != 0
    text = done.stdout + done.stderr
    assert message in text and "Traceback" not in text, text[-3000:]


@pytest.mark.slow
def test_demo_runs_and_edits_rerun_only_what_is_downstream(tmp_path):
    cwd = copy_workflow(tmp_path)
    done = snakemake(cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    data = cwd / "results" / "demo" / "data"
    for name in (
        "loaded.npz",
        "loaded.json",
        "filtered.npz",
        "filter_report.json",
        "preprocessed.npz",
        "provenance.json",
        "qc_report.json",
        "qc.npz",
    ):
        assert (data / name).is_file(), name
    assert (cwd / "resources" / "demo" / "truth.json").is_file()
    assert json.loads((data / "qc_report.json").read_text())["overall"]["status"] != "fail"
    assert json.loads((data / "loaded.json").read_text())["source"]["format"] == "aps_u"
    for stage in (
        "simulate",
        "load",
        "filter",
        "preprocess",
        "qc",
        "nlsq",
        "cmc_plan",
        "cmc_combine",
    ):
        assert (cwd / "logs" / "demo" / f"{stage}.log").is_file()
    for name in (
        "parameters.json",
        "analysis_results_cmc.json",
        "diagnostics.json",
        "samples.npz",
        "posterior.nc",
        "fitted_data.npz",
        "combination_report.json",
    ):
        assert (cwd / "results" / "demo" / "cmc" / name).is_file(), name
    fit = json.loads((cwd / "results" / "demo" / "nlsq" / "parameters.json").read_text())
    truth = json.loads((cwd / "resources" / "demo" / "truth.json").read_text())
    assert fit["convergence"]["converged"] and 0.9 < fit["reduced_chi_squared"] < 1.1
    for name, p in fit["parameters"].items():
        assert abs(p["value"] - truth["params"][name]) < 3 * p["uncertainty"], name
    # Figures: every listed PNG valid, of its size, not blank; the summary; the report.
    plots = cwd / "results" / "demo" / "plots"
    counts = {kind: len(check_figure_dir(plots / kind)["figures"]) for kind in PLOT_KINDS}
    assert counts == {"data": 7, "qc": 1, "nlsq": 9, "cmc": 7}, counts
    row = json.loads((cwd / "results" / "summary.json").read_text())["rows"][0]
    assert row["dataset"] == "demo" and row["nlsq_D0"] == fit["parameters"]["D0"]["value"]
    for stage in ("plot_data", "plot_qc", "plot_nlsq", "plot_cmc"):
        assert (cwd / "logs" / "demo" / f"{stage}.log").is_file()
    built = snakemake(cwd, "--report", "report.html")
    assert built.returncode == 0, built.stdout + built.stderr
    html = (cwd / "report.html").read_text(encoding="utf-8")
    for name in ("c2_heatmaps_phi_0.0deg.png", "forest.png", "qc_summary.png", "summary.csv"):
        assert name in html, name
    assert planned_jobs(cwd) == {}

    def with_edit(edit) -> dict[str, int]:
        config = copy.deepcopy(CONFIG)
        edit(config)
        write_config(cwd, config)
        return planned_jobs(cwd)

    assert with_edit(lambda c: None) == {}  # key order and formatting do not matter
    statistical = {"method": "statistical"}
    k = json.loads((cwd / "results" / "demo" / "cmc" / "plan.json").read_text())["num_shards"]
    # Downstream of the data: NLSQ and the CMC plan rerun; the shard jobs appear once the
    # re-run plan says how many there are (checkpoint), so a dry run lists the combine.
    # The write rule and the plots of what changed rerun with it; the data/QC/NLSQ plots
    # never follow CMC edits.
    fit_plots = {"plot_nlsq": 1, "plot_cmc": 1, "write": 1}
    downstream = {"nlsq": 1, "cmc_plan": 1, "cmc_combine": 1, "all": 1, **fit_plots}
    after_nlsq = {"nlsq": 1, "cmc_shard": k, "cmc_combine": 1, "all": 1, **fit_plots}
    data_plots = {"plot_data": 1, "plot_qc": 1}
    cmc_only = {"plot_cmc": 1, "write": 1, "all": 1}
    statistical = {"method": "statistical"}
    assert with_edit(lambda c: c["preprocess"]["diagonal_correction"].update(statistical)) == {
        "preprocess": 1,
        "qc": 1,
        **data_plots,
        **downstream,
    }
    assert with_edit(lambda c: c["qc"].update(g2_ceiling=2.5)) == {
        "qc": 1,
        "plot_qc": 1,
        **downstream,
    }
    # per_angle_scaling sets the sampled-parameter count, which the plan's sizing uses
    assert with_edit(lambda c: c["nlsq"].update(per_angle_scaling="individual")) == downstream
    assert with_edit(lambda c: c["nlsq"]["solver"].update(max_iterations=90)) == after_nlsq
    assert with_edit(lambda c: c["parameters"].update(D0={"bounds": [50.0, 2e5]})) == after_nlsq
    assert with_edit(lambda c: c["datasets"]["demo"].update(L=2.5e6)) == after_nlsq
    # Editing only CMC settings reruns only CMC rules.
    assert with_edit(lambda c: c["cmc"]["sampler"].update(seed=3)) == {
        "cmc_shard": k,
        "cmc_combine": 1,
        **cmc_only,
    }
    assert with_edit(lambda c: c["cmc"]["combine"].update(method="consensus_mc")) == {
        "cmc_combine": 1,
        **cmc_only,
    }
    assert with_edit(lambda c: c["cmc"]["sharding"].update(seed=5)) == {
        "cmc_plan": 1,
        "cmc_combine": 1,
        **cmc_only,
    }
    # Plot settings rerun the plots only; the summary does not depend on them.
    assert with_edit(lambda c: c["plot"].update(dpi=120)) == {
        **data_plots,
        "plot_nlsq": 1,
        "plot_cmc": 1,
        "all": 1,
    }
    # A new dataset adds its own jobs and a row: nothing of the first dataset reruns.
    second = {**CONFIG["datasets"]["demo"], "q_tolerance": 0.2}
    assert with_edit(lambda c: c["datasets"].update(demo2=second)) == {
        "load": 1,
        "filter": 1,
        "preprocess": 1,
        "qc": 1,
        **data_plots,
        **downstream,
    }
    assert with_edit(lambda c: c["filter"].update(phi_ranges=[[-40, 100]])) == {
        "filter": 1,
        "preprocess": 1,
        "qc": 1,
        **data_plots,
        **downstream,
    }
    assert with_edit(lambda c: c["datasets"]["demo"].update(q_tolerance=0.05)) == {
        "load": 1,
        "filter": 1,
        "preprocess": 1,
        "qc": 1,
        **data_plots,
        **downstream,
    }
    assert with_edit(lambda c: c["simulate"]["demo"].update(seed=2)) == {
        "simulate": 1,
        "load": 1,
        "filter": 1,
        "preprocess": 1,
        "qc": 1,
        **data_plots,
        **downstream,
    }
    # Code edits, in a copy of the package the workflow imports: a leaf module's edit
    # reruns exactly the stages whose import closure holds it.
    write_config(cwd, CONFIG)
    shutil.copytree(ROOT / "src" / "homodyne_steps", cwd / "src" / "homodyne_steps")
    env = {**os.environ, "PYTHONPATH": str(cwd / "src")}
    assert planned_jobs(cwd, env) == {}
    with open(
        cwd / "src" / "homodyne_steps" / "plots" / "plot_common.py", "a", encoding="utf-8"
    ) as fh:
        fh.write("\n# edited\n")
    plots_only = {"plot_data": 1, "plot_qc": 1, "plot_nlsq": 1, "plot_cmc": 1, "all": 1}
    assert planned_jobs(cwd, env) == plots_only
    with open(
        cwd / "src" / "homodyne_steps" / "physics" / "reference.py", "a", encoding="utf-8"
    ) as fh:
        fh.write("\n# edited\n")
    assert planned_jobs(cwd, env) == {
        "simulate": 1,
        "load": 1,
        "filter": 1,
        "preprocess": 1,
        "qc": 1,
        **plots_only,
        **downstream,
    }
