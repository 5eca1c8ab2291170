"""tools/compare_results.py: the check that a refactor changed no result."""

import importlib.util
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_results", ROOT / "tools/compare_results.py")
compare_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_results)


def _tree(root: Path, d0: float, duration: float, c2_last: float) -> Path:
    (root / "demo" / "nlsq").mkdir(parents=True)
    record = {"parameters": {"D0": {"value": d0}}, "duration_s": duration, "nan": None}
    (root / "demo" / "nlsq" / "parameters.json").write_text(json.dumps(record))
    c2 = np.array([[1.0, 2.0], [np.nan, c2_last]])
    np.savez(root / "demo" / "qc.npz", c2_exp=c2)
    return root


def test_identical_trees_pass_and_timings_are_skipped(tmp_path):
    a = _tree(tmp_path / "a", 1e4, 3.0, 1.5)
    b = _tree(tmp_path / "b", 1e4, 7.0, 1.5)  # only the duration differs; NaN == NaN
    assert compare_results.compare(a, b) == []


def test_a_changed_value_or_array_or_file_is_reported(tmp_path):
    a = _tree(tmp_path / "a", 1e4, 3.0, 1.5)
    b = _tree(tmp_path / "b", 1e4 * (1 + 1e-15), 3.0, 1.5 + 1e-12)
    (b / "demo" / "extra.json").write_text("{}")
    diffs = compare_results.compare(a, b)
    assert any("parameters.json.parameters.D0.value" in d for d in diffs)
    assert any("qc.npz:c2_exp" in d for d in diffs)
    assert any("extra.json: only in B" in d for d in diffs)
