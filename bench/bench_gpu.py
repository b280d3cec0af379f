"""GPU training throughput: how close jielong's loop comes to the hardware's limit, and what the fused loss buys.

Needs only torch, transformers (numpy, matplotlib if there) and this repository's models/: no Prefect,
MLflow or pydantic (it runs on a bare GPU machine with a copy of the repository; `jielong` need not be
installed: without it the script links a temporary `jielong` package to this checkout's models/).

    python bench/bench_gpu.py                          # one CUDA GPU: the six arms, ~5 min on an H200 (estimated)
    python bench/bench_gpu.py --arms jielong-compile fused-compile --warmup 0 --steps 300   # loss curves
    python bench/bench_gpu.py --cpu-smoke              # the whole path on a CPU, a tiny model, a few steps

The arms (default: all six, in one process): a SmolLM2-135M-shaped Llama (vocab 49,152, d 576, 30 layers,
9 heads / 3 KV heads, tied embeddings), freshly initialised (seed 0), context 2048, 32 rows (65,536
tokens a step), bf16 autocast, SDPA, fused AdamW (lr 3e-4 constant, betas 0.9/0.95, weight decay 0.1 on
matrices), gradient clipping at 1.0, trained by

    plain-eager, plain-compile       a nanoGPT-style loop: the model's whole logits, F.cross_entropy in
                                     float32 (compile: torch.compile(model), the loss outside)
    jielong-eager, jielong-compile   models.train.train() with fused_loss off (the plain loss, as before)
    fused-eager, fused-compile       models.train.train() with fused_loss on (models/loss.py)

each for --warmup untimed steps, then --steps timed ones, on the same batches: windows of the bytes of
this Python's standard-library sources (tokens 0-255 of the 49,152: learnable text, so the loss curves
fall and can be compared; `--data random` for uniform tokens). Per arm: tokens/s over the timed steps,
MFU = tokens/s x (6N + 12·L·d·T) / peak against the measured peak (an 8192³ bf16 matmul in this
process, models/flops.py) and against NVIDIA's datasheet figure, peak memory
(torch.cuda.max_memory_allocated in GiB, reset between arms), wall time (compilation included) and the loss
of every step, with its largest difference from the first arm's. Writes bench_gpu.json (and
bench_gpu_curves.png with matplotlib) into $OUT if set, else bench/out/; prints a Markdown table.
An arm that fails is recorded with its error and the others still run; the exit status is then 1.
`--activation-budget 0.5` asks the compiler to keep fewer activations for the compiled arms (memory
against recomputation), a knob to measure, not one the pipeline sets.

The preset table of before: `--presets tiny small base [--compile] [--nproc N] --out gpu.json` trains
the model presets with jielong's loop (fused_loss auto) on one GPU, then through torchrun DDP with
every GPU, each process keeping the single-GPU batch ("per device" tokens/s against the single row is
DDP's scaling efficiency); `--device cpu` runs that path on a CPU (gloo), `--record` writes it into
bench/RESULTS.md, `--record-from gpu.json` does so from another machine's JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


def import_jielong() -> None:
    """jielong.models from this checkout: the installed package when it is this checkout's, else a
    temporary `jielong` package whose models/ and tasks/ are links to this checkout's."""
    try:
        import jielong.models
    except ImportError:
        shim = Path(tempfile.mkdtemp(prefix="bench-gpu-jielong-")) / "jielong"
        shim.mkdir()
        for name in ("models", "tasks"):
            (shim / name).symlink_to(ROOT / name, target_is_directory=True)
        sys.path.insert(0, str(shim.parent))
        import jielong.models
    found = Path(next(iter(jielong.models.__path__))).resolve()
    if found != (ROOT / "models").resolve():
        sys.exit(f"bench_gpu: `jielong` is installed from {found.parent}, not this checkout ({ROOT})")


import_jielong()
from jielong.models.flops import flops_per_token, matmul_size, peak_flops, vendor_peak  # noqa: E402
from jielong.models.presets import PRESETS, build_model, count_parameters, model_config  # noqa: E402
from jielong.models.train import resolve_precision, train  # noqa: E402

# SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json); `smoke`: a tiny one for --cpu-smoke
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, context=2048, rows=32),
    "smoke": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, context=64, rows=4),
}
ARMS = ["plain-eager", "plain-compile", "jielong-eager", "jielong-compile", "fused-eager", "fused-compile"]


# ---------------------------------------------------------------- the arms


def llama_config(shape: dict):
    from transformers import LlamaConfig

    dims = {k: v for k, v in shape.items() if k not in ("context", "rows")}
    return LlamaConfig(**dims, max_position_embeddings=shape["context"], tie_word_embeddings=True, rms_norm_eps=1e-5,
                       rope_theta=100000.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=None)


class TextBatches:
    """Windows of a byte stream as token ids, a pure function of (step, micro) as jielong's batches are."""

    def __init__(self, stream: torch.Tensor, context: int, rows: int, seed: int = 0):
        self.stream, self.context, self.rows, self.seed = stream, context, rows, seed

    def get(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 64 + micro)
        starts = torch.randint(len(self.stream) - self.context - 1, (self.rows,), generator=generator)
        tokens = torch.stack([self.stream[s:s + self.context + 1] for s in starts.tolist()]).long()
        return {"input_ids": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()}

    def validation(self) -> list[dict[str, torch.Tensor]]:
        return []


def text_stream(limit: int = 32 * 2**20) -> torch.Tensor:
    """The bytes of this Python's standard-library sources (sorted paths), up to `limit`."""
    import sysconfig

    chunks, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if size >= limit:
            break
        if "site-packages" not in path.parts:
            chunks.append(path.read_bytes())
            size += len(chunks[-1])
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8)


