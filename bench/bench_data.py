"""Throughput of the clean and dedup stages, and jielong's near-duplicate detection vs datasketch.

Run from the repository root:  .venv/bin/python bench/bench_data.py

What is measured, per corpus (the `tiny` preset; only `workspace` and `ingest.sources` overridden):

1. Stage throughput. ingest runs once (untimed). clean, then dedup, run directly (no Prefect, no
   MLflow) through `tasks.contract.compute_artifact`, timed around `stage.run` only — the span the
   flow records as the manifest's `timings.seconds`. Each runs, interleaved, with two `ctx.map`s:
   `run_sequentially` (1 process) and a pre-started `ProcessPoolExecutor(2)` (2 processes, one shard
   job per task, as the flow's process runner). docs/s and MB/s count the stage's input documents and
   the UTF-8 bytes of their text (MB = 10^6 bytes).
2. Near duplicates, on the clean stage's kept documents (read from Parquet before timing), from the
   texts to the set of duplicate ids, 1 process:
   - jielong: tasks.dedup's `shingles` (word 5-grams) -> `minhash_signatures` (rensa, 128 perms)
     -> `lsh_candidates` (16 bands x 8 rows) -> exact Jaccard >= 0.8 (on `shingle_hashes`) -> `UnionFind`; what
     `dedup.decide` does for near duplicates (without its exact-hash pass).
   - baseline: datasketch MinHash(num_perm=128, seed=42) of the same shingles (UTF-8 bytes, via
     `update_batch`) -> MinHashLSH(threshold=0.8, num_perm=128): insert all, query each, union-find
     over the query results, no verification.
   In both, a duplicate is a non-survivor of a cluster (survivor: longest text, then smallest id —
   `tasks.dedup._survivor`). Reported: both times, the throughput ratio (jielong docs/s / baseline
   docs/s), agreement (fraction of documents both call duplicate or both call unique), precision
   and recall of jielong with the baseline as reference, and the fraction of baseline duplicates
   whose best exact Jaccard with another member of their cluster is < 0.8 (unverified-LSH false
   positives).
   Untimed checks: the jielong arm's duplicates must equal the dedup stage's `near_duplicate`
   rejections with `dedup.exact=false` (the script stops otherwise), and both arms are scored
   against an exact reference (all pairs with true Jaccard >= 0.8, found by prefix filtering).
Every timing is the median of 3 runs. The machine may be shared: a run during which other processes
took more than 0.25 CPU cores (from /proc/stat, minus our own processes) is repeated, up to 4 times,
and the tables show the most the others took during a kept run. Everything is seeded (rensa seed 42
from the config, datasketch seed 42), so counts are identical between runs.

Prints Markdown tables and rewrites the `bench_data` section of bench/RESULTS.md (between its markers;
the rest of the file is left alone). Scratch output goes to bench/out/data/ (git-ignored), which is
deleted first.
"""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datasketch import MinHash, MinHashLSH  # noqa: E402

from jielong.tasks import clean, dedup, ingest# noqa: E402
from jielong.tasks.config import load_config  # noqa: E402
from jielong.tasks.core.contract import compute_artifact, run_sequentially  # noqa: E402
from jielong.tasks.core.shards import read_rows  # noqa: E402
from results import TICK, machine_cpu, write_section  # noqa: E402

OUT = ROOT / "bench" / "out" / "data"  # bench/out/ is shared with the other benchmarks: only this folder is ours
DATASETS = (ROOT / ".." / "shared" / "datasets").resolve()
REPEATS = 3
SEED = 42


def files_source(*paths: Path) -> str:
    items = ", ".join(f"{{kind: files, path: '{p}', text_unit: paragraph}}" for p in paths)
    return f"ingest.sources=[{items}]"


