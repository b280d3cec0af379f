"""Training checkpoints: written atomically, loaded without pickle.

    <dir>/step-000100/model.safetensors   weights (safetensors; tied weights handled)
                     /optimizer.pt        optimizer state (tensors/numbers only: torch.load(weights_only=True))
                     /rng.pt              torch CPU (and CUDA) RNG states (weights_only)
                     /state.json          step, scheduler state, counters
    <dir>/latest                          name of the newest complete checkpoint (atomic os.replace)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_model, save_model

KEEP = 2


def save(directory: Path, step: int, model, optimizer, scheduler, extra: dict) -> Path:
    return write(directory, step, lambda path: save_model(model, str(path)), optimizer.state_dict(),
                 scheduler.state_dict(), extra)


def write(directory: Path, step: int, save_weights: Callable[[Path], None], optimizer_state: dict,
          scheduler_state: dict, extra: dict) -> Path:
    """The checkpoint of `step`, from states already gathered (models/parallel.py gathers sharded ones)."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = directory / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(tmp / "model.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "scheduler": scheduler_state, **extra}))
    final = directory / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = directory / ".latest.tmp"
    pointer.write_text(name)
    os.replace(pointer, directory / "latest")
    for old in sorted(directory.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(directory: Path) -> Path | None:
    try:
        path = directory / (directory / "latest").read_text().strip()
    except OSError:
        return None
    return path if (path / "state.json").is_file() else None


def load(path: Path, model, optimizer, scheduler) -> dict:
    """Restore everything saved at `path`; returns state.json (step, counters)."""
    load_model(model, str(path / "model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return restore(path, scheduler)


def restore(path: Path, scheduler) -> dict:
    """The scheduler and RNG states saved at `path`; returns state.json (step, counters)."""
    state = json.loads((path / "state.json").read_text())
    scheduler.load_state_dict(state["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
