"""Which package modules a stage's code is made of: its import closure, found statically.

Why: each Snakemake rule carries a fingerprint of the code its stage runs, so that an
edit reruns exactly the stages that use the edited module. A hand-kept list drifts from
the imports (an edit to a module missing from a list silently reuses stale results), so
the list is derived here from the source itself.

How: a stage runs as ``homodyne-steps <stage>``, i.e. ``cli.main`` → ``cli._run_<stage>``.
Its modules are ``cli`` and the package, plus every ``homodyne_steps`` module imported by
cli at module level, inside ``_run_<stage>`` or inside the cli functions that it calls
(transitively, by name), plus the closure of those modules over *all* their imports
(module level and inside functions: an import anywhere in a module may run). Only cli is
read function by function, because it lazily imports every stage. Parsing is ``ast``
only (no import, no JAX): about 30 ms for the whole package at workflow parse time.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = "homodyne_steps"
PACKAGE_DIR = Path(__file__).resolve().parent
ENTRY_MODULE = "cli"


def module_path(name: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The source file of package module ``name``, a dotted name relative to the package
    (``"cli"``, ``"io.serialise"``; ``"__init__"`` is the package itself, ``"io"`` a
    subpackage's ``__init__.py``); None when there is none."""
    if name == "__init__":
        path = package_dir / "__init__.py"
        return path if path.is_file() else None
    parts = name.split(".")
    for path in (package_dir.joinpath(*parts).with_suffix(".py"),
                 package_dir.joinpath(*parts, "__init__.py")):  # fmt: skip
        if path.is_file():
            return path
    return None


def _with_packages(dotted: str, package_dir: Path) -> set[str]:
    """``dotted`` (if it is a module) and every package on its way: importing a.b.c runs
    the package, ``a/__init__`` and ``a/b/__init__`` too."""
    parts = dotted.split(".") if dotted else []
    names = {"__init__"} | {".".join(parts[: k + 1]) for k in range(len(parts))}
    return {n for n in names if module_path(n, package_dir)}


def _base(node: ast.ImportFrom, current: str) -> str | None:
    """The package-relative dotted module an ``import from`` names (None: not ours)."""
    module = node.module or ""
    if node.level == 0:
        parts = module.split(".")
        return ".".join(parts[1:]) if parts[0] == PACKAGE else None
    here = [] if current in ("", "__init__") else current.split(".")
    package = here[: len(here) - node.level] if len(here) >= node.level else []
    return ".".join([*package, *([module] if module else [])])


def _imported_modules(nodes: list[ast.AST], package_dir: Path, current: str = "") -> set[str]:
    """Package modules named by the import statements anywhere under ``nodes``."""
    found: set[str] = set()
    for root in nodes:
        for node in ast.walk(root):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == PACKAGE:
                        found |= _with_packages(".".join(parts[1:]), package_dir)
            elif isinstance(node, ast.ImportFrom):
                base = _base(node, current)
                if base is None:
                    continue
                found |= _with_packages(base, package_dir)
                for alias in node.names:  # `from pkg import x`: x may be a module
                    sub = f"{base}.{alias.name}" if base else alias.name
                    if module_path(sub, package_dir):
                        found |= _with_packages(sub, package_dir)
    return found


def _tree(path: Path) -> ast.Module:
    stat = path.stat()  # an edited file is parsed again, even within one process
    return _parse(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=128)
def _parse(path: Path, mtime_ns: int, size: int) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def module_imports(name: str, package_dir: Path = PACKAGE_DIR) -> set[str]:
    """Package modules imported anywhere in module ``name``."""
    path = module_path(name, package_dir)
    if path is None:
        raise FileNotFoundError(f"{PACKAGE}.{name}: no source file in {package_dir}")
    # A module's relative imports count from its package; a package's from itself.
    current = f"{name}.__init__" if path.name == "__init__.py" and name != "__init__" else name
    return _imported_modules([_tree(path)], package_dir, current)


def closure(roots: set[str], package_dir: Path = PACKAGE_DIR) -> set[str]:
    """``roots`` and every package module they import, directly or not."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(module_imports(name, package_dir) - seen)
    return seen


def _entry_functions(tree: ast.Module, entry: str) -> list[ast.AST]:
    """``entry`` and the module-level functions it calls by name, transitively."""
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    if entry not in functions:
        raise KeyError(entry)
    seen, todo = {}, [entry]
    while todo:
        name = todo.pop()
        if name in seen or name not in functions:
            continue
        seen[name] = functions[name]
        todo.extend(
            n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name) and n.id in functions
        )
    return list(seen.values())


def stage_modules(stage: str, package_dir: Path = PACKAGE_DIR) -> tuple[str, ...]:
    """Sorted package modules whose code runs in ``homodyne-steps <stage>``.

    Raises KeyError when the command line has no ``_run_<stage>`` function.
    """
    tree = _tree(package_dir / f"{ENTRY_MODULE}.py")
    top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    roots = _imported_modules(top_level + _entry_functions(tree, f"_run_{stage}"), package_dir)
    return tuple(sorted(closure(roots, package_dir) | {ENTRY_MODULE, "__init__"}))
