"""kNN-LM (Khandelwal et al., 2020): interpolate the LM with a nearest-neighbour search over a
datastore of (hidden state -> next token) pairs from the training data.

    p(w) = lambda * p_kNN(w) + (1 - lambda) * p_LM(w)
    p_kNN(w) = sum over the k nearest keys whose value is w of softmax_j(-d_j / T)

d is the squared L2 distance faiss returns. The datastore comes from the same scoring pass as
perplexity (perplexity.score_documents with a key module), so with lambda = 0 the kNN-LM perplexity
is the base perplexity exactly. Index: exact IndexFlatL2 up to `flat_threshold` entries, above it
IVF-PQ trained on a sample (nlist, m, nbits, nprobe; 4-bit codes use faiss's SIMD fast-scan variant),
wrapped by default in IndexRefineFlat: k * rerank candidates by PQ distance, the k exactly nearest kept. lambda and T are chosen on validation tokens, then applied
unchanged to test.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import faiss
import numpy as np

from jielong.tasks.lib.evaluation import perplexity, plots
from jielong.tasks.lib.evaluation.config import KnnLmConfig
from jielong.tasks.lib.evaluation.model import LoadedModel
from jielong.tasks.lib.evaluation.registry import Inputs, SectionResult


@dataclass
class Neighbours:
    distances: np.ndarray  # (Q, k) squared L2, ascending
    values: np.ndarray  # (Q, k) next-token ids of the neighbours


@dataclass
class Datastore:
    values: np.ndarray  # (N,) int64: the token that followed each key
    index: faiss.Index
    kind: str  # "flat", "ivfpq" or "ivfpq+refine"
    build_seconds: float  # index training + adding (the forward pass is timed by the caller)


def build_index(keys: np.ndarray, cfg: KnnLmConfig, seed: int = 0) -> tuple[faiss.Index, str]:
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    n, d = keys.shape
    if n <= cfg.flat_threshold:
        index = faiss.IndexFlatL2(d)
        index.add(keys)
        return index, "flat"
    nlist = max(1, min(cfg.nlist, n // 39))  # faiss wants >= 39 training points per cell
    m = max(x for x in range(1, min(cfg.m, d) + 1) if d % x == 0)
    quantizer = faiss.IndexFlatL2(d)
    if cfg.nbits == 4:  # 4-bit codes: faiss's SIMD "fast scan" IVF-PQ, several times faster to search
        ivfpq = faiss.IndexIVFPQFastScan(quantizer, d, nlist, m, 4)
    else:
        ivfpq = faiss.IndexIVFPQ(quantizer, d, nlist, m, cfg.nbits)
    ivfpq.cp.seed = seed
    ivfpq.pq.cp.seed = seed
    ivfpq.nprobe = cfg.nprobe
    sample = keys[np.random.default_rng(seed).choice(n, size=min(n, cfg.train_sample), replace=False)]
    ivfpq.train(sample)
    if not cfg.recompute_distances:
        ivfpq.add(keys)
        return ivfpq, "ivfpq"
    # fetch k * rerank candidates by PQ distance, return the k exactly nearest with exact distances
    index = faiss.IndexRefineFlat(ivfpq)
    index.k_factor = float(cfg.rerank)
    index.add(keys)
    return index, "ivfpq+refine"


def build_datastore(keys: np.ndarray, values: np.ndarray, cfg: KnnLmConfig, seed: int = 0) -> Datastore:
    started = time.perf_counter()
    index, kind = build_index(keys, cfg, seed)
    return Datastore(np.asarray(values, dtype=np.int64), index, kind, time.perf_counter() - started)


def search(store: Datastore, queries: np.ndarray, k: int, batch: int = 8192) -> Neighbours:
    """The k nearest entries of each query (squared L2, ascending)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, len(store.values))
    dist = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), batch):
        dist[s : s + batch], ids[s : s + batch] = store.index.search(queries[s : s + batch], k)
    missing = ids < 0  # IVF can return fewer than k hits: such slots get no weight
    values = np.where(missing, -1, store.values[np.maximum(ids, 0)])
    dist = np.where(missing, np.inf, dist)
    return Neighbours(dist.astype(np.float64), values)


def knn_logprob(nb: Neighbours, targets: np.ndarray, temperature: float) -> np.ndarray:
    """ln p_kNN(target) per query: log of the softmax(-d / T) mass on neighbours whose value is the target."""
    logits = -nb.distances / temperature
    log_norm = _logsumexp(logits)
    hit = np.where(nb.values == targets[:, None], logits, -np.inf)
    return _logsumexp(hit) - log_norm


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = np.max(x, axis=1)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return safe + np.log(np.sum(np.exp(x - safe[:, None]), axis=1))


