"""Calibration: does the model know when it is right?

Inputs are, per prediction, a confidence (the probability of the predicted token or answer) and
whether the prediction was correct.

- ECE with equal-mass bins, as HELM's ece_10_bin (the `calibration` package's get_ece_em): sort the
  confidences, split them into `bins` parts of (nearly) equal count with np.array_split, put the bin
  edges midway between neighbouring parts (last edge 1.0), assign each confidence with
  searchsorted(side="left"), ECE = sum over bins of (count / n) * |mean confidence - accuracy|.
- ECE with equal-width bins, as torchmetrics' CalibrationError (15 bins, L1): bins [i/B, (i+1)/B),
  confidence 1.0 in the last bin.
- Brier score: multi-class, mean over predictions of sum_v (p_v - [v = actual])^2 (0 is perfect,
  2 the worst); `top_brier` is the one-dimensional mean (confidence - correct)^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jielong.tasks.lib.evaluation import plots
from jielong.tasks.lib.evaluation.registry import Inputs, SectionResult


def equal_mass_edges(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Upper bin edges (the last is 1.0), as the `calibration` package's get_equal_bins."""
    ordered = np.sort(np.asarray(confidence, dtype=np.float64))
    bins = min(bins, len(ordered))
    parts = np.array_split(ordered, bins)
    edges = [(parts[i][-1] + parts[i + 1][0]) / 2.0 for i in range(bins - 1)] + [1.0]
    return np.array(sorted(set(edges)))


def _binned(confidence: np.ndarray, correct: np.ndarray, index: np.ndarray, n_bins: int):
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(index, weights=correct, minlength=n_bins)
    safe = np.maximum(count, 1)
    return count, conf_sum / safe, acc_sum / safe


def _ece(count: np.ndarray, mean_conf: np.ndarray, accuracy: np.ndarray) -> float:
    total = count.sum()
    return float(np.sum(count / total * np.abs(mean_conf - accuracy))) if total else float("nan")


def ece_equal_mass(confidence, correct, bins: int = 10) -> float:
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if not len(confidence):
        return float("nan")
    edges = equal_mass_edges(confidence, bins)
    index = np.minimum(np.searchsorted(edges, confidence, side="left"), len(edges) - 1)
    return _ece(*_binned(confidence, correct, index, len(edges)))


def equal_width_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)


def ece_equal_width(confidence, correct, bins: int = 15) -> float:
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if not len(confidence):
        return float("nan")
    return _ece(*_binned(confidence, correct, equal_width_index(confidence, bins), bins))


def brier_multiclass(probs, labels) -> float:
    """Mean over rows of sum_c (p_c - [c = label])^2, from full distributions (n, C)."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(probs)), np.asarray(labels)] = 1.0
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


@dataclass
class Reliability:
    """Per equal-width bin: count, mean confidence, accuracy (for the diagram and the report)."""

    edges: list[float]
    count: list[int]
    confidence: list[float]
    accuracy: list[float]


def reliability(confidence, correct, bins: int = 15) -> Reliability:
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    count, conf, acc = _binned(confidence, correct, equal_width_index(confidence, bins), bins)
    return Reliability(np.linspace(0, 1, bins + 1).tolist(), count.astype(int).tolist(), conf.tolist(), acc.tolist())


def calibration_metrics(confidence, correct, brier_terms=None, mass_bins: int = 10, width_bins: int = 15) -> dict[str, float]:
    """The calibration summary of one set of predictions. `brier_terms`: per-prediction multi-class
    Brier terms when the full distribution was available (token level)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    out = {
        f"ece_{mass_bins}_bin": ece_equal_mass(confidence, correct, mass_bins),
        f"ece_{width_bins}_bin_width": ece_equal_width(confidence, correct, width_bins),
        "top_brier": float(np.mean((confidence - correct) ** 2)) if len(confidence) else float("nan"),
        "accuracy": float(correct.mean()) if len(correct) else float("nan"),
        "mean_confidence": float(confidence.mean()) if len(confidence) else float("nan"),
    }
    if brier_terms is not None:
        out["brier"] = float(np.mean(brier_terms)) if len(brier_terms) else float("nan")
    return out


# ---------------------------------------------------------------- the report section


def run(inputs: Inputs) -> SectionResult:
    """Token-level calibration of the shared test pass's top next-token probabilities."""
    ccfg, scores = inputs.cfg.calibration, inputs.test_scores
    summary = calibration_metrics(scores.confidence, scores.correct, scores.brier, ccfg.equal_mass_bins, ccfg.equal_width_bins)
    summary = _rename_width(summary, ccfg.equal_width_bins)
    metrics = {f"eval/{name}": value for name, value in summary.items()}
    metrics["eval/ece"] = summary[f"ece_{ccfg.equal_mass_bins}_bin"]
    rel = reliability(scores.confidence, scores.correct, ccfg.equal_width_bins)
    shown = {k: v for k, v in summary.items() if k.startswith("ece") or k == "brier"}
    figure = plots.reliability_diagram([("next-token confidence (test)", rel, shown)], inputs.out_dir / "reliability_tokens.png")
    tokens = {"doc": scores.doc, "confidence": scores.confidence, "correct": scores.correct}
    return SectionResult({"token": summary, "reliability": rel.__dict__}, metrics, [figure], {"tokens": tokens})


def _rename_width(summary: dict, bins: int) -> dict:
    """ece_<n>_bin_width -> ece_<n>_bin_equal_width, the name used everywhere in the report."""
    return {(f"ece_{bins}_bin_equal_width" if k == f"ece_{bins}_bin_width" else k): v for k, v in summary.items()}
