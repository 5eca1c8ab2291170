r"""One CMC shard: NumPyro NUTS on a stratified subset of the points.

Likelihood: the same kernel and noise model as the NLSQ fit. The shard's points (ids in
the NLSQ sense: angle × upper-triangle pair) are arranged in per-angle blocks, and the
NLSQ pass (:func:`homodyne_steps.nlsq._accumulate`, here differentiated in reverse mode)
gives the per-angle sums Σw²G², Σw²G, Σw², Σw²Gd, Σw²d, Σw²d² at θ, with G = g1² and
w = 1/σ(angle, lag) from the NLSQ noise estimate. Then, per angle a::

    sampled scaling:   log L = −½ (c² ΣGG + 2co ΣG + o² Σ1 − 2c ΣGd − 2o Σd + Σdd)
    varpro (default):  contrast and offset integrated out under a flat prior:
                       log L = −½ χ²_min,a(θ) − ½ log det [[ΣGG, ΣG], [ΣG, Σ1]]

the Bayesian counterpart of NLSQ's variable projection: the sampler explores only the
3 or 7 physical parameters, and the scaling uncertainty is carried into them.

Priors: TruncatedNormal(μ, σ) in the registry bounds (``prior.type: registry``), or
centred on the NLSQ value with width k·σ_NLSQ (``nlsq``), clipped to the bounds. With
``prior.tempering`` each shard sees prior^(1/K), so the product of the K shard
posteriors is the full posterior (the basis of consensus Monte Carlo).

Optional reparameterisation ``log_reference``: D0 and γ̇0 are sampled as
u = log D0 + alpha·log t_ref (the log diffusion coefficient at the geometric-mean time
of the data, which the data pin down almost independently of alpha), likewise for
γ̇0 and beta; the prior density is carried over with the Jacobian, and outputs are
transformed back to D0 and γ̇0.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from homodyne_steps._jax import jax, jnp
from homodyne_steps.coordinates import (
    POWER_LAWS,
    power_law_from_rates,
    rates_from_power_law,
    split_times,
)
from homodyne_steps.dataset import XpcsData
from homodyne_steps.errors import ConfigError, DataError
from homodyne_steps.model import make_grid
from homodyne_steps.nlsq import (
    Stats,
    angle_blocks,
    block_stats,
    chi_squared_per_angle,
    gather_points,
    make_fit_data,
)
from homodyne_steps.registry import REGISTRY, Registry, canonical_mode
from homodyne_steps.scaling import build_map, quantile_estimates
from homodyne_steps.serialise import atomic_path, read_json, read_npz, write_json
from homodyne_steps.settings import check_keys, get_bool, get_choice, get_int, get_number


@dataclass(frozen=True)
class SamplerSettings:
    num_warmup: int = 300
    num_samples: int = 500
    num_chains: int = 2
    target_accept: float = 0.8
    max_tree_depth: int = 8
    dense_mass: bool = True
    seed: int = 0
    reparameterize: str = "rates"  # rates | log_reference | none
    adapt_mass_matrix: bool = False  # False: keep the NLSQ-derived metric when available

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None, where: str = "cmc.sampler"):
        m = dict(m or {})
        d = cls()
        check_keys(m, set(d.__dataclass_fields__), where)
        return cls(
            num_warmup=get_int(m, "num_warmup", d.num_warmup, where, minimum=10),
            num_samples=get_int(m, "num_samples", d.num_samples, where, minimum=10),
            num_chains=get_int(m, "num_chains", d.num_chains, where, minimum=1),
            target_accept=get_number(
                m,
                "target_accept",
                d.target_accept,
                where,
                minimum=0.0,
                exclusive_minimum=True,
                maximum=0.999,
            ),
            max_tree_depth=get_int(m, "max_tree_depth", d.max_tree_depth, where, minimum=1),
            dense_mass=get_bool(m, "dense_mass", d.dense_mass, where),
            seed=get_int(m, "seed", d.seed, where, minimum=0),
            reparameterize=get_choice(
                m, "reparameterize", d.reparameterize, ("rates", "log_reference", "none"), where
            ),
            adapt_mass_matrix=get_bool(m, "adapt_mass_matrix", d.adapt_mass_matrix, where),
        )


@dataclass(frozen=True)
class PriorSettings:
    type: str = "registry"  # registry | nlsq
    nlsq_width: float = 5.0  # k in k·σ_NLSQ
    tempering: bool = True

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None, where: str = "cmc.prior"):
        m = dict(m or {})
        check_keys(m, {"type", "nlsq_width", "tempering"}, where)
        return cls(
            type=get_choice(m, "type", "registry", ("registry", "nlsq"), where),
            nlsq_width=get_number(m, "nlsq_width", 5.0, where, minimum=0.0, exclusive_minimum=True),
            tempering=get_bool(m, "tempering", True, where),
        )


@dataclass
class ShardInputs:
    """Everything one shard's model needs, resolved from the stage inputs."""

    mode: str
    names: tuple[str, ...]
    grid: Any
    data: Any  # nlsq.FitData
    blocks: Any  # (1, n_phi, m) point ids
    n_points: int
    n_phi: int
    scaling_mode: str
    scaling_matrix: np.ndarray
    scaling_fixed: np.ndarray
    scaling_names: tuple[str, ...]
    init_physical: dict[str, float]
    init_psi: np.ndarray
    prior_mu: np.ndarray
    prior_sigma: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    log_t_ref: float
    num_shards: int
    t_early: Any = None  # measured times (s) of the early and late halves of the run
    t_late: Any = None
    points: tuple = ()  # (i, j, a, d, w) of the shard's blocks: constant over the sampling


