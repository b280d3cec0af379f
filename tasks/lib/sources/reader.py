"""The one hardened reader of local files every stage uses for files it is given (ingest's corpora,
instruct's alpaca/chat files, in-context task data, extra perplexity sets).

Formats by suffix (or `format`): .txt/.md/.rst and anything else as plain text (split into documents
per file, paragraph or line), .html/.htm, .jsonl/.ndjson, .json (an array, bounded), .parquet,
.csv/.tsv (GLUE-style unquoted TSV; `columns` for files without a header row), each optionally
.gz/.zst-compressed. Reading is streamed, at most `max_chars` per document or record, so a huge or
hostile file cannot exhaust memory; every bad record becomes a counted rejection with a reason.

`read_file` yields three kinds of items:
  a document  {"id", "text", "source", "content_type"}              (text and HTML files)
  a record    {"id", "source", "record": <the parsed JSON value or row dict>}   (structured files)
  a rejection {"id", "text", "source", "reason", "detail", ...}     (tasks/core/shards.py REJECT_SCHEMA)

A large file can be read in pieces (`plan_spans`, then `read_file(..., span=)`), so one file spreads
over many workers. What splits: uncompressed JSON lines, plain text read per line or per paragraph
(byte ranges starting at a line, resp. right after a blank line), and Parquet (ranges of row groups).
Each span knows the number of the line (row) it starts at, so the pieces together yield exactly the
items, ids included, of one whole-file read, whatever the span size. What does not split is read
whole: compressed files (a gzip or zstd stream cannot be entered in the middle), text read per file
and HTML (one document), .json (one array), CSV/TSV (a quoted CSV field may hold line breaks), and
files whose first 8 KiB look binary.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from jielong.tasks.core.fingerprint import fingerprint_files
from jielong.tasks.core.shards import reject

PLAIN, HTML = "text/plain", "text/html"
MAX_JSON_ARRAY_BYTES = 256 << 20
FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv",
    ".html": "html", ".htm": "html", ".xhtml": "html",
}
STRUCTURED = {"jsonl", "json", "parquet", "csv", "tsv"}
COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
# Errors that mean "this file is damaged", as opposed to a bug in jielong.
READ_ERRORS = (OSError, EOFError, zlib.error, UnicodeError, ValueError, csv.Error)
BINARY_SNIFF_BYTES = 8192
# Control bytes (not tab, newline, form feed, carriage return, escape) above this share of a file's
# first 8 KiB mark it binary, as `file` does by character class; a few NUL bytes in prose do not
# (clean strips control characters), an executable, an image or compressed data does.
BINARY_CONTROL_SHARE = 0.05
_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 12, 13, 27)) + b"\x7f"


@dataclass(frozen=True)
class FileOptions:
    text_unit: str = "file"  # plain text: one document per file, paragraph or line
    max_chars: int = 1_000_000
    decode_errors: str = "replace"  # invalid UTF-8: replace (counted as repaired) or reject
    format: str | None = None  # jsonl, json, parquet, csv, tsv, html, text; default: from the suffix
    columns: tuple[str, ...] | None = None  # csv/tsv without a header row
    parquet_columns: tuple[str, ...] | None = None  # read only these Parquet columns, the first required (None: all)


@dataclass(frozen=True)
class Span:
    """A piece of one file: bytes [start, end) of a line-oriented file whose first line is line number
    `first`, or row groups [start, end) of a Parquet file whose first row is row number `first`."""

    start: int
    end: int
    first: int


class Rejection(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------- which files


def list_files(root: Path, glob: str = "**/*") -> list[tuple[Path, str]]:
    """(path, name relative to root) of every file a folder or file path reads, hidden ones skipped."""
    root = Path(root).expanduser()
    if root.is_file():
        return [(root, root.name)]
    return [
        (p, p.relative_to(root).as_posix())
        for p in sorted(root.glob(glob))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]


def fingerprint(root: Path, glob: str = "**/*") -> Any:
    """Content fingerprint of exactly the files `list_files` reads (names matter: they are in ids)."""
    root = Path(root).expanduser()
    if not root.exists():
        return "missing"
    return fingerprint_files([(rel, path) for path, rel in list_files(root, glob)])


def format_of(path: Path, override: str | None = None) -> tuple[str, str | None]:
    """('jsonl', 'gzip') for data.jsonl.gz; ('text', None) for notes.txt or a file without a suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    return override or FORMATS.get(suffixes[-1] if suffixes else "", "text"), compression


