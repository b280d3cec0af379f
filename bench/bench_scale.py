"""Data-stage scaling: ingest, clean and dedup on a corpus of about 1 GB with 1 and 2 workers, under
the process runner and on a loopback Dask cluster; time per stage, throughput, speed-up, peak memory.

Run from the repository root:

    .venv/bin/python bench/bench_scale.py                 # the benchmark: --size-mb 1100 (1.1 GB > 1 GiB)
    .venv/bin/python bench/bench_scale.py --size-mb 50    # a small validation run, labelled as such

The full run took 77 minutes on 2 quiet cores (2026-11-27: clean about 1.4 MB/s and dedup about
1.3 MB/s per worker; ingest and corpus making are a minute each), a 40 MB run takes about 4 minutes;
`--runners dask` halves either. Also `make bench-scale` (ARGS='--size-mb 40'). Scratch output (the corpus, workspaces, logs) goes to
--out (default /tmp/jielong-bench-scale); the corpus is reused while its parameters are unchanged.

The corpus (one JSON-lines file, `{"text": ...}` per line, reproducible from --seed):
- Word streams of the real corpora in ../shared/datasets: WikiText-2 test+valid (article text;
  headings and `<unk>` dropped, `@-@`-style tokens joined), TinyShakespeare (speeches, speaker names
  dropped) and the mr-polarity review snippets — about 0.9 M words in all.
- Per corpus, a word-bigram walk: each next word is drawn with the frequency with which it follows the
  current word in that corpus (NumPy, PCG64 seeded with --seed; 4,096 walks at a time, a word that is
  never followed restarts at a random word). A document takes the next n words of one corpus's walk
  (corpus chosen in proportion to its words; n lognormal, median 120, clipped to 15..4,000), with a
  line break after a sentence end with probability 0.3.
- 3% of documents are exact copies of one of the previous 10,000 (half of those upper-cased with
  doubled spaces: still exact duplicates after dedup's normalisation), 3% near copies (one word in
  100, at least one, replaced by a random word of the same corpus: word 5-gram Jaccard about 0.9 for
  long documents, below dedup's 0.8 for short ones).
- Why not recombined verbatim sentences: 1 GB is about 170 M words, so each source sentence would
  recur about 200 times and decontamination (a 13-word overlap with any validation or test document)
  would reject nearly every training document. The walk keeps each corpus's vocabulary, word
  frequencies and local word order, while 13-word sequences rarely recur, so dedup removes mostly the
  injected duplicates: realistic work for all its phases.

What is measured, for each runner (process, dask) and worker count (1, 2), on a fresh workspace:
`jielong run --config tiny --only ingest,clean,dedup` (the real command, a subprocess; the corpus as
`{kind: files, path: corpus.jsonl}`, split by ingest into 16 byte ranges: ingest.job_bytes = 1/16 of
the corpus, about its default 64 MiB at 1.1 GB),
with runner.kind / runner.workers (and runner.dask_address: a `dask scheduler` and N
`dask worker --nthreads 1 --no-nanny` processes on 127.0.0.1, started for each configuration and
warmed before timing — the modules the shard tasks use imported — as the workers of a cluster that
outlives one command are; the process runner's pool starts with each command, and its start-up,
seconds per worker, is part of ingest's time). One shared MLflow store and the local Prefect API, started before
timing. Per stage: the manifest's `timings.seconds` (the span of stage.run, including its phases in
the flow process: ingest's planning, dedup's decide and evaluation index), docs/s and MB/s of its
input (MB = 10^6 bytes of UTF-8 text). Data stages = ingest + clean + dedup; speed-up = 1-worker
seconds / 2-worker seconds of the same runner. Peak RSS (VmHWM, sampled every 0.5 s) of every process
of the run: the flow process, the workers (Dask workers; for the process runner, the N children of
the flow process that used the most CPU), the scheduler. Every configuration must produce the same
artifacts (counts and Parquet files, byte for byte), or the script stops. The machine may be shared:
the CPU other processes took during each run is reported.

Rewrites the `bench_scale` section of bench/RESULTS.md (between its markers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results import machine_cpu, write_section  # noqa: E402

DATASETS = (ROOT / ".." / "shared" / "datasets").resolve()
STAGES = ["ingest", "clean", "dedup"]
FULL_SIZE_MB = 1100
SEED = 20261127
LANES = 4096
EXACT_COPIES, NEAR_COPIES, RECENT = 0.03, 0.03, 10_000
TARGET_SPEEDUP = 1.7


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the corpus


def wikitext_words() -> list[str]:
    words = []
    for name in ("test.txt", "valid.txt"):
        for line in (DATASETS / "wikitext-2" / name).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("="):
                continue
            line = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
            words += [w for w in line.split() if w != "<unk>"]
    return words


def shakespeare_words() -> list[str]:
    lines = (DATASETS / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").splitlines()
    return [w for line in lines if line.strip() and not line.rstrip().endswith(":") for w in line.split()]


def polarity_words() -> list[str]:
    return [w for name in ("rt-polarity.pos", "rt-polarity.neg")
            for w in (DATASETS / "mr-polarity" / name).read_text(encoding="utf-8").split()]


class BigramWalk:
    """Words of one corpus, drawn by walking its word-bigram counts (LANES walks at a time)."""

    def __init__(self, words: list[str], rng: np.random.Generator):
        self.vocab, ids = np.unique(np.array(words, dtype=object), return_inverse=True)
        ids = ids.astype(np.int64)
        order = np.argsort(ids[:-1], kind="stable")
        self.successors = ids[1:][order]
        self.counts = np.bincount(ids[:-1], minlength=len(self.vocab))
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.rng = rng
        self.state = rng.integers(len(self.vocab), size=LANES)
        self.buffer = np.empty(0, np.int64)
        # each word followed by a space, or (after a sentence end) by a line break
        self.spelled = np.array([w + " " for w in self.vocab] + [w + "\n" for w in self.vocab], dtype=object)
        self.sentence_end = np.array([w[-1:] in ".!?" for w in self.vocab])

    def _refill(self, steps: int = 1024) -> None:
        out = np.empty((steps, LANES), np.int64)
        state = self.state
        for step in range(steps):
            out[step] = state
            count = self.counts[state]
            draw = (self.rng.random(LANES) * count).astype(np.int64)
            restart = self.rng.integers(len(self.vocab), size=LANES)
            state = np.where(count > 0, self.successors[np.minimum(self.starts[state] + draw, len(self.successors) - 1)], restart)
        self.state = state
        self.buffer = np.concatenate([self.buffer, out.T.ravel()])  # each walk stays contiguous

    def text(self, n: int) -> str:
        """The next n words, a line break after a sentence end with probability 0.3."""
        while len(self.buffer) < n:
            self._refill()
        ids, self.buffer = self.buffer[:n], self.buffer[n:]
        newline = (self.rng.random(n) < 0.3) & self.sentence_end[ids]
        return "".join(self.spelled[ids + newline * len(self.vocab)].tolist()).rstrip()

    def random_word(self) -> str:
        return self.vocab[self.rng.integers(len(self.vocab))]


def near_copy(text: str, walk: BigramWalk, rng: np.random.Generator) -> str:
    words = text.split(" ")
    for position in rng.choice(len(words), size=max(1, len(words) // 100), replace=False):
        words[position] = walk.random_word()
    return " ".join(words)


def exact_copy(text: str, rng: np.random.Generator) -> str:
    return text.upper().replace(" ", "  ") if rng.random() < 0.5 else text


def make_corpus(folder: Path, size_mb: int, seed: int) -> dict:
    """corpus.jsonl of at least size_mb MB (see the module docstring), reused when already made."""
    stamp = {"size_mb": size_mb, "seed": seed, "version": 1}
    path, info_path = folder / "corpus.jsonl", folder / "corpus.json"
    if info_path.exists() and json.loads(info_path.read_text()).get("stamp") == stamp and path.exists():
        return json.loads(info_path.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    rng = np.random.Generator(np.random.PCG64(seed))
    walks = [BigramWalk(words, rng) for words in (wikitext_words(), shakespeare_words(), polarity_words())]
    weights = np.array([len(w.successors) for w in walks], dtype=float)
    weights /= weights.sum()
    recent: list[tuple[str, int]] = []
    documents = written = 0
    kinds = {"exact": 0, "near": 0}
    with open(path, "w", encoding="utf-8") as out:
        while written < size_mb * 1_000_000:
            roll = rng.random()
            if recent and roll < EXACT_COPIES:
                text = exact_copy(recent[rng.integers(len(recent))][0], rng)
                kinds["exact"] += 1
            elif recent and roll < EXACT_COPIES + NEAR_COPIES:
                original, source = recent[rng.integers(len(recent))]
                text = near_copy(original, walks[source], rng)
                kinds["near"] += 1
            else:
                source = int(rng.choice(len(walks), p=weights))
                n = int(np.clip(rng.lognormal(np.log(120), 0.8), 15, 4000))
                text = walks[source].text(n)
                if len(recent) < RECENT:
                    recent.append((text, source))
                else:  # a ring: the oldest is replaced
                    recent[documents % RECENT] = (text, source)
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            out.write(line)
            written += len(line.encode("utf-8"))
            documents += 1
    info = {"stamp": stamp, "path": str(path), "bytes": path.stat().st_size, "documents": documents, **kinds,
            "digest": _digest(path), "seconds": round(time.perf_counter() - started, 1)}
    info_path.write_text(json.dumps(info, indent=2))
    return info


def _digest(path: Path) -> str:
    from jielong.tasks.core.fingerprint import content_digest

    return content_digest(path)


# ---------------------------------------------------------------- a loopback Dask cluster


class LoopbackCluster:
    """`dask scheduler` and N `dask worker --nthreads 1 --no-nanny` processes on 127.0.0.1."""

    def __init__(self, workers: int, folder: Path, env: dict):
        folder.mkdir(parents=True, exist_ok=True)
        scheduler_file = folder / "scheduler.json"
        common = ["--no-dashboard", "--host", "127.0.0.1"]
        self.scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", "0", "--scheduler-file", str(scheduler_file), *common],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=open(folder / "scheduler.log", "w"))
        self.workers = [subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
             "--no-nanny", "--local-directory", str(folder / f"worker-{n}"), *common],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=open(folder / f"worker-{n}.log", "w")) for n in range(workers)]
        from distributed import Client

        deadline = time.monotonic() + 120
        while not scheduler_file.exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"the Dask scheduler did not start: see {folder / 'scheduler.log'}")
            time.sleep(0.1)
        with Client(scheduler_file=str(scheduler_file), timeout=60, set_as_default=False) as client:
            client.wait_for_workers(workers, timeout=120)
            self.address = client.scheduler.address
            # warm, as the workers of a cluster that outlives one command are: the shard tasks' modules imported
            client.run(exec, "import prefect.task_engine, jielong.flows.pipeline, jielong.tasks.ingest, "
                             "jielong.tasks.clean, jielong.tasks.dedup")

    def stop(self) -> None:
        for process in [*self.workers, self.scheduler]:
            process.terminate()
        for process in [*self.workers, self.scheduler]:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


# ---------------------------------------------------------------- watching a run's processes


def _peak_rss(pid: int) -> int:
    """VmHWM: the most resident memory the process has held, in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Monitor:
    """Samples, every 0.5 s, the peak RSS and CPU seconds of a process tree and of other named processes."""

    def __init__(self, named: dict[int, str]):
        import psutil

        self.psutil = psutil
        self.named = dict(named)  # pid -> role
        self.root: int | None = None
        self.seen: dict[int, dict] = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "Monitor":
        self._sample()  # the named processes already run: their CPU until now is not this run's
        self.baseline = {pid: entry["cpu"] for pid, entry in self.seen.items()}
        self.machine_cpu = machine_cpu()
        self.started = time.perf_counter()
        self.thread.start()
        return self

    def watch(self, pid: int) -> None:
        self.root = pid
        self.named[pid] = "flow process"

    def _pids(self) -> dict[int, int | None]:
        """pid -> parent pid for the root's tree and the named processes."""
        pids: dict[int, int | None] = {pid: None for pid in self.named}
        if self.root is not None:
            try:
                for child in self.psutil.Process(self.root).children(recursive=True):
                    pids[child.pid] = child.ppid()
            except self.psutil.Error:
                pass
        return pids

    def _sample(self) -> None:
        for pid, parent in self._pids().items():
            try:
                times = self.psutil.Process(pid).cpu_times()
            except self.psutil.Error:
                continue
            entry = self.seen.setdefault(pid, {"parent": parent, "peak": 0, "cpu": 0.0})
            entry["peak"] = max(entry["peak"], _peak_rss(pid))
            entry["cpu"] = times.user + times.system

    def _loop(self) -> None:
        while not self.stop_event.wait(0.5):
            self._sample()

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join()
        self.wall = time.perf_counter() - self.started
        self.machine_cpu = machine_cpu() - self.machine_cpu

    def roles(self, pool_workers: int) -> dict[str, list[dict]]:
        """Processes by role; a process runner's `pool_workers` are the flow process's children that used the
        most CPU (the others: the MLflow tracking child, git)."""
        out: dict[str, list[dict]] = {}
        children = sorted((pid for pid, e in self.seen.items() if e["parent"] == self.root and pid not in self.named),
                          key=lambda pid: -self.seen[pid]["cpu"])
        for pid, entry in self.seen.items():
            role = self.named.get(pid) or ("worker" if pid in children[:pool_workers] else "helper")
            out.setdefault(role, []).append(entry)
        return out

    def own_cpu(self) -> float:
        """CPU seconds this run's processes used while it ran (a process that ended between two samples
        loses its last half second: others' CPU is overestimated by that much)."""
        return sum(e["cpu"] - self.baseline.get(pid, 0.0) for pid, e in self.seen.items())