def _prior_arrays(names, registry: Registry, prior: PriorSettings, nlsq: Mapping[str, Any]):
    lo, hi = registry.bounds(names)
    mu = np.array([registry[n].prior_mu for n in names])
    sd = np.array([registry[n].prior_sigma for n in names])
    if prior.type == "nlsq":
        for k, n in enumerate(names):
            p = nlsq["parameters"][n]
            if p.get("uncertainty") is None or not p["uncertainty"] > 0:
                raise DataError(
                    f"cmc.prior.type nlsq: the NLSQ result has no usable uncertainty for {n}"
                )
            mu[k] = np.clip(p["value"], lo[k], hi[k])
            sd[k] = prior.nlsq_width * p["uncertainty"]
    return mu, sd, lo, hi


def _truncated_normal(inp: ShardInputs, k: int):
    import numpyro.distributions as dist

    return dist.TruncatedNormal(
        inp.prior_mu[k], inp.prior_sigma[k], low=inp.lower[k], high=inp.upper[k]
    )


def _prior_log_density(inp: ShardInputs, k: int, x):
    """Log prior density of parameter k at x; −inf outside its bounds."""
    inside = (x >= inp.lower[k]) & (x <= inp.upper[k])
    xc = jnp.clip(x, inp.lower[k], inp.upper[k])
    return jnp.where(inside, _truncated_normal(inp, k).log_prob(xc), -jnp.inf)


