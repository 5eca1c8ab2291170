"""The typed records of the data stages' reports (``homodyne_steps.io.data_files``).

The real load → filter → preprocess → qc stages run on a small simulated file; each
report read as its record and written back gives the same bytes (same keys, same order,
same values), the attributes readers use have the types the file promises, and a
truncated or wrong report is one RecordError naming the file and the key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from homodyne_steps.data.preprocess_settings import PreprocessSettings
from homodyne_steps.errors import QualityError
from homodyne_steps.io.data_files import FilterReport, LoadedReport, QcReport
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.io.record import ABSENT, RecordError
from homodyne_steps.stages.filter import FilterSettings, filter_stage
from homodyne_steps.stages.load import load_stage
from homodyne_steps.stages.preprocess import preprocess_stage
from homodyne_steps.stages.qc import failed_report_path, qc_stage
from homodyne_steps.stages.simulate import reference_settings, simulate_file

RECORDS = {
    "loaded.json": LoadedReport,
    "filter_report.json": FilterReport,
    "qc_report.json": QcReport,
}


def _run(base: Path, hdf: Path, q: float, load: dict, filt: dict) -> Path:
    """The data stages into ``base`` (QC told to warn, so its report is always written)."""
    load_stage(hdf, q, base / "loaded.npz", base / "loaded.json", **load)
    filter_stage(
        base / "loaded.npz",
        base / "filtered.npz",
        base / "filter_report.json",
        FilterSettings.from_mapping(filt),
    )
    preprocess_stage(
        base / "filtered.npz",
        base / "preprocessed.npz",
        base / "provenance.json",
        PreprocessSettings.from_mapping({}),
    )
    qc_stage(
        base / "loaded.npz",
        base / "filtered.npz",
        base / "preprocessed.npz",
        base / "qc_report.json",
        base / "qc.npz",
        {"on_fail": "warn"},
    )
    return base


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """``file``: dt from the file, defaults; ``config``: dt from the config, a frame
    window, angles and frames dropped by the filter; ``failed``: a QC report of a run
    whose every angle was dropped (``qc_report.failed.json``)."""
    root = tmp_path_factory.mktemp("records_data")
    settings = reference_settings("static", n_frames=30, n_q_rings=1, seed=5)
    hdf, truth = simulate_file(settings, root / "resources" / "s.hdf")
    q = json.loads(Path(truth).read_text())["q"]
    out = {
        "file": _run(root / "file", hdf, q, {}, {}),
        "config": _run(
            root / "config",
            hdf,
            q,
            {"dt": 0.2, "start_frame": 2, "end_frame": 28},
            {"phi_ranges": [[-40, 40]], "frames": {"start": 1, "end": 20}},
        ),
    }
    data = XpcsData.from_npz(out["file"] / "preprocessed.npz")
    nan = data.replace(c2_exp=np.full_like(data.c2_exp, np.nan))
    failed = root / "failed"
    failed.mkdir()
    nan.to_npz(failed / "nan.npz")
    with pytest.raises(QualityError, match="no angle left"):
        qc_stage(*[failed / "nan.npz"] * 3, failed / "qc_report.json", failed / "qc.npz", {})
    out["failed"] = failed
    return out


def _files(runs: dict[str, Path]) -> list[tuple[Path, type]]:
    found = [(runs[r] / name, cls) for r in ("file", "config") for name, cls in RECORDS.items()]
    return [*found, (failed_report_path(runs["failed"] / "qc_report.json"), QcReport)]


def test_every_report_reads_and_writes_back_unchanged(runs, tmp_path):
    for path, cls in _files(runs):
        text = path.read_text(encoding="utf-8")
        record = cls.read(path)
        assert record.to_json() == json.loads(text), path
        # the same keys in the same order, at every level
        assert json.dumps(record.to_json()) == json.dumps(json.loads(text)), path
        copy = record.write(tmp_path / path.name)
        assert Path(copy).read_bytes() == path.read_bytes(), path


def test_loaded_attributes(runs):
    rec = LoadedReport.read(runs["file"] / "loaded.json")
    digest = hashlib.sha256(Path(rec.source.path).read_bytes()).hexdigest()
    assert rec.source.sha256 == digest and rec.source.format == "aps_u"
    assert rec.q.selected == pytest.approx(rec.q.target) and rec.q.grouping == "q_index"
    assert len(rec.phi_deg) == rec.n_phi == rec.shapes.c2_exp[0]
    assert rec.frames.n == rec.frames.n_in_file == 30 and isinstance(rec.frames.n, int)
    assert rec.dt_source.kind == "file" and isinstance(rec.dt_source.avg, int)
    assert rec.dt_s == pytest.approx(rec.dt_source.period_s * rec.dt_source.avg
                                     * rec.dt_source.stride)  # fmt: skip
    assert rec.skipped_bins == [] and len(rec.storage.found) == rec.n_phi

    config = LoadedReport.read(runs["config"] / "loaded.json")
    assert config.dt_s == 0.2 and config.dt_source.kind == "config"
    assert config.dt_source.period_path is ABSENT and config.dt_source.avg is ABSENT
    assert config.frames.start == 2 and config.frames.n == 27


def test_filter_attributes(runs):
    rec = FilterReport.read(runs["config"] / "filter_report.json")
    kinds = [d.kind for d in rec.dropped]
    assert "angle" in kinds and kinds[-1] == "frames"
    angle = rec.dropped[0]
    assert angle.count is ABSENT and abs(angle.phi_deg) > 40 and isinstance(angle.index, int)
    frames = [d for d in rec.dropped if d.kind == "frames"]
    assert all(d.index is ABSENT and d.count >= 1 for d in frames)
    assert rec.kept.n_frames == rec.output_shape[1] and len(rec.kept.phi_deg) == rec.output_shape[0]
    assert all(abs(phi) <= 40 for phi in rec.kept.phi_deg)


def test_qc_attributes(runs):
    rec = QcReport.read(runs["file"] / "qc_report.json")
    assert rec.overall.score == rec.checkpoints.final.score
    assert isinstance(rec.overall.passed, bool) and rec.thresholds.pass_ == 50.0
    final = rec.checkpoints.final
    assert [a.angle_index for a in final.masked.per_angle] == list(
        range(len(final.masked.per_angle))
    )

    failed = QcReport.read(failed_report_path(runs["failed"] / "qc_report.json"))
    assert failed.overall.passed is False and failed.overall.status == "fail"
    assert failed.checkpoints.final.masked.per_angle == []
    dropped = [d.angle_index for d in failed.dropped_angles]
    assert failed.checkpoints.final.masked.dropped_angles == dropped
    top = failed.checkpoints.final.issues[0]
    assert top.code == "all_angles_masked" and top.angle_index is ABSENT and top.value is ABSENT
    masked = [i for i in failed.checkpoints.final.issues if i.code == "masked"]
    assert masked and all(isinstance(i.angle_index, int) for i in masked)
    assert all(d.reason for d in failed.dropped_angles)


def _corrupt(src: Path, dst: Path, edit) -> Path:
    mapping = json.loads(src.read_text())
    edit(mapping)
    dst.write_text(json.dumps(mapping))
    return dst


@pytest.mark.parametrize(
    "name,edit,key,expected",
    [
        ("loaded.json", lambda m: m.pop("dt_source"), "dt_source", "is missing"),
        ("loaded.json", lambda m: m["source"].pop("sha256"), "source.sha256", "is missing"),
        ("loaded.json", lambda m: m["frames"].update(n=27.5), "frames.n", "an integer"),
        ("loaded.json", lambda m: m.update(phi_deg="0, 45"), "phi_deg", "a list"),
        ("filter_report.json", lambda m: m.update(kept=[]), "kept", "an object"),
        ("filter_report.json", lambda m: m["dropped"][0].pop("reason"), "dropped[0].reason",
         "is missing"),
        ("qc_report.json", lambda m: m.pop("overall"), "overall", "is missing"),
        ("qc_report.json", lambda m: m["thresholds"].pop("pass"), "thresholds.pass", "is missing"),
        ("qc_report.json", lambda m: m["overall"].update(passed="yes"), "overall.passed",
         "true or false"),
        ("qc_report.json", lambda m: m["checkpoints"]["final"].pop("score"),
         "checkpoints.final.score", "is missing"),
        ("qc_report.json", lambda m: m["checkpoints"]["raw"]["masked"]["per_angle"][0]
         .update(masked=None), "checkpoints.raw.masked.per_angle[0].masked", "an integer"),
    ],
)  # fmt: skip
def test_a_corrupted_report_names_the_file_and_the_key(runs, tmp_path, name, edit, key, expected):
    bad = _corrupt(runs["file"] / name, tmp_path / name, edit)
    with pytest.raises(RecordError) as err:
        RECORDS[name].read(bad)
    message = str(err.value)
    assert str(bad) in message and repr(key) in message and expected in message, message
    assert RECORDS[name].WHAT in message


def test_a_float_field_written_as_an_integer_stays_an_integer(runs, tmp_path):
    def edit(m):
        m["kept"]["t_first_s"] = 0

    path = _corrupt(runs["file"] / "filter_report.json", tmp_path / "f.json", edit)
    rec = FilterReport.read(path)
    assert rec.kept.t_first_s == 0 and type(rec.kept.t_first_s) is int
    rec.write(tmp_path / "back.json")
    assert json.loads((tmp_path / "back.json").read_text())["kept"]["t_first_s"] == 0
    assert '"t_first_s": 0,' in (tmp_path / "back.json").read_text()


def test_the_qc_plot_refuses_what_is_not_a_qc_report(runs):
    from homodyne_steps.plots.plot_common import PlotError
    from homodyne_steps.plots.plot_qc import read_qc_report

    loaded = runs["file"] / "loaded.json"
    with pytest.raises(PlotError) as err:
        read_qc_report(loaded)
    message = str(err.value)
    assert "not a QC report" in message and str(loaded) in message and "'schema_version'" in message
    with pytest.raises(PlotError, match="QC report: cannot read JSON file"):
        read_qc_report(runs["file"] / "missing.json")
    assert read_qc_report(runs["file"] / "qc_report.json").overall.passed is True
