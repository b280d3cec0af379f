"""A study's numbers and verdicts: read each variant's metrics from its artifacts, then judge each claim.

Replicates are independent computations. Seed s of a variant is a replicate of a value only when the
value comes from an artifact no other seed produced: a cache hit (the same stage key) or a measure the
seed does not reach (token perplexity of a model the seed keys do not change) repeats one computation,
and counts once. Within each replicate, the measured items (test documents, scored examples, canaries)
are a sample too; where the artifact keeps its items (tasks/lib/study/items.py), intervals come from a
bootstrap that resamples the replicates and the items, crossed (one draw of the items serves every
replicate that measured them) and paired across the cells of a claim (the same documents for both arms). Without items, the interval is the t-interval over the
independent replicates; with one replicate and no items there is no interval: inconclusive, naming the
repeated artifact.

Rules (the interval of the statistic; `decide` below):
  compare     a - b op margin: held when the 95% interval lies wholly on the claimed side of the
              margin, not held when wholly on the other side, else inconclusive;
  equivalent  |a - b| < margin by two one-sided tests: held when the 90% interval lies inside
              (-margin, margin), not held when wholly outside it, else inconclusive;
  trend       the least-squares slope of the measure against its axis (log axis when asked): held when
              the slope's 95% interval lies on the claimed side of 0 and no step between neighbouring
              points goes significantly against it; not held when the slope's interval lies on the
              other side (or at 0) or a step goes significantly against it; else inconclusive.
Preconditions (accounting facts: a budget spent, a cost ratio) are checked on every value and stop the
study when violated; they are never verdicts.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from jielong.tasks.core.schema import UserError
from jielong.tasks.lib.study.items import ItemStat, item_stat, ratio
from jielong.tasks.lib.study.spec import REFERENCE, Cell, Claim, Compare, Equivalent, Study, Trend, format_x

HELD, NOT_HELD, INCONCLUSIVE = "held", "not held", "inconclusive"
# evaluations whose numbers depend on the evaluation's seed (registry.Evaluation.draws), and their
# numbers that do not (the model alone, without the datastore)
DRAWING = ("icl/", "knnlm")
SEED_BLIND = ("knnlm_base_perplexity",)


@dataclass
class VariantRun:
    """One variant at one seed: where each of its stages' artifacts is."""

    variant: str
    seed: int  # the replicate index, 0 ..
    artifacts: dict[str, str]  # stage name -> artifact folder
    eval_stage: str
    mlflow_run_id: str = ""
    computed: list[str] = field(default_factory=list)  # the stages this invocation ran (the others were cache hits)
    model: str = ""  # an external model the variant evaluates (`model:`), else ""

    def _where(self, reference: str) -> tuple[str, str]:
        match = REFERENCE.match(reference)
        stage, name = match["stage"], match["name"]  # type: ignore[index]
        stage = self.eval_stage if stage == "eval" else stage
        if stage not in self.artifacts:
            raise UserError(f"study: variant {self.variant!r} ran no {stage!r} stage (its stages: "
                            f"{', '.join(self.artifacts)}), so {reference!r} cannot be read")
        return stage, name

    def metric(self, reference: str) -> float:
        stage, name = self._where(reference)
        metrics = _manifest_metrics(self.artifacts[stage])
        if name not in metrics:
            near = sorted(m for m in metrics if name.split("/")[0] in m)[:8]
            raise UserError(f"study: {stage} of variant {self.variant!r} has no metric {name!r}"
                            + (f" (similar: {', '.join(near)})" if near else ""))
        return float(metrics[name])

    def source(self, reference: str) -> str:
        """What computed this value: the artifact it is read from, or for an evaluation's measure that
        draws nothing, the model evaluated (other seeds evaluating the same model repeat it)."""
        stage, name = self._where(reference)
        if stage == "instruct" and name.endswith("_before") and "pretrain" in self.artifacts:
            return self._named("pretrain")  # measured on the pretrained model, before any tuning
        if stage.startswith("eval_") and (not name.startswith(DRAWING) or name in SEED_BLIND):
            if self.model:
                return f"model {self.model} on {self._named('dedup')}"
            model_stage = stage.removeprefix("eval_")
            if model_stage in self.artifacts:
                return self._named(model_stage)
        return self._named(stage)

    def _named(self, stage: str) -> str:
        """An artifact as `stage/key`, the same in every workspace: a report quotes it without the machine's
        paths, and two seeds name one artifact alike exactly when they share it."""
        path = self.artifacts.get(stage)
        return "/".join(Path(path).parts[-2:]) if path else "?"

    def items(self, reference: str) -> ItemStat | None:
        stage, name = self._where(reference)
        return item_stat(self.artifacts[stage], name) if stage.startswith("eval_") or stage == "instruct" else None

    def report(self) -> dict:
        path = Path(self.artifacts.get(self.eval_stage, "")) / "report.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@functools.lru_cache(maxsize=256)
