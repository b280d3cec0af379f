"""ingest: read sources into Parquet shards of (id, text, source, content_type).

Sources (config `ingest.sources`): the built-in corpus, local files and folders, Hugging Face
datasets. Every input record is accounted for: it becomes a kept document or a rejected record with
a reason (malformed JSON, no text field, empty, too long, binary file, unreadable or truncated file,
...). A folder with some bad files ingests the rest; the stage fails only when nothing usable is left.

With `ingest.canaries` set, some documents are held out and written back several times (tasks/lib/canaries.py);
their extra copies count as documents in (`canary_extra_copies`), so the documents still reconcile.

Reading is streamed (line by line, Parquet batch by batch, at most `max_document_chars` per
document), so a huge or hostile file cannot exhaust memory.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import Field, model_validator

from jielong.tasks.lib import canaries
from jielong.tasks.core.config import RunConfig
from jielong.tasks.core.schema import KEYED_WHEN_SET, Strict, UserError
from jielong.tasks.core.contract import ConfigView, Stage, StageContext, StageResult, Timer
from jielong.tasks.core.shards import DOC_SCHEMA, REJECT_SCHEMA, ShardSize, ShardWriter, read_rows, reject, shard_size_of, utf8_len
from jielong.tasks.lib.sources import BuiltinSource, Source, kind_of
from jielong.tasks.lib.sources.reader import FileOptions



# ---------------------------------------------------------------- config section


class CanaryConfig(Strict):
    """Documents of the sources held out and put back `repeats` times (tasks/lib/canaries.py): what
    evaluate.memorization measures. Each repeat count gets about the same number of canaries."""

    repeats: list[int] = Field(default_factory=lambda: [0, 1, 2, 4, 8, 16, 32],
                               description="repeat counts drawn from; 0 is a never-seen control (test split)")
    fraction: float = Field(0.01, gt=0, le=0.5, description="of the documents of min_chars to max_chars chosen")
    min_chars: int = Field(1000, ge=1, description="shorter documents are never canaries (too few tokens to "
                           "measure a prefix and its continuation)")
    max_chars: int = Field(5000, ge=1)
    salt: str = "jielong-canaries-v1"
    rotation: int = Field(0, ge=0, description="shifts every canary's repeat count this many places along `repeats` "
                          "(the same canaries): rotated across a study's seeds, each canary is seen at each count, so "
                          "count and document difficulty are not confounded", json_schema_extra=KEYED_WHEN_SET)

    @model_validator(mode="after")
    def _sensible(self) -> "CanaryConfig":
        if not self.repeats or any(r < 0 or r > 1000 for r in self.repeats) or len(set(self.repeats)) != len(self.repeats):
            raise ValueError("ingest.canaries.repeats: distinct counts from 0 to 1000")
        if self.min_chars > self.max_chars:
            raise ValueError("ingest.canaries: min_chars is above max_chars")
        return self


class IngestConfig(Strict):
    sources: list[Source] = Field(default_factory=lambda: [BuiltinSource()], min_length=1)
    canaries: CanaryConfig | None = Field(None, description="inject canaries (the dedup-memorization study)",
                                          json_schema_extra=KEYED_WHEN_SET)
    # the Parquet shards of every data stage (ingest, clean, dedup) close at whichever limit comes first
    shard_size: int = Field(2000, ge=1, description="documents per output Parquet shard")
    shard_bytes: int = Field(32_000_000, ge=1_000, description="bytes of text per output Parquet shard")
    # also the size of the byte ranges (row groups for Parquet) a larger file is split into, so one big
    # file spreads over workers; documents and ids do not depend on it, the shard layout of the output does
    job_bytes: int = Field(64 * 2**20, ge=1, description="input bytes per ingest task: small files grouped, "
                           "a large JSON-lines, line/paragraph text or Parquet file split into ranges of about this size")
    max_document_chars: int = Field(1_000_000, ge=1, description="longer documents are rejected")
    decode_errors: Literal["replace", "reject"] = "replace"  # invalid UTF-8 in a document


# 2: a text file is binary by its share of control bytes (a few NUL bytes no longer reject it),
#    a UTF-8 byte-order mark is dropped in paragraph/line mode too, csv/tsv files are read
# 3: in paragraph mode, a paragraph holding a too-long line, or growing too long, is one rejection under
#    its first line's id, with all its lines (its other lines were read as a paragraph of their own)
VERSION = "3"


@dataclass
class IngestJob:
    index: int
    out_dir: str
    source_index: int
    source: dict
    work: Any = None  # the kind's job: file list, stdlib files, ...
    shard_size: ShardSize = ShardSize()
    options: FileOptions = field(default_factory=FileOptions)
    canaries: CanaryConfig | None = None


# ---------------------------------------------------------------- plan


def plan(ctx: StageContext) -> list[IngestJob]:
    check_sources(ctx.config)
    cfg = ctx.section("ingest")
    options = FileOptions(max_chars=cfg.max_document_chars, decode_errors=cfg.decode_errors)
    jobs: list[IngestJob] = []
    for i, source in enumerate(cfg.sources):
        for work in kind_of(source).plan(source, cfg.job_bytes, options):
            jobs.append(IngestJob(index=len(jobs), out_dir=str(ctx.out_dir), source_index=i,
                                  source=source.model_dump(mode="json"), work=work,
                                  shard_size=shard_size_of(ctx.config), options=options, canaries=cfg.canaries))
    return jobs


def check_sources(cfg: RunConfig | ConfigView) -> None:
    """Fail before anything starts on a source that cannot be read (a missing path, no matching files)."""
    for index, source in enumerate(cfg.ingest.sources):
        kind_of(source).check(source, f"ingest.sources[{index}]")


# ---------------------------------------------------------------- process one job


def process(job: IngestJob) -> dict:
    out = Path(job.out_dir)
    kept = ShardWriter(out, "kept", job.index, DOC_SCHEMA, job.shard_size)
    rejected = ShardWriter(out, "rejected", job.index, REJECT_SCHEMA, job.shard_size)
    reasons: Counter[str] = Counter()
    seen = 0
    repaired = 0
    bytes_in = 0
    injected: Counter[int] = Counter()  # canaries by repeat count
    for item in _records(job):
        seen += 1
        if "reason" not in item:  # a document (rejections are rows of REJECT_SCHEMA)
            repaired += item.pop("_repaired", False)
            bytes_in += utf8_len(item["text"])
            repeats = canaries.repeats_of(item["id"], item["text"], job.canaries) if job.canaries else None
            if not item["text"].strip():
                rejected.add(reject(item, "empty"))
                reasons["empty"] += 1
            elif repeats is not None:
                injected[repeats] += 1
                for copy in canaries.copies(item, repeats):
                    kept.add(copy)
            else:
                kept.add(item)
        else:
            rejected.add(item)
            reasons[item["reason"]] += 1
            bytes_in += utf8_len(item["text"])
    kept.close()
    rejected.close()
    copies = sum(max(r, 1) * n for r, n in injected.items()) - sum(injected.values())
    return {
        "job": job.index,
        "documents_in": seen + copies,  # the canaries' extra copies enter as documents of their own
        "canaries": {str(r): n for r, n in injected.items()},
        "canary_copies": copies,
        "documents_out": kept.count,
        "rejected": dict(reasons),
        "bytes_in": bytes_in,
        "bytes_out": kept.bytes,
        "repaired_utf8": repaired,
    }


def _records(job: IngestJob) -> Iterator[dict]:
    kind = kind_of(job.source)
    yield from kind.records(kind.Config.model_validate(job.source), job.work, job.options)


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
    if ctx.section("ingest").canaries:
        injected: Counter[str] = Counter()
        for r in results:
            injected.update(r["canaries"])
        copies = sum(r["canary_copies"] for r in results)
        result.details["canaries"] = {"by_repeats": dict(sorted(injected.items(), key=lambda kv: int(kv[0]))),
                                      "extra_copies": copies}
        result.metrics.update(canaries=sum(injected.values()), canary_extra_copies=copies)
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


def input_fingerprint(view: ConfigView) -> list:
    """What the sources' contents depend on, part of the ingest key: the Python version for the
    built-in corpus, the content of exactly the local files read, so editing a file re-ingests."""
    return [kind_of(source).fingerprint(source) for source in view.ingest.sources]


def run(ctx: StageContext) -> StageResult:
    with Timer() as planning:  # in the flow process: finding the spans of large files reads them once
        jobs = plan(ctx)
    with Timer() as reading:
        results = ctx.map(process, jobs)
    result = finalize(ctx, results)
    result.phases.update(plan=planning.seconds, read=reading.seconds)
    return result


STAGE = Stage(
    name="ingest",
    version=VERSION,
    reads=("ingest",),
    inputs=(),
    run=run,
    external=input_fingerprint,
)
