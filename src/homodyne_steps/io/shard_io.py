"""CMC shard files: writing a shard's posterior, the :class:`Shard` record, reading one
shard, checking a set.

A shard is two files written by :mod:`cmc_shard`: ``{k}.nc`` (ArviZ InferenceData: the
posterior draws, NUTS sample stats, and the shard's identity as posterior attributes;
:class:`ShardPosterior`, :func:`write_shard_posterior`) and ``{k}.json`` (its typed
summary, :class:`ShardSummary`). :func:`read_shard` reads one pair into a :class:`Shard`
whose ``draws`` hold the combined parameter vector (chains, draws, p): the sampled
columns (the shard's ``sampled_space``: physical parameters, then sampled scaling), then
derived per-angle ``contrast_a``/``offset_a``. Shard files without a recorded space hold
the physical parameters, then per-angle scaling. :func:`read_shards` reads a whole run and
:func:`check_shard_set` refuses shards that do not belong together.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from homodyne_steps.errors import DataError
from homodyne_steps.io.record import ABSENT, Record, or_none
from homodyne_steps.io.serialise import SerialisationError, atomic_path
from homodyne_steps.physics.cmc_space import SampledSpace, space_from_attrs
from homodyne_steps.physics.registry import REGISTRY, canonical_mode

SCALING_VARIABLES = ("contrast", "offset")
SAMPLED_SCALING_MODES = ("individual",)  # per_angle_scaling modes that sample c, o per angle
SAMPLE_STATS = ("diverging", "energy", "tree_depth", "step_size", "acceptance_rate")


class ShardError(DataError):
    """Shard files are missing, unreadable, or do not belong together."""


@dataclass(frozen=True, kw_only=True)
class ShardSummary(Record):
    """A shard's ``{k}.json`` beside its ``{k}.nc``: which shard, what was sampled under
    which prior, the sampler's diagnostics and timings (``cmc_shard`` writes every key;
    only the identity is required of files made another way)."""

    WHAT = "shard summary"

    shard: int
    num_shards: int
    n_points: int
    seed: int = ABSENT
    analysis_mode: str = ABSENT
    #: the kernel's shear form and integral
    model: dict[str, str] = ABSENT
    per_angle_scaling: str = ABSENT
    parameters: list[str] = ABSENT
    sampled: list[str] = ABSENT
    #: type, tempering, and mu/sigma/lower/upper over ``sampled`` (null: unbounded)
    prior: dict[str, Any] = ABSENT
    coordinates: dict[str, str] = ABSENT
    noise_scale: dict[str, Any] = ABSENT
    #: the parameters the NLSQ record's curvature adjustment moves; null: none
    curvature_adjustment: list[str] | None = ABSENT
    #: where the surrogate prior G sits: center (θ), nlsq_optimum, distance_sd (the
    #: move in the likelihood's sd), width_sd (:mod:`homodyne_steps.inference.surrogate`)
    surrogate: dict[str, Any] | None = ABSENT
    num_chains: int = ABSENT
    num_warmup: int = ABSENT
    num_samples: int = ABSENT
    divergences: int = ABSENT
    divergence_rate: float = ABSENT
    step_size: float = ABSENT
    mean_tree_depth: float = ABSENT
    max_tree_depth_hits: int = ABSENT
    acceptance_rate: float = ABSENT
    timings: dict[str, float] = ABSENT
    metric: str = ABSENT
    #: the shard's mode search: status, newton_iterations, potential, seconds
    mode: dict[str, Any] = ABSENT


@dataclass
class Shard:
    """One shard's draws (over the combined parameter vector), stats and metadata."""

    index: int
    num_shards: int
    n_points: int
    analysis_mode: str
    per_angle_scaling: str
    prior_tempering: float | None
    physical: tuple[str, ...]
    scaling: dict[str, int]  # per-angle scaling variable -> number of angles
    angle_coords: list[Any]
    names: tuple[str, ...]
    draws: np.ndarray  # (chains, draws, p)
    stats: dict[str, np.ndarray | None]
    meta: ShardSummary
    nc_path: Path
    json_path: Path
    ignored_variables: list[str] = field(default_factory=list)
    # what the shard sampled (its leading columns), priors and coordinates; None for
    # shard files that do not record it (then the columns are combined as they are)
    space: SampledSpace | None = None

    @property
    def scaling_derived(self) -> bool:
        """contrast/offset present but not sampled per angle (deterministics)."""
        return bool(self.scaling) and self.per_angle_scaling not in SAMPLED_SCALING_MODES

    @property
    def n_joint(self) -> int:
        """Leading columns combined jointly: the sampled ones."""
        if self.space is not None:
            return self.space.size
        return len(self.physical) if self.scaling_derived else len(self.names)

    @property
    def mean(self) -> np.ndarray:
        return self.draws.mean(axis=(0, 1))

    @property
    def std(self) -> np.ndarray:
        n = self.draws.shape[0] * self.draws.shape[1]
        return self.draws.std(axis=(0, 1), ddof=1) if n > 1 else np.zeros(self.draws.shape[2])

    @property
    def divergences(self) -> int:
        d = self.stats.get("diverging")
        if d is not None:
            return int(np.sum(d))
        return int(or_none(self.meta.divergences) or 0)

    @property
    def divergence_rate(self) -> float:
        d = self.stats.get("diverging")
        if d is not None and d.size:
            return float(np.mean(d))
        return float(or_none(self.meta.divergence_rate) or 0.0)