def _manifest_metrics(artifact: str) -> dict:
    """An artifact's metrics (a complete artifact never changes: its folder is its key)."""
    return json.loads((Path(artifact) / "manifest.json").read_text(encoding="utf-8"))["metrics"]


@dataclass
class Estimate:
    values: list[float]  # the statistic per independent replicate
    mean: float
    low: float | None  # the interval; None when there is none
    high: float | None
    method: str = ""  # how the interval was computed, in words
    replicates: int = 0  # independent replicates behind it
    level: float = 0.95

    @property
    def n(self) -> int:
        return len(self.values)

    def text(self, digits: int = 4) -> str:
        spread = "" if self.low is None else f" ± {(self.high - self.mean):.{digits}g}"  # type: ignore[operator]
        return f"{self.mean:.{digits}g}{spread}"


def estimate(values: list[float], level: float = 0.95) -> Estimate:
    """The mean and its t-interval (None with one value)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Estimate(values, mean, None, None, "one value: no interval", n, level)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Estimate(values, mean, mean - half, mean + half, f"t-interval over {n} replicates", n, level)


@dataclass
class Verdict:
    claim: str
    statement: str
    rule: str  # the rule in words
    verdict: str
    reason: str
    kind: str = "compare"  # compare | equivalent | trend
    op: str = ">"
    margin: float = 0.0
    estimate: Estimate | None = None  # compare, equivalent: a - b; trend: the slope
    steps: list[dict] = field(default_factory=list)  # trend: one comparison per step

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- deciding from an interval


def decide(kind: str, op: str, margin: float, low: float | None, high: float | None) -> str:
    """The verdict an interval gives (see the module docstring); also used to recheck a results.json."""
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    if kind == "equivalent":
        if -margin < low and high < margin:
            return HELD
        return NOT_HELD if low >= margin or high <= -margin else INCONCLUSIVE
    if op == ">":
        return HELD if low > margin else NOT_HELD if high <= margin else INCONCLUSIVE
    return HELD if high < margin else NOT_HELD if low >= margin else INCONCLUSIVE


def trend_verdict(slope: str, steps: list[str]) -> str:
    """A trend: its slope's verdict, overruled by any step significantly against the direction."""
    if NOT_HELD in steps or slope == NOT_HELD:
        return NOT_HELD
    return slope


def recheck(results: dict) -> list[str]:
    """Each verdict of a results.json recomputed from its stated intervals; the claims where they differ."""
    wrong = []
    for v in results["verdicts"]:
        est = v.get("estimate") or {}
        low, high = est.get("low"), est.get("high")
        if v["kind"] == "trend":
            steps = [decide("compare", v["op"], 0.0, s["ci_low"], s["ci_high"]) for s in v["steps"]]
            if any(s != step["verdict"] for s, step in zip(steps, v["steps"])):
                wrong.append(f"{v['claim']}: a step's verdict does not follow from its interval")
            expected = trend_verdict(decide("compare", v["op"], 0.0, low, high), steps)
        else:
            expected = decide(v["kind"], v["op"], v["margin"], low, high)
        if expected != v["verdict"]:
            wrong.append(f"{v['claim']}: recorded {v['verdict']!r}, its interval gives {expected!r}")
    return wrong


