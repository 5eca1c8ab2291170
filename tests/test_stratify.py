"""Angle-stratified chunking: partition, balance, coverage, padding, diagnostics, settings."""

import json
import math
import time

import numpy as np
import pytest

from homodyne_steps.errors import ConfigError, DataError
from homodyne_steps.inference.stratify import (
    ChunkingSettings,
    ChunkPlan,
    contiguous_plan,
    diagnose,
    stratified_plan,
)


def angle_major(sizes):
    """Angle indices stored angle by angle, as c2 data are (angle 0's points first)."""
    return np.repeat(np.arange(len(sizes)), sizes)


def counts_per_chunk(plan: ChunkPlan, a: np.ndarray) -> np.ndarray:
    """(n_chunks, n_angles) point counts, from the plan's real entries."""
    out = np.zeros((plan.n_chunks, plan.n_angles), dtype=np.int64)
    for c in range(plan.n_chunks):
        idx = plan.indices[c][plan.valid[c]]
        out[c] = np.bincount(a[idx], minlength=plan.n_angles)
    return out


def assert_partition(plan: ChunkPlan) -> None:
    real = plan.indices[plan.valid]
    assert real.size == plan.n_points
    np.testing.assert_array_equal(np.sort(real), np.arange(plan.n_points))


CASES = [
    # (sizes per angle, chunk_size)
    ([1000, 1000, 1000], 500),
    ([997, 1013, 1001, 5], 331),
    ([10_000, 1_000, 37], 2000),
    ([7], 3),
    ([3, 0, 4], 2),  # an angle index with no points
    ([12], 100),  # one chunk
]


@pytest.mark.parametrize("seed", [None, 0, 7])
@pytest.mark.parametrize("sizes,chunk_size", CASES)
def test_every_point_exactly_once(sizes, chunk_size, seed):
    plan = stratified_plan(angle_major(sizes), chunk_size, seed=seed)
    assert plan.indices.dtype == np.int64
    assert plan.indices.shape == (plan.n_chunks, chunk_size)
    assert plan.n_chunks == math.ceil(sum(sizes) / chunk_size)
    assert_partition(plan)


@pytest.mark.parametrize("seed", [None, 3])
@pytest.mark.parametrize("sizes,chunk_size", CASES)
def test_balance_guarantee(sizes, chunk_size, seed):
    a = angle_major(sizes)
    plan = stratified_plan(a, chunk_size, seed=seed)
    k, n = plan.n_chunks, plan.n_points
    counts = counts_per_chunk(plan, a)
    # Per angle: floor or ceil of N_a / K in every chunk (counts differ by <= 1).
    for ang, n_a in enumerate(sizes):
        assert set(counts[:, ang]) <= {n_a // k, -(-n_a // k)}
        assert counts[:, ang].max() - counts[:, ang].min() <= 1
    # Chunk sizes: floor(N / K) + (c < N mod K), never above chunk_size.
    sizes_c = plan.valid.sum(axis=1)
    expected = n // k + (np.arange(k) < n % k)
    np.testing.assert_array_equal(sizes_c, expected)
    assert sizes_c.max() <= chunk_size


def test_every_chunk_holds_every_angle_when_each_angle_has_enough_points():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 6, 50_000)  # angles interleaved in random order this time
    plan = stratified_plan(a, 1_000)
    assert plan.n_chunks == 50
    assert np.bincount(a).min() >= plan.n_chunks
    assert (counts_per_chunk(plan, a) > 0).all()


def test_rare_angle_spread_over_distinct_chunks():
    a = angle_major([5000, 3])  # angle 1 has fewer points than there are chunks
    plan = stratified_plan(a, 500)
    counts = counts_per_chunk(plan, a)
    assert counts[:, 1].sum() == 3 and counts[:, 1].max() == 1


def test_proportions_match_global_within_one_point():
    sizes = [10_000, 1_000, 37]
    rng = np.random.default_rng(2)
    a = rng.permutation(angle_major(sizes))
    plan = stratified_plan(a, 2_000)
    k = plan.n_chunks
    counts = counts_per_chunk(plan, a)
    n_real = plan.valid.sum(axis=1)
    for c in range(k):
        for ang, n_a in enumerate(sizes):
            assert abs(counts[c, ang] - n_a / k) < 1
            # the chunk's share of the angle equals the global share to within a point
            assert abs(counts[c, ang] - n_real[c] * n_a / plan.n_points) <= 1


