r"""One CMC shard: NumPyro NUTS on a stratified subset of the points.

Likelihood: the same kernel and noise model as the NLSQ fit. The shard's points (ids in
the NLSQ sense: angle × upper-triangle pair) are arranged in per-angle blocks, and the
NLSQ pass (:func:`homodyne_steps.inference.likelihood.block_stats`, here differentiated in
reverse mode)
gives the per-angle sums Σw²G², Σw²G, Σw², Σw²Gd, Σw²d, Σw²d² at θ, with G = g1² and
w = 1/σ(angle, lag) from the NLSQ noise estimate. Then, per angle a::

    sampled scaling:   log L = −½ (c² ΣGG + 2co ΣG + o² Σ1 − 2c ΣGd − 2o Σd + Σdd)
    varpro (default):  contrast and offset integrated out under a flat prior:
                       log L = −½ χ²_min,a(θ) − ½ log det [[ΣGG, ΣG], [ΣG, Σ1]]

the Bayesian counterpart of NLSQ's variable projection: the sampler explores only the
3 or 7 physical parameters, and the scaling uncertainty is carried into them. Where the
NLSQ σ come from the speckle noise model, log L is evaluated at θ̂ + C(θ − θ̂) with the
NLSQ record's C (:mod:`homodyne_steps.inference.curvature`): the same calibration.

Target: L_k(θ)·G(u)^(1/K) in the combination coordinates u, with G the broad Gaussian
surrogate prior of :mod:`cmc_space`; the priors (TruncatedNormal(μ, σ) in the registry
bounds, ``prior.type: registry``, or centred on the NLSQ value with width k·σ_NLSQ,
``nlsq``) are recorded with the space and applied once, after the combination
(:func:`consensus.apply_prior`). NUTS samples one unconstrained vector in the
coordinates ``reparameterize`` (``rates``, ``log_reference``, ``none``; see
:mod:`cmc_space`); the registry parameters are deterministics.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np

from homodyne_steps._jax import jax, jnp
from homodyne_steps.errors import ConfigError, DataError
from homodyne_steps.inference.cmc_shard_settings import PriorSettings, SamplerSettings
from homodyne_steps.inference.shard_inputs import ShardInputs, prepare_shard, shard_loglik
from homodyne_steps.inference.shard_mode import ShardMode, shard_mode
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.io.nlsq_files import NlsqParameters
from homodyne_steps.io.serialise import finite_or_none, read_npz
from homodyne_steps.io.shard_io import ShardPosterior, ShardSummary, write_shard_posterior
from homodyne_steps.physics.cmc_space import (
    COMBINATION,
    SampledSpace,
    shard_log_density,
    w_from_theta,
)
from homodyne_steps.physics.coordinates import SHARDABLE_COORDINATES
from homodyne_steps.physics.model_settings import ModelSettings
from homodyne_steps.physics.registry import REGISTRY


def shard_model(space: SampledSpace, coords: str, num_shards: int, loglik_fn):
    """NumPyro model of one shard: one unconstrained vector w, the tempered target
    (:func:`cmc_space.shard_log_density`), and θ's variables as deterministics."""
    import numpyro
    import numpyro.distributions as dist

    flat = dist.ImproperUniform(dist.constraints.real_vector, (), (space.size,))
    w = numpyro.sample("sampled_coordinates", flat)
    log_density, theta, extra = shard_log_density(w, space, coords, num_shards, loglik_fn)
    numpyro.factor("target", log_density)
    by_variable: dict[str, list[tuple[int | None, Any]]] = {}
    for j, (var, idx) in enumerate(space.columns):
        by_variable.setdefault(var, []).append((idx, theta[j]))
    for var, entries in by_variable.items():
        if entries[0][0] is None:
            numpyro.deterministic(var, entries[0][1])
        else:
            numpyro.deterministic(var, jnp.stack([v for _, v in sorted(entries)]))
    for var, value in extra.items():
        numpyro.deterministic(var, value)


