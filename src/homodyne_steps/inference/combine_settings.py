"""Settings of the ``cmc_combine`` stage (config ``cmc.combine``), checked when built.

Light on purpose (no JAX, no ArviZ): the workflow builds them when it starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from homodyne_steps.errors import ConfigError
from homodyne_steps.settings import check_keys, get_choice, get_number

METHODS = ("robust_consensus_mc", "consensus_mc", "simple_average")


@dataclass(frozen=True)
class CombineSettings:
    method: str = "robust_consensus_mc"
    outlier_p_value: float = 0.01
    max_divergence_rate: float = 0.1
    rhat_good: float = 1.05
    rhat_acceptable: float = 1.1
    ess_warn: float = 400.0
    shard_ess_min: float = 100.0

    @classmethod
    def from_mapping(
        cls, m: Mapping[str, Any] | None, where: str = "cmc.combine"
    ) -> CombineSettings:
        m = {} if m is None else m
        if "mad_threshold" in m:
            raise ConfigError(
                f"{where}.mad_threshold: replaced by outlier_p_value (the probability that a "
                "homogeneous run loses any shard to the outlier test, default 0.01); the "
                "median-and-MAD rule excluded 4-11 % of honest shards"
            )
        check_keys(m, {f.name for f in cls.__dataclass_fields__.values()}, where)
        m = dict(m)
        d = cls()
        s = cls(
            method=get_choice(m, "method", d.method, METHODS, where),
            outlier_p_value=get_number(
                m,
                "outlier_p_value",
                d.outlier_p_value,
                where,
                minimum=0.0,
                exclusive_minimum=True,
                maximum=0.5,
            ),
            max_divergence_rate=get_number(
                m, "max_divergence_rate", d.max_divergence_rate, where, minimum=0.0, maximum=1.0
            ),
            rhat_good=get_number(m, "rhat_good", d.rhat_good, where, minimum=1.0),
            rhat_acceptable=get_number(m, "rhat_acceptable", d.rhat_acceptable, where, minimum=1.0),
            ess_warn=get_number(m, "ess_warn", d.ess_warn, where, minimum=0.0),
            shard_ess_min=get_number(m, "shard_ess_min", d.shard_ess_min, where, minimum=0.0),
        )
        if s.rhat_acceptable < s.rhat_good:
            raise ConfigError(
                f"{where}.rhat_acceptable: must be >= rhat_good ({s.rhat_good}), "
                f"got {s.rhat_acceptable}"
            )
        return s

    def to_mapping(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["METHODS", "CombineSettings"]
