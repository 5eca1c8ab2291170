"""The documentation agrees with the code: config catalog, links, and the .test/ config.

- config/README.md names every key of the workflow schema (and no key the schema lacks),
  and its defaults agree with config/config.yaml;
- every relative link in docs/*.md and config/README.md points to an existing file;
- .test/config/config.yaml passes the schema and (slow) runs the whole workflow.

Only the schema, the YAML files and the Markdown are read (no package import), so
these checks do not depend on how the package is organised inside.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from conftest import local_snakemake_env

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load(
    (ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text(encoding="utf-8")
)
CATALOG = ROOT / "config" / "README.md"
TEST_CONFIG = ROOT / ".test" / "config" / "config.yaml"
# Dataset entries may carry these sections; they are catalogued once, at the top level.
OVERRIDABLE = ("filter", "preprocess", "qc", "model", "nlsq", "cmc")


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = SCHEMA
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _key_paths(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, bool]]:
    """(dotted key path, is_leaf) of every key the schema allows; `<name>` for free names."""
    if path.startswith("datasets.") and node.get("$ref", "").split("/")[-1] in OVERRIDABLE:
        yield path, True  # a per-dataset override of a section catalogued on its own
        return
    node = _resolve(node)
    named = node.get("additionalProperties")
    if "properties" in node:
        children = node["properties"].items()
    elif isinstance(named, dict) and "properties" in _resolve(named):
        children = [("<name>", named)]
    else:
        yield path, True
        return
    if path:
        yield path, False
    for key, child in children:
        yield from _key_paths(child, f"{path}.{key}" if path else key)


LEAVES = sorted(p for p, leaf in _key_paths(SCHEMA) if leaf)
ALL_PATHS = {p for p, _ in _key_paths(SCHEMA)}


def _catalog_rows() -> dict[str, list[str]]:
    """Key path -> the cells of its table row in config/README.md."""
    rows = {}
    for line in CATALOG.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*`([^`]+)`\s*\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def test_schema_walk_finds_the_known_sections():
    assert len(LEAVES) > 100
    for path in ("datasets.<name>.q", "nlsq.noise.min_samples", "parameters.<name>.prior.mu"):
        assert path in LEAVES


@pytest.mark.parametrize("path", LEAVES)
def test_every_schema_key_is_in_the_config_catalog(path):
    assert path in _catalog_rows(), f"config/README.md has no row for `{path}`"


def test_the_catalog_lists_no_key_the_schema_lacks():
    stale = sorted(set(_catalog_rows()) - ALL_PATHS)
    assert not stale, f"config/README.md documents keys the schema does not allow: {stale}"


def _flatten(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for key, child in value.items():
            yield from _flatten(child, f"{path}.{key}")
    else:
        yield path, value


def _as_value(cell: str) -> Any:
    value = yaml.safe_load(cell.strip("`"))
    if isinstance(value, str):  # PyYAML reads 1e-6 as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def test_catalog_defaults_agree_with_the_default_config():
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text(encoding="utf-8"))
    rows = _catalog_rows()
    checked, wrong = 0, []
    for section, value in config.items():
        if section in ("datasets", "simulate", "parameters"):
            continue
        for path, expected in _flatten(value, section):
            if path not in rows:
                wrong.append(f"{path}: no row in config/README.md")
                continue
            default = _as_value(rows[path][2])
            checked += 1
            if default != expected:
                wrong.append(f"{path}: README {rows[path][2]}, config.yaml {expected!r}")
    assert checked > 50
    assert not wrong, "config/README.md defaults disagree:\n" + "\n".join(wrong)


DOCS = sorted((ROOT / "docs").glob("*.md")) + [CATALOG]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(doc):
    text = doc.read_text(encoding="utf-8")
    targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)
    broken = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor in the same page
        if not (doc.parent / target.split("#", 1)[0]).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


def test_ci_config_passes_the_schema():
    config = yaml.safe_load(TEST_CONFIG.read_text(encoding="utf-8"))
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft202012Validator(SCHEMA).iter_errors(config)
    ]
    assert not errors, errors
    (name,) = config["datasets"]
    assert name in config["simulate"]
    assert config["simulate"][name]["mode"] == config["datasets"][name]["analysis_mode"]


@pytest.mark.slow
def test_ci_config_runs_the_whole_workflow(tmp_path):
    for name in ("Snakefile", "workflow", "config", "envs", "profiles", ".test"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tmp_path / name)
        else:
            shutil.copy2(src, tmp_path / name)
    # The checkout's package, whatever is installed; the rules' commands inherit it.
    pythonpath = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    started = time.perf_counter()
    done = subprocess.run(
        [
            "snakemake",
            "--cores",
            "2",
            "--configfile",
            ".test/config/config.yaml",
            # Without it the Snakefile's config/config.yaml is merged in, demo included.
            "--replace-workflow-config",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=local_snakemake_env({**os.environ, "PYTHONPATH": pythonpath}),
    )
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    (name,) = yaml.safe_load(TEST_CONFIG.read_text(encoding="utf-8"))["datasets"]
    assert (tmp_path / "results" / name / "cmc" / "parameters.json").is_file()
    assert (tmp_path / "results" / "summary.json").is_file()
    assert not (tmp_path / "results" / "demo").exists()
    print(f".test workflow: {elapsed:.1f} s")
