"""The NLSQ stage: settings, from QC'd data to fitted parameters, and the output files.

Strategies:

- ``joint`` (default): every angle in one problem (:mod:`homodyne_steps.inference.lm`), over
  angle-stratified chunks; optional multistart (Latin hypercube over the bounds, log
  spacing for log-scale parameters) reporting whether distinct minima were found.
- ``sequential``: each angle fitted alone (its own exact scaling), physical parameters
  combined by summing the angles' Fisher information (generalised least squares with
  full covariances, :func:`fit_sequential`); fails unless ``min_success_rate`` of the
  angles reach a stationary point. For data whose angles cannot share one problem, or
  to check consistency.

Verdicts (``convergence.status``): ``converged``; ``not_identified`` (the solver stopped,
but the data do not determine the named parameters: their uncertainty is null);
``failed`` (χ² not finite, the parameters never left the start values and are not
identified there; sequential: too few usable angles, or angles that disagree);
``max_iterations``, ``stalled``. Every
status but ``converged`` fails the stage unless ``on_failure: warn``.

Output files (seed §9 names, plus ``schema_version``): ``parameters.json``,
``analysis_results_nlsq.json``, ``convergence_metrics.json``, ``fitted_data.npz``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from homodyne_steps.errors import HomodyneStepsError
from homodyne_steps.inference.nlsq_fit import NlsqOutcome, fit
from homodyne_steps.inference.nlsq_settings import NlsqSettings
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.physics.model_settings import ModelSettings
from homodyne_steps.physics.registry import REGISTRY
from homodyne_steps.stages.nlsq_records import parameters_record, write_outputs

OUTPUT_FILES = (
    "parameters.json",
    "analysis_results_nlsq.json",
    "convergence_metrics.json",
    "fitted_data.npz",
)


class FitFailed(HomodyneStepsError):
    """The fit is not ``converged`` (raised after the diagnostic files are written)."""


def nlsq_stage(
    in_npz: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    mode: str,
    L: float,
    settings: NlsqSettings,
    parameter_overrides: Mapping[str, Any] | None = None,
    model: ModelSettings | None = None,
) -> NlsqOutcome:
    """Fit a QC'd dataset and write the four output files into ``out_dir``.

    A fit that is not ``converged`` (including ``not_identified`` and ``failed``) writes
    ``parameters.failed.json`` (the diagnostics) and raises :class:`FitFailed` unless
    ``on_failure: warn``.
    """
    registry = REGISTRY.with_overrides(parameter_overrides)
    data = XpcsData.from_npz(in_npz)
    out = fit(data, mode, L, settings, registry, model)
    out_dir = Path(out_dir)
    failed = out_dir / "parameters.failed.json"
    if not out.result.converged and settings.on_failure == "error":
        for name in OUTPUT_FILES:
            (out_dir / name).unlink(missing_ok=True)
        parameters_record(out, registry).write(failed)
        raise FitFailed(
            f"NLSQ fit not usable ({out.result.status}: {out.result.reason}); diagnostics in "
            f"{failed}. Try other initial_parameters, multistart, fixed_parameters, or set "
            "nlsq.on_failure: warn to keep the result"
        )
    failed.unlink(missing_ok=True)
    write_outputs(out_dir, out, data, L, registry)
    return out
