"""Settings of a CMC shard job: the NUTS sampler and the prior (config ``cmc.sampler``,
``cmc.prior``), checked when built."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from homodyne_steps.physics.coordinates import DEFAULT_COORDINATES, SAMPLING_COORDINATES
from homodyne_steps.settings import check_keys, get_bool, get_choice, get_int, get_number


@dataclass(frozen=True)
class SamplerSettings:
    num_warmup: int = 300
    num_samples: int = 1000
    num_chains: int = 2
    target_accept: float = 0.8
    max_tree_depth: int = 8
    dense_mass: bool = True
    seed: int = 0
    reparameterize: str = DEFAULT_COORDINATES  # rates | log_reference | none
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
                m, "reparameterize", d.reparameterize, SAMPLING_COORDINATES, where
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