def compare_values(a: list[float], b: list[float], op: str, margin: float) -> tuple[str, Estimate, str]:
    """The verdict on `a - b op margin` for independent replicates paired by seed (t-interval)."""
    if len(a) != len(b):
        raise UserError(f"study: paired values differ in number ({len(a)} vs {len(b)})")
    diff = estimate([x - y for x, y in zip(a, b)])
    if any(math.isnan(v) for v in diff.values):
        return INCONCLUSIVE, diff, "a value is undefined (NaN)"
    if diff.low is None:
        return INCONCLUSIVE, diff, f"one replicate gives no interval (difference {diff.mean:.4g}); run with --seeds 2 or more"
    verdict = decide("compare", op, margin, diff.low, diff.high)
    return verdict, diff, _compare_reason(verdict, diff, op, margin)


def _interval_text(est: Estimate) -> str:
    return f"{est.level:.0%} interval [{est.low:.4g}, {est.high:.4g}] ({est.method})"


def _compare_reason(verdict: str, est: Estimate, op: str, margin: float) -> str:
    interval = _interval_text(est)
    if verdict == HELD:
        return f"{interval} lies wholly {'above' if op == '>' else 'below'} {margin:g}"
    if verdict == NOT_HELD:
        return f"{interval} lies wholly {'below or at' if op == '>' else 'above or at'} {margin:g}"
    return f"{interval} contains {margin:g}"


# ---------------------------------------------------------------- the numbers


@dataclass(frozen=True)
class Resampling:
    resamples: int = 1000
    seed: int = 20261205
    items: bool = True