def _model(inp: ShardInputs, prior: PriorSettings, reparam: str):
    """NumPyro model of one shard.

    Prior tempering scales the prior *density of the physical parameters* by 1/K; the
    Jacobian of a reparameterisation is not tempered (it is a change of coordinates,
    not information), so the shard posterior as a measure on the physical parameters
    is the same whichever parameterisation is sampled.
    """
    import numpyro
    import numpyro.distributions as dist

    temper = 1.0 / inp.num_shards if prior.tempering else 1.0
    values: list[Any] = [None] * len(inp.names)
    groups = [g for g in POWER_LAWS if g[0] in inp.names] if reparam != "none" else []
    # log_reference replaces the amplitude; rates replace the amplitude and the offset
    replaced = {
        n for g in groups for n in ((g[0],) if reparam == "log_reference" else (g[0], g[2]))
    }
    with numpyro.handlers.scale(scale=temper):
        for k, name in enumerate(inp.names):
            if name not in replaced:
                values[k] = numpyro.sample(name, _truncated_normal(inp, k))
        psi = None
        if inp.scaling_mode not in ("varpro", "constant") and inp.scaling_matrix.shape[1]:
            psi = _sample_scaling(inp)
    flat = dist.ImproperUniform(dist.constraints.real, (), ())
    for amp, exp_name, off, rate_names in groups:
        ka, ke, ko = (inp.names.index(n) for n in (amp, exp_name, off))
        exponent = values[ke]
        if reparam == "log_reference":
            # u = log amplitude + exponent · log t_ref: the log of the rate at t_ref
            u = numpyro.sample(f"log_{amp}_ref", flat)
            values[ka] = jnp.exp(u - exponent * inp.log_t_ref)
            log_jac = jnp.log(values[ka])
            log_prior = _prior_log_density(inp, ka, values[ka])
        else:  # rates: the means of D(t) (γ̇(t)) over the early and late halves
            early = numpyro.sample(rate_names[0], flat)
            late = numpyro.sample(rate_names[1], flat)
            values[ka], values[ko], gap = power_law_from_rates(
                early, late, exponent, inp.t_early, inp.t_late
            )
            log_jac = -jnp.log(jnp.abs(gap))
            log_prior = _prior_log_density(inp, ka, values[ka]) + _prior_log_density(
                inp, ko, values[ko]
            )
        numpyro.factor(f"prior_{amp}", temper * log_prior + log_jac)
        numpyro.deterministic(amp, values[ka])
        if reparam == "rates":
            numpyro.deterministic(off, values[ko])
    physical = jnp.stack(values)
    st = Stats(*block_stats(physical, inp.grid, *inp.points, False))
    if inp.scaling_mode == "varpro":
        det = st.s_gg * st.s_1 - st.s_g**2
        c = (st.s_1 * st.s_gd - st.s_g * st.s_d) / det
        o = (st.s_gg * st.s_d - st.s_g * st.s_gd) / det
        loglik = -0.5 * jnp.sum(chi_squared_per_angle(st, c, o)) - 0.5 * jnp.sum(jnp.log(det))
        numpyro.deterministic("contrast", c)
        numpyro.deterministic("offset", o)
    else:
        s = inp.scaling_fixed + (0.0 if psi is None else jnp.asarray(inp.scaling_matrix) @ psi)
        c, o = s[: inp.n_phi], s[inp.n_phi :]
        loglik = -0.5 * jnp.sum(chi_squared_per_angle(st, c, o))
        if psi is not None and inp.scaling_mode != "individual":
            numpyro.deterministic("contrast", c)
            numpyro.deterministic("offset", o)
    numpyro.factor("loglik", loglik)


def _sample_scaling(inp: ShardInputs):
    import numpyro
    import numpyro.distributions as dist

    reg = REGISTRY
    if inp.scaling_mode == "individual":
        cs, os_ = reg["contrast"], reg["offset"]
        c = numpyro.sample(
            "contrast",
            dist.TruncatedNormal(cs.prior_mu, cs.prior_sigma, low=cs.lower, high=cs.upper).expand(
                [inp.n_phi]
            ),
        )
        o = numpyro.sample(
            "offset",
            dist.TruncatedNormal(
                os_.prior_mu, os_.prior_sigma, low=os_.lower, high=os_.upper
            ).expand([inp.n_phi]),
        )
        return jnp.concatenate([c, o])
    if inp.scaling_mode == "auto":
        cs, os_ = reg["contrast"], reg["offset"]
        c = numpyro.sample(
            "contrast_shared",
            dist.TruncatedNormal(cs.prior_mu, cs.prior_sigma, low=cs.lower, high=cs.upper),
        )
        o = numpyro.sample(
            "offset_shared",
            dist.TruncatedNormal(os_.prior_mu, os_.prior_sigma, low=os_.lower, high=os_.upper),
        )
        return jnp.stack([c, o])
    # fourier: coefficients around the NLSQ-consistent start, weakly informative
    return numpyro.sample(
        "scaling_coefficients", dist.Normal(jnp.asarray(inp.init_psi), 1.0).to_event(1)
    )


