"""FLOPs accounting for MFU: model FLOPs per token (PaLM appendix B) against a measured peak."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch


def flops_per_token(n_params: int, n_layers: int, hidden: int, context: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12·L·d·T for attention scores."""
    return 6 * n_params + 12 * n_layers * hidden * context


def measure_peak(device: str, dtype: torch.dtype, size: int = 2048, seconds: float = 1.0) -> float:
    """Sustained matmul FLOP/s on this device and dtype (what MFU is measured against)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
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
    """Measured once per machine/device/dtype/threads and recorded in `cache` (JSON)."""
    name = device if device == "cpu" else torch.cuda.get_device_name()
    key = f"{platform.node()}|{platform.processor() or platform.machine()}|{name}|{dtype}|threads={torch.get_num_threads()}"
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