# ---------------------------------------------------------------------------------------
# Writing one shard's posterior
# ---------------------------------------------------------------------------------------
@dataclass
class ShardPosterior:
    """One shard's draws in ArviZ's InferenceData layout (groups ``posterior`` and
    ``sample_stats``, dims (chain, draw, ...)), built and written with xarray: a shard
    job is short, and importing ArviZ alone takes ~3.5 s of it. The combination stage
    reads the file with ``arviz.from_netcdf``."""

    posterior: Any  # xarray.Dataset
    sample_stats: Any  # xarray.Dataset

    @classmethod
    def from_arrays(
        cls, posterior: Mapping[str, np.ndarray], sample_stats: Mapping[str, np.ndarray]
    ) -> ShardPosterior:
        import xarray as xr

        def dataset(arrays: Mapping[str, np.ndarray]) -> xr.Dataset:
            first = next(iter(arrays.values()))
            coords = {"chain": np.arange(first.shape[0]), "draw": np.arange(first.shape[1])}
            variables = {}
            for name, x in arrays.items():
                extra = tuple(f"{name}_dim_{i}" for i in range(x.ndim - 2))
                variables[name] = (("chain", "draw", *extra), x)
                coords.update({d: np.arange(n) for d, n in zip(extra, x.shape[2:], strict=True)})
            return xr.Dataset(variables, coords=coords)

        return cls(dataset(posterior), dataset(sample_stats))

    def groups(self) -> list[str]:
        return ["posterior", "sample_stats"]

    def to_netcdf(self, path: str | os.PathLike[str], engine: str = "h5netcdf") -> None:
        for i, group in enumerate(self.groups()):
            getattr(self, group).to_netcdf(
                str(path), mode="w" if i == 0 else "a", group=group, engine=engine
            )


def write_shard_posterior(idata: Any, path: str | os.PathLike[str]) -> Path:
    """Write a shard's posterior (a :class:`ShardPosterior` or InferenceData) atomically."""
    with atomic_path(path) as tmp:
        idata.to_netcdf(str(tmp), engine="h5netcdf")
    return Path(path)


# ---------------------------------------------------------------------------------------
# Reading one shard, in the order of its checks
# ---------------------------------------------------------------------------------------
def _attr(attrs: Mapping[str, Any], key: str, kind: type, path: Path) -> Any:
    if key not in attrs:
        raise ShardError(f"{path}: posterior attribute {key!r} is missing")
    value = attrs[key]
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str | bytes):
        return value.decode() if isinstance(value, bytes) else value
    raise ShardError(f"{path}: posterior attribute {key!r} must be {kind.__name__}, got {value!r}")


def _read_summary(nc_path: Path, json_path: Path) -> ShardSummary:
    """The shard's ``{k}.json`` (its identity keys are required integers)."""
    if not nc_path.is_file():
        raise ShardError(f"shard posterior file {nc_path} does not exist")
    try:
        return ShardSummary.read(json_path)
    except SerialisationError as exc:
        raise ShardError(str(exc)) from None


def _open_posterior(nc_path: Path):
    """The shard's InferenceData, which must have a posterior group."""
    import arviz as az

    try:
        idata = az.from_netcdf(nc_path)
    except Exception as exc:  # h5py/xarray raise many types for a bad file
        raise ShardError(f"cannot read shard posterior {nc_path}: {exc}") from None
    if "posterior" not in idata.groups():
        raise ShardError(f"{nc_path}: no 'posterior' group (groups: {idata.groups()})")
    return idata


