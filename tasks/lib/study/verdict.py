"""A study's numbers and verdicts: read each variant's metrics from its artifacts, then judge each claim.

Seeds are replicates: seed s of every variant is one draw, and two variants are compared seed by seed
(paired). A verdict comes from the 95% t-interval of the mean paired difference:
  held          the interval lies wholly on the claimed side of the margin,
  not held      it lies wholly on the other side,
  inconclusive  it straddles the margin, or there is one seed (no interval).
A trend is a chain of such comparisons, one per step: held when every step holds, not held when any
step is contradicted, inconclusive otherwise.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jielong.tasks.core.schema import UserError
from jielong.tasks.lib.study.spec import REFERENCE, Cell, Claim, Compare, Study, Trend, format_x

HELD, NOT_HELD, INCONCLUSIVE = "held", "not held", "inconclusive"


@dataclass
class VariantRun:
    """One variant at one seed: where each of its stages' artifacts is."""

    variant: str
    seed: int  # the replicate index, 0 ..
    artifacts: dict[str, str]  # stage name -> artifact folder
    eval_stage: str
    mlflow_run_id: str = ""
    computed: list[str] = field(default_factory=list)  # the stages this invocation ran (the others were cache hits)

    def metric(self, reference: str) -> float:
        match = REFERENCE.match(reference)
        stage, name = match["stage"], match["name"]  # type: ignore[index]
        stage = self.eval_stage if stage == "eval" else stage
        if stage not in self.artifacts:
            raise UserError(f"study: variant {self.variant!r} ran no {stage!r} stage (its stages: "
                            f"{', '.join(self.artifacts)}), so {reference!r} cannot be read")
        metrics = _manifest_metrics(self.artifacts[stage])
        if name not in metrics:
            near = sorted(m for m in metrics if name.split("/")[0] in m)[:8]
            raise UserError(f"study: {stage} of variant {self.variant!r} has no metric {name!r}"
                            + (f" (similar: {', '.join(near)})" if near else ""))
        return float(metrics[name])

    def report(self) -> dict:
        path = Path(self.artifacts.get(self.eval_stage, "")) / "report.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@functools.lru_cache(maxsize=256)
def _manifest_metrics(artifact: str) -> dict:
    """An artifact's metrics (a complete artifact never changes: its folder is its key)."""
    return json.loads((Path(artifact) / "manifest.json").read_text(encoding="utf-8"))["metrics"]


@dataclass
class Estimate:
    values: list[float]
    mean: float
    low: float | None  # 95% t-interval of the mean; None with one value
    high: float | None

    @property
    def n(self) -> int:
        return len(self.values)

    def text(self, digits: int = 4) -> str:
        spread = "" if self.low is None else f" ± {(self.high - self.mean):.{digits}g}"  # type: ignore[operator]
        return f"{self.mean:.{digits}g}{spread}"