def prepare_shard(
    data: XpcsData,
    plan_indices: np.ndarray,
    shard: int,
    nlsq_params: Mapping[str, Any],
    sigma_lag: np.ndarray,
    *,
    mode: str,
    L: float,
    prior: PriorSettings,
    registry: Registry = REGISTRY,
) -> ShardInputs:
    mode = canonical_mode(mode)
    if nlsq_params.get("analysis_mode") != mode:
        raise DataError(
            f"the NLSQ result is for {nlsq_params.get('analysis_mode')!r} mode, not {mode!r}"
        )
    names = registry.physical_names(mode)
    n_phi, n_t = data.n_phi, data.n_t
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
    blocks = np.where(local < ids.size, ids[np.minimum(local, ids.size - 1)], n_total)
    fit_data = make_fit_data(data.c2_exp, sigma_lag)
    scaling_mode = nlsq_params.get("per_angle_scaling", "varpro")
    c0 = np.array([p["contrast"]["value"] for p in nlsq_params["per_angle"]])
    o0 = np.array([p["offset"]["value"] for p in nlsq_params["per_angle"]])
    if c0.size != n_phi:
        raise DataError(f"the NLSQ result has {c0.size} angles; the data has {n_phi}")
    if scaling_mode == "constant":
        c0, o0 = quantile_estimates(np.asarray(data.c2_exp, float), registry)
    smap, psi0 = build_map(scaling_mode, np.asarray(data.phi_angles_list, float), c0, o0)
    mu, sd, lo, hi = _prior_arrays(names, registry, prior, nlsq_params)
    t = np.asarray(data.t1, dtype=np.float64)
    t_pos = t[t > 0]
    t_halves = split_times(t_pos) if t_pos.size >= 2 else (None, None)
    return ShardInputs(
        mode=mode,
        names=names,
        grid=make_grid(data.t1, data.phi_angles_list, data.q, L, data.dt),
        data=fit_data,
        blocks=jnp.asarray(blocks),
        n_points=int(ids.size),
        n_phi=n_phi,
        scaling_mode=scaling_mode,
        scaling_matrix=smap.matrix,
        scaling_fixed=smap.fixed,
        scaling_names=smap.names,
        init_physical={
            n: float(np.clip(nlsq_params["parameters"][n]["value"], lo[k], hi[k]))
            for k, n in enumerate(names)
        },
        init_psi=psi0,
        prior_mu=mu,
        prior_sigma=sd,
        lower=lo,
        upper=hi,
        log_t_ref=float(np.mean(np.log(t_pos))) if t_pos.size else 0.0,
        t_early=t_halves[0],
        t_late=t_halves[1],
        num_shards=num_shards,
        points=tuple(gather_points(fit_data, jnp.asarray(blocks[0]))),
    )


def _init_values(inp: ShardInputs, reparam: str) -> dict[str, Any]:
    values: dict[str, Any] = dict(inp.init_physical)
    for amp, exp_name, off, (early, late) in POWER_LAWS:
        if reparam == "none" or amp not in values:
            continue
        x = values.pop(amp)
        if reparam == "log_reference":
            values[f"log_{amp}_ref"] = math.log(x) + values[exp_name] * inp.log_t_ref
        else:
            rates = rates_from_power_law(
                x, values[exp_name], values.pop(off), inp.t_early, inp.t_late
            )
            values[early], values[late] = (float(r) for r in rates)
    if inp.scaling_mode == "individual":
        values["contrast"] = np.clip(inp.init_psi[: inp.n_phi], 1e-3, 1 - 1e-3)
        values["offset"] = np.clip(inp.init_psi[inp.n_phi :], 0.5 + 1e-3, 1.5 - 1e-3)
    elif inp.scaling_mode == "auto":
        values["contrast_shared"], values["offset_shared"] = (float(x) for x in inp.init_psi)
    elif inp.scaling_mode == "fourier":
        values["scaling_coefficients"] = inp.init_psi
    return {k: jnp.asarray(v) for k, v in values.items()}


@dataclass
class ShardMode:
    """The shard posterior's mode in the sampler's unconstrained coordinates and the
    inverse Hessian of the potential there (the Laplace covariance: NUTS's metric)."""

    sites: tuple[str, ...]
    values: dict[str, Any]  # the sampled sites' values at the mode
    inverse_mass: np.ndarray | None  # over ravel(z[s] for s in sites)
    status: str
    iterations: int
    potential: float
    seconds: float