@dataclass(frozen=True)
class _Identity:
    index: int
    num_shards: int
    n_points: int
    analysis_mode: str
    per_angle_scaling: str
    prior_tempering: float | None


def _read_identity(
    attrs: Mapping[str, Any], meta: ShardSummary, nc_path: Path, json_path: Path
) -> _Identity:
    """Which shard of which run: the posterior attributes, checked against the summary."""
    index = _attr(attrs, "shard", int, nc_path)
    num_shards = _attr(attrs, "num_shards", int, nc_path)
    n_points = _attr(attrs, "n_points", int, nc_path)
    try:
        mode = canonical_mode(_attr(attrs, "analysis_mode", str, nc_path))
    except DataError:
        raise
    except ValueError as exc:
        raise ShardError(f"{nc_path}: {exc}") from None
    scaling_mode = _attr(attrs, "per_angle_scaling", str, nc_path)
    tempering = (
        _attr(attrs, "prior_tempering", float, nc_path) if "prior_tempering" in attrs else None
    )
    for key, value in (("shard", index), ("num_shards", num_shards), ("n_points", n_points)):
        if getattr(meta, key) != value:
            raise ShardError(
                f"{json_path} says {key} = {getattr(meta, key)} but {nc_path} says {value}: "
                "the summary and the posterior are not of the same shard"
            )
    return _Identity(index, num_shards, n_points, mode, scaling_mode, tempering)


def _check_variables(variables: Sequence[str], expected: Sequence[str], mode: str, nc_path: Path):
    """The posterior holds the parameters of ``mode`` and of no other mode."""
    other_mode = [v for v in variables if v in REGISTRY.names and v not in expected]
    other_mode = [v for v in other_mode if v not in SCALING_VARIABLES]
    if other_mode:
        raise ShardError(
            f"{nc_path}: variables {other_mode} are not parameters of {mode} mode {list(expected)}"
        )
    missing = [n for n in expected if n not in variables]
    if missing:
        raise ShardError(
            f"{nc_path}: posterior lacks {missing}; {mode} mode needs {list(expected)}"
        )


def _read_space(
    attrs: Mapping[str, Any], expected: Sequence[str], mode: str, nc_path: Path
) -> SampledSpace | None:
    """The recorded sampled space (None in files without one); it starts with ``expected``."""
    try:
        space = space_from_attrs(attrs)
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardError(
            f"{nc_path}: posterior attribute 'sampled_space' is unreadable: {exc}"
        ) from None
    if space is not None and tuple(space.names[: len(expected)]) != tuple(expected):
        raise ShardError(
            f"{nc_path}: the sampled space {list(space.names)} does not start with the "
            f"{mode} parameters {list(expected)}"
        )
    return space


def _sampled_columns(
    post, space: SampledSpace | None, expected: Sequence[str], nc_path: Path
) -> tuple[list[np.ndarray], list[str], set[str]]:
    """The sampled columns (chain, draw, 1 each), their names, and the variables read.

    With a recorded space: its columns, in its order; without: the ``expected``
    physical parameters, as stored."""
    variables = list(post.data_vars)
    columns, names = [], []
    sampled_vars: set[str] = set()
    if space is not None:
        for name, (var, idx) in zip(space.names, space.columns, strict=True):
            if var not in variables:
                raise ShardError(f"{nc_path}: posterior lacks the sampled variable {var!r}")
            da = post[var]
            other = [d for d in da.dims if d not in ("chain", "draw")]
            values = np.asarray(da.transpose("chain", "draw", *other).values, dtype=np.float64)
            if (idx is None) != (values.ndim == 2) or (idx is not None and idx >= values.shape[2]):
                raise ShardError(f"{nc_path}: {var!r} has dims {da.dims}; cannot hold {name}")
            columns.append(values[..., None] if idx is None else values[..., idx : idx + 1])
            names.append(name)
            sampled_vars.add(var)
    else:
        for n in expected:
            da = post[n]
            if set(da.dims) != {"chain", "draw"}:
                raise ShardError(f"{nc_path}: {n!r} must have dims (chain, draw), got {da.dims}")
            columns.append(
                np.asarray(da.transpose("chain", "draw").values, dtype=np.float64)[..., None]
            )
            names.append(n)
    return columns, names, sampled_vars


