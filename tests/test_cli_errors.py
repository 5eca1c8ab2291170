"""Bad input through the command line: one clear line, exit 2, no partial output."""

import json

import h5py
import numpy as np
import pytest

from homodyne_steps.cli import main
from homodyne_steps.stages.simulate import reference_settings, simulate_file


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    out, _ = simulate_file(reference_settings("static", n_frames=30), d / "demo.hdf")
    return out


def run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_clean_failure(code, err, outputs, *needles):
    assert code == 2
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    for path in outputs:
        assert not path.exists(), f"partial output {path} left behind"


def load_args(tmp_path, source, settings):
    outs = (tmp_path / "loaded.npz", tmp_path / "loaded.json")
    argv = ["load", "--input", str(source), "--out-npz", str(outs[0]),
            "--out-json", str(outs[1]), "--settings", json.dumps(settings)]  # fmt: skip
    return argv, outs


def broken_files(tmp_path):
    text = tmp_path / "notes.hdf"
    text.write_text("not an HDF5 file")
    unknown = tmp_path / "unknown.hdf"
    with h5py.File(unknown, "w") as h5:
        h5.create_dataset("entry/data", data=np.zeros(3))
    one_d = tmp_path / "old1d.hdf"
    with h5py.File(one_d, "w") as h5:
        h5["xpcs/dqlist"] = np.array([0.0054, 0.0054])
        h5["xpcs/dphilist"] = np.array([[0.0, 45.0]])
        h5.create_group("exchange/C2T_all")["g2_00001"] = np.triu(np.ones((5, 5), np.float32))
    return {
        "missing": (tmp_path / "absent.hdf", "absent.hdf"),
        "not HDF5": (text, "notes.hdf"),
        "unknown layout": (unknown, "entry"),
        "1-D dqlist": (one_d, "dqlist"),
    }


@pytest.mark.parametrize("case", ["missing", "not HDF5", "unknown layout", "1-D dqlist"])
def test_load_rejects_bad_files(tmp_path, capsys, case):
    source, needle = broken_files(tmp_path)[case]
    argv, outs = load_args(tmp_path, source, {"q": 0.0054})
    assert_clean_failure(*run(capsys, *argv), outs, needle)


@pytest.mark.parametrize(
    "settings,needles",
    [
        ({"q": 0.02}, ["0.02", "0.0054"]),  # no ring near the target: lists available q
        ({"q": 0.0054, "frames": {"start": 9, "end": 4}}, ["start"]),
        ({"q": 0.0054, "frames": {"start": 1, "end": 99}}, ["30"]),
        ({"q": 0.0054, "frmes": {}}, ["load.frmes: unknown key"]),
        ({"q": 0.0054, "dt": -1.0}, ["dt"]),
    ],
)
def test_load_rejects_bad_settings(tmp_path, capsys, demo_file, settings, needles):
    argv, outs = load_args(tmp_path, demo_file, settings)
    assert_clean_failure(*run(capsys, *argv), outs, *needles)


def test_dt_missing_everywhere(tmp_path, capsys, demo_file):
    stripped = tmp_path / "nodt.hdf"
    stripped.write_bytes(demo_file.read_bytes())
    with h5py.File(stripped, "a") as h5:
        del h5["entry/instrument/detector_1/frame_time"]
    argv, outs = load_args(tmp_path, stripped, {"q": 0.0054})
    assert_clean_failure(*run(capsys, *argv), outs, "dt")
    argv, outs = load_args(tmp_path, stripped, {"q": 0.0054, "dt": 0.1})
    assert run(capsys, *argv)[0] == 0 and all(p.exists() for p in outs)


def test_filter_that_removes_everything(tmp_path, capsys, demo_file):
    argv, _ = load_args(tmp_path, demo_file, {"q": 0.0054})
    assert run(capsys, *argv)[0] == 0
    outs = (tmp_path / "filtered.npz", tmp_path / "filter.json")
    code, err = run(capsys, "filter", "--input", str(tmp_path / "loaded.npz"),
                    "--out-npz", str(outs[0]), "--out-json", str(outs[1]),
                    "--settings", json.dumps({"phi_ranges": [[150, 160]]}))  # fmt: skip
    assert_clean_failure(code, err, outs, "filter.phi_ranges removes every angle", "45.0")


def test_bad_settings_json(tmp_path, capsys, demo_file):
    argv, outs = load_args(tmp_path, demo_file, {})
    argv[-1] = "{not json"
    assert_clean_failure(*run(capsys, *argv), outs, "not valid JSON")