def test_seeded_plans_reproducible_and_differ_between_seeds():
    a = np.random.default_rng(3).integers(0, 4, 20_000)
    p1 = stratified_plan(a, 3_000, seed=11)
    p2 = stratified_plan(a, 3_000, seed=11)
    p3 = stratified_plan(a, 3_000, seed=12)
    p0 = stratified_plan(a, 3_000)
    np.testing.assert_array_equal(p1.indices, p2.indices)
    assert not np.array_equal(p1.indices, p3.indices)
    assert not np.array_equal(p1.indices, p0.indices)
    np.testing.assert_array_equal(p0.indices, stratified_plan(a, 3_000).indices)
    # chunk membership (not just order) differs between seeds
    assert set(p1.indices[0][p1.valid[0]]) != set(p3.indices[0][p3.valid[0]])
    for p in (p1, p3):
        assert_partition(p)
        counts = counts_per_chunk(p, a)
        assert (counts.max(axis=0) - counts.min(axis=0) <= 1).all()


def test_unseeded_chunk_spreads_over_whole_range_of_each_angle():
    sizes = [4000, 2500, 3001]
    a = angle_major(sizes)
    plan = stratified_plan(a, 1_000)
    k = plan.n_chunks
    for ang in range(len(sizes)):
        pts = np.flatnonzero(a == ang)
        for c in range(k):
            idx = plan.indices[c][plan.valid[c]]
            mine = np.sort(idx[a[idx] == ang])
            # round-robin: starts within the first K points, ends within the last K,
            # and steps by exactly K points of that angle
            assert mine[0] <= pts[k - 1] and mine[-1] >= pts[-k]
            np.testing.assert_array_equal(np.diff(np.searchsorted(pts, mine)), k)


def test_contiguous_plan_misses_angles_stratified_does_not():
    a = angle_major([1000, 1000, 1000])  # 3 angles, stored angle by angle
    naive = contiguous_plan(a, 500)
    assert_partition(naive)
    naive_counts = counts_per_chunk(naive, a)
    assert ((naive_counts > 0).sum(axis=1) == 1).all()  # every naive chunk has ONE angle
    d_naive = diagnose(naive, a, 1.0)
    assert d_naive.angle_coverage["min_coverage_ratio"] == pytest.approx(1 / 3)
    assert d_naive.angle_coverage["perfect_coverage_chunks"] == 0

    plan = stratified_plan(a, 500)
    counts = counts_per_chunk(plan, a)
    assert (counts > 0).all()
    assert set(counts.ravel()) <= {166, 167}  # 1000 points of each angle over 6 chunks
    d = diagnose(plan, a, 1.0)
    assert d.angle_coverage["min_coverage_ratio"] == 1.0
    assert d.angle_coverage["perfect_coverage_chunks"] == plan.n_chunks


def test_padding_equals_n_points_and_only_at_chunk_ends():
    a = angle_major([4, 4, 2])  # N = 10, chunk_size 4 -> 3 chunks of 4, 3, 3
    plan = stratified_plan(a, 4)
    np.testing.assert_array_equal(plan.indices, [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 10]])
    assert not plan.indices.flags.writeable
    for p in (plan, contiguous_plan(a, 4), stratified_plan(angle_major([5, 7, 1]), 5, seed=1)):
        pad = ~p.valid
        np.testing.assert_array_equal(p.indices[pad], p.n_points)
        # once padding starts in a chunk, the rest of that chunk is padding
        assert (np.diff(pad.astype(int), axis=1) >= 0).all()
    assert contiguous_plan(a, 4).indices.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 10]]


