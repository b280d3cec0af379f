"""In-context accuracy: tasks are data (a YAML/JSON spec), one scoring engine serves them all.

A spec (data/eval/*.yaml, format in data/eval/README.md) names the data (a built-in derived task or
a JSONL / JSON / GLUE-style TSV / CSV / Parquet file), the template that turns an example into text,
the choices (fixed verbalisers or a per-example list) and the label field. As in
lm-evaluation-harness:

    prompt(example)  = [eos] + demonstrations + template.format(example)    ([eos]: see leading_eos)
    continuation_j   = target_delimiter + choice_j              (" " by default)
    demonstration    = template.format(demo) + target_delimiter + choice[label] + fewshot_delimiter
    acc              = argmax_j  ln p(continuation_j | prompt)
    acc_norm         = argmax_j  ln p(continuation_j | prompt) / characters of choice_j
    acc_bytes        = argmax_j  ln p(continuation_j | prompt) / UTF-8 bytes of choice_j
(the harness's names: the two differ on any non-ASCII choice, Chinese text included)

Demonstrations (Min et al., 2022): `gold` labels, `random` labels (each drawn uniformly from that
demonstration's choices, the inputs unchanged), or `none` (the inputs alone, no label). For each seed
the demonstrations are the first k of a seeded shuffle of the demonstration pool, which never holds a
scored example. Prompt and continuations are tokenized as the harness tokenizes them (encode_pairs),
and the tokens the prompts of one setting share are computed once per packed row (see packing.py).

Answer-level calibration: confidence = the softmax over the choices' log-likelihoods of the chosen one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import xxhash

from jielong.tasks.core.schema import UserError
from jielong.tasks.lib.evaluation import builtin_tasks, plots
from jielong.tasks.lib.evaluation.harness_tasks import HarnessTask
from jielong.tasks.lib.evaluation.calibration import ece_equal_mass, ece_equal_width, reliability
from jielong.tasks.lib.evaluation.model import LoadedModel, final_hidden, head_logits
from jielong.tasks.lib.evaluation.packing import Segment, pack_rows
from jielong.tasks.lib.evaluation.registry import Inputs, SectionResult

from jielong.tasks.lib.evaluation.specs import SPEC_DIR, TaskData, TaskSpec, _path, is_harness, load_spec, resolve_spec_path, spec_files  # noqa: F401

Mode = Literal["gold", "random", "none"]


# ---------------------------------------------------------------- examples


def read_records(path: Path, fmt: str | None, columns: list[str] | None) -> list[dict]:
    """The rows of a task data file, read by the shared reader (tasks/lib/sources/reader.py); each row's id
    is its own `id` field or `<file name>#<row number>`. A file with unreadable rows is an error:
    a task scored on a silently different set of examples would not be comparable."""
    from jielong.tasks.lib.sources.reader import FileOptions, read_file

    if not path.is_file():
        raise FileNotFoundError(f"task data file {path} does not exist")
    options = FileOptions(format=fmt or _format_of(path), columns=tuple(columns) if columns else None)
    rows, bad = [], []
    for item in read_file(path, path.name, options):
        if "record" not in item:
            bad.append(f"{item['id']}: {item.get('reason', 'not a record')} {item.get('detail', '')}".strip())
        elif not isinstance(item["record"], dict):
            bad.append(f"{item['id']}: not an object")
        else:
            rows.append({**item["record"], "_row_id": item["id"]})
    if bad:
        raise ValueError(f"{path}: {len(bad)} unreadable rows, e.g. {'; '.join(bad[:3])}")
    return rows


def label_file_records(spec: TaskSpec, base: Path, seed: int) -> list[dict]:
    """The examples of one-file-per-label data, in a seeded shuffle (so any prefix mixes the labels).
    A structured file's rows keep their fields; a text file gives one example per non-empty line,
    its text in `input_field`."""
    from jielong.tasks.lib.sources.reader import STRUCTURED, format_of

    records = []
    for label, value in spec.data.label_files.items():
        path = _path(base, value)
        if (spec.data.format or format_of(path)[0]) in STRUCTURED:
            rows = read_records(path, spec.data.format, spec.data.columns)
        else:
            rows = [{spec.input_field: line, "_row_id": row_id} for row_id, line in _text_lines(path)]
        records += [{**row, spec.label_field: label} for row in rows]
    order = np.random.default_rng([seed, 2]).permutation(len(records))
    return [records[i] for i in order]


def _text_lines(path: Path) -> list[tuple[str, str]]:
    """(id, text) of each non-empty line of a text file, read by the shared reader."""
    from jielong.tasks.lib.sources.reader import FileOptions, read_file

    if not path.is_file():
        raise FileNotFoundError(f"task data file {path} does not exist")
    lines, bad = [], []
    for item in read_file(path, path.name, FileOptions(text_unit="line", format="text")):
        if "reason" in item:
            bad.append(f"{item['id']}: {item['reason']}")
        else:
            lines.append((item["id"], item["text"].strip()))
    if bad:
        raise ValueError(f"{path}: {len(bad)} unreadable lines, e.g. {'; '.join(bad[:3])}")
    return lines


def _format_of(path: Path) -> str:
    from jielong.tasks.lib.sources.reader import STRUCTURED, format_of

    fmt, _ = format_of(path)
    if fmt not in STRUCTURED:
        raise ValueError(f"{path}: unknown task data format (give data.format: jsonl, json, tsv, csv or parquet)")
    return fmt


def normalize(spec: TaskSpec, record: dict, index: int) -> dict:
    """An example with `id`, its fields, `choices` (list of str) and `label` (int index)."""
    example = dict(record)
    row_id = example.pop("_row_id", str(index))
    example["id"] = str(example["id"]) if example.get("id") is not None else row_id
    choices = list(spec.choices) if spec.choices is not None else [str(c) for c in record[spec.choices_field]]
    raw = record[spec.label_field] if spec.label_field in record else record.get("label")
    example["choices"] = choices
    example["label"] = _label_index(spec, raw, choices)
    if spec.max_input_chars and isinstance(example.get(spec.input_field), str):
        example[spec.input_field] = builtin_tasks.one_line(example[spec.input_field], spec.max_input_chars)
    return example


def _label_index(spec: TaskSpec, raw, choices: list[str]) -> int:
    if spec.label_values is not None:
        return spec.label_values.index(str(raw))
    if isinstance(raw, str) and raw in choices:  # a choice string wins over a digit string
        index = choices.index(raw)
    elif isinstance(raw, (int, np.integer)) or (isinstance(raw, str) and raw.strip().lstrip("-").isdigit()):
        index = int(raw)
    else:
        raise ValueError(f"task {spec.name}: label {raw!r} is neither an index nor one of {choices}")
    if not 0 <= index < len(choices):
        raise ValueError(f"task {spec.name}: label {index} out of range for {len(choices)} choices")
    return index


@dataclass
class Task:
    spec: TaskSpec
    examples: list[dict]  # scored
    pool: list[dict]  # demonstrations


def load_task(spec: TaskSpec, base: Path, heldout: dict[str, list[dict]], max_examples: int | None,
              seed: int = 0) -> Task:
    """Scored examples and the demonstration pool, disjoint by construction. `heldout` holds the
    documents of the 'test' and 'validation' splits (for built-in derived tasks)."""
    if spec.data.builtin:
        build = builtin_tasks.BUILDERS[spec.data.builtin]
        examples = build(heldout.get("test", []), seed)
        pool = build(heldout.get("validation", []), seed)
    else:
        if spec.data.label_files:
            records = label_file_records(spec, base, seed)
        else:
            records = read_records(_path(base, spec.data.path), spec.data.format, spec.data.columns)
        examples = [normalize(spec, r, i) for i, r in enumerate(records)]
        if spec.data.fewshot_path:
            pool_records = read_records(_path(base, spec.data.fewshot_path), spec.data.format, spec.data.columns)
            pool = [normalize(spec, r, i) for i, r in enumerate(pool_records)]
        else:
            order = np.random.default_rng(seed).permutation(len(examples))
            size = min(spec.data.fewshot_pool, len(examples) // 2)
            pool = [examples[i] for i in sorted(order[:size])]
            examples = [examples[i] for i in sorted(order[size:])]
    if spec.choices is not None:
        for example in examples + pool:
            example["choices"] = list(spec.choices)
    # a demonstration never shows a scored input (two files may share sentences; ids are per file)
    scored_inputs = {spec.doc_to_text(e) for e in examples}
    pool = [d for d in pool if spec.doc_to_text(d) not in scored_inputs]
    if max_examples is not None and len(examples) > max_examples:
        examples = examples[:max_examples]  # builders and files are already in a seeded/stable order
    return Task(spec, examples, pool)


# ---------------------------------------------------------------- prompts


def select_demos(pool: list[dict], k: int, seed: int) -> list[dict]:
    """The first k of a seeded shuffle of the pool: nested in k, the same for every mode."""
    order = np.random.default_rng([seed, 0]).permutation(len(pool))
    return [pool[i] for i in order[:k]]


def random_labels(demos: list[dict], seed: int) -> list[int]:
    """One label per demonstration, uniform over its choices (nested in k like the demonstrations)."""
    rng = np.random.default_rng([seed, 1])
    return [int(rng.integers(len(d["choices"]))) for d in demos]


def demo_labels(demos: list[dict], mode: Mode, seed: int) -> list[int | None]:
    if mode == "gold":
        return [d["label"] for d in demos]
    if mode == "random":
        return random_labels(demos, seed)
    return [None] * len(demos)


def demo_block(spec: TaskSpec, demo: dict, label: int | None) -> str:
    text = spec.doc_to_text(demo)
    if label is not None:
        text += spec.target_delimiter + spec.doc_to_choice(demo)[label]
    return text + spec.fewshot_delimiter


def render_prompt(spec: TaskSpec, example: dict, demos: list[dict], labels: list[int | None]) -> str:
    """The full context text (without the leading end-of-text token), for reading and tests."""
    return "".join(demo_block(spec, d, l) for d, l in zip(demos, labels)) + spec.doc_to_text(example)


# ---------------------------------------------------------------- the engine


@dataclass
class Item:
    query: list[int]
    continuations: list[list[int]]
    loglik: np.ndarray | None = None  # filled by score_groups: one value per continuation
    greedy: np.ndarray | None = None  # filled by score_groups: is each continuation the greedy one

    @property
    def size(self) -> int:
        return len(self.query) + sum(len(c) - 1 for c in self.continuations)


@dataclass
class Group:
    prefix: list[int]  # the tokens every item's prompt starts with ([eos] + demonstrations, mostly)
    items: list[Item]


def score_groups(lm: LoadedModel, groups: list[Group], pack_tokens: int, batch_rows: int) -> None:
    """Fill every item's loglik: sum of ln p(continuation tokens | prefix + query), all in packed rows."""
    rows = [row for group in groups for row in _rows_of(group, pack_tokens)]
    rows.sort(key=lambda row: -sum(len(s.tokens) for s in row))
    for b in range(0, len(rows), batch_rows):
        batch = rows[b : b + batch_rows]
        packed = pack_rows(batch, lm.eos_id)
        where_r, where_c, targets, owners, tags = _continuation_positions(batch, packed)
        hidden = final_hidden(lm, packed.input_ids, packed.mask, packed.position_ids)
        logits = head_logits(lm, hidden[where_r.to(hidden.device), where_c.to(hidden.device)])
        lp = logits.gather(1, targets[:, None].to(logits.device))[:, 0] - torch.logsumexp(logits, -1)
        sums = np.bincount(owners, weights=lp.double().cpu().numpy(), minlength=len(tags))
        misses = np.bincount(owners, weights=(logits.argmax(-1).cpu() != targets).numpy(), minlength=len(tags))
        for (item, j), total, missed in zip(tags, sums, misses):
            item.loglik[j] = total
            item.greedy[j] = missed == 0


