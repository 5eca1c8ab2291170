"""One source of defaults: the typed settings classes. The shipped config/config.yaml
lists every key for the reader (as the workflow catalog does); this checks that each of
its global values is the code's default, so the two cannot drift (config/README.md is in
turn checked against config.yaml by test_docs)."""

from pathlib import Path

import pytest
import yaml

from homodyne_steps.data.preprocess_settings import PreprocessSettings
from homodyne_steps.data.qc_settings import QcSettings
from homodyne_steps.inference.cmc_shard_settings import PriorSettings, SamplerSettings
from homodyne_steps.inference.nlsq_settings import NlsqSettings
from homodyne_steps.plots.plot_common import PlotSettings
from homodyne_steps.stages.cmc_combine import CombineSettings
from homodyne_steps.stages.cmc_plan import ShardingSettings
from homodyne_steps.stages.filter import FilterSettings
from homodyne_steps.stages.load import LoadSettings

CONFIG = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "config" / "config.yaml").read_text(encoding="utf-8")
)

SECTIONS = [
    (("filter",), FilterSettings),
    (("preprocess",), PreprocessSettings),
    (("qc",), QcSettings),
    (("nlsq",), NlsqSettings),
    (("cmc", "sharding"), ShardingSettings),
    (("cmc", "sampler"), SamplerSettings),
    (("cmc", "prior"), PriorSettings),
    (("cmc", "combine"), CombineSettings),
    (("plot",), PlotSettings),
]


@pytest.mark.parametrize("path, cls", SECTIONS, ids=[".".join(p) for p, _ in SECTIONS])
def test_shipped_config_values_are_the_code_defaults(path, cls):
    section = CONFIG
    for key in path:
        section = section[key]
    assert section, f"config.yaml lists no {'.'.join(path)} keys"
    assert cls.from_mapping(section) == cls.from_mapping({}), (
        f"config/config.yaml {'.'.join(path)} differs from {cls.__name__}'s defaults"
    )


def test_the_check_would_catch_a_drifted_value():
    changed = {**CONFIG["qc"], "min_time_points": CONFIG["qc"]["min_time_points"] + 1}
    assert QcSettings.from_mapping(changed) != QcSettings.from_mapping({})


def test_dataset_load_keys_left_out_take_the_load_defaults():
    # the demo entry sets storage explicitly; every other load key it sets is the default
    entry = CONFIG["datasets"]["demo"]
    loaded = LoadSettings.from_mapping({"q": entry["q"]})
    assert loaded.q_tolerance == entry["q_tolerance"]
    assert (loaded.start_frame, loaded.end_frame) == (
        entry["frames"]["start"],
        entry["frames"]["end"],
    )
    assert loaded.storage == "auto" and entry["storage"] == "upper"
