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

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np

from homodyne_steps._jax import jax, jnp
from homodyne_steps.errors import ConfigError, DataError
from homodyne_steps.inference.cmc_shard_settings import PriorSettings, SamplerSettings
from homodyne_steps.inference.curvature import adjustment_in
from homodyne_steps.inference.likelihood import (
    Stats,
    angle_blocks,
    block_stats,
    chi_squared_per_angle,
    gather_points,
    make_fit_data,
)
from homodyne_steps.inference.noise import noise_scale_record
from homodyne_steps.inference.shard_mode import ShardMode, shard_mode
from homodyne_steps.inference.surrogate import (
    likelihood_maximum,
    nlsq_likelihood_covariance,
    place_surrogate,
)
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.io.nlsq_files import NlsqParameters
from homodyne_steps.io.record import or_none
from homodyne_steps.io.serialise import finite_or_none, read_npz
from homodyne_steps.io.shard_io import ShardPosterior, ShardSummary, write_shard_posterior
from homodyne_steps.physics.cmc_space import (
    COMBINATION,
    SampledSpace,
    make_space,
    shard_log_density,
    theta_from_w,
    w_from_theta,
    with_shear_convention,
)
from homodyne_steps.physics.coordinates import SHARDABLE_COORDINATES
from homodyne_steps.physics.model import make_grid
from homodyne_steps.physics.model_settings import ModelSettings
from homodyne_steps.physics.registry import REGISTRY, Registry, canonical_mode
from homodyne_steps.physics.scaling import build_map, quantile_estimates


@dataclass
class ShardInputs:
    """Everything one shard's model needs, resolved from the stage inputs."""

    mode: str
    names: tuple[str, ...]  # the physical parameters (registry order)
    model: ModelSettings  # the kernel's shear form and integral
    grid: Any
    blocks: Any  # (1, n_phi, m) point ids
    n_points: int
    n_phi: int
    scaling_mode: str
    scaling_matrix: np.ndarray
    scaling_fixed: np.ndarray
    space: SampledSpace  # physical parameters, then the sampled scaling
    #: start of the mode search (the surrogate's centre: the NLSQ optimum, moved by the
    #: prior where the data leave a direction open), over space.names
    init_theta: np.ndarray
    num_shards: int
    noise_scale: dict[str, Any]  # how σ was scaled (one treatment with NLSQ)
    points: tuple = ()  # (i, j, a, d, w) of the shard's blocks: constant over the sampling
    #: the NLSQ record's curvature adjustment as (û, C) in the combination coordinates
    #: (shards' sign convention); None: the likelihood as it is
    adjustment: tuple[np.ndarray, np.ndarray] | None = None
    adjusted: tuple[str, ...] = ()  # the parameters it moves
    surrogate: dict[str, Any] | None = None  # where G sits (:func:`place_surrogate`)


def _prior_arrays(names, registry: Registry, prior: PriorSettings, nlsq: NlsqParameters):
    lo, hi = registry.bounds(names)
    mu = np.array([registry[n].prior_mu for n in names])
    sd = np.array([registry[n].prior_sigma for n in names])
    if prior.type == "nlsq":
        for k, n in enumerate(names):
            p = nlsq.parameters[n]
            if p.uncertainty is None or not p.uncertainty > 0:
                raise DataError(
                    f"cmc.prior.type nlsq: the NLSQ result has no usable uncertainty for {n}"
                )
            mu[k] = np.clip(p.value, lo[k], hi[k])
            sd[k] = prior.nlsq_width * p.uncertainty
    return mu, sd, lo, hi


def _scaling_space(scaling_mode: str, n_phi: int, psi0: np.ndarray, registry: Registry):
    """(names, columns, lower, upper, mu, sigma, start) of the sampled scaling."""
    if scaling_mode in ("varpro", "constant") or psi0.size == 0:
        return [], [], [], [], [], [], []
    if scaling_mode == "fourier":  # coefficients around the NLSQ-consistent start
        m = psi0.size
        return (
            [f"scaling_coefficients_{i}" for i in range(m)],
            [("scaling_coefficients", i) for i in range(m)],
            [-np.inf] * m, [np.inf] * m, list(psi0), [1.0] * m, list(psi0),
        )  # fmt: skip
    cs, os_ = registry["contrast"], registry["offset"]
    if scaling_mode == "auto":
        names = ["contrast_shared", "offset_shared"]
        columns: list[tuple[str, int | None]] = [(n, None) for n in names]
        specs = [cs, os_]
    else:  # individual
        names = [f"contrast_{a}" for a in range(n_phi)] + [f"offset_{a}" for a in range(n_phi)]
        columns = [("contrast", a) for a in range(n_phi)] + [("offset", a) for a in range(n_phi)]
        specs = [cs] * n_phi + [os_] * n_phi
    lo = [s.lower for s in specs]
    hi = [s.upper for s in specs]
    span = np.asarray(hi) - np.asarray(lo)
    start = np.clip(psi0, np.asarray(lo) + 1e-3 * span, np.asarray(hi) - 1e-3 * span)
    return (
        names, columns, lo, hi, [s.prior_mu for s in specs], [s.prior_sigma for s in specs],
        list(start),
    )  # fmt: skip