class Table:
    """Every (variant, measure, x) cell's values over seeds, where each came from, and its items."""

    def __init__(self, study: Study, runs: list[VariantRun], resampling: Resampling | None = None):
        self.study = study
        self.runs = runs
        self.resampling = resampling or Resampling(**study.bootstrap.model_dump())
        self.seeds = sorted({r.seed for r in runs})
        self.cells: dict[tuple[str, str, float | None], list[float]] = {}
        self.sources: dict[tuple[str, str, float | None], list[str]] = {}
        self._items: dict[tuple[str, str, float | None], list[ItemStat | None]] = {}
        for name, measure in study.measures.items():
            for variant in study.variants:
                if variant.name not in study.measured(name):
                    continue
                for x in measure.x or [None]:
                    key, refs, runs_of = (variant.name, name, x), measure.references(x), self.of(variant.name)
                    self.cells[key] = [self._read(r, refs) for r in runs_of]
                    self.sources[key] = [" / ".join(dict.fromkeys(r.source(ref) for ref in refs)) for r in runs_of]
                    self._items[key] = [self._read_items(r, refs) for r in runs_of]
        self.positions = {v.name: self._position(v.name) for v in study.variants if v.x is not None}

    def of(self, variant: str) -> list[VariantRun]:
        return sorted((r for r in self.runs if r.variant == variant), key=lambda r: r.seed)

    @staticmethod
    def _read(run: VariantRun, references: list[str]) -> float:
        value = run.metric(references[0])
        if len(references) > 1:
            denominator = run.metric(references[1])
            value = value / denominator if denominator else math.nan
        return value

    def _read_items(self, run: VariantRun, references: list[str]) -> ItemStat | None:
        if not self.resampling.items:
            return None
        stats = [run.items(ref) for ref in references]
        if any(s is None for s in stats):
            return None
        return stats[0] if len(stats) == 1 else ratio(stats[0], stats[1])  # type: ignore[arg-type]

    def _position(self, variant: str) -> float:
        x = self.study.variant(variant).x
        if isinstance(x, str):
            values = {r.metric(x) for r in self.of(variant)}
            return sum(values) / len(values)
        return float(x)  # type: ignore[arg-type]

    def _key(self, cell: Cell) -> tuple[str, str, float | None]:
        return (cell.variant, cell.measure, cell.x)

    def values(self, cell: Cell) -> list[float]:
        return self.cells[self._key(cell)]

    def independent(self, cells: list[Cell]) -> tuple[list[int], str]:
        """The seed indices that are independent replicates: some cell's value is computed anew there. A cell
        whose value repeats another seed's artifact enters as that one value again (a constant of the
        comparison); a seed where every cell repeats adds nothing. Also: which artifacts were repeated."""
        kept, seen, repeats = [], [set() for _ in cells], []
        for i, seed in enumerate(self.seeds):
            sources = [self.sources[self._key(c)][i] for c in cells]
            again = [(c, s) for c, s, known in zip(cells, sources, seen) if s in known]
            if again:
                repeats.append(f"seed {seed} repeats {again[0][0].describe()} from {again[0][1]}"
                               + (f" (and {len(again) - 1} more cells)" if len(again) > 1 else ""))
            if len(again) < len(cells):
                kept.append(i)
            for known, source in zip(seen, sources):
                known.add(source)
        why = ""
        if repeats:
            why = ("; ".join(repeats) + " (the same artifact: a cache hit of the same stage key, or a measure "
                   "the seed does not reach), so it counts once")
        return kept, why

    def interval(self, cells: list[Cell], statistic: Callable[[np.ndarray], np.ndarray], level: float) -> tuple[Estimate, str]:
        """The statistic of the cells' values (a function of an array of shape (..., cells)) with its interval,
        from independent replicates and, where the cells keep items, a bootstrap over both."""
        kept, why = self.independent(cells)
        full = np.array([[self.values(c)[i] for c in cells] for i in kept], dtype=np.float64)
        per_replicate = [float(v) for v in statistic(full)]
        draws, method = self._draws(tuple(self._key(c) for c in cells), tuple(kept))
        if draws is None:
            est = estimate(per_replicate, level)
            if est.low is not None:
                est.method = f"t-interval over {len(kept)} independent replicates"
            return est, why
        low, high = np.nanpercentile(statistic(draws), [50 * (1 - level), 50 * (1 + level)])
        return Estimate(per_replicate, float(np.mean(statistic(full))), float(low), float(high), method, len(kept), level), why

    @functools.cache
    def _draws(self, keys: tuple, kept: tuple[int, ...]) -> tuple[np.ndarray | None, str]:
        """Bootstrap draws of the cells' means, shape (resamples, cells): resample the independent replicates
        (when there are several) and the items of every unit. Seeds and items are crossed (every seed is
        measured on the same documents or examples), so each resample draws a unit's items once, for every
        replicate and cell that measures them (Owen's pigeonhole bootstrap): drawn anew per replicate, the
        items' variation would average out over the seeds as if each seed had items of its own. None when no
        cell keeps items. Cached: a claim's statistics share one set."""
        items = [[self._items[key][i] for key in keys] for i in kept]
        if any(s is None for row in items for s in row):  # items are resampled only where every cell keeps them
            return None, ""
        full = np.array([[self.cells[key][i] for key in keys] for i in kept], dtype=np.float64)
        units = {u: n for row in items for s in row if s is not None for u, n in s.units.items()}
        rng = np.random.default_rng(self.resampling.seed)
        n_rep, count = len(kept), self.resampling.resamples
        draws = np.empty((count, len(keys)))
        for b in range(count):
            chosen = rng.integers(0, n_rep, n_rep) if n_rep > 1 else np.zeros(1, dtype=int)
            idx = {u: rng.integers(0, n, n) for u, n in sorted(units.items())}
            rows = np.array([[s.fn(idx) if s is not None else full[r, c] for c, s in enumerate(items[r])] for r in chosen])
            draws[b] = rows.mean(axis=0)
        described = sorted({s.describe() for row in items for s in row if s is not None})
        method = (f"percentile bootstrap, {count} resamples (seed {self.resampling.seed}) of "
                  + (f"{n_rep} independent replicates and, crossed with them, " if n_rep > 1 else "1 independent replicate: ")
                  + f"the items ({'; '.join(described)}), paired across cells")
        return draws, method

    @functools.cache
    def cell_estimate(self, variant: str, measure: str, x: float | None = None) -> tuple[Estimate, str]:
        """One cell's mean over its independent replicates, with its 95% interval."""
        return self.interval([Cell(variant=variant, measure=measure, x=x)], lambda v: v[..., 0], 0.95)

    def rows(self) -> list[dict]:
        """One row per cell: mean, 95% interval, the values and sources per seed."""
        rows = []
        for (variant, measure, x), values in self.cells.items():
            est, why = self.cell_estimate(variant, measure, x)
            rows.append({"variant": variant, "measure": measure, "x": x, "n": len(values), "replicates": est.replicates,
                         "mean": est.mean, "ci_low": est.low, "ci_high": est.high, "method": est.method,
                         "values": values, "sources": self.sources[(variant, measure, x)], "repeated": why})
        return rows


