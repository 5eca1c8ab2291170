"""The plot stages: every figure is a readable PNG of its declared size, large matrices
are block-mean downsampled, bad input gives one clear error, and the data/QC/NLSQ plots
never wait for CMC.

Inputs are the real stage outputs of ``conftest.results_tree`` (two small simulated
datasets, laminar flow and static).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import DATASETS, NUM_SHARDS, check_figure_dir, check_png, png_size
from homodyne_steps.cli import main
from homodyne_steps.errors import ConfigError
from homodyne_steps.plots.plot_cmc import plot_cmc_stage
from homodyne_steps.plots.plot_common import (
    HeatmapRow,
    PlotError,
    PlotSettings,
    angle_file_names,
    block_mean,
    diagonal_means,
)
from homodyne_steps.plots.plot_data import plot_data_stage
from homodyne_steps.plots.plot_nlsq import plot_nlsq_stage
from homodyne_steps.plots.plot_qc import PAGE_SIZE, plot_qc_stage

ROOT = Path(__file__).resolve().parents[1]


def phis(results: Path, name: str) -> list[float]:
    return json.loads((results / name / "nlsq" / "analysis_results_nlsq.json").read_text())[
        "dataset_info"
    ]["phi_deg"]


def shard_files(results: Path, name: str) -> list[Path]:
    return sorted((results / name / "cmc" / f"K{NUM_SHARDS}" / "shards").glob("*.nc"))


# ---------------------------------------------------------------------------------------
# Display helpers
# ---------------------------------------------------------------------------------------
def test_block_mean_averages_blocks_and_keeps_small_matrices():
    a = np.arange(36, dtype=float).reshape(6, 6)
    same, f = block_mean(a, 6)
    assert f == 1 and np.shares_memory(same, a)
    out, f = block_mean(a, 3)
    assert f == 2 and out.shape == (3, 3)
    assert out[0, 0] == np.mean(a[:2, :2]) and out[2, 1] == np.mean(a[4:, 2:4])
    # A partial last block averages what it has; NaN elements are skipped.
    b = np.ones((5, 5))
    b[0, 0] = np.nan
    out, f = block_mean(b, 2)
    assert f == 3 and out.shape == (2, 2) and np.all(out == 1.0)


def test_block_mean_does_not_alias():
    """A checkerboard at the pixel scale averages to its mean; striding (plotting every
    f-th element) would show a false uniform 1."""
    n = 1000
    board = (np.add.outer(np.arange(n), np.arange(n)) % 2).astype(float)
    out, f = block_mean(board, 500)
    assert f == 2 and out.shape == (500, 500)
    np.testing.assert_allclose(out, 0.5)
    assert np.all(board[::f, ::f] == 0)  # what striding would draw
    big, f = block_mean(np.random.default_rng(0).normal(size=(1234, 1234)), 500)
    assert max(big.shape) <= 500 and f == 3


def test_diagonal_means_are_g2_vs_lag():
    c = np.add.outer(np.zeros(4), np.zeros(4)) + np.abs(np.subtract.outer(range(4), range(4)))
    np.testing.assert_allclose(diagonal_means(c), [0, 1, 2, 3])
    stacked = diagonal_means(np.stack([c, 2 * c]))
    np.testing.assert_allclose(stacked[1], [0, 2, 4, 6])


def test_angle_file_names_follow_the_seed_and_stay_unique():
    assert angle_file_names("c2_heatmaps", [-30.0, 0.0, 22.5]) == [
        "angles/c2_heatmaps_phi_-30.0deg.png",
        "angles/c2_heatmaps_phi_0.0deg.png",
        "angles/c2_heatmaps_phi_22.5deg.png",
    ]
    assert len(set(angle_file_names("x", [10.0, 10.0]))) == 2


@pytest.mark.parametrize(
    "mapping,message",
    [
        ({"dpix": 100}, "plot.dpix: unknown key"),
        ({"dpi": 10}, "plot.dpi: must be >= 30"),
        ({"dpi": 1000}, "plot.dpi: must be <= 600"),
        ({"max_pixels": "many"}, "plot.max_pixels: expected an integer"),
    ],
)
def test_settings_errors_name_the_key(mapping, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        PlotSettings.from_mapping(mapping)


# ---------------------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------------------
def test_plot_data_figures(results_tree, tmp_path):
    data = results_tree / "lam" / "data"
    index = plot_data_stage(data / "filtered.npz", data / "preprocessed.npz", tmp_path / "d")
    check_figure_dir(tmp_path / "d")
    assert_rule_declares("plot_data", index)
    names = [f["file"] for f in index["figures"]]
    assert names == [*angle_file_names("c2_data", phis(results_tree, "lam")), "g2_vs_lag.png"]
    w, h = (round(x * 100) for x in HeatmapRow.SIZE)
    assert png_size(tmp_path / "d" / names[0]) == (w, h)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_plot_nlsq_figures(results_tree, tmp_path, name):
    index = plot_nlsq_stage(results_tree / name / "nlsq", tmp_path / "n")
    check_figure_dir(tmp_path / "n")
    assert_rule_declares("plot_nlsq", index)
    files = [f["file"] for f in index["figures"]]
    heatmaps = angle_file_names("c2_heatmaps", phis(results_tree, name))
    assert files == [
        *heatmaps,
        "g2_fit_vs_lag.png",
        "residual_histogram.png",
        "transport_coefficients.png",
    ]
    # D(t) alone for static data; D(t) and the shear rate side by side under flow.
    width = png_size(tmp_path / "n" / "transport_coefficients.png")[0]
    assert width == (1300 if DATASETS[name]["mode"] == "laminar_flow" else 700)


def test_undefined_nlsq_covariance_draws_no_band(results_tree, tmp_path):
    # A not_identified fit writes null covariance entries: its D(t) panel must show no
    # band (a zero-width band would claim a perfectly known D(t)), the shear panel keeps
    # its own, and the stage still writes every figure.
    nlsq = tmp_path / "nlsq"
    shutil.copytree(results_tree / "lam" / "nlsq", nlsq)
    path = nlsq / "analysis_results_nlsq.json"
    analysis = json.loads(path.read_text())
    names, matrix = analysis["covariance"]["names"], analysis["covariance"]["matrix"]
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if {a, b} & {"D0", "D_offset"}:
                matrix[i][j] = None
    path.write_text(json.dumps(analysis))
    plot_nlsq_stage(nlsq, tmp_path / "n")
    check_figure_dir(tmp_path / "n")

    from homodyne_steps.io.nlsq_files import NlsqAnalysis, NlsqParameters
    from homodyne_steps.physics.registry import REGISTRY
    from homodyne_steps.plots.plot_common import plt
    from homodyne_steps.plots.plot_nlsq import _covariance, transport_coefficients

    params = NlsqParameters.read(nlsq / "parameters.json").parameters
    cov = _covariance(NlsqAnalysis.from_json(analysis), REGISTRY.physical_names("laminar_flow"))
    fig, _ = transport_coefficients(params, cov, np.linspace(0.1, 10, 50), "laminar_flow")
    d_panel, shear_panel = fig.axes[0], fig.axes[1]
    assert len(d_panel.collections) == 0 and len(shear_panel.collections) == 2
    plt.close(fig)


def test_plot_qc_page_with_issues_and_repairs(results_tree, tmp_path):
    from homodyne_steps.io.dataset import XpcsData
    from homodyne_steps.stages.qc import qc_stage

    data = results_tree / "sta" / "data"
    pre = XpcsData.from_npz(data / "preprocessed.npz")
    c2 = pre.c2_exp.copy()
    c2[0, 3:9, 20:24] = np.nan  # holes, repaired by auto_repair
    c2[0, 20:24, 3:9] = np.nan
    c2[1] *= 100.0  # percent: a scale problem
    pre.replace(c2_exp=c2).to_npz(tmp_path / "bad.npz")
    qc_stage(
        data / "loaded.npz",
        data / "filtered.npz",
        tmp_path / "bad.npz",
        tmp_path / "qc.json",
        tmp_path / "qc.npz",
        {"on_fail": "warn"},
    )
    report = json.loads((tmp_path / "qc.json").read_text())
    assert report["repairs"] and report["checkpoints"]["preprocessed"]["issues"]
    for label, source in (("clean", data / "qc_report.json"), ("bad", tmp_path / "qc.json")):
        index = plot_qc_stage(source, tmp_path / label, dataset="sta")
        check_figure_dir(tmp_path / label)
        assert_rule_declares("plot_qc", index)
        assert index["figures"][0]["size_px"] == [round(x * 100) for x in PAGE_SIZE]


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_plot_cmc_figures(results_tree, tmp_path, name):
    base = results_tree / name
    index = plot_cmc_stage(
        base / "cmc",
        shard_files(results_tree, name),
        tmp_path / "c",
        nlsq_parameters=base / "nlsq" / "parameters.json",
    )
    check_figure_dir(tmp_path / "c")
    assert_rule_declares("plot_cmc", index)
    assert [f["file"] for f in index["figures"]] == [
        "trace.png",
        "rank.png",
        "pair.png",
        "forest.png",
        "energy.png",
        "ess.png",
        "shard_posteriors.png",
    ]


def test_dpi_and_shard_limit_settings(results_tree, tmp_path):
    base = results_tree / "sta"
    s = PlotSettings(dpi=60, max_shards=2)
    index = plot_cmc_stage(base / "cmc", shard_files(results_tree, "sta"), tmp_path, s)
    check_figure_dir(tmp_path)
    # energy: one panel per shown shard (2 of 3), at 60 % of the default resolution
    w, h = index["figures"][4]["size_px"]
    assert (w, h) == (round(3.6 * 2 * 60), round((2.7 + 1.2) * 60))


def test_a_rerun_removes_figures_that_are_no_longer_made(results_tree, tmp_path):
    from homodyne_steps.io.dataset import XpcsData

    data = results_tree / "sta" / "data"
    out = tmp_path / "plots"
    plot_data_stage(data / "filtered.npz", data / "preprocessed.npz", out)
    first = sorted(p.name for p in out.glob("**/*.png"))
    for src in ("filtered", "preprocessed"):  # drop the last angle, as a new filter would
        d = XpcsData.from_npz(data / f"{src}.npz")
        d.select_angles(slice(0, -1)).to_npz(tmp_path / f"{src}.npz")
    plot_data_stage(tmp_path / "filtered.npz", tmp_path / "preprocessed.npz", out)
    second = sorted(p.name for p in out.glob("**/*.png"))
    assert len(second) == len(first) - 1 and set(second) < set(first)
    check_figure_dir(out)


def test_large_matrices_are_downsampled_for_display(tmp_path):
    """1200 frames: the heatmaps are drawn from ≤ max_pixels block means (title says so)."""
    from homodyne_steps.io.dataset import XpcsData

    n, rng = 1200, np.random.default_rng(1)
    t = 0.1 * np.arange(1, n + 1)
    lag = np.abs(np.subtract.outer(t, t))
    c2 = (1 + 0.3 * np.exp(-lag / 5))[None] + 0.01 * rng.standard_normal((1, n, n))
    c2 = 0.5 * (c2 + c2.transpose(0, 2, 1))
    d = XpcsData(np.array([0.0054]), np.array([0.0]), t, t.copy(), c2.astype(np.float32), 0.1)
    d.to_npz(tmp_path / "a.npz")
    row = HeatmapRow(max_pixels=400)
    try:
        row.show([c2[0]] * 3, t, [(1, 1.3)] * 3, ["viridis"] * 3, ["a", "b", "c"], ["x", "y"], "")
        assert all(max(im.get_array().shape) <= 400 for im in row.images)
        assert "block mean 3×3" in row.axes[0].get_title()
    finally:
        row.close()
    plot_data_stage(
        tmp_path / "a.npz", tmp_path / "a.npz", tmp_path / "out", PlotSettings(max_pixels=400)
    )
    check_png(tmp_path / "out" / "angles" / "c2_data_phi_0.0deg.png")


# ---------------------------------------------------------------------------------------
# Bad input: one line naming the file, exit status 2, nothing written
# ---------------------------------------------------------------------------------------
def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def test_cli_errors_name_the_file(results_tree, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    out = tmp_path / "out"
    code, err = run_cli(capsys, "plot-nlsq", "--nlsq-dir", str(missing), "--out-dir", str(out))
    assert code == 2 and "nowhere" in err and len(err.splitlines()) == 1, err
    bad_nc = tmp_path / "0.nc"
    bad_nc.write_text("not netCDF")
    code, err = run_cli(
        capsys,
        "plot-cmc",
        "--cmc-dir",
        str(results_tree / "sta" / "cmc"),
        "--shards",
        str(bad_nc),
        "--out-dir",
        str(out),
    )
    assert code == 2 and "0.nc" in err and "Traceback" not in err, err
    code, err = run_cli(
        capsys,
        "plot-qc",
        "--input",
        str(results_tree / "sta" / "nlsq" / "parameters.json"),
        "--out-dir",
        str(out),
    )
    assert code == 2 and "not a QC report" in err, err
    code, err = run_cli(
        capsys,
        "plot-data",
        "--filtered",
        str(tmp_path / "f.npz"),
        "--preprocessed",
        str(tmp_path / "p.npz"),
        "--out-dir",
        str(out),
        "--settings",
        '{"dpi": "high"}',
    )
    assert code == 2 and "plot.dpi" in err, err
    assert not out.exists() or not list(out.glob("*.png"))
    shutil.copytree(results_tree / "sta" / "nlsq", tmp_path / "nlsq")
    (tmp_path / "nlsq" / "fitted_data.npz").unlink()
    with pytest.raises(PlotError, match="fitted_data.npz"):
        plot_nlsq_stage(tmp_path / "nlsq", out)


def test_cli_writes_the_figures(results_tree, tmp_path, capsys):
    code = main(
        [
            "plot-qc",
            "--input",
            str(results_tree / "lam" / "data" / "qc_report.json"),
            "--dataset",
            "lam",
            "--out-dir",
            str(tmp_path),
            "--settings",
            '{"dpi": 80}',
        ]
    )
    assert code == 0 and "wrote 1 figures" in capsys.readouterr().out
    check_png(tmp_path / "qc_summary.png", (880, 600))


# ---------------------------------------------------------------------------------------
# The workflow: plot rules, report registration, DAG
# ---------------------------------------------------------------------------------------
def test_data_qc_and_nlsq_plots_do_not_wait_for_cmc(tmp_path):
    """So they run beside the CMC shards: none of their inputs is a CMC output."""
    from test_workflow import copy_workflow, snakemake

    cwd = copy_workflow(tmp_path)
    done = snakemake(cwd, "-n", "-p", "--forceall")
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout + done.stderr
    jobs = re.findall(r"rule (plot_\w+):\n(.*?)\n\n", text, re.S)
    seen = {}
    for rule, body in jobs:
        inputs = re.search(r"input: (.*)", body).group(1)
        seen[rule] = inputs
    assert set(seen) == {"plot_data", "plot_qc", "plot_nlsq", "plot_cmc"}, seen
    for rule in ("plot_data", "plot_qc", "plot_nlsq"):
        assert "/cmc/" not in seen[rule], (rule, seen[rule])
    assert "posterior.nc" in seen["plot_cmc"]
    assert re.search(r"rule write:\n", text)


def declared_figures(rule: str) -> tuple[set[str], bool]:
    """The figures ``rule`` in plots.smk declares: fixed names, and whether it declares
    the per-angle folder."""
    text = (ROOT / "workflow" / "rules" / "plots.smk").read_text(encoding="utf-8")
    body = text.split(f"rule {rule}:", 1)[1].split("\nrule ", 1)[0]
    kind = rule.removeprefix("plot_")
    fixed = set(re.findall(rf'figure\("{kind}", "(\w+)"\)', body))
    assert f'index="results/{{dataset}}/plots/{kind}/figures.json"' in body, rule
    return {f"{name}.png" for name in fixed}, f'angle_figures("{kind}")' in body


def assert_rule_declares(rule: str, index: dict) -> None:
    """The workflow rule names every figure its stage wrote, and no other."""
    files = [f["file"] for f in index["figures"]]
    fixed, angles = declared_figures(rule)
    assert {f for f in files if "/" not in f} == fixed, (rule, files)
    assert any(f.startswith("angles/") for f in files) == angles, (rule, files)


def test_plot_outputs_are_registered_for_the_report():
    for rule in ("plot_data", "plot_qc", "plot_nlsq", "plot_cmc"):
        kind = rule.removeprefix("plot_")
        fixed, angles = declared_figures(rule)
        captions = [f"plot_{kind}_{name.removesuffix('.png')}.rst" for name in fixed]
        captions += [f"plot_{kind}_angles.rst"] if angles else []
        for caption in captions:
            assert (ROOT / "workflow" / "report" / caption).is_file(), caption
    # the two helpers (common.smk) put every figure into the report
    text = (ROOT / "workflow" / "rules" / "common.smk").read_text(encoding="utf-8")
    assert text.count("return report(") == 2 and 'patterns=["{name}.png"]' in text
