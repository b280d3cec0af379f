"""dedup: exact and near-duplicate removal, the train/validation/test split, and decontamination.

Three steps, the first and last shard-parallel:

1. signatures (per shard): a hash of each document's normalised text (NFKC, case-folded, whitespace
   collapsed — punctuation is kept, so `a >= b` and `a <= b` stay different), a MinHash signature
   (rensa) of its word n-gram shingles, and its split.
2. decide (global): exact duplicates share a hash; near-duplicate candidates share an LSH band
   (`bands` bands of num_perm/bands rows) and are kept only if their exact shingle Jaccard reaches
   `threshold` (LSH alone let pairs as low as 0.43 through here). Verified pairs are clustered with
   union-find; each cluster keeps one deterministic survivor (the longest text, then the smallest id)
   and every other member is rejected with the survivor's id.
   Split: each surviving document goes to train/validation/test by a salted hash of its id, so a
   document keeps its split when others are added or removed.
3. write (per shard): validation and test documents, plus any `extra_eval_paths` texts, are the
   evaluation sets; a training document sharing any word `ngram` (default 13, as GPT-3) with them is
   rejected as `decontaminated`, naming the evaluation document it overlaps.

Output groups: train/, validation/, test/, rejected/ (reason, related_id, detail), clusters.jsonl.
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import xxhash

from typing import Any, ClassVar
from pydantic import Field, model_validator

from jielong.tasks.lib import canaries
from jielong.tasks.core.schema import KEYED_WHEN_SET, Strict, UserError
from jielong.tasks.core.contract import Stage, StageContext, StageResult, Timer
from jielong.tasks.lib.sources import reader
from jielong.tasks.lib.sources.reader import FileOptions, read_documents
from jielong.tasks.core.shards import DOC_SCHEMA, REJECT_SCHEMA, ShardSize, ShardWriter, read_rows, reject, shard_size_of, utf8_len



# ---------------------------------------------------------------- config section


class NearDedupConfig(Strict):
    enabled: bool = True
    ngram: int = Field(5, ge=1, description="word n-gram shingles")
    num_perm: int = Field(128, ge=8)
    bands: int = Field(16, ge=1)
    threshold: float = Field(0.8, gt=0, le=1, description="exact Jaccard a candidate pair must reach")
    seed: int = 42

    @model_validator(mode="after")
    def _bands_divide_perms(self) -> "NearDedupConfig":
        if self.num_perm % self.bands:
            raise ValueError(f"bands ({self.bands}) must divide num_perm ({self.num_perm})")
        return self


class DecontaminateConfig(Strict):
    enabled: bool = True
    ngram: int = Field(13, ge=1)
    extra_eval_paths: list[str] = Field(default_factory=list, description="more eval texts to protect")


class DedupConfig(Strict):
    exact: bool = True
    near: NearDedupConfig = Field(default_factory=NearDedupConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)

    # `--set dedup.threshold=0.7` is the documented shorthand for dedup.near.threshold
    SHORTHANDS: ClassVar[tuple[str, ...]] = ("threshold",)

    @model_validator(mode="before")
    @classmethod
    def _threshold_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and "threshold" in data:
            data = dict(data)
            near = dict(data.get("near") or {})
            near["threshold"] = data.pop("threshold")
            data["near"] = near
        return data


class SplitConfig(Strict):
    """Document-level split by a hash of the id: stable when documents are added or removed."""

    validation: float = Field(0.05, ge=0, lt=1)
    test: float = Field(0.05, ge=0, lt=1)
    salt: str = "jielong-split-v1"
    leak_test: int = Field(0, ge=0, le=100, description="a deliberate contamination, for the contamination study: "
                           "every test document is also written into train this many times (after decontamination, "
                           "which would catch it); 0: never", json_schema_extra=KEYED_WHEN_SET)
    leak_before_decontamination: bool = Field(False, description="the leaked copies go through decontamination like "
                                              "any training document (which rejects those sharing an n-gram with "
                                              "the test split): what the pipeline's own defence removes",
                                              json_schema_extra=KEYED_WHEN_SET)

    @model_validator(mode="after")
    def _leaves_training_data(self) -> "SplitConfig":
        if self.validation + self.test >= 1:
            raise ValueError("validation + test must be below 1")
        return self


# 2: a near duplicate's detail is its Jaccard with the survivor
# 3: extra eval files are read as ingest reads files (records by their text field, not raw JSON)
VERSION = "3"
SPLITS = ("train", "validation", "test")
MAX_PAIRWISE_BUCKET = 64  # larger LSH buckets are chained instead of compared all-pairs
_WORDS = re.compile(r"\w+")


# ---------------------------------------------------------------- features


def _hash(text: str) -> int:
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"))


def normalize_for_exact(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_hash(text: str) -> int:
    return _hash(normalize_for_exact(text))


def shingles(text: str, n: int) -> set[str]:
    """Word n-grams of the lower-cased, whitespace-split text (one shingle if shorter than n)."""
    words = text.lower().split()
    if len(words) <= n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """`shingles` as sorted unique 64-bit hashes: a tenth of the memory of the strings."""
    return np.unique(np.fromiter((_hash(s) for s in shingles(text, n)), dtype=np.uint64))


def hashed_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """`jaccard` of two `shingle_hashes` arrays."""
    if not len(a) and not len(b):
        return 1.0
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common)


def eval_ngrams(text: str, n: int) -> np.ndarray:
    """Hashes of the word n-grams used for decontamination (punctuation ignored, as GPT-3)."""
    words = _WORDS.findall(text.lower())
    if len(words) < n:
        return np.empty(0, dtype=np.uint64)
    return np.fromiter(
        (_hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)),
        dtype=np.uint64,
    )


def assign_split(doc_id: str, cfg: SplitConfig) -> str:
    u = _hash(f"{cfg.salt}\x00{doc_id}") / 2.0**64
    if u < cfg.test:
        return "test"
    if u < cfg.test + cfg.validation:
        return "validation"
    return "train"


def minhash_signatures(texts: list[str], cfg) -> np.ndarray:
    import rensa

    sets = [sorted(shingles(t, cfg.ngram)) or [""] for t in texts]
    if not sets:
        return np.empty((0, cfg.num_perm), dtype=np.uint32)
    digests = rensa.RMinHash.digests_from_token_sets(sets, num_perm=cfg.num_perm, seed=cfg.seed)
    return np.asarray(digests, dtype=np.uint32)


# ---------------------------------------------------------------- step 1: signatures per shard


@dataclass
class ShardJob:
    index: int
    path: str
    out_dir: str
    dedup: dict
    split: dict
    canaries: bool = False  # ingest.canaries is set: canary copies go to their forced split


def split_of(doc_id: str, cfg: SplitConfig, canaries_injected: bool) -> str:
    forced = canaries.forced_split(doc_id) if canaries_injected else None
    return forced or assign_split(doc_id, cfg)


def signatures(job: ShardJob) -> dict:
    cfg = DedupConfig.model_validate(job.dedup)
    split_cfg = SplitConfig.model_validate(job.split)
    rows = list(read_rows(Path(job.path), columns=["id", "text"]))
    texts = [r["text"] for r in rows]
    out = Path(job.out_dir) / "work" / f"sig-{job.index:05d}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        ids=np.array([r["id"] for r in rows], dtype=object).astype(str),
        lengths=np.array([len(t) for t in texts], dtype=np.int64),
        exact=np.array([exact_hash(t) for t in texts], dtype=np.uint64),
        minhash=minhash_signatures(texts, cfg.near) if cfg.near.enabled else np.empty((len(rows), 0), np.uint32),
        split=np.array([split_of(r["id"], split_cfg, job.canaries) for r in rows], dtype=object).astype(str),
    )
    return {"index": job.index, "signatures": str(out), "documents": len(rows)}


# ---------------------------------------------------------------- step 2: global decisions


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def lsh_candidates(minhash: np.ndarray, bands: int, alive: np.ndarray) -> set[tuple[int, int]]:
    """Pairs (i < j) of alive documents that share at least one band of their signatures."""
    rows = minhash.shape[1] // bands
    idx = np.flatnonzero(alive)
    pairs: set[tuple[int, int]] = set()
    for b in range(bands):
        band = np.ascontiguousarray(minhash[idx, b * rows : (b + 1) * rows])
        keys = band.view(np.dtype((np.void, band.dtype.itemsize * rows))).ravel()
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable")  # members of each bucket, contiguous (not a scan per bucket)
        starts = np.concatenate([[0], np.cumsum(counts)])
        for group in np.flatnonzero(counts > 1):
            members = idx[order[starts[group] : starts[group + 1]]]
            if len(members) <= MAX_PAIRWISE_BUCKET:
                pairs.update((int(a), int(b)) for k, a in enumerate(members) for b in members[k + 1 :])
            else:
                pairs.update((int(a), int(b)) for a, b in zip(members[:-1], members[1:]))
    return pairs


def _survivor(members: list[int], lengths: np.ndarray, ids: np.ndarray) -> int:
    return min(members, key=lambda i: (-int(lengths[i]), str(ids[i])))


def decide(ctx: StageContext, sig_results: list[dict], texts_of: Callable[[list[int]], Iterator[tuple[int, str]]]) -> tuple[dict, list[dict]]:
    """Removed document index -> (reason, related id, detail), and the duplicate clusters."""
    cfg: DedupConfig = ctx.section("dedup")
    parts = [np.load(r["signatures"], allow_pickle=False) for r in sorted(sig_results, key=lambda r: r["index"])]
    ids = np.concatenate([p["ids"] for p in parts]) if parts else np.empty(0, str)
    lengths = np.concatenate([p["lengths"] for p in parts]) if parts else np.empty(0, np.int64)
    exact = np.concatenate([p["exact"] for p in parts]) if parts else np.empty(0, np.uint64)
    removed: dict[int, tuple[str, str, str]] = {}
    clusters: list[dict] = []
    stats: dict[str, int] = {}

    if cfg.exact:
        groups: dict[int, list[int]] = defaultdict(list)
        for i, h in enumerate(exact.tolist()):
            groups[h].append(i)
        for members in groups.values():
            if len(members) > 1:
                keep = _survivor(members, lengths, ids)
                clusters.append({"kind": "exact", "survivor": str(ids[keep]), "removed": [str(ids[m]) for m in members if m != keep]})
                for m in members:
                    if m != keep:
                        removed[m] = ("exact_duplicate", str(ids[keep]), "same normalised text")

    if cfg.near.enabled and len(ids):
        minhash = np.concatenate([p["minhash"] for p in parts])
        alive = np.ones(len(ids), dtype=bool)
        alive[list(removed)] = False
        candidates = lsh_candidates(minhash, cfg.near.bands, alive)
        needed = sorted({i for pair in candidates for i in pair})
        # candidates are verified on exact shingle sets, held as hashes (never all the texts at once)
        sets = {i: shingle_hashes(text, cfg.near.ngram) for i, text in texts_of(needed)}
        uf = UnionFind(len(ids))
        verified = 0
        for a, b in sorted(candidates):
            sim = hashed_jaccard(sets[a], sets[b])
            if sim >= cfg.near.threshold:
                verified += 1
                uf.union(a, b)
        members_of: dict[int, list[int]] = defaultdict(list)
        for i in needed:
            members_of[uf.find(i)].append(i)
        for members in members_of.values():
            if len(members) > 1:
                keep = _survivor(members, lengths, ids)
                clusters.append({"kind": "near", "survivor": str(ids[keep]), "removed": [str(ids[m]) for m in members if m != keep]})
                for m in members:
                    if m != keep:
                        # pairs chain, so a member can be below the threshold against its survivor
                        similarity = hashed_jaccard(sets[m], sets[keep])
                        removed[m] = ("near_duplicate", str(ids[keep]), f"jaccard={similarity:.3f} with the survivor")
        stats["lsh_candidate_pairs"] = len(candidates)
        stats["verified_pairs"] = verified
    return {"ids": ids, "removed": removed, "parts": parts, "stats": stats}, clusters


# ---------------------------------------------------------------- step 3: write per shard


@dataclass
class WriteJob:
    index: int
    path: str
    out_dir: str
    removed: dict  # row number in this shard -> (reason, related id, detail)
    splits: list[str]
    eval_ngrams: str  # .npz with sorted hashes and the eval document each came from
    ngram: int
    decontaminate: bool
    shard_size: ShardSize
    leak_test: int = 0  # split.leak_test: copies of each test document also written into train
    leak_decontaminated: bool = False  # split.leak_before_decontamination: the copies are checked first


def write_shard(job: WriteJob) -> dict:
    out = Path(job.out_dir)
    writers = {s: ShardWriter(out, s, job.index, DOC_SCHEMA, job.shard_size) for s in SPLITS}
    rejected = ShardWriter(out, "rejected", job.index, REJECT_SCHEMA, job.shard_size)
    reasons: Counter[str] = Counter()
    table = np.load(job.eval_ngrams, allow_pickle=False)
    hashes, owners, owner_ids = table["hashes"], table["owners"], table["owner_ids"]
    bytes_in = 0
    leaked = caught = 0
    n = 0

    def shared_ngrams(text: str) -> tuple[int, str]:
        """How many of the text's n-grams an evaluation document has, and the first such document's id."""
        if not len(hashes):
            return 0, ""
        grams = eval_ngrams(text, job.ngram)
        pos = np.searchsorted(hashes, grams)
        pos[pos >= len(hashes)] = 0
        hits = np.flatnonzero(hashes[pos] == grams)
        return len(hits), (str(owner_ids[owners[pos[hits[0]]]]) if len(hits) else "")

    for n, doc in enumerate(read_rows(Path(job.path)), 1):
        row = n - 1
        bytes_in += utf8_len(doc["text"])
        if row in job.removed:
            reason, related, detail = job.removed[row]
            rejected.add(reject(doc, reason, detail, related))
            reasons[reason] += 1
            continue
        split = job.splits[row]
        if split == "train" and job.decontaminate:
            hits, owner = shared_ngrams(doc["text"])
            if hits:
                rejected.add(reject(doc, "decontaminated", f"{hits} shared {job.ngram}-grams", owner))
                reasons["decontaminated"] += 1
                continue
        writers[split].add(doc)
        if split == "test" and job.leak_test:
            if job.leak_decontaminated and job.decontaminate and shared_ngrams(doc["text"])[0]:
                caught += job.leak_test  # copies, not documents: never written, so nothing to reconcile
                continue
            for _ in range(job.leak_test):
                writers["train"].add(doc)
                leaked += 1
    for w in writers.values():
        w.close()
    rejected.close()
    kept = {s: w.count for s, w in writers.items()}
    kept["train"] -= leaked  # copies, not documents: the split's documents still reconcile
    return {
        "documents_in": n,
        "kept": kept,
        "leaked_test_copies": leaked,
        "leaked_copies_decontaminated": caught,
        "bytes_out": sum(w.bytes for w in writers.values()),
        "bytes_in": bytes_in,
        "rejected": dict(reasons),
    }


def build_eval_ngrams(ctx: StageContext, eval_texts: Iterable[tuple[str, str]]) -> tuple[Path, int]:
    """The sorted n-gram hashes of the evaluation documents and which document each came from."""
    cfg = ctx.section("dedup").decontaminate
    chunks, owners, owner_ids = [], [], []
    for k, (doc_id, text) in enumerate(eval_texts):
        grams = eval_ngrams(text, cfg.ngram)
        chunks.append(grams)
        owners.append(np.full(len(grams), k, dtype=np.int64))
        owner_ids.append(doc_id)
    hashes = np.concatenate(chunks) if chunks else np.empty(0, np.uint64)
    owner = np.concatenate(owners) if owners else np.empty(0, np.int64)
    order = np.argsort(hashes, kind="stable")
    path = ctx.out_dir / "work" / "eval_ngrams.npz"
    np.savez(path, hashes=hashes[order], owners=owner[order],
             owner_ids=np.array(owner_ids or [""], dtype=str))
    return path, len(owner_ids)


def _extra_eval_texts(paths: list[str]) -> Iterator[tuple[str, str]]:
    """(id, text) of every document of the extra evaluation files, read as ingest reads files."""
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise UserError(f"dedup.decontaminate.extra_eval_paths: {path} does not exist")
        folder = path if path.is_dir() else path.parent
        for item in read_documents(path, FileOptions()):
            if "reason" not in item:
                yield f"eval:{folder / item['id']}", item["text"]


def extra_eval_fingerprint(view) -> list:
    decontaminate = view.dedup.decontaminate
    return [reader.fingerprint(Path(raw)) for raw in decontaminate.extra_eval_paths] if decontaminate.enabled else []


# ---------------------------------------------------------------- the stage


def run(ctx: StageContext) -> StageResult:
    cfg: DedupConfig = ctx.section("dedup")
    files = ctx.inputs["clean"].files("kept")
    injected = ctx.config.ingest.dump().get("canaries") is not None
    sig_jobs = [ShardJob(i, str(p), str(ctx.out_dir), cfg.model_dump(mode="json"), ctx.section("split").model_dump(mode="json"),
                         injected)
                for i, p in enumerate(files)]
    with Timer() as signing:
        sig_results = ctx.map(signatures, sig_jobs)
    counts = [r["documents"] for r in sorted(sig_results, key=lambda r: r["index"])]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)

    def texts_of(indices: list[int]) -> Iterator[tuple[int, str]]:
        """(document index, text), streamed shard by shard."""
        wanted: dict[int, dict[int, int]] = defaultdict(dict)
        for i in indices:
            shard = int(np.searchsorted(offsets, i, side="right") - 1)
            wanted[shard][i - offsets[shard]] = i
        for shard, rows in sorted(wanted.items()):
            for row, doc in enumerate(read_rows(files[shard], columns=["text"])):
                if row in rows:
                    yield rows[row], doc["text"]

    with Timer() as deciding:  # in the flow process
        decision, clusters = decide(ctx, sig_results, texts_of)
    removed, parts = decision["removed"], decision["parts"]
    splits = np.concatenate([p["split"] for p in parts]) if parts else np.empty(0, str)
    eval_index = [i for i in range(len(splits)) if splits[i] != "train" and i not in removed]
    eval_texts: Iterable[tuple[str, str]] = []
    if cfg.decontaminate.enabled:
        eval_texts = itertools.chain(((str(decision["ids"][i]), text) for i, text in texts_of(eval_index)),
                                     _extra_eval_texts(cfg.decontaminate.extra_eval_paths))
    with Timer() as indexing:  # in the flow process
        table, eval_documents = build_eval_ngrams(ctx, eval_texts)

    write_jobs = []
    for shard, path in enumerate(files):
        lo, hi = offsets[shard], offsets[shard + 1]
        write_jobs.append(
            WriteJob(
                index=shard,
                path=str(path),
                out_dir=str(ctx.out_dir),
                removed={i - lo: removed[i] for i in range(lo, hi) if i in removed},
                splits=[str(s) for s in splits[lo:hi]],
                eval_ngrams=str(table),
                ngram=cfg.decontaminate.ngram,
                decontaminate=cfg.decontaminate.enabled,
                shard_size=shard_size_of(ctx.config),
                leak_test=ctx.section("split").leak_test,
                leak_decontaminated=ctx.section("split").leak_before_decontamination,
            )
        )
    with Timer() as writing:
        results = ctx.map(write_shard, write_jobs)
    for f in (ctx.out_dir / "work").iterdir():
        f.unlink()
    (ctx.out_dir / "work").rmdir()
    with open(ctx.out_dir / "clusters.jsonl", "w", encoding="utf-8") as handle:
        for cluster in sorted(clusters, key=lambda c: (c["kind"], c["survivor"])):
            handle.write(json.dumps(cluster, ensure_ascii=False) + "\n")

    result = StageResult(extra_artifacts=["clusters.jsonl"], phases={
        "signatures": signing.seconds, "decide": deciding.seconds, "eval_index": indexing.seconds, "write": writing.seconds})
    per_split: Counter[str] = Counter()
    for r in results:
        result.documents_in += r["documents_in"]
        result.bytes_in += r["bytes_in"]
        result.bytes_out += r["bytes_out"]
        per_split.update(r["kept"])
        for reason, n in r["rejected"].items():
            result.rejected_by_reason[reason] = result.rejected_by_reason.get(reason, 0) + n
    result.documents_out = sum(per_split.values())
    result.details.update(
        splits=dict(per_split),
        clusters={"exact": sum(c["kind"] == "exact" for c in clusters), "near": sum(c["kind"] == "near" for c in clusters)},
        eval_documents=eval_documents,
        **decision["stats"],
    )
    leaked = sum(r["leaked_test_copies"] for r in results)
    if leaked:
        result.details["leaked_test_copies"] = leaked  # split.leak_test: train holds these copies of test documents
        result.metrics["leaked_test_copies"] = leaked
    if ctx.section("split").leak_before_decontamination:  # the leaked copies decontamination rejected
        caught = sum(r["leaked_copies_decontaminated"] for r in results)
        result.details["leaked_copies_decontaminated"] = caught
        result.metrics["leaked_copies_decontaminated"] = caught
        result.metrics["leaked_test_copies"] = leaked
    total = max(result.documents_in, 1)
    result.metrics.update(
        kept_fraction=result.documents_out / total,
        exact_duplicate_fraction=result.rejected_by_reason.get("exact_duplicate", 0) / total,
        near_duplicate_fraction=result.rejected_by_reason.get("near_duplicate", 0) / total,
        decontaminated_fraction=result.rejected_by_reason.get("decontaminated", 0) / total,
        **{f"{s}_documents": per_split.get(s, 0) for s in SPLITS},
    )
    return result


def reads(cfg) -> tuple[str, ...]:
    """Dedup writes shards of ingest's size; it reads ingest.canaries only when canaries are injected."""
    return ("dedup", "split", "ingest.shard_size", "ingest.shard_bytes") + (("ingest.canaries",) if cfg.ingest.canaries else ())


STAGE = Stage(
    name="dedup",
    version=VERSION,
    reads=reads,
    inputs=("clean",),
    run=run,
    external=extra_eval_fingerprint,
)
