"""Settings of the plot stages (config section ``plot``), checked when built.

Light on purpose (no matplotlib): the workflow builds them when it starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from homodyne_steps.errors import ConfigError
from homodyne_steps.settings import check_keys, get_int


@dataclass(frozen=True)
class PlotSettings:
    """``plot:`` section of the config.

    dpi: pixels per inch of every PNG (figure sizes are fixed in inches).
    max_pixels: largest side, in matrix elements, of a heatmap as drawn (block mean).
    max_shards: at most this many shards in the per-shard CMC figures (first ones).
    """

    dpi: int = 100
    max_pixels: int = 500
    max_shards: int = 12

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None, where: str = "plot") -> PlotSettings:
        m = {} if m is None else m
        check_keys(m, {"dpi", "max_pixels", "max_shards"}, where)
        d = cls()
        dpi = get_int(m, "dpi", d.dpi, where, minimum=30)
        if dpi > 600:
            raise ConfigError(f"{where}.dpi: must be <= 600, got {dpi}")
        return cls(
            dpi=dpi,
            max_pixels=get_int(m, "max_pixels", d.max_pixels, where, minimum=16),
            max_shards=get_int(m, "max_shards", d.max_shards, where, minimum=1),
        )

    def to_mapping(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["PlotSettings"]
