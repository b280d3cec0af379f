"""Memorisation of the canaries (ingest.canaries, tasks/lib/canaries.py): from each canary's first P tokens
(after the token a document is predicted from), greedy decoding writes C tokens; the measure is the
fraction of them equal to the canary's own next C tokens, position by position, and whether all C are
(exact extraction, as Carlini et al., 2023 with 32-token prefixes and 50-token suffixes), and the mean
loss of those C tokens given the prefix, which moves long before any token is reproduced.

Canaries are found in the splits the model was evaluated with: the copies in train give each canary's
repeat count and how many copies reached training (after deduplication and decontamination); the
never-seen controls are in the test split. A canary with no copy left in train is not measured (the
model never saw it); one shorter than P + C tokens neither. Both are counted.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from jielong.tasks.core.schema import UserError
from jielong.tasks.lib import canaries as canary_ids
from jielong.tasks.lib.evaluation import perplexity
from jielong.tasks.lib.evaluation.config import MemorizationConfig
from jielong.tasks.lib.evaluation.model import LoadedModel
from jielong.tasks.lib.evaluation.registry import Inputs, SectionResult

BATCH = 16


def find_canaries(splits: dict[str, list[dict]]) -> list[dict]:
    """One row per canary: original id, injected repeats, copies in the train split, text."""
    found: dict[str, dict] = {}
    copies: dict[str, int] = defaultdict(int)
    for split in ("train", "test"):
        for doc in splits.get(split, []):
            parsed = canary_ids.parse(doc["id"])
            if parsed is None:
                continue
            repeats, original = parsed
            found.setdefault(original, {"original": original, "repeats": repeats, "text": doc["text"]})
            copies[original] += split == "train"
    return [{**row, "train_copies": copies[row["original"]]} for _, row in sorted(found.items())]


@torch.inference_mode()
def greedy_continuations(lm: LoadedModel, prefixes: list[list[int]], length: int) -> list[list[int]]:
    """`length` greedy tokens after each prefix (all prefixes have the same length: no padding)."""
    out = []
    lm.model.eval()
    for start in range(0, len(prefixes), BATCH):
        ids = torch.tensor(prefixes[start : start + BATCH], device=lm.device)
        with lm.autocast_context():
            generated = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=length,
                                          min_new_tokens=length, do_sample=False, num_beams=1,
                                          pad_token_id=lm.eos_id, eos_token_id=None)
        out += generated[:, ids.shape[1]:].tolist()
    return out


def continuation_losses(lm: LoadedModel, sequences: list[list[int]], prefix: int, batch_tokens: int) -> list[float]:
    """Mean loss (nats/token) of each sequence's tokens after its first `prefix` (all of one length), scored
    as perplexity scores a document: a graded measure where exact extraction is rare."""
    scores = perplexity.score_documents(lm, sequences, lm.max_length, lm.max_length, batch_tokens)
    logprobs = scores.logprob.reshape(len(sequences), -1)  # document-ordered, one row per sequence
    return (-logprobs[:, prefix:].mean(axis=1)).tolist()


def run(inputs: Inputs) -> SectionResult:
    """The memorisation section; a config the canaries cannot serve is reported as a user mistake."""
    try:
        return evaluate(inputs.lm, inputs.splits, inputs.cfg.memorization, inputs.cfg.perplexity.batch_tokens)
    except ValueError as err:
        raise UserError(str(err)) from None


def evaluate(lm: LoadedModel, splits: dict[str, list[dict]], cfg: MemorizationConfig, batch_tokens: int) -> SectionResult:
    """Per repeat count: canaries measured, mean train copies, token match, exact extraction, continuation
    loss; and every canary's row."""
    prefix, length = cfg.prefix_tokens, cfg.continuation_tokens
    if prefix + 1 + length > lm.max_length:
        raise ValueError(f"evaluate.memorization: 1 + prefix_tokens + continuation_tokens = {prefix + 1 + length} "
                         f"exceeds the model's context ({lm.max_length})")
    rows = find_canaries(splits)
    if not rows:
        raise ValueError("evaluate.memorization: no canaries in the splits; set ingest.canaries (tasks/lib/canaries.py)")
    tokens = lm.encode([row["text"] for row in rows])
    measured = [(row, ids) for row, ids in zip(rows, tokens)
                if len(ids) >= prefix + length and (row["repeats"] == 0 or row["train_copies"] > 0)]
    generated = greedy_continuations(lm, [[lm.prefix_id, *ids[:prefix]] for _, ids in measured], length)
    losses = continuation_losses(lm, [ids[: prefix + length] for _, ids in measured], prefix, batch_tokens)
    per_canary = []
    for (row, ids), guess, loss in zip(measured, generated, losses):
        truth = ids[prefix : prefix + length]
        matched = sum(a == b for a, b in zip(guess, truth))
        per_canary.append({"original": row["original"], "repeats": row["repeats"], "train_copies": row["train_copies"],
                           "token_match": matched / length, "extracted": matched == length, "continuation_loss": loss})
    levels: dict[int, list[dict]] = defaultdict(list)
    for row in per_canary:
        levels[row["repeats"]].append(row)
    summary, metrics = {}, {}
    for repeats, group in sorted(levels.items()):
        summary[repeats] = {
            "canaries": len(group),
            "train_copies": sum(r["train_copies"] for r in group) / len(group),
            "token_match": sum(r["token_match"] for r in group) / len(group),
            "extracted": sum(r["extracted"] for r in group) / len(group),
            "continuation_loss": sum(r["continuation_loss"] for r in group) / len(group),
        }
        for name, value in summary[repeats].items():
            metrics[f"eval/memorization/r{repeats}/{name}"] = float(value)
    skipped = {"too_short": sum(len(ids) < prefix + length for ids in tokens),
               "not_in_train": sum(r["repeats"] > 0 and r["train_copies"] == 0 for r in rows)}
    metrics["eval/memorization/canaries"] = float(len(per_canary))
    return SectionResult({"prefix_tokens": prefix, "continuation_tokens": length, "by_repeats": summary,
                          "not_measured": skipped, "canaries": per_canary}, metrics)
