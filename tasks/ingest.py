"""ingest: read sources into Parquet shards of (id, text, source, content_type).

Sources (config `ingest.sources`): the built-in corpus, local files and folders, Hugging Face
datasets. Every input record is accounted for: it becomes a kept document or a rejected record with
a reason (malformed JSON, no text field, empty, too long, binary file, unreadable or truncated file,
...). A folder with some bad files ingests the rest; the stage fails only when nothing usable is left.

Reading is streamed (line by line, Parquet batch by batch, at most `max_document_chars` per
document), so a huge or hostile file cannot exhaust memory.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq

from tasks import builtin_corpus
from tasks.config import BuiltinSource, FilesSource, HFSource, PipelineConfig, UserError
from tasks.contract import Stage, StageContext, StageResult, file_fingerprint
from tasks.shards import DOC_SCHEMA, REJECT_SCHEMA, ShardSize, ShardWriter, read_rows, reject, shard_size_of, utf8_len

VERSION = "1"
PLAIN, HTML = "text/plain", "text/html"
MAX_JSON_ARRAY_BYTES = 256 << 20
TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".markdown"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
BUILTIN_FILES_PER_JOB = 180
MAX_FILES_PER_JOB = 500
# Errors that mean "this file is damaged", as opposed to a bug in jielong.
READ_ERRORS = (OSError, EOFError, zlib.error, UnicodeError, ValueError)


@dataclass
class IngestJob:
    index: int
    out_dir: str
    source_index: int
    source: dict
    files: list[tuple[str, str]] = field(default_factory=list)  # (absolute path, id prefix)
    shard_size: ShardSize = ShardSize()
    max_chars: int = 1_000_000
    decode_errors: str = "replace"


class Rejection(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------- plan


def plan(ctx: StageContext) -> list[IngestJob]:
    check_sources(ctx.config)
    cfg = ctx.section("ingest")
    jobs: list[IngestJob] = []

    def add(source_index: int, source: Any, files: list[tuple[str, str]] | None = None) -> None:
        jobs.append(
            IngestJob(
                index=len(jobs),
                out_dir=str(ctx.out_dir),
                source_index=source_index,
                source=source.model_dump(mode="json"),
                files=files or [],
                shard_size=shard_size_of(ctx.config),
                max_chars=cfg.max_document_chars,
                decode_errors=cfg.decode_errors,
            )
        )

    for i, source in enumerate(cfg.sources):
        if isinstance(source, BuiltinSource):
            names = builtin_corpus.stdlib_files() if source.docstrings else []
            if source.limit:
                names = names[: source.limit]
            chunks = [names[s : s + BUILTIN_FILES_PER_JOB] for s in range(0, len(names), BUILTIN_FILES_PER_JOB)]
            for n, chunk in enumerate(chunks or [[]]):
                # the first job also carries the pydoc topics
                add(i, source.model_copy(update={"topics": source.topics and n == 0}), [(name, "") for name in chunk])
        elif isinstance(source, FilesSource):
            for chunk in _file_jobs(i, source, cfg.job_bytes):
                add(i, source, chunk)
        else:
            add(i, source)
    return jobs


def check_sources(cfg: PipelineConfig) -> None:
    """Fail before anything starts when a files source's path does not exist."""
    for index, source in enumerate(cfg.section("ingest").sources):
        if isinstance(source, FilesSource) and not Path(source.path).expanduser().exists():
            raise UserError(f"ingest.sources[{index}].path: {Path(source.path).expanduser()} does not exist")


def source_files(source: FilesSource) -> list[tuple[Path, str]]:
    """(path, id prefix) of every file a files source reads: the glob's files, hidden ones skipped."""
    root = Path(source.path).expanduser()
    if root.is_file():
        return [(root, root.name)]
    return [
        (p, p.relative_to(root).as_posix())
        for p in sorted(root.glob(source.glob))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]


def _file_jobs(index: int, source: FilesSource, job_bytes: int) -> list[list[tuple[str, str]]]:
    files = source_files(source)  # the path exists: plan checked
    root = Path(source.path).expanduser()
    if not files:
        raise UserError(f"ingest.sources[{index}]: no files match {source.glob!r} under {root}")
    jobs: list[list[tuple[str, str]]] = [[]]
    size = 0
    for path, rel in files:
        nbytes = path.stat().st_size
        if jobs[-1] and (size + nbytes > job_bytes or len(jobs[-1]) >= MAX_FILES_PER_JOB):
            jobs.append([])
            size = 0
        jobs[-1].append((str(path), rel))
        size += nbytes
    return jobs


