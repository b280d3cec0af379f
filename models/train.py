"""The training loop shared by pretrain and instruct: short, deterministic, resumable.

AdamW (weight decay on matrices only), linear warm-up then cosine decay to `min_lr_ratio`·lr,
gradient clipping, gradient accumulation, bf16 autocast where configured, periodic validation loss,
checkpoints every `checkpoint_every` steps and at the end.

Determinism and exact resume: the batch for (step, micro-step) is a pure function of the seed and
the step (`Batches.get`), so the data position is just the step number; model, optimizer, scheduler
and RNG states are restored from the latest checkpoint. On CPU a resumed run ends with the same
weights, bit for bit, as an uninterrupted one.

Several processes (DDP, FSDP: `parallel`, models/parallel.py) run this same loop on the same global
batches, each on its rows. Their loss is the global batch's: each process's summed token losses over
the target tokens of the whole batch, times the world size, since DDP and FSDP average gradients
over processes. Rank 0 alone logs and writes checkpoints.

The loss (`fused_loss`, models/loss.py): `off` makes the whole logits and takes F.cross_entropy of them
in float32, as this loop always did; `on` runs the model's body and computes the output layer and the
cross-entropy together chunk by chunk, never holding the logits (on one GPU, the float32 logits of a
49k vocabulary dominate memory and time). `auto`, the default, is `on` exactly when the device is CUDA:
on CPU it keeps the plain loss, so CPU runs and their weights stay what they were, bit for bit. The two
agree to float rounding (tests/test_loss.py). The fused loss needs the model's last hidden states, which
a DDP or FSDP wrapper's forward does not hand out, so under `distributed` it is off (the config refuses
`on`); so it is too for models whose logits are not plain `lm_head(hidden)` (models/loss.py).
With `compile`, the model's body is compiled and the loss (an autograd.Function) stays eager, its
per-chunk softmax compiled on its own.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from jielong.models import checkpoint
from jielong.models.flops import flops_per_token, peak_flops
from jielong.models.loss import FusedHead, split_head
from jielong.models.parallel import OneProcess
from jielong.tasks.core.schema import UserError

MetricPoints = list[tuple[str, float, int]]


class Batches(Protocol):
    def get(self, step: int, micro: int) -> dict[str, torch.Tensor]: ...  # input_ids, targets (B, T)

    def validation(self) -> list[dict[str, torch.Tensor]]: ...


@dataclass
class TrainReport:
    steps: int
    resumed_from: int
    tokens: int
    seconds: float
    final_train_loss: float
    final_val_loss: float
    tokens_per_s: float
    mfu: float
    device: str
    precision: str
    loss: str = "plain"  # or "fused" (models/loss.py)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def loss_detail(report: TrainReport) -> dict[str, str]:
    """The manifest's record of the loss: {"loss": "fused"} when the fused loss trained the model, nothing
    for the plain loss, so an artifact made with it is the one made before the setting existed."""
    return {"loss": report.loss} if report.loss != "plain" else {}


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA device is available")
    return name


def resolve_precision(name: str, device: str) -> str:
    """auto: bf16 autocast on GPU, and on CPUs with native bf16 (its loss curve matched fp32 within
    0.03 nats over 120 steps and it was 8-32% faster here: bench/RESULTS.md); fp32 elsewhere."""
    if name != "auto":
        return name
    if device == "cuda":
        return "bf16"
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def resolve_fused_loss(name: str, device: str, model, parallel: OneProcess) -> FusedHead | None:
    """The model split for the fused loss, or None for the plain loss (the module docstring says when)."""
    if name == "off" or (name == "auto" and device != "cuda"):
        return None
    head = None if parallel.distributed else split_head(model)
    if head is None and name == "on":
        raise UserError("fused_loss: on is not available " + ("under distributed training" if parallel.distributed else
                         f"for {type(model).__name__}: its logits are not plain lm_head(hidden states)"))
    return head


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, s) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), eps=1e-8, fused=True)


def loss_on(model, batch: dict[str, torch.Tensor], device: str, precision: str,
            head: FusedHead | None = None) -> torch.Tensor:
    """Mean cross-entropy over target positions (targets == -100 are ignored); with `head`, the fused
    loss on its body's hidden states (models/loss.py) instead of the whole logits of `model`."""
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    targets = batch["targets"].to(device, non_blocking=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16"):
        if head is not None:
            return head.loss(input_ids, targets)
        logits = model(input_ids=input_ids).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)