def interpolate(lm_logprob: np.ndarray, knn_lp: np.ndarray, lam: float) -> np.ndarray:
    """ln(lambda * p_kNN + (1 - lambda) * p_LM); exactly lm_logprob when lambda = 0."""
    if lam == 0:
        return lm_logprob.copy()
    if lam == 1:
        return knn_lp.copy()
    return np.logaddexp(math.log(lam) + knn_lp, math.log1p(-lam) + lm_logprob)


def perplexity_of(logprob: np.ndarray) -> float:
    return float(math.exp(-np.mean(logprob))) if len(logprob) else float("nan")


@dataclass
class Tuned:
    lam: float
    temperature: float  # absolute
    val_perplexity: float
    val_base_perplexity: float
    grid: list[dict]


def tune(lm_logprob: np.ndarray, nb: Neighbours, targets: np.ndarray, lambdas: list[float],
         temperatures: list[float]) -> Tuned:
    """The (lambda, T) with the lowest validation perplexity; T candidates are multiples of the
    median nearest-neighbour distance, because distances scale with the model's hidden states."""
    finite = nb.distances[:, 0][np.isfinite(nb.distances[:, 0])]
    scale = float(np.median(finite)) if len(finite) else 1.0
    scale = scale if scale > 0 else 1.0
    grid, best = [], None
    for mult in temperatures:
        knn_lp = knn_logprob(nb, targets, mult * scale)
        for lam in lambdas:
            ppl = perplexity_of(interpolate(lm_logprob, knn_lp, lam))
            grid.append({"lambda": lam, "temperature": mult * scale, "perplexity": ppl})
            if best is None or ppl < best[0]:
                best = (ppl, lam, mult * scale)
    assert best is not None
    return Tuned(best[1], best[2], best[0], perplexity_of(lm_logprob), grid)


# ---------------------------------------------------------------- the report section

METRICS = ("base_perplexity", "knnlm_perplexity", "perplexity_ratio", "lambda", "temperature", "datastore_size",
           "datastore_build_seconds", "tokens_per_s_base", "tokens_per_s_knnlm")


def run(inputs: Inputs) -> SectionResult:
    """The datastore from a seeded shuffle of train, lambda and T tuned on validation, test perplexity
    with and without it (the test keys come from the shared pass), and the datastore-size sweep."""
    lm, kcfg, seed, test_scores = inputs.lm, inputs.cfg.knnlm, inputs.seed, inputs.test_scores
    window, stride, batch_tokens = inputs.window, inputs.stride, inputs.cfg.perplexity.batch_tokens
    train = _shuffled_prefix(lm, inputs.splits.get("train", []), kcfg.max_train_tokens, seed)
    if not train:
        return SectionResult({"skipped": "empty train split"})
    t = time.perf_counter()
    train_scores = perplexity.score_documents(lm, train, window, stride, batch_tokens, key=kcfg.key, with_logits=False)
    forward_seconds = time.perf_counter() - t
    val = _token_prefix(lm, inputs.splits.get("validation", []), kcfg.tune_max_tokens)
    val_scores = perplexity.score_documents(lm, val, window, stride, batch_tokens, key=kcfg.key) if val else None

    store = build_datastore(train_scores.keys, train_scores.target, kcfg, seed)
    t = time.perf_counter()
    test_nb = search(store, test_scores.keys, kcfg.k, kcfg.batch_queries)
    search_seconds = time.perf_counter() - t
    tuned = _tune_on(store, val_scores, kcfg) if val_scores is not None else None
    lam, temp = (tuned.lam, tuned.temperature) if tuned else (0.0, 1.0)
    t = time.perf_counter()
    knn_lp = interpolate(test_scores.logprob, knn_logprob(test_nb, test_scores.target, temp), lam)
    mix_seconds = time.perf_counter() - t
    base_ppl, knn_ppl = perplexity_of(test_scores.logprob), perplexity_of(knn_lp)
    n_test = len(test_scores.logprob)
    part = {
        "key": kcfg.key, "key_dim": int(train_scores.keys.shape[1]), "k": kcfg.k, "index": store.kind,
        "datastore_size": int(len(store.values)), "lambda": lam, "temperature": temp,
        "validation_tokens": int(len(val_scores.logprob)) if val_scores else 0,
        "validation_base_perplexity": tuned.val_base_perplexity if tuned else None,
        "validation_knnlm_perplexity": tuned.val_perplexity if tuned else None,
        "base_perplexity": base_ppl, "knnlm_perplexity": knn_ppl, "perplexity_ratio": knn_ppl / base_ppl,
        "datastore_forward_seconds": forward_seconds, "index_build_seconds": store.build_seconds,
        "datastore_build_seconds": forward_seconds + store.build_seconds,
        "test_forward_seconds": test_scores.seconds, "test_search_seconds": search_seconds + mix_seconds,
        "tokens_per_s_base": n_test / test_scores.seconds,
        "tokens_per_s_knnlm": n_test / (test_scores.seconds + search_seconds + mix_seconds),
        "grid": tuned.grid if tuned else [],
    }
    metrics = {f"eval/knnlm_{name}" if not name.startswith("knnlm") else f"eval/{name}": float(part[name]) for name in METRICS}
    part["sweep"], sweep_lp = _sweep(train_scores, val_scores, test_scores, kcfg, seed, store, knn_lp, lam, temp) \
        if val_scores else ([], [])
    items = {"full": _doc_nll(knn_lp, test_scores.doc),
             "sweep": {str(int(round(row["fraction"] * 100))): _doc_nll(lp, test_scores.doc)
                       for row, lp in zip(part["sweep"], sweep_lp)}}
    for row in part["sweep"]:
        pct = int(round(row["fraction"] * 100))
        metrics[f"eval/knnlm_sweep/{pct}pct/perplexity"] = row["test_perplexity"]
        metrics[f"eval/knnlm_sweep/{pct}pct/lambda"] = float(row["lambda"])  # chosen on validation at this size
    figures = [plots.knnlm_size_sweep(part["sweep"], base_ppl, inputs.out_dir / "knnlm_size_sweep.png")] if part["sweep"] else []
    return SectionResult(part, metrics, figures, {"knnlm": items})


