"""Angle-stratified chunking: which data points go into which chunk (index arrays only).

Why
---
A large fit is evaluated chunk by chunk. With per-angle scaling every angle ``i`` has its
own ``contrast[i]`` and ``offset[i]``; a chunk that holds no point of angle ``i`` gives
those parameters a zero gradient. The reference package chunked consecutive points, and
since its data are stored angle by angle, whole chunks held one angle: the optimiser saw
a zero gradient, stopped after one evaluation and returned the initial values without an
error (its "silent failure"). :func:`contiguous_plan` reproduces that layout so tests
and docs can show the failure; :func:`stratified_plan` is the fix.

What a plan is
--------------
A :class:`ChunkPlan` holds only an ``int64`` index array of shape
``(n_chunks, chunk_size)``; no data array is copied or reordered. Chunk ``c`` is the set
of points ``plan.indices[c][plan.valid[c]]``.

Padding contract. When a chunk holds fewer than ``chunk_size`` real points, its *last*
positions hold the value ``n_points`` (one past the last point). Every chunk has the same
shape, so a compiled chunk function is traced once. Callers do one of these:

- allocate each per-point array (data, weights, t1, t2, angle index) with one extra
  trailing *dummy point* (any finite values, **weight 0**), then gather
  ``x_ext[plan.indices[c]]``. The dummy adds exactly 0 to every sum of weighted
  residuals and to every gradient;
- or avoid the extra point: gather with ``np.take(x, plan.indices[c], mode="clip")``
  (JAX clamps out-of-range gather indices as well) and multiply the residuals by
  ``plan.valid[c]``.

Gathering one chunk copies only that chunk.

Balance guarantee of :func:`stratified_plan`
--------------------------------------------
With ``N`` points, ``K = ceil(N / chunk_size)`` chunks and ``N_a`` points of angle ``a``:

1. every point is in exactly one chunk;
2. every chunk gets ``floor(N_a / K)`` or ``ceil(N_a / K)`` points of angle ``a``:
   across chunks an angle's counts differ by at most 1, so the angle mix of every chunk
   matches the mix of the whole data set to within one point per angle (proportional
   allocation). An angle with ``N_a >= K`` points is in every chunk; an angle with
   fewer is in ``N_a`` different chunks (it cannot be in all of them);
3. chunk ``c`` holds exactly ``floor(N / K) + (1 if c < N mod K else 0)`` real points:
   chunk sizes differ by at most 1 (not just by at most ``n_angles``), and never exceed
   ``chunk_size``, since ``ceil(N / K) <= chunk_size``. All chunks have about
   ``N / K`` real points, so with few chunks much of the fixed width can be padding
   (``N = chunk_size + 1`` gives two chunks about half full); the padding points cost
   compute, not correctness.

How
---
The points are put in angle order: ascending angle index and, within an angle, their
original order (``seed=None``) or a random permutation drawn from
``np.random.default_rng(seed)``. This sequence ``S`` is dealt out like cards: ``S[g]``
goes to chunk ``g mod K`` at position ``g // K``. An angle is a run of ``N_a``
consecutive entries of ``S``, so it deals ``floor`` or ``ceil`` of ``N_a / K`` points to
every chunk; the next angle's run starts where the previous one stopped, so the surplus
points of successive angles go to successive chunks and chunk sizes stay within 1.
Without a seed, chunk ``c`` gets the points ``j = (c - o_a) mod K, + K, + 2K, ...`` of
angle ``a`` (``j`` counts that angle's points in original order; the rotation
``o_a = (N_0 + ... + N_(a-1)) mod K`` is what keeps the chunk sizes within 1), so every
chunk strides through all times and lags of every angle. With a seed, each chunk is a
random sample within every angle ("random within angle, seeded", as for CMC shards).
With one chunk the plan is just ``0 .. N-1`` in order (plus padding).

Cost: O(N) time. One stable ``argsort`` of the angle index cast to ``uint8``/``uint16``,
which numpy sorts by radix sort (more than 65536 angles fall back to timsort,
O(N log N)); with a seed, one in-place ``Generator.shuffle`` of each angle's run. The
same seed gives the same plan (numpy keeps ``Generator`` streams stable). Memory: the
``n_chunks * chunk_size * 8``-byte index array plus one O(N) ``int64`` temporary.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from homodyne_steps.errors import ConfigError, DataError
from homodyne_steps.settings import check_keys, get_int

DEFAULT_CHUNK_SIZE = 50_000
MIN_SETTINGS_CHUNK_SIZE = 1_000
STRATIFY_CHOICES = ("auto", True, False)


@dataclass(frozen=True, eq=False)
class ChunkPlan:
    """Which point indices form each chunk (see the module docstring for the padding contract).

    ``indices``: ``int64`` array ``(n_chunks, chunk_size)``, read-only. Real entries are
    point indices in ``0 .. n_points-1``; padding entries equal ``n_points`` and occur
    only in the last positions of a chunk. ``n_angles`` is ``max(angle index) + 1``.
    """

    indices: np.ndarray
    n_points: int
    n_angles: int
    chunk_size: int
    n_chunks: int

    def __post_init__(self) -> None:
        if self.indices.shape != (self.n_chunks, self.chunk_size):
            raise ValueError(
                f"ChunkPlan: indices shape {self.indices.shape} is not "
                f"(n_chunks, chunk_size) = ({self.n_chunks}, {self.chunk_size})"
            )

    @property
    def valid(self) -> np.ndarray:
        """Boolean mask, same shape as ``indices``: True for real points, False for padding."""
        return self.indices < self.n_points


def _check_angles(a: np.ndarray) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise DataError(f"angle index array: expected a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise DataError("angle index array is empty: there are no data points to chunk")
    if arr.dtype.kind not in "iu":
        raise DataError(f"angle index array: expected integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "i":
        low = int(arr.min())
        if low < 0:
            raise DataError(f"angle index array: indices must be >= 0, found {low}")
    return arr


def _check_int(value: object, name: str, minimum: int, expected: str) -> int:
    """``value`` as an int >= minimum (bools refused), else ConfigError naming ``name``."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name}: expected {expected}, got {value!r}") from None
    if out < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {out}")
    return out