def _scaling_columns(
    post, sampled_vars: set[str], nc_path: Path
) -> tuple[list[np.ndarray], list[str], dict[str, int], list[Any]]:
    """Per-angle contrast/offset not already sampled: columns, names ``{var}_{a}``, the
    number of angles of each variable, and the angle coordinates."""
    variables = list(post.data_vars)
    columns, names = [], []
    scaling: dict[str, int] = {}
    angle_coords: list[Any] = []
    for n in SCALING_VARIABLES:
        if n not in variables:
            continue
        da = post[n]
        extra = [d for d in da.dims if d not in ("chain", "draw")]
        if len(extra) != 1 or "chain" not in da.dims or "draw" not in da.dims:
            raise ShardError(f"{nc_path}: {n!r} must have dims (chain, draw, angle), got {da.dims}")
        values = np.asarray(da.transpose("chain", "draw", extra[0]).values, dtype=np.float64)
        scaling[n] = values.shape[2]
        angle_coords = [c.item() if hasattr(c, "item") else c for c in da[extra[0]].values]
        if n in sampled_vars:
            continue
        columns.append(values)
        names.extend(f"{n}_{a}" for a in range(values.shape[2]))
    return columns, names, scaling, angle_coords


def _sample_stats(idata) -> dict[str, np.ndarray | None]:
    """The NUTS statistics of :data:`SAMPLE_STATS` (None where the file lacks one)."""
    stats: dict[str, np.ndarray | None] = dict.fromkeys(SAMPLE_STATS)
    if "sample_stats" in idata.groups():
        ss = idata.sample_stats
        for key in SAMPLE_STATS:
            if key in ss:
                stats[key] = np.asarray(ss[key].values)
    return stats


def read_shard(nc_path: str | os.PathLike[str], json_path: str | os.PathLike[str]) -> Shard:
    """Read one shard's ``{k}.nc`` and ``{k}.json``; check that the two agree."""
    nc_path, json_path = Path(nc_path), Path(json_path)
    meta = _read_summary(nc_path, json_path)
    idata = _open_posterior(nc_path)
    post = idata.posterior
    attrs = dict(post.attrs)
    ident = _read_identity(attrs, meta, nc_path, json_path)
    expected = REGISTRY.physical_names(ident.analysis_mode)
    variables = list(post.data_vars)
    _check_variables(variables, expected, ident.analysis_mode, nc_path)
    space = _read_space(attrs, expected, ident.analysis_mode, nc_path)
    columns, names, sampled_vars = _sampled_columns(post, space, expected, nc_path)
    more, scaled_names, scaling, angle_coords = _scaling_columns(post, sampled_vars, nc_path)
    columns, names = columns + more, names + scaled_names
    try:
        draws = np.concatenate(columns, axis=2)
    except ValueError:
        raise ShardError(
            f"{nc_path}: posterior variables have different (chain, draw) shapes"
        ) from None
    ignored = [
        v
        for v in variables
        if v not in names and v not in expected and v not in scaling and v not in sampled_vars
    ]
    return Shard(
        index=ident.index,
        num_shards=ident.num_shards,
        n_points=ident.n_points,
        analysis_mode=ident.analysis_mode,
        per_angle_scaling=ident.per_angle_scaling,
        prior_tempering=ident.prior_tempering,
        physical=tuple(expected),
        scaling=scaling,
        angle_coords=angle_coords,
        names=tuple(names),
        draws=draws,
        stats=_sample_stats(idata),
        meta=meta,
        nc_path=nc_path,
        json_path=json_path,
        ignored_variables=ignored,
        space=space,
    )


