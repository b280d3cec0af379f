"""The `files` source kind: local files or folders, read by tasks/lib/sources/reader.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Literal

from jielong.tasks.core.schema import Strict, UserError
from jielong.tasks.lib.sources import reader
from jielong.tasks.lib.sources.reader import FileOptions, Span, list_files, plan_spans, read_file, record_document


class FilesSource(Strict):
    """Local files or folders: txt/md/rst, jsonl/json, parquet, csv/tsv, html/htm, optionally .gz/.zst."""

    kind: Literal["files"] = "files"
    path: str
    glob: str = "**/*"
    text_unit: Literal["file", "paragraph", "line"] = "file"  # how plain text splits into documents
    text_field: str = "text"  # jsonl/json/parquet/csv column holding the text
    id_field: str | None = None  # column holding a stable id; default: path#record-number
    columns: list[str] | None = None  # csv/tsv files without a header row


MAX_FILES_PER_JOB = 500


def check(source: FilesSource, where: str) -> None:
    root = Path(source.path).expanduser()
    if not root.exists():
        raise UserError(f"{where}.path: {root} does not exist")
    if not list_files(root, source.glob):
        raise UserError(f"{where}: no files match {source.glob!r} under {root}")


def plan(source: FilesSource, job_bytes: int, options: FileOptions) -> list[Any]:
    """Jobs of about job_bytes: small files grouped (at most MAX_FILES_PER_JOB each), a larger file
    that splits (reader.plan_spans) one job per span, so one big file spreads over the workers.

    A job is a list of pieces (absolute path, name relative to the source, span or None for the
    whole file): workers may run in another directory."""
    options = source_options(source, options)
    jobs: list[list[tuple[str, str, Span | None]]] = [[]]
    size = 0
    for path, rel in list_files(Path(source.path).expanduser().absolute(), source.glob):
        nbytes = path.stat().st_size
        spans = plan_spans(path, job_bytes, options) if nbytes > job_bytes else None
        if jobs[-1] and (spans or size + nbytes > job_bytes or len(jobs[-1]) >= MAX_FILES_PER_JOB):
            jobs.append([])
            size = 0
        if spans:
            jobs[-1:] = [[(str(path), rel, span)] for span in spans] + [[]]
            continue
        jobs[-1].append((str(path), rel, None))
        size += nbytes
    return [job for job in jobs if job] or [[]]


def source_options(source: FilesSource, options: FileOptions) -> FileOptions:
    wanted = tuple(c for c in (source.text_field, source.id_field) if c)
    return replace(options, text_unit=source.text_unit, columns=tuple(source.columns) if source.columns else None,
                   parquet_columns=wanted)


def records(source: FilesSource, job: list, options: FileOptions) -> Iterator[dict]:
    options = source_options(source, options)
    for path, rel, span in job:
        for item in read_file(Path(path), rel, options, span):
            yield record_document(item, source.text_field, source.id_field, options.max_chars) if "record" in item else item


def fingerprint(source: FilesSource) -> Any:
    return reader.fingerprint(Path(source.path), source.glob)


Config = FilesSource