def _check_chunk_size(chunk_size: int) -> int:
    return _check_int(chunk_size, "chunk_size", 1, "an integer")


def _check_seed(seed: int | None) -> int | None:
    if seed is None:
        return None
    return _check_int(seed, "seed", 0, "a non-negative integer or None")


def _sort_key(arr: np.ndarray, n_angles: int) -> np.ndarray:
    """The angle index in the narrowest unsigned type: numpy's stable sort is then radix."""
    if n_angles <= 1 << 8:
        return arr.astype(np.uint8, copy=False)
    if n_angles <= 1 << 16:
        return arr.astype(np.uint16, copy=False)
    return arr


def _shuffle_within_angles(
    order: np.ndarray, arr: np.ndarray, key: np.ndarray, n_angles: int, rng: np.random.Generator
) -> None:
    """Shuffle, in place, each angle's run of ``order`` (the points sorted by angle).

    Shuffling each run separately is ~3x faster than one permutation of all N points
    followed by a sort (the runs are contiguous in memory).
    """
    n = order.size
    if n_angles <= max(1 << 20, 2 * n):
        ends = np.cumsum(np.bincount(arr, minlength=n_angles))
    else:  # sparse, huge angle indices: find the runs instead of counting every label
        sorted_key = key[order]
        ends = np.append(np.flatnonzero(sorted_key[1:] != sorted_key[:-1]) + 1, n)
    start = 0
    for end in ends.tolist():
        if end - start > 1:
            rng.shuffle(order[start:end])
        start = end


def _new_plan(indices: np.ndarray, n: int, n_angles: int, chunk_size: int) -> ChunkPlan:
    indices.flags.writeable = False
    return ChunkPlan(
        indices=indices,
        n_points=n,
        n_angles=n_angles,
        chunk_size=chunk_size,
        n_chunks=indices.shape[0],
    )


