"""The hostile-input fixtures and a gzip bomb through ingest -> clean -> dedup (via Prefect), with memory
bounded: the bomb expands to over 300 MB and more than 100x, and is never read into memory at once."""

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_written_rows_match, make_hostile_folder

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("parser reads record from input stream checks field against schema before writes row output table when "
         "missing records reason moves next so one bad line never stops whole job each value type length range "
         "default null empty string number date time zone list map key order sort merge split join").split()
NEAR, REPETITIVE, TOO_LONG = 3000, 20, 300


def write_bomb(path: Path) -> int:
    """JSON lines: near duplicates (one paragraph, a counter) that survive clean and meet in dedup, long
    repetitive documents that clean rejects, and 1 MB records that ingest rejects as too long.
    Returns the uncompressed size."""
    words = random.Random(7)
    paragraph = " ".join(words.choice(WORDS) for _ in range(150))
    size = 0
    with gzip.open(path, "wt", compresslevel=9) as handle:
        lines = [*(json.dumps({"text": f"Record {i}: {paragraph}."}) for i in range(NEAR)),
                 *(json.dumps({"text": f"document {i} " + "the same short sentence again and again " * 4000})
                   for i in range(REPETITIVE))]
        for line in lines:
            size += handle.write(line + "\n")
        for i in range(TOO_LONG):
            size += handle.write(json.dumps({"text": f"too long {i} " + "x" * 1_000_000}) + "\n")
    return size


@pytest.mark.bench  # a memory target (and 20 s): opt-in, as benchmarks are; test_ingest covers the hostile folder
def test_hostile_inputs_and_a_gzip_bomb_through_the_data_path_in_bounded_memory(tmp_path: Path):
    warm = make_hostile_folder(tmp_path / "warm")
    folder = make_hostile_folder(tmp_path / "hostile")
    expanded = write_bomb(folder / "bomb.jsonl.gz")
    assert expanded > 300e6 and expanded / os.path.getsize(folder / "bomb.jsonl.gz") > 100

    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "data_path_worker.py"), str(warm), str(folder), str(tmp_path / "ws"),
         "ingest.max_document_chars=200000", "ingest.shard_bytes=4000000"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    stages = {s["stage"]: s for s in report["summaries"]}
    manifests = {name: json.loads((Path(s["path"]) / "manifest.json").read_text()) for name, s in stages.items()}
    for manifest in manifests.values():
        c = manifest["counts"]
        assert c["documents_in"] == c["documents_out"] + sum(c["rejected_by_reason"].values())
    for summary in stages.values():
        assert_written_rows_match(Path(summary["path"]))

    ingest = manifests["ingest"]["counts"]["rejected_by_reason"]
    assert ingest["too_long"] == TOO_LONG + 1  # and the hostile folder's 1.5 MB line
    assert {"malformed_json", "missing_text", "binary_file", "unreadable_file", "empty"} <= set(ingest)
    clean = manifests["clean"]["counts"]["rejected_by_reason"]
    assert sum(n for reason, n in clean.items() if reason.startswith("gopher_repetition")) >= REPETITIVE
    assert manifests["dedup"]["counts"]["rejected_by_reason"]["near_duplicate"] == NEAR - 1

    grown = report["peak_mb"] - report["warm_peak_mb"]
    # measured 119-133 MB (two shard jobs at once, clean's per-document working memory, Arrow's allocator
    # pool); reading the gzip at once instead grows it by about 600 MB
    assert grown < 200, f"peak RSS grew by {grown:.0f} MB over the warm-up for {expanded / 1e6:.0f} MB of input"
