"""A study's compute-optimal analysis (spec.IsoFlop): Hoffmann et al. (2022), approach 2.

At each compute budget C the study trains models of several sizes N, each for the D = C / 6N tokens the
budget allows (pretrain.flops_budget, models/flops.py). A size may be trained with several learning
rates (variants of the same size): its loss is that of the learning rate with the lowest mean loss over
the seeds, chosen again in every bootstrap resample. A parabola fitted to the mean loss against ln N has
its vertex at the loss-optimal size N*; the budget then allows D* = C / 6N* tokens, and D*/N* is the
tokens per parameter at the optimum (about 20 in Hoffmann et al.). A vertex outside the sizes tried, or
a parabola without a minimum, gives no optimum: extrapolating the fit would be a guess, and the report
counts such fits. Across the budgets with an optimum, ln N* against ln C gives the exponent a of
N* ~ C^a (about 0.5 there). Intervals: a percentile bootstrap over the seeds (the pretraining losses keep
no items), refitting everything per resample.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from jielong.tasks.lib.study.spec import Study
from jielong.tasks.lib.study.verdict import Table


@dataclass
class BudgetFit:
    flops: float
    sizes: list[float]  # N, ascending
    groups: list[list[str]]  # per size: its variants (one per learning rate)
    losses: list[list[list[float]]]  # per size, per variant: the loss at each seed
    chosen: list[str] = field(default_factory=list)  # per size: the variant (learning rate) with the lowest mean loss
    optimum: float = math.nan  # N* of the mean losses; NaN without one
    why: str = ""
    per_seed: list[float] = field(default_factory=list)  # N* of each seed's losses alone
    interval: dict = field(default_factory=dict)  # bootstrap: N*, D*/N* intervals and the share without optimum

    @property
    def tokens(self) -> float:
        return self.flops / (6 * self.optimum) if not math.isnan(self.optimum) else math.nan

    @property
    def tokens_per_parameter(self) -> float:
        return self.tokens / self.optimum if not math.isnan(self.optimum) else math.nan

    def as_dict(self) -> dict:
        return {**asdict(self), "optimal_tokens": self.tokens, "tokens_per_parameter": self.tokens_per_parameter}


def parabola_vertex(sizes: list[float], losses: list[float]) -> tuple[float, str]:
    """N* of the least-squares parabola of loss against ln N, or NaN and why there is none."""
    u = np.log(np.asarray(sizes, dtype=float))
    a, b, _ = np.polyfit(u, np.asarray(losses, dtype=float), 2)
    if a <= 0:
        return math.nan, "the loss is not convex in ln N (no minimum)"
    vertex = -b / (2 * a)
    if not u.min() <= vertex <= u.max():
        side = "below the smallest" if vertex < u.min() else "above the largest"
        return math.nan, f"the parabola's minimum lies {side} size tried"
    return float(math.exp(vertex)), ""


def _size_losses(losses: list[list[list[float]]], seeds: np.ndarray) -> tuple[list[float], list[int]]:
    """Per size: the mean loss over `seeds` of its best variant, and which variant that is."""
    best, which = [], []
    for per_variant in losses:
        means = [float(np.mean(np.asarray(v)[seeds])) for v in per_variant]
        which.append(int(np.argmin(means)))
        best.append(min(means))
    return best, which


def fit_budgets(study: Study, table: Table) -> list[BudgetFit]:
    loss = study.isoflop.loss  # type: ignore[union-attr]
    fits = []
    for budget in study.isoflop.budgets:  # type: ignore[union-attr]
        sizes = sorted({table.positions[v] for v in budget.variants})
        groups = [[v for v in budget.variants if table.positions[v] == n] for n in sizes]
        losses = [[table.cells[(v, loss, None)] for v in group] for group in groups]
        everyone = np.arange(len(table.seeds))
        best, which = _size_losses(losses, everyone)
        optimum, why = parabola_vertex(sizes, best)
        per_seed = [parabola_vertex(sizes, _size_losses(losses, np.array([s]))[0])[0] for s in everyone]
        fits.append(BudgetFit(budget.flops, sizes, groups, losses, [g[i] for g, i in zip(groups, which)],
                              optimum, why, per_seed))
    return fits


def size_exponent(points: list[tuple[float, float]]) -> float:
    """a in N* ~ C^a from (C, N*) pairs with an optimum (NaN with fewer than two)."""
    points = [(c, n) for c, n in points if not math.isnan(n)]
    if len(points) < 2:
        return math.nan
    slope, _ = np.polyfit(np.log([c for c, _ in points]), np.log([n for _, n in points]), 1)
    return float(slope)


def bootstrap(fits: list[BudgetFit], seeds: int, resamples: int, seed: int) -> dict:
    """Resample the seeds, rechoose each size's learning rate, refit every budget and the exponent."""
    rng = np.random.default_rng(seed)
    optima = np.full((resamples, len(fits)), np.nan)
    exponents = np.full(resamples, np.nan)
    for b in range(resamples):
        chosen = rng.integers(0, seeds, seeds)
        for j, fit in enumerate(fits):
            optima[b, j] = parabola_vertex(fit.sizes, _size_losses(fit.losses, chosen)[0])[0]
        exponents[b] = size_exponent([(f.flops, n) for f, n in zip(fits, optima[b])])

    def interval(values: np.ndarray) -> dict:
        found = values[~np.isnan(values)]
        low, high = (np.percentile(found, [2.5, 97.5]) if len(found) else (math.nan, math.nan))
        return {"low": float(low), "high": float(high), "without": float(np.mean(np.isnan(values)))}

    for j, fit in enumerate(fits):
        ratio = fit.flops / (6 * optima[:, j] ** 2)
        fit.interval = {"optimum": interval(optima[:, j]), "tokens_per_parameter": interval(ratio)}
    return {"exponent": interval(exponents), "resamples": resamples, "seed": seed, "seeds": seeds}


