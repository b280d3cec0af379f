"""The installed namespace and its layers.

Layers, top to bottom (README: "How the code is laid out"):
  3 orchestration  flows/                       Prefect flows, task runners, the CLI
  2 stages         tasks/*.py                   one module per stage, each owning its config section
  1 libraries      tasks/lib/, models/          sources, evaluation engine, studies, models, ...
  0 machinery      tasks/core/                  contract, config loading, schema, fingerprints, shards, tracking
A module imports only from its own layer or below; the libraries do not form a cycle between them.
Imports are read from the source (function-level ones too), so a lazy import cannot hide an arrow.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"flows": "jielong.flows", "tasks": "jielong.tasks", "models": "jielong.models"}
LAYERS = ("machinery", "libraries", "stages", "orchestration")


def layer_of(module: str) -> int:
    if module.startswith("jielong.flows"):
        return LAYERS.index("orchestration")
    if module.startswith("jielong.tasks.core"):
        return LAYERS.index("machinery")
    if module.startswith(("jielong.tasks.lib", "jielong.models")):
        return LAYERS.index("libraries")
    return LAYERS.index("stages")


def library_of(module: str) -> str:
    """The library a layer-1 module belongs to: models, or the first folder/module under tasks/lib."""
    parts = module.split(".")
    return "jielong.models" if parts[1] == "models" else ".".join(parts[:4])


def source_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def imports_of(module: str, source: str, known: set[str]) -> set[str]:
    """The jielong modules a module's source imports (`from a import b` counts a.b when b is a module)."""
    found = set()
    package = module if module in known and _is_package(module, known) else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    return {name for name in found if name.startswith("jielong.")}


def _is_package(module: str, known: set[str]) -> bool:
    return any(other.startswith(module + ".") for other in known)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({LAYERS[layer_of(m)]}) imports {t} ({LAYERS[layer_of(t)]})"
                  for m, targets in graph.items() for t in targets if layer_of(t) > layer_of(m))


def library_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle among the libraries (layer 1), as the list of libraries on it, or None."""
    edges: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if layer_of(module) != 1:
            continue
        for target in targets:
            if layer_of(target) == 1 and library_of(target) != library_of(module):
                edges.setdefault(library_of(module), set()).add(library_of(target))
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt):], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    known = set(modules)
    return {m: imports_of(m, path.read_text(encoding="utf-8"), known) for m, path in modules.items()}


def test_no_module_imports_from_a_layer_above_it():
    assert upward_imports(import_graph()) == []


def test_the_libraries_do_not_import_each_other_in_a_circle():
    assert library_cycle(import_graph()) is None


def test_the_checks_catch_an_upward_import_and_a_cycle():
    """The checks themselves can fail: a machinery module importing a stage, a stage importing the CLI,
    and two libraries importing each other are all reported."""
    graph = {
        "jielong.tasks.core.contract": {"jielong.tasks.clean"},
        "jielong.tasks.clean": {"jielong.flows.cli", "jielong.tasks.core.contract"},
        "jielong.models.train": {"jielong.tasks.lib.sources.reader"},
        "jielong.tasks.lib.sources.reader": {"jielong.models.train"},
    }
    assert upward_imports(graph) == [
        "jielong.tasks.clean (stages) imports jielong.flows.cli (orchestration)",
        "jielong.tasks.core.contract (machinery) imports jielong.tasks.clean (stages)",
    ]
    assert library_cycle(graph) == ["jielong.models", "jielong.tasks.lib.sources", "jielong.models"]
    source = "from jielong.tasks import clean\ndef f():\n    from jielong.flows import cli\n"
    known = {"jielong.tasks", "jielong.tasks.clean", "jielong.flows", "jielong.flows.cli"}
    assert imports_of("jielong.models.x", source, known) >= {"jielong.tasks.clean", "jielong.flows.cli"}


def test_every_package_folder_is_installed_under_jielong_and_nothing_else_is():
    """pyproject's explicit package list names every folder with an __init__.py, under `jielong.` only (a
    folder missing from it would be left out of `pip install .`)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    code_packages = {m for m, path in source_modules().items() if path.name == "__init__.py"}
    assert code_packages <= listed
    assert all(name.split(".")[0] == "jielong" for name in listed)
    for package, folder in setuptools["package-dir"].items():
        assert package.startswith("jielong.") and (ROOT / folder).is_dir()
    assert setuptools["package-dir"]["jielong.eval_tasks"] == "data/eval"  # tasks/core/resources.py looks there


def test_a_folder_with_its_own_tasks_and_models_packages_does_not_shadow_jielong(tmp_path):
    """Run from a folder holding packages named tasks/, models/ and flows/ (first on sys.path, as the
    current folder is for `python -c`): jielong's code imports only jielong.*, so theirs are never read."""
    import subprocess
    import sys

    for name in ("tasks", "models", "flows"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} package was imported')\n")
    code = ("from jielong.flows import stages, cli; from jielong.tasks.config import load_config; "
            "print(sorted(stages.stage_keys(load_config('tiny'))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pretrain" in done.stdout
