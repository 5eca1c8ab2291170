"""What the Snakefile needs from the package: config validation and per-rule slices.

Imported at workflow parse time, so it stays light (no JAX, no h5py).

Rerun semantics: each rule receives only its own slice of the config (serialised as
JSON with keys sorted recursively, because Snakemake compares ``params`` by ``repr``)
plus a fingerprint of the code that stage runs (package version + hash of the modules in
its import closure, found by :mod:`homodyne_steps.codegraph`), so editing one stage's
settings or code reruns that stage and what is downstream of it, and nothing upstream.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from homodyne_steps import __version__
from homodyne_steps.codegraph import module_path, stage_modules
from homodyne_steps.errors import ConfigError

# The stages that run as `homodyne-steps <stage>`; each one's code is its import closure.
STAGES = (
    "simulate",
    "load",
    "filter",
    "preprocess",
    "qc",
    "nlsq",
    "cmc_plan",
    "cmc_shard",
    "cmc_combine",
    "plot_data",
    "plot_qc",
    "plot_nlsq",
    "plot_cmc",
    "write",
)
PLOT_STAGES = ("plot_data", "plot_qc", "plot_nlsq", "plot_cmc")
# Global sections a dataset may override key by key (deep merge).
OVERRIDABLE = ("filter", "preprocess", "qc", "nlsq", "cmc")
LOAD_KEYS = ("q", "dt", "frames", "q_tolerance", "storage", "missing_frame_factors", "time_origin")


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def stop_on_config_error(check: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run a config check at workflow parse time; on ConfigError print its message and
    exit with status 1, so the user reads one clear message, not a Snakemake traceback."""
    try:
        check(*args, **kwargs)
    except ConfigError as exc:
        print(f"homodyne-steps: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def check_config_file(path: str | Path, *, missing_ok: bool = False) -> None:
    """Raise ConfigError naming the file, line and column of a YAML syntax error.

    Snakemake's own loader says only that the file "is not valid JSON or YAML"; the
    Snakefile calls this before its ``configfile:`` directive. ``missing_ok``: a missing
    file is left to Snakemake (a run may give its config with ``--configfile``).
    """
    import yaml

    p = Path(path)
    if missing_ok and not p.exists():
        return
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown place"
        what = " ".join(str(x) for x in (exc.context, exc.problem) if x)
        raise ConfigError(f"{p}: YAML syntax error at {where}: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(loaded, Mapping):
        raise ConfigError(
            f"{p}: the configuration must be a mapping of sections (datasets:, filter:, ...), "
            f"got {type(loaded).__name__}"
        )


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = schema.get("$ref", "")
    if ref.startswith("#/"):
        node: Any = root
        for part in ref[2:].split("/"):
            node = node[part]
        return _resolve(node, root)
    return schema


_TYPE_WORDS = {
    "number": "a number",
    "integer": "an integer",
    "string": "a string",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}


def _describe(schema: Mapping[str, Any], root: Mapping[str, Any]) -> str:
    """Plain words for what a (sub)schema accepts, e.g. "a number > 0"."""
    schema = _resolve(schema, root)
    if "x-expected" in schema:
        return str(schema["x-expected"])
    if "const" in schema:
        return repr(schema["const"])
    if "enum" in schema:
        return f"one of {schema['enum']}"
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return ", or ".join(_describe(s, root) for s in schema[key])
    kind = schema.get("type")
    words = _TYPE_WORDS.get(kind, "a value") if isinstance(kind, str) else "a value"
    bounds = [
        f"{op} {schema[k]}"
        for k, op in (("exclusiveMinimum", ">"), ("minimum", ">="), ("maximum", "<="))
        if k in schema
    ]
    if (
        kind == "array"
        and "minItems" in schema
        and schema.get("minItems") == schema.get("maxItems")
    ):
        words = f"a list of {schema['minItems']} " + (
            "numbers"
            if _resolve(schema.get("items", {}), root).get("type") == "number"
            else "items"
        )
    return " ".join([words, *bounds]) if bounds else words


def _string_trap(value: Any) -> str:
    """A hint when a value is a quoted number or boolean in the YAML (a string)."""
    if not isinstance(value, str):
        return ""
    text = value.strip()
    try:
        float(text)
    except ValueError:
        if text.lower() not in ("true", "false", "null", "~"):
            return ""
    return (
        f" (the value is the string {value!r}: it is quoted in the YAML; "
        f"write it without quotes: {text})"
    )


def _message(err: Any, root: Mapping[str, Any]) -> str:
    """One line for one schema violation: the key path, the value and what was expected."""
    where, value = _path(err.absolute_path), err.instance
    if err.validator in ("oneOf", "anyOf", "type", "exclusiveMinimum", "minimum", "maximum"):
        return f"{where}: got {value!r}; expected {_describe(err.schema, root)}" + _string_trap(
            value
        )
    if err.validator == "enum":
        return f"{where}: got {value!r}; expected one of {err.validator_value}"
    if err.validator == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        return f"{_path([*err.absolute_path, missing])}: required key is missing"
    return f"{where}: {err.message}" + _string_trap(value)


def validate_config(config: Mapping[str, Any], schema_path: str | Path) -> None:
    """Check ``config`` against the JSON schema; raise ConfigError naming each bad key,
    the value found and what is expected."""
    import jsonschema  # a Snakemake dependency; imported here to keep module import light
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.path))):
        if err.validator == "additionalProperties":
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            allowed = sorted(err.schema.get("properties", {}))
            for key in extra:
                problems.append(
                    f"{_path([*err.absolute_path, key])}: unknown key"
                    + (f"; expected one of {allowed}" if allowed else "")
                )
        else:
            problems.append(_message(err, schema))
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
    """The settings one stage of one dataset sees (and nothing else).

    For ``simulate``, ``dataset`` names a ``simulate:`` entry, which need not be a dataset:
    several datasets may analyse one simulated file.
    """
    if stage == "simulate":
        simulated = config.get("simulate") or {}
        if dataset not in simulated:
            raise ConfigError(f"simulate.{dataset}: no such entry; have {sorted(simulated)}")
        # the file layout goes on the command line (--format), not into the settings
        return {k: v for k, v in (simulated[dataset] or {}).items() if k != "format"}
    entry = config["datasets"][dataset]
    if stage == "load":
        return {k: entry[k] for k in LOAD_KEYS if k in entry}
    if stage in PLOT_STAGES:  # the same for every dataset: one look across datasets
        return dict(config.get("plot") or {})
    # the kernel's model: shared by NLSQ and CMC, overridable per dataset
    model = deep_merge(config.get("model") or {}, entry.get("model") or {})
    if stage.startswith("cmc_"):
        cmc = deep_merge(config.get("cmc") or {}, entry.get("cmc") or {})
        nlsq = deep_merge(config.get("nlsq") or {}, entry.get("nlsq") or {})
        common = {"analysis_mode": entry["analysis_mode"]}
        if stage == "cmc_plan":  # absent keys take the job's defaults (the settings classes)
            coords = (cmc.get("sampler") or {}).get("reparameterize")
            return {
                **common,
                **(
                    {"per_angle_scaling": nlsq["per_angle_scaling"]}
                    if "per_angle_scaling" in nlsq
                    else {}
                ),
                "sharding": cmc.get("sharding") or {},
                **({"sampling_coordinates": coords} if coords is not None else {}),
            }
        if stage == "cmc_shard":
            return {
                **common,
                "L": entry.get("L"),
                "model": model,
                "parameters": config.get("parameters") or {},
                "sampler": cmc.get("sampler") or {},
                "prior": cmc.get("prior") or {},
            }
        if stage == "cmc_combine":
            return {
                **common,
                "L": entry.get("L"),
                "model": model,
                "combine": cmc.get("combine") or {},
            }
        if stage == "cmc_resources":
            return dict(cmc.get("resources") or {})
    merged = deep_merge(config.get(stage) or {}, entry.get(stage) or {})
    if stage == "nlsq":
        return {
            "analysis_mode": entry["analysis_mode"],
            "L": entry.get("L"),
            "model": model,
            "parameters": config.get("parameters") or {},
            "nlsq": merged,
        }
    if stage in OVERRIDABLE:
        return merged
    raise ConfigError(f"no config slice defined for stage {stage!r}")


