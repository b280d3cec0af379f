"""GPU training throughput: tokens/s and MFU of the model presets, on one GPU and through torchrun DDP.

Needs only torch, transformers and this repository's models/ package: no Prefect, MLflow, pydantic
or tasks/ (it runs on a bare GPU machine with a copy of the repository).

    python bench/bench_gpu.py --out gpu.json                  # a CUDA machine; about a minute on one H100 (estimated)
    python bench/bench_gpu.py --device cpu --steps 2 --warmup 1 --presets tiny --out cpu.json   # the code path

For each preset (models/presets.py; default tiny, small and base), a freshly initialised model (seed
0, SDPA attention, bf16 autocast on CUDA) is trained by jielong's own loop, `models.train.train()`, on
random tokens (a fixed seed): --warmup steps, then --steps timed steps, each step a batch of about
--batch-tokens tokens at the preset's context length. tokens/s is over the timed steps (the loop
synchronises every step: it reads the loss). MFU = tokens/s x FLOPs per token (models/flops.py:
6N + 12·L·d·T) / peak, against two peaks: the dense bf16 matmul rate measured on the device
(models/flops.py, what the pipeline reports) and the vendor's dense bf16 figure where the GPU is
known (H100 SXM/H200 989 TFLOP/s, H100 PCIe 756, H100 NVL 835, A100 312).

Then the same through `torchrun --standalone --nproc-per-node=N` (N = the GPUs; NCCL; gloo on CPU)
with models/parallel.py's DDP, each process keeping the single-GPU batch (global batch x N), so
"per device" tokens/s compared with the single-GPU row is DDP's scaling efficiency.

Prints a Markdown table; writes the results as JSON to --out (and with --record, bench/RESULTS.md's
section). A run's JSON from another machine goes into bench/RESULTS.md with
`python bench/bench_gpu.py --record-from gpu.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jielong.models.flops import flops_per_token, peak_flops  # noqa: E402
from jielong.models.presets import PRESETS, build_model, count_parameters, model_config  # noqa: E402
from jielong.models.train import resolve_precision, train  # noqa: E402

DENSE_BF16_PEAK = [  # (substring of torch.cuda.get_device_name(), FLOP/s), first match wins
    ("H200", 989.4e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("A100", 312e12),
]


class RandomBatches:
    """Uniformly random tokens, a pure function of (seed, step, micro) as jielong's batches are."""

    def __init__(self, vocab: int, context: int, rows: int, seed: int):
        self.vocab, self.context, self.rows, self.seed = vocab, context, rows, seed

    def get(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 64 + micro)
        tokens = torch.randint(self.vocab, (self.rows, self.context + 1), generator=generator)
        return {"input_ids": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()}

    def validation(self) -> list[dict[str, torch.Tensor]]:
        return []


def spec_peak(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for part, peak in DENSE_BF16_PEAK if part in name), None)


def settings(args, rows: int) -> SimpleNamespace:
    total = args.warmup + args.steps
    return SimpleNamespace(
        steps=total, batch_size=rows, grad_accum=1, lr=3e-4, min_lr_ratio=0.1, warmup_steps=0, weight_decay=0.1,
        beta1=0.9, beta2=0.95, grad_clip=1.0, log_every=1, eval_every=total, eval_batches=1,
        checkpoint_every=10**9, precision=args.precision, device=args.device, compile=args.compile, seed=0,
    )


def bench_preset(preset: str, args, parallel, scratch: Path) -> dict:
    """One preset trained for warmup + steps steps; throughput of the timed steps."""
    spec = PRESETS[preset]
    context, world = spec["context_length"], parallel.world_size if parallel else 1
    rows = max(1, round(args.batch_tokens / context)) * world  # each process keeps the single-device batch
    model = build_model(model_config(preset, spec["vocab_size"], 0, 0, 1, context), seed=0)
    params = count_parameters(model)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    points: list = []
    mode = "ddp" if parallel else "single"
    report = train(model, RandomBatches(spec["vocab_size"], context, rows, seed=0), settings(args, rows),
                   scratch / f"checkpoints-{preset}-{mode}", points.extend, "bench", scratch / "peak.json",
                   desc=f"{preset} {mode}", parallel=parallel)
    tokens_per_step = rows * context
    step_seconds = [tokens_per_step / value for name, value, step in points
                    if name == "bench/tokens_per_s" and step > args.warmup]
    tokens_per_s = tokens_per_step * len(step_seconds) / sum(step_seconds)
    per_token = flops_per_token(params, model.config.num_hidden_layers, model.config.hidden_size, context)
    vendor = spec_peak(args.device)
    main_process = parallel is None or parallel.is_main
    dtype = torch.bfloat16 if report.precision == "bf16" else torch.float32
    # what train() measured and cached (rank 0 measures; other ranks' rows are not reported)
    measured_peak = peak_flops(scratch / "peak.json", args.device, dtype) if main_process else float("nan")
    return {
        "preset": preset, "mode": mode, "devices": world, "parameters": params, "context": context,
        "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / world,
        "step_ms": 1000 * sum(step_seconds) / len(step_seconds), "timed_steps": len(step_seconds),
        "mfu_measured_peak": tokens_per_s * per_token / (measured_peak * world),
        "mfu_vendor_peak": tokens_per_s * per_token / (vendor * world) if vendor else None,
        "measured_peak_flops": measured_peak, "vendor_peak_flops": vendor, "precision": report.precision,
        "final_loss": report.final_train_loss,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
    }


