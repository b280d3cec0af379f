"""How the training loop (models/train.py) spreads over processes: one process, DDP or FSDP2.

`train()` asks its strategy to wrap the model, to pick this process's rows of a global batch, to sum
values over processes, to clip gradients and to write and read checkpoints. `OneProcess` does what the
loop always did, operation for operation, so `distributed: none` trains exactly as before.

Under torch.distributed (a process group is initialised, see models/distributed.py) every process
draws the same global micro-batch (`Batches.get(step, micro)` is a pure function of the seed and the
step) and takes its own contiguous slice of rows, so the global batch size does not depend on the
world size. Checkpoints are world-size independent: one full `model.safetensors` (plus the optimizer
state), written by rank 0 alone through models/checkpoint.py.

- `DDPProcesses`: DistributedDataParallel; the checkpoint has exactly the single-process format.
- `FSDPProcesses`: FSDP2 (`torch.distributed.fsdp.fully_shard`, which works on CPU with gloo in torch
  2.13): each decoder layer, then the root, sharded over the processes. A checkpoint gathers the full
  state dicts on rank 0 (`torch.distributed.checkpoint.state_dict`, cpu_offload); its optimizer state
  is keyed by parameter name, so it is read back by FSDP only.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import torch

from jielong.models import checkpoint


class OneProcess:
    """The whole world is this process."""

    distributed = False
    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model):
        return model

    def accumulating(self, model, sync: bool):
        """Context for one micro-step's forward and backward; `sync` on the last micro-step of a step."""
        return contextlib.nullcontext()

    def rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch

    def sum(self, values: list[float]) -> list[float]:
        return values

    def agree(self, value):
        """Rank 0's value, on every process."""
        return value

    def clip_grad_norm(self, model, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    def save(self, directory: Path, step: int, model, optimizer, scheduler, extra: dict) -> None:
        checkpoint.save(directory, step, model, optimizer, scheduler, extra)

    def load(self, path: Path, model, optimizer, scheduler) -> dict:
        return checkpoint.load(path, model, optimizer, scheduler)

    def barrier(self) -> None:
        pass


class DDPProcesses(OneProcess):
    """One of `world_size` processes of an initialised process group, replicating the model (DDP)."""

    distributed = True

    def __init__(self, device: str):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = device  # "cpu" or "cuda" (this process's GPU is the current CUDA device)

    def wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.cuda.current_device()] if self.device == "cuda" else None
        # the only buffers are RoPE frequencies, equal everywhere: no broadcast before each forward
        # (torch 2.13 renames the switch; older versions, e.g. 2.11 on GPU machines, know the old name)
        parameters = inspect.signature(DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=device_ids, **no_sync)

    def accumulating(self, model, sync: bool):
        return contextlib.nullcontext() if sync else model.no_sync()

    def rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This process's contiguous share of the rows; a share with no rows (a short validation batch)
        is one row whose targets are all ignored, so every process still runs the same forward passes."""
        size = batch["input_ids"].shape[0]
        start, stop = size * self.rank // self.world_size, size * (self.rank + 1) // self.world_size
        if start < stop:
            return {name: tensor[start:stop] for name, tensor in batch.items()}
        return {"input_ids": batch["input_ids"][:1], "targets": torch.full_like(batch["targets"][:1], -100)}

    def sum(self, values: list[float]) -> list[float]:
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(total)
        return total.tolist()

    def agree(self, value):
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def save(self, directory: Path, step: int, model, optimizer, scheduler, extra: dict) -> None:
        if self.is_main:
            checkpoint.save(directory, step, model.module, optimizer, scheduler, extra)

    def load(self, path: Path, model, optimizer, scheduler) -> dict:
        return checkpoint.load(path, model.module, optimizer, scheduler)

    def barrier(self) -> None:
        self.dist.barrier()


class FSDPProcesses(DDPProcesses):
    """Parameters, gradients and optimizer state sharded over the processes (FSDP2)."""

    def wrap(self, model):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.aliases = tied_aliases(model)
        mesh = init_device_mesh(self.device, (self.world_size,))
        blocks = set(getattr(model, "_no_split_modules", None) or ())  # a transformers model's decoder layer class
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def accumulating(self, model, sync: bool):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def clip_grad_norm(self, model, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def save(self, directory: Path, step: int, model, optimizer, scheduler, extra: dict) -> None:
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                              get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only
        weights = get_model_state_dict(model, options=options)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
        if self.is_main:
            weights = {name: tensor.contiguous() for name, tensor in weights.items() if name not in self.aliases}
            checkpoint.write(directory, step, lambda path: save_file(weights, str(path), metadata=self.aliases),
                             optimizer_state, scheduler.state_dict(), extra)

    def load(self, path: Path, model, optimizer, scheduler) -> dict:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                              set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        weights = load_file(str(path / "model.safetensors"))
        for alias, name in self.aliases.items():
            weights[alias] = weights[name]
        set_model_state_dict(model, weights, options=options)
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
        return checkpoint.restore(path, scheduler)


def tied_aliases(model) -> dict[str, str]:
    """{alias: name} for state-dict entries that are one tensor under several names (tied embeddings):
    a checkpoint stores each tensor once, under the first of its names in sorted order."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in model.state_dict().items():
        names_of.setdefault(tensor.data_ptr(), []).append(name)
    aliases = {}
    for names in names_of.values():
        kept, *others = sorted(names)
        aliases.update({alias: kept for alias in others})
    return aliases


def strategy(mode: str, device: str) -> OneProcess:
    return {"none": OneProcess, "ddp": DDPProcesses, "fsdp": FSDPProcesses}[mode](*(() if mode == "none" else (device,)))