def is_binary(head: bytes) -> bool:
    if not head:
        return False
    control = len(head) - len(head.translate(None, _CONTROL))
    return control / len(head) > BINARY_CONTROL_SHARE


# ---------------------------------------------------------------- reading one file


def read_file(path: Path, rel: str, options: FileOptions = FileOptions(), span: Span | None = None) -> Iterator[dict]:
    """The items of one file (see the module docstring), or of one span of it (from `plan_spans`); a
    damaged file ends in one rejection after the items read before the damage."""
    fmt, compression = format_of(path, options.format)
    origin = f"file:{rel}"
    try:
        if fmt == "parquet" and not compression:
            yield from _parquet_records(path, rel, origin, options, span)
            return
        if span is not None:  # planned: not binary, not compressed, a format that splits
            with _open_span(path, span) as stream:
                if fmt == "jsonl":
                    yield from _json_records(stream, rel, origin, options, whole_json=False, first=span.first)
                else:
                    yield from _text_records(stream, rel, origin, options.text_unit, options, PLAIN, first=span.first)
            return
        with _open(path, compression) as stream:
            if is_binary(stream.peek(BINARY_SNIFF_BYTES)[:BINARY_SNIFF_BYTES]):
                yield reject({"id": rel, "source": origin}, "binary_file",
                             f"over {BINARY_CONTROL_SHARE:.0%} control bytes in the first 8 KiB: not a text file")
                return
            if fmt in ("jsonl", "json"):
                yield from _json_records(stream, rel, origin, options, whole_json=fmt == "json",
                                         reopen=lambda: _open(path, compression))
            elif fmt in ("csv", "tsv"):
                yield from _csv_records(stream, rel, origin, options, fmt)
            elif fmt == "html":
                yield from _text_records(stream, rel, origin, "file", options, HTML)
            else:
                yield from _text_records(stream, rel, origin, options.text_unit, options, PLAIN)
    except READ_ERRORS as err:
        yield reject({"id": rel, "source": origin}, "unreadable_file", f"{type(err).__name__}: {err}")


def _open(path: Path, compression: str | None) -> io.BufferedIOBase:
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        import zstandard

        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)
    return open(path, "rb")


def _decode(raw: bytes, options: FileOptions) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError as err:
        if options.decode_errors == "reject":
            raise Rejection("invalid_utf8", str(err)) from None
        return raw.decode("utf-8", errors="replace"), True