def summed_loss(model, batch: dict[str, torch.Tensor], device: str, precision: str) -> torch.Tensor:
    """Summed cross-entropy over target positions (targets == -100 are ignored)."""
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    targets = batch["targets"].to(device, non_blocking=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(input_ids=input_ids).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100,
                           reduction="sum")


def micro_loss(model, batch: dict[str, torch.Tensor], device: str, precision: str, parallel: OneProcess,
               head: FusedHead | None = None) -> torch.Tensor:
    """The loss to backpropagate for one global micro-batch; summed over processes and divided by the
    world size, it is the batch's mean loss (what one process computes). `head`: one process only."""
    if not parallel.distributed:
        return loss_on(model, batch, device, precision, head)
    targets = int((batch["targets"] != -100).sum())
    return summed_loss(model, parallel.rows(batch), device, precision) * (parallel.world_size / targets)


@torch.inference_mode()
def evaluate_rows(model, batches: list[dict[str, torch.Tensor]], device: str, precision: str,
                  parallel: OneProcess) -> float:
    """`evaluate` with each process scoring its rows of every batch."""
    was_training = model.training
    model.eval()
    total = count = 0.0
    for batch in batches:
        rows = parallel.rows(batch)
        total += float(summed_loss(model, rows, device, precision))
        count += int((rows["targets"] != -100).sum())
    model.train(was_training)
    total, count = parallel.sum([total, count])
    return total / count if count else float("nan")


def validation_loss(model, batches: list[dict[str, torch.Tensor]], device: str, precision: str,
                    parallel: OneProcess, head: FusedHead | None = None) -> float:
    if not parallel.distributed:
        return evaluate(model, batches, device, precision, head)
    return evaluate_rows(model, batches, device, precision, parallel)


@torch.inference_mode()
def row_losses(model, batches: list[dict[str, torch.Tensor]], device: str, precision: str) -> list[tuple[float, int]]:
    """Per row of every batch, in order: its summed cross-entropy over target positions and their number (the
    items whose pooled ratio is `evaluate`'s loss, for resampling them)."""
    was_training = model.training
    model.eval()
    rows = []
    for batch in batches:
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        targets = batch["targets"].to(device, non_blocking=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids=input_ids).logits
        losses = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none").sum(dim=1)
        counts = (targets != -100).sum(dim=1)
        rows += [(float(loss), int(count)) for loss, count in zip(losses.cpu(), counts.cpu())]
    model.train(was_training)
    return rows


def pooled_loss(rows: list[tuple[float, int]]) -> float:
    """The token-weighted mean loss of `row_losses`' rows (what `evaluate` gives for the same batches)."""
    count = sum(n for _, n in rows)
    return sum(loss for loss, _ in rows) / count if count else float("nan")


@torch.inference_mode()
def evaluate(model, batches: list[dict[str, torch.Tensor]], device: str, precision: str,
             head: FusedHead | None = None) -> float:
    """Token-weighted mean loss over the validation batches (`head`: with the fused loss)."""
    was_training = model.training
    model.eval()
    total = count = 0.0
    for batch in batches:
        n = int((batch["targets"] != -100).sum())
        if n:
            total += float(loss_on(model, batch, device, precision, head)) * n
            count += n
    model.train(was_training)
    return total / count if count else float("nan")