def _loglik_fn(inp: ShardInputs):
    """log L_k(θ) and its deterministics, θ = (physical, sampled scaling ψ)."""
    n_phys = len(inp.names)

    def loglik(theta):
        if inp.adjustment is not None:
            u0, matrix = (jnp.asarray(x) for x in inp.adjustment)
            u = w_from_theta(theta, inp.space, COMBINATION)
            theta = theta_from_w(u0 + matrix @ (u - u0), inp.space, COMBINATION)
        physical = theta[:n_phys]
        st = Stats(*block_stats(physical, inp.grid, *inp.points, False))
        if inp.scaling_mode == "varpro":
            det = st.s_gg * st.s_1 - st.s_g**2
            c = (st.s_1 * st.s_gd - st.s_g * st.s_d) / det
            o = (st.s_gg * st.s_d - st.s_g * st.s_gd) / det
            value = -0.5 * jnp.sum(chi_squared_per_angle(st, c, o)) - 0.5 * jnp.sum(jnp.log(det))
            return value, {"contrast": c, "offset": o}
        psi = theta[n_phys:]
        s = jnp.asarray(inp.scaling_fixed)
        if psi.shape[0]:
            s = s + jnp.asarray(inp.scaling_matrix) @ psi
        c, o = s[: inp.n_phi], s[inp.n_phi :]
        value = -0.5 * jnp.sum(chi_squared_per_angle(st, c, o))
        derived = inp.scaling_mode in ("auto", "fourier")
        return value, ({"contrast": c, "offset": o} if derived else {})

    return loglik


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


def _check_same_fit(nlsq_params: NlsqParameters, mode: str, model: ModelSettings) -> None:
    """The NLSQ result is of this analysis mode and kernel (records written before the
    model choice existed used the seed's homodyne/trapezoid form)."""
    if nlsq_params.analysis_mode != mode:
        raise DataError(f"the NLSQ result is for {nlsq_params.analysis_mode!r} mode, not {mode!r}")
    nlsq_model = ModelSettings.of_record(or_none(nlsq_params.model))
    if nlsq_model != model:
        raise DataError(
            f"the NLSQ result was fitted with model {nlsq_model.to_mapping()}, the shards are "
            f"asked for {model.to_mapping()}: rerun the NLSQ stage with the same model"
        )


def prepare_shard(
    data: XpcsData,
    plan_indices: np.ndarray,
    shard: int,
    nlsq_params: NlsqParameters,
    sigma_lag: np.ndarray,
    *,
    mode: str,
    L: float,
    prior: PriorSettings,
    registry: Registry = REGISTRY,
    model: ModelSettings | None = None,
) -> ShardInputs:
    mode = canonical_mode(mode)
    model = model or ModelSettings()
    _check_same_fit(nlsq_params, mode, model)
    names = registry.physical_names(mode)
    n_phi = data.n_phi
    num_shards = plan_indices.shape[0]
    ids, blocks = _shard_blocks(plan_indices, shard, n_phi, data.n_t)
    noise_scale = noise_scale_from_nlsq(nlsq_params)
    fit_data = make_fit_data(data.c2_exp, np.asarray(sigma_lag) * noise_scale["sigma_factor"])
    scaling_mode = nlsq_params.scaling_mode
    c0 = np.array([p.contrast.value for p in nlsq_params.per_angle])
    o0 = np.array([p.offset.value for p in nlsq_params.per_angle])
    if c0.size != n_phi:
        raise DataError(f"the NLSQ result has {c0.size} angles; the data has {n_phi}")
    if scaling_mode == "constant":
        c0, o0 = quantile_estimates(np.asarray(data.c2_exp, float), registry)
    smap, psi0 = build_map(scaling_mode, np.asarray(data.phi_angles_list, float), c0, o0)
    mu, sd, lo, hi = _prior_arrays(names, registry, prior, nlsq_params)
    s_names, s_cols, s_lo, s_hi, s_mu, s_sd, s_start = _scaling_space(
        scaling_mode, n_phi, np.asarray(psi0, dtype=np.float64), registry
    )
    space = make_space(
        [*names, *s_names],
        [*lo, *s_lo],
        [*hi, *s_hi],
        [*mu, *s_mu],
        [*sd, *s_sd],
        columns=[*((n, None) for n in names), *s_cols],
        t=data.t1,
    )
    init_physical = [
        float(np.clip(nlsq_params.parameters[n].value, lo[k], hi[k])) for k, n in enumerate(names)
    ]
    # the NLSQ optimum may have a negative mean shear rate; its mirror image has the same c2
    init_theta = with_shear_convention(np.array([*init_physical, *s_start]), space)
    cov_theta = nlsq_likelihood_covariance(nlsq_params, names, space, init_theta, init_physical)
    space, start_theta, surrogate = place_surrogate(space, init_theta, cov_theta)
    # σ from the speckle model: the likelihood gets their curvature (module docstring)
    u_map, adjusted = adjustment_in(
        or_none(nlsq_params.curvature_adjustment), names, init_theta, init_physical,
        lambda th: w_from_theta(th, space, COMBINATION), np.asarray(space.prior_sigma) ** 2,
    )  # fmt: skip
    inp = ShardInputs(
        mode=mode,
        names=names,
        model=model,
        grid=make_grid(data.t1, data.phi_angles_list, data.q, L, data.dt, **model.to_mapping()),
        blocks=jnp.asarray(blocks),
        n_points=int(ids.size),
        n_phi=n_phi,
        scaling_mode=scaling_mode,
        scaling_matrix=smap.matrix,
        scaling_fixed=smap.fixed,
        space=space,
        init_theta=start_theta,
        num_shards=num_shards,
        noise_scale=noise_scale,
        points=tuple(gather_points(fit_data, jnp.asarray(blocks[0]))),
        adjustment=u_map,
        adjusted=adjusted,
        surrogate=surrogate,
    )
    return _anchored(inp, plan_indices, fit_data, data.n_t, cov_theta)


