"""Item-level values of an evaluation artifact, for resampling the measured items.

A metric such as the test perplexity is a function of many measured items (documents, examples,
canaries); which items were drawn is a source of variation of its own. `item_stat` returns, for a
metric an evaluation artifact holds per item, the statistic as a function of resampled item indices:

  perplexity, nll_per_token, validation/perplexity   documents (items.json, written by the evaluate stage)
  knnlm_perplexity, knnlm_sweep/Npct/perplexity      the test documents, with the kNN-LM's nll (items.json)
  ece, ece_10_bin (token level)                       test documents, their tokens pooled (items_tokens.npz)
  icl/TASK/MODE/kK/acc                                the task's scored examples (items.json)
  icl/TASK/ece_10_bin                                 the same examples, every setting pooled
  memorization/rN/{token_match,extracted,continuation_loss}   the canaries of count N (report.json)
  instruct: heldout_{response_loss,choice_accuracy}_{before,after}   the held-out pairs (items.json of instruct)

Items are paired across variants when they are the same items (the `unit`: their kind and ids).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import xxhash

ITEMS_FILE = "items.json"
TOKENS_FILE = "items_tokens.npz"
_ICL_ACC = re.compile(r"^icl/(?P<task>[^/]+)/(?P<mode>[^/]+)/k(?P<k>\d+)/acc$")
_ICL_ECE = re.compile(r"^icl/(?P<task>[^/]+)/ece_(?P<bins>\d+)_bin$")
_MEMO = re.compile(r"^memorization/r(?P<repeats>\d+)/(?P<name>token_match|extracted|continuation_loss)$")
_TOKEN_ECE = re.compile(r"^ece(_(?P<bins>\d+)_bin)?$")
_KNNLM = re.compile(r"^knnlm_(perplexity|sweep/(?P<pct>\d+)pct/perplexity)$")
_INSTRUCT = re.compile(r"^heldout_(?P<what>response_loss|choice_accuracy)_(?P<when>before|after)$")


@dataclass(frozen=True)
class ItemStat:
    """A metric as a function of resampled items: `units` maps each unit (a set of items, by kind and
    ids) to its number of items; `fn` takes one index array per unit (the identity gives the metric)."""

    units: dict[str, int]
    fn: Callable[[dict[str, np.ndarray]], float]

    def full(self) -> float:
        return self.fn({unit: np.arange(n) for unit, n in self.units.items()})

    def describe(self) -> str:
        return ", ".join(f"{n} {unit.split(':')[0]}" for unit, n in self.units.items())


def unit_key(kind: str, ids: list) -> str:
    return f"{kind}:{xxhash.xxh64_hexdigest(json.dumps(ids, default=str).encode())}"


@functools.lru_cache(maxsize=64)
def _json(path: str) -> dict:
    file = Path(path)
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


@functools.lru_cache(maxsize=16)
def _tokens(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(offsets per document, confidence, correct) of the token-level file, tokens in document order."""
    file = Path(path)
    if not file.is_file():
        return None
    with np.load(file, allow_pickle=False) as arrays:
        doc, confidence, correct = arrays["doc"], arrays["confidence"], arrays["correct"]
    offsets = np.searchsorted(doc, np.arange(int(doc.max(initial=-1)) + 2))
    return offsets, confidence.astype(np.float64), correct.astype(np.float64)


def item_stat(artifact: str, name: str) -> ItemStat | None:
    """The item-level statistic of metric `name` of an evaluation artifact, None when it keeps no items for it."""
    items = _json(str(Path(artifact) / ITEMS_FILE))
    if name in ("perplexity", "knnlm_base_perplexity", "nll_per_token", "validation/perplexity"):
        return _documents(items, "validation" if name.startswith("validation/") else "test", name != "nll_per_token")
    if (match := _KNNLM.match(name)) and items.get("knnlm"):
        nll = items["knnlm"]["full"] if match["pct"] is None else items["knnlm"]["sweep"].get(match["pct"])
        return _documents(items, "test", True, nll) if nll is not None else None
    if (match := _TOKEN_ECE.match(name)) and items.get("documents", {}).get("test"):
        return _token_ece(artifact, items, int(match["bins"] or 10))
    if match := _ICL_ACC.match(name):
        return _icl(items, match["task"], [f"{match['mode']}/k{match['k']}"] if match["k"] != "0" else ["none/k0"], None)
    if match := _ICL_ECE.match(name):
        return _icl(items, match["task"], None, int(match["bins"]))
    if match := _INSTRUCT.match(name):
        return _heldout_pairs(items.get("instruct"), match["what"], match["when"])
    if match := _MEMO.match(name):
        report = _json(str(Path(artifact) / "report.json"))
        return _canaries(report.get("memorization", {}).get("canaries"), int(match["repeats"]), match["name"])
    return None


