"""The CMC shard plan: how many shards, and which points each one holds.

Points are the NLSQ fit's (ids = angle × upper-triangle pair). Shards are
angle-stratified: within each angle the points are shuffled with the plan's seed and
dealt round-robin, so every shard holds every angle in proportion and spans all lags
and ages (:func:`homodyne_steps.inference.stratify.stratified_plan`).

Only points with finite c2 are planned and counted: a masked (NaN) element has weight 0
in the likelihood, so it would fill a shard without informing it, and counting it would
let the size and information rules below allow more shards than the data support. The
ids keep their meaning (id = angle × n_pairs + pair over *all* pairs); masked ids simply
appear in no shard, and padding is n_ids = n_angles × n_pairs.

Shard count (``num_shards: auto``), every decision recorded in plan.json:

1. by size: K = ceil(N / max_points_per_shard) — NUTS cost per step grows with the
   points of a shard; smaller shards run in parallel on a cluster's nodes;
2. by information: at most N / (min_points_per_parameter × n_sampled_parameters)
   shards, so each shard's posterior is dominated by its data (and close to Gaussian),
   which consensus combination assumes; this bound wins when the two disagree;
3. one shard when the sampling coordinates cannot be sharded
   (:data:`coordinates.SHARDABLE_COORDINATES`; an explicit count > 1 is refused).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from homodyne_steps.errors import ConfigError, DataError
from homodyne_steps.inference.stratify import diagnose, stratified_plan
from homodyne_steps.io.cmc_files import CmcPlan, PlanDecision
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.io.serialise import write_npz
from homodyne_steps.physics.coordinates import (
    DEFAULT_COORDINATES,
    SAMPLING_COORDINATES,
    SHARDABLE_COORDINATES,
)
from homodyne_steps.physics.registry import REGISTRY, canonical_mode
from homodyne_steps.physics.scaling import fourier_order
from homodyne_steps.settings import check_keys, get_int

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ShardingSettings:
    num_shards: int | str = "auto"
    max_points_per_shard: int = 50_000
    min_points_per_parameter: int = 2_000
    seed: int = 0

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None, where: str = "cmc.sharding"):
        m = dict(m or {})
        check_keys(
            m, {"num_shards", "max_points_per_shard", "min_points_per_parameter", "seed"}, where
        )
        num = m.get("num_shards", "auto")
        if num != "auto" and (not isinstance(num, int) or isinstance(num, bool) or num < 1):
            raise ConfigError(
                f"{where}.num_shards: expected 'auto' or an integer >= 1, got {num!r}"
            )
        return cls(
            num_shards=num,
            max_points_per_shard=get_int(m, "max_points_per_shard", 50_000, where, minimum=100),
            min_points_per_parameter=get_int(
                m, "min_points_per_parameter", 2_000, where, minimum=1
            ),
            seed=get_int(m, "seed", 0, where, minimum=0),
        )


def finite_point_ids(c2: np.ndarray) -> np.ndarray:
    """Ids (angle * n_pairs + pair, ascending) of the upper-triangle points with finite
    c2: the points that carry weight in the likelihood."""
    c2 = np.asarray(c2)
    i, j = np.triu_indices(c2.shape[-1], k=1)
    finite = np.concatenate([np.isfinite(m[i, j]) for m in c2])
    return np.flatnonzero(finite)


def sampled_parameter_count(mode: str, scaling_mode: str, n_phi: int) -> int:
    """Parameters a shard's sampler explores (varpro/constant: physical only)."""
    n = len(REGISTRY.physical_names(canonical_mode(mode)))
    extra = {"individual": 2 * n_phi, "auto": 2, "fourier": 2 * (2 * fourier_order(n_phi) + 1)}
    return n + extra.get(scaling_mode, 0)