def _doc_nll(logprob: np.ndarray, doc: np.ndarray) -> list[float]:
    """Per test document: the kNN-LM's negative log-likelihood summed over its tokens (a study resamples
    the documents, tasks/lib/study/items.py; their token counts are the perplexity section's)."""
    return [round(float(v), 6) for v in -np.bincount(doc, weights=logprob, minlength=int(doc.max(initial=-1)) + 1)]


def _tune_on(store: Datastore, val_scores, kcfg: KnnLmConfig) -> Tuned:
    nb = search(store, val_scores.keys, kcfg.k, kcfg.batch_queries)
    return tune(val_scores.logprob, nb, val_scores.target, kcfg.lambdas, kcfg.temperatures)


def _sweep(train_scores, val_scores, test_scores, kcfg: KnnLmConfig, seed: int, full: Datastore, full_lp: np.ndarray,
           full_lam: float, full_temp: float) -> tuple[list[dict], list[np.ndarray]]:
    """Test perplexity with datastores of the first fraction of the (shuffled) train tokens; lambda
    and T re-chosen on validation for each size. Also each size's per-token log-probabilities."""
    rows, lps = [], []
    n = len(train_scores.target)
    for fraction in sorted(set(kcfg.sweep)):
        size = max(1, int(round(fraction * n)))
        if size == n:
            rows.append({"fraction": fraction, "size": n, "index": full.kind, "lambda": full_lam,
                         "temperature": full_temp, "test_perplexity": perplexity_of(full_lp)})
            lps.append(full_lp)
            continue
        store = build_datastore(train_scores.keys[:size], train_scores.target[:size], kcfg, seed)
        tuned = _tune_on(store, val_scores, kcfg)
        nb = search(store, test_scores.keys, kcfg.k, kcfg.batch_queries)
        lp = interpolate(test_scores.logprob, knn_logprob(nb, test_scores.target, tuned.temperature), tuned.lam)
        rows.append({"fraction": fraction, "size": size, "index": store.kind, "lambda": tuned.lam,
                     "temperature": tuned.temperature, "test_perplexity": perplexity_of(lp)})
        lps.append(lp)
    return rows, lps


def _shuffled_prefix(lm: LoadedModel, docs: list[dict], max_tokens: int | None, seed: int) -> list[list[int]]:
    """Token ids of train documents in a seeded shuffle, up to max_tokens (the last one cut)."""
    order = np.random.default_rng(seed).permutation(len(docs))
    return _token_prefix(lm, [docs[i] for i in order], max_tokens)


def _token_prefix(lm: LoadedModel, docs: list[dict], max_tokens: int | None) -> list[list[int]]:
    out, total = [], 0
    step = 512
    for s in range(0, len(docs), step):
        for ids in lm.encode([d["text"] for d in docs[s : s + step]]):
            if max_tokens is not None and total + len(ids) > max_tokens:
                if max_tokens - total > 0:
                    out.append(ids[: max_tokens - total])
                return out
            out.append(ids)
            total += len(ids)
    return out
