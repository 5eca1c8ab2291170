"""What one CMC shard samples, resolved from the stage's inputs: its points, its
likelihood (the NLSQ pass's statistics, varpro or sampled scaling, the curvature
adjustment centred on the likelihood's maximum), the sampled space with its priors and
the surrogate G, and where the sampler starts (:func:`prepare_shard`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from homodyne_steps._jax import jnp
from homodyne_steps.errors import DataError
from homodyne_steps.inference.cmc_shard_settings import PriorSettings
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
from homodyne_steps.inference.surrogate import (
    likelihood_maximum,
    nlsq_likelihood_covariance,
    place_surrogate,
)
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.io.nlsq_files import NlsqParameters
from homodyne_steps.io.record import or_none
from homodyne_steps.physics.cmc_space import (
    COMBINATION,
    SampledSpace,
    make_space,
    theta_from_w,
    w_from_theta,
    with_shear_convention,
)
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


def shard_loglik(inp: ShardInputs):
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
        init_theta=init_theta,
        num_shards=num_shards,
        noise_scale=noise_scale,
        points=tuple(gather_points(fit_data, jnp.asarray(blocks[0]))),
        adjustment=u_map,
        adjusted=adjusted,
    )
    u_max, anchor = _likelihood_maximum(inp, plan_indices, fit_data, data.n_t)
    space, start_theta, surrogate = place_surrogate(space, init_theta, cov_theta, u_max=u_max)
    if anchor is not None:
        surrogate["likelihood_maximum"] = anchor
    if u_max is not None:  # the adjustment is centred there (module docstring)
        u_map = (u_max, u_map[1])
    return replace(inp, space=space, init_theta=start_theta, adjustment=u_map, surrogate=surrogate)


#: points of the plan the likelihood's maximum is found on (a larger plan: its first
#: shards, each a random sample of every angle, the likelihood scaled up)
REFERENCE_POINTS = 200_000


def _likelihood_maximum(inp: ShardInputs, plan_indices, fit_data, n_t: int):
    """(the likelihood's maximum in u or None, its record or None): the centre of the
    curvature adjustment and of G
    (:func:`~homodyne_steps.inference.surrogate.likelihood_maximum`); every shard finds
    the same maximum on the same points. (None, None) without an adjustment; (None,
    record) where NLSQ's optimum already is the maximum."""
    if inp.adjustment is None:
        return None, None
    n_total = inp.n_phi * (n_t * (n_t - 1) // 2)
    rows = np.asarray(plan_indices, dtype=np.int64)
    per_row = (rows < n_total).sum(axis=1)
    n_rows = int(np.searchsorted(np.cumsum(per_row), REFERENCE_POINTS)) + 1
    _, blocks = _shard_blocks(rows[:n_rows].reshape(1, -1), 0, inp.n_phi, n_t)
    points = tuple(gather_points(fit_data, jnp.asarray(blocks[0])))
    loglik = shard_loglik(replace(inp, points=points, adjustment=None))
    factor = float(per_row.sum() / per_row[:n_rows].sum())
    space = inp.space

    def loglik_u(u):
        return factor * loglik(theta_from_w(u, space, COMBINATION))[0]

    u_max, record = likelihood_maximum(space, loglik_u, inp.adjustment[0])
    record["points"] = int(per_row[:n_rows].sum())
    if u_max is not None:
        theta_max = np.asarray(theta_from_w(jnp.asarray(u_max), space, COMBINATION))
        record["at"] = dict(zip(space.names, map(float, theta_max), strict=True))
    return u_max, record


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


__all__ = [
    "REFERENCE_POINTS",
    "ShardInputs",
    "noise_scale_from_nlsq",
    "prepare_shard",
    "shard_loglik",
]