#: points of the plan the likelihood's maximum is found on (a larger plan: its first
#: shards, each a random sample of every angle, the likelihood scaled up)
REFERENCE_POINTS = 200_000


def _anchored(inp: ShardInputs, plan_indices, fit_data, n_t: int, cov_theta) -> ShardInputs:
    """``inp`` with the curvature adjustment centred on the likelihood's maximum in u
    (:func:`~homodyne_steps.inference.surrogate.likelihood_maximum`) and G placed from
    there; every shard finds the same maximum on the same points. Unchanged without an
    adjustment or where NLSQ's optimum already is the maximum."""
    if inp.adjustment is None:
        return inp
    n_total = inp.n_phi * (n_t * (n_t - 1) // 2)
    rows = np.asarray(plan_indices, dtype=np.int64)
    per_row = (rows < n_total).sum(axis=1)
    n_rows = int(np.searchsorted(np.cumsum(per_row), REFERENCE_POINTS)) + 1
    _, blocks = _shard_blocks(rows[:n_rows].reshape(1, -1), 0, inp.n_phi, n_t)
    points = tuple(gather_points(fit_data, jnp.asarray(blocks[0])))
    loglik = _loglik_fn(replace(inp, points=points, adjustment=None))
    factor = float(per_row.sum() / per_row[:n_rows].sum())
    space = inp.space

    def loglik_u(u):
        return factor * loglik(theta_from_w(u, space, COMBINATION))[0]

    u0, matrix = inp.adjustment
    u_max, record = likelihood_maximum(space, loglik_u, u0)
    record["points"] = int(per_row[:n_rows].sum())
    if u_max is None:
        return replace(inp, surrogate={**inp.surrogate, "likelihood_maximum": record})
    nlsq_theta = np.asarray(theta_from_w(jnp.asarray(u0), space, COMBINATION))
    space, start_theta, surrogate = place_surrogate(space, nlsq_theta, cov_theta, u_max=u_max)
    theta_max = np.asarray(theta_from_w(jnp.asarray(u_max), space, COMBINATION))
    record["at"] = dict(zip(space.names, map(float, theta_max), strict=True))
    return replace(
        inp, space=space, init_theta=start_theta, adjustment=(u_max, matrix),
        surrogate={**surrogate, "likelihood_maximum": record},
    )  # fmt: skip


def _shard_blocks(plan_indices: np.ndarray, shard: int, n_phi: int, n_t: int):
    """(point ids, (1, n_phi, m) blocks of them by angle) of one shard of the plan."""
    n_pairs = n_t * (n_t - 1) // 2
    n_total = n_phi * n_pairs
    num_shards = plan_indices.shape[0]
    if not 0 <= shard < num_shards:
        raise DataError(f"shard {shard} is not in the plan's 0..{num_shards - 1}")
    ids = np.asarray(plan_indices[shard], dtype=np.int64)
    ids = ids[ids < n_total]
    if ids.size == 0 or (ids.max() >= n_total):
        raise DataError("the shard plan does not match the data (point ids out of range)")
    # angle_blocks groups *positions* 0..n-1 by angle (padding n); map them back to the
    # shard's point ids (padding N).
    local = angle_blocks(np.arange(ids.size)[None, :], ids // n_pairs, n_phi)
    return ids, np.where(local < ids.size, ids[np.minimum(local, ids.size - 1)], n_total)


def noise_scale_from_nlsq(nlsq_params: NlsqParameters) -> dict[str, Any]:
    """How σ is scaled (:func:`noise.noise_scale_record`), from the NLSQ result."""
    chi2_red = nlsq_params.reduced_chi_squared
    if not (math.isfinite(chi2_red) and chi2_red > 0):
        raise DataError(
            f"the NLSQ result's reduced_chi_squared is {chi2_red!r}; the CMC likelihood needs "
            "a finite value > 0 to scale σ (is the NLSQ fit failed?)"
        )
    return noise_scale_record(float(chi2_red))


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
        _loglik_fn(inp),
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