def test_padding_contract_dummy_point_with_zero_weight():
    """Gathering with one appended weight-0 dummy gives the same weighted sum as no chunks."""
    rng = np.random.default_rng(4)
    a = rng.integers(0, 3, 1_001)
    r = rng.standard_normal(1_001)
    w = rng.uniform(0.5, 2.0, 1_001)
    plan = stratified_plan(a, 300)
    r_ext, w_ext = np.append(r, 123.0), np.append(w, 0.0)
    total = sum(float(np.sum(w_ext[ix] * r_ext[ix] ** 2)) for ix in plan.indices)
    assert total == pytest.approx(float(np.sum(w * r**2)))
    clipped = sum(
        float(np.sum(np.take(w, ix, mode="clip") * np.take(r, ix, mode="clip") ** 2 * ok))
        for ix, ok in zip(plan.indices, plan.valid, strict=True)
    )
    assert clipped == pytest.approx(total)


def test_one_chunk_is_all_points_in_order():
    a = np.array([2, 0, 1, 1, 0])
    for p in (stratified_plan(a, 8), stratified_plan(a, 8, seed=5), stratified_plan(a, 5)):
        assert p.n_chunks == 1 and p.n_angles == 3
        np.testing.assert_array_equal(p.indices[0][: p.n_points], np.arange(5))
        np.testing.assert_array_equal(p.indices[0][p.n_points :], 5)


def test_diagnostics_known_small_case():
    # 3 angles x 4 points, chunk_size 5 -> K = 3 chunks of 4 real points each.
    a = angle_major([4, 4, 4])
    plan = stratified_plan(a, 5)
    np.testing.assert_array_equal(
        plan.indices, [[0, 3, 6, 9, 12], [1, 4, 7, 10, 12], [2, 5, 8, 11, 12]]
    )
    d = diagnose(plan, a, execution_time_ms=2.0)
    assert d.n_chunks == 3
    assert d.chunk_sizes == [4, 4, 4]
    assert d.chunk_balance == {"mean": 4.0, "std": 0.0, "min": 4.0, "max": 4.0, "cv": 0.0}
    assert d.angles_per_chunk == [3, 3, 3]
    assert d.angle_coverage["min_coverage_ratio"] == 1.0
    assert d.angle_coverage["perfect_coverage_chunks"] == 3
    assert d.angle_coverage["mean"] == 3.0
    # each angle's counts over chunks are a permutation of (2, 1, 1):
    # mean 4/3, std sqrt(2/9) -> cv = (sqrt(2)/3) / (4/3) = sqrt(2)/4
    assert d.per_angle_balance_cv == pytest.approx(math.sqrt(2) / 4)
    assert d.memory_overhead_mb == pytest.approx(15 * 8 / 1e6)
    assert d.throughput_points_per_sec == pytest.approx(12 / 2e-3)
    assert d.fill_fraction == pytest.approx(12 / 15)
    assert d.partition_ok and d.empty_angles == []

    # unequal chunk sizes: N = 10, chunk_size 4 -> sizes (4, 3, 3)
    # mean 10/3, std sqrt(2)/3 -> cv = sqrt(2)/10
    d2 = diagnose(stratified_plan(angle_major([4, 4, 2]), 4), angle_major([4, 4, 2]), 0.0)
    assert d2.chunk_sizes == [4, 3, 3]
    assert d2.chunk_balance["cv"] == pytest.approx(math.sqrt(2) / 10)
    assert d2.chunk_balance["std"] == pytest.approx(math.sqrt(2) / 3)
    assert d2.throughput_points_per_sec is None


def test_diagnostics_to_dict_is_strict_json_and_report_is_short():
    a = angle_major([30, 0, 20])
    d = diagnose(stratified_plan(a, 10), a, 0.0)
    data = d.to_dict()
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text)["empty_angles"] == [1]
    assert data["throughput_points_per_sec"] is None
    assert data["angle_coverage"]["min_coverage_ratio"] == 1.0  # empty angle not counted
    report = d.format_report()
    assert "Stratification diagnostics" in report and "angles with no data: [1]" in report
    assert 4 <= len(report.splitlines()) <= 10