def estimate(values: list[float]) -> Estimate:
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Estimate(values, mean, None, None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return Estimate(values, mean, mean - half, mean + half)


@dataclass
class Verdict:
    claim: str
    statement: str
    rule: str  # the rule in words
    verdict: str
    reason: str
    estimate: Estimate | None = None  # compare: the paired difference a - b
    steps: list[dict] = field(default_factory=list)  # trend: one comparison per step

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- the numbers


class Table:
    """Every (variant, measure, x) cell's values over seeds."""

    def __init__(self, study: Study, runs: list[VariantRun]):
        self.study = study
        self.runs = runs
        self.seeds = sorted({r.seed for r in runs})
        self.cells: dict[tuple[str, str, float | None], list[float]] = {}
        for name, measure in study.measures.items():
            for variant in study.variants:
                for x in measure.x or [None]:
                    self.cells[(variant.name, name, x)] = [self._read(r, measure.references(x)) for r in self.of(variant.name)]
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

    def _position(self, variant: str) -> float:
        x = self.study.variant(variant).x
        if isinstance(x, str):
            values = {r.metric(x) for r in self.of(variant)}
            return sum(values) / len(values)
        return float(x)  # type: ignore[arg-type]

    def values(self, cell: Cell) -> list[float]:
        return self.cells[(cell.variant, cell.measure, cell.x)]

    def rows(self) -> list[dict]:
        """One row per cell: mean, interval, the values per seed."""
        rows = []
        for (variant, measure, x), values in self.cells.items():
            est = estimate(values)
            rows.append({"variant": variant, "measure": measure, "x": x, "n": est.n, "mean": est.mean,
                         "ci_low": est.low, "ci_high": est.high, "values": values})
        return rows


# ---------------------------------------------------------------- the rules


def judge(study: Study, table: Table) -> list[Verdict]:
    return [_judge_claim(claim, table) for claim in study.claims]


def _judge_claim(claim: Claim, table: Table) -> Verdict:
    if claim.compare:
        return _judge_compare(claim, claim.compare, table)
    return _judge_trend(claim, claim.trend, table)  # type: ignore[arg-type]


def compare_values(a: list[float], b: list[float], op: str, margin: float) -> tuple[str, Estimate, str]:
    """The verdict on `a - b op margin` for values paired by seed."""
    if len(a) != len(b):
        raise UserError(f"study: paired values differ in number ({len(a)} vs {len(b)})")
    diff = estimate([x - y for x, y in zip(a, b)])
    if any(math.isnan(v) for v in diff.values):
        return INCONCLUSIVE, diff, "a value is undefined (NaN)"
    if diff.low is None:
        return INCONCLUSIVE, diff, f"one seed gives no interval (difference {diff.mean:.4g}); run with --seeds 2 or more"
    claimed_side = (diff.low > margin) if op == ">" else (diff.high < margin)  # type: ignore[operator]
    other_side = (diff.high <= margin) if op == ">" else (diff.low >= margin)  # type: ignore[operator]
    interval = f"95% interval of the difference [{diff.low:.4g}, {diff.high:.4g}] over {diff.n} seeds"
    if claimed_side:
        return HELD, diff, f"{interval} lies wholly {'above' if op == '>' else 'below'} {margin:g}"
    if other_side:
        return NOT_HELD, diff, f"{interval} lies wholly {'below or at' if op == '>' else 'above or at'} {margin:g}"
    return INCONCLUSIVE, diff, f"{interval} contains {margin:g}"


def _judge_compare(claim: Claim, rule: Compare, table: Table) -> Verdict:
    a = table.values(rule.a)
    if rule.b is None:
        words, b = f"{rule.a.describe()} {rule.op} {rule.margin:g}", [0.0] * len(a)
    else:
        words, b = f"{rule.a.describe()} - {rule.b.describe()} {rule.op} {rule.margin:g}", table.values(rule.b)
    verdict, diff, reason = compare_values(a, b, rule.op, rule.margin)
    return Verdict(claim.name, claim.statement, words, verdict, reason, estimate=diff)


def trend_points(rule: Trend, table: Table) -> list[tuple[str, list[float]]]:
    """(label, values over seeds) in axis order."""
    if rule.variant is not None:
        xs = table.study.measures[rule.measure].x or []
        return [(f"x={format_x(x)}", table.values(Cell(variant=rule.variant, measure=rule.measure, x=x))) for x in xs]
    ordered = sorted(rule.variants or [], key=lambda v: table.positions[v])
    return [(f"{v} (x={table.positions[v]:.4g})", table.values(Cell(variant=v, measure=rule.measure))) for v in ordered]


def _judge_trend(claim: Claim, rule: Trend, table: Table) -> Verdict:
    points = trend_points(rule, table)
    op = ">" if rule.direction == "increasing" else "<"
    steps = []
    for (left, a), (right, b) in zip(points, points[1:]):
        verdict, diff, reason = compare_values(b, a, op, 0.0)
        steps.append({"from": left, "to": right, "verdict": verdict, "difference": diff.mean,
                      "ci_low": diff.low, "ci_high": diff.high, "reason": reason})
    where = f"along x for {rule.variant}" if rule.variant else f"across {', '.join(p[0] for p in points)}"
    words = f"{rule.measure} {rule.direction} {where}: every step {op} 0"
    verdicts = [s["verdict"] for s in steps]
    if all(v == HELD for v in verdicts):
        verdict, reason = HELD, f"all {len(steps)} steps go the claimed way, each interval excluding 0"
    elif NOT_HELD in verdicts:
        bad = [f"{s['from']} -> {s['to']}" for s in steps if s["verdict"] == NOT_HELD]
        verdict, reason = NOT_HELD, f"the step {', '.join(bad)} does not go the claimed way (its interval lies at or beyond 0)"
    else:
        unsure = [f"{s['from']} -> {s['to']}" for s in steps if s["verdict"] == INCONCLUSIVE]
        why = "one seed gives no interval" if len(table.seeds) < 2 else "its interval contains 0"
        verdict, reason = INCONCLUSIVE, f"no step is contradicted, but {', '.join(unsure)} cannot be told from 0 ({why})"
    return Verdict(claim.name, claim.statement, words, verdict, reason, steps=steps)