def stratified_plan(a: np.ndarray, chunk_size: int, *, seed: int | None = None) -> ChunkPlan:
    """Split points into ``ceil(N / chunk_size)`` chunks, each with every angle in proportion.

    ``a``: the angle index (0 .. n_phi-1) of every point, shape ``(N,)``. Within an angle,
    points are dealt round-robin in their original order when ``seed`` is None, or in a
    random order drawn from ``np.random.default_rng(seed)`` (reproducible per seed).
    See the module docstring for the exact balance guarantee and the padding contract.
    Raises DataError for an empty, non-integer or negative ``a``, ConfigError for
    ``chunk_size < 1`` or a bad seed.
    """
    arr = _check_angles(a)
    size = _check_chunk_size(chunk_size)
    seed = _check_seed(seed)
    n = int(arr.size)
    n_angles = int(arr.max()) + 1
    n_chunks = -(-n // size)
    indices = np.full((n_chunks, size), n, dtype=np.int64)
    if n_chunks == 1:
        indices[0, :n] = np.arange(n, dtype=np.int64)
        return _new_plan(indices, n, n_angles, size)

    key = _sort_key(arr, n_angles)
    order = np.argsort(key, kind="stable")  # angle by angle, original order within an angle
    if seed is not None:
        _shuffle_within_angles(order, arr, key, n_angles, np.random.default_rng(seed))
    # Deal the angle-ordered sequence out round-robin: order[g] -> chunk g % K, slot g // K.
    rounds, rest = divmod(n, n_chunks)
    indices[:, :rounds] = order[: rounds * n_chunks].reshape(rounds, n_chunks).T
    if rest:
        indices[:rest, rounds] = order[rounds * n_chunks :]
    return _new_plan(indices, n, n_angles, size)


def contiguous_plan(a: np.ndarray, chunk_size: int) -> ChunkPlan:
    """The naive plan: chunk ``c`` holds points ``c*chunk_size .. (c+1)*chunk_size - 1``.

    This is what the reference package did. For data stored angle by angle, chunks miss
    angles (zero gradients for their scaling parameters). Kept to demonstrate the
    failure mode, and for ``stratify: false`` diagnostics. Only the last chunk is padded.
    """
    arr = _check_angles(a)
    size = _check_chunk_size(chunk_size)
    n = int(arr.size)
    n_chunks = -(-n // size)
    indices = np.full((n_chunks, size), n, dtype=np.int64)
    indices.reshape(-1)[:n] = np.arange(n, dtype=np.int64)
    return _new_plan(indices, n, int(arr.max()) + 1, size)


# ---------------------------------------------------------------------------------------
# Diagnostics


@dataclass(frozen=True)
class StratificationDiagnostics:
    """How well a plan spreads the angles over the chunks, and what it cost.

    - ``chunk_sizes``: real (non-padding) points per chunk; ``chunk_balance``: their
      ``mean``, ``std`` (population), ``min``, ``max`` and ``cv = std / mean``.
    - ``angles_per_chunk``: number of distinct angles in each chunk.
    - ``angle_coverage``: ``mean`` and ``std`` of ``angles_per_chunk`` (counts, not
      ratios), ``min_coverage_ratio`` = min over chunks of (angles present / angles that
      have data) and ``perfect_coverage_chunks`` = chunks holding every angle that has
      data. Angle indices with no points at all are listed in ``empty_angles`` and left
      out of the denominator: no plan can put them in a chunk (and their parameters
      have no data whatever the chunking).
    - ``per_angle_balance_cv``: max over angles of the CV (population std / mean) of that
      angle's point count across chunks; 0 when every chunk has the same count.
    - ``execution_time_ms``: the time the caller measured to build the plan;
      ``throughput_points_per_sec`` = ``n_points`` / that time (None if the time is 0).
    - ``memory_overhead_mb``: bytes of the index array / 10**6 (the only allocation that
      lives as long as the plan; no data are copied).
    - ``fill_fraction``: real entries / all entries of the index array (1 - padding share).
    - ``partition_ok``: every point appears exactly once.
    """

    n_points: int
    n_angles: int
    n_chunks: int
    chunk_size: int
    chunk_sizes: list[int]
    chunk_balance: dict[str, float]
    angles_per_chunk: list[int]
    angle_coverage: dict[str, float]
    per_angle_balance_cv: float
    execution_time_ms: float
    memory_overhead_mb: float
    throughput_points_per_sec: float | None
    fill_fraction: float
    partition_ok: bool
    empty_angles: list[int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: plain Python numbers, lists and dicts; NaN/inf become None."""
        return _json_clean(asdict(self))

    def format_report(self) -> str:
        """A short human-readable report (a few lines)."""
        bal = self.chunk_balance
        cov = self.angle_coverage
        rate = self.throughput_points_per_sec
        lines = [
            "Stratification diagnostics",
            f"  chunks: {self.n_chunks} x {self.chunk_size:,} slots for {self.n_points:,} "
            f"points, {self.n_angles} angles (fill {100 * self.fill_fraction:.1f}%)",
            f"  chunk size: mean {bal['mean']:,.1f}, min {bal['min']:,.0f}, "
            f"max {bal['max']:,.0f}, cv {bal['cv']:.4f}",
            f"  angle coverage: min {100 * cov['min_coverage_ratio']:.1f}%, "
            f"{cov['perfect_coverage_chunks']}/{self.n_chunks} chunks hold every angle",
            f"  per-angle balance cv (worst angle): {self.per_angle_balance_cv:.4f}",
            f"  time: {self.execution_time_ms:.2f} ms"
            + ("" if rate is None else f" ({rate:,.0f} points/s)")
            + f"; index memory {self.memory_overhead_mb:.2f} MB",
        ]
        if self.empty_angles:
            lines.append(f"  angles with no data: {self.empty_angles}")
        if not self.partition_ok:
            lines.append("  WARNING: some points are missing or appear more than once")
        return "\n".join(lines)


def _json_clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_clean(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def diagnose(plan: ChunkPlan, a: np.ndarray, execution_time_ms: float) -> StratificationDiagnostics:
    """Balance, angle coverage and cost of ``plan`` for the angle indices ``a``. O(N)."""
    arr = _check_angles(a)
    if arr.size != plan.n_points:
        raise DataError(
            f"diagnose: the plan is for {plan.n_points} points but the angle index array "
            f"has {arr.size}"
        )
    n, n_chunks = plan.n_points, plan.n_chunks
    valid = plan.valid
    sizes = valid.sum(axis=1)
    real = plan.indices[valid]  # row-major: chunk 0's points first
    chunk_of = np.repeat(np.arange(n_chunks, dtype=np.int64), sizes)
    partition_ok = bool(
        real.size == n and np.array_equal(np.bincount(real, minlength=n), np.ones(n, np.int64))
    )

    n_angles = max(plan.n_angles, int(arr.max()) + 1)
    present = np.flatnonzero(np.bincount(arr, minlength=n_angles))
    remap = np.full(n_angles, -1, dtype=np.int64)
    remap[present] = np.arange(present.size)
    counts = np.bincount(
        chunk_of * present.size + remap[arr[real]], minlength=n_chunks * present.size
    ).reshape(n_chunks, present.size)
    return diagnose_counts(
        counts,
        n_angles=n_angles,
        chunk_size=plan.chunk_size,
        execution_time_ms=execution_time_ms,
        memory_bytes=plan.indices.nbytes,
        slots=plan.indices.size,
        partition_ok=partition_ok,
        empty_angles=np.setdiff1d(np.arange(n_angles), present).tolist(),
    )


def diagnose_counts(
    counts: np.ndarray,
    *,
    n_angles: int,
    chunk_size: int,
    execution_time_ms: float,
    memory_bytes: int,
    slots: int,
    partition_ok: bool = True,
    empty_angles: list[int] | tuple[int, ...] = (),
) -> StratificationDiagnostics:
    """Diagnostics from ``counts[chunk, angle]`` (points of each angle with data in each
    chunk): for plans that exist only as arithmetic (the fit's block layout)."""
    counts = np.asarray(counts)
    n_chunks, n_present = counts.shape
    n = int(counts.sum())
    sizes = counts.sum(axis=1)
    angles_per_chunk = np.count_nonzero(counts, axis=1)
    totals = counts.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cv_a = counts.std(axis=0) / counts.mean(axis=0)  # chunks lacking an angle count 0
    cv_a = cv_a[totals > 0]
    sizes_f = sizes.astype(float)
    size_mean = float(sizes_f.mean())
    size_std = float(sizes_f.std())
    coverage = angles_per_chunk / max(n_present, 1)
    seconds = execution_time_ms / 1e3
    return StratificationDiagnostics(
        n_points=n,
        n_angles=n_angles,
        n_chunks=n_chunks,
        chunk_size=chunk_size,
        chunk_sizes=[int(s) for s in sizes],
        chunk_balance={
            "mean": size_mean,
            "std": size_std,
            "min": float(sizes_f.min()),
            "max": float(sizes_f.max()),
            "cv": size_std / size_mean if size_mean > 0 else float("nan"),
        },
        angles_per_chunk=[int(k) for k in angles_per_chunk],
        angle_coverage={
            "mean": float(angles_per_chunk.mean()),
            "std": float(angles_per_chunk.std()),
            "min_coverage_ratio": float(coverage.min()),
            "perfect_coverage_chunks": int(np.count_nonzero(angles_per_chunk == n_present)),
        },
        per_angle_balance_cv=float(cv_a.max()) if cv_a.size else 0.0,
        execution_time_ms=float(execution_time_ms),
        memory_overhead_mb=memory_bytes / 1e6,
        throughput_points_per_sec=n / seconds if seconds > 0 else None,
        fill_fraction=n / slots if slots else 0.0,
        partition_ok=partition_ok,
        empty_angles=[int(k) for k in empty_angles],
    )


# ---------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class ChunkingSettings:
    """Settings under ``nlsq.chunking``.

    - ``chunk_size`` (int >= 1000, default 50_000): points per chunk. The fit's memory
      scales with ``chunk_size x n_params`` (one chunk's Jacobian is
      ``chunk_size x n_params`` floats, e.g. 100_000 x 13 x 8 B = 10 MB for laminar flow
      with 3 angles, n_params = 7 + 2 x 3), not with the data size.
    - ``stratify`` ("auto" | true | false, default "auto"): "auto" stratifies whenever
      there is more than one chunk and more than one angle, i.e. always when it matters;
      true always uses :func:`stratified_plan`; false uses :func:`contiguous_plan`, which
      can leave angles out of chunks: for diagnostics only, never for production fits.
    """

    chunk_size: int = DEFAULT_CHUNK_SIZE
    stratify: str | bool = "auto"

    @classmethod
    def from_mapping(
        cls, m: Mapping[str, Any] | None, where: str = "nlsq.chunking"
    ) -> ChunkingSettings:
        m = dict(m or {})
        check_keys(m, {"chunk_size", "stratify"}, where)
        chunk_size = get_int(
            m, "chunk_size", DEFAULT_CHUNK_SIZE, where, minimum=MIN_SETTINGS_CHUNK_SIZE
        )
        stratify = m.get("stratify", "auto")
        # Not get_choice: `1 in ["auto", True, False]` is True in Python.
        if not (isinstance(stratify, bool) or (isinstance(stratify, str) and stratify == "auto")):
            raise ConfigError(
                f'{where}.stratify: got {stratify!r}; expected one of "auto", true, false'
            )
        return cls(chunk_size=chunk_size, stratify=stratify)

    def to_mapping(self) -> dict[str, Any]:
        return {"chunk_size": self.chunk_size, "stratify": self.stratify}

    def use_stratification(self, n_chunks: int, n_angles: int) -> bool:
        """Whether :meth:`plan` stratifies for this many chunks and angles."""
        if self.stratify == "auto":
            return n_chunks > 1 and n_angles > 1
        return bool(self.stratify)

    def plan(self, a: np.ndarray, *, seed: int | None = None) -> ChunkPlan:
        """The plan these settings choose for angle indices ``a`` (seed: see stratified_plan).

        The seed is ignored when the contiguous plan is chosen.
        """
        arr = _check_angles(a)
        n_chunks = -(-arr.size // self.chunk_size)
        several_angles = bool(arr.min() != arr.max())
        if self.use_stratification(n_chunks, 2 if several_angles else 1):
            return stratified_plan(arr, self.chunk_size, seed=seed)
        return contiguous_plan(arr, self.chunk_size)
