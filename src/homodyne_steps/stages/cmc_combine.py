"""The CMC combination stage: shard posteriors in, one consensus posterior and its files out.

A short driver over the layers below it:

- :mod:`shard_io` reads the shard files and checks that they form one run;
- :mod:`consensus` decides which shards to use, combines their draws in the combination
  coordinates and applies the prior (the methods of ``cmc.combine.method`` are described
  there);
- :mod:`cmc_diagnostics` judges convergence (per shard and combined), the shards'
  agreement, the prior weights and the agreement with NLSQ;
- :mod:`cmc_records` builds the output records, :mod:`cmc_fitted` the model at the
  posterior mean.

Output files (seed §10 names, plus ``schema_version``, ``combination_report.json`` and
``posterior.nc``): ``samples.npz``, ``posterior.nc``, ``fitted_data.npz`` (when the
stage is given the data, :class:`~homodyne_steps.inference.cmc_fitted.FittedInputs`),
``diagnostics.json``, ``combination_report.json``, ``analysis_results_cmc.json`` and
``parameters.json``, written last as the workflow's sentinel. Everything is computed
before the first file is written; each file is written atomically; if any write fails
the files of this run are removed, so a failed run never leaves a mixture of old and new
outputs. JSON never holds NaN: an undefined number (R-hat of one chain, say) is ``null``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from homodyne_steps.errors import DataError
from homodyne_steps.inference.cmc_diagnostics import diagnose
from homodyne_steps.inference.cmc_fitted import FittedInputs, FittedModel, cmc_fitted_model
from homodyne_steps.inference.combine_settings import CombineSettings
from homodyne_steps.inference.consensus import combine_shards
from homodyne_steps.io.nlsq_files import NlsqParameters
from homodyne_steps.io.record import Record
from homodyne_steps.io.serialise import SerialisationError, atomic_path, write_npz
from homodyne_steps.io.shard_io import read_shards
from homodyne_steps.physics.registry import canonical_mode
from homodyne_steps.stages.cmc_records import (
    CombinedRun,
    analysis_record,
    combination_report,
    combined_idata,
    diagnostics_record,
    parameters_record,
    samples_arrays,
)

OUTPUT_FILES = (
    "samples.npz",
    "posterior.nc",
    "diagnostics.json",
    "combination_report.json",
    "analysis_results_cmc.json",
    "parameters.json",  # last: the workflow's sentinel
)
FITTED_FILE = "fitted_data.npz"  # written after posterior.nc when the stage has the data
RECORDS = {  # the JSON outputs, in writing order (parameters.json last)
    "diagnostics.json": diagnostics_record,
    "combination_report.json": combination_report,
    "analysis_results_cmc.json": analysis_record,
    "parameters.json": parameters_record,
}


@dataclass
class CombineOutcome:
    """What the stage found and wrote."""

    analysis_mode: str
    method: str
    names: tuple[str, ...]
    draws: np.ndarray  # (chains, draws, p)
    summary: dict[str, np.ndarray]
    kept: list[int]
    excluded: dict[int, str]
    flagged_kept: dict[int, str]
    quality: dict[str, Any]
    files: list[Path] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.quality["convergence_status"]


def _read_nlsq(path: Path, mode: str) -> NlsqParameters:
    try:
        rec = NlsqParameters.read(path)
    except SerialisationError as exc:
        raise DataError(f"NLSQ parameters: {exc}") from None
    if canonical_mode(rec.analysis_mode) != mode:
        raise DataError(
            f"{path}: NLSQ analysis_mode {rec.analysis_mode!r} differs from the shards' {mode!r}"
        )
    return rec


def _remove_outputs(out_dir: Path) -> None:
    for name in (*OUTPUT_FILES, FITTED_FILE):
        (out_dir / name).unlink(missing_ok=True)


def _write_outputs(
    out_dir: Path,
    npz: Mapping[str, np.ndarray],
    idata: Any,
    fitted: FittedModel | None,
    records: Mapping[str, Record],
) -> list[Path]:
    """Write every output, ``parameters.json`` last; on any failure remove them all."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_outputs(out_dir)
    written: list[Path] = []
    try:
        written.append(write_npz(out_dir / "samples.npz", **npz))
        with atomic_path(out_dir / "posterior.nc") as tmp:
            idata.to_netcdf(str(tmp))
        written.append(out_dir / "posterior.nc")
        if fitted is not None:
            written.append(fitted.write(out_dir / FITTED_FILE))
        for name, record in records.items():
            written.append(record.write(out_dir / name))
    except BaseException:
        _remove_outputs(out_dir)
        raise
    return written


def combine_stage(
    shard_nc: Sequence[str | os.PathLike[str]],
    shard_json: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    settings: CombineSettings | None = None,
    *,
    nlsq_parameters: str | os.PathLike[str] | None = None,
    fitted: FittedInputs | None = None,
) -> CombineOutcome:
    """Combine shard posteriors and write the output files into ``out_dir``.

    Raises :class:`~homodyne_steps.io.shard_io.ShardError` (before writing anything) when
    the shards are unreadable or do not belong together. A combination that does not
    converge is still written; its files say so (``convergence.status ==
    "not_converged"``). With ``fitted``, ``fitted_data.npz`` is written too, before
    ``parameters.json``.
    """
    start = time.perf_counter()
    s = settings or CombineSettings()
    out_dir = Path(out_dir)
    shards = read_shards(shard_nc, shard_json)
    mode = shards[0].analysis_mode
    nlsq = None
    if nlsq_parameters is not None:
        nlsq = (_read_nlsq(Path(nlsq_parameters), mode), Path(nlsq_parameters))
    combination = combine_shards(shards, s)
    diagnosis = diagnose(shards, combination, s, nlsq)
    nlsq_rec = None if nlsq is None else nlsq[0]
    run = CombinedRun(shards, combination, diagnosis, s, nlsq_rec, time.perf_counter() - start)
    # Every record is built (and checked against its type) before the first write.
    records = {name: build(run) for name, build in RECORDS.items()}
    model = None
    if fitted is not None:
        model = cmc_fitted_model(records["parameters.json"], fitted, out_dir / "parameters.json")
    written = _write_outputs(out_dir, samples_arrays(run), combined_idata(run), model, records)
    return CombineOutcome(
        analysis_mode=mode,
        method=s.method,
        names=tuple(shards[0].names),
        draws=combination.draws,
        summary=diagnosis.summary,
        kept=[sh.index for sh in combination.selection.kept],
        excluded=combination.selection.excluded,
        flagged_kept=combination.selection.flagged_kept,
        quality=diagnosis.quality,
        files=written,
    )