# ---------------------------------------------------------------- process one job


def process(job: IngestJob) -> dict:
    out = Path(job.out_dir)
    kept = ShardWriter(out, "kept", job.index, DOC_SCHEMA, job.shard_size)
    rejected = ShardWriter(out, "rejected", job.index, REJECT_SCHEMA, job.shard_size)
    reasons: Counter[str] = Counter()
    seen = 0
    repaired = 0
    bytes_in = 0
    for item in _records(job):
        seen += 1
        if "reason" not in item:  # a document (rejections are rows of REJECT_SCHEMA)
            repaired += item.pop("_repaired", False)
            bytes_in += utf8_len(item["text"])
            if not item["text"].strip():
                rejected.add(reject(item, "empty"))
                reasons["empty"] += 1
            else:
                kept.add(item)
        else:
            rejected.add(item)
            reasons[item["reason"]] += 1
            bytes_in += utf8_len(item["text"])
    kept.close()
    rejected.close()
    return {
        "job": job.index,
        "documents_in": seen,
        "documents_out": kept.count,
        "rejected": dict(reasons),
        "bytes_in": bytes_in,
        "bytes_out": kept.bytes,
        "repaired_utf8": repaired,
    }


def _records(job: IngestJob) -> Iterator[dict]:
    kind = job.source["kind"]
    if kind == "builtin":
        yield from _builtin_records(job)
    elif kind == "files":
        source = FilesSource.model_validate(job.source)
        for path, rel in job.files:
            yield from _file_records(Path(path), rel, source, job)
    else:
        yield from _hf_records(HFSource.model_validate(job.source), job)


def _doc(doc_id: str, text: str, source: str, content_type: str = PLAIN) -> dict:
    return {"id": doc_id, "text": text, "source": source, "content_type": content_type}


def _builtin_records(job: IngestJob) -> Iterator[dict]:
    source = BuiltinSource.model_validate(job.source)
    if source.topics:
        for doc_id, text, origin in builtin_corpus.topic_documents():
            yield _doc(doc_id, text, origin)
    for rel, _ in job.files:
        docs, error = builtin_corpus.docstring_documents(rel)
        if error:
            yield reject({"id": f"stdlib/{rel}", "source": f"stdlib/{rel}"}, "unreadable_file", error)
        for doc_id, text, origin in docs:
            yield _limit(_doc(doc_id, text, origin), job.max_chars)


def _limit(doc: dict, max_chars: int) -> dict:
    if len(doc["text"]) > max_chars:
        return reject({**doc, "text": doc["text"][:1000]}, "too_long", f"more than {max_chars} characters")
    return doc


# ---------------------------------------------------------------- local files