def run_all(args, parallel, scratch: Path) -> list[dict]:
    return [bench_preset(preset, args, parallel, scratch) for preset in args.presets]


def run_ddp(args, scratch: Path) -> list[dict]:
    """This script's --worker mode under torchrun, one process per device; rank 0 writes the rows."""
    out = scratch / "ddp.json"
    forwarded = ["--device", args.device, "--precision", args.precision, "--steps", str(args.steps),
                 "--warmup", str(args.warmup), "--batch-tokens", str(args.batch_tokens), "--presets", *args.presets,
                 "--scratch", str(scratch), "--out", str(out), *(["--compile"] if args.compile else [])]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               str(Path(__file__).resolve()), "--worker", *forwarded]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the DDP run failed (torchrun exit status {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return json.loads(out.read_text())


def worker(args) -> None:
    from jielong.models.distributed import start_process_group
    from jielong.models.parallel import DDPProcesses
    import torch.distributed as dist

    start_process_group("nccl" if args.device == "cuda" else "gloo", args.device)
    try:
        parallel = DDPProcesses(args.device)
        rows = run_all(args, parallel, Path(args.scratch))
        if parallel.is_main:
            Path(args.out).write_text(json.dumps(rows))
        parallel.barrier()
    finally:
        dist.destroy_process_group()


def markdown(rows: list[dict]) -> str:
    lines = ["| preset | mode | devices | parameters | context | tokens/step | tokens/s | tokens/s per device | ms/step "
             "| MFU (measured peak) | MFU (vendor peak) | peak memory GB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        vendor = f"{r['mfu_vendor_peak']:.1%}" if r["mfu_vendor_peak"] is not None else "-"
        memory = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        lines.append(f"| {r['preset']} | {r['mode']} | {r['devices']} | {r['parameters'] / 1e6:.1f} M | {r['context']} "
                     f"| {r['tokens_per_step']:,} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_device']:,.0f} "
                     f"| {r['step_ms']:.1f} | {r['mfu_measured_peak']:.1%} | {vendor} | {memory} |")
    return "\n".join(lines)


def record(result: dict) -> None:
    """bench/RESULTS.md's section for this benchmark, from a run's JSON."""
    from results import write_section

    m, a, rows = result["machine"], result["settings"], result["results"]
    where = f"{m.get('gpu', m.get('cpu'))} x {m.get('gpus', 1)}" if m["device"] == "cuda" else f"CPU ({m.get('cpu')})"
    peaks = [f"{name} {rows[0][key] / 1e12:.3g} TFLOP/s" for key, name in
             (("measured_peak_flops", "measured dense matmul"), ("vendor_peak_flops", "vendor dense")) if rows and rows[0][key]]
    body = f"""## GPU training throughput (bench/bench_gpu.py)

Measured {m['when']} on {where}: torch {m['torch']}, transformers {m['transformers']}, {a['precision']},
SDPA attention, jielong's training loop on random tokens; {a['steps']} timed steps after {a['warmup']} warm-up
steps (untimed), about {a['batch_tokens']:,} tokens per step and device; DDP through torchrun with each device keeping
the one-device batch. MFU = tokens/s x (6N + 12·L·d·T) / peak ({'; '.join(peaks) or 'no peak'}). Whole run
{result['seconds']:.0f} s.

{markdown(rows)}
"""
    write_section("bench_gpu", body)


def machine(args) -> dict:
    import transformers

    info = {"host": platform.node(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": args.device, "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if args.device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def parse(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 autocast on CUDA (and bf16-capable CPUs), as the pipeline")
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["tiny", "small", "base"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per preset")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (kernel selection, allocator)")
    parser.add_argument("--batch-tokens", type=int, default=65536, help="tokens per step and device")
    parser.add_argument("--nproc", type=int, default=None, help="DDP processes (default: every GPU; 2 on CPU; 0: no DDP)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (slower to start)")
    parser.add_argument("--out", type=Path, help="JSON results (needed to run)")
    parser.add_argument("--record", action="store_true", help="also write the table into bench/RESULTS.md")
    parser.add_argument("--record-from", type=Path, help="write bench/RESULTS.md's section from a run's JSON, then stop")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.record_from:
        return args
    if args.out is None:
        parser.error("--out is required")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "bench_gpu: --device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False); "
                       "run it on a GPU machine, or check the path with --device cpu\n")
    if args.nproc is None:
        args.nproc = torch.cuda.device_count() if args.device == "cuda" else 2
    args.precision = resolve_precision(args.precision, args.device)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.record_from:
        record(json.loads(args.record_from.read_text()))
        return
    if args.worker:
        worker(args)
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        rows = run_all(args, None, Path(scratch))
        if args.nproc > 0:
            rows += run_ddp(args, Path(scratch))
    skip = ("worker", "scratch", "out", "record", "record_from")
    result = {"machine": machine(args), "settings": {k: v for k, v in vars(args).items() if k not in skip},
              "results": rows, "seconds": time.perf_counter() - started}
    args.out.write_text(json.dumps(result, indent=2, default=str))
    if args.record:
        record(result)
    print(markdown(rows))
    print(f"\n{result['machine']} in {result['seconds']:.0f} s; JSON: {args.out}")


if __name__ == "__main__":
    main()
