"""Packing many short sequences into few dense rows, with a 4-D attention mask per row.

A row holds segments. A token attends to earlier tokens of its own segment and of the segment's
ancestors, nothing else, and its position id continues from its parent's end. So:

- independent windows (perplexity) are root segments: a block-diagonal causal mask, positions reset;
- shared demonstrations (in-context tasks) are a root, each example's query its child and each
  answer a grandchild: the demonstrations are computed once for many examples, and each answer sees
  exactly demonstrations + its query, as if it were scored alone.

Dense rows instead of padded short sequences: no compute on padding, and far fewer forward calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Segment:
    tokens: list[int]
    parent: int | None = None  # index of the parent segment in the same row
    tag: object = None  # caller's bookkeeping (which window / example / answer)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    mask: torch.Tensor  # (B, 1, L, L) bool, True = may attend
    starts: list[list[int]]  # starts[row][segment] = row position of the segment's first token


def pack_rows(rows: list[list[Segment]], pad_id: int) -> PackedBatch:
    """Build one batch from rows of segments (a parent must come before its children)."""
    width = max(sum(len(s.tokens) for s in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    starts = []
    for r, row in enumerate(rows):
        row_starts, seg_of, pos = [], [], []
        end_position = []  # logical position after each segment's last token
        for s, seg in enumerate(row):
            first = 0 if seg.parent is None else end_position[seg.parent]
            row_starts.append(len(seg_of))
            seg_of.extend([s] * len(seg.tokens))
            pos.extend(range(first, first + len(seg.tokens)))
            end_position.append(first + len(seg.tokens))
        n = len(seg_of)
        ids[r, :n] = torch.tensor([t for seg in row for t in seg.tokens], dtype=torch.long)
        positions[r, :n] = torch.tensor(pos, dtype=torch.long)
        mask[r, 0, :n, :n] = _segment_mask(row, torch.tensor(seg_of)) & causal[:n, :n]
        starts.append(row_starts)
    # padding attends to itself only (a fully masked query row would give NaN)
    mask |= torch.eye(width, dtype=torch.bool)
    return PackedBatch(ids, positions, mask, starts)


def _segment_mask(row: list[Segment], seg_of: torch.Tensor) -> torch.Tensor:
    visible = torch.eye(len(row), dtype=torch.bool)  # visible[a, b]: segment a may see segment b
    for s, seg in enumerate(row):
        parent = seg.parent
        while parent is not None:
            visible[s, parent] = True
            parent = row[parent].parent
    return visible[seg_of[:, None], seg_of[None, :]]


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, longest item first, each into the fullest bin it fits (bins' totals stay
    <= capacity; an item longer than the capacity gets a bin of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # free room -> bins with exactly that much room
    for i in order:
        need = lengths[i]
        room = next((r for r in range(need, capacity + 1) if by_room.get(r)), None)
        if room is None:
            bins.append([i])
            b, left = len(bins) - 1, capacity - need
        else:
            b = by_room[room].pop()
            bins[b].append(i)
            left = room - need
        if left > 0:
            by_room.setdefault(left, []).append(b)
    return bins
