"""The write stage: one summary row per dataset whose numbers are those of the datasets'
records, a dataset added to the list adds a row and changes no other, clear errors.

Inputs are the real stage outputs of ``conftest.results_tree``. That adding a dataset to
the config reruns none of the other datasets' stages is checked on the finished demo
workflow (``tests/test_workflow.py``, slow).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import DATASETS
from homodyne_steps.cli import main
from homodyne_steps.physics.registry import REGISTRY
from homodyne_steps.stages.write import SummaryError, write_stage


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def summary(results_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("summary")
    rows = write_stage(results_tree, sorted(DATASETS), out / "summary.csv", out / "summary.json")
    return out, rows


def test_values_are_those_of_the_records(results_tree, summary):
    out, _ = summary
    js, table = load(out / "summary.json"), read_csv(out / "summary.csv")
    assert [r["dataset"] for r in table] == sorted(DATASETS)
    assert [c["name"] for c in js["columns"]] == list(table[0])
    for row_json, row_csv in zip(js["rows"], table, strict=True):
        name = row_json["dataset"]
        nlsq = load(results_tree / name / "nlsq" / "parameters.json")
        cmc = load(results_tree / name / "cmc" / "parameters.json")
        qc = load(results_tree / name / "data" / "qc_report.json")
        info = load(results_tree / name / "nlsq" / "analysis_results_nlsq.json")["dataset_info"]
        assert row_json["analysis_mode"] == nlsq["analysis_mode"] == DATASETS[name]["mode"]
        assert row_json["q"] == info["q"] and row_json["n_frames"] == info["n_time_points"]
        assert row_json["qc_score"] == qc["overall"]["score"]
        assert row_json["nlsq_reduced_chi2"] == nlsq["reduced_chi_squared"]
        names = REGISTRY.physical_names(nlsq["analysis_mode"])
        for n in REGISTRY.physical_names("laminar_flow"):
            if n not in names:  # a parameter the mode does not have: empty
                assert row_json[f"nlsq_{n}"] is None and row_csv[f"nlsq_{n}"] == ""
                continue
            pairs = {
                f"nlsq_{n}": nlsq["parameters"][n]["value"],
                f"nlsq_{n}_sd": nlsq["parameters"][n]["uncertainty"],
                f"cmc_{n}_mean": cmc["parameters"][n]["mean"],
                f"cmc_{n}_sd": cmc["parameters"][n]["std"],
                f"cmc_{n}_hdi_3%": cmc["parameters"][n]["hdi_3%"],
                f"cmc_{n}_hdi_97%": cmc["parameters"][n]["hdi_97%"],
                f"cmc_{n}_r_hat": cmc["parameters"][n]["r_hat"],
                f"cmc_{n}_ess_bulk": cmc["parameters"][n]["ess_bulk"],
            }
            for col, value in pairs.items():
                assert row_json[col] == value, col
                assert float(row_csv[col]) == value, col  # exact: shortest round-trip form
        assert row_json["cmc_status"] == cmc["convergence"]["status"]
        assert row_json["quality"] in ("good", "warning", "poor")
        assert Path(row_json["nlsq_dir"]) == results_tree / name / "nlsq"
        assert Path(row_json["plots_dir"]) == results_tree / name / "plots"


def test_columns_have_units():
    from homodyne_steps.stages.write import columns

    cols = {c["name"]: c for c in columns(["D0", "alpha"])}
    assert cols["nlsq_D0"]["unit"] == "Å²/s" and cols["cmc_D0_hdi_97%"]["unit"] == "Å²/s"
    assert cols["nlsq_alpha"]["unit"] == "" and cols["cmc_D0_r_hat"]["unit"] == ""
    assert cols["q"]["unit"] == "1/Å"


def test_adding_a_dataset_adds_a_row_and_changes_no_other(results_tree, tmp_path):
    one = write_stage(results_tree, ["sta"], tmp_path / "a.csv", tmp_path / "a.json")
    two = write_stage(results_tree, ["sta", "lam"], tmp_path / "b.csv", tmp_path / "b.json")
    assert len(one) == 1 and len(two) == 2
    first = {k: v for k, v in two[0].items() if k in one[0]}
    assert first == one[0]
    # Columns of the laminar parameters appear once a laminar dataset is in the table.
    assert "nlsq_phi0" not in one[0] and two[1]["nlsq_phi0"] is not None


def test_flags_name_what_needs_attention(results_tree, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(results_tree / "sta", results / "sta")
    shutil.rmtree(results / "sta" / "cmc")  # CMC not run
    rec = load(results / "sta" / "nlsq" / "parameters.json")
    rec["parameters"]["D_offset"]["at_bound"] = True
    rec["parameters"]["alpha"]["weakly_identified"] = True
    (results / "sta" / "nlsq" / "parameters.json").write_text(json.dumps(rec))
    row = write_stage(results, ["sta"], tmp_path / "s.csv", tmp_path / "s.json")[0]
    assert "cmc_not_run" in row["flags"] and "nlsq_at_bound:D_offset" in row["flags"]
    assert "nlsq_weakly_identified:alpha" in row["flags"]
    assert row["nlsq_uncertainty"] == "independent"  # auto, on model data: independent
    assert row["cmc_status"] is None and row["cmc_D0_mean"] is None
    assert read_csv(tmp_path / "s.csv")[0]["cmc_D0_mean"] == ""


def test_scaling_out_of_range_is_flagged(results_tree, tmp_path):
    """A real NLSQ record whose angle 1 has c2 rising with lag (varpro contrast < 0): the
    summary names the angle and the quantity, and the quality is at least warning even
    when the record's own quality flag says good."""
    from homodyne_steps.inference.nlsq_settings import NlsqSettings
    from homodyne_steps.io.dataset import XpcsData
    from homodyne_steps.stages.nlsq_stage import nlsq_stage

    results = tmp_path / "results"
    shutil.copytree(results_tree / "sta", results / "sta")
    shutil.rmtree(results / "sta" / "cmc")
    nlsq_dir = results / "sta" / "nlsq"
    data = XpcsData.from_npz(results / "sta" / "data" / "qc.npz")
    c2 = np.array(data.c2_exp)
    c2[1] = 2.0 * np.median(c2[1]) - c2[1]  # mirrored: the correlation rises with lag
    data.replace(c2_exp=c2).to_npz(tmp_path / "mirrored.npz")
    L = load(nlsq_dir / "analysis_results_nlsq.json")["dataset_info"]["L"]
    nlsq_stage(tmp_path / "mirrored.npz", nlsq_dir, mode="static", L=L, settings=NlsqSettings())
    phi = data.phi_angles_list[1]
    (flag,) = load(nlsq_dir / "parameters.json")["per_angle"][1]["flags"]
    assert flag["flag"] == "contrast_out_of_range" and flag["value"] < 0
    row = write_stage(results, ["sta"], tmp_path / "s.csv", tmp_path / "s.json")[0]
    assert f"nlsq_scaling_out_of_range:contrast@phi={phi:g}" in row["flags"].split(";")
    assert row["quality"] in ("warning", "poor")
    nested = load(tmp_path / "s.json")["datasets"][0]
    assert nested["nlsq"]["quality_flag"] == "warning"
    # An older record that rated itself good is still at least a warning here.
    analysis = load(nlsq_dir / "analysis_results_nlsq.json")
    analysis["fit_quality"]["quality_flag"] = "good"
    (nlsq_dir / "analysis_results_nlsq.json").write_text(json.dumps(analysis))
    write_stage(results, ["sta"], tmp_path / "s.csv", tmp_path / "s.json")
    assert load(tmp_path / "s.json")["datasets"][0]["nlsq"]["quality_flag"] == "warning"


