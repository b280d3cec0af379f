"""When to bump a stage's version: this test records a digest of what each data stage writes for a
fixed corpus, per stage version. A change that alters the output makes it fail; then bump VERSION in
the stage's module (so cached artifacts of the old code are not served as the new code's) and record
the digest the failure prints. A refactor that keeps the output passes unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import xxhash

from conftest import run_chain
from jielong.tasks import clean, dedup, ingest
from jielong.tasks.config import load_config

RECORDED = {
    ("ingest", "3"): "218b9d7cb3475d3939f4dc79928ebba9",  # 3 changed paragraph-mode text only, which this fixture has not
    ("clean", "1"): "3a86d263cf8fd1912e4935004bad41bb",
    ("dedup", "3"): "265189fb115290817d9a15b9e6ab4224",
}
PROSE = [
    "The parser reads one token at a time and keeps a stack of open constructs. When a closing token "
    "arrives, it pops the stack and checks that the construct matches; a mismatch is reported with the "
    "line where the construct was opened.",
    "A cache is only as good as its key. If two inputs that differ produce the same key, the cache serves "
    "a stale answer; if equal inputs produce different keys, it recomputes work that was already done.",
    "Each shard is written to a temporary file and renamed into place when complete, so a reader never "
    "sees half of a shard, and a crash leaves nothing that looks finished.",
]


def write_corpus(folder: Path) -> Path:
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join(PROSE) + "\n")
    (folder / "copy.txt").write_text(PROSE[0] + "\n")  # an exact duplicate paragraph
    near = PROSE[1] + " Keys must be exact."  # a near duplicate (Jaccard about 0.9)
    records = [{"text": near}, {"text": "too short"}, {"title": "no text"}, "not an object"]
    (folder / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n{broken\n")
    (folder / "page.html").write_text(f"<html><body><p>{PROSE[2]}</p><script>var x = 1;</script></body></html>")
    return folder


def output_digest(artifact) -> str:
    """Rows of every data group and the rejections (id, text, source, reason, related id), in file order."""
    digest = xxhash.xxh3_128()
    for entry in artifact.manifest["files"]:
        if entry["path"].endswith(".parquet") and not entry["path"].startswith("samples/"):
            table = pq.read_table(artifact.path / entry["path"])
            columns = [c for c in ("id", "text", "source", "reason", "related_id") if c in table.column_names]
            digest.update(entry["path"].encode())
            digest.update(json.dumps(table.select(columns).to_pylist(), sort_keys=True).encode())
    digest.update(json.dumps(artifact.manifest["counts"], sort_keys=True).encode())
    return digest.hexdigest()


def test_each_data_stage_writes_what_its_version_recorded(tmp_path: Path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}", f"ingest.sources=[{{kind: files, path: '{corpus}', text_unit: paragraph}}]",
                               "split.validation=0.3", "split.test=0.3"])
    artifacts = run_chain(cfg, "dedup")
    found = {(module.STAGE.name, module.STAGE.version): output_digest(artifacts[module.STAGE.name])
             for module in (ingest, clean, dedup)}
    wrong = [f"{stage} version {version}: output digest {digest}, recorded {RECORDED.get((stage, version))}"
             for (stage, version), digest in found.items() if RECORDED.get((stage, version)) != digest]
    assert not wrong, ("a stage's output changed: bump its VERSION and record the new digest in RECORDED\n  "
                       + "\n  ".join(wrong))
