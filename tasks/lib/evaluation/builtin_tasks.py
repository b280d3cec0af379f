"""In-context tasks derived from held-out documents of the built-in corpus (Python's documentation).

Deterministic functions of the documents (ids `stdlib:<module>:<qualname>`, `pydoc:<topic>`): the
test split gives the scored examples, the validation split the demonstration pool, so neither was
trained on (dedup's decontamination removed training documents sharing a 13-gram with them) and no
demonstration is ever the example being scored. A task spec in data/eval/ names its builder with
`data: {builtin: NAME}`; each builder returns example dicts with `id`, the template's fields,
`choices` and `label` (the index of the right choice).
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(`])")
KINDS = ["class", "function", "module"]


def one_line(text: str, max_chars: int) -> str:
    """Whitespace collapsed, cut at a word boundary to at most max_chars."""
    flat = " ".join(text.split())
    if len(flat) <= max_chars:
        return flat
    return flat[:max_chars].rsplit(" ", 1)[0] + " ..."


def docstring_kind_of(doc_id: str) -> str | None:
    """class / function / module from a built-in corpus id; None for pydoc topics and other corpora."""
    parts = doc_id.split(":")
    if len(parts) < 2 or parts[0] != "stdlib":
        return None
    if len(parts) < 3 or not parts[2]:
        return "module"
    last = parts[2].split(".")[-1]
    return "class" if last[:1].isupper() else "function"


def docstring_kind(docs: list[dict], seed: int, max_chars: int = 200) -> list[dict]:
    """Does this docstring document a class, a function (or method) or a module? Balanced: the same
    number of each kind (the rarest kind's count), so chance is exactly 1/3."""
    by_kind: dict[str, list[dict]] = {k: [] for k in KINDS}
    for doc in sorted(docs, key=lambda d: d["id"]):
        kind = docstring_kind_of(doc["id"])
        if kind is not None and doc["text"].strip():
            by_kind[kind].append(doc)
    per_kind = min(len(v) for v in by_kind.values())
    rng = np.random.default_rng(seed)
    examples = []
    for label, kind in enumerate(KINDS):
        chosen = rng.choice(len(by_kind[kind]), size=per_kind, replace=False) if per_kind else []
        for i in sorted(chosen):
            doc = by_kind[kind][i]
            examples.append({"id": doc["id"], "text": one_line(doc["text"], max_chars), "choices": KINDS, "label": label})
    order = rng.permutation(len(examples))
    return [examples[i] for i in order]


def first_two_sentences(text: str, max_chars: int) -> tuple[str, str] | None:
    sentences = [" ".join(s.split()) for s in _SENTENCE_END.split(text.strip())]
    if len(sentences) < 2:
        return None
    first, second = sentences[0], sentences[1]
    if not (3 <= len(first.split()) and len(first) <= max_chars and 3 <= len(second.split()) and len(second) <= max_chars):
        return None
    return first, second


def next_sentence(docs: list[dict], seed: int, max_chars: int = 100, n_choices: int = 4) -> list[dict]:
    """Which sentence comes next? The true second sentence of a docstring against the second
    sentences of n_choices - 1 other docstrings of the same split; the answer's position is drawn at
    random, so chance is 1 / n_choices."""
    pairs, answers = [], set()
    for doc in sorted(docs, key=lambda d: d["id"]):
        split = first_two_sentences(doc["text"], max_chars)
        if split is not None and split[1] not in answers:
            pairs.append((doc["id"], *split))
            answers.add(split[1])
    if len(pairs) < n_choices:
        return []
    rng = np.random.default_rng(seed)
    examples = []
    for i, (doc_id, context, answer) in enumerate(pairs):
        others = [j for j in rng.choice(len(pairs), size=min(n_choices + 2, len(pairs)), replace=False) if j != i][: n_choices - 1]
        choices = [pairs[j][2] for j in others]
        label = int(rng.integers(n_choices))
        choices.insert(label, answer)
        examples.append({"id": doc_id, "context": context, "choices": choices, "label": label})
    order = rng.permutation(len(examples))
    return [examples[i] for i in order]


def function_name_of(doc_id: str) -> str | None:
    """The name a function's docstring is filed under (`stdlib:json:dumps` -> dumps); None otherwise."""
    if docstring_kind_of(doc_id) != "function":
        return None
    return doc_id.split(":")[2].split(".")[-1]


def mask_name(text: str, name: str) -> str:
    """The docstring with its own name (as a whole word) replaced by `...`, so the answer is not in it."""
    return re.sub(rf"(?<![\w.]){re.escape(name)}(?!\w)", "...", text)


def api_name(docs: list[dict], seed: int, max_chars: int = 200, n_choices: int = 4) -> list[dict]:
    """Which function does this docstring document? The function's own name against the names of
    n_choices - 1 other documented functions of the same split (all names distinct, the name masked in
    the docstring); the answer's position is drawn at random, so chance is 1 / n_choices. Knowing the
    standard library and reading the docstring both help; a model that does neither scores chance."""
    entries, seen = [], set()
    for doc in sorted(docs, key=lambda d: d["id"]):
        name = function_name_of(doc["id"])
        if name is None or name.startswith("_") or name in seen or not doc["text"].strip():
            continue
        seen.add(name)
        entries.append((doc["id"], name, one_line(mask_name(doc["text"], name), max_chars)))
    if len(entries) < n_choices:
        return []
    rng = np.random.default_rng(seed)
    examples = []
    for i, (doc_id, name, text) in enumerate(entries):
        others = [j for j in rng.choice(len(entries), size=min(n_choices + 2, len(entries)), replace=False) if j != i]
        choices = [entries[j][1] for j in others[: n_choices - 1]]
        label = int(rng.integers(n_choices))
        choices.insert(label, name)
        examples.append({"id": doc_id, "text": text, "choices": choices, "label": label})
    order = rng.permutation(len(examples))
    return [examples[i] for i in order]


BUILDERS: dict[str, Callable[[list[dict], int], list[dict]]] = {
    "api_name": api_name,
    "docstring_kind": docstring_kind,
    "next_sentence": next_sentence,
}