def _start_point(space: SampledSpace, coords: str, theta0) -> np.ndarray:
    """The start θ0 in the sampling coordinates; a clear error where they cannot hold it."""
    w0 = np.asarray(w_from_theta(np.asarray(theta0, dtype=np.float64), space, coords))
    if np.all(np.isfinite(w0)):
        return w0
    mirrored = (
        "gamma_dot_t0" in space.names
        and float(np.asarray(theta0)[space.names.index("gamma_dot_t0")]) < 0
    )
    raise DataError(
        f"the start point {dict(zip(space.names, np.asarray(theta0).tolist(), strict=True))} "
        "lies on or outside the parameter bounds"
        + (
            f"; `{coords}` cannot represent gamma_dot_t0 < 0, the mirror image of an "
            "optimum whose mean shear rate is negative (shards take the image with a "
            "mean shear rate >= 0: the same c2); use `rates`"
            if mirrored
            else ""
        )
    )


def _start_metric(mode: ShardMode, dense: bool) -> np.ndarray | None:
    """NUTS's starting inverse metric: the Laplace covariance, or, where the Hessian is
    not positive definite at the mode, its diagonal (NUTS then adapts it; coordinates of
    scales 1e4 and 1e-6 must not share one step size). Dense or diagonal as asked."""
    start = mode.inverse_mass if mode.inverse_mass is not None else mode.inverse_mass_diagonal
    if start is not None and (start.ndim == 2) != dense:
        start = np.diag(start)  # a matrix's diagonal, or a diagonal matrix
    return start


def sample_shard(
    space: SampledSpace,
    coords: str,
    num_shards: int,
    loglik_fn,
    theta0: np.ndarray,
    sampler: SamplerSettings,
    shard: int = 0,
):
    """NUTS on one shard's tempered target; returns (:class:`ShardPosterior`, record).

    ``loglik_fn(θ) -> (log L_k(θ), deterministics)``; ``num_shards`` is the K of the
    tempering (1: the full prior, no tempering).
    """
    model = partial(shard_model, space, coords, num_shards, loglik_fn)
    w0 = _start_point(space, coords, theta0)

    def potential(w):
        return -shard_log_density(w, space, coords, num_shards, loglik_fn)[0]

    mode = shard_mode(potential, w0)
    mcmc, timings = _run_nuts(model, mode, sampler, shard)
    extra = mcmc.get_extra_fields(group_by_chain=True)
    num_steps = np.asarray(extra["num_steps"])
    stats = {
        "diverging": np.asarray(extra["diverging"]).astype(bool),
        "energy": np.asarray(extra["energy"]),
        "tree_depth": np.floor(np.log2(np.maximum(num_steps, 1))).astype(int) + 1,
        "step_size": np.asarray(extra["adapt_state.step_size"]),
        "acceptance_rate": np.asarray(extra["accept_prob"]),
        "n_steps": num_steps,
    }
    idata = ShardPosterior.from_arrays(
        {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}, stats
    )
    idata.posterior.attrs.update(
        {
            "sampled_space": space.to_json(),
            "reparameterize": coords,
            "combination_coordinates": COMBINATION,
            "prior_tempering": 1.0 / num_shards,
        }
    )
    return idata, _sampling_record(stats, sampler, mode, timings)


