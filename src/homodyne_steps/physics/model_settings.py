"""Which model the kernel evaluates (config section ``model``), checked when built.

Light on purpose (no JAX): the workflow builds it when it starts. The forms themselves
are in :mod:`homodyne_steps.physics.model`; ``docs/model.md`` compares them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from homodyne_steps.settings import check_keys, get_choice

SHEAR_FORMS = ("physical", "homodyne")  # uniform gradient across the gap | the seed's sinc⁴
INTEGRALS = ("exact", "trapezoid")  # the power laws' antiderivatives | the seed's trapezoid
# First principles by default (docs/model.md); homodyne + trapezoid reproduces the seeds.
DEFAULT_SHEAR = "physical"
DEFAULT_INTEGRAL = "exact"


@dataclass(frozen=True)
class ModelSettings:
    """``shear``: physical or homodyne (the seed's and the reference package's form);
    ``integral``: exact or trapezoid. ``physical`` + ``exact`` is the default;
    ``homodyne`` + ``trapezoid`` reproduces the seed equations exactly."""

    shear: str = DEFAULT_SHEAR
    integral: str = DEFAULT_INTEGRAL

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None, where: str = "model") -> ModelSettings:
        m = {} if m is None else m
        check_keys(m, {"shear", "integral"}, where)
        return cls(
            shear=get_choice(m, "shear", DEFAULT_SHEAR, SHEAR_FORMS, where),
            integral=get_choice(m, "integral", DEFAULT_INTEGRAL, INTEGRALS, where),
        )

    @classmethod
    def of_record(cls, recorded: Mapping[str, Any] | None) -> ModelSettings:
        """The model an output records; outputs written before the choice existed (no
        record) were fitted with the seed's homodyne/trapezoid form."""
        if recorded is None:
            return cls(shear="homodyne", integral="trapezoid")
        return cls.from_mapping(recorded, "model (recorded)")

    def to_mapping(self) -> dict[str, Any]:
        return asdict(self)


__all__ = [
    "DEFAULT_INTEGRAL",
    "DEFAULT_SHEAR",
    "INTEGRALS",
    "SHEAR_FORMS",
    "ModelSettings",
]
