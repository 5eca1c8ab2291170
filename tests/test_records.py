"""Typed records (io/record.py): the JSON contract between stages, read and written back
unchanged, and a wrong file named with its key."""

import json
from dataclasses import dataclass
from typing import Any

import pytest

from homodyne_steps.io.nlsq_files import NlsqAnalysis, NlsqParameters
from homodyne_steps.io.record import ABSENT, Record, RecordError
from homodyne_steps.io.serialise import SerialisationError


@dataclass(frozen=True, kw_only=True)
class Inner(Record):
    value: float
    note: str | None


@dataclass(frozen=True, kw_only=True)
class Outer(Record):
    WHAT = "outer.json"

    count: int
    flag: bool
    items: list[Inner]
    by_name: dict[str, Inner]
    extra: Any
    newer: str = ABSENT


GOOD = {
    "count": 3,
    "flag": True,
    "items": [{"value": 1, "note": None}, {"value": 2.5, "note": "x"}],
    "by_name": {"a": {"value": -1.0, "note": "y"}},
    "extra": {"anything": [1, None]},
}


def test_round_trip_keeps_values_types_and_order():
    rec = Outer.from_json(GOOD)
    assert rec.items[1].value == 2.5 and rec.by_name["a"].note == "y"
    out = rec.to_json()
    assert out == GOOD and list(out) == list(GOOD)
    # an int written as an int comes back as an int (the file is unchanged byte for byte)
    assert isinstance(out["items"][0]["value"], int)
    assert json.dumps(out) == json.dumps(GOOD)


def test_absent_keys_are_left_out_and_unknown_keys_ignored():
    rec = Outer.from_json({**GOOD, "from_the_future": 1})
    assert rec.newer is ABSENT and "newer" not in rec.to_json()
    assert Outer.from_json({**GOOD, "newer": "v2"}).to_json()["newer"] == "v2"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("flag"), "key 'flag' is missing (expected true or false)"),
        (lambda d: d.update(count=2.5), "key 'count': expected an integer, found 2.5"),
        (lambda d: d.update(count=True), "key 'count': expected an integer, found True"),
        (lambda d: d["items"][1].update(value="1"), "key 'items[1].value': expected a number"),
        (
            lambda d: d["by_name"]["a"].update(note=3),
            "key 'by_name.a.note': expected a string or null, found 3",
        ),
        (lambda d: d.update(items={}), "key 'items': expected a list"),
    ],
)
def test_a_wrong_file_names_the_file_and_the_key(edit, message):
    bad = json.loads(json.dumps(GOOD))
    edit(bad)
    with pytest.raises(RecordError) as err:
        Outer.from_json(bad, "results/x/outer.json")
    assert str(err.value).startswith("results/x/outer.json: outer.json: ")
    assert message in str(err.value)


def test_a_non_object_file_is_refused(tmp_path):
    path = tmp_path / "outer.json"
    path.write_text("[1, 2]")
    with pytest.raises(SerialisationError, match="expected a JSON object"):
        Outer.read(path)
    with pytest.raises(SerialisationError, match="is not valid JSON"):
        path.write_text('{"count": ')
        Outer.read(path)


def test_nlsq_records_of_a_real_fit_round_trip(results_tree, tmp_path):
    for name in ("sta", "lam"):
        nlsq = results_tree / name / "nlsq"
        for cls, file in (
            (NlsqParameters, "parameters.json"),
            (NlsqAnalysis, "analysis_results_nlsq.json"),
        ):
            text = (nlsq / file).read_text()
            rec = cls.read(nlsq / file)
            assert rec.to_json() == json.loads(text)
            rec.write(tmp_path / file)
            assert (tmp_path / file).read_text() == text  # byte-identical
        params = NlsqParameters.read(nlsq / "parameters.json")
        assert params.convergence.converged and params.scaling_mode == "varpro"
        assert all(p.uncertainty and p.uncertainty > 0 for p in params.parameters.values())


def test_a_truncated_nlsq_record_is_one_clear_error(results_tree, tmp_path):
    rec = json.loads((results_tree / "sta" / "nlsq" / "parameters.json").read_text())
    del rec["per_angle"][0]["contrast"]["value"]
    path = tmp_path / "parameters.json"
    path.write_text(json.dumps(rec))
    with pytest.raises(RecordError) as err:
        NlsqParameters.read(path)
    assert str(err.value) == (
        f"{path}: NLSQ parameters.json: key 'per_angle[0].contrast.value' is missing "
        "(expected a number)"
    )
