"""Batches for training: packed token blocks (pretrain) and padded instruction pairs (instruct).

Both are deterministic functions of (seed, step, micro-step), so resuming needs only the step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def open_tokens(path: Path, dtype: str) -> np.ndarray:
    """A token file as a read-only memory map (an empty file gives an empty array)."""
    if path.stat().st_size == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class PackedBatches:
    """Non-overlapping blocks of context+1 tokens from one token stream, shuffled per epoch."""

    def __init__(self, train: np.ndarray, validation: np.ndarray, context: int, batch_size: int,
                 grad_accum: int, seed: int, eval_batches: int):
        self.train, self.context = train, context
        self.n_blocks = (len(train) - 1) // context
        if self.n_blocks < 1:
            raise ValueError(f"the train split has {len(train)} tokens: fewer than one block of {context + 1}")
        self.validation_tokens = validation
        self.batch_size, self.grad_accum, self.seed, self.eval_batches = batch_size, grad_accum, seed, eval_batches
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(self.n_blocks, generator=generator)}
        return self._orders[epoch]

    def _blocks(self, tokens: np.ndarray, starts: list[int]) -> dict[str, torch.Tensor]:
        rows = np.stack([np.asarray(tokens[s : s + self.context + 1], dtype=np.int64) for s in starts])
        data = torch.from_numpy(rows)
        return {"input_ids": data[:, :-1].contiguous(), "targets": data[:, 1:].contiguous()}

    def get(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        first = (step * self.grad_accum + micro) * self.batch_size
        starts = []
        for sample in range(first, first + self.batch_size):
            epoch, index = divmod(sample, self.n_blocks)
            starts.append(int(self._order(epoch)[index]) * self.context)
        return self._blocks(self.train, starts)

    def validation(self) -> list[dict[str, torch.Tensor]]:
        n = min((len(self.validation_tokens) - 1) // self.context, self.eval_batches * self.batch_size)
        starts = [i * self.context for i in range(max(n, 0))]
        return [self._blocks(self.validation_tokens, starts[i : i + self.batch_size])
                for i in range(0, len(starts), self.batch_size)]


class PairBatches:
    """Instruction examples (input ids + targets with -100 on prompt tokens), right-padded per batch."""

    def __init__(self, train: list[tuple[list[int], list[int]]], heldout: list[tuple[list[int], list[int]]],
                 pad_id: int, batch_size: int, grad_accum: int, seed: int, eval_batches: int):
        if not train:
            raise ValueError("no training pairs")
        self.examples, self.heldout = train, heldout
        self.pad_id, self.batch_size, self.grad_accum, self.seed = pad_id, batch_size, grad_accum, seed
        self.eval_batches = eval_batches
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.examples), generator=generator)}
        return self._orders[epoch]

    def collate(self, items: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(items), width), -100, dtype=torch.long)
        for row, (ids, tgt) in enumerate(items):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            targets[row, : len(tgt)] = torch.tensor(tgt)
        return {"input_ids": input_ids, "targets": targets}

    def get(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        first = (step * self.grad_accum + micro) * self.batch_size
        items = []
        for sample in range(first, first + self.batch_size):
            epoch, index = divmod(sample, len(self.examples))
            items.append(self.examples[int(self._order(epoch)[index])])
        return self.collate(items)

    def validation(self) -> list[dict[str, torch.Tensor]]:
        items = self.heldout[: self.eval_batches * self.batch_size]
        return [self.collate(items[i : i + self.batch_size]) for i in range(0, len(items), self.batch_size)]


def batches_from_spec(spec: dict) -> PackedBatches | PairBatches:
    """Batches from a JSON description (what torchrun workers get, models/distributed.py):
    {"kind": "packed", "train", "validation" (token files), "dtype", "context", ...} or
    {"kind": "pairs", "path" (JSON: {"train": [[ids, targets], ...], "heldout": [...]}), "pad_id", ...}."""
    shared = (spec["batch_size"], spec["grad_accum"], spec["seed"], spec["eval_batches"])
    if spec["kind"] == "packed":
        train, validation = (open_tokens(Path(spec[split]), spec["dtype"]) for split in ("train", "validation"))
        return PackedBatches(train, validation, spec["context"], *shared)
    if spec["kind"] == "pairs":
        pairs = json.loads(Path(spec["path"]).read_text())
        train, heldout = ([(ids, targets) for ids, targets in pairs[split]] for split in ("train", "heldout"))
        return PairBatches(train, heldout, spec["pad_id"], *shared)
    raise ValueError(f"unknown batches kind {spec['kind']!r}")