def _documents(items: dict, split: str, exponent: bool, nll_of: list[float] | None = None) -> ItemStat | None:
    """Perplexity (or mean nll) of resampled documents; `nll_of`: another model's per-document nll on the
    same documents (the kNN-LM's)."""
    docs = items.get("documents", {}).get(split)
    if not docs:
        return None
    nll = np.asarray(docs["nll"] if nll_of is None else nll_of, dtype=np.float64)
    tokens = np.asarray(docs["tokens"], dtype=np.float64)
    unit = unit_key(f"{split}-documents", docs["ids"])

    def fn(idx: dict[str, np.ndarray]) -> float:
        i = idx[unit]
        mean = nll[i].sum() / max(tokens[i].sum(), 1.0)
        return float(np.exp(mean)) if exponent else float(mean)

    return ItemStat({unit: len(nll)}, fn)


def _token_ece(artifact: str, items: dict, bins: int) -> ItemStat | None:
    from jielong.tasks.lib.evaluation.calibration import ece_equal_mass

    loaded = _tokens(str(Path(artifact) / TOKENS_FILE))
    if loaded is None:
        return None
    offsets, confidence, correct = loaded
    unit = unit_key("test-documents", items["documents"]["test"]["ids"])
    n_docs = len(offsets) - 1

    def fn(idx: dict[str, np.ndarray]) -> float:
        starts = offsets[idx[unit]]
        lengths = offsets[idx[unit] + 1] - starts
        # every token of the chosen documents: position within its document plus the document's start
        ends = np.cumsum(lengths)
        take = np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - lengths, lengths) + np.repeat(starts, lengths)
        return float(ece_equal_mass(confidence[take], correct[take], bins))

    return ItemStat({unit: n_docs}, fn)


def _icl(items: dict, task: str, settings: list[str] | None, bins: int | None) -> ItemStat | None:
    from jielong.tasks.lib.evaluation.calibration import ece_equal_mass

    found = items.get("icl", {}).get(task)
    if not found:
        return None
    chosen = settings if settings is not None else list(found["settings"])
    if any(s not in found["settings"] for s in chosen):
        return None
    # per setting: (runs, examples) arrays; several runs when the evaluation averages in-context seeds
    correct = [np.asarray(found["settings"][s]["correct"], dtype=np.float64) for s in chosen]
    confidence = [np.asarray(found["settings"][s]["confidence"], dtype=np.float64) for s in chosen]
    unit = unit_key(f"{task}-examples", found["examples"])

    def accuracy(idx: dict[str, np.ndarray]) -> float:
        return float(np.mean([runs[:, idx[unit]].mean() for runs in correct]))

    def ece(idx: dict[str, np.ndarray]) -> float:
        i = idx[unit]
        return float(ece_equal_mass(np.concatenate([c[:, i].ravel() for c in confidence]),
                                    np.concatenate([c[:, i].ravel() for c in correct]), bins or 10))

    return ItemStat({unit: len(found["examples"])}, accuracy if bins is None else ece)


def _heldout_pairs(found: dict | None, what: str, when: str) -> ItemStat | None:
    """The instruct stage's held-out reply loss (summed losses over summed tokens) or choice accuracy of
    resampled held-out pairs (items.json written by tasks/instruct.py)."""
    part = (found or {}).get("heldout_loss" if what == "response_loss" else "choice")
    if not part or not part["ids"]:
        return None
    unit = unit_key("heldout-pairs", part["ids"])
    if what == "response_loss":
        sums = np.asarray([s for s, _ in part[when]], dtype=np.float64)
        counts = np.asarray([n for _, n in part[when]], dtype=np.float64)
        return ItemStat({unit: len(sums)}, lambda idx: float(sums[idx[unit]].sum() / max(counts[idx[unit]].sum(), 1.0)))
    flags = np.asarray(part[when], dtype=np.float64)
    return ItemStat({unit: len(flags)}, lambda idx: float(flags[idx[unit]].mean()))


def _canaries(rows: list[dict] | None, repeats: int, name: str) -> ItemStat | None:
    group = [r for r in rows or [] if r["repeats"] == repeats]
    if not group:
        return None
    values = np.asarray([float(r[name]) for r in group])
    unit = unit_key("canaries", [r["original"] for r in group])
    return ItemStat({unit: len(values)}, lambda idx: float(values[idx[unit]].mean()))


def ratio(a: ItemStat, b: ItemStat) -> ItemStat:
    """a / b resampled together (a shared unit draws the same items for both)."""
    def fn(idx: dict[str, np.ndarray]) -> float:
        denominator = b.fn(idx)
        return a.fn(idx) / denominator if denominator else float("nan")

    return ItemStat({**a.units, **b.units}, fn)
