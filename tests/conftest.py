"""Shared fixtures: a small results tree made by the real stages, and a PNG checker.

``results_tree`` runs simulate → load → filter → preprocess → qc → nlsq → cmc_plan →
cmc_combine for two small simulated datasets (``lam``: laminar flow, 6 angles × 60
frames; ``sta``: static, 3 angles × 50 frames) into ``results/{dataset}/...`` exactly as
the workflow lays them out. Only the NUTS sampling is not run (it needs minutes: see
``tests/test_cmc.py``'s slow test): the shard files are the fakes of
``tests/test_cmc_combine.py`` (Gaussian draws in ``cmc_shard``'s layout, with NUTS sample
stats), and the real combine stage turns them into the CMC outputs. Built once per session.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATASETS = {
    "lam": {"mode": "laminar_flow", "n_frames": 60, "seed": 3},
    "sta": {"mode": "static", "n_frames": 50, "seed": 4},
}
NUM_SHARDS = 3


@functools.cache
def _no_scontrol_dir() -> str:
    """A folder whose ``scontrol`` fails at once. Snakemake loads its Slurm executor
    plugin on every start, and the plugin asks ``scontrol show config`` for a setting's
    help text; on a machine with the Slurm client but no controller that call waits its
    10 s timeout. Local runs never use the answer."""
    folder = Path(tempfile.mkdtemp(prefix="no-scontrol-"))
    shim = folder / "scontrol"
    shim.write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
    shim.chmod(0o755)
    return str(folder)


def local_snakemake_env(env: dict | None = None) -> dict:
    """The environment for a local (not Slurm) snakemake run in a test: ``env`` (default
    os.environ) with the scontrol shim first on PATH when a Slurm client is installed."""
    out = dict(os.environ if env is None else env)
    if shutil.which("scontrol") is not None:
        out["PATH"] = os.pathsep.join([_no_scontrol_dir(), out.get("PATH", "")])
    return out


def build_dataset(results: Path, name: str, spec: dict) -> Path:
    """Run the real stages of one simulated dataset into ``results/name``."""
    from homodyne_steps.data.preprocess_settings import PreprocessSettings
    from homodyne_steps.inference.nlsq_settings import NlsqSettings
    from homodyne_steps.stages.cmc_combine import CombineSettings, combine_stage
    from homodyne_steps.stages.cmc_plan import ShardingSettings, cmc_plan_stage
    from homodyne_steps.stages.filter import FilterSettings, filter_stage
    from homodyne_steps.stages.load import load_stage
    from homodyne_steps.stages.nlsq_stage import nlsq_stage
    from homodyne_steps.stages.preprocess import preprocess_stage
    from homodyne_steps.stages.qc import qc_stage
    from homodyne_steps.stages.simulate import reference_settings, simulate_file
    from test_cmc_combine import make_set

    base = results / name
    hdf, truth_path = simulate_file(
        reference_settings(spec["mode"], n_frames=spec["n_frames"], n_q_rings=1, seed=spec["seed"]),
        results.parent / "resources" / name / f"{name}.hdf",
    )
    truth = json.loads(Path(truth_path).read_text())
    data = base / "data"
    load_stage(hdf, truth["q"], data / "loaded.npz", data / "loaded.json")
    filter_stage(
        data / "loaded.npz",
        data / "filtered.npz",
        data / "filter_report.json",
        FilterSettings.from_mapping({}),
    )
    preprocess_stage(
        data / "filtered.npz",
        data / "preprocessed.npz",
        data / "provenance.json",
        PreprocessSettings.from_mapping({}),
    )
    qc_stage(
        data / "loaded.npz",
        data / "filtered.npz",
        data / "preprocessed.npz",
        data / "qc_report.json",
        data / "qc.npz",
        {},
    )
    nlsq_stage(
        data / "qc.npz", base / "nlsq", mode=spec["mode"], L=truth["L"], settings=NlsqSettings()
    )
    cmc = base / "cmc"
    cmc_plan_stage(
        data / "qc.npz",
        cmc / "plan.json",
        cmc / "plan.npz",
        mode=spec["mode"],
        scaling_mode="varpro",
        settings=ShardingSettings.from_mapping(
            {"num_shards": NUM_SHARDS, "min_points_per_parameter": 10}
        ),
    )
    n_phi = len(truth["phi_deg"])
    ncs, jss = make_set(
        cmc / f"K{NUM_SHARDS}" / "shards",
        NUM_SHARDS,
        mode=spec["mode"],
        n_angles=n_phi,
        derived=True,
        n_draws=200,
    )
    combine_stage(
        ncs, jss, cmc, CombineSettings(), nlsq_parameters=base / "nlsq" / "parameters.json"
    )
    return base


@pytest.fixture(scope="session")
def results_tree(tmp_path_factory) -> Path:
    """``results/`` with the datasets of ``DATASETS`` (all stage outputs but the plots)."""
    results = tmp_path_factory.mktemp("tree") / "results"
    for name, spec in DATASETS.items():
        build_dataset(results, name, spec)
    return results


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; AssertionError if it is not a PNG."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR", f"{path}: no IHDR chunk"
    return struct.unpack(">II", head[16:24])


def check_png(path: Path, size: tuple[int, int] | None = None) -> None:
    """A complete, decodable PNG of ``size`` pixels that is not blank."""
    import matplotlib.image as mpimg

    assert Path(path).is_file(), f"{path} missing"
    w, h = png_size(path)
    if size is not None:
        assert (w, h) == tuple(size), f"{path.name}: {w}x{h}, expected {size}"
    assert min(w, h) >= 200, f"{path.name}: {w}x{h} is too small to read"
    pixels = mpimg.imread(path)  # decodes the whole image (a truncated file raises)
    assert pixels.shape[:2] == (h, w)
    assert float(np.var(pixels[..., :3])) > 0, f"{path.name} is blank"


def check_figure_dir(out_dir: Path) -> dict:
    """Every figure listed in ``figures.json`` is a valid PNG of its listed size, and the
    folder holds no other PNG; returns the index."""
    index = json.loads((Path(out_dir) / "figures.json").read_text())
    listed = {f["file"] for f in index["figures"]}
    written = [*Path(out_dir).glob("*.png"), *Path(out_dir).glob("angles/*.png")]
    assert listed == {p.relative_to(out_dir).as_posix() for p in written}
    for f in index["figures"]:
        check_png(Path(out_dir) / f["file"], tuple(f["size_px"]))
    assert not list(Path(out_dir).glob("**/.*.tmp*")), "temporary files left behind"
    return index


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. One pytest process compiles
    thousands of them, each holding memory maps; past the kernel's map limit
    (vm.max_map_count, 65530 here) XLA segfaulted in the full suite while compiling or
    loading a program, never in a module run alone."""
    yield
    import sys

    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