def test_missing_records_are_clear_errors(results_tree, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(results_tree / "sta", results / "sta")
    (results / "sta" / "nlsq" / "parameters.json").unlink()
    with pytest.raises(SummaryError, match=r"'sta'.*nlsq/parameters.json does not exist"):
        write_stage(results, ["sta"], tmp_path / "s.csv", tmp_path / "s.json")
    argv = [
        "write",
        "--results-dir",
        str(results),
        "--datasets",
        "sta",
        "nope",
        "--out-csv",
        str(tmp_path / "s.csv"),
        "--out-json",
        str(tmp_path / "s.json"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "parameters.json" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "s.json").exists()
    with pytest.raises(SummaryError, match="more than once"):
        write_stage(results_tree, ["sta", "sta"], tmp_path / "s.csv", tmp_path / "s.json")


def test_cli_writes_both_files(results_tree, tmp_path, capsys):
    argv = [
        "write",
        "--results-dir",
        str(results_tree),
        "--datasets",
        *sorted(DATASETS),
        "--out-csv",
        str(tmp_path / "s.csv"),
        "--out-json",
        str(tmp_path / "s.json"),
    ]
    assert main(argv) == 0
    assert f"wrote {len(DATASETS)} rows" in capsys.readouterr().out
    assert len(read_csv(tmp_path / "s.csv")) == len(load(tmp_path / "s.json")["rows"])