MIN_ROW_TOKENS = 256


def row_capacity(prefix_len: int, pack_tokens: int) -> int:
    """Tokens per packed row for a group: about four times its shared prefix (so recomputing the prefix
    once per row costs at most about a third of the row), at least MIN_ROW_TOKENS, at most pack_tokens.
    Attention costs a row's length squared whatever the mask, so rows stay no longer than the sharing
    pays for: zero-shot prompts share nothing and go in short rows."""
    return min(pack_tokens, max(MIN_ROW_TOKENS, 4 * prefix_len))


def _rows_of(group: Group, pack_tokens: int) -> list[list[Segment]]:
    """The group's items in order, as many per row as fit after the shared prefix."""
    rows, row, used = [], None, 0
    capacity = row_capacity(len(group.prefix), pack_tokens)
    for item in group.items:
        item.loglik = np.zeros(len(item.continuations))
        item.greedy = np.zeros(len(item.continuations), dtype=bool)
        if row is not None and used + item.size > capacity:
            rows.append(row)
            row = None
        if row is None:
            row, used = [Segment(group.prefix)], len(group.prefix)
        q = len(row)
        row.append(Segment(item.query, parent=0, tag=item))
        for j, cont in enumerate(item.continuations):
            # a continuation's last token predicts nothing that is scored: it is not fed (one-token
            # choices cost no position at all, their log-likelihood comes from the query's last output)
            row.append(Segment(cont[:-1], parent=q, tag=(item, j)))
        used += item.size
    if row is not None:
        rows.append(row)
    return rows


