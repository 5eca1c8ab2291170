"""Speckle-level datasets as the fit sees them, for the benchmarks.

``homodyne-steps simulate --method speckle`` (moving particles, speckle, Poisson counts,
the beamline correlator) written as an APS-U file, then the real load → filter →
preprocess stages, in process.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from homodyne_steps.data.preprocess_settings import PreprocessSettings
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.physics.speckle import SpeckleSettings
from homodyne_steps.stages.filter import FilterSettings, filter_stage
from homodyne_steps.stages.load import load_stage
from homodyne_steps.stages.preprocess import preprocess_stage
from homodyne_steps.stages.simulate import write_simulation
from homodyne_steps.stages.simulate_speckle import speckle_bins


def speckle_dataset(settings: Mapping[str, Any], work: Path) -> tuple[XpcsData, dict]:
    """(preprocessed data of the first ring, truth record) of one speckle simulation."""
    bins, truth = speckle_bins(SpeckleSettings.from_mapping(dict(settings)))
    hdf, _ = write_simulation(bins, truth, work / "speckle.hdf", truth_path=work / "truth.json")
    load_stage(hdf, truth["q_rings"][0], work / "loaded.npz", work / "loaded.json")
    filtered = (work / "filtered.npz", work / "filter.json")
    filter_stage(work / "loaded.npz", *filtered, FilterSettings.from_mapping({}))
    pre = (work / "pre.npz", work / "prov.json")
    preprocess_stage(filtered[0], *pre, PreprocessSettings.from_mapping({}))
    return XpcsData.from_npz(work / "pre.npz"), truth
