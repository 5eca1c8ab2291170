"""Small validators for stage settings: every error names the full key path.

Stage modules parse their slice of the config once into frozen dataclasses with these;
the workflow's JSON schema catches most mistakes earlier, but the stage functions are
also called from Python and the command line, so they check again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from homodyne_steps.errors import ConfigError


def check_keys(mapping: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """Reject keys not in ``allowed``, naming the key's full path and the valid keys."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where}: expected a mapping of settings, got {mapping!r}")
    allowed = sorted(allowed)
    for key in mapping:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key; expected one of {allowed}")


def get_bool(mapping: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = mapping.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key}: expected true or false, got {value!r}")
    return value


def get_number(
    mapping: Mapping[str, Any],
    key: str,
    default: float | None,
    where: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    allow_none: bool = False,
) -> float | None:
    """A finite number in [minimum, maximum] (YAML strings such as '1e-3' are rejected)."""
    value = mapping.get(key, default)
    if value is None and allow_none:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{where}.{key}: expected a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
        op = ">" if exclusive_minimum else ">="
        raise ConfigError(f"{where}.{key}: must be {op} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{where}.{key}: must be <= {maximum}, got {value}")
    return float(value)


def get_int(
    mapping: Mapping[str, Any], key: str, default: int, where: str, *, minimum: int | None = None
) -> int:
    value = mapping.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}.{key}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}.{key}: must be >= {minimum}, got {value}")
    return value


def get_choice(
    mapping: Mapping[str, Any], key: str, default: str, choices: Iterable[str], where: str
) -> str:
    choices = list(choices)
    value = mapping.get(key, default)
    if value not in choices:
        raise ConfigError(f"{where}.{key}: got {value!r}; expected one of {choices}")
    return value


def parse_settings_json(text: str, where: str) -> dict[str, Any]:
    """Settings passed on the command line as a JSON object (what the rules do)."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: --settings is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: --settings must be a JSON object, got {text!r}")
    return value
