"""Canaries: documents of the corpus held out, then put back a chosen number of times, to measure how
much a model memorises as a function of how often it saw a text (Carlini et al., 2019 and 2023;
Kandpal et al., 2022) and what deduplication changes (Lee et al., 2022).

`ingest.canaries` picks documents of the sources by a salted hash of their id (a `fraction` of those
of `min_chars` to `max_chars` characters), gives each a repeat count drawn from `repeats` by a second
hash, and writes that many copies in place of the document. A repeat count of 0 makes a never-seen
control: its one copy goes to the test split, so no model trains on it, and decontamination removes
training documents that share its n-grams. The other canaries' copies all go to the train split
(dedup, which reads `ingest.canaries` when it is set); deduplication then keeps one copy of each.
`evaluate.memorization` reads the canaries back from the splits and measures, per repeat count, how
much of each one's continuation greedy decoding reproduces from its opening tokens.

A copy's id says what it is: canary:<repeats>:<copy>:<the document's id>.
"""

from __future__ import annotations

import re

import xxhash

ID = re.compile(r"^canary:(?P<repeats>\d+):(?P<copy>\d+):(?P<original>.+)$", re.DOTALL)


def repeats_of(doc_id: str, text: str, cfg) -> int | None:
    """The repeat count of a document chosen as a canary (config `ingest.canaries`), None for the others."""
    if not cfg.min_chars <= len(text) <= cfg.max_chars:
        return None
    if xxhash.xxh64_intdigest(f"{cfg.salt}\x00{doc_id}".encode()) / 2.0**64 >= cfg.fraction:
        return None
    drawn = xxhash.xxh64_intdigest(f"{cfg.salt}\x01{doc_id}".encode())
    return cfg.repeats[(drawn + getattr(cfg, "rotation", 0)) % len(cfg.repeats)]


def copies(document: dict, repeats: int) -> list[dict]:
    """The documents written in place of a canary: `repeats` copies, or the one never-seen control."""
    return [{**document, "id": f"canary:{repeats}:{copy}:{document['id']}"} for copy in range(max(repeats, 1))]


def parse(doc_id: str) -> tuple[int, str] | None:
    """(repeats, the original id) of a canary copy's id; None for other documents."""
    match = ID.match(doc_id)
    return (int(match["repeats"]), match["original"]) if match else None


def forced_split(doc_id: str) -> str | None:
    """Where a canary copy must go: test for a never-seen control, train for the others."""
    parsed = parse(doc_id)
    if parsed is None:
        return None
    return "test" if parsed[0] == 0 else "train"
