"""The QC scoring table: the points each check deducts and what to do about each issue.

Shared by the scoring (:mod:`homodyne_steps.data.qc_checks`) and the QC figure
(:mod:`homodyne_steps.plots.plot_qc`), so that the figure never imports the stage. How each
check is applied is described in :mod:`homodyne_steps.data.qc_checks`.
"""

from __future__ import annotations

CHECKPOINTS = ("raw", "filtered", "preprocessed", "final")

# Points per check (see the module docstring for how each is applied).
DEDUCTIONS: dict[str, float] = {
    "too_few_times": 30.0,
    "infinite": 40.0,  # cap; base 10 + 200 × fraction of elements
    "masked": 40.0,  # × masked fraction of the off-diagonal upper triangle
    "negative": 30.0,  # cap; base 10 + 100 × fraction of elements
    "asymmetric": 10.0,
    "first_lag": 25.0,
    "baseline": 25.0,
    "no_decay": 30.0,
    "high_noise": 15.0,
    "outlier": 10.0,
    "no_correlation_decay": 100.0,  # dataset: no angle decays
    "all_angles_masked": 100.0,  # final: every angle dropped
}
# Dataset-level verdicts that fail the data on their own (not part of the usual budget).
FATAL_CHECKS = ("no_correlation_decay", "all_angles_masked")

# What to do about each issue; shown once per code in a checkpoint's recommendations.
RECOMMENDATIONS: dict[str, str] = {
    "too_few_times": "Use more frames (widen start_frame/end_frame) so the decay is sampled.",
    "infinite": "Inf elements are no measurements: they are masked (NaN, not fitted). Check "
    "the correlator output (a division by zero?).",
    "masked": "Masked (NaN) elements are not fitted and nothing is filled in; many of them "
    "(lost frames, detector gaps) cost information. Check the frame range; angles above "
    "qc.max_masked_fraction are dropped.",
    "negative": "Negative correlations are masked by auto_repair (NaN, not fitted); check "
    "background subtraction and the normalisation of c2.",
    "asymmetric": "c2 should be symmetric; auto_repair averages c2 and its transpose. Check "
    "how the matrix was reconstructed from its upper triangle.",
    "first_lag_high": "c2 at the first lag exceeds g2_ceiling: check the normalisation "
    "(percent or counts instead of g2?) or hot pixels in that angle bin.",
    "first_lag_low": "c2 at the first lag is below g2_floor: the data may be g2 - 1 or "
    "normalised wrongly.",
    "baseline": "The long-lag baseline is far from 1: check the normalisation (data in "
    "percent are rescaled by auto_repair; counts or g2 - 1 must be fixed upstream).",
    "no_decay": "No decay above the noise: the angle carries no dynamics in this time "
    "window (too slow, too noisy, or empty bin). Consider excluding it.",
    "high_noise": "Noisy data: consider more frames, wider angle bins, or noise reduction.",
    "outlier": "One angle differs strongly from the others: check its phi bin (mask, beam "
    "stop, detector gap) or exclude it.",
    "no_correlation_decay": "No angle shows a correlation decay: c2 is flat, so there is "
    "nothing to fit. Check the q ring, the frame range and time step (dynamics much faster "
    "or slower than the window?), or whether the file holds correlations at all.",
    "all_angles_masked": "Every angle has more masked elements than qc.max_masked_fraction "
    "allows: check the frame range and the correlator output, or raise "
    "qc.max_masked_fraction.",
}

_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
