"""The built-in corpus: the running Python's own documentation, read without any download.

One document per `pydoc_data.topics` entry (the language reference topics) and one per docstring of
the standard library (modules, classes, functions, methods). Docstrings are read by parsing source
files with `ast` — nothing is imported, so no module's import-time side effects run.

Ids are stable for a given Python version: `pydoc:<topic>` and `stdlib:<module>:<qualname>`; the
`source` column is the module path the text came from.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

# Test suites and demo code are not documentation: their docstrings are test descriptions.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "turtledemo"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_identity() -> str:
    """What the built-in corpus depends on; part of the ingest cache key."""
    return f"python-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


def stdlib_files() -> list[str]:
    """Relative paths of standard-library source files, sorted (deterministic)."""
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        files.append(rel.as_posix())
    return sorted(files)


def module_name(rel_path: str) -> str:
    parts = rel_path[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def topic_documents() -> Iterator[tuple[str, str, str]]:
    """(id, text, source) for every pydoc topic."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name], "pydoc_data/topics.py"


def docstring_documents(rel_path: str) -> tuple[list[tuple[str, str, str]], str | None]:
    """(id, text, source) for each docstring in one stdlib file, and an error if it cannot be parsed."""
    path = stdlib_root() / rel_path
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError) as err:
        return [], f"{type(err).__name__}: {err}"
    module = module_name(rel_path)
    docs: list[tuple[str, str, str]] = []
    seen: dict[str, int] = {}

    def add(qualname: str, node: ast.AST) -> None:
        text = ast.get_docstring(node, clean=True)
        if not text:
            return
        doc_id = f"stdlib:{module}:{qualname}" if qualname else f"stdlib:{module}"
        seen[doc_id] = seen.get(doc_id, 0) + 1
        if seen[doc_id] > 1:  # the same name defined twice (e.g. per platform)
            doc_id = f"{doc_id}#{seen[doc_id]}"
        docs.append((doc_id, text, f"stdlib/{rel_path}"))

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualname = f"{prefix}.{child.name}" if prefix else child.name
                add(qualname, child)
                if isinstance(child, ast.ClassDef):
                    visit(child, qualname)
            elif isinstance(child, (ast.If, ast.Try)):
                visit(child, prefix)  # definitions under `if sys.platform ...:` / `try:`

    add("", tree)
    visit(tree, "")
    return docs, None