def shard_mode(model, init_values: Mapping[str, Any], max_iterations: int = 40) -> ShardMode:
    """Damped Newton on the potential (−log posterior) in NumPyro's unconstrained space.

    The Hessian is exact (JAX), so the metric includes the prior, the varpro log-det
    term and the curvature of the bound transforms: the Gaussian NUTS actually sees.
    """
    from jax.flatten_util import ravel_pytree
    from numpyro.infer import init_to_value
    from numpyro.infer.util import initialize_model

    t0 = time.perf_counter()
    info = initialize_model(
        jax.random.PRNGKey(0), model, init_strategy=init_to_value(values=dict(init_values))
    )
    z0 = info.param_info.z
    sites = tuple(z0)
    flat0, unravel = ravel_pytree(tuple(z0[k] for k in sites))

    def potential(flat):
        return info.potential_fn(dict(zip(sites, unravel(flat), strict=True)))

    value_and_grad = jax.jit(jax.value_and_grad(potential))
    hessian = jax.jit(jax.hessian(potential))
    x = np.asarray(flat0, dtype=np.float64)
    f, g = (np.asarray(v, dtype=np.float64) for v in value_and_grad(x))
    status, it, lam = "max_iterations", 0, 1e-3
    for it in range(1, max_iterations + 1):  # noqa: B007
        if not (np.isfinite(f) and np.all(np.isfinite(g))):
            status = "failed"
            break
        h = np.asarray(hessian(x), dtype=np.float64)
        h = 0.5 * (h + h.T)
        scale = np.sqrt(np.clip(np.abs(np.diag(h)), 1e-300, None))
        hs, gs = h / np.outer(scale, scale), g / scale
        evals = np.linalg.eigvalsh(hs)
        if evals[0] > 0 and gs @ np.linalg.solve(hs, gs) < 1e-6:
            status = "converged"
            break
        accepted = False
        while lam < 1e12:
            shift = lam + max(0.0, -evals[0] * 1.01)
            step = -np.linalg.solve(hs + shift * np.eye(x.size), gs) / scale
            f_new, g_new = (np.asarray(v, dtype=np.float64) for v in value_and_grad(x + step))
            if np.isfinite(f_new) and f_new < f:
                x, f, g, accepted = x + step, f_new, g_new, True
                lam = max(lam / 10.0, 1e-9)
                break
            lam *= 10.0
        if not accepted:
            status = "stalled"
            break
    inverse_mass = None
    if status != "failed":
        h = np.asarray(hessian(x), dtype=np.float64)
        evals, evecs = np.linalg.eigh(0.5 * (h + h.T))
        if evals[0] > 0:
            inverse_mass = (evecs / evals) @ evecs.T
    constrained = info.postprocess_fn(dict(zip(sites, unravel(jnp.asarray(x)), strict=True)))
    values = {k: constrained[k] for k in sites}
    return ShardMode(sites, values, inverse_mass, status, it, float(f), time.perf_counter() - t0)