def train(model, batches: Batches, s, checkpoint_dir: Path, log: Callable[[MetricPoints], None],
          prefix: str, peak_cache: Path, desc: str = "train", parallel: OneProcess | None = None) -> TrainReport:
    """Train `model` in place for `s.steps` steps (from the latest checkpoint in `checkpoint_dir`, if any).

    `parallel`: this process's place among the processes training together (default: alone). Only
    rank 0's `log` calls and report carry meaning; its throughput is of all processes together, and
    its MFU is against the peak of one device times the world size."""
    parallel = parallel or OneProcess()
    device = resolve_device(s.device)
    precision = resolve_precision(s.precision, device)
    if device == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    model.to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())  # before sharding
    wrapped = parallel.wrap(model)
    optimizer = make_optimizer(wrapped, s)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, s.warmup_steps, s.steps, s.min_lr_ratio)
    )
    start, tokens = 0, 0
    found = parallel.agree(checkpoint.latest(checkpoint_dir))
    if found is not None:
        state = parallel.load(found, wrapped, optimizer, scheduler)
        start, tokens = state["step"], state["tokens"]
    head = resolve_fused_loss(s.fused_loss, device, model, parallel)
    step_model = torch.compile(wrapped) if s.compile and head is None else wrapped
    step_head = FusedHead(torch.compile(head.body), head.weight, compiled=True) if s.compile and head else head

    config = model.config
    context = batches.get(0, 0)["input_ids"].shape[1]
    per_token = flops_per_token(n_params, config.num_hidden_layers, config.hidden_size, context)
    peak = (peak_flops(peak_cache, device, torch.bfloat16 if precision == "bf16" else torch.float32)
            if parallel.is_main else float("nan"))  # measured once, by the process that reports it
    validation = batches.validation()

    from tqdm import tqdm

    points: MetricPoints = []
    curves: dict[str, list[tuple[int, float]]] = {"loss": [], "val_loss": []}
    train_loss = val_loss = float("nan")
    window_tokens, window_start = 0, time.perf_counter()
    run_start = time.perf_counter()
    tokens_per_s = mfu = 0.0
    bar = tqdm(range(start, s.steps), initial=start, total=s.steps, desc=desc, unit="step", leave=False,
               disable=None if parallel.is_main else True)
    for step in bar:
        loss_sum = 0.0
        for micro in range(s.grad_accum):
            batch = batches.get(step, micro)
            with parallel.accumulating(wrapped, sync=micro == s.grad_accum - 1):
                loss = micro_loss(step_model, batch, device, precision, parallel, step_head)
                (loss / s.grad_accum).backward()
            loss_sum += loss.item()
            window_tokens += int(batch["input_ids"].numel())
            tokens += int(batch["input_ids"].numel())  # per micro-batch: a checkpoint saves the exact count
        grad_norm = parallel.clip_grad_norm(wrapped, s.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if parallel.distributed:
            loss_sum = parallel.sum([loss_sum])[0] / parallel.world_size
        train_loss = loss_sum / s.grad_accum
        done = step + 1
        points += [(f"{prefix}/loss", train_loss, done), (f"{prefix}/lr", lr, done), (f"{prefix}/grad_norm", grad_norm, done)]
        curves["loss"].append((done, train_loss))
        if done % s.log_every == 0 or done == s.steps:
            if device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / max(elapsed, 1e-9)
            mfu = tokens_per_s * per_token / (peak * parallel.world_size)
            points += [(f"{prefix}/tokens_per_s", tokens_per_s, done), (f"{prefix}/mfu", mfu, done)]
            window_tokens, window_start = 0, time.perf_counter()
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        if done % s.eval_every == 0 or done == s.steps:
            val_loss = validation_loss(model, validation, device, precision, parallel, head)
            points.append((f"{prefix}/val_loss", val_loss, done))
            curves["val_loss"].append((done, val_loss))
            log(points)
            points = []
        if done % s.checkpoint_every == 0 or done == s.steps:
            parallel.save(checkpoint_dir, done, wrapped, optimizer, scheduler, {"tokens": tokens})
    bar.close()
    if points:
        log(points)
    if math.isnan(val_loss):
        val_loss = validation_loss(model, validation, device, precision, parallel, head)
    return TrainReport(
        steps=s.steps, resumed_from=start, tokens=tokens, seconds=time.perf_counter() - run_start,
        final_train_loss=train_loss, final_val_loss=val_loss, tokens_per_s=tokens_per_s, mfu=mfu,
        device=device, precision=precision, loss="plain" if head is None else "fused", curves=curves,
    )