def _run_nuts(model, mode: ShardMode, sampler: SamplerSettings, shard: int):
    """NUTS from the shard's mode with its Laplace metric: (the run MCMC, timings)."""
    from numpyro.infer import MCMC, NUTS, init_to_value

    metric = mode.inverse_mass
    start_metric = _start_metric(mode, sampler.dense_mass)
    site = ("sampled_coordinates",)
    kernel = NUTS(
        model,
        init_strategy=init_to_value(values={site[0]: jnp.asarray(mode.w)}),
        target_accept_prob=sampler.target_accept,
        max_tree_depth=sampler.max_tree_depth,
        dense_mass=[site] if sampler.dense_mass else False,
        inverse_mass_matrix={site: start_metric} if start_metric is not None else None,
        # A few hundred warmup draws cannot estimate a 0.98-correlated metric (NumPyro on
        # a Gaussian of this shape: 27 leapfrog steps per draw after 200 warmup draws);
        # the Laplace covariance at the shard's mode already is that metric, so only the
        # step size is tuned.
        adapt_mass_matrix=metric is None or sampler.adapt_mass_matrix,
    )
    mcmc = MCMC(
        kernel,
        num_warmup=sampler.num_warmup,
        num_samples=sampler.num_samples,
        num_chains=sampler.num_chains,
        chain_method="sequential",
        progress_bar=False,
    )
    key = jax.random.fold_in(jax.random.PRNGKey(sampler.seed), shard)
    t0 = time.perf_counter()
    mcmc.warmup(key, extra_fields=("diverging",), collect_warmup=False)
    t1 = time.perf_counter()
    mcmc.run(
        mcmc.post_warmup_state.rng_key,
        extra_fields=("diverging", "energy", "num_steps", "adapt_state.step_size", "accept_prob"),
    )
    t2 = time.perf_counter()
    return mcmc, {"warmup_s": t1 - t0, "sampling_s": t2 - t1, "total_s": t2 - t0}


def _sampling_record(stats, sampler: SamplerSettings, mode: ShardMode, timings) -> dict:
    """The sampler's part of the shard record: settings, NUTS diagnostics, the mode."""
    diverging, tree_depth = stats["diverging"], stats["tree_depth"]
    metric = mode.inverse_mass
    n_draws = diverging.size
    return {
        "num_chains": sampler.num_chains,
        "num_warmup": sampler.num_warmup,
        "num_samples": sampler.num_samples,
        "divergences": int(diverging.sum()),
        "divergence_rate": float(diverging.sum() / n_draws),
        "step_size": float(np.mean(stats["step_size"])),
        "mean_tree_depth": float(tree_depth.mean()),
        "max_tree_depth_hits": int(np.sum(tree_depth > sampler.max_tree_depth)),
        "acceptance_rate": float(stats["acceptance_rate"].mean()),
        "timings": timings,
        "metric": (
            "Laplace covariance at the shard's mode (fixed)"
            if metric is not None and not sampler.adapt_mass_matrix
            else "adapted by NumPyro"
            + ("" if metric is not None else " from the Hessian's diagonal (not positive definite)")
        ),
        "mode": {
            "status": mode.status,
            "newton_iterations": mode.iterations,
            "potential": mode.potential,
            "seconds": mode.seconds,
        },
    }


def run_shard(inp: ShardInputs, sampler: SamplerSettings, prior: PriorSettings, shard: int = 0):
    """Sample one shard of the data; returns (InferenceData, record dict)."""
    if inp.num_shards > 1 and sampler.reparameterize not in SHARDABLE_COORDINATES:
        raise ConfigError(
            f"cmc.sampler.reparameterize {sampler.reparameterize!r} cannot be combined across "
            f"the plan's {inp.num_shards} shards (its shards are cut at exponent = 0); use "
            f"{' or '.join(SHARDABLE_COORDINATES)}, or a plan made with these coordinates "
            "(one shard)"
        )
    return sample_shard(
        inp.space,
        sampler.reparameterize,
        inp.num_shards if prior.tempering else 1,
        shard_loglik(inp),
        inp.init_theta,
        sampler,
        shard,
    )


