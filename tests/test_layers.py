"""The package's layers: imports go only downward, and no stage imports another stage.

base (errors, settings, _jax) < physics < io < inference, data < stages, plots < the
command line and workflow wiring. Modules of one folder may import each other; a stage
driver may import its records module (``*_records``), never another stage.
"""

from pathlib import Path

import pytest

from homodyne_steps.codegraph import PACKAGE_DIR, module_imports

RANK = {"": 0, "physics": 1, "io": 2, "inference": 3, "data": 3, "stages": 4, "plots": 4}
TOP = {
    "cli",
    "cli_simulate",
    "wfconfig",
    "codegraph",
    "cpu_pinning",
}  # the entry points, above everything


def _modules() -> list[str]:
    out = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def _folder(module: str) -> str:
    return module.split(".")[0] if "." in module or module in RANK else ""


def _rank(module: str) -> int:
    return 5 if module in TOP else RANK[_folder(module)]


def test_every_module_has_a_layer():
    assert {_folder(m) for m in _modules()} <= set(RANK)
    assert set(RANK) - {""} <= {p.name for p in PACKAGE_DIR.iterdir() if p.is_dir()}


@pytest.mark.parametrize("module", _modules())
def test_imports_only_go_down(module):
    for imported in module_imports(module):
        if imported == "__init__" or _folder(imported) == _folder(module):
            continue
        if imported in RANK:  # a subpackage's __init__ runs with any of its modules
            imported_rank = RANK[imported]
        else:
            imported_rank = _rank(imported)
        assert imported_rank < _rank(module), f"{module} imports {imported} (not below it)"


@pytest.mark.parametrize("module", [m for m in _modules() if m.startswith("stages.")])
def test_no_stage_imports_another_stage(module):
    others = {
        m
        for m in module_imports(module)
        if m.startswith("stages.") and m != module and not m.endswith("_records")
    }
    assert not others, f"{module} imports the stages {sorted(others)}"


def test_the_layers_are_documented():
    for folder in set(RANK) - {""}:
        text = (PACKAGE_DIR / folder / "__init__.py").read_text(encoding="utf-8")
        assert text.startswith('"""') and len(text) > 80, folder
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if path.name != "__init__.py":
            assert path.name in readme, f"README's layout does not list {path.name}"