def test_diagnostics_flag_a_broken_partition():
    a = angle_major([3, 3])
    bad = ChunkPlan(
        indices=np.array([[0, 1, 2], [0, 4, 5]], dtype=np.int64),
        n_points=6,
        n_angles=2,
        chunk_size=3,
        n_chunks=2,
    )
    d = diagnose(bad, a, 1.0)
    assert not d.partition_ok
    assert "WARNING" in d.format_report()
    with pytest.raises(DataError, match="6 points"):
        diagnose(bad, a[:5], 1.0)


@pytest.mark.parametrize("seed", [None, 1])
def test_large_plan_is_fast(seed):
    a = np.sort(np.random.default_rng(5).integers(0, 23, 3_000_000))
    start = time.perf_counter()
    plan = stratified_plan(a, 100_000, seed=seed)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"3 M-point plan took {elapsed:.2f} s"
    d = diagnose(plan, a, 1e3 * elapsed)
    assert d.partition_ok
    assert d.angle_coverage["perfect_coverage_chunks"] == plan.n_chunks == 30
    assert d.chunk_balance["cv"] == 0.0


@pytest.mark.parametrize(
    "a,match",
    [
        (np.array([], dtype=np.int64), "empty"),
        (np.array([0, 1, -1]), ">= 0"),
        (np.array([0.0, 1.0]), "integers"),
        (np.zeros((2, 2), dtype=np.int64), "1-D"),
    ],
)
def test_bad_angle_indices_are_data_errors(a, match):
    for build in (lambda: stratified_plan(a, 10), lambda: contiguous_plan(a, 10)):
        with pytest.raises(DataError, match=match):
            build()


@pytest.mark.parametrize("chunk_size", [0, -5, 2.5, True])
def test_bad_chunk_size_is_config_error(chunk_size):
    with pytest.raises(ConfigError, match="chunk_size"):
        stratified_plan(np.array([0, 1]), chunk_size)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "1"])
def test_bad_seed_is_config_error(seed):
    with pytest.raises(ConfigError, match="seed"):
        stratified_plan(np.array([0, 1, 0, 1]), 2, seed=seed)


def test_settings_defaults_round_trip_and_errors_name_the_key():
    s = ChunkingSettings.from_mapping(None)
    assert s == ChunkingSettings(chunk_size=50_000, stratify="auto")
    m = {"chunk_size": 5_000, "stratify": False}
    assert ChunkingSettings.from_mapping(m).to_mapping() == m
    assert ChunkingSettings.from_mapping(s.to_mapping()) == s
    bad = [
        ({"chunk_size": 999}, "nlsq.chunking.chunk_size"),
        ({"chunk_size": 2e5}, "nlsq.chunking.chunk_size"),
        ({"chunk_size": True}, "nlsq.chunking.chunk_size"),
        ({"stratify": "yes"}, "nlsq.chunking.stratify"),
        ({"stratify": 1}, "nlsq.chunking.stratify"),
        ({"chunk_sise": 5000}, "nlsq.chunking.chunk_sise"),
    ]
    for mapping, key in bad:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            ChunkingSettings.from_mapping(mapping)
    with pytest.raises(ConfigError, match=r"cmc\.sharding\.stratify"):
        ChunkingSettings.from_mapping({"stratify": "no"}, where="cmc.sharding")


def test_settings_auto_stratifies_whenever_it_matters():
    auto = ChunkingSettings(chunk_size=1_000)
    assert auto.use_stratification(n_chunks=3, n_angles=2)
    assert not auto.use_stratification(n_chunks=1, n_angles=5)
    assert not auto.use_stratification(n_chunks=4, n_angles=1)
    assert ChunkingSettings(stratify=True).use_stratification(1, 1)
    assert not ChunkingSettings(stratify=False).use_stratification(9, 9)

    a = angle_major([3000, 3000])
    np.testing.assert_array_equal(auto.plan(a).indices, stratified_plan(a, 1_000).indices)
    off = ChunkingSettings(chunk_size=1_000, stratify=False)
    np.testing.assert_array_equal(off.plan(a).indices, contiguous_plan(a, 1_000).indices)
    single = np.zeros(2500, dtype=np.int64)
    np.testing.assert_array_equal(auto.plan(single).indices, contiguous_plan(single, 1_000).indices)