CORPORA = {
    "builtin": [],  # the tiny preset's own source: {kind: builtin}
    "wikitext-2": [files_source(DATASETS / "wikitext-2" / "test.txt", DATASETS / "wikitext-2" / "valid.txt")],
    "tinyshakespeare": [files_source(DATASETS / "tinyshakespeare" / "input.txt")],
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- timing on a shared machine

WORKER_PIDS: list[int] = []  # the process pool's workers, whose CPU is ours
OTHER: dict[str, float] = defaultdict(float)  # label -> most CPU cores other processes took in one timed run
QUIET, ATTEMPTS = 0.25, 4


def _own_cpu() -> float:
    times = os.times()
    total = times.user + times.system
    for pid in WORKER_PIDS:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    return total


def quiet_run(fn, label: str):
    """(fn(), wall seconds, CPU seconds of this process). The machine is shared: while other
    processes took more than QUIET cores meanwhile, wait and run again (at most ATTEMPTS times)."""
    for attempt in range(1, ATTEMPTS + 1):
        machine, own = machine_cpu(), _own_cpu()
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        other = ((machine_cpu() - machine) - (_own_cpu() - own)) / wall
        if other <= QUIET or attempt == ATTEMPTS:
            break
        log(f"  {label}: other processes took {other:.2f} cores, running again")
        time.sleep(2)
    OTHER[label] = max(OTHER[label], other)
    return value, wall, cpu


def median_time(fn, label: str):
    """(median wall seconds, median CPU seconds of this process, last return value)."""
    runs = [quiet_run(fn, label) for _ in range(REPEATS)]
    return statistics.median(r[1] for r in runs), statistics.median(r[2] for r in runs), runs[-1][0]


# ---------------------------------------------------------------- stages, as the flow runs them


def run_stage(stage, cfg, inputs: dict, mapper):
    """Run one stage as the flow does (tasks.contract.compute_artifact): (artifact, seconds, result),
    seconds being the manifest's span around stage.run."""
    key = stage.key(cfg, {name: art.key for name, art in inputs.items()})
    artifact, result = compute_artifact(stage, cfg, key, inputs, map=mapper)
    return artifact, artifact.manifest["timings"]["seconds"], result


def time_stage(stage, cfg, inputs: dict, mappers: dict, label: str) -> dict:
    """Median stage seconds per map kind (runs interleaved, so both see the same background load),
    plus the stage's input size and its artifact."""
    seconds: dict[str, list[float]] = defaultdict(list)
    for _ in range(REPEATS):
        for name, mapper in mappers.items():
            (artifact, took, result), _, _ = quiet_run(lambda: run_stage(stage, cfg, inputs, mapper), label)
            seconds[name].append(took)
    row: dict = {name: statistics.median(times) for name, times in seconds.items()}
    row.update(docs=result.documents_in, mb=result.bytes_in / 1e6, out=result.documents_out, artifact=artifact)
    return row


# ---------------------------------------------------------------- near duplicates


def non_survivors(clusters, lengths: np.ndarray, ids: np.ndarray) -> set[int]:
    dups: set[int] = set()
    for members in clusters:
        if len(members) > 1:
            keep = dedup._survivor(members, lengths, ids)
            dups.update(m for m in members if m != keep)
    return dups


def clusters_of(uf: dedup.UnionFind, n: int) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(uf.find(i), []).append(i)
    return list(groups.values())


def jielong_near(texts: list[str], ids: np.ndarray, lengths: np.ndarray, near) -> tuple[set[int], list]:
    """dedup.decide's near-duplicate path: rensa MinHash, 16-band LSH, exact Jaccard verification."""
    minhash = dedup.minhash_signatures(texts, near)
    candidates = dedup.lsh_candidates(minhash, near.bands, np.ones(len(texts), dtype=bool))
    needed = sorted({i for pair in candidates for i in pair})
    sets = {i: dedup.shingle_hashes(texts[i], near.ngram) for i in needed}
    uf = dedup.UnionFind(len(texts))
    for a, b in sorted(candidates):
        if dedup.hashed_jaccard(sets[a], sets[b]) >= near.threshold:
            uf.union(a, b)
    clusters = clusters_of(uf, len(texts))
    return non_survivors(clusters, lengths, ids), [len(candidates), clusters]


def datasketch_near(texts: list[str], ids: np.ndarray, lengths: np.ndarray, near) -> tuple[set[int], list]:
    """The plain baseline: datasketch MinHash + MinHashLSH(threshold), query results taken as is."""
    lsh = MinHashLSH(threshold=near.threshold, num_perm=near.num_perm)
    sketches = []
    for i, text in enumerate(texts):
        m = MinHash(num_perm=near.num_perm, seed=SEED)
        m.update_batch([s.encode("utf-8") for s in dedup.shingles(text, near.ngram)] or [b""])
        lsh.insert(i, m)
        sketches.append(m)
    uf = dedup.UnionFind(len(texts))
    for i, m in enumerate(sketches):
        for j in lsh.query(m):
            uf.union(i, j)
    clusters = clusters_of(uf, len(texts))
    return non_survivors(clusters, lengths, ids), [(lsh.b, lsh.r), clusters]


def exact_near(texts: list[str], ids: np.ndarray, lengths: np.ndarray, near) -> set[int]:
    """Reference without sketches: every pair with exact Jaccard >= threshold (prefix filtering)."""
    sets = [dedup.shingles(t, near.ngram) for t in texts]
    freq = Counter(s for shingle_set in sets for s in shingle_set)
    index: dict[str, list[int]] = defaultdict(list)
    for i, shingle_set in enumerate(sets):  # two sets this similar share one of their rarest shingles
        rarest = sorted(shingle_set, key=lambda s: (freq[s], s))
        for s in rarest[: len(rarest) - math.ceil(near.threshold * len(rarest)) + 1]:
            index[s].append(i)
    uf = dedup.UnionFind(len(texts))
    for posting in index.values():
        for k, a in enumerate(posting):
            for b in posting[k + 1:]:
                if dedup.jaccard(sets[a], sets[b]) >= near.threshold:
                    uf.union(a, b)
    return non_survivors(clusters_of(uf, len(texts)), lengths, ids)


def low_jaccard_fraction(dups: set[int], clusters, texts: list[str], near) -> float:
    """Fraction of duplicates whose best exact Jaccard with another cluster member is < threshold."""
    if not dups:
        return 0.0
    sets: dict[int, set[str]] = {}
    shingle = lambda i: sets.setdefault(i, dedup.shingles(texts[i], near.ngram))  # noqa: E731
    low = 0
    for members in clusters:
        for m in (m for m in members if m in dups):
            best = max(dedup.jaccard(shingle(m), shingle(o)) for o in members if o != m)
            low += best < near.threshold
    return low / len(dups)


def compare_near(artifact, near, label: str) -> dict:
    rows = [r for path in artifact.files("kept") for r in read_rows(path, columns=["id", "text"])]
    texts = [r["text"] for r in rows]
    ids = np.array([r["id"] for r in rows], dtype=str)
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    j_wall, j_cpu, (j_dups, (j_pairs, _)) = median_time(lambda: jielong_near(texts, ids, lengths, near), label)
    b_wall, b_cpu, (b_dups, (b_bands, b_clusters)) = median_time(lambda: datasketch_near(texts, ids, lengths, near), label)
    truth = exact_near(texts, ids, lengths, near)
    n = len(texts)
    both = len(j_dups & b_dups)
    return {
        "docs": n, "mb": sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) / 1e6,
        "j_s": j_wall, "j_cpu": j_cpu, "b_s": b_wall, "b_cpu": b_cpu, "ratio": b_wall / j_wall,
        "j_ids": {str(ids[i]) for i in j_dups}, "j_dups": len(j_dups), "b_dups": len(b_dups), "j_pairs": j_pairs, "b_bands": b_bands,
        "agreement": (n - len(j_dups ^ b_dups)) / n,
        "precision": both / len(j_dups) if j_dups else float("nan"),
        "recall": both / len(b_dups) if b_dups else float("nan"),
        "b_low": low_jaccard_fraction(b_dups, b_clusters, texts, near),
        "truth": len(truth), "j_fp": len(j_dups - truth), "j_fn": len(truth - j_dups),
        "b_fp": len(b_dups - truth), "b_fn": len(truth - b_dups),
    }


