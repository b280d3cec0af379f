"""FLOPs accounting: the training compute C = 6·N·D, and model FLOPs per token for MFU (PaLM appendix B)
against a measured peak.

C = 6·N·D (Kaplan et al., 2020; Hoffmann et al., 2022) counts 2·N FLOPs per token for the forward pass
and 4·N for the backward pass, N being every parameter (a tied embedding counted once: its lookup costs
nothing, its use as the output layer is a d x V matmul) and D the training tokens (every token of every
step, repeated epochs included). It leaves out the attention scores (12·L·d·T per token, which
`flops_per_token` adds for MFU), norms and the softmax, as the compute-optimal papers do.

MFU's peak is measured: the sustained rate of one large matmul in the training dtype. On a GPU the
matmul is 8192³ (bf16: 786 TFLOP/s on an H200, where a 2048³ one reaches only 618: too small to fill
it); on a CPU 2048³. `vendor_peak` gives the dense bf16 figure of NVIDIA's datasheets beside it, where
the GPU is known (MFU against it is the number papers quote)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch


def flops_per_token(n_params: int, n_layers: int, hidden: int, context: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12·L·d·T for attention scores."""
    return 6 * n_params + 12 * n_layers * hidden * context


def training_flops(n_params: int, tokens: int) -> float:
    """C = 6·N·D: the compute of training N parameters on D tokens."""
    return 6.0 * n_params * tokens


def steps_for_budget(budget: float, n_params: int, tokens_per_step: int) -> int:
    """The optimizer steps a compute budget allows: the largest whole number with 6·N·(steps·tokens) <= budget
    (at least 1)."""
    return max(1, int(budget // training_flops(n_params, tokens_per_step)))


# dense bf16 tensor-core FLOP/s from NVIDIA's datasheets, which list them with 2:4 sparsity (H100/H200 SXM
# 1,979 TFLOP/s, H100 PCIe 1,513, H100/H200 NVL 1,671, A100 624): halved, the dense rate.
# (substring of torch.cuda.get_device_name(), FLOP/s); the first match wins.
VENDOR_BF16_PEAK = [("H200 NVL", 835.5e12), ("H200", 989.5e12), ("H100 PCIe", 756.5e12), ("H100 NVL", 835.5e12),
                    ("H100", 989.5e12), ("A100", 312e12)]


def vendor_peak(device_name: str) -> float | None:
    """The datasheet's dense bf16 FLOP/s of a GPU by its name, or None where not known."""
    return next((peak for part, peak in VENDOR_BF16_PEAK if part in device_name), None)


def matmul_size(device: str) -> int:
    return 2048 if device == "cpu" else 8192


def measure_peak(device: str, dtype: torch.dtype, size: int | None = None, seconds: float = 1.0) -> float:
    """Sustained FLOP/s of a size³ matmul on this device and dtype (what MFU is measured against)."""
    size = size or matmul_size(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2 if device == "cpu" else 10):  # a GPU: also lets its clocks rise
        a @ b
    _sync(device)
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if device != "cpu" and count % 10:
            continue
        _sync(device)
    _sync(device)
    return 2 * size**3 * count / (time.perf_counter() - start)


def peak_flops(cache: Path, device: str, dtype: torch.dtype) -> float:
    """Measured once per machine/device/dtype/threads and recorded in `cache` (JSON). A GPU's entry names
    its matmul size (an entry measured with the 2048³ matmul of before is not reused)."""
    name = device if device == "cpu" else torch.cuda.get_device_name()
    key = f"{platform.node()}|{platform.processor() or platform.machine()}|{name}|{dtype}|threads={torch.get_num_threads()}"
    if device != "cpu":
        key += f"|matmul={matmul_size(device)}"
    try:
        table = json.loads(cache.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        table[key] = measure_peak(device, dtype)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(table, indent=2))
    return table[key]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