# ---------------------------------------------------------------- one configuration


def job_bytes(corpus_bytes: int) -> int:
    """Ingest's byte ranges: a sixteenth of the corpus (about the default 64 MiB at 1.1 GB), so a small
    validation run spreads over the workers too."""
    return max(1 << 20, corpus_bytes // 16)


def run_config(corpus: Path, out: Path, runner: str, workers: int, env: dict, api_pid: int | None) -> dict:
    workspace = out / f"ws-{runner}-{workers}"
    shutil.rmtree(workspace, ignore_errors=True)
    sets = [f"workspace={workspace}", f"ingest.sources=[{{kind: files, path: '{corpus}'}}]",
            f"ingest.job_bytes={job_bytes(corpus.stat().st_size)}", f"runner.kind={runner}",
            f"runner.workers={workers}", f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}"]
    cluster = LoopbackCluster(workers, out / f"cluster-{runner}-{workers}", env) if runner == "dask" else None
    named = {api_pid: "prefect api"} if api_pid else {}
    if cluster:
        sets.append(f"runner.dask_address={cluster.address}")
        named.update({p.pid: "worker" for p in cluster.workers})
        named[cluster.scheduler.pid] = "scheduler"
    # the command as the `jielong` script runs it
    command = [sys.executable, "-c", "from jielong.flows.cli import main; main()", "run", "--config", "tiny", "--only", ",".join(STAGES),
               *[arg for value in sets for arg in ("--set", value)]]
    log_path = out / f"run-{runner}-{workers}.log"
    try:
        with Monitor(named) as monitor, open(log_path, "w") as log_file:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
            monitor.watch(process.pid)
            code = process.wait()
    finally:
        if cluster:
            cluster.stop()
    if code != 0:
        raise SystemExit(f"{runner} x{workers} failed (exit {code}): see {log_path}")
    manifests = {stage: json.loads(next((workspace / stage).glob("*/manifest.json")).read_text()) for stage in STAGES}
    roles = monitor.roles(0 if cluster else workers)
    others = (monitor.machine_cpu - monitor.own_cpu()) / monitor.wall
    return {"runner": runner, "workers": workers, "wall": monitor.wall, "manifests": manifests, "others": max(others, 0.0),
            "peak": {role: sorted((e["peak"] for e in entries), reverse=True) for role, entries in roles.items()},
            "workspace": workspace}


def check_same_outputs(runs: list[dict]) -> None:
    """Every configuration wrote the same artifacts: counts and Parquet files (names and sizes)."""
    def signature(run: dict) -> dict:
        return {stage: (m["key"], m["counts"], [(f["path"], f["bytes"]) for f in m["files"] if f["path"].endswith(".parquet")])
                for stage, m in run["manifests"].items()}

    first = signature(runs[0])
    for run in runs[1:]:
        if signature(run) != first:
            raise SystemExit(f"{run['runner']} x{run['workers']} wrote other artifacts than {runs[0]['runner']} x{runs[0]['workers']}")
        for stage, manifest in run["manifests"].items():
            for entry in manifest["files"]:
                if entry["path"].endswith(".parquet"):
                    a = (runs[0]["workspace"] / stage / manifest["key"] / entry["path"]).read_bytes()
                    b = (run["workspace"] / stage / manifest["key"] / entry["path"]).read_bytes()
                    if a != b:
                        raise SystemExit(f"{stage}/{entry['path']} differs between configurations")


# ---------------------------------------------------------------- report


def stage_seconds(run: dict, stage: str) -> float:
    return run["manifests"][stage]["timings"]["seconds"]


def data_seconds(run: dict) -> float:
    return sum(stage_seconds(run, s) for s in STAGES)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def tables(runs: list[dict], corpus: dict, size_mb: int) -> str:
    by = {(r["runner"], r["workers"]): r for r in runs}
    out = ["### Time per stage (s) and throughput of its input", "",
           "| runner | workers | stage | docs in | MB in | seconds | docs/s | MB/s | speed-up vs 1 worker |",
           "|---|--:|---|--:|--:|--:|--:|--:|--:|"]
    for run in runs:
        for stage in STAGES:
            counts = run["manifests"][stage]["counts"]
            seconds = stage_seconds(run, stage)
            base = by.get((run["runner"], 1))
            speedup = f"{stage_seconds(base, stage) / seconds:.2f}x" if base and run["workers"] > 1 else ""
            out.append(f"| {run['runner']} | {run['workers']} | {stage} | {counts['documents_in']:,} | {counts['bytes_in'] / 1e6:,.1f} | "
                       f"{seconds:,.1f} | {counts['documents_in'] / seconds:,.0f} | {counts['bytes_in'] / 1e6 / seconds:.2f} | {speedup} |")
    out += ["", "### Data stages (ingest + clean + dedup)", "",
            f"| runner | workers | stage seconds | command wall s | speed-up (stage s) | target >= {TARGET_SPEEDUP}x | other procs' CPU (cores) |",
            "|---|--:|--:|--:|--:|---|--:|"]
    for run in runs:
        base = by.get((run["runner"], 1))
        speedup = data_seconds(base) / data_seconds(run) if base and run["workers"] > 1 else None
        verdict = "" if speedup is None else ("met" if speedup >= TARGET_SPEEDUP else "**not met**")
        out.append(f"| {run['runner']} | {run['workers']} | {data_seconds(run):,.1f} | {run['wall']:,.1f} | "
                   f"{'' if speedup is None else f'{speedup:.2f}x'} | {verdict} | {run['others']:.2f} |")
    out += ["", "### Where the time goes: phases (s); plan, decide and eval index run in the flow process, serially", "",
            "| runner | workers | ingest plan | ingest read | clean | dedup signatures | dedup decide | dedup eval index | dedup write |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for run in runs:
        ing, ded = run["manifests"]["ingest"]["timings"], run["manifests"]["dedup"]["timings"]
        out.append(f"| {run['runner']} | {run['workers']} | {ing['plan_seconds']:.1f} | {ing['read_seconds']:.1f} | "
                   f"{stage_seconds(run, 'clean'):.1f} | {ded['signatures_seconds']:.1f} | {ded['decide_seconds']:.1f} | "
                   f"{ded['eval_index_seconds']:.1f} | {ded['write_seconds']:.1f} |")
    out += ["", "### Peak resident memory (GiB, VmHWM)", "",
            "| runner | workers | each worker | flow process | scheduler | Prefect API |", "|---|--:|---|--:|--:|--:|"]
    for run in runs:
        peak = run["peak"]
        one = lambda role: gib(peak[role][0]) if peak.get(role) else "-"  # noqa: E731
        out.append(f"| {run['runner']} | {run['workers']} | {', '.join(gib(p) for p in peak.get('worker', []))} | "
                   f"{one('flow process')} | {one('scheduler')} | {one('prefect api')} |")
    busiest = max(run["others"] for run in runs)
    if busiest > 0.25:
        out += ["", f"⚠ Other processes took up to {busiest:.2f} cores during these runs: a second worker then finds "
                "less than a core free, so the speed-ups above understate what two free cores give."]
    dedup = runs[0]["manifests"]["dedup"]["counts"]
    out += ["", f"Outputs: identical in every configuration (checked: counts and Parquet bytes). Kept after dedup "
            f"{dedup['documents_out']:,} of {dedup['documents_in']:,}; removed "
            + ", ".join(f"{reason} {n:,}" for reason, n in dedup["rejected_by_reason"].items())
            + f". Clean kept {runs[0]['manifests']['clean']['counts']['documents_out']:,} of "
              f"{runs[0]['manifests']['clean']['counts']['documents_in']:,}."]
    return "\n".join(out)


def machine() -> str:
    import platform

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", lscpu)
    mem = re.search(r"MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text())
    return (f"{os.cpu_count()} vCPU {model.group(1).strip() if model else platform.processor()}, "
            f"{int(mem.group(1)) / 2**20:.1f} GiB RAM; Python {platform.python_version()}, {platform.system()} {platform.release()}")


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("prefect", "prefect-dask", "distributed"))


def git_commit() -> str:
    from jielong.tasks.core.tracking import git_commit as commit

    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    return commit()[:12] + (" (with uncommitted changes)" if dirty else "")


def write_results(body: str, corpus: dict, size_mb: int, argv: list[str], loads: tuple[str, str]) -> None:
    full = size_mb >= 1000
    label = ("## bench_scale: data stages on about 1 GB, 1 and 2 workers, process runner and loopback Dask cluster" if full else
             f"## bench_scale: VALIDATION RUN at {size_mb} MB (not the 1 GB benchmark: run `.venv/bin/python bench/bench_scale.py` for it)")
    write_section("bench_scale", "\n".join([
        label, "",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}", f"- Machine: {machine()}; {versions()}",
        f"- Command (repository root): `.venv/bin/python bench/bench_scale.py{''.join(' ' + a for a in argv)}`; "
        f"code at commit {git_commit()}",
        f"- Corpus: {corpus['bytes'] / 1e6:,.1f} MB of JSON lines, {corpus['documents']:,} documents "
        f"({corpus['exact']:,} exact and {corpus['near']:,} near copies injected), xxh3-128 {corpus['digest']}, "
        f"made in {corpus['seconds']:.0f} s by bigram walks over the words of ../shared/datasets (see the docstring of bench/bench_scale.py)",
        f"- Config: `tiny` preset; overridden: workspace, ingest.sources (the one corpus file), ingest.job_bytes "
        f"({job_bytes(corpus['bytes']):,}: 16 byte ranges), runner.kind, runner.workers, "
        "runner.dask_address, mlflow.tracking_uri (one store for all runs)",
        f"- Load average (1/5/15 min) before: {loads[0]}; after: {loads[1]} (the machine may be shared: see *other procs' CPU*)",
        "- What is measured: see the docstring of bench/bench_scale.py", "", body]))


# ---------------------------------------------------------------- main


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=FULL_SIZE_MB, help="corpus size in MB (10^6 bytes); default %(default)s")
    parser.add_argument("--runners", default="process,dask", help="comma-separated: process, dask")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (speed-ups are against 1)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=Path("/tmp/jielong-bench-scale"), help="scratch folder (corpus, workspaces, logs)")
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave bench/RESULTS.md alone")
    return parser.parse_args()


