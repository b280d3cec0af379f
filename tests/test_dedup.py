"""dedup: exact and near duplicates, survivors, the split, decontamination."""

from pathlib import Path

import numpy as np

from conftest import read_group, run_direct
from jielong.tasks import clean, dedup, ingest
from jielong.tasks.config import SplitConfig, load_config
from jielong.tasks.dedup import assign_split, jaccard, lsh_candidates, minhash_signatures, shingles

BASE = (
    "The json module encodes Python objects as JSON text and decodes JSON text back into Python objects, "
    "using a configurable encoder that handles dictionaries, lists, strings, numbers, booleans and None "
    "values, with options for indentation, separators, sorting keys and escaping non ASCII characters"
)
OTHER = (
    "A socket is an endpoint for sending or receiving data across a computer network; the module offers "
    "access to the BSD socket interface on all modern Unix systems, Windows, macOS and probably more "
    "platforms, creating connections, binding addresses and listening for clients that want to talk"
)


def write_jsonl(folder: Path, docs: dict[str, str]) -> Path:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in docs.items()))
    return path


def run_all(workspace: Path, docs: dict[str, str], *overrides: str):
    path = write_jsonl(workspace.parent / "input", docs)
    cfg = load_config("tiny", [
        f"workspace={workspace}",
        f"ingest.sources=[{{kind: files, path: '{path}', id_field: id}}]",
        "clean.gopher_quality.enabled=false", "clean.gopher_repetition.enabled=false",
        "clean.fineweb.enabled=false", "split.validation=0", "split.test=0",
        *overrides,
    ])
    ingested, _ = run_direct(ingest.STAGE, cfg)
    cleaned, _ = run_direct(clean.STAGE, cfg, {"ingest": ingested})
    return run_direct(dedup.STAGE, cfg, {"clean": cleaned})[0]


def test_shingles_and_jaccard():
    assert shingles("a b c d e f", 5) == {"a b c d e", "b c d e f"}
    assert shingles("A b", 5) == {"a b"}
    assert jaccard({"x", "y"}, {"y", "z"}) == 1 / 3


def test_exact_duplicates_ignore_case_and_whitespace_but_not_punctuation(workspace: Path):
    docs = {"a": "return   a >= b.", "b": "Return a >= b.", "c": "Return a <= b.", "d": OTHER}
    artifact = run_all(workspace, docs)
    rejected = read_group(artifact, "rejected")
    assert list(rejected.id) == ["b"] and rejected.reason[0] == "exact_duplicate" and rejected.related_id[0] == "a"
    assert sorted(read_group(artifact, "train").id) == ["a", "c", "d"]


def test_near_duplicates_cluster_with_one_deterministic_survivor(workspace: Path):
    near1 = BASE + " today"
    near2 = BASE + " and more besides"
    docs = {"z-original": BASE, "m-copy": near1, "a-copy": near2, "other": OTHER}
    assert jaccard(shingles(BASE, 5), shingles(near1, 5)) >= 0.8
    artifact = run_all(workspace, docs)
    rejected = read_group(artifact, "rejected")
    assert set(rejected.reason) == {"near_duplicate"}
    survivor = "a-copy"  # the longest text survives
    assert set(rejected.id) == {"z-original", "m-copy"}
    assert set(rejected.related_id) == {survivor}
    for doc_id, detail in zip(rejected.id, rejected.detail):
        assert detail == f"jaccard={jaccard(shingles(docs[doc_id], 5), shingles(docs[survivor], 5)):.3f} with the survivor"
    clusters = (artifact.path / "clusters.jsonl").read_text()
    assert survivor in clusters
    counts = artifact.manifest["counts"]
    assert counts["documents_in"] == counts["documents_out"] + counts["documents_rejected"] == 4


def test_threshold_controls_near_duplicates(workspace: Path, tmp_path: Path):
    words = BASE.split()
    edited = " ".join(w if i % 15 else w + "x" for i, w in enumerate(words))
    sim = jaccard(shingles(BASE, 5), shingles(edited, 5))
    assert 0.3 < sim < 0.8
    strict = run_all(workspace, {"a": BASE, "b": edited}, "dedup.threshold=0.8")
    assert read_group(strict, "rejected").empty
    loose = run_all(tmp_path / "ws2", {"a": BASE, "b": edited}, f"dedup.threshold={sim - 0.01:.3f}", "dedup.near.bands=64")
    assert len(read_group(loose, "rejected")) == 1


def test_lsh_candidates_are_verified_not_trusted():
    texts = [BASE, BASE.replace("json", "yaml"), OTHER]
    cfg = load_config("tiny").dedup.near
    sig = minhash_signatures(texts, cfg)
    pairs = lsh_candidates(sig, cfg.bands, np.ones(3, dtype=bool))
    assert (0, 1) in pairs and (0, 2) not in pairs


def test_split_is_deterministic_and_proportional():
    cfg = SplitConfig(validation=0.1, test=0.2)
    ids = [f"doc-{i}" for i in range(20_000)]
    splits = [assign_split(i, cfg) for i in ids]
    assert splits == [assign_split(i, cfg) for i in ids]
    assert abs(splits.count("test") / len(ids) - 0.2) < 0.01
    assert abs(splits.count("validation") / len(ids) - 0.1) < 0.01
    # growing the corpus never moves an existing document
    assert [assign_split(i, cfg) for i in ids[:100]] == splits[:100]