def _continuation_positions(batch: list[list[Segment]], packed):
    """For every continuation token: the row and position whose output predicts it, the token, and the
    index of its continuation in `tags`, the list of (item, continuation index)."""
    rows, cols, targets, owners, tags = [], [], [], [], []
    for r, row in enumerate(batch):
        starts = packed.starts[r]
        for s, seg in enumerate(row):
            if not isinstance(seg.tag, tuple):
                continue
            parent = row[seg.parent]
            # the first continuation token is predicted by the query's last token (or the prefix's)
            first_pred = starts[seg.parent] + len(parent.tokens) - 1 if parent.tokens else len(row[0].tokens) - 1
            item, j = seg.tag
            positions = [first_pred] + list(range(starts[s], starts[s] + len(seg.tokens)))
            rows.extend([r] * len(positions))
            cols.extend(positions)
            targets.extend(item.continuations[j])
            owners.extend([len(tags)] * len(positions))
            tags.append(seg.tag)
    return torch.tensor(rows), torch.tensor(cols), torch.tensor(targets, dtype=torch.long), np.array(owners), tags


# ---------------------------------------------------------------- one task, every setting


@dataclass
class Setting:
    mode: str
    k: int
    seed: int
    items: list[Item] = field(default_factory=list)
    k_used: list[int] = field(default_factory=list)