def main() -> None:
    args = parse()
    load_before = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"corpus: {args.size_mb} MB in {args.out / 'corpus'}")
    corpus = make_corpus(args.out / "corpus", args.size_mb, args.seed)
    log(f"  {corpus['bytes'] / 1e6:,.1f} MB, {corpus['documents']:,} documents")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    from jielong.flows import prefect_api

    prefect_api.resolve_prefect_api()  # started (or found) before any timing; every run reuses it
    state = prefect_api.running()
    runs = []
    for runner in args.runners.split(","):
        for workers in map(int, args.workers.split(",")):
            log(f"{runner} x{workers}")
            run = run_config(Path(corpus["path"]), args.out, runner, workers, env, state["pid"] if state else None)
            log(f"  data stages {data_seconds(run):.1f} s ({', '.join(f'{s} {stage_seconds(run, s):.1f}' for s in STAGES)}), "
                f"wall {run['wall']:.1f} s")
            runs.append(run)
    check_same_outputs(runs)
    body = tables(runs, corpus, args.size_mb)
    print(body)
    if not args.no_write:
        argv = [a for a in sys.argv[1:]]
        write_results(body, corpus, args.size_mb, argv, (load_before, " / ".join(f"{x:.2f}" for x in os.getloadavg())))


if __name__ == "__main__":
    main()
