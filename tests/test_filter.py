"""The filter stage: angle/q/frame selection, t = 0 exclusion, quality filter, records."""

import json

import numpy as np
import pytest

from homodyne_steps.errors import ConfigError
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.stages.filter import FilterSettings, apply_filter, filter_stage, in_phi_ranges


def make_data(phi=(-170.0, -30.0, 0.0, 30.0, 90.0, 175.0), n_t=30, dt=0.1):
    rng = np.random.default_rng(0)
    t = dt * np.arange(n_t)
    lag = np.abs(t[:, None] - t[None, :])
    c2 = np.empty((len(phi), n_t, n_t))
    for k in range(len(phi)):
        noise = 0.005 * rng.standard_normal((n_t, n_t))
        c2[k] = 1.0 + 0.3 * np.exp(-lag / (0.5 + 0.1 * k)) + (noise + noise.T) / 2
    return XpcsData(
        wavevector_q_list=np.full(len(phi), 0.0054),
        phi_angles_list=np.array(phi),
        t1=t,
        t2=t.copy(),
        c2_exp=c2,
        dt=dt,
    )


def test_phi_ranges_including_wrap_across_180():
    phi = np.array([-179.0, -170.0, -30.0, 0.0, 170.0, 180.0, 190.0, 350.0])
    np.testing.assert_array_equal(in_phi_ranges(phi, [(160.0, -160.0)]), [1, 1, 0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(in_phi_ranges(phi, [(-40.0, 10.0)]), [0, 0, 1, 1, 0, 0, 0, 1])
    np.testing.assert_array_equal(
        in_phi_ranges(phi, [(-40.0, -20.0), (165.0, 175.0)]), [0, 0, 1, 0, 1, 0, 0, 0]
    )


def test_filter_selects_and_records():
    data = make_data()
    s = FilterSettings.from_mapping({"phi_ranges": [[-45, 45]], "frames": {"start": 1, "end": 20}})
    out, record = apply_filter(data, s)
    np.testing.assert_array_equal(out.phi_angles_list, [-30.0, 0.0, 30.0])
    # frames 1..20 kept, then t = 0 dropped: 19 frames starting at dt, times not re-based
    assert out.n_t == 19 and out.t1[0] == pytest.approx(0.1)
    np.testing.assert_array_equal(out.c2_exp, data.c2_exp[1:4, 1:20, 1:20])
    reasons = [d["reason"] for d in record["dropped"]]
    assert sum("phi_ranges" in r for r in reasons) == 3
    assert any("t = 0" in r for r in reasons) and any("filter.frames" in r for r in reasons)


def test_t0_exclusion_can_be_switched_off():
    data = make_data()
    out, _ = apply_filter(data, FilterSettings.from_mapping({"exclude_t0": False}))
    assert out.n_t == data.n_t and out.t1[0] == 0.0


def test_quality_filter_drops_a_flat_angle():
    data = make_data()
    c2 = data.c2_exp.copy()
    c2[2] = 1.0 + 0.001 * np.eye(data.n_t)  # no decay at all
    s = FilterSettings.from_mapping({"quality": {"enabled": True, "min_contrast": 0.05}})
    out, record = apply_filter(data.replace(c2_exp=c2), s)
    assert 0.0 not in out.phi_angles_list and out.n_phi == 5
    (drop,) = [d for d in record["dropped"] if d["kind"] == "angle"]
    assert drop["phi_deg"] == 0.0 and "contrast" in drop["reason"]


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"phi_ranges": [[100, 120]]}, "filter.phi_ranges removes every angle"),
        ({"q_range": [0.01, 0.02]}, "filter.q_range removes every angle"),
        ({"phi_rnages": [[0, 1]]}, "filter.phi_rnages: unknown key"),
        ({"phi_ranges": [[0]]}, r"filter.phi_ranges\[0\]: expected \[min, max\]"),
        ({"frames": {"start": 5, "end": 2}}, "start 5 is after end 2"),
        ({"frames": {"start": 5, "end": -5}}, r"frames.end: -5; expected -1 .* >= start \(5\)"),
        ({"frames": {"end": 0}}, "frames.end: 0; expected -1"),
        ({"frames": {"start": 1, "end": 99}}, "beyond the 30 loaded frames"),
        ({"frames": {"start": 1, "end": 2}}, "at least 3"),
        ({"exclude_t0": "yes"}, "filter.exclude_t0: expected true or false"),
        ({"quality": {"min_contrast": "0.1"}}, "filter.quality.min_contrast: expected a finite"),
    ],
)
def test_bad_filters_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        apply_filter(make_data(), FilterSettings.from_mapping(settings))


def test_stage_writes_npz_and_report(tmp_path):
    make_data().to_npz(tmp_path / "loaded.npz")
    s = FilterSettings.from_mapping({"phi_ranges": [[-10, 10]]})
    filter_stage(tmp_path / "loaded.npz", tmp_path / "f.npz", tmp_path / "f.json", s)
    back = XpcsData.from_npz(tmp_path / "f.npz")
    assert back.phi_angles_list.tolist() == [0.0]
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["settings"]["phi_ranges"] == [[-10.0, 10.0]] and report["dropped"]
    with pytest.raises(ConfigError):
        filter_stage(
            tmp_path / "loaded.npz", tmp_path / "g.npz", tmp_path / "g.json",
            FilterSettings.from_mapping({"phi_ranges": [[100, 101]]}),
        )  # fmt: skip
    assert not (tmp_path / "g.npz").exists() and not (tmp_path / "g.json").exists()