# ---------------------------------------------------------------------------------------
# A set of shards
# ---------------------------------------------------------------------------------------
def read_shards(
    shard_nc: Sequence[str | os.PathLike[str]], shard_json: Sequence[str | os.PathLike[str]]
) -> list[Shard]:
    """Read all shards, pairing ``{k}.nc`` with ``{k}.json`` by file stem, and check that
    they form one complete set: same num_shards, analysis mode, parameter names and draw
    shape; every index 0..K-1 exactly once. Returned in shard-index order."""
    if len(shard_nc) == 0:
        raise ShardError("no shard files given")
    if len(shard_nc) != len(shard_json):
        raise ShardError(
            f"got {len(shard_nc)} shard posterior files but {len(shard_json)} shard summaries"
        )
    nc_paths, json_paths = [Path(p) for p in shard_nc], [Path(p) for p in shard_json]
    by_stem = {p.stem: p for p in json_paths}
    if len(by_stem) == len(json_paths) and {p.stem for p in nc_paths} == set(by_stem):
        pairs = [(p, by_stem[p.stem]) for p in nc_paths]
    else:  # names do not pair up: take the lists in the order given
        pairs = list(zip(nc_paths, json_paths, strict=True))
    shards = [read_shard(nc, js) for nc, js in pairs]
    check_shard_set(shards)
    return sorted(shards, key=lambda s: s.index)


def _check_same(shards: Sequence[Shard]) -> None:
    """One run's shards agree on their identity, names and sampled space."""
    for attr in ("num_shards", "analysis_mode", "per_angle_scaling", "names"):
        values = {repr(getattr(s, attr)) for s in shards}
        if len(values) > 1:
            detail = ", ".join(f"{s.nc_path.name}: {getattr(s, attr)!r}" for s in shards)
            raise ShardError(f"shards do not belong together: {attr} differs ({detail})")
    models = {repr(or_none(s.meta.model)) for s in shards}
    if len(models) > 1:
        detail = ", ".join(f"{s.json_path.name}: {or_none(s.meta.model)}" for s in shards)
        raise ShardError(f"shards do not belong together: the model differs ({detail})")
    # G is computed by each shard (a Newton solve on the data): shards on different
    # hardware agree on it only to round-off, so it is compared with a tolerance
    spaces = {None if sh.space is None else _without_surrogate(sh.space) for sh in shards}
    if len(spaces) > 1:
        raise ShardError(
            "shards do not belong together: they sampled different spaces (parameters, "
            "bounds, priors or time windows differ)"
        )
    first = shards[0].space
    for sh in shards[1:]:
        if first is not None and not _same_surrogate(first, sh.space):
            raise ShardError(
                f"shards do not belong together: {sh.nc_path.name} has another surrogate "
                f"prior G than {shards[0].nc_path.name} (beyond round-off: rerun the shards "
                "from the same NLSQ result)"
            )


SURROGATE_RTOL = 1e-6  # shards' surrogate priors equal to within round-off


def _without_surrogate(space: SampledSpace) -> str:
    return replace(space, surrogate_mu=None, surrogate_sd=None).to_json()


def _same_surrogate(a: SampledSpace, b: SampledSpace) -> bool:
    """Whether two shards' G agree: widths to ``SURROGATE_RTOL``, centres to that
    fraction of the width."""
    if a.surrogate_mu is None or b.surrogate_mu is None:
        return a.surrogate_mu is None and b.surrogate_mu is None
    sd = np.asarray(a.surrogate_sd, dtype=np.float64)
    return bool(
        np.allclose(a.surrogate_sd, b.surrogate_sd, rtol=SURROGATE_RTOL, atol=0.0)
        and np.all(np.abs(np.asarray(a.surrogate_mu) - b.surrogate_mu) <= SURROGATE_RTOL * sd)
    )


def _check_complete(shards: Sequence[Shard]) -> None:
    """Every index 0..K-1 exactly once."""
    K = shards[0].num_shards
    indices = [s.index for s in shards]
    dupes = sorted({i for i in indices if indices.count(i) > 1})
    if dupes:
        files = [str(s.nc_path) for s in shards if s.index in dupes]
        raise ShardError(f"shard indices {dupes} appear more than once ({files})")
    missing = sorted(set(range(K)) - set(indices))
    extra = sorted(set(indices) - set(range(K)))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing shards {missing}")
        if extra:
            parts.append(f"indices {extra} outside 0..{K - 1}")
        raise ShardError(f"incomplete shard set (num_shards = {K}): " + "; ".join(parts))


def check_shard_set(shards: Sequence[Shard]) -> None:
    """Raise :class:`ShardError` unless the shards belong to one CMC run."""
    _check_same(shards)
    _check_complete(shards)
    shapes = {s.draws.shape for s in shards}
    if len(shapes) > 1:
        detail = ", ".join(f"shard {s.index}: {s.draws.shape[:2]}" for s in shards)
        raise ShardError(
            "shards have different (chains, draws); the consensus pairs draws by index and "
            f"needs equal shapes ({detail})"
        )