def plain_loop(model, batches, total: int, device: str, precision: str, compile_: bool, lr: float):
    """nanoGPT's loop: whole logits, float32 cross-entropy, fused AdamW with decay on matrices."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    forward = torch.compile(model) if compile_ else model
    losses, seconds = [], []
    for step in range(total):
        begin = time.perf_counter()
        batch = batches.get(step, 0)
        x, y = batch["input_ids"].to(device), batch["targets"].to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = forward(input_ids=x).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronises, as jielong's loop does
        seconds.append(time.perf_counter() - begin)
    return losses, seconds


def jielong_loop(model, batches, total: int, device: str, precision: str, compile_: bool, lr: float, fused: bool,
                 scratch: Path):
    """models.train.train() with the same optimizer settings (constant lr: min_lr_ratio 1, no warm-up)."""
    settings = SimpleNamespace(
        steps=total, batch_size=batches.rows, grad_accum=1, lr=lr, min_lr_ratio=1.0, warmup_steps=0, weight_decay=0.1,
        beta1=0.9, beta2=0.95, grad_clip=1.0, log_every=1, eval_every=total, eval_batches=1, checkpoint_every=10**9,
        precision=precision, device=device, compile=compile_, seed=0, fused_loss="on" if fused else "off")
    points: list = []
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        report = train(model, batches, settings, Path(folder) / "checkpoints", points.extend, "bench",
                       scratch / "peak.json", desc="fused" if fused else "jielong")
    assert report.loss == ("fused" if fused else "plain"), report.loss
    tokens = batches.rows * batches.context
    seconds = [tokens / value for name, value, _ in points if name == "bench/tokens_per_s"]
    return [loss for _, loss in report.curves["loss"]], seconds


def run_arm(arm: str, args, config, batches, peaks: dict, scratch: Path) -> dict:
    loop, mode = arm.split("-")
    cuda = args.device == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = build_model(config, seed=0).to(args.device)
    params = count_parameters(model)
    total = args.warmup + args.steps
    compile_ = mode == "compile"
    if loop == "plain":
        losses, seconds = plain_loop(model, batches, total, args.device, args.precision, compile_, args.lr)
    else:
        losses, seconds = jielong_loop(model, batches, total, args.device, args.precision, compile_, args.lr,
                                       loop == "fused", scratch)
    timed = seconds[args.warmup:]
    tokens_per_s = batches.rows * batches.context * len(timed) / sum(timed)
    achieved = tokens_per_s * flops_per_token(params, config.num_hidden_layers, config.hidden_size, batches.context)
    return {
        "arm": arm, "parameters": params, "tokens_per_step": batches.rows * batches.context, "timed_steps": len(timed),
        "tokens_per_s": tokens_per_s, "step_ms": 1000 * sum(timed) / len(timed),
        "mfu_measured_peak": achieved / peaks["measured"],
        "mfu_vendor_peak": achieved / peaks["vendor"] if peaks["vendor"] else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,  # GiB, as the anchor's
        "wall_s": time.perf_counter() - started, "first_steps_s": sum(seconds[:args.warmup]), "losses": losses,
    }


def free_memory() -> None:
    torch._dynamo.reset()  # compiled graphs hold on to their model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_arms(args) -> dict:
    shape = SHAPES["smoke" if args.cpu_smoke else "smollm2-135m"]
    context, rows = args.context or shape["context"], args.rows or shape["rows"]
    config = llama_config({**shape, "context": context})
    if args.data == "text":
        stream = text_stream()
    else:
        stream = torch.randint(config.vocab_size, (2**22,), generator=torch.Generator().manual_seed(0))
    batches = TextBatches(stream, context, rows)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if args.activation_budget is not None:
        from torch._functorch import config as functorch_config

        functorch_config.activation_memory_budget = args.activation_budget
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as folder:
        scratch = Path(folder)
        peaks = {"measured": peak_flops(scratch / "peak.json", args.device, dtype),  # train() reads the same cache
                 "vendor": vendor_peak(torch.cuda.get_device_name()) if args.device == "cuda" else None,
                 "matmul": matmul_size(args.device), "dtype": str(dtype)}
        for arm in args.arms:
            print(f"bench_gpu: {arm} ...", file=sys.stderr, flush=True)
            try:
                results.append(run_arm(arm, args, config, batches, peaks, scratch))
            except Exception as err:  # noqa: BLE001 - one arm failing (e.g. to compile) must not lose the others
                results.append({"arm": arm, "error": f"{type(err).__name__}: {err}"[:2000]})
                print(f"bench_gpu: {arm} failed: {err!r}"[:2000], file=sys.stderr, flush=True)
            free_memory()
    compare_curves(results)
    return {"shape": {**{k: v for k, v in shape.items() if k not in ("context", "rows")}, "context": context,
                      "rows": rows}, "data": args.data, "peaks": peaks, "arms": results}


def compare_curves(results: list[dict]) -> None:
    """Each arm's largest loss difference from the first arm that ran (same init, same batches)."""
    done = [r for r in results if "losses" in r]
    for r in done:
        r["curve_reference"] = done[0]["arm"]
        r["curve_max_abs_diff"] = max(abs(a - b) for a, b in zip(r["losses"], done[0]["losses"]))