# ---------------------------------------------------------------- the rules


def judge(study: Study, table: Table) -> list[Verdict]:
    return [_judge_claim(claim, table) for claim in study.claims]


def _judge_claim(claim: Claim, table: Table) -> Verdict:
    if claim.compare:
        return _judge_compare(claim, claim.compare, table)
    if claim.equivalent:
        return _judge_equivalent(claim, claim.equivalent, table)
    return _judge_trend(claim, claim.trend, table)  # type: ignore[arg-type]


def _no_interval(est: Estimate, why: str) -> str:
    if why:
        return f"one independent value and no measured items to resample: {why}"
    return f"one replicate gives no interval (value {est.mean:.4g}); run with --seeds 2 or more"


def _difference(table: Table, a: Cell, b: Cell | None, level: float) -> tuple[Estimate, str]:
    cells = [a] + ([b] if b else [])
    return table.interval(cells, (lambda v: v[..., 0] - v[..., 1]) if b else (lambda v: v[..., 0]), level)


def _judge_compare(claim: Claim, rule: Compare, table: Table) -> Verdict:
    if rule.b is None:
        words = f"{rule.a.describe()} {rule.op} {rule.margin:g}"
    else:
        words = f"{rule.a.describe()} - {rule.b.describe()} {rule.op} {rule.margin:g}"
    est, why = _difference(table, rule.a, rule.b, 0.95)
    verdict = decide("compare", rule.op, rule.margin, est.low, est.high)
    if any(math.isnan(v) for v in est.values):
        reason = "a value is undefined (NaN)"
    elif est.low is None:
        reason = _no_interval(est, why)
    else:
        reason = _compare_reason(verdict, est, rule.op, rule.margin) + (f"; {why}" if why else "")
    return Verdict(claim.name, claim.statement, words, verdict, reason, "compare", rule.op, rule.margin, est)


def _judge_equivalent(claim: Claim, rule: Equivalent, table: Table) -> Verdict:
    words = f"|{rule.a.describe()} - {rule.b.describe()}| < {rule.margin:g} (two one-sided tests)"
    est, why = _difference(table, rule.a, rule.b, 0.90)
    verdict = decide("equivalent", "<", rule.margin, est.low, est.high)
    if est.low is None:
        reason = _no_interval(est, why)
    else:
        interval, m = _interval_text(est), rule.margin
        reason = {HELD: f"{interval} lies inside (-{m:g}, {m:g}): both one-sided tests reject a difference of {m:g} or more",
                  NOT_HELD: f"{interval} lies wholly outside (-{m:g}, {m:g})",
                  INCONCLUSIVE: f"{interval} reaches past ±{m:g}; {needed_samples(est, m)}"}[verdict] + (f"; {why}" if why else "")
    return Verdict(claim.name, claim.statement, words, verdict, reason, "equivalent", "<", rule.margin, est)


def needed_samples(est: Estimate, margin: float) -> str:
    """How many more samples an inconclusive equivalence would need at the measured variance: the interval's
    half-width shrinks as 1/sqrt(n), and must fall below the room left between the estimate and the margin."""
    room = margin - abs(est.mean)
    if room <= 0:
        return "the estimate itself lies at or beyond the margin, so more samples would not make it hold"
    factor = ((est.high - est.low) / 2 / room) ** 2  # type: ignore[operator]
    return (f"at the measured variance, holding needs the interval's half-width below {room:.3g}: about "
            f"{factor:.1f} times the samples behind it ({est.method})")


