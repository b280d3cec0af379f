"""PNG figures of the evaluation report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:  # calibration.py draws with this module
    from jielong.tasks.lib.evaluation.calibration import Reliability


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def reliability_diagram(panels: list[tuple[str, Reliability, dict]], path: Path) -> Path:
    """One panel per (title, bins, metrics): accuracy per confidence bin against the diagonal, with
    the share of predictions per bin below."""
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 5.6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]})
    for col, (title, rel, metrics) in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        lefts, width = rel.edges[:-1], rel.edges[1] - rel.edges[0]
        total = max(1, sum(rel.count))
        accuracy = [a if n else 0.0 for a, n in zip(rel.accuracy, rel.count)]
        top.bar(lefts, accuracy, width=width, align="edge", edgecolor="black", color="tab:blue", label="accuracy")
        gaps = [c - a if n else 0.0 for c, a, n in zip(rel.confidence, rel.accuracy, rel.count)]
        top.bar(lefts, gaps, bottom=accuracy, width=width, align="edge", color="tab:red", alpha=0.3, label="gap to confidence")
        top.plot([0, 1], [0, 1], "k--", linewidth=1)
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
        text = "\n".join(f"{k} = {v:.4f}" for k, v in metrics.items())
        top.text(0.03, 0.97, text, transform=top.transAxes, va="top", fontsize=8, family="monospace")
        top.legend(loc="lower right", fontsize=7)
        bottom.bar(lefts, [n / total for n in rel.count], width=width, align="edge", color="gray")
        bottom.set(xlim=(0, 1), xlabel="confidence", ylabel="share")
    return _save(fig, path)


def accuracy_vs_k(task: str, table: list[dict], chance: float, path: Path, metric: str = "acc") -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    modes = list(dict.fromkeys(row["mode"] for row in table))
    for mode in modes:
        rows = sorted((r for r in table if r["mode"] == mode), key=lambda r: r["k"])
        ax.errorbar([r["k"] for r in rows], [r[metric] for r in rows], yerr=[r[f"{metric}_std"] for r in rows],
                    marker="o", capsize=3, label=f"{mode} labels" if mode != "none" else "no labels")
    ax.axhline(chance, color="gray", linestyle=":", label=f"chance ({chance:.3f})")
    ks = sorted({r["k"] for r in table})
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="demonstrations k", ylabel=metric, title=f"{task}: {metric} vs k (mean ± std over seeds)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def knnlm_size_sweep(rows: list[dict], base_perplexity: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    sizes = [r["size"] for r in rows]
    ax.plot(sizes, [r["test_perplexity"] for r in rows], marker="o", label="kNN-LM")
    ax.axhline(base_perplexity, color="gray", linestyle="--", label=f"base LM ({base_perplexity:.2f})")
    ax.set_xscale("log")
    ax.set(xlabel="datastore entries (train tokens)", ylabel="test perplexity", title="kNN-LM perplexity vs datastore size")
    ax.legend(fontsize=8)
    return _save(fig, path)
