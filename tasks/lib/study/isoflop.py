"""A study's compute-optimal analysis (spec.IsoFlop): Hoffmann et al. (2022), approach 2.

At each compute budget C the study trains models of several sizes N, each for the D = C / 6N tokens the
budget allows (pretrain.flops_budget, models/flops.py). Per seed, a parabola fitted to the loss against
ln N has its vertex at the loss-optimal size N*; the budget then allows D* = C / 6N* tokens, and D*/N*
is the tokens per parameter at the optimum (about 20 in Hoffmann et al.). A vertex outside the sizes
tried, or a parabola without a minimum, gives no optimum: extrapolating the fit would be a guess. Across
the budgets with an optimum, ln N* against ln C gives the exponent a of N* ~ C^a (about 0.5 there).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from jielong.tasks.lib.study.spec import Study
from jielong.tasks.lib.study.verdict import Estimate, Table, estimate


@dataclass
class BudgetFit:
    flops: float
    variants: list[str]  # in the order of their size
    sizes: list[float]  # N
    losses: list[list[float]]  # per size: the loss at each seed
    optimum: list[float]  # N* per seed; NaN where the seed's parabola has no minimum inside the sizes
    notes: list[str]

    @property
    def optimal_size(self) -> Estimate | None:
        found = [n for n in self.optimum if not math.isnan(n)]
        return estimate(found) if found else None

    def optimal_tokens(self) -> float | None:
        """D* = C / 6N* at the mean N*."""
        size = self.optimal_size
        return None if size is None else self.flops / (6 * size.mean)

    def tokens_per_parameter(self) -> float | None:
        tokens = self.optimal_tokens()
        return None if tokens is None else tokens / self.optimal_size.mean  # type: ignore[union-attr]

    def as_dict(self) -> dict:
        size = self.optimal_size
        return {**asdict(self), "optimal_size_mean": None if size is None else size.mean,
                "optimal_tokens": self.optimal_tokens(), "tokens_per_parameter": self.tokens_per_parameter()}


def parabola_vertex(sizes: list[float], losses: list[float]) -> tuple[float, str]:
    """N* of the least-squares parabola of loss against ln N, or NaN and why there is none."""
    import numpy as np

    u = np.log(np.asarray(sizes, dtype=float))
    a, b, _ = np.polyfit(u, np.asarray(losses, dtype=float), 2)
    if a <= 0:
        return math.nan, "the loss is not convex in ln N (no minimum)"
    vertex = -b / (2 * a)
    if not u.min() <= vertex <= u.max():
        side = "below the smallest" if vertex < u.min() else "above the largest"
        return math.nan, f"the parabola's minimum lies {side} size tried"
    return float(math.exp(vertex)), ""


def fit_budgets(study: Study, table: Table) -> list[BudgetFit]:
    fits = []
    for budget in study.isoflop.budgets:  # type: ignore[union-attr]
        ordered = sorted(budget.variants, key=lambda v: table.positions[v])
        sizes = [table.positions[v] for v in ordered]
        losses = [table.cells[(v, study.isoflop.loss, None)] for v in ordered]  # type: ignore[union-attr]
        optimum, notes = [], []
        for seed_index, seed in enumerate(table.seeds):
            n_star, why = parabola_vertex(sizes, [per_size[seed_index] for per_size in losses])
            optimum.append(n_star)
            if why:
                notes.append(f"seed {seed}: {why}")
        fits.append(BudgetFit(budget.flops, ordered, sizes, losses, optimum, notes))
    return fits


def size_exponent(fits: list[BudgetFit]) -> float | None:
    """a in N* ~ C^a, from the budgets with an optimum (None with fewer than two)."""
    import numpy as np

    points = [(f.flops, f.optimal_size.mean) for f in fits if f.optimal_size is not None]
    if len(points) < 2:
        return None
    slope, _ = np.polyfit(np.log([c for c, _ in points]), np.log([n for _, n in points]), 1)
    return float(slope)


def draw(fits: list[BudgetFit], path, loss_label: str) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for fit in fits:
        means = [estimate(values) for values in fit.losses]
        errors = [0.0 if e.low is None else e.high - e.mean for e in means]  # type: ignore[operator]
        line = ax.errorbar(fit.sizes, [e.mean for e in means], yerr=errors, marker="o", capsize=3,
                           label=f"C = {fit.flops:.2g} FLOPs")
        u = np.log(fit.sizes)
        a, b, c = np.polyfit(u, [e.mean for e in means], 2)
        grid = np.linspace(u.min(), u.max(), 50)
        ax.plot(np.exp(grid), a * grid**2 + b * grid + c, "--", color=line[0].get_color(), linewidth=1)
        size = fit.optimal_size
        if size is not None:
            ax.axvline(size.mean, color=line[0].get_color(), linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set(xlabel="parameters N", ylabel=loss_label, title="IsoFLOP curves: loss against size at fixed compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def corpus_tokens(table: Table) -> float | None:
    """The training split's tokens (what an epoch is), from a variant's pretrain artifact."""
    for run in table.runs:
        if "pretrain" in run.artifacts:
            return run.metric("pretrain:train_tokens")
    return None


def report_lines(fits: list[BudgetFit], corpus_tokens: float | None) -> list[str]:
    def number(value: float | None) -> str:
        return "—" if value is None or math.isnan(value) else f"{value:.3g}"

    lines = ["## Compute-optimal fit (IsoFLOP, Hoffmann et al. approach 2)", "",
             "Per budget and seed, a parabola of the loss against ln N; its vertex is the loss-optimal size N*. "
             "D* = C / 6N* is the tokens the budget then allows"
             + (f", in epochs of the {corpus_tokens:.3g}-token training split" if corpus_tokens else "") + ".", "",
             "| budget C (FLOPs) | loss at each size (N) | N* (mean ± 95%) | D* | D*/N* | epochs at D* | notes |",
             "|---|---|---|---|---|---|---|"]
    for fit in fits:
        at_sizes = ", ".join(f"{number(estimate(v).mean)} ({n:.3g})" for n, v in zip(fit.sizes, fit.losses))
        size, tokens = fit.optimal_size, fit.optimal_tokens()
        epochs = None if tokens is None or not corpus_tokens else tokens / corpus_tokens
        n_text = "none" if size is None else size.text(3)
        lines.append(f"| {fit.flops:.3g} | {at_sizes} | {n_text} | {number(tokens)} | {number(fit.tokens_per_parameter())} | "
                     f"{number(epochs)} | {'; '.join(fit.notes) or '—'} |")
    exponent = size_exponent(fits)
    lines += ["", f"Exponent of N* ~ C^a over the budgets with an optimum: a = {number(exponent)} "
              "(Hoffmann et al.: about 0.5)." if exponent is not None else
              "Fewer than two budgets have an optimum inside their sizes: no exponent.", ""]
    return lines


def analyse(study: Study, table: Table, out_dir: Path) -> tuple[Path, list[str], dict, dict]:
    """The fits, drawn to out_dir/isoflop.png: (the plot, report lines, results.json entries, parent-run metrics)."""
    fits = fit_budgets(study, table)
    plot = out_dir / "isoflop.png"
    draw(fits, plot, study.measures[study.isoflop.loss].label or study.isoflop.loss)  # type: ignore[union-attr]
    exponent = size_exponent(fits)
    metrics = {f"isoflop/C{f.flops:.2g}/tokens_per_parameter".replace("+", ""): f.tokens_per_parameter() for f in fits}
    metrics = {name: value for name, value in metrics.items() if value is not None}
    if exponent is not None:
        metrics["isoflop/size_exponent"] = exponent
    results = {"isoflop": {"budgets": [f.as_dict() for f in fits], "size_exponent": exponent}}
    return plot, report_lines(fits, corpus_tokens(table)), results, metrics