def draw(fits: list[BudgetFit], path, loss_label: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    everyone = np.arange(len(fits[0].losses[0][0])) if fits else np.arange(0)
    for fit in fits:
        best, _ = _size_losses(fit.losses, everyone)
        line = ax.plot(fit.sizes, best, "o-", label=f"C = {fit.flops:.2g} FLOPs (best learning rate per size)")
        u = np.log(fit.sizes)
        a, b, c = np.polyfit(u, best, 2)
        grid = np.linspace(u.min(), u.max(), 50)
        ax.plot(np.exp(grid), a * grid**2 + b * grid + c, "--", color=line[0].get_color(), linewidth=1)
        if not math.isnan(fit.optimum):
            ax.axvline(fit.optimum, color=line[0].get_color(), linestyle=":", linewidth=1)
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


def _number(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.3g}"


def report_lines(fits: list[BudgetFit], boot: dict, corpus: float | None, exponent: float) -> list[str]:
    lines = ["## Compute-optimal fit (IsoFLOP, Hoffmann et al. approach 2)", "",
             "Per budget, each size's loss is that of its learning rate with the lowest mean loss over the seeds; a "
             "parabola of that loss against ln N has its vertex at the loss-optimal size N*, and D* = C / 6N* is the "
             "tokens the budget then allows" + (f", in epochs of the {corpus:.3g}-token training split" if corpus else "")
             + f". Intervals: percentile bootstrap over the {boot['seeds']} seeds, {boot['resamples']} resamples "
             f"(seed {boot['seed']}), learning rates rechosen and every fit redone per resample; a resample whose "
             "vertex falls outside the sizes tried has no optimum, and the share of such resamples is given.", "",
             "| budget C (FLOPs) | mean loss at each size (N; learning-rate variant chosen) | N* [95%] | no optimum | "
             "D*/N* [95%] | epochs at D* | N* per seed | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for fit in fits:
        best, _ = _size_losses(fit.losses, np.arange(len(fit.losses[0][0])))
        at_sizes = ", ".join(f"{_number(loss)} ({n:.3g}; {v})" for loss, n, v in zip(best, fit.sizes, fit.chosen))
        n_int, r_int = fit.interval.get("optimum", {}), fit.interval.get("tokens_per_parameter", {})
        epochs = fit.tokens / corpus if corpus and not math.isnan(fit.tokens) else math.nan
        lines.append(f"| {fit.flops:.3g} | {at_sizes} | {_number(fit.optimum)} [{_number(n_int.get('low'))}, "
                     f"{_number(n_int.get('high'))}] | {n_int.get('without', math.nan):.0%} | "
                     f"{_number(fit.tokens_per_parameter)} [{_number(r_int.get('low'))}, {_number(r_int.get('high'))}] | "
                     f"{_number(epochs)} | {', '.join(_number(n) for n in fit.per_seed)} | {fit.why or '—'} |")
    e = boot["exponent"]
    lines += ["", f"Exponent of N* ~ C^a over the budgets with an optimum: a = {_number(exponent)}, 95% interval "
              f"[{_number(e['low'])}, {_number(e['high'])}] ({e['without']:.0%} of resamples gave fewer than two optima; "
              "Hoffmann et al.: about 0.5).", ""]
    return lines


def analyse(study: Study, table: Table, out_dir: Path) -> tuple[Path, list[str], dict, dict]:
    """The fits, drawn to out_dir/isoflop.png: (the plot, report lines, results.json entries, parent-run metrics)."""
    fits = fit_budgets(study, table)
    boot = bootstrap(fits, len(table.seeds), table.resampling.resamples, table.resampling.seed)
    plot = out_dir / "isoflop.png"
    draw(fits, plot, study.measures[study.isoflop.loss].label or study.isoflop.loss)  # type: ignore[union-attr]
    exponent = size_exponent([(f.flops, f.optimum) for f in fits])
    metrics = {f"isoflop/C{f.flops:.2g}/tokens_per_parameter".replace("+", ""): f.tokens_per_parameter for f in fits}
    metrics = {name: value for name, value in metrics.items() if not math.isnan(value)}
    if not math.isnan(exponent):
        metrics["isoflop/size_exponent"] = exponent
    results = {"isoflop": {"budgets": [f.as_dict() for f in fits], "size_exponent": exponent, "bootstrap": boot}}
    return plot, report_lines(fits, boot, corpus_tokens(table), exponent), results, metrics
