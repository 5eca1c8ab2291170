"""What the Snakefile needs from the package: config validation and per-rule slices.

Imported at workflow parse time, so it stays light (no JAX, no h5py).

Rerun semantics: each rule receives only its own slice of the config (serialised as
JSON with keys sorted recursively, because Snakemake compares ``params`` by ``repr``)
plus a fingerprint of the code that stage runs (package version + hash of its modules),
so editing one stage's settings or code reruns that stage and what is downstream of it,
and nothing upstream.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from homodyne_steps import __version__
from homodyne_steps.errors import ConfigError

# Stage -> package modules whose code determines the stage's output.
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "simulate": ("simulate", "aps_writer", "model", "registry", "serialise"),
    "load": ("load", "dataset", "serialise"),
    "filter": ("filter", "dataset", "settings", "serialise"),
    "preprocess": ("preprocess", "dataset", "settings", "serialise"),
    "qc": ("qc", "dataset", "settings", "serialise"),
    "nlsq": (
        "nlsq_stage",
        "nlsq",
        "model",
        "noise",
        "scaling",
        "stratify",
        "registry",
        "dataset",
        "settings",
        "serialise",
        "_jax",
    ),
    "cmc_plan": (
        "cmc_plan",
        "coordinates",
        "stratify",
        "scaling",
        "registry",
        "dataset",
        "settings",
        "serialise",
    ),
    "cmc_shard": (
        "cmc_shard",
        "cmc_space",
        "coordinates",
        "nlsq",
        "noise",
        "model",
        "scaling",
        "registry",
        "dataset",
        "settings",
        "serialise",
        "_jax",
    ),
    "cmc_combine": (
        "cmc_combine",
        "cmc_space",
        "coordinates",
        "cmc_fitted",
        "nlsq_stage",
        "nlsq",
        "model",
        "registry",
        "dataset",
        "settings",
        "serialise",
        "_jax",
    ),
    "plot_data": ("plot_data", "plot_common", "dataset", "settings", "serialise"),
    "plot_qc": ("plot_qc", "plot_common", "qc", "settings", "serialise"),
    "plot_nlsq": ("plot_nlsq", "plot_common", "registry", "settings", "serialise"),
    "plot_cmc": ("plot_cmc", "plot_common", "registry", "settings", "serialise"),
    "write": ("write", "registry", "serialise"),
}
PLOT_STAGES = ("plot_data", "plot_qc", "plot_nlsq", "plot_cmc")
# Global sections a dataset may override key by key (deep merge).
OVERRIDABLE = ("filter", "preprocess", "qc", "nlsq", "cmc")
LOAD_KEYS = ("q", "dt", "frames", "q_tolerance", "storage")


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def validate_config(config: Mapping[str, Any], schema_path: str | Path) -> None:
    """Check ``config`` against the JSON schema; raise ConfigError naming each bad key."""
    import jsonschema  # a Snakemake dependency; imported here to keep module import light
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.path))):
        where = _path(err.absolute_path)
        if err.validator == "additionalProperties":
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            allowed = sorted(err.schema.get("properties", {}))
            for key in extra:
                problems.append(
                    f"{_path([*err.absolute_path, key])}: unknown key"
                    + (f"; expected one of {allowed}" if allowed else "")
                )
        else:
            problems.append(f"{where}: {err.message}")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dataset_names(config: Mapping[str, Any]) -> list[str]:
    return sorted(config["datasets"])


def stage_slice(config: Mapping[str, Any], stage: str, dataset: str) -> dict[str, Any]:
    """The settings one stage of one dataset sees (and nothing else)."""
    entry = config["datasets"][dataset]
    if stage == "simulate":
        return dict(config.get("simulate", {}).get(dataset, {}))
    if stage == "load":
        return {k: entry[k] for k in LOAD_KEYS if k in entry}
    if stage in PLOT_STAGES:  # the same for every dataset: one look across datasets
        return dict(config.get("plot") or {})
    if stage.startswith("cmc_"):
        cmc = deep_merge(config.get("cmc") or {}, entry.get("cmc") or {})
        nlsq = deep_merge(config.get("nlsq") or {}, entry.get("nlsq") or {})
        common = {"analysis_mode": entry["analysis_mode"]}
        if stage == "cmc_plan":
            return {
                **common,
                "per_angle_scaling": nlsq.get("per_angle_scaling", "varpro"),
                "sharding": cmc.get("sharding") or {},
                "sampling_coordinates": (cmc.get("sampler") or {}).get("reparameterize", "rates"),
            }
        if stage == "cmc_shard":
            return {
                **common,
                "L": entry.get("L"),
                "parameters": config.get("parameters") or {},
                "sampler": cmc.get("sampler") or {},
                "prior": cmc.get("prior") or {},
            }
        if stage == "cmc_combine":
            return {**common, "L": entry.get("L"), "combine": cmc.get("combine") or {}}
        if stage == "cmc_resources":
            return dict(cmc.get("resources") or {})
    merged = deep_merge(config.get(stage) or {}, entry.get(stage) or {})
    if stage == "nlsq":
        return {
            "analysis_mode": entry["analysis_mode"],
            "L": entry.get("L"),
            "parameters": config.get("parameters") or {},
            "nlsq": merged,
        }
    if stage in OVERRIDABLE:
        return merged
    raise ConfigError(f"no config slice defined for stage {stage!r}")


def stage_settings(config: Mapping[str, Any], stage: str, dataset: str) -> str:
    """The slice as canonical JSON (keys sorted recursively): stable under YAML reordering."""
    return json.dumps(stage_slice(config, stage, dataset), sort_keys=True, separators=(",", ":"))


def code_fingerprint(stage: str) -> str:
    """Package version + hash of the modules a stage runs (no import: finds the files)."""
    digest = hashlib.sha256()
    for name in STAGE_MODULES[stage]:
        spec = importlib.util.find_spec(f"homodyne_steps.{name}")
        if spec is None or spec.origin is None:
            raise ConfigError(f"stage {stage!r}: module homodyne_steps.{name} not found")
        digest.update(Path(spec.origin).read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"
