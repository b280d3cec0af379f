"""Parquet shards of documents, kept and rejected, shared by the data stages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

DOC_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("content_type", pa.string()),  # text/plain or text/html
    ]
)

# A rejected record keeps its text (or the raw input that could not be parsed) and says why.
REJECT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("related_id", pa.string()),  # the document it duplicates / the eval document it overlaps
    ]
)


@dataclass(frozen=True)
class ShardSize:
    """A shard file is written once it holds this many documents or this many bytes of text."""

    rows: int = 2000
    bytes: int = 32_000_000


def shard_size_of(config) -> ShardSize:
    """The shard limits of a PipelineConfig (set in its ingest section, followed by every data stage)."""
    ingest = config.section("ingest")
    return ShardSize(ingest.shard_size, ingest.shard_bytes)


class ShardWriter:
    """Buffers rows and writes `<dir>/<group>/part-<job>-<n>.parquet` files no larger than `size`
    (so memory stays bounded however large the documents)."""

    def __init__(self, out_dir: Path, group: str, job: int, schema: pa.Schema, size: ShardSize = ShardSize()):
        self.dir = out_dir / group
        self.job = job
        self.schema = schema
        self.size = size
        self.rows: list[dict] = []
        self.buffered_bytes = 0
        self.files: list[Path] = []
        self.count = 0
        self.bytes = 0  # UTF-8 bytes of the text column written

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.count += 1
        size = len(row["text"].encode("utf-8", "surrogatepass"))
        self.bytes += size
        self.buffered_bytes += size
        if len(self.rows) >= self.size.rows or self.buffered_bytes >= self.size.bytes:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"part-{self.job:05d}-{len(self.files):03d}.parquet"
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        pq.write_table(table, path, compression="zstd")
        self.files.append(path)
        self.rows = []
        self.buffered_bytes = 0

    def close(self) -> list[Path]:
        self.flush()
        return self.files


def read_rows(path: Path, columns: list[str] | None = None, batch_size: int = 1000) -> Iterator[dict]:
    """Rows of one Parquet shard, streamed in batches (bounded memory)."""
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
        yield from batch.to_pylist()


def reject(doc: dict, reason: str, detail: str = "", related_id: str | None = None) -> dict:
    return {
        "id": doc.get("id", ""),
        "text": doc.get("text", ""),
        "source": doc.get("source", ""),
        "reason": reason,
        "detail": detail,
        "related_id": related_id,
    }


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def write_samples(out_dir: Path, kept_files: list[Path], rejected_files: list[Path],
                  rejected_by_reason: dict[str, int], n: int) -> list[Path]:
    """samples/kept.jsonl (the first n documents) and samples/rejected.jsonl (up to n per reason)."""
    import json

    folder = out_dir / "samples"
    folder.mkdir(exist_ok=True)
    kept = []
    for path in kept_files:
        for row in read_rows(path, columns=["id", "source", "text"]):
            kept.append({**row, "text": row["text"][:2000]})
            if len(kept) >= n:
                break
        if len(kept) >= n:
            break
    wanted = {reason: min(n, count) for reason, count in rejected_by_reason.items()}
    rejected: list[dict] = []
    taken: dict[str, int] = {}
    for path in rejected_files:
        if sum(taken.values()) >= sum(wanted.values()):
            break
        for row in read_rows(path, columns=["id", "source", "reason", "detail", "related_id", "text"]):
            if taken.get(row["reason"], 0) < wanted.get(row["reason"], 0):
                taken[row["reason"]] = taken.get(row["reason"], 0) + 1
                rejected.append({**row, "text": row["text"][:2000]})
    paths = []
    for name, rows in (("kept.jsonl", kept), ("rejected.jsonl", rejected)):
        path = folder / name
        with open(path, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths
