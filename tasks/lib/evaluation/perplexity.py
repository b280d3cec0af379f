"""Perplexity, bits per byte and word perplexity of held-out documents, in strided windows.

Each document is scored on its own: x = [prefix] + tokens, where prefix is the BOS token, else EOS (as
lm-evaluation-harness), and every token t_i is predicted once. The
first window is x[0:W]; each later window ends `stride` tokens further and starts W tokens before its
end, scoring only the tokens not scored before, so those see at least W - stride tokens of context
(stride = W: the disjoint windows of lm-evaluation-harness's loglikelihood_rolling, whose later
windows see one token of context).

    token perplexity  exp(-sum ln p / tokens)
    bits per byte     -sum log2 p / UTF-8 bytes        (comparable across tokenizers)
    word perplexity   exp(-sum ln p / words)           words = len(re.split(r"\\s+", text)) as the harness

The same pass yields what token-level calibration and the kNN-LM need: the top next-token
probability, whether it was right, the multi-class Brier term, and optionally the kNN-LM key.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from jielong.tasks.core.schema import UserError
from jielong.tasks.lib.evaluation.config import ExtraEvalSet
from jielong.tasks.lib.evaluation.model import LoadedModel, capture_input, ffn_input_module, final_hidden, head_logits
from jielong.tasks.lib.evaluation.packing import Segment, best_fit, pack_rows
from jielong.tasks.lib.evaluation.registry import Inputs, SectionResult

_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Window:
    doc: int  # document index
    start: int  # first input position in x = [eos] + tokens
    end: int  # one past the last input position
    score_from: int  # first position (in x) whose next-token prediction is scored

    @property
    def scored(self) -> int:
        return self.end - self.score_from


def document_windows(n_tokens: int, window: int, stride: int, doc: int = 0) -> list[Window]:
    """Windows over x = [eos] + tokens (n_tokens + 1 positions) that score every token exactly once.

    Position i of x predicts x[i + 1] = tokens[i]; the positions scored are 0 .. n_tokens - 1."""
    if n_tokens <= 0:
        return []
    stride = min(stride, window)
    end = min(window, n_tokens)
    windows = [Window(doc, 0, end, 0)]
    while end < n_tokens:
        new_end = min(end + stride, n_tokens)
        windows.append(Window(doc, max(0, new_end - window), new_end, end))
        end = new_end
    return windows


ROW_TOKENS = 1024


@dataclass
class TokenScores:
    """Per scored token, in document order."""

    logprob: np.ndarray  # ln p(actual next token), float64
    confidence: np.ndarray  # top next-token probability
    correct: np.ndarray  # bool: the top token is the actual one
    brier: np.ndarray  # sum_v (p_v - [v = actual])^2
    target: np.ndarray  # the actual next token id
    doc: np.ndarray  # document index of each token
    keys: np.ndarray | None = None  # (tokens, d) float32 kNN-LM keys when asked for
    seconds: float = 0.0  # forward time


def score_documents(lm: LoadedModel, docs: list[list[int]], window: int, stride: int, batch_tokens: int,
                    key: str | None = None, with_logits: bool = True) -> TokenScores:
    """Score every token of every document. Windows are packed into dense rows of at most ROW_TOKENS
    tokens (a longer window gets a row of its own; block-diagonal attention, positions restarting at 0
    in each window), batch_tokens per forward. Rows are kept short because attention over a row costs
    its length squared, whatever the mask: rows of a long context's length would mostly compute
    attention between windows that the mask then discards.

    key: also collect kNN-LM keys ("ffn_input" or "final"). with_logits=False skips the output layer
    (a datastore needs keys and next tokens only): then only `target` and `keys` are filled."""
    windows = [w for d, ids in enumerate(docs) for w in document_windows(len(ids), window, stride, d)]
    offsets = _token_offsets(docs, windows)
    total = sum(len(ids) for ids in docs)
    out = _empty_scores(total)
    lengths = [w.end - w.start for w in windows]
    rows = best_fit(lengths, min(window, ROW_TOKENS))
    hook = ffn_input_module(lm.model) if key == "ffn_input" else None
    started = time.perf_counter()
    with capture_input(hook) as captured:
        for batch_rows in token_batches(rows, lengths, batch_tokens):
            packed = pack_rows([[Segment(_window_inputs(docs, windows[i], lm.prefix_id)) for i in row] for row in batch_rows],
                               lm.eos_id)
            where, targets, dest = _scored(docs, windows, offsets, batch_rows, packed)
            hidden = final_hidden(lm, packed.input_ids, packed.mask, packed.position_ids)
            if with_logits:
                _fill(out, dest, lm, hidden[where[0].to(hidden.device), where[1].to(hidden.device)], targets)
            else:
                out.target[dest] = targets.numpy()
            if key is not None:
                states = captured.pop() if hook is not None else hidden
                keys = states[where[0].to(states.device), where[1].to(states.device)].float().cpu().numpy()
                if out.keys is None:
                    out.keys = np.zeros((total, keys.shape[1]), np.float32)
                out.keys[dest] = keys
    out.seconds = time.perf_counter() - started
    out.doc = np.repeat(np.arange(len(docs)), [len(ids) for ids in docs])
    return out


def token_batches(rows: list[list[int]], lengths: list[int], batch_tokens: int) -> list[list[list[int]]]:
    """Rows, longest first, in batches of at most batch_tokens once padded to the batch's longest row."""
    sized = sorted(((sum(lengths[i] for i in row), row) for row in rows), key=lambda pair: -pair[0])
    batches: list[list[list[int]]] = []
    width = 0  # the longest row of the batch being filled
    for size, row in sized:
        if batches and (len(batches[-1]) + 1) * width <= batch_tokens:
            batches[-1].append(row)
        else:
            batches.append([row])
            width = size
    return batches


def _window_inputs(docs: list[list[int]], w: Window, eos: int) -> list[int]:
    """x[start:end] where x = [eos] + tokens."""
    tokens = docs[w.doc]
    return [eos] + tokens[: w.end - 1] if w.start == 0 else tokens[w.start - 1 : w.end - 1]


def _scored(docs, windows, offsets, batch_rows, packed) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, np.ndarray]:
    """Row/column of every scored prediction in the packed batch, its target token, and where it goes
    in the flat document-ordered arrays."""
    rows_ix, cols_ix, targets, dest = [], [], [], []
    for r, row in enumerate(batch_rows):
        for s, i in enumerate(row):
            w = windows[i]
            first = packed.starts[r][s] + (w.score_from - w.start)
            rows_ix.append(np.full(w.scored, r))
            cols_ix.append(np.arange(first, first + w.scored))
            targets.append(docs[w.doc][w.score_from : w.end])  # x[p + 1] = tokens[p]
            dest.append(np.arange(offsets[i], offsets[i] + w.scored))
    where = (torch.from_numpy(np.concatenate(rows_ix)), torch.from_numpy(np.concatenate(cols_ix)))
    flat_targets = torch.tensor([t for part in targets for t in part], dtype=torch.long)
    return where, flat_targets, np.concatenate(dest)


def _token_offsets(docs: list[list[int]], windows: list[Window]) -> list[int]:
    """Where each window's scored tokens go in the flat, document-ordered arrays."""
    doc_start = np.concatenate([[0], np.cumsum([len(ids) for ids in docs])])
    return [int(doc_start[w.doc]) + w.score_from for w in windows]


def _empty_scores(total: int) -> TokenScores:
    return TokenScores(
        logprob=np.zeros(total), confidence=np.zeros(total), correct=np.zeros(total, bool),
        brier=np.zeros(total), target=np.zeros(total, np.int64), doc=np.zeros(total, np.int64),
    )


def _fill(out: TokenScores, dest: np.ndarray, lm: LoadedModel, hidden: torch.Tensor, target: torch.Tensor,
          chunk: int = 512) -> None:
    """From the final hidden states (N, d) of the scored positions and their targets: ln p(target), the
    top probability, whether it is the target, and the Brier term sum_v p_v^2 - 2 p_target + 1.
    The output layer runs on `chunk` positions at a time: a (batch, length, vocabulary) logits tensor
    would take 3 GB per forward for a 50k vocabulary, and the chunk's logits stay in cache."""
    with torch.inference_mode():
        for lo in range(0, len(hidden), chunk):
            logits = head_logits(lm, hidden[lo : lo + chunk])
            tgt = target[lo : lo + chunk].to(logits.device)
            target_logit = logits.gather(1, tgt[:, None])[:, 0]
            top_logit, top_i = logits.max(dim=-1)
            exp = logits.sub_(top_logit[:, None]).exp_()  # in place: the logits are not needed after this
            total = exp.sum(-1)
            sum_sq = torch.linalg.vector_norm(exp, dim=-1).square()
            lp_target = target_logit - (top_logit + total.log())
            part = dest[lo : lo + chunk]
            out.logprob[part] = lp_target.double().cpu().numpy()
            out.confidence[part] = (1.0 / total).cpu().numpy()
            out.correct[part] = (top_i == tgt).cpu().numpy()
            out.brier[part] = (sum_sq / total.square() - 2 * lp_target.exp() + 1).cpu().numpy()
            out.target[part] = tgt.cpu().numpy()


# ---------------------------------------------------------------- metrics


def count_words(text: str) -> int:
    return len(_WHITESPACE.split(text))


def summarize(logprob_sum: float, tokens: int, n_bytes: int, words: int) -> dict[str, float]:
    nll = -logprob_sum
    return {
        "perplexity": math.exp(nll / tokens) if tokens else float("nan"),
        "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else float("nan"),
        "word_perplexity": math.exp(nll / words) if words else float("nan"),
        "nll_per_token": nll / tokens if tokens else float("nan"),
        "tokens": float(tokens),
        "bytes": float(n_bytes),
        "words": float(words),
    }


def source_group(source: str, depth: int) -> str:
    return "/".join(source.replace("\\", "/").split("/")[:depth]) or "(none)"


@dataclass
class PerplexityResult:
    overall: dict[str, float]
    by_source: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    tokens_per_s: float = 0.0


def perplexity_metrics(scores: TokenScores, texts: list[str], sources: list[str], depth: int) -> PerplexityResult:
    per_doc_lp = np.bincount(scores.doc, weights=scores.logprob, minlength=len(texts))
    per_doc_tokens = np.bincount(scores.doc, minlength=len(texts))
    n_bytes = [len(t.encode("utf-8", "surrogatepass")) for t in texts]
    n_words = [count_words(t) for t in texts]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(sources):
        groups[source_group(s, depth)].append(i)
    by_source = {
        g: summarize(float(per_doc_lp[ix].sum()), int(per_doc_tokens[ix].sum()), sum(n_bytes[i] for i in ix),
                     sum(n_words[i] for i in ix)) | {"documents": float(len(ix))}
        for g, ix in sorted(groups.items())
    }
    overall = summarize(float(per_doc_lp.sum()), int(per_doc_tokens.sum()), sum(n_bytes), sum(n_words))
    overall["documents"] = float(len(texts))
    tokens = int(per_doc_tokens.sum())
    return PerplexityResult(overall, by_source, scores.seconds, tokens / scores.seconds if scores.seconds else 0.0)


# ---------------------------------------------------------------- the report section

OVERALL = ("perplexity", "bits_per_byte", "word_perplexity", "nll_per_token", "tokens", "bytes", "words", "documents")


def run(inputs: Inputs) -> SectionResult:
    """Test perplexity, overall and by source, from the shared test pass; then each further held-out set
    (validation when asked, the extra sets), scored here."""
    pcfg, lm, docs = inputs.cfg.perplexity, inputs.lm, inputs.test_docs
    result = perplexity_metrics(inputs.test_scores, [d["text"] for d in docs], [d["source"] for d in docs], pcfg.source_depth)
    metrics = {f"eval/{name}": result.overall[name] for name in OVERALL}
    metrics["eval/tokens_per_s"] = result.tokens_per_s
    for group, summary in result.by_source.items():
        for name in ("perplexity", "bits_per_byte"):
            metrics[f"eval/by_source/{group}/{name}"] = summary[name]
    part = {"window": inputs.window, "stride": inputs.stride, "source_depth": pcfg.source_depth, "test": result.overall,
            "by_source": result.by_source, "seconds": result.seconds, "tokens_per_s": result.tokens_per_s, "extra": {}}
    documents = {"test": document_items(inputs.test_scores, docs)}
    for name, extra_docs in _held_out_sets(pcfg, inputs.splits.get("validation", [])):
        scores = score_documents(lm, lm.encode([d["text"] for d in extra_docs]), inputs.window, inputs.stride, pcfg.batch_tokens)
        summary = perplexity_metrics(scores, [d["text"] for d in extra_docs], [d["source"] for d in extra_docs], 1)
        part["extra"][name] = summary.overall
        documents[name] = document_items(scores, extra_docs)
        for metric in ("perplexity", "bits_per_byte", "word_perplexity"):
            metrics[f"eval/{name}/{metric}"] = summary.overall[metric]
    return SectionResult(part, metrics, items={"documents": documents})


def document_items(scores: TokenScores, docs: list[dict]) -> dict:
    """Per document: its id, negative log-likelihood summed over its tokens, and its token count (what a
    study resamples: perplexity is exp(sum nll / sum tokens) over any set of documents)."""
    nll = -np.bincount(scores.doc, weights=scores.logprob, minlength=len(docs))
    tokens = np.bincount(scores.doc, minlength=len(docs))
    return {"ids": [str(d.get("id", i)) for i, d in enumerate(docs)],
            "nll": [round(float(v), 6) for v in nll], "tokens": [int(t) for t in tokens]}


def _held_out_sets(pcfg, validation: list[dict]):
    """(name, documents) of each further held-out set, read one at a time."""
    if pcfg.validation:
        if not validation:
            raise UserError("evaluate.perplexity.validation: the validation split is empty (split.validation = 0?)")
        yield "validation", validation[: pcfg.max_documents] if pcfg.max_documents else validation
    for extra in pcfg.extra:
        yield extra.name, read_extra(extra)


def read_extra(extra: ExtraEvalSet) -> list[dict]:
    """Documents of an extra eval set: a file or folder read by the shared reader (parquet, jsonl, json,
    csv/tsv by `text_field`; text files split by `text_unit`), or a datasets.save_to_disk folder.
    Unreadable records are an error: a perplexity over a silently smaller set would mislead."""
    from jielong.tasks.lib.sources.reader import FileOptions, read_documents

    root = Path(extra.path).expanduser()
    if not root.exists():
        raise UserError(f"evaluate.perplexity.extra {extra.name!r}: {root} does not exist")
    if root.is_dir() and ((root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists()):
        import datasets

        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        texts = [t for t in ds[extra.text_field] if t]
        docs = [{"id": f"{extra.name}:{i}", "text": t, "source": extra.name} for i, t in enumerate(texts)]
        return docs[: extra.max_documents]
    docs, bad = [], []
    for item in read_documents(root, FileOptions(text_unit=extra.text_unit), extra.text_field):
        if "reason" in item:
            bad.append(f"{item['id']}: {item['reason']} {item['detail']}".strip())
        elif item["text"].strip():
            docs.append({"id": item["id"], "text": item["text"], "source": item["source"]})
    if bad:
        raise UserError(f"evaluate.perplexity.extra {extra.name!r}: {len(bad)} unreadable records, e.g. {'; '.join(bad[:3])}")
    return docs[: extra.max_documents]