def _bounded_lines(stream: io.BufferedIOBase, max_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """(line, too_long) pairs; a line longer than max_bytes is skipped to its end, never held whole."""
    for line, too_long, _ in _sized_lines(stream, max_bytes):
        yield line, too_long


def _sized_lines(stream: io.BufferedIOBase, max_bytes: int) -> Iterator[tuple[bytes, bool, int]]:
    """`_bounded_lines` with the number of bytes each line took in the file."""
    while True:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        if len(line) > max_bytes and not line.endswith(b"\n"):
            size = len(line)
            while True:  # drain the rest of the overlong line
                rest = stream.readline(1 << 20)
                size += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
            yield line[:1000], True, size
        else:
            yield line, False, len(line)


def _text_records(stream, rel: str, origin: str, unit: str, options: FileOptions, content_type: str,
                  first: int = 1) -> Iterator[dict]:
    max_bytes = options.max_chars * 4  # a UTF-8 character is at most 4 bytes
    if unit == "file":
        raw = stream.read(max_bytes + 1)
        if len(raw) > max_bytes:
            yield reject({"id": rel, "source": origin, "text": raw[:1000].decode("utf-8", "replace")}, "too_long",
                         f"more than {options.max_chars} characters")
            return
        yield from _decoded(raw.removeprefix(b"\xef\xbb\xbf"), rel, origin, content_type, options)
        return
    number = first - 1  # lines are numbered from 1 in the whole file
    paragraph: list[bytes] = []
    paragraph_bytes = start = 0
    dropping = False  # the paragraph in progress was rejected as too long: its remaining lines go with it
    for line, too_long in _bounded_lines(stream, max_bytes):
        number += 1
        if number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")
        if unit == "line":
            if too_long:
                yield reject({"id": f"{rel}#{number}", "source": origin, "text": line.decode("utf-8", "replace")},
                             "too_long", f"line longer than {options.max_chars} characters")
            elif line.strip():
                yield from _decoded(line.rstrip(b"\r\n"), f"{rel}#{number}", origin, content_type, options)
            continue
        if not too_long and not line.strip():  # a blank line ends the paragraph
            if paragraph:
                yield from _decoded(b"".join(paragraph).rstrip(b"\r\n"), f"{rel}#{start}", origin, content_type, options)
            paragraph, paragraph_bytes, dropping = [], 0, False
            continue
        if dropping:
            continue
        if not paragraph:
            start = number
        paragraph.append(line)
        paragraph_bytes += len(line)
        if too_long or paragraph_bytes > max_bytes:
            yield reject({"id": f"{rel}#{start}", "source": origin, "text": b"".join(paragraph)[:1000].decode("utf-8", "replace")},
                         "too_long", f"paragraph longer than {options.max_chars} characters")
            paragraph, paragraph_bytes, dropping = [], 0, True
    if paragraph:
        yield from _decoded(b"".join(paragraph).rstrip(b"\r\n"), f"{rel}#{start}", origin, content_type, options)


def _decoded(raw: bytes, doc_id: str, origin: str, content_type: str, options: FileOptions) -> Iterator[dict]:
    try:
        text, repaired = _decode(raw, options)
    except Rejection as bad:
        yield reject({"id": doc_id, "source": origin, "text": raw[:1000].decode("utf-8", "replace")}, bad.reason, bad.detail)
        return
    if len(text) > options.max_chars:
        yield reject({"id": doc_id, "source": origin, "text": text[:1000]}, "too_long", f"more than {options.max_chars} characters")
        return
    doc = {"id": doc_id, "text": text, "source": origin, "content_type": content_type}
    if repaired:
        doc["_repaired"] = True
    yield doc


def _json_records(stream, rel: str, origin: str, options: FileOptions, whole_json: bool, reopen=None,
                  first: int = 1) -> Iterator[dict]:
    """JSON lines; for a .json file, a whole array or object (bounded), or JSON lines when it holds those."""
    max_bytes = options.max_chars * 4 + 4096
    head = stream.peek(64)[:64].lstrip() if whole_json else b""
    if head.startswith((b"[", b"{")):
        raw = stream.read(MAX_JSON_ARRAY_BYTES + 1)  # a JSON document is parsed whole: bound what is read
        if len(raw) > MAX_JSON_ARRAY_BYTES:
            if head.startswith(b"{") and reopen is not None:  # too big for one object: JSON lines, streamed
                with reopen() as again:
                    yield from _json_records(again, rel, origin, options, whole_json=False)
                return
            yield reject({"id": rel, "source": origin, "text": raw[:1000].decode("utf-8", "replace")}, "too_long",
                         f"JSON array file larger than {MAX_JSON_ARRAY_BYTES >> 20} MB: write it as JSON lines "
                         "(.jsonl), which are streamed")
            return
        try:
            records = json.loads(raw)
        except ValueError as err:
            if head.startswith(b"{"):  # JSON lines in a .json file
                yield from _json_records(io.BufferedReader(io.BytesIO(raw)), rel, origin, options, whole_json=False)
                return
            yield reject({"id": rel, "source": origin, "text": raw[:1000].decode("utf-8", "replace")}, "malformed_json", str(err))
            return
        if isinstance(records, dict):  # {"data": [...]} or {"examples": [...]}, as many datasets ship
            records = next((records[k] for k in ("data", "examples", "records") if isinstance(records.get(k), list)), [records])
        for number, record in enumerate(records, 1):
            yield {"id": f"{rel}#{number}", "source": origin, "record": record}
        return
    for number, (line, too_long) in enumerate(_bounded_lines(stream, max_bytes), first):
        record_id = f"{rel}#{number}"
        if too_long:
            yield reject({"id": record_id, "source": origin, "text": line.decode("utf-8", "replace")}, "too_long",
                         f"JSON line longer than {options.max_chars} characters")
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            yield reject({"id": record_id, "source": origin, "text": line[:1000].decode("utf-8", "replace")}, "malformed_json", str(err))
            continue
        yield {"id": record_id, "source": origin, "record": record}


def _csv_records(stream, rel: str, origin: str, options: FileOptions, fmt: str) -> Iterator[dict]:
    limit = options.max_chars * 4
    if csv.field_size_limit() < limit:
        csv.field_size_limit(limit)
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="")
    # GLUE's TSVs are not quoted: a quote character is text
    reader = csv.reader(text, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(text)
    header = list(options.columns) if options.columns else next(reader, None)
    if header is None:
        return
    for number, row in enumerate(reader, 1):
        if not row:
            continue
        record_id = f"{rel}#{number}"
        if len(row) != len(header):
            yield reject({"id": record_id, "source": origin, "text": "\t".join(row)[:1000]}, "malformed_row",
                         f"{len(row)} fields, the header has {len(header)} ({', '.join(header)})")
            continue
        yield {"id": record_id, "source": origin, "record": dict(zip(header, row))}


def _parquet_records(path: Path, rel: str, origin: str, options: FileOptions, span: Span | None = None) -> Iterator[dict]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    columns = None
    if options.parquet_columns:  # the first is the text column
        # without it, every row is still read (one narrow column) so that each is counted as lacking its text
        columns = [c for c in options.parquet_columns if c in names] or names[:1]
    number = span.first - 1 if span else 0
    row_groups = range(span.start, span.end) if span else None
    for batch in parquet.iter_batches(batch_size=1000, columns=columns, row_groups=row_groups):
        for record in batch.to_pylist():
            number += 1
            yield {"id": f"{rel}#{number}", "source": origin, "record": record}


# ---------------------------------------------------------------- one file in spans


def plan_spans(path: Path, span_bytes: int, options: FileOptions = FileOptions()) -> list[Span] | None:
    """The spans of about `span_bytes` that `path` is read in, or None when it is read whole (it is
    small, or its format does not split: see the module docstring). A file that cannot be planned is
    read whole, so the reader reports it as it reports any damaged file."""
    fmt, compression = format_of(path, options.format)
    if compression:
        return None
    try:
        if fmt == "parquet":
            return _parquet_spans(path, span_bytes)
        if fmt == "jsonl" or (fmt == "text" and options.text_unit in ("line", "paragraph")):
            return _line_spans(path, span_bytes, options, paragraphs=fmt == "text" and options.text_unit == "paragraph")
    except READ_ERRORS:
        return None
    return None


def _line_spans(path: Path, span_bytes: int, options: FileOptions, paragraphs: bool) -> list[Span] | None:
    """Byte ranges that start at a line (after a blank line, for paragraphs), each about span_bytes
    past the previous start; every line (paragraph) belongs to the range it starts in."""
    size = path.stat().st_size
    if size <= span_bytes:
        return None
    starts = [0]
    with open(path, "rb") as handle:
        if is_binary(handle.read(BINARY_SNIFF_BYTES)):
            return None  # read whole: the reader rejects it as binary_file
        while starts[-1] + span_bytes < size:
            nominal = starts[-1] + span_bytes
            start = _paragraph_start(handle, nominal, options) if paragraphs else _line_start(handle, nominal)
            if start >= size:
                break
            starts.append(start)
    if len(starts) == 1:
        return None
    newlines = _newlines_before(path, starts)
    return [Span(start, end, lines + 1) for start, end, lines in zip(starts, [*starts[1:], size], newlines)]


def _line_start(handle, position: int) -> int:
    """The first line start at or after `position` (> 0): just past the newline ending the line that
    holds the byte before it (or the end of the file)."""
    handle.seek(position - 1)
    while True:
        chunk = handle.readline(1 << 20)  # in pieces: a line may be huge
        if not chunk or chunk.endswith(b"\n"):
            return handle.tell()


def _paragraph_start(handle, position: int, options: FileOptions) -> int:
    """Just past the first blank line that starts at or after `position`: there the paragraph reader
    holds nothing (a blank line ends any paragraph), so reading can begin there as in a whole-file
    read. Blank and too long are judged exactly as `_text_records` judges them."""
    offset = _line_start(handle, position)
    for line, too_long, size in _sized_lines(handle, options.max_chars * 4):
        offset += size
        if not too_long and not line.strip():
            return offset
    return offset


def _newlines_before(path: Path, offsets: list[int]) -> list[int]:
    """For ascending byte offsets, how many newlines precede each: one pass over the file."""
    counts, total, position = [], 0, 0
    with open(path, "rb") as handle:
        for offset in offsets:
            while position < offset:
                chunk = handle.read(min(16 << 20, offset - position))
                if not chunk:
                    break
                total += chunk.count(b"\n")
                position += len(chunk)
            counts.append(total)
    return counts


def _parquet_spans(path: Path, span_bytes: int) -> list[Span] | None:
    """Consecutive row groups of about span_bytes (compressed) each."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    if meta.num_row_groups < 2 or path.stat().st_size <= span_bytes:
        return None
    spans, start, first, size, rows = [], 0, 1, 0, 0
    for group in range(meta.num_row_groups):
        info = meta.row_group(group)
        size += sum(info.column(c).total_compressed_size for c in range(info.num_columns))
        rows += info.num_rows
        if size >= span_bytes or group == meta.num_row_groups - 1:
            spans.append(Span(start, group + 1, first))
            start, first, size, rows = group + 1, first + rows, 0, 0
    return spans if len(spans) > 1 else None


class _SpanReader(io.RawIOBase):
    """Bytes [start, end) of a file, as a stream of their own."""

    def __init__(self, path: Path, start: int, end: int):
        self._file = open(path, "rb", buffering=0)
        self._file.seek(start)
        self._left = end - start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._file.readinto(memoryview(buffer)[: min(len(buffer), self._left)]) or 0
        self._left -= count
        return count

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_span(path: Path, span: Span) -> io.BufferedReader:
    return io.BufferedReader(_SpanReader(path, span.start, span.end), buffer_size=1 << 20)


# ---------------------------------------------------------------- records as documents


def record_document(item: dict, text_field: str, id_field: str | None, max_chars: int) -> dict:
    """A structured record as a document (its text field), or a rejection saying why not."""
    record, doc_id, origin = item["record"], item["id"], item["source"]

    def raw() -> str:  # only for a rejection: a kept record is not serialised again
        return json.dumps(record, ensure_ascii=False, default=str)[:1000]

    if not isinstance(record, dict):
        return reject({"id": doc_id, "source": origin, "text": raw()}, "missing_text", "record is not a JSON object")
    text = record.get(text_field)
    if not isinstance(text, str):
        why = "no field" if text is None else f"field is {type(text).__name__}, not a string"
        return reject({"id": doc_id, "source": origin, "text": raw()}, "missing_text", f"{text_field!r}: {why}")
    if id_field and record.get(id_field) is not None:
        doc_id = str(record[id_field])
    if len(text) > max_chars:
        return reject({"id": doc_id, "source": origin, "text": text[:1000]}, "too_long", f"more than {max_chars} characters")
    return {"id": doc_id, "text": text, "source": origin, "content_type": PLAIN}


def read_documents(root: Path, options: FileOptions, text_field: str = "text", id_field: str | None = None,
                   glob: str = "**/*") -> Iterator[dict]:
    """Documents and rejections of a file or folder: text files as they split, records by `text_field`."""
    for path, rel in list_files(root, glob):
        for item in read_file(path, rel, options):
            yield record_document(item, text_field, id_field, options.max_chars) if "record" in item else item