def arms_markdown(result: dict) -> str:
    lines = ["| arm | tokens/s | ms/step | MFU (measured peak) | MFU (vendor peak) | peak memory GB | wall s "
             "| loss first → last | max Δ loss vs first arm |", "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in result["arms"]:
        if "error" in r:
            lines.append(f"| {r['arm']} | failed: {r['error'][:120]} | | | | | | | |")
            continue
        vendor = f"{r['mfu_vendor_peak']:.1%}" if r["mfu_vendor_peak"] is not None else "-"
        memory = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        lines.append(f"| {r['arm']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['mfu_measured_peak']:.1%} "
                     f"| {vendor} | {memory} | {r['wall_s']:.0f} | {r['losses'][0]:.4f} → {r['losses'][-1]:.4f} "
                     f"| {r['curve_max_abs_diff']:.2g} |")
    return "\n".join(lines)


def plot_curves(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    done = [r for r in result["arms"] if "losses" in r]
    if not done:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for r in done:
        steps = range(1, len(r["losses"]) + 1)
        top.plot(steps, r["losses"], label=r["arm"], linewidth=1)
        bottom.plot(steps, [a - b for a, b in zip(r["losses"], done[0]["losses"])], label=r["arm"], linewidth=1)
    top.set_ylabel("training loss (nats/token)")
    top.legend(fontsize=8)
    bottom.set_ylabel(f"minus {done[0]['arm']}")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- the presets table (and DDP)


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


def settings(args, rows: int) -> SimpleNamespace:
    total = args.warmup + args.steps
    return SimpleNamespace(
        steps=total, batch_size=rows, grad_accum=1, lr=3e-4, min_lr_ratio=0.1, warmup_steps=0, weight_decay=0.1,
        beta1=0.9, beta2=0.95, grad_clip=1.0, log_every=1, eval_every=total, eval_batches=1,
        checkpoint_every=10**9, precision=args.precision, device=args.device, compile=args.compile, seed=0,
        fused_loss="auto",
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
    vendor = vendor_peak(torch.cuda.get_device_name()) if args.device == "cuda" else None
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
        "loss": report.loss, "final_loss": report.final_train_loss,
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
    """bench/RESULTS.md's section for the presets table, from a run's JSON."""
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


# ---------------------------------------------------------------- command line


def parse(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=ARMS, help="which arms, in this order")
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU: the whole path, quickly")
    parser.add_argument("--data", choices=["text", "random"], default="text")
    parser.add_argument("--context", type=int, help="default: 2048 (smoke: 64)")
    parser.add_argument("--rows", type=int, help="rows a step (default: 32; smoke: 4)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--activation-budget", type=float,
                        help="compiled arms: torch._functorch.config.activation_memory_budget (below 1 the compiler "
                             "recomputes more in backward to keep fewer activations; default: torch's, 1)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 autocast on CUDA (and bf16-capable CPUs), as the pipeline")
    parser.add_argument("--steps", type=int, help="timed steps per arm (default 15; smoke 2; presets 20)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 5; smoke 1)")
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), help="the presets table instead of the arms")
    parser.add_argument("--batch-tokens", type=int, default=65536, help="presets: tokens per step and device")
    parser.add_argument("--nproc", type=int, default=None, help="presets: DDP processes (default: every GPU; 2 on CPU; 0: no DDP)")
    parser.add_argument("--compile", action="store_true", help="presets: torch.compile the model")
    parser.add_argument("--out", type=Path, help="the JSON (arms: default $OUT/bench_gpu.json or bench/out/bench_gpu.json)")
    parser.add_argument("--record", action="store_true", help="presets: also write the table into bench/RESULTS.md")
    parser.add_argument("--record-from", type=Path, help="write bench/RESULTS.md's presets section from a run's JSON, then stop")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.record_from:
        return args
    if args.cpu_smoke:
        args.device = "cpu"
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu_smoke else 5)
    args.steps = args.steps if args.steps is not None else (2 if args.cpu_smoke else 20 if args.presets else 15)
    if args.warmup < 0 or args.steps < 1:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    if args.presets and args.out is None:
        parser.error("--out is required with --presets")
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "out"
        args.out = args.out / "bench_gpu.json"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "bench_gpu: --device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False); "
                       "run it on a GPU machine, or check the path with --cpu-smoke (or --device cpu)\n")
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
    skip = ("worker", "scratch", "out", "record", "record_from")
    settings_ = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in skip}
    if not args.presets:
        result = {"machine": machine(args), "settings": settings_, **run_arms(args)}
        result["seconds"] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        plotted = plot_curves(result, args.out.with_name("bench_gpu_curves.png"))
        print(arms_markdown(result))
        print(f"\n{result['machine']} in {result['seconds']:.0f} s; JSON: {args.out}" + ("; curves: bench_gpu_curves.png" if plotted else ""))
        if any("error" in r for r in result["arms"]):
            sys.exit(1)
        return
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        rows = run_all(args, None, Path(scratch))
        if args.nproc > 0:
            rows += run_ddp(args, Path(scratch))
    result = {"machine": machine(args), "settings": settings_, "results": rows, "seconds": time.perf_counter() - started}
    args.out.write_text(json.dumps(result, indent=2, default=str))
    if args.record:
        record(result)
    print(markdown(rows))
    print(f"\n{result['machine']} in {result['seconds']:.0f} s; JSON: {args.out}")


if __name__ == "__main__":
    main()