def cmc_shard_stage(
    qc_npz: str | os.PathLike[str],
    plan_npz: str | os.PathLike[str],
    nlsq_parameters: str | os.PathLike[str],
    nlsq_fitted: str | os.PathLike[str],
    shard: int,
    out_nc: str | os.PathLike[str],
    out_json: str | os.PathLike[str],
    *,
    mode: str,
    L: float,
    sampler: SamplerSettings,
    prior: PriorSettings,
    parameter_overrides: Mapping[str, Any] | None = None,
    model: ModelSettings | None = None,
) -> dict[str, Any]:
    """Sample shard ``shard`` of the plan; write its InferenceData and record."""
    model = model or ModelSettings()
    t_start = time.perf_counter()
    registry = REGISTRY.with_overrides(parameter_overrides)
    data, plan, nlsq_params, sigma_lag = _read_inputs(
        qc_npz, plan_npz, nlsq_parameters, nlsq_fitted
    )
    inp = prepare_shard(
        data,
        plan,
        shard,
        nlsq_params,
        sigma_lag,
        mode=mode,
        L=L,
        prior=prior,
        registry=registry,
        model=model,
    )
    t_prep = time.perf_counter()
    idata, record = run_shard(inp, sampler, prior, shard)
    idata.posterior.attrs.update(
        {
            "shard": shard,
            "num_shards": inp.num_shards,
            "n_points": inp.n_points,
            "analysis_mode": inp.mode,
            "per_angle_scaling": inp.scaling_mode,
            "noise_sigma_factor": inp.noise_scale["sigma_factor"],
        }
    )
    for attr in ("shard", "num_shards"):
        idata.posterior.attrs[attr] = int(idata.posterior.attrs[attr])
    record = _shard_record(inp, sampler, prior, shard, record)
    # Compilation happens inside the first warmup call; the warmup time includes it.
    record["timings"]["prepare_s"] = t_prep - t_start
    record["timings"]["compile_and_warmup_s"] = record["timings"].pop("warmup_s")
    record["timings"]["total_s"] = time.perf_counter() - t_start
    summary = ShardSummary.of_mapping(record, out_json)
    write_shard_posterior(idata, out_nc)
    summary.write(out_json)
    return record


def _read_inputs(qc_npz, plan_npz, nlsq_parameters, nlsq_fitted):
    """(data, plan indices, NLSQ parameters record, NLSQ σ per lag) of a shard."""
    data = XpcsData.from_npz(qc_npz)
    plan = read_npz(plan_npz, required=("indices",))["indices"]
    nlsq_params = NlsqParameters.read(nlsq_parameters)
    sigma_lag = read_npz(nlsq_fitted, required=("sigma_per_lag",))["sigma_per_lag"]
    if sigma_lag.shape != (data.n_phi, data.n_t):
        raise DataError(
            f"{nlsq_fitted}: sigma_per_lag has shape {sigma_lag.shape}; the data needs "
            f"{(data.n_phi, data.n_t)} (was the NLSQ fit run on this data?)"
        )
    return data, plan, nlsq_params, sigma_lag


def _shard_record(
    inp: ShardInputs, sampler: SamplerSettings, prior: PriorSettings, shard: int, sampling
) -> dict[str, Any]:
    """The shard's JSON record: what was sampled, under which prior, then ``sampling``."""
    return {
        "shard": shard,
        "num_shards": inp.num_shards,
        "n_points": inp.n_points,
        "seed": sampler.seed,
        "analysis_mode": inp.mode,
        "model": inp.model.to_mapping(),
        "per_angle_scaling": inp.scaling_mode,
        "parameters": list(inp.names),
        "sampled": list(inp.space.names),
        "prior": {
            "type": prior.type,
            "tempering": prior.tempering,
            "mu": inp.space.prior_mu.tolist(),
            "sigma": inp.space.prior_sigma.tolist(),
            "lower": [finite_or_none(x) for x in inp.space.lower],
            "upper": [finite_or_none(x) for x in inp.space.upper],
        },
        "coordinates": {
            "sampled": sampler.reparameterize,
            "combined": COMBINATION,
        },
        "noise_scale": inp.noise_scale,
        "curvature_adjustment": list(inp.adjusted) if inp.adjustment is not None else None,
        "surrogate": inp.surrogate,
        **sampling,
    }


__all__ = [
    "SamplerSettings",
    "ShardPosterior",
    "PriorSettings",
    "cmc_shard_stage",
    "prepare_shard",
    "run_shard",
    "ConfigError",
]
