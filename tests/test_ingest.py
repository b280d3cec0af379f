"""ingest: every source kind, and hostile inputs that must be counted, never crash or vanish."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import assert_written_rows_match, make_hostile_folder, read_group, run_direct
from jielong.tasks import ingest
from jielong.tasks.lib.sources import reader
from jielong.tasks.config import UserError, load_config

ROOT = Path(__file__).resolve().parent.parent


def files_config(workspace: Path, path: Path, *extra: str):
    return load_config("tiny", [f"workspace={workspace}", f"ingest.sources=[{{kind: files, path: '{path}'}}]", *extra])


def counts(artifact):
    return artifact.manifest["counts"]


def assert_reconciles(artifact):
    c = counts(artifact)
    assert c["documents_in"] == c["documents_out"] + sum(c["rejected_by_reason"].values())
    assert_written_rows_match(artifact.path)


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    return make_hostile_folder(tmp_path / "hostile")


def test_hostile_folder_keeps_good_records_and_counts_bad_ones(workspace: Path, hostile: Path):
    cfg = files_config(workspace, hostile, "ingest.max_document_chars=100000")
    artifact, _ = run_direct(ingest.STAGE, cfg)
    assert_reconciles(artifact)
    kept = read_group(artifact, "kept")
    rejected = read_group(artifact, "rejected")
    texts = set(kept.text)
    assert "first good record" in texts and "second good record" in texts
    assert any("perfectly good" in t for t in texts)
    assert any(t.startswith("gz record") for t in texts), "records before the truncation are kept"
    reasons = counts(artifact)["rejected_by_reason"]
    assert reasons["malformed_json"] == 1
    assert reasons["missing_text"] == 3
    assert reasons["binary_file"] == 1
    assert reasons["unreadable_file"] == 1  # the truncated gzip
    assert reasons["empty"] == 1
    assert reasons["too_long"] == 1
    assert set(rejected.reason) == set(reasons)
    assert "truncated.jsonl.gz" in set(rejected.id)
    html = kept[kept.id == "page.html"].iloc[0]
    assert html.content_type == "text/html"  # extraction happens in clean
    latin = kept[kept.id == "latin1.txt"].iloc[0]
    assert "\ufffd" in latin.text and artifact.manifest["metrics"]["repaired_utf8_documents"] == 1


def test_invalid_utf8_can_be_rejected(workspace: Path, hostile: Path):
    cfg = files_config(workspace, hostile / "latin1.txt", "ingest.decode_errors=reject")
    with pytest.raises(UserError, match="invalid_utf8"):
        run_direct(ingest.STAGE, cfg)  # nothing usable left: a clear error naming the reason


def test_nothing_usable_is_a_clear_error(workspace: Path, tmp_path: Path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jsonl").write_text("{oops\n")
    with pytest.raises(UserError, match="no usable documents.*malformed_json: 1") as raised:
        run_direct(ingest.STAGE, files_config(workspace, folder))
    assert "a.jsonl" in str(raised.value) and "malformed_json (" in str(raised.value), "says which record and why"
    assert not list((workspace / "ingest").glob("*/manifest.json")), "no complete-looking output"


def test_an_unusable_hf_source_alone_says_why(workspace: Path, tmp_path: Path):
    cfg = load_config("tiny", [f"workspace={workspace}", f"ingest.sources=[{{kind: hf, name: '{tmp_path / 'missing'}'}}]"])
    with pytest.raises(UserError, match="(?s)unreadable_source: 1.*unreadable_source \\(.+\\)") as raised:
        run_direct(ingest.STAGE, cfg)
    assert ".tmp-" not in str(raised.value)


def test_missing_path_is_a_clear_error(workspace: Path, tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        run_direct(ingest.STAGE, files_config(workspace, tmp_path / "nope"))


def test_formats_parquet_json_array_zstd_and_units(workspace: Path, tmp_path: Path):
    import zstandard

    folder = tmp_path / "formats"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["pq one", "pq two"], "doc": ["a", "b"]}), folder / "t.parquet")
    (folder / "arr.json").write_text(json.dumps([{"text": "json one"}, {"text": "json two"}]))
    (folder / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"para one line\nstill one\n\npara two\n"))
    cfg = load_config(
        "tiny", [f"workspace={workspace}", f"ingest.sources=[{{kind: files, path: '{folder}', text_unit: paragraph, id_field: doc}}]"]
    )
    artifact, _ = run_direct(ingest.STAGE, cfg)
    kept = read_group(artifact, "kept")
    assert set(kept.text) == {"pq one", "pq two", "json one", "json two", "para one line\nstill one", "para two"}
    assert {"a", "b"} <= set(kept.id)  # id_field used for parquet
    assert kept.id.is_unique


def test_line_unit(workspace: Path, tmp_path: Path):
    path = tmp_path / "lines.txt"
    path.write_text("one\n\ntwo\nthree\n")
    cfg = load_config("tiny", [f"workspace={workspace}", f"ingest.sources=[{{kind: files, path: '{path}', text_unit: line}}]"])
    artifact, _ = run_direct(ingest.STAGE, cfg)
    assert list(read_group(artifact, "kept").text) == ["one", "two", "three"]


def test_builtin_corpus_ids_and_provenance(workspace: Path):
    cfg = load_config("tiny", [f"workspace={workspace}", "ingest.sources=[{kind: builtin, limit: 10}]"])
    artifact, _ = run_direct(ingest.STAGE, cfg)
    kept = read_group(artifact, "kept")
    assert kept.id.is_unique
    assert kept.id.str.startswith("pydoc:").sum() > 50  # the reference topics
    assert kept[kept.id.str.startswith("stdlib:")].source.str.startswith("stdlib/").all()
    again, _ = run_direct(ingest.STAGE, load_config("tiny", [f"workspace={workspace}x", "ingest.sources=[{kind: builtin, limit: 10}]"]))
    assert list(read_group(again, "kept").id) == list(kept.id), "deterministic"


def test_hf_dataset_from_local_disk(workspace: Path, tmp_path: Path):
    import datasets

    path = tmp_path / "hfds"
    datasets.Dataset.from_dict({"content": ["hf one", "hf two", "hf three"]}).save_to_disk(str(path))
    cfg = load_config("tiny", [f"workspace={workspace}", f"ingest.sources=[{{kind: hf, name: '{path}', text_column: content, limit: 2}}]"])
    artifact, _ = run_direct(ingest.STAGE, cfg)
    assert list(read_group(artifact, "kept").text) == ["hf one", "hf two"]


def test_hf_hub_name_offline_is_recorded_not_crashing(workspace: Path, tmp_path: Path):
    (tmp_path / "ok.txt").write_text("some usable text")
    cfg = load_config("tiny", [
        f"workspace={workspace}",
        f"ingest.sources=[{{kind: hf, name: no-such-org/no-such-dataset}}, {{kind: files, path: '{tmp_path / 'ok.txt'}'}}]",
    ])
    artifact, _ = run_direct(ingest.STAGE, cfg)
    assert counts(artifact)["rejected_by_reason"] == {"unreadable_source": 1}
    assert counts(artifact)["documents_out"] == 1


def write_gzip_lines(path: Path, lines: int) -> int:
    """One short usable line, then `lines` lines of 1,000 bytes; returns the uncompressed size."""
    with gzip.open(path, "wb", compresslevel=9) as handle:
        size = handle.write(b"one short usable line\n")
        line = b"x" * 999 + b"\n"
        for _ in range(lines):
            size += handle.write(line)
    return size


def test_gzip_bomb_is_streamed(tmp_path: Path):
    """A gzip that expands ~1000x (100 MB from ~0.1 MB) is read line by line with bounded documents, not
    into memory at once.

    Measured in a fresh process (tests/ingest_memory_worker.py): this process's lifetime peak RSS is far
    above any bound once torch is loaded, and would hide a regression. There, the peak after a warm-up run
    of the same settings on a small file is the baseline; the bomb may grow it by half its uncompressed
    size at most. Measured here: 16-18 MB when streamed; 194 MB when the reader reads the decompressed
    file whole (bytes, then a buffer over them), which fails."""
    warm, bomb = tmp_path / "warm.txt.gz", tmp_path / "bomb.txt.gz"
    write_gzip_lines(warm, 1_000)
    expanded = write_gzip_lines(bomb, 100_000)
    assert expanded / bomb.stat().st_size > 500
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ingest_memory_worker.py"), str(warm), str(bomb), str(tmp_path / "ws"),
         "ingest.max_document_chars=500"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["counts"]["rejected_by_reason"] == {"too_long": 100_000} and report["counts"]["documents_out"] == 1
    grown_mb = report["peak_mb"] - report["baseline_mb"]
    assert grown_mb < expanded / 2 / 2**20, f"peak RSS grew by {grown_mb:.0f} MB reading {expanded / 2**20:.0f} MB"


def test_shards_close_at_the_byte_limit_as_well_as_the_document_limit(workspace: Path, tmp_path: Path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(10):
        (folder / f"{i}.txt").write_text(f"document {i} " + "word " * 2000)  # about 10 kB each
    cfg = files_config(workspace, folder, "ingest.shard_bytes=25000", "ingest.shard_size=4")
    artifact, _ = run_direct(ingest.STAGE, cfg)
    sizes = [pq.ParquetFile(f).metadata.num_rows for f in artifact.files("kept")]
    assert sum(sizes) == 10 and max(sizes) == 3, sizes  # 3 documents reach 25 kB before 4 documents


def test_a_json_array_larger_than_the_bound_is_counted_not_read_whole(workspace: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(reader, "MAX_JSON_ARRAY_BYTES", 1000)
    folder = tmp_path / "arrays"
    folder.mkdir()
    (folder / "small.json").write_text(json.dumps([{"text": "fits"}]))
    (folder / "big.json").write_text(json.dumps([{"text": f"record {i}"} for i in range(200)]))
    artifact, _ = run_direct(ingest.STAGE, files_config(workspace, folder))
    assert list(read_group(artifact, "kept").text) == ["fits"]
    rejected = read_group(artifact, "rejected")
    assert list(rejected.reason) == ["too_long"] and "JSON lines" in rejected.detail[0]


def test_a_few_nul_bytes_in_prose_keep_the_document_a_binary_file_is_rejected(workspace: Path, tmp_path: Path):
    folder = tmp_path / "nul"
    folder.mkdir()
    prose = "A plain English paragraph about reading files carefully. " * 20
    (folder / "prose.txt").write_bytes(prose[:300].encode() + b"\x00\x00" + prose[300:].encode() + b"\x00")
    (folder / "program.bin.txt").write_bytes(bytes(range(256)) * 8)
    (folder / "utf16.txt").write_bytes(prose.encode("utf-16-le"))  # half NUL bytes: not UTF-8 text
    artifact, _ = run_direct(ingest.STAGE, files_config(workspace, folder))
    kept = read_group(artifact, "kept")
    assert list(kept.id) == ["prose.txt"] and kept.text[0].count("\x00") == 3
    rejected = read_group(artifact, "rejected")
    assert sorted(rejected.id) == ["program.bin.txt", "utf16.txt"] and set(rejected.reason) == {"binary_file"}


def test_parquet_rows_without_the_text_column_are_missing_text(workspace: Path, tmp_path: Path):
    """A Parquet file without the text column is read (it is not unreadable): each of its rows lacks
    the text field and is rejected as missing_text."""
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"body": ["one", "two", "three"], "doc": ["a", "b", "c"]}), folder / "no_text.parquet")
    pq.write_table(pa.table({"text": ["kept one", "kept two"]}), folder / "ok.parquet")
    cfg = load_config("tiny", [f"workspace={workspace}", f"ingest.sources=[{{kind: files, path: '{folder}', id_field: doc}}]"])
    artifact, _ = run_direct(ingest.STAGE, cfg)
    counts = artifact.manifest["counts"]
    assert counts["rejected_by_reason"] == {"missing_text": 3} and counts["documents_out"] == 2