def trend_points(rule: Trend, table: Table) -> list[tuple[str, float, Cell]]:
    """(label, position on the axis, cell) in axis order."""
    if rule.variant is not None:
        xs = table.study.measures[rule.measure].x or []
        return [(f"x={format_x(x)}", float(x), Cell(variant=rule.variant, measure=rule.measure, x=x)) for x in xs]
    ordered = sorted(rule.variants or [], key=lambda v: table.positions[v])
    return [(f"{v} (x={table.positions[v]:.4g})", table.positions[v], Cell(variant=v, measure=rule.measure)) for v in ordered]


def slope_of(xs: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The least-squares slope of values (..., points) against xs."""
    centred = xs - xs.mean()
    return lambda values: (values - values.mean(axis=-1, keepdims=True)) @ centred / float(centred @ centred)


def _judge_trend(claim: Claim, rule: Trend, table: Table) -> Verdict:
    points = trend_points(rule, table)
    cells = [cell for _, _, cell in points]
    xs = np.array([x for _, x, _ in points], dtype=np.float64)
    if rule.log_x:
        if (xs <= 0).any():
            raise UserError(f"claim {claim.name!r}: a log axis needs positive positions (got {xs.tolist()})")
        xs = np.log(xs)
    op = ">" if rule.direction == "increasing" else "<"
    slope, why = table.interval(cells, slope_of(xs), 0.95)
    steps = []
    for i, ((left, _, a), (right, _, b)) in enumerate(zip(points, points[1:])):
        diff, _ = table.interval(cells, lambda v, i=i: v[..., i + 1] - v[..., i], 0.95)
        steps.append({"from": left, "to": right, "verdict": decide("compare", op, 0.0, diff.low, diff.high),
                      "difference": diff.mean, "ci_low": diff.low, "ci_high": diff.high})
    axis = "ln x" if rule.log_x else "x"
    where = f"along x for {rule.variant}" if rule.variant else f"across {', '.join(p[0] for p in points)}"
    words = f"slope of {rule.measure} against {axis} {op} 0 {where}, no step significantly against"
    slope_verdict = decide("compare", op, 0.0, slope.low, slope.high)
    verdict = trend_verdict(slope_verdict, [s["verdict"] for s in steps])
    if slope.low is None:
        reason = _no_interval(slope, why)
    else:
        against = [f"{s['from']} -> {s['to']}" for s in steps if s["verdict"] == NOT_HELD]
        reason = f"slope {slope.mean:.4g} per unit of {axis}, {_interval_text(slope)}"
        if against:
            reason += f"; the step {', '.join(against)} goes significantly against the claimed direction"
        elif verdict == HELD:
            reason += " excludes 0 on the claimed side, and no step goes significantly against it"
        elif verdict == NOT_HELD:
            reason += " lies at or beyond 0 on the other side"
        else:
            reason += " contains 0"
        reason += f"; {why}" if why else ""
    return Verdict(claim.name, claim.statement, words, verdict, reason, "trend", op, 0.0, slope, steps)


# ---------------------------------------------------------------- preconditions


def check_preconditions(study: Study, table: Table) -> list[dict]:
    """Every precondition on every seed's value; a violated one stops the study (a UserError)."""
    checked = []
    for pre in study.preconditions:
        a = table.values(pre.a)
        b = table.values(pre.b) if pre.b else [0.0] * len(a)
        bad = [(seed, x - y) for seed, x, y in zip(table.seeds, a, b)
               if not ((x - y > pre.margin) if pre.op == ">" else (x - y < pre.margin))]
        words = (f"{pre.a.describe()}" + (f" - {pre.b.describe()}" if pre.b else "") + f" {pre.op} {pre.margin:g}")
        if bad:
            values = ", ".join(f"seed {s}: {v:.6g}" for s, v in bad)
            raise UserError(f"study {study.name}: precondition {pre.name!r} ({words}) is violated ({values}); "
                            "the study's design does not hold, so its claims are not judged")
        checked.append({"name": pre.name, "statement": pre.statement, "rule": words,
                         "values": [x - y for x, y in zip(a, b)]})
    return checked