class Encoded:
    """Token counts of each example's query and longest continuation, tokenized alone: what decides how
    many demonstrations fit in the model's context, computed once for all settings."""

    def __init__(self, lm: LoadedModel, task: Task):
        spec = task.spec
        self.query_len = [len(q) for q in lm.encode([spec.doc_to_text(e) for e in task.examples])]
        flat = [spec.target_delimiter + c for e in task.examples for c in spec.doc_to_choice(e)]
        lengths = iter(len(t) for t in lm.encode(flat))
        self.longest = [max(next(lengths) for _ in spec.doc_to_choice(e)) for e in task.examples]


def encode_pairs(lm: LoadedModel, contexts: list[str], continuations: list[list[str]]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Tokens of (context, continuation) pairs split as lm-evaluation-harness splits them: the context's
    trailing whitespace moves to the continuation, the context is tokenized alone, and a continuation's
    tokens are what tokenizing context + continuation adds after the context's tokens. The whole
    context is one string, so tokens merge across demonstration boundaries as they do in the harness."""
    stripped = [c.rstrip() for c in contexts]
    context_tokens = lm.encode(stripped)
    whole = iter(lm.encode([c + cont for c, conts in zip(contexts, continuations) for cont in conts]))
    cont_tokens = [[next(whole)[len(ctx):] for _ in conts] for ctx, conts in zip(context_tokens, continuations)]
    return context_tokens, cont_tokens


def build_setting(lm: LoadedModel, task: Task, enc: Encoded, mode: str, k: int, seed: int,
                  leading_eos: bool = True) -> tuple[Setting, list[Group]]:
    """Groups (one per number of demonstrations that fits) for one (mode, k, seed). Each prompt is
    tokenized whole (see encode_pairs); a group's items share the tokens their prompts have in common
    (the demonstrations, up to the boundary with the query), which are computed once per packed row."""
    spec = task.spec
    demos = select_demos(task.pool, k, seed)
    labels = demo_labels(demos, mode, seed)
    blocks = lm.encode([demo_block(spec, d, l) for d, l in zip(demos, labels)])
    lead = [lm.eos_id] if leading_eos else []
    prefix_len = np.cumsum([len(lead)] + [len(b) for b in blocks])
    by_k: dict[int, list[int]] = {}
    used_of: list[int] = []
    for i, (query_len, longest) in enumerate(zip(enc.query_len, enc.longest)):
        fits = [j for j in range(len(demos) + 1) if prefix_len[j] + query_len + longest <= lm.max_length]
        used_of.append(fits[-1] if fits else 0)
        by_k.setdefault(used_of[-1], []).append(i)
    items: dict[int, Item] = {}
    groups = []
    for used, members in sorted(by_k.items()):
        examples = [task.examples[i] for i in members]
        contexts = [render_prompt(spec, e, demos[:used], labels[:used]) for e in examples]
        choices = [[spec.target_delimiter + c for c in spec.doc_to_choice(e)] for e in examples]
        group = group_of(lm, contexts, choices, leading_eos)
        items.update(zip(members, group.items))
        groups.append(group)
    setting = Setting(mode, k, seed, items=[items[i] for i in range(len(task.examples))], k_used=used_of)
    return setting, groups


def group_of(lm: LoadedModel, contexts: list[str], continuations: list[list[str]], leading_eos: bool) -> Group:
    """(context, continuations) pairs as one group: tokenized as the harness tokenizes them (encode_pairs),
    the tokens every context starts with computed once per packed row."""
    context_tokens, cont_tokens = encode_pairs(lm, contexts, continuations)
    lead = [lm.eos_id] if leading_eos else []
    full = []
    for ctx, conts in zip(context_tokens, cont_tokens):
        ctx = lead + ctx if lead or ctx else [lm.prefix_id]  # an empty context: the harness's prefix token
        room = lm.max_length - max(len(c) for c in conts)
        full.append(ctx[-room:] if len(ctx) > room else ctx)  # left-truncated if even k=0 overflows
    shared = min(len(os.path.commonprefix(full)), min(len(f) for f in full) - 1)
    return Group(full[0][:shared], [Item(f[shared:], conts) for f, conts in zip(full, cont_tokens)])


def build_harness_setting(lm: LoadedModel, task: HarnessTask, mode: str, k: int, seed: int) -> tuple[Setting, list[Group]]:
    """One (mode, k, seed) of a harness task: its own requests (harness_tasks.py), this engine's scoring. An
    example's requests that share a context are one item; a multiple-input example (a context per choice)
    is a JointItem of one item per context, as is an example with acc_mutual_info's unconditional requests
    (empty contexts, scored in a group of their own so that they do not cut the prompts' shared prefix)."""
    contexts, continuations, owner = [], [], []
    for e, reqs in enumerate(task.requests(mode, k, seed)):
        for context, continuation in reqs:
            if owner and owner[-1] == e and contexts[-1] == context:
                continuations[-1].append(continuation)
            else:
                contexts.append(context)
                continuations.append([continuation])
                owner.append(e)
    groups, item_of = [], {}
    for unconditional in (False, True):
        at = [i for i, context in enumerate(contexts) if (context == "") == unconditional]
        if at:
            groups.append(group_of(lm, [contexts[i] for i in at], [continuations[i] for i in at], leading_eos=False))
            item_of.update(zip(at, groups[-1].items))
    parts: dict[int, list[Item]] = {}
    for i, e in enumerate(owner):
        parts.setdefault(e, []).append(item_of[i])
    items = [p[0] if len(p) == 1 else JointItem(p) for _, p in sorted(parts.items())]
    return Setting(mode, k, seed, items=items, k_used=[k] * len(items)), groups


@dataclass
class JointItem:
    """One example scored as several items (a multiple-input task: one context per choice), its values
    in choice order."""

    parts: list[Item]

    @property
    def loglik(self) -> np.ndarray:
        return np.concatenate([p.loglik for p in self.parts])

    @property
    def greedy(self) -> np.ndarray:
        return np.concatenate([p.greedy for p in self.parts])


def example_metrics(items: list[Item], examples: list[dict], spec: TaskSpec, mass_bins: int, width_bins: int) -> dict:
    if getattr(spec, "output_type", "multiple_choice") == "loglikelihood":
        return loglikelihood_metrics(items, mass_bins, width_bins)
    choices = [spec.doc_to_choice(e) for e in examples]
    # one value per choice (acc_mutual_info's unconditional log-likelihoods follow them: the task's own metric)
    lls = [item.loglik[: len(cs)] for item, cs in zip(items, choices)]
    golds = [e["label"] for e in examples]
    pred = np.array([int(np.argmax(ll)) for ll in lls])
    pred_norm = _normalized_pred(lls, [[len(c) for c in cs] for cs in choices])
    pred_bytes = _normalized_pred(lls, [[len(c.encode("utf-8")) for c in cs] for cs in choices])
    confidence = np.array([_softmax(ll).max() for ll in lls])
    correct = _hits(pred, golds)
    several = any(isinstance(g, list) for g in golds)
    return {
        "acc": float(correct.mean()),
        "acc_norm": float(_hits(pred_norm, golds).mean()),
        "acc_bytes": float(_hits(pred_bytes, golds).mean()),
        "macro_f1": float("nan") if several else macro_f1(np.array(golds), pred),
        f"ece_{mass_bins}_bin": ece_equal_mass(confidence, correct, mass_bins),
        f"ece_{width_bins}_bin_equal_width": ece_equal_width(confidence, correct, width_bins),
        "_confidence": confidence.tolist(),
        "_correct": correct.tolist(),
    }


def _hits(pred: np.ndarray, golds: list) -> np.ndarray:
    """1.0 where the prediction is the gold index, or one of them when an example has several."""
    return np.array([float(p in g) if isinstance(g, list) else float(p == g) for p, g in zip(pred, golds)])


def setting_metrics(task: Task, items: list[Item], mass_bins: int, width_bins: int) -> dict:
    """One setting's metrics: jielong's (example_metrics) and, for a harness task, the task's own metric_list
    through its process_results and aggregations, which win where a name is in both (they agree on acc,
    acc_norm and acc_bytes; a custom process_results may mean something else by a name)."""
    metrics = example_metrics(items, task.examples, task.spec, mass_bins, width_bins)
    if isinstance(task, HarnessTask):
        metrics.update(task.own_metrics([(item.loglik, item.greedy) for item in items]))
    return metrics


def _normalized_pred(lls: list[np.ndarray], lengths: list[list[int]]) -> np.ndarray:
    """argmax of log-likelihood per unit of length (an empty choice counts as 1)."""
    return np.array([int(np.argmax(ll / np.maximum(1, n))) for ll, n in zip(lls, lengths)])


def loglikelihood_metrics(items: list[Item], mass_bins: int, width_bins: int) -> dict:
    """A harness `loglikelihood` task: acc = the target is the greedy continuation, perplexity =
    exp(-mean log-likelihood of the target) over examples (the harness's `perplexity` aggregation).
    One continuation per example: no choice to normalise or calibrate."""
    nan = float("nan")
    return {
        "acc": float(np.mean([item.greedy[0] for item in items])),
        "perplexity": float(np.exp(-np.mean([item.loglik[0] for item in items]))),
        "acc_norm": nan, "acc_bytes": nan, "macro_f1": nan, f"ece_{mass_bins}_bin": nan, f"ece_{width_bins}_bin_equal_width": nan,
        "_confidence": [], "_correct": [],
    }


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def macro_f1(gold: np.ndarray, pred: np.ndarray) -> float:
    """Mean F1 over the classes present in gold or predictions (sklearn's average='macro', zero_division=0)."""
    scores = []
    for c in np.union1d(gold, pred):
        tp = np.sum((pred == c) & (gold == c))
        fp = np.sum((pred == c) & (gold != c))
        fn = np.sum((pred != c) & (gold == c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else float("nan")


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


@dataclass
class TaskResult:
    name: str
    chance: float
    chance_note: str
    n_examples: int
    n_pool: int
    # rows: mode, k, mean/std of every metric, mean k used, per-seed values
    table: list[dict]
    answer_calibration: dict  # pooled over every setting
    confidence: list[float]
    correct: list[float]
    # per scored example: an id, and per setting ("MODE/kK") each in-context seed's correctness and confidence
    items: dict = field(default_factory=dict)


def evaluate_task(lm: LoadedModel, task: Task, shots: list[int], modes: list[str], seeds: list[int],
                  pack_tokens: int, batch_rows: int, mass_bins: int = 10, width_bins: int = 15,
                  leading_eos: bool = True) -> TaskResult:
    """Every (mode, k, seed) of one task. `leading_eos` (the spec's own setting wins): start each
    prompt with an end-of-text token (jielong's default) or not (lm-evaluation-harness's convention
    for a model without a BOS token, e.g. SmolLM2)."""
    if isinstance(task, HarnessTask):
        return _evaluate_harness(lm, task, shots, modes, seeds, pack_tokens, batch_rows, mass_bins, width_bins)
    enc = Encoded(lm, task)
    if task.spec.leading_eos is not None:
        leading_eos = task.spec.leading_eos
    settings: list[Setting] = []
    groups: list[Group] = []
    if 0 in shots:
        setting, g = build_setting(lm, task, enc, "none", 0, seeds[0], leading_eos)
        settings.append(setting)
        groups += g
    check_shots(task, shots)
    for k in sorted({k for k in shots if k > 0}):
        for mode in modes:
            for seed in seeds:
                setting, g = build_setting(lm, task, enc, mode, k, seed, leading_eos)
                settings.append(setting)
                groups += g
    score_groups(lm, groups, pack_tokens, batch_rows)
    return _summarize(task, settings, modes, mass_bins, width_bins)


def _evaluate_harness(lm: LoadedModel, task: HarnessTask, shots: list[int], modes: list[str], seeds: list[int],
                      pack_tokens: int, batch_rows: int, mass_bins: int, width_bins: int) -> TaskResult:
    """A harness task at every (mode, k, seed) of the modes that can rewrite its demonstrations (supports)."""
    if task.spec.output_type == "loglikelihood_rolling":
        return _evaluate_rolling(lm, task, pack_tokens * batch_rows)
    modes = [m for m in modes if task.supports(m)] or ["gold"]
    settings: list[Setting] = []
    groups: list[Group] = []
    check_shots(task, shots)
    wanted = ([("none", 0, seeds[0])] if 0 in shots else []) + [
        (mode, k, seed) for k in sorted({k for k in shots if k > 0}) for mode in modes for seed in seeds]
    for mode, k, seed in wanted:
        setting, g = build_harness_setting(lm, task, mode, k, seed)
        settings.append(setting)
        groups += g
    score_groups(lm, groups, pack_tokens, batch_rows)
    return _summarize(task, settings, modes, mass_bins, width_bins)


def _evaluate_rolling(lm: LoadedModel, task: HarnessTask, batch_tokens: int) -> TaskResult:
    """A harness loglikelihood_rolling task: each document's log-likelihood from the perplexity engine, in the
    windows of the harness's rolling requests (the model's context, each token scored once after the
    longest context that fits), then the task's own metrics. One row: mode gold, k = 0."""
    from jielong.tasks.lib.evaluation.perplexity import score_documents

    token_ids = lm.encode(task.rolling_texts())
    scores = score_documents(lm, token_ids, lm.max_length, lm.max_length, batch_tokens)
    logliks = np.bincount(scores.doc, weights=scores.logprob, minlength=len(token_ids))
    row = {"mode": "gold", "k": 0, "seeds": 1, "k_used": 0.0, **task.rolling_metrics([float(v) for v in logliks])}
    ids = [xxhash.xxh64_hexdigest(json.dumps(e, sort_keys=True, default=str).encode()) for e in task.examples]
    return TaskResult(task.spec.name, task.spec.chance, task.spec.chance_note, len(task.examples), 0, [row], {}, [], [],
                      {"examples": ids, "settings": {}})


def check_shots(task: Task, shots: list[int]) -> None:
    """Every requested k is honoured, or the evaluation stops and says why (no row silently missing)."""
    wanted = max(shots, default=0)
    if getattr(task.spec, "output_type", "") == "loglikelihood_rolling":
        return  # whole documents, no demonstrations
    if wanted > len(task.pool):
        data = getattr(task.spec, "data", None)
        where = ("the harness task's few-shot docs" if data is None else f"data.fewshot_path {data.fewshot_path}" if data.fewshot_path else
                 "the validation split's documents" if data.builtin else f"data.fewshot_pool: {data.fewshot_pool}")
        raise UserError(
            f"in-context task {task.spec.name!r}: evaluate.icl.shots asks for k = {wanted} demonstrations, but its "
            f"demonstration pool holds {len(task.pool)} (from {where}, without inputs that are also scored); "
            "lower evaluate.icl.shots or give the task more demonstrations")


def _summarize(task: Task, settings: list[Setting], modes: list[str], mass_bins: int, width_bins: int) -> TaskResult:
    table, confidence, correct = [], [], []
    by_key: dict[tuple[str, int], list[tuple[Setting, dict]]] = {}
    per_setting: dict[str, dict[str, list]] = {}
    for s in settings:
        m = setting_metrics(task, s.items, mass_bins, width_bins)
        kept = per_setting.setdefault(f"{s.mode}/k{s.k}", {"correct": [], "confidence": []})
        kept["correct"].append(m["_correct"])
        kept["confidence"].append([round(c, 6) for c in m["_confidence"]])
        confidence += m.pop("_confidence")
        correct += m.pop("_correct")
        for mode in (modes if s.k == 0 else [s.mode]):  # k = 0 is every mode's first point
            by_key.setdefault((mode, s.k), []).append((s, m))
    for (mode, k), runs in sorted(by_key.items(), key=lambda kv: (modes.index(kv[0][0]), kv[0][1])):
        row: dict = {"mode": mode, "k": k, "seeds": len(runs), "k_used": float(np.mean([np.mean(s.k_used) for s, _ in runs]))}
        for metric in runs[0][1]:
            row[metric], row[f"{metric}_std"] = mean_std([m[metric] for _, m in runs])
        row["per_seed_acc"] = [m["acc"] for _, m in runs]
        table.append(row)
    calibration = {
        f"ece_{mass_bins}_bin": ece_equal_mass(confidence, correct, mass_bins),
        f"ece_{width_bins}_bin_equal_width": ece_equal_width(confidence, correct, width_bins),
        "predictions": len(confidence),
    }
    spec = task.spec
    ids = [xxhash.xxh64_hexdigest(json.dumps(e, sort_keys=True, default=str).encode()) for e in task.examples]
    return TaskResult(spec.name, spec.chance, spec.chance_note, len(task.examples), len(task.pool), table,
                      calibration, confidence, correct, {"examples": ids, "settings": per_setting})


def task_metrics(result: TaskResult) -> dict[str, float]:
    """Flat metric names: eval/icl/<task>/<mode>/k<k>/<metric>, plus the task's answer-level ECE."""
    out = {}
    for row in result.table:
        base = f"eval/icl/{result.name}/{row['mode']}/k{row['k']}"
        for key, value in row.items():
            if isinstance(value, float) and not math.isnan(value):
                out[f"{base}/{key}"] = value
    for key, value in result.answer_calibration.items():
        out[f"eval/icl/{result.name}/{key}"] = float(value)
    out[f"eval/icl/{result.name}/chance"] = result.chance
    return out


# ---------------------------------------------------------------- the report section


def prepare(cfg, splits: dict[str, list[dict]], seed: int) -> list[tuple[TaskSpec, Task]]:
    """Every in-context task, loaded and checked before any scoring starts (a mistake fails in seconds)."""
    heldout = {name: splits.get(name, []) for name in ("test", "validation")}
    tasks = []
    for name in cfg.icl.tasks:
        if is_harness(name):
            from jielong.tasks.lib.evaluation import harness_tasks

            for task in harness_tasks.load(resolve_spec_path(name), cfg.icl.max_examples):
                if task.examples:
                    check_shots(task, cfg.icl.shots)
                tasks.append((task.spec, task))
            continue
        try:
            spec, base = load_spec(name)
            task = load_task(spec, base, heldout, cfg.icl.max_examples, seed)
        except (OSError, ValueError, KeyError) as err:  # a missing or malformed spec or data file
            raise UserError(f"in-context task {name!r}: {err}") from None
        if task.examples:
            check_shots(task, cfg.icl.shots)
        tasks.append((spec, task))
    return tasks


def run(inputs: Inputs) -> SectionResult | None:
    """Every prepared task at every (mode, k, seed); an accuracy-vs-k plot per task and one answer
    reliability diagram for all. None when no task is listed."""
    icfg, ccfg = inputs.cfg.icl, inputs.cfg.calibration
    if not icfg.tasks:
        return None
    seeds = [inputs.seed + i for i in range(icfg.num_seeds)]
    part: dict = {"tasks": {}, "skipped": {}}
    metrics: dict[str, float] = {}
    figures, panels, items = [], [], {}
    for spec, task in inputs.prepared["icl"]:
        if not task.examples:
            part["skipped"][spec.name] = "no examples (a built-in task needs the built-in corpus's held-out documents)"
            continue
        result = evaluate_task(inputs.lm, task, icfg.shots, list(icfg.modes), seeds, icfg.pack_tokens, icfg.batch_rows,
                               ccfg.equal_mass_bins, ccfg.equal_width_bins, icfg.leading_eos)
        metrics.update(task_metrics(result))
        items[spec.name] = result.items
        part["tasks"][spec.name] = {
            "description": spec.description, "chance": spec.chance, "chance_note": spec.chance_note,
            "n_examples": result.n_examples, "n_pool": result.n_pool, "table": result.table,
            "answer_calibration": result.answer_calibration,
        }
        if getattr(spec, "output_type", "") == "loglikelihood_rolling":
            continue  # whole-document perplexity: no accuracy or answers to plot
        rel = reliability(result.confidence, result.correct, ccfg.equal_width_bins)
        part["tasks"][spec.name]["reliability"] = rel.__dict__
        figures.append(plots.accuracy_vs_k(spec.name, result.table, spec.chance, inputs.out_dir / f"icl_{spec.name}.png"))
        panels.append((spec.name, rel, {k: v for k, v in result.answer_calibration.items() if k.startswith("ece")}))
    if panels:
        figures.append(plots.reliability_diagram(panels, inputs.out_dir / "reliability_answers.png"))
    groups = {g.name: g for spec, _ in inputs.prepared["icl"] for g in getattr(spec, "groups", ())}
    for name, group in sorted(groups.items()):
        members = {spec.name: part["tasks"][spec.name] for spec, _ in inputs.prepared["icl"]
                   if group in getattr(spec, "groups", ()) and spec.name in part["tasks"]}
        table = group_table(group, members)
        part.setdefault("groups", {})[name] = {"tasks": sorted(members), "metrics": list(group.metrics), "table": table}
        for row in table:
            metrics.update({f"eval/icl/{name}/{row['mode']}/k{row['k']}/{m}": row[m] for m in group.metrics if m in row})
    return SectionResult(part, metrics, figures, {"icl": items})


def group_table(group, members: dict[str, dict]) -> list[dict]:
    """A harness group's aggregate per (mode, k) that every member task has: each of its metrics averaged over the
    tasks that have it, weighted by their numbers of scored examples where the group says so
    (lm-evaluation-harness's aggregate_metric_list: mean, weight_by_size)."""
    if not members:
        return []
    rows_of = {name: {(r["mode"], r["k"]): r for r in task["table"]} for name, task in members.items()}
    sizes = {name: task["n_examples"] for name, task in members.items()}
    common = set.intersection(*(set(rows) for rows in rows_of.values()))
    first = next(iter(members.values()))["table"]
    table = []
    for mode, k in [(r["mode"], r["k"]) for r in first if (r["mode"], r["k"]) in common]:
        row: dict = {"mode": mode, "k": k, "examples": sum(sizes.values())}
        for metric, by_size in zip(group.metrics, group.weight_by_size):
            found = [(rows_of[name][(mode, k)].get(metric), sizes[name] if by_size else 1) for name in members]
            found = [(v, w) for v, w in found if isinstance(v, float) and math.isfinite(v) and w > 0]
            if found:  # as the harness: over the tasks that have the metric
                row[metric] = float(np.average([v for v, _ in found], weights=[w for _, w in found]))
        table.append(row)
    return table
