"""Training throughput: jielong's loop vs a minimal plain-PyTorch loop, and bf16 vs fp32 loss curves.

For the `tiny` and `small` presets (context 256) in fp32 and bf16 autocast, both loops train the same
freshly initialised model (same seed) on the same batches (packed blocks of the built-in corpus's
tokens) for the same number of steps; throughput is tokens / wall time over all steps, and MFU is
against the matmul peak measured by models/flops.py. The plain loop is forward, cross-entropy,
backward, AdamW step (PyTorch's default, non-fused) — no clipping, scheduler, logging or validation.

Then the loss-curve check behind `precision: auto`: the tiny model trained `CURVE_STEPS` steps in fp32
and in bf16 autocast from the same initialisation; we report both validation losses.

    .venv/bin/python bench/bench_train.py           # needs `make run` (or the tokenize stage) once
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jielong.flows.stages import stage_keys  # noqa: E402
from jielong.models.data import PackedBatches, open_tokens  # noqa: E402
from jielong.models.flops import flops_per_token, peak_flops  # noqa: E402
from jielong.models.presets import build_model, model_config  # noqa: E402
from jielong.models.train import train  # noqa: E402
from jielong.tasks.config import TrainConfig, load_config  # noqa: E402
from jielong.tasks.core.contract import load_artifact  # noqa: E402
from results import write_section  # noqa: E402

SHAPES = {"tiny": dict(batch_size=16, steps=30), "small": dict(batch_size=8, steps=12)}
CURVE_STEPS = 120
REPEATS = 3
CONTEXT = 256


def corpus_tokens() -> tuple[np.ndarray, np.ndarray, int]:
    cfg = load_config("tiny")
    artifact = load_artifact(cfg.workspace_path(), "tokenize", stage_keys(cfg)["tokenize"])
    if artifact is None:
        sys.exit("run `make run` first: the benchmark trains on the tokenize stage's output")
    dtype = artifact.manifest["details"]["dtype"]
    train_tokens = open_tokens(artifact.path / "tokens" / "train.bin", dtype)
    val_tokens = open_tokens(artifact.path / "tokens" / "validation.bin", dtype)
    return train_tokens, val_tokens, int(artifact.manifest["metrics"]["vocab_size"])


def new_model(preset: str, vocab: int):
    return build_model(model_config(preset, vocab, 0, 0, 1, CONTEXT), seed=0)


def settings(steps: int, batch: int, precision: str, **extra) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=batch, precision=precision, device="cpu", warmup_steps=2,
                       log_every=steps, eval_every=extra.pop("eval_every", steps), eval_batches=2,
                       checkpoint_every=10**6, **extra)


def jielong_loop(preset, vocab, batches, steps, batch, precision, scratch: Path) -> float:
    model = new_model(preset, vocab)
    report = train(model, batches, settings(steps, batch, precision), scratch / f"ckpt-{preset}-{precision}",
                   lambda points: None, "bench", scratch / "peak.json", desc=f"jielong {preset} {precision}")
    return report.tokens_per_s


def plain_loop(preset, vocab, batches, steps, precision) -> float:
    model = new_model(preset, vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = 0
    start = time.perf_counter()
    for step in range(steps):
        batch = batches.get(step, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids=batch["input_ids"]).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch["targets"].view(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def mfu(preset: str, vocab: int, tokens_per_s: float, precision: str, scratch: Path) -> float:
    model = new_model(preset, vocab)
    n = sum(p.numel() for p in model.parameters())
    per_token = flops_per_token(n, model.config.num_hidden_layers, model.config.hidden_size, CONTEXT)
    peak = peak_flops(scratch / "peak.json", "cpu", torch.bfloat16 if precision == "bf16" else torch.float32)
    return tokens_per_s * per_token / peak, n, peak


def main() -> None:
    scratch = ROOT / "bench" / "out" / "train"
    scratch.mkdir(parents=True, exist_ok=True)
    for old in [*scratch.glob("ckpt-*"), *scratch.glob("rep*")]:
        subprocess.run(["rm", "-rf", str(old)], check=True)
    train_tokens, val_tokens, vocab = corpus_tokens()
    rows = []
    for preset, shape in SHAPES.items():
        for precision in ("fp32", "bf16"):
            batches = PackedBatches(train_tokens, val_tokens, CONTEXT, shape["batch_size"], 1, 0, 2)
            ours_runs, plain_runs = [], []
            for rep in range(REPEATS):  # interleaved, alternating which loop goes first; medians reported
                for which in (("ours", "plain") if rep % 2 == 0 else ("plain", "ours")):
                    if which == "ours":
                        ours_runs.append(jielong_loop(preset, vocab, batches, shape["steps"], shape["batch_size"],
                                                      precision, scratch / f"rep{rep}"))
                    else:
                        plain_runs.append(plain_loop(preset, vocab, batches, shape["steps"], precision))
            ours, plain = float(np.median(ours_runs)), float(np.median(plain_runs))
            utilisation, params, peak = mfu(preset, vocab, ours, precision, scratch)
            rows.append((preset, params, precision, shape["batch_size"], shape["steps"], ours, plain, ours / plain,
                         utilisation, peak))
            print(rows[-1], flush=True)

    curves = {}
    for precision in ("fp32", "bf16"):
        batches = PackedBatches(train_tokens, val_tokens, CONTEXT, 16, 1, 0, 8)
        report = train(new_model("tiny", vocab), batches,
                       settings(CURVE_STEPS, 16, precision, eval_every=CURVE_STEPS // 4),
                       scratch / f"ckpt-curve-{precision}", lambda points: None, "bench", scratch / "peak.json")
        curves[precision] = report.curves["val_loss"]
        print(precision, curves[precision], flush=True)

    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
    lines = [
        "## Training throughput (bench/bench_train.py)",
        "",
        f"- Machine: {cpu or platform.processor()}, {torch.get_num_threads()} threads, no GPU; torch {torch.__version__}.",
        f"- Command: `.venv/bin/python bench/bench_train.py`; date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"- Context {CONTEXT}, vocabulary {vocab} (the built-in corpus tokenizer); throughput over all steps, first included;",
        f"  median of {REPEATS} interleaved runs per loop (the machine is shared, single runs vary by ~5%).",
        "",
        "| preset | params | precision | batch | steps | jielong tokens/s | plain loop tokens/s | ratio | jielong MFU | peak GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for preset, params, precision, batch, steps, ours, plain, ratio, utilisation, peak in rows:
        lines.append(f"| {preset} | {params / 1e6:.2f} M | {precision} | {batch} | {steps} | {ours:,.0f} | {plain:,.0f} | "
                     f"{ratio:.2f} | {utilisation:.1%} | {peak / 1e9:.0f} |")
    lines += ["", f"Validation loss (nats/token) of the tiny model, fp32 vs bf16 autocast, same init, {CURVE_STEPS} steps:", "",
              "| step | fp32 | bf16 |", "|---|---|---|"]
    for (step, a), (_, b) in zip(curves["fp32"], curves["bf16"]):
        lines.append(f"| {step} | {a:.4f} | {b:.4f} |")
    section = "\n".join(lines) + "\n"
    print(section)
    write_section("bench_train", section)


if __name__ == "__main__":
    main()