def test_decontamination_removes_training_documents_overlapping_eval(workspace: Path, tmp_path: Path):
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("Question: " + " ".join(BASE.split()[5:25]) + "? Answer: yes.")
    docs = {"leaky": BASE, "clean": OTHER}
    artifact = run_all(workspace, docs, f"dedup.decontaminate.extra_eval_paths=['{eval_file}']")
    rejected = read_group(artifact, "rejected")
    assert list(rejected.id) == ["leaky"] and rejected.reason[0] == "decontaminated"
    assert rejected.related_id[0] == f"eval:{eval_file}"
    off = run_all(tmp_path / "ws3", docs, f"dedup.decontaminate.extra_eval_paths=['{eval_file}']", "dedup.decontaminate.enabled=false")
    assert read_group(off, "rejected").empty


def test_validation_and_test_are_protected_from_train(workspace: Path):
    cfg = load_config("tiny", [f"workspace={workspace}", "ingest.sources=[{kind: builtin, limit: 80}]",
                               "split.validation=0.2", "split.test=0.2"])
    ingested, _ = run_direct(ingest.STAGE, cfg)
    cleaned, _ = run_direct(clean.STAGE, cfg, {"ingest": ingested})
    artifact, _ = run_direct(dedup.STAGE, cfg, {"clean": cleaned})
    splits = {s: read_group(artifact, s) for s in ("train", "validation", "test")}
    assert all(len(frame) for frame in splits.values())
    eval_grams = set()
    for s in ("validation", "test"):
        for text in splits[s].text:
            eval_grams |= set(dedup.eval_ngrams(text, 13).tolist())
    for text in splits["train"].text:
        assert not eval_grams & set(dedup.eval_ngrams(text, 13).tolist())
    counts = artifact.manifest["counts"]
    assert counts["documents_in"] == counts["documents_out"] + counts["documents_rejected"]
    assert artifact.manifest["details"]["splits"]["train"] == len(splits["train"])


def test_hashed_jaccard_equals_jaccard_of_the_shingle_strings():
    import random

    from jielong.tasks.dedup import hashed_jaccard, shingle_hashes

    rng = random.Random(0)
    words = [f"w{i}" for i in range(40)]
    for _ in range(200):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(0, 30)))
        b = " ".join(rng.choice(words) for _ in range(rng.randint(0, 30)))
        assert hashed_jaccard(shingle_hashes(a, 3), shingle_hashes(b, 3)) == jaccard(shingles(a, 3), shingles(b, 3))


def test_leak_test_copies_test_documents_into_train_and_counts_them(workspace: Path):
    """split.leak_test, the contamination study's deliberate leak: train also holds every test document,
    the copies are counted apart, and the documents still reconcile."""
    overrides = [f"workspace={workspace}", "ingest.sources=[{kind: builtin, limit: 60}]", "split.test=0.2"]
    clean_cfg = load_config("tiny", overrides)
    leaky_cfg = load_config("tiny", [*overrides, "split.leak_test=2"])
    ingested, _ = run_direct(ingest.STAGE, clean_cfg)
    cleaned, _ = run_direct(clean.STAGE, clean_cfg, {"ingest": ingested})
    honest, _ = run_direct(dedup.STAGE, clean_cfg, {"clean": cleaned})
    leaky, _ = run_direct(dedup.STAGE, leaky_cfg, {"clean": cleaned})
    test, train = read_group(leaky, "test"), read_group(leaky, "train")
    assert len(test) and len(test) == len(read_group(honest, "test"))
    assert len(train) == len(read_group(honest, "train")) + 2 * len(test)
    assert train.id.value_counts()[test.id].eq(2).all()
    assert leaky.manifest["details"]["leaked_test_copies"] == 2 * len(test)
    assert leaky.manifest["details"]["splits"] == honest.manifest["details"]["splits"]
    counts = leaky.manifest["counts"]
    assert counts["documents_in"] == counts["documents_out"] + counts["documents_rejected"]
    assert dedup.STAGE.key(load_config("tiny", [*overrides, "split.leak_test=0"]), {"clean": cleaned.key}) == honest.key


def test_a_leak_before_decontamination_is_caught_by_it(workspace: Path):
    """split.leak_before_decontamination: the same leaked copies go through decontamination first, which
    rejects every copy of a test document that has an n-gram to share (all but the shortest)."""
    overrides = [f"workspace={workspace}", "ingest.sources=[{kind: builtin, limit: 60}]", "split.test=0.2",
                 "split.leak_test=2"]
    cfg = load_config("tiny", [*overrides, "split.leak_before_decontamination=true"])
    ingested, _ = run_direct(ingest.STAGE, cfg)
    cleaned, _ = run_direct(clean.STAGE, cfg, {"ingest": ingested})
    leaky, _ = run_direct(dedup.STAGE, load_config("tiny", overrides), {"clean": cleaned})
    caught, _ = run_direct(dedup.STAGE, cfg, {"clean": cleaned})
    test = read_group(caught, "test")
    long_enough = sum(len(dedup.eval_ngrams(t, 13)) > 0 for t in test.text)  # documents with a 13-gram
    assert 0 < long_enough < len(test)
    metrics = caught.manifest["metrics"]
    assert metrics["leaked_copies_decontaminated"] == 2 * long_enough
    assert metrics["leaked_test_copies"] == 2 * (len(test) - long_enough)
    assert len(read_group(caught, "train")) == len(read_group(leaky, "train")) - 2 * long_enough
    counts = caught.manifest["counts"]
    assert counts["documents_in"] == counts["documents_out"] + counts["documents_rejected"]
