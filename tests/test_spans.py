"""One large file read in spans (tasks/lib/sources/reader.py `plan_spans`) gives exactly what one whole-file
read gives: the same items, ids included, in the same order, whatever the span size."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import read_group, run_direct
from jielong.tasks import ingest
from jielong.tasks.config import load_config
from jielong.tasks.lib.sources.reader import FileOptions, plan_spans, read_file

SPAN_SIZES = [1, 2, 3, 5, 8, 13, 21, 64, 100, 333, 1000, 4096, 10**6]
MAX_CHARS = 100  # text lines and paragraphs over 400 bytes, and documents over 100 characters, are too_long


def jsonl_bytes(newline: bytes = b"\n", final_newline: bool = True) -> bytes:
    lines = [json.dumps({"text": f"record {i} " + "word " * (i % 7)}).encode() for i in range(30)]
    lines[4] = b'{"text": "broken'  # malformed_json
    lines[9] = b""  # blank lines are skipped but numbered
    lines[12] = json.dumps({"text": "x" * 5000}).encode()  # longer than any span and than a JSON line may be: too_long
    lines[17] = json.dumps({"title": "no text"}).encode()
    lines[18] = json.dumps({"text": "w" * 150}).encode()  # a record over max_chars
    lines[20] = "  ".encode() + json.dumps({"text": "caf\u00e9 cr\u00e8me \u6587\u5b57"}).encode()  # multi-byte UTF-8
    body = newline.join(lines)
    return body + newline if final_newline else body


def text_bytes(newline: bytes = b"\n", final_newline: bool = True, bom: bool = True) -> bytes:
    lines = [b"First paragraph, first line.", b"first paragraph, second line.", b"", b"   ", b"\t",
             b"Second paragraph.", b"y" * 600, b" " * 600, b"still the second paragraph after a too-long line.", b"",
             b"A third one, " + "\u00fcber caf\u00e9".encode() + b" and more", b"z" * 200, b"z" * 200, b"",
             b"", b"last paragraph"]
    lines += [f"tail {i}".encode() + (b"" if i % 3 else newline) for i in range(25)]
    body = newline.join(lines)
    body = (b"\xef\xbb\xbf" if bom else b"") + body
    return body + newline if final_newline else body


def items_in_spans(path: Path, options: FileOptions, span_bytes: int) -> list[dict]:
    spans = plan_spans(path, span_bytes, options)
    if spans is None:
        return list(read_file(path, path.name, options))
    units = pq.ParquetFile(path).metadata.num_row_groups if path.suffix == ".parquet" else path.stat().st_size
    assert spans[0].start == 0 and spans[-1].end == units
    assert all(a.end == b.start and a.start < a.end for a, b in zip(spans, spans[1:]))
    return [item for span in spans for item in read_file(path, path.name, options, span)]


VARIANTS = {
    "lf": {}, "crlf": {"newline": b"\r\n"}, "no final newline": {"final_newline": False},
    "crlf, no final newline": {"newline": b"\r\n", "final_newline": False},
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["jsonl", "line", "paragraph"])
def test_every_span_size_reads_what_a_whole_file_read_gives(tmp_path: Path, kind: str, variant: str):
    if kind == "jsonl":
        path, options = tmp_path / "data.jsonl", FileOptions(max_chars=MAX_CHARS)
        path.write_bytes(jsonl_bytes(**VARIANTS[variant]))
    else:
        path, options = tmp_path / "notes.txt", FileOptions(max_chars=MAX_CHARS, text_unit=kind)
        path.write_bytes(text_bytes(**VARIANTS[variant]))
    whole = list(read_file(path, path.name, options))
    assert {i.get("reason") for i in whole} >= {None, "too_long"}  # the fixture exercises rejections
    split_somewhere = False
    for size in SPAN_SIZES:
        assert items_in_spans(path, options, size) == whole, f"span size {size}"
        split_somewhere |= plan_spans(path, size, options) is not None
    assert split_somewhere


def test_a_too_long_paragraph_is_one_rejection_under_its_first_line(tmp_path: Path):
    """A too-long line inside a paragraph, or a paragraph that grows too long, rejects the whole paragraph
    under its own id; none of its lines resurface as, or inside, another document."""
    path = tmp_path / "notes.txt"
    path.write_bytes(text_bytes())
    items = list(read_file(path, path.name, FileOptions(max_chars=MAX_CHARS, text_unit="paragraph")))
    assert [(i["id"], i.get("reason")) for i in items[:4]] == [
        ("notes.txt#1", None), ("notes.txt#6", "too_long"), ("notes.txt#11", "too_long"), ("notes.txt#16", None)]
    assert items[1]["text"].startswith("Second paragraph.\ny") and items[2]["text"].startswith("A third one")
    assert not any("still the second paragraph" in i["text"] or "zzz" in i["text"] for i in items if not i.get("reason"))


def test_a_line_longer_than_the_span_is_read_once(tmp_path: Path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b" * 5000}) + "\n" + json.dumps({"text": "c"}) + "\n")
    options = FileOptions()
    spans = plan_spans(path, 100, options)
    assert len(spans) == 2 and spans[1].first == 3  # the long line belongs to the span it starts in
    assert [i["id"] for i in items_in_spans(path, options, 100)] == ["long.jsonl#1", "long.jsonl#2", "long.jsonl#3"]


def test_files_that_do_not_split_are_read_whole(tmp_path: Path):
    import gzip

    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    packed = tmp_path / "packed.jsonl.gz"
    packed.write_bytes(gzip.compress(jsonl_bytes()))
    whole_text = tmp_path / "doc.txt"
    whole_text.write_bytes(text_bytes())
    binary = tmp_path / "image.jsonl"
    binary.write_bytes(bytes(range(256)) * 40)
    for path in (empty, packed, whole_text, binary):
        assert plan_spans(path, 1, FileOptions()) is None, path.name
    assert list(read_file(empty, "empty.jsonl")) == []
    assert [i["reason"] for i in read_file(binary, "image.jsonl")] == ["binary_file"]


def test_parquet_splits_by_row_group(tmp_path: Path):
    path = tmp_path / "rows.parquet"
    table = pa.table({"text": [f"row {i} " + "w " * (i % 5) for i in range(95)], "other": list(range(95))})
    pq.write_table(table, path, row_group_size=10)
    options = FileOptions(parquet_columns=("text",))
    whole = list(read_file(path, path.name, options))
    assert len(whole) == 95 and whole[-1]["id"] == "rows.parquet#95"
    for size in (1, 200, 600, 2000, 10**6):
        assert items_in_spans(path, options, size) == whole, size
    assert len(plan_spans(path, 1, options)) == 10


def test_ingest_writes_the_same_documents_whatever_the_job_size(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_bytes(jsonl_bytes(newline=b"\r\n") * 3)
    (corpus / "b.jsonl").write_bytes(jsonl_bytes(final_newline=False))
    (corpus / "small.txt").write_text("a small file, read whole\n")
    source = f"ingest.sources=[{{kind: files, path: '{corpus}'}}]"
    outputs = {}
    for job_bytes in (10**9, 700, 64):
        cfg = load_config("tiny", [f"workspace={tmp_path / f'ws-{job_bytes}'}", source, f"ingest.job_bytes={job_bytes}",
                                   "ingest.max_document_chars=100"])
        artifact, result = run_direct(ingest.STAGE, cfg)
        outputs[job_bytes] = (read_group(artifact, "kept").to_dict("records"),
                              read_group(artifact, "rejected").to_dict("records"), artifact.manifest["counts"],
                              len(artifact.files("kept")))
    (kept, rejected, counts, files), *others = outputs.values()
    assert files == 1 and counts["documents_in"] == counts["documents_out"] + counts["documents_rejected"]
    for other_kept, other_rejected, other_counts, other_files in others:
        assert (other_kept, other_rejected, other_counts) == (kept, rejected, counts)
    assert outputs[64][3] > outputs[700][3] > 1  # smaller jobs, more shards
