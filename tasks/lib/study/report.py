"""A study's report: report.md (per claim: the notes' statement, the experiment, a table of mean ± 95%
interval over seeds, the plot, the computed verdict, what this scale cannot show), results.json and
the PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jielong.tasks.lib.study.spec import Cell, Claim, Plot, Study, format_x  # noqa: E402
from jielong.tasks.lib.study.verdict import Estimate, Table, Verdict  # noqa: E402

MARK = {"held": "HELD", "not held": "NOT HELD", "inconclusive": "INCONCLUSIVE"}


# ---------------------------------------------------------------- plots


def draw_plots(study: Study, table: Table, out_dir: Path) -> list[Path]:
    return [_draw(study, table, plot, out_dir, i) for i, plot in enumerate(study.plots_drawn())]


def _draw(study: Study, table: Table, plot: Plot, out_dir: Path, index: int) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    variants = plot.variants or [v.name for v in study.variants]
    if plot.kind == "reliability":
        _reliability(table, plot, variants, ax)
        stem = f"reliability_{plot.task or 'tokens'}"
    else:
        _line(study, table, plot, variants, ax)
        stem = "_".join(plot.measure_names)
    ax.set_title(plot.title or stem.replace("_", " "), fontsize=10)
    if plot.log_x:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / (plot.file or f"{index + 1:02d}_{stem}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _line(study: Study, table: Table, plot: Plot, variants: list[str], ax) -> None:
    names = plot.measure_names
    first = study.measures[names[0]]
    for name in names:
        measure = study.measures[name]
        for variant in [v for v in variants if v in study.measured(name)]:
            label = " · ".join(part for part in (variant if len(variants) > 1 else "",
                                                 (measure.label or name) if len(names) > 1 else "") if part) or variant
            if measure.x is not None:
                points = [table.cell_estimate(variant, name, x)[0] for x in measure.x]
                _errorbar(ax, list(measure.x), points, label)
        if measure.x is None:
            _across_variants(table, name, [v for v in variants if v in study.measured(name)], ax, measure.label or name)
    ax.set_xlabel(first.x_label or ("x" if first.x is not None else "variant"))
    ax.set_ylabel(plot.y_label or first.label or names[0])


def _across_variants(table: Table, name: str, variants: list[str], ax, label: str) -> None:
    placed = sorted((v for v in variants if v in table.positions), key=lambda v: table.positions[v])
    if placed:
        xs = [table.positions[v] for v in placed]
        points = [table.cell_estimate(v, name)[0] for v in placed]
        _errorbar(ax, xs, points, label)
        for x, p, v in zip(xs, points, placed):
            ax.annotate(v, (x, p.mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
        return
    points = [table.cell_estimate(v, name)[0] for v in variants]
    _errorbar(ax, list(range(len(variants))), points, label)
    ax.set_xticks(range(len(variants)), variants, fontsize=8)


def _errorbar(ax, xs: list[float], points: list, label: str) -> None:
    means = [p.mean for p in points]
    below = [0.0 if p.low is None else max(p.mean - p.low, 0.0) for p in points]
    above = [0.0 if p.high is None else max(p.high - p.mean, 0.0) for p in points]
    ax.errorbar(xs, means, yerr=[below, above], marker="o", capsize=3, label=label)


def _reliability(table: Table, plot: Plot, variants: list[str], ax) -> None:
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    for variant in variants:
        runs = table.of(variant)
        report = runs[0].report() if runs else {}
        if plot.task:
            bins = report.get("icl", {}).get("tasks", {}).get(plot.task, {}).get("reliability")
        else:
            bins = report.get("calibration", {}).get("reliability")
        if not bins:
            continue
        kept = [(c, a) for c, a, n in zip(bins["confidence"], bins["accuracy"], bins["count"]) if n]
        ax.plot([c for c, _ in kept], [a for _, a in kept], marker="o", label=variant)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (mean per bin)", ylabel="accuracy")


# ---------------------------------------------------------------- report.md and results.json


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4g}"


def _cell_text(est: Estimate) -> str:
    if est.low is None:
        return _fmt(est.mean)
    return f"{_fmt(est.mean)} [{_fmt(est.low)}, {_fmt(est.high)}]"


def measures_table(study: Study, table: Table) -> list[str]:
    lines = []
    for name, measure in study.measures.items():
        what = measure.metric + (f" / {measure.over}" if measure.over else "")
        lines += [f"**{name}** — {measure.label} (`{what}`)" if measure.label else f"**{name}** — `{what}`", ""]
        xs = measure.x or [None]
        header = ["variant"] + [f"{measure.x_label or 'x'}={format_x(x)}" if x is not None else "mean [95% interval]" for x in xs]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for variant in [v for v in study.variants if v.name in study.measured(name)]:
            cells = [_cell_text(table.cell_estimate(variant.name, name, x)[0]) for x in xs]
            lines.append(f"| {variant.name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _claim_cells(study: Study, table: Table, claim: Claim) -> list[Cell]:
    if claim.cells:
        return claim.cells
    trend = claim.trend
    measure = study.measures[trend.measure]  # type: ignore[union-attr]
    if trend.variant is not None:  # type: ignore[union-attr]
        return [Cell(variant=trend.variant, measure=trend.measure, x=x) for x in measure.x or []]  # type: ignore[union-attr]
    ordered = sorted(trend.variants or [], key=lambda v: table.positions[v])  # type: ignore[union-attr]
    return [Cell(variant=v, measure=trend.measure) for v in ordered]  # type: ignore[union-attr]


def _cells_table(table: Table, cells: list[Cell]) -> list[str]:
    seeds = table.seeds
    lines = ["| cell | mean [95% interval] | independent replicates | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|---|" + "---|" * len(seeds)]
    for cell in cells:
        values = table.values(cell)
        est, _ = table.cell_estimate(cell.variant, cell.measure, cell.x)
        lines.append(f"| {cell.describe()} | {_cell_text(est)} | {est.replicates} | " + " | ".join(_fmt(v) for v in values) + " |")
    return lines + [""]


def _claim_plots(claim: Claim, cells: list[Cell], plots: list[tuple[Plot, Path]]) -> list[str]:
    """The plots that draw one of the claim's measures for one of its variants."""
    measures, variants = {c.measure for c in cells}, {c.variant for c in cells}
    return [f"![{path.stem}]({path.name})" for plot, path in plots
            if measures & set(plot.measure_names) and (plot.variants is None or variants & set(plot.variants))] + [""]


def _verdict_lines(verdict: Verdict) -> list[str]:
    lines = [f"### {verdict.claim}: **{MARK[verdict.verdict]}**", "", f"> {verdict.statement}", "",
             f"Rule: `{verdict.rule}`. {verdict.reason[0].upper() + verdict.reason[1:]}.", ""]
    est = verdict.estimate
    if est is not None:
        what = "Slope" if verdict.kind == "trend" else "Difference" if "-" in verdict.rule else "Value"
        values = ", ".join(_fmt(v) for v in est.values)
        interval = "no interval" if est.low is None else f"{est.level:.0%} interval [{_fmt(est.low)}, {_fmt(est.high)}]"
        lines += [f"{what} per independent replicate: {values}; estimate {_fmt(est.mean)}, {interval} "
                  f"({est.method}).", ""]
    if verdict.steps:
        lines += ["| step | difference (mean) | 95% interval | verdict |", "|---|---|---|---|"]
        for step in verdict.steps:
            interval = "—" if step["ci_low"] is None else f"[{_fmt(step['ci_low'])}, {_fmt(step['ci_high'])}]"
            lines.append(f"| {step['from']} → {step['to']} | {_fmt(step['difference'])} | {interval} | {step['verdict']} |")
        lines.append("")
    return lines


def _precondition_lines(checked: list[dict]) -> list[str]:
    if not checked:
        return []
    lines = ["Preconditions (accounting facts the design relies on; a violated one stops the study, "
             "none is a finding):", ""]
    lines += [f"- {c['name']}: {c['statement'].strip()} (`{c['rule']}`, met at every seed: "
              + ", ".join(_fmt(v) for v in c["values"]) + ")" for c in checked]
    return lines + [""]


def write_report(study: Study, table: Table, verdicts: list[Verdict], plots: list[Path], out_dir: Path,
                 context: dict, sections: list[str] = (), more_results: dict | None = None) -> tuple[Path, Path]:
    """report.md and results.json in out_dir; context: seeds, run ids, git commit, wall time, variants' keys;
    `sections`: more report lines (an analysis such as the IsoFLOP fit), `more_results` more results.json entries."""
    summary = ["| claim | verdict | rule |", "|---|---|---|"]
    summary += [f"| {v.claim} | **{MARK[v.verdict]}** | `{v.rule}` |" for v in verdicts]
    variants = ["| variant | runs | seeds (" + ", ".join(study.seed_keys) + ") | MLflow runs |", "|---|---|---|---|"]
    for variant in study.variants:
        what = f"`jielong eval --model {variant.model}`" if variant.model else f"pipeline up to {variant.eval_stage}"
        overrides = " ".join(f"`{s}`" for s in variant.set)
        runs = table.of(variant.name)
        variants.append(f"| {variant.name} | {what} {overrides} | {len(runs)} | "
                        + ", ".join(r.mlflow_run_id[:8] for r in runs) + " |")
    from jielong.tasks.lib.study.provenance import header_lines

    lines = [
        f"# Study {study.name}: {study.title}", "", *header_lines(context),
        f"Computed {context['finished_at']} · {len(table.seeds)} seed(s) · git {context['git_commit'][:10]} · "
        f"MLflow parent run `{context['parent_run_id']}` · this invocation: {context['seconds']:.0f} s, "
        f"{sum(len(r.computed) for r in table.runs)} stages computed and "
        f"{sum(len(r.artifacts) - len(r.computed) for r in table.runs)} cache hits "
        f"(stated cost from scratch: {study.cost.strip()})", "",
        "## Verdicts", "", *summary, "", *_precondition_lines(context.get("preconditions", [])),
        "## What the notes say", "", study.notes.strip(), "",
        "## The experiment", "", study.experiment.strip(), "",
        f"Base config `{study.config}`" + (" with " + " ".join(f"`{s}`" for s in study.set) if study.set else "")
        + ("; command-line overrides " + " ".join(f"`{s}`" for s in context["overrides"]) if context["overrides"] else "")
        + ".", "", *variants, "",
        "## Claims", "",
    ]
    drawn = list(zip(study.plots_drawn(), plots))
    for claim, verdict in zip(study.claims, verdicts):
        lines += _verdict_lines(verdict)
        cells = _claim_cells(study, table, claim)
        lines += _cells_table(table, cells)
        lines += _claim_plots(claim, cells, drawn)
    lines += list(sections)
    lines += ["## Numbers (mean over independent replicates [95% interval])", "",
              "Intervals resample the independent replicates and, where the evaluation keeps its measured items "
              f"(documents, examples, canaries), the items, crossed with the replicates (one draw of the items for "
              f"every seed that measured them): a percentile bootstrap of "
              f"{table.resampling.resamples} resamples with seed {table.resampling.seed}; without items, the "
              "t-interval over the independent replicates. A seed whose value repeats an artifact of another "
              "seed counts once.", "", *measures_table(study, table)]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    lines += ["## What this scale cannot show", "", study.limits.strip(), ""]
    lines += ["Verdicts are computed from the numbers above by the rules in the study file "
              "(tasks/lib/study/verdict.py); none is written by hand.", ""]
    md = out_dir / "report.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    results = out_dir / "results.json"
    results.write_text(json.dumps({
        "study": study.model_dump(mode="json"), "context": context,
        "verdicts": [v.as_dict() for v in verdicts], "cells": table.rows(),
        "runs": [{"variant": r.variant, "seed": r.seed, "mlflow_run_id": r.mlflow_run_id, "artifacts": r.artifacts,
                  "computed": r.computed}
                 for r in table.runs],
        **(more_results or {}),
    }, indent=2, default=str), encoding="utf-8")
    return md, results
