"""The `builtin` source kind: the running Python's own documentation (tasks/lib/sources/builtin_corpus.py)."""

from __future__ import annotations

from typing import Any, Iterator, Literal

from pydantic import Field

from jielong.tasks.lib.sources import builtin_corpus
from jielong.tasks.core.schema import Strict
from jielong.tasks.lib.sources.reader import FileOptions
from jielong.tasks.core.shards import reject

FILES_PER_JOB = 180


class BuiltinSource(Strict):
    """The running Python's own documentation: pydoc_data topics and standard-library docstrings."""

    kind: Literal["builtin"] = "builtin"
    topics: bool = True
    docstrings: bool = True
    limit: int | None = Field(None, ge=1)


def check(source: BuiltinSource, where: str) -> None:
    """Nothing to check: the corpus is part of every Python installation."""


def plan(source: BuiltinSource, job_bytes: int, options: FileOptions) -> list[Any]:
    """Jobs of up to FILES_PER_JOB standard-library files; the first also carries the pydoc topics."""
    names = builtin_corpus.stdlib_files() if source.docstrings else []
    if source.limit:
        names = names[: source.limit]
    chunks = [names[s : s + FILES_PER_JOB] for s in range(0, len(names), FILES_PER_JOB)] or [[]]
    return [{"topics": source.topics and n == 0, "files": chunk} for n, chunk in enumerate(chunks)]


def records(source: BuiltinSource, job: dict, options: FileOptions) -> Iterator[dict]:
    if job["topics"]:
        for doc_id, text, origin in builtin_corpus.topic_documents():
            yield {"id": doc_id, "text": text, "source": origin, "content_type": "text/plain"}
    for rel in job["files"]:
        docs, error = builtin_corpus.docstring_documents(rel)
        if error:
            yield reject({"id": f"stdlib/{rel}", "source": f"stdlib/{rel}"}, "unreadable_file", error)
        for doc_id, text, origin in docs:
            if len(text) > options.max_chars:
                yield reject({"id": doc_id, "source": origin, "text": text[:1000]}, "too_long",
                             f"more than {options.max_chars} characters")
            else:
                yield {"id": doc_id, "text": text, "source": origin, "content_type": "text/plain"}


def fingerprint(source: BuiltinSource) -> Any:
    """The corpus is determined by the Python version (its standard library and pydoc topics)."""
    return builtin_corpus.corpus_identity()


Config = BuiltinSource
