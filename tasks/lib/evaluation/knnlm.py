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

from jielong.tasks.lib.evaluation.config import KnnLmConfig


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