def _settings_parsers() -> dict[str, Callable[[dict[str, Any]], Any]]:
    """Stage -> the typed settings its job builds from its slice (imported here, not at
    the top: the settings modules are light, but the Snakefile imports this module)."""
    from homodyne_steps.data.preprocess_settings import PreprocessSettings
    from homodyne_steps.data.qc_settings import QcSettings
    from homodyne_steps.inference.cmc_shard_settings import PriorSettings, SamplerSettings
    from homodyne_steps.inference.combine_settings import CombineSettings
    from homodyne_steps.inference.nlsq_settings import NlsqSettings
    from homodyne_steps.physics.model_settings import ModelSettings
    from homodyne_steps.physics.registry import REGISTRY
    from homodyne_steps.plots.plot_settings import PlotSettings
    from homodyne_steps.stages.cmc_plan import ShardingSettings
    from homodyne_steps.stages.filter import FilterSettings
    from homodyne_steps.stages.load import LoadSettings

    return {
        "load": LoadSettings.from_mapping,
        "filter": FilterSettings.from_mapping,
        "preprocess": PreprocessSettings.from_mapping,
        "qc": QcSettings.from_mapping,
        "nlsq": lambda s: (
            NlsqSettings.from_mapping(s.get("nlsq")),
            REGISTRY.with_overrides(s.get("parameters")),
            ModelSettings.from_mapping(s.get("model")),
        ),
        "cmc_plan": lambda s: ShardingSettings.from_mapping(s.get("sharding")),
        "cmc_shard": lambda s: (
            SamplerSettings.from_mapping(s.get("sampler")),
            PriorSettings.from_mapping(s.get("prior")),
        ),
        "cmc_combine": lambda s: CombineSettings.from_mapping(s.get("combine")),
        "plot_data": PlotSettings.from_mapping,
    }