def run_shard(inp: ShardInputs, sampler: SamplerSettings, prior: PriorSettings, shard: int = 0):
    """Sample one shard; returns (InferenceData, record dict)."""
    import arviz as az
    from numpyro.infer import MCMC, NUTS, init_to_value

    model = partial(_model, inp, prior, sampler.reparameterize)
    mode = shard_mode(model, _init_values(inp, sampler.reparameterize))
    metric = mode.inverse_mass
    kernel = NUTS(
        model,
        init_strategy=init_to_value(values=mode.values),
        target_accept_prob=sampler.target_accept,
        max_tree_depth=sampler.max_tree_depth,
        dense_mass=[mode.sites] if sampler.dense_mass else False,
        inverse_mass_matrix=(
            {mode.sites: metric if sampler.dense_mass else np.diag(metric)}
            if metric is not None
            else None
        ),
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
    idata = az.from_numpyro(mcmc)
    extra = mcmc.get_extra_fields(group_by_chain=True)
    num_steps = np.asarray(extra["num_steps"])
    tree_depth = np.floor(np.log2(np.maximum(num_steps, 1))).astype(int) + 1
    step_size = np.asarray(extra["adapt_state.step_size"])
    accept = np.asarray(extra["accept_prob"])
    diverging = np.asarray(extra["diverging"])
    idata.sample_stats["tree_depth"] = (("chain", "draw"), tree_depth)
    idata.sample_stats["step_size"] = (("chain", "draw"), step_size)
    idata.sample_stats["acceptance_rate"] = (("chain", "draw"), accept)
    idata.sample_stats["diverging"] = (("chain", "draw"), diverging.astype(bool))
    idata.sample_stats["energy"] = (("chain", "draw"), np.asarray(extra["energy"]))
    n_draws = diverging.size
    record = {
        "num_chains": sampler.num_chains,
        "num_warmup": sampler.num_warmup,
        "num_samples": sampler.num_samples,
        "divergences": int(diverging.sum()),
        "divergence_rate": float(diverging.sum() / n_draws),
        "step_size": float(np.mean(step_size)),
        "mean_tree_depth": float(tree_depth.mean()),
        "max_tree_depth_hits": int(np.sum(tree_depth > sampler.max_tree_depth)),
        "acceptance_rate": float(accept.mean()),
        "timings": {"warmup_s": t1 - t0, "sampling_s": t2 - t1, "total_s": t2 - t0},
        "metric": (
            "Laplace covariance at the shard's mode (fixed)"
            if metric is not None and not sampler.adapt_mass_matrix
            else "adapted by NumPyro"
        ),
        "mode": {
            "status": mode.status,
            "newton_iterations": mode.iterations,
            "potential": mode.potential,
            "seconds": mode.seconds,
        },
    }
    return idata, record


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
) -> dict[str, Any]:
    """Sample shard ``shard`` of the plan; write its InferenceData and record."""
    t_start = time.perf_counter()
    registry = REGISTRY.with_overrides(parameter_overrides)
    data = XpcsData.from_npz(qc_npz)
    plan = read_npz(plan_npz, required=("indices",))["indices"]
    nlsq_params = read_json(nlsq_parameters)
    sigma_lag = read_npz(nlsq_fitted, required=("sigma_per_lag",))["sigma_per_lag"]
    if sigma_lag.shape != (data.n_phi, data.n_t):
        raise DataError(
            f"{nlsq_fitted}: sigma_per_lag has shape {sigma_lag.shape}; the data needs "
            f"{(data.n_phi, data.n_t)} (was the NLSQ fit run on this data?)"
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
            "prior_tempering": 1.0 / inp.num_shards if prior.tempering else 1.0,
            "reparameterize": sampler.reparameterize,
            # the combination works in the sampled coordinates; these define them
            "rates_t_early_s": np.asarray(inp.t_early, dtype=np.float64),
            "rates_t_late_s": np.asarray(inp.t_late, dtype=np.float64),
        }
    )
    for attr in ("shard", "num_shards"):
        idata.posterior.attrs[attr] = int(idata.posterior.attrs[attr])
    record = {
        "shard": shard,
        "num_shards": inp.num_shards,
        "n_points": inp.n_points,
        "seed": sampler.seed,
        "analysis_mode": inp.mode,
        "per_angle_scaling": inp.scaling_mode,
        "parameters": list(inp.names),
        "prior": {
            "type": prior.type,
            "tempering": prior.tempering,
            "mu": inp.prior_mu.tolist(),
            "sigma": inp.prior_sigma.tolist(),
        },
        **record,
    }
    # Compilation happens inside the first warmup call; the warmup time includes it.
    record["timings"]["prepare_s"] = t_prep - t_start
    record["timings"]["compile_and_warmup_s"] = record["timings"].pop("warmup_s")
    record["timings"]["total_s"] = time.perf_counter() - t_start
    _write_netcdf(idata, out_nc)
    write_json(out_json, record)
    return record


def _write_netcdf(idata, path: str | os.PathLike[str]) -> Path:
    with atomic_path(path) as tmp:
        idata.to_netcdf(str(tmp), engine="h5netcdf")
    return Path(path)


__all__ = [
    "SamplerSettings",
    "PriorSettings",
    "cmc_shard_stage",
    "prepare_shard",
    "run_shard",
    "ConfigError",
]