def _split_suffixes(path: Path) -> tuple[str, str | None]:
    """('.jsonl', 'gzip') for data.jsonl.gz; ('', None) for a file without a suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    return (suffixes[-1] if suffixes else ""), compression


def _open(path: Path, compression: str | None) -> io.BufferedIOBase:
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        import zstandard

        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)
    return open(path, "rb")


def _file_records(path: Path, rel: str, source: FilesSource, job: IngestJob) -> Iterator[dict]:
    suffix, compression = _split_suffixes(path)
    origin = f"file:{rel}"
    try:
        if suffix == ".parquet" and not compression:
            yield from _parquet_records(path, rel, origin, source, job)
            return
        with _open(path, compression) as stream:
            head = stream.peek(8192)[:8192]
            if b"\x00" in head:
                yield reject({"id": rel, "source": origin}, "binary_file", "NUL bytes: not a text file")
                return
            if suffix in JSONL_SUFFIXES or suffix == ".json":
                yield from _json_records(stream, rel, origin, source, job, whole_json=suffix == ".json")
            elif suffix in HTML_SUFFIXES:
                yield from _text_records(stream, rel, origin, "file", job, HTML)
            else:
                yield from _text_records(stream, rel, origin, source.text_unit, job, PLAIN)
    except READ_ERRORS as err:
        # records read before the damage are kept; the damaged file is one rejected record
        yield reject({"id": rel, "source": origin}, "unreadable_file", f"{type(err).__name__}: {err}")


def _decode(raw: bytes, job: IngestJob) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError as err:
        if job.decode_errors == "reject":
            raise Rejection("invalid_utf8", str(err)) from None
        return raw.decode("utf-8", errors="replace"), True


def _bounded_lines(stream: io.BufferedIOBase, max_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """(line, too_long) pairs; a line longer than max_bytes is skipped to its end, never held whole."""
    while True:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while True:  # drain the rest of the overlong line
                rest = stream.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield line[:1000], True
        else:
            yield line, False


def _text_records(stream, rel: str, origin: str, unit: str, job: IngestJob, content_type: str) -> Iterator[dict]:
    max_bytes = job.max_chars * 4  # a UTF-8 character is at most 4 bytes
    if unit == "file":
        raw = stream.read(max_bytes + 1)
        if len(raw) > max_bytes:
            yield reject({"id": rel, "source": origin, "text": raw[:1000].decode("utf-8", "replace")}, "too_long",
                         f"more than {job.max_chars} characters")
            return
        yield from _decoded(raw.removeprefix(b"\xef\xbb\xbf"), rel, origin, content_type, job)
        return
    number = 0
    paragraph: list[bytes] = []
    paragraph_bytes = 0
    for line, too_long in _bounded_lines(stream, max_bytes):
        number += 1
        if too_long:
            yield reject({"id": f"{rel}#{number}", "source": origin, "text": line.decode("utf-8", "replace")},
                         "too_long", f"line longer than {job.max_chars} characters")
            continue
        if unit == "line":
            if line.strip():
                yield from _decoded(line.rstrip(b"\r\n"), f"{rel}#{number}", origin, content_type, job)
        elif line.strip():
            paragraph.append(line)
            paragraph_bytes += len(line)
            if paragraph_bytes > max_bytes:
                yield reject({"id": f"{rel}#{number}", "source": origin, "text": b"".join(paragraph)[:1000].decode("utf-8", "replace")},
                             "too_long", f"paragraph longer than {job.max_chars} characters")
                paragraph, paragraph_bytes = [], 0
        elif paragraph:
            yield from _decoded(b"".join(paragraph).rstrip(b"\r\n"), f"{rel}#{number - len(paragraph)}", origin, content_type, job)
            paragraph, paragraph_bytes = [], 0
    if paragraph:
        yield from _decoded(b"".join(paragraph).rstrip(b"\r\n"), f"{rel}#{number - len(paragraph) + 1}", origin, content_type, job)


def _decoded(raw: bytes, doc_id: str, origin: str, content_type: str, job: IngestJob) -> Iterator[dict]:
    try:
        text, repaired = _decode(raw, job)
    except Rejection as bad:
        yield reject({"id": doc_id, "source": origin, "text": raw[:1000].decode("utf-8", "replace")}, bad.reason, bad.detail)
        return
    if len(text) > job.max_chars:
        yield reject({"id": doc_id, "source": origin, "text": text[:1000]}, "too_long", f"more than {job.max_chars} characters")
        return
    doc = _doc(doc_id, text, origin, content_type)
    if repaired:
        doc["_repaired"] = True
    yield doc


def _json_records(stream, rel: str, origin: str, source: FilesSource, job: IngestJob, whole_json: bool) -> Iterator[dict]:
    max_bytes = job.max_chars * 4 + 4096
    if whole_json:
        if stream.peek(64)[:64].lstrip().startswith(b"["):
            raw = stream.read(MAX_JSON_ARRAY_BYTES + 1)  # an array is parsed whole: bound what is read
            if len(raw) > MAX_JSON_ARRAY_BYTES:
                yield reject({"id": rel, "source": origin, "text": raw[:1000].decode("utf-8", "replace")}, "too_long",
                             f"JSON array file larger than {MAX_JSON_ARRAY_BYTES >> 20} MB: write it as JSON lines "
                             "(.jsonl), which are streamed")
                return
            try:
                records = json.loads(raw)
            except ValueError as err:
                yield reject({"id": rel, "source": origin, "text": raw[:1000].decode("utf-8", "replace")}, "malformed_json", str(err))
                return
            for number, record in enumerate(records, 1):
                yield _json_doc(record, f"{rel}#{number}", origin, source, job)
            return
    for number, (line, too_long) in enumerate(_bounded_lines(stream, max_bytes), 1):
        doc_id = f"{rel}#{number}"
        if too_long:
            yield reject({"id": doc_id, "source": origin, "text": line.decode("utf-8", "replace")}, "too_long",
                         f"JSON line longer than {job.max_chars} characters")
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            yield reject({"id": doc_id, "source": origin, "text": line[:1000].decode("utf-8", "replace")}, "malformed_json", str(err))
            continue
        yield _json_doc(record, doc_id, origin, source, job)


def _json_doc(record: Any, doc_id: str, origin: str, source: FilesSource, job: IngestJob) -> dict:
    def raw() -> str:  # only for a rejection: a kept record is not serialised again
        return json.dumps(record, ensure_ascii=False)[:1000]

    if not isinstance(record, dict):
        return reject({"id": doc_id, "source": origin, "text": raw()}, "missing_text", "record is not a JSON object")
    text = record.get(source.text_field)
    if not isinstance(text, str):
        why = "no field" if text is None else f"field is {type(text).__name__}, not a string"
        return reject({"id": doc_id, "source": origin, "text": raw()}, "missing_text", f"{source.text_field!r}: {why}")
    if source.id_field and record.get(source.id_field) is not None:
        doc_id = str(record[source.id_field])
    return _limit(_doc(doc_id, text, origin), job.max_chars)


def _parquet_records(path: Path, rel: str, origin: str, source: FilesSource, job: IngestJob) -> Iterator[dict]:
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if source.text_field not in names:
        raise ValueError(f"no column {source.text_field!r} (columns: {', '.join(names)})")
    columns = [source.text_field] + ([source.id_field] if source.id_field in names else [])
    number = 0
    for batch in parquet.iter_batches(batch_size=1000, columns=columns):
        for record in batch.to_pylist():
            number += 1
            yield _json_doc(record, f"{rel}#{number}", origin, source, job)


# ---------------------------------------------------------------- Hugging Face datasets


def _hf_records(source: HFSource, job: IngestJob) -> Iterator[dict]:
    origin = f"hf:{source.name}" + (f"/{source.subset}" if source.subset else "") + f":{source.split}"
    try:
        dataset = _load_hf(source)
        fields = FilesSource(path=".", text_field=source.text_column)  # how _json_doc finds the text
        for number, record in enumerate(dataset):
            if source.limit and number >= source.limit:
                break
            yield _json_doc(record, f"{origin}#{number}", origin, fields, job)
    except Exception as err:  # datasets raises many types: offline, not found, bad split, ...
        yield reject({"id": origin, "source": origin}, "unreadable_source", f"{type(err).__name__}: {err}"[:2000])


def _load_hf(source: HFSource):
    import datasets

    path = Path(source.name).expanduser()
    if path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json", "dataset_info.json")):
        loaded = datasets.load_from_disk(str(path))
        return loaded[source.split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(source.name, source.subset, split=source.split, streaming=True)


# ---------------------------------------------------------------- finalize


def finalize(ctx: StageContext, results: list[dict]) -> StageResult:
    result = StageResult()
    repaired = 0
    for r in results:
        result.documents_in += r["documents_in"]
        result.documents_out += r["documents_out"]
        result.bytes_in += r["bytes_in"]
        result.bytes_out += r["bytes_out"]
        repaired += r["repaired_utf8"]
        for reason, n in r["rejected"].items():
            result.rejected_by_reason[reason] = result.rejected_by_reason.get(reason, 0) + n
    if result.documents_out == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(result.rejected_by_reason.items())) or "no records at all"
        raise UserError(f"ingest found no usable documents ({reasons}){_first_rejections(ctx.out_dir)}")
    result.metrics["repaired_utf8_documents"] = repaired
    result.details["sources"] = [s.model_dump(mode="json") for s in ctx.section("ingest").sources]
    return result


def _first_rejections(out_dir: Path, n: int = 3) -> str:
    """The first rejected records, to say why in the error (the stage's output is discarded with it)."""
    lines = []
    for path in sorted((out_dir / "rejected").glob("*.parquet")):
        for row in read_rows(path, columns=["id", "reason", "detail"]):
            lines.append(f"\n  {row['id']}: {row['reason']}" + (f" ({row['detail'][:300]})" if row["detail"] else ""))
            if len(lines) == n:
                return "".join(lines)
    return "".join(lines)


def input_fingerprint(cfg: PipelineConfig) -> list:
    """What the sources' contents depend on, part of the ingest key: the Python version for the
    built-in corpus, (path, size, mtime) of every local input file, so editing a file re-ingests."""
    prints: list = []
    for source in cfg.ingest.sources:
        if isinstance(source, BuiltinSource):
            prints.append(builtin_corpus.corpus_identity())
        elif isinstance(source, FilesSource):
            prints.append(file_fingerprint([path for path, _ in source_files(source)]))  # exactly what is read
        else:
            local = Path(source.name).expanduser()
            prints.append(file_fingerprint([local]) if local.exists() else source.name)
    return prints


def run(ctx: StageContext) -> StageResult:
    return finalize(ctx, ctx.map(process, plan(ctx)))


STAGE = Stage(
    name="ingest",
    version=VERSION,
    sections=("ingest",),
    inputs=(),
    run=run,
    extra_key=input_fingerprint,
)