def check_stage_settings(config: Mapping[str, Any]) -> None:
    """Build every stage's typed settings for every dataset, as its job will.

    The schema checks each value alone; the settings classes also check what it cannot
    (two thresholds in order, a filter size a method can use, a key that only makes sense
    with another). Done when the workflow starts, so such a value stops it before the
    first job, naming the dataset and the key, instead of failing a job hours later.
    """
    from homodyne_steps.errors import HomodyneStepsError
    from homodyne_steps.physics.speckle import SpeckleSettings, speckle_mapping

    for name, entry in (config.get("simulate") or {}).items():
        if (entry or {}).get("method") == "speckle":
            where = f"simulate.{name}"
            try:
                SpeckleSettings.from_mapping(speckle_mapping(entry, where), f"{where}.speckle")
            except HomodyneStepsError as exc:
                raise ConfigError(str(exc)) from None
    parsers = _settings_parsers()
    for name in dataset_names(config):
        for stage, parse in parsers.items():
            try:
                parse(stage_slice(config, stage, name))
            except HomodyneStepsError as exc:
                raise ConfigError(f"dataset {name!r}: {exc}") from None


def stage_settings(config: Mapping[str, Any], stage: str, dataset: str) -> str:
    """The slice as canonical JSON (keys sorted recursively): stable under YAML reordering."""
    return json.dumps(stage_slice(config, stage, dataset), sort_keys=True, separators=(",", ":"))


def code_fingerprint(stage: str) -> str:
    """Package version + hash of the modules a stage runs (its import closure, read from
    the source without importing it: :mod:`homodyne_steps.codegraph`)."""
    if stage not in STAGES:
        raise ConfigError(f"no stage {stage!r}; stages are {list(STAGES)}")
    digest = hashlib.sha256()
    for name in stage_modules(stage):
        digest.update(name.encode() + b"\0")
        digest.update(module_path(name).read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"