def choose_num_shards(
    n_points: int, n_params: int, s: ShardingSettings, sampling_coordinates: str = "rates"
) -> tuple[int, list]:
    decisions = []
    if sampling_coordinates not in SAMPLING_COORDINATES:
        raise ConfigError(
            f"cmc.sampler.reparameterize: {sampling_coordinates!r}; expected one of "
            f"{list(SAMPLING_COORDINATES)}"
        )
    if sampling_coordinates not in SHARDABLE_COORDINATES:
        why = (
            f"cmc.sampler.reparameterize {sampling_coordinates!r} samples the power laws' "
            "amplitudes, which cannot cross exponent = 0 at fixed rates: a shard whose "
            "exponent posterior reaches 0 is cut there, and consensus of cut shards is "
            f"wrong; only {' or '.join(SHARDABLE_COORDINATES)} can be sharded"
        )
        if s.num_shards not in ("auto", 1):
            raise ConfigError(f"cmc.sharding.num_shards: {s.num_shards} shards refused: {why}")
        decisions.append({"decision": "num_shards", "value": 1, "reason": f"one shard: {why}"})
        return 1, decisions
    if s.num_shards != "auto":
        k = int(s.num_shards)
        needed = s.min_points_per_parameter * n_params
        if k > 1 and n_points // k < needed:
            raise ConfigError(
                f"cmc.sharding.num_shards: {k} shards would hold {n_points // k} points each "
                f"({n_points} points / {k}); each needs at least min_points_per_parameter "
                f"{s.min_points_per_parameter} x {n_params} sampled parameters = {needed} "
                "so that its posterior is dominated by its data (near-Gaussian, as consensus "
                f"assumes). Use at most {max(1, n_points // needed)} shards, or 'auto'"
            )
        decisions.append(
            {
                "decision": "num_shards",
                "value": k,
                "reason": "set in the config (cmc.sharding.num_shards)",
            }
        )
        return k, decisions
    by_size = max(1, -(-n_points // s.max_points_per_shard))
    by_info = max(1, n_points // (s.min_points_per_parameter * n_params))
    k = min(by_size, by_info)
    decisions.append(
        {
            "decision": "num_shards",
            "value": k,
            "reason": (
                f"by size: ceil({n_points} points / max_points_per_shard "
                f"{s.max_points_per_shard}) = {by_size}; by information: {n_points} points / "
                f"(min_points_per_parameter {s.min_points_per_parameter} x {n_params} sampled "
                f"parameters) allows at most {by_info}; the smaller wins"
            ),
        }
    )
    return k, decisions


def cmc_plan_stage(
    qc_npz: str | os.PathLike[str],
    out_json: str | os.PathLike[str],
    out_npz: str | os.PathLike[str],
    *,
    mode: str,
    scaling_mode: str,
    settings: ShardingSettings,
    sampling_coordinates: str = DEFAULT_COORDINATES,
) -> CmcPlan:
    """Write ``plan.npz`` and ``plan.json``; returns the plan's record."""
    start = time.perf_counter()
    data = XpcsData.from_npz(qc_npz)
    n_pairs = data.n_t * (data.n_t - 1) // 2
    n_ids = data.n_phi * n_pairs
    ids = finite_point_ids(data.c2_exp)
    n_points = int(ids.size)
    if n_points == 0:
        raise DataError(
            f"{qc_npz}: no point with finite c2 above the diagonal ({n_ids} masked); "
            "nothing to sample"
        )
    n_params = sampled_parameter_count(mode, scaling_mode, data.n_phi)
    k, decisions = choose_num_shards(n_points, n_params, settings, sampling_coordinates)
    angle = ids // n_pairs  # point ids are angle-major
    t0 = time.perf_counter()
    plan = stratified_plan(angle, -(-n_points // k), seed=settings.seed)
    diag = diagnose(plan, angle, 1e3 * (time.perf_counter() - t0)).to_dict()
    decisions.append(
        {
            "decision": "assignment",
            "value": "angle-stratified, random within angle",
            "reason": (
                "every shard holds every angle in proportion and spans all lags, so each shard "
                "constrains every parameter; the within-angle shuffle (seed "
                f"{settings.seed}) keeps shards statistically alike"
            ),
        }
    )
    # The plan deals positions 0..n_points-1 of `ids` (padding n_points); map them back to
    # point ids (padding n_ids, which cmc_shard drops).
    pos = plan.indices
    mapped = np.where(pos < n_points, ids[np.minimum(pos, n_points - 1)], n_ids)
    indices = mapped.astype(np.int32 if n_ids < 2**31 - 1 else np.int64)
    write_npz(out_npz, indices=indices, n_points=np.int64(n_points), n_ids=np.int64(n_ids))
    record = CmcPlan(
        schema_version=SCHEMA_VERSION,
        num_shards=int(plan.n_chunks),
        n_points=n_points,
        n_masked=int(n_ids - n_points),
        n_angles=int(data.n_phi),
        n_time_points=int(data.n_t),
        n_sampled_parameters=n_params,
        analysis_mode=canonical_mode(mode),
        per_angle_scaling=scaling_mode,
        sampling_coordinates=sampling_coordinates,
        points_per_shard=[int(x) for x in plan.valid.sum(axis=1)],
        seed=settings.seed,
        settings=asdict(settings),
        decisions=[PlanDecision(**d) for d in decisions],
        stratification=diag,
        point_ids="id = angle * n_pairs + pair, pairs in numpy.triu_indices(n_t, 1) order; "
        "plan.npz 'indices' (num_shards, m), padded with n_ids = n_angles * n_pairs; ids "
        "of masked (non-finite) c2 are in no shard",
        duration_s=time.perf_counter() - start,
    )
    record.write(out_json)
    return record