def check_same_as_stage(corpus: str, overrides: list[str], clean_artifact, expected: set[str]) -> None:
    """The jielong arm must remove exactly what the dedup stage (with exact=false) removes as near duplicates."""
    cfg = load_config("tiny", [f"workspace={OUT / corpus}", *overrides, "dedup.exact=false"])
    artifact, _, _ = run_stage(dedup.STAGE, cfg, {"clean": clean_artifact}, run_sequentially)
    found = {r["id"] for path in artifact.files("rejected") for r in read_rows(path, columns=["id", "reason"])
             if r["reason"] == "near_duplicate"}
    if found != expected:
        raise SystemExit(f"{corpus}: the dedup stage removed {len(found)} near duplicates, the benchmark {len(expected)}")


# ---------------------------------------------------------------- report


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", lscpu)
    mem = re.search(r"MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text())
    gpu = "no GPU" if shutil.which("nvidia-smi") is None else "nvidia-smi present"
    return (f"{os.cpu_count()} vCPU {model.group(1).strip() if model else platform.processor()}, "
            f"{int(mem.group(1)) / 2**20:.1f} GiB RAM, {gpu}; Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def other(label: str) -> str:
    """Most cores other processes took during one of the timed runs; flagged when it may skew them."""
    cores = OTHER[label]
    return f"{cores:.2f}" + (" ⚠" if cores > QUIET else "")


def fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def tables(stages: dict, near: dict) -> str:
    out = ["### Stage throughput (median of 3; 1 process = `run_sequentially`, 2 processes = `ProcessPoolExecutor(2)`)", ""]
    out += ["| corpus | stage | docs in | docs out | MB in | 1 proc s | docs/s | MB/s | 2 proc s | docs/s | MB/s | 2-proc speedup | other procs' CPU |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for corpus, per_stage in stages.items():
        for stage, r in per_stage.items():
            s1, s2 = r["1 proc"], r["2 proc"]
            out.append(f"| {corpus} | {stage} | {r['docs']:,} | {r['out']:,} | {r['mb']:.2f} | {s1:.2f} | "
                       f"{r['docs'] / s1:,.0f} | {r['mb'] / s1:.2f} | {s2:.2f} | {r['docs'] / s2:,.0f} | "
                       f"{r['mb'] / s2:.2f} | {s1 / s2:.2f}x | {other(f'{corpus}/{stage}')} |")
    out += ["", "### Near duplicates on the clean stage's kept documents (median of 3, 1 process)", ""]
    out += ["| corpus | docs | MB | jielong s (CPU s) | datasketch s (CPU s) | jielong docs/s | datasketch docs/s | "
            "ratio (CPU) | jielong dups | datasketch dups | agreement | precision | recall | datasketch dups with J<0.8 | target (>=2x, >=0.95) | other procs' CPU |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|"]
    for corpus, r in near.items():
        met = "met" if r["ratio"] >= 2 and r["agreement"] >= 0.95 else "**not met**"
        out.append(f"| {corpus} | {r['docs']:,} | {r['mb']:.2f} | {r['j_s']:.2f} ({r['j_cpu']:.2f}) | "
                   f"{r['b_s']:.2f} ({r['b_cpu']:.2f}) | {r['docs'] / r['j_s']:,.0f} | {r['docs'] / r['b_s']:,.0f} | "
                   f"{r['ratio']:.2f}x ({r['b_cpu'] / r['j_cpu']:.2f}x) | {r['j_dups']:,} | {r['b_dups']:,} | {r['agreement']:.4f} | "
                   f"{fmt(r['precision'])} | {fmt(r['recall'])} | {r['b_low']:.3f} | {met} | {other(f'{corpus}/near')} |")
    out += ["", "Against the exact reference (all pairs with true Jaccard >= 0.8, same clustering and survivor rule):", "",
            "| corpus | exact dups | jielong false dups | jielong missed | datasketch false dups | datasketch missed |",
            "|---|--:|--:|--:|--:|--:|"]
    out += [f"| {c} | {r['truth']:,} | {r['j_fp']} | {r['j_fn']} | {r['b_fp']} | {r['b_fn']} |" for c, r in near.items()]
    missed = [c for c, r in near.items() if not (r["ratio"] >= 2 and r["agreement"] >= 0.95)]
    out += ["", "**Issue target** (jielong >= 2x datasketch docs/s at >= 0.95 agreement): "
            + (f"met on all {len(near)} corpora." if not missed else f"NOT met on {', '.join(missed)}.")]
    out += ["", "*other procs' CPU*: the most CPU cores that other processes on this shared machine took during "
            "one kept timed run of that row (from /proc/stat; a run is repeated up to 4 times while others take "
            "more than 0.25 cores); ⚠ above 0.25 — those timings are pessimistic, the 2-process ones most."]
    return "\n".join(out)


def notes(near: dict, shards: dict, cfg_near) -> str:
    """How to read the tables; the numbers in it come from this run."""
    b, r = next(iter(near.values()))["b_bands"]
    rows = cfg_near.num_perm // cfg_near.bands
    p_ds = 1 - (1 - cfg_near.threshold ** r) ** b
    p_j = 1 - (1 - cfg_near.threshold ** rows) ** cfg_near.bands
    few = ", ".join(c for c, x in near.items() if x["truth"] < 20)
    pairs = ", ".join(f"{c} {x['j_pairs']:,}" for c, x in near.items())
    return "\n".join([
        "### Reading the results", "",
        *([f"- Agreement only means something where there are near duplicates. The exact reference finds fewer "
           f"than 20 in {few}: there agreement is about 1 by construction and only the speed ratio says anything. "
           "A corpus with injected near duplicates would test the target harder."] if few else []),
        f"- Disagreements are the baseline's errors: against the exact reference jielong has "
        f"{sum(x['j_fp'] for x in near.values())} false and {sum(x['j_fn'] for x in near.values())} missed "
        f"duplicates, datasketch {sum(x['b_fp'] for x in near.values())} and {sum(x['b_fn'] for x in near.values())}. "
        f"datasketch's MinHashLSH(threshold={cfg_near.threshold}) uses {b} bands x {r} rows, which propose a "
        f"pair at Jaccard {cfg_near.threshold} with probability {p_ds:.2f} (so it misses pairs just above the "
        f"threshold) and does not verify (so it merges pairs below it); jielong's {cfg_near.bands} x {rows} "
        f"bands propose it with probability {p_j:.2f} and every candidate is verified (candidate pairs: {pairs}). So \"precision/recall of "
        "jielong vs datasketch\" measures datasketch as much as jielong.",
        "- The speed ratio is rensa's batched MinHash and NumPy banding against datasketch's per-document "
        "MinHash and dict-based LSH; both arms use one core (CPU s ≈ wall s).",
        "- The jielong arm is the pipeline's code path: the script stops unless its duplicates are exactly the "
        "dedup stage's `near_duplicate` rejections on the same documents with `dedup.exact=false`.",
        "- 2-process speedups are bounded by the shard layout — one job per ingest Parquet file of at most "
        "2,000 documents: " + ", ".join(f"{c} {n}" for c, n in shards.items())
        + " files — and, for dedup, by its serial `decide` step.",
    ])


def load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def write_results(body: str, load_before: str, load_after: str) -> None:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    write_section("bench_data", "\n".join([
        "## bench_data: clean and dedup throughput, near-duplicate detection vs datasketch", "",
        f"- Date: {date}", f"- Machine: {machine()}",
        "- Command (repository root): `.venv/bin/python bench/bench_data.py`",
        "- Config: `tiny` preset, overriding only `workspace` and `ingest.sources` "
        "(WikiText-2 test+valid and TinyShakespeare ingested with `text_unit: paragraph`)",
        f"- Load average (1/5/15 min) before: {load_before}; after: {load_after} (the machine is shared: "
        "see the *other procs' CPU* column)",
        "- What is measured: see the docstring of bench/bench_data.py", "", body,
    ]))


def main() -> None:
    load_before = load()
    log(f"load average before: {load_before}")
    shutil.rmtree(OUT, ignore_errors=True)
    pool = ProcessPoolExecutor(2)
    list(pool.map(abs, [0, 0]))  # start the workers before any timing
    WORKER_PIDS.extend(pool._processes)  # noqa: SLF001 (to subtract their CPU from the machine's)
    mappers = {"1 proc": run_sequentially, "2 proc": lambda fn, jobs: list(pool.map(fn, jobs))}
    stages, near, shards = {}, {}, {}
    for corpus, overrides in CORPORA.items():
        cfg = load_config("tiny", [f"workspace={OUT / corpus}", *overrides])
        log(f"{corpus}: ingest")
        ingested, _, _ = run_stage(ingest.STAGE, cfg, {}, run_sequentially)
        shards[corpus] = len(ingested.files("kept"))
        log(f"{corpus}: clean x{REPEATS} x2")
        clean_row = time_stage(clean.STAGE, cfg, {"ingest": ingested}, mappers, f"{corpus}/clean")
        log(f"{corpus}: dedup x{REPEATS} x2")
        dedup_row = time_stage(dedup.STAGE, cfg, {"clean": clean_row["artifact"]}, mappers, f"{corpus}/dedup")
        stages[corpus] = {"clean": clean_row, "dedup": dedup_row}
        log(f"{corpus}: near duplicates, jielong vs datasketch x{REPEATS}")
        near[corpus] = compare_near(clean_row["artifact"], cfg.dedup.near, f"{corpus}/near")
        check_same_as_stage(corpus, overrides, clean_row["artifact"], near[corpus]["j_ids"])
    pool.shutdown()
    body = tables(stages, near) + "\n\n" + notes(near, shards, cfg.dedup.near)
    print(body)
    write_results(body, load_before, load())


if __name__ == "__main__":
    main()
