"""A study file: a claim of the course notes as data (studies/NAME.yaml or configs/studies/NAME.yaml).

    name, title, notes (the notes' statement), experiment, limits (what this scale cannot show),
    cost (its measured wall time), config (the base preset), set (overrides for every variant),
    seeds and seed_keys (replicates: seed s adds s to each seed key), variants (named override sets,
    or `model:` to evaluate an existing model), measures (what to read from each variant's
    artifacts), claims (each with a verdict rule), plots.

A metric reference is `STAGE:NAME`: NAME in the manifest metrics of the stage's artifact for that
variant (`eval` is the variant's evaluation stage). A measure's NAME may hold `{x}`, filled from its
`x` list: one number per x per variant per seed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from jielong.tasks.core.resources import shipped_dir
from jielong.tasks.core.schema import Strict, UserError

STUDY_DIRS = (shipped_dir("studies"), shipped_dir("configs") / "studies")
REFERENCE = re.compile(r"^(?P<stage>[a-z_]+):(?P<name>\S+)$")


class Variant(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    config: str | None = Field(None, description="preset or YAML path (default: the study's config)")
    set: list[str] = Field(default_factory=list, description="overrides after the study's")
    model: str | None = Field(None, description="evaluate this model (as `jielong eval --model`) instead of training one")
    stage: str | None = Field(None, description="the evaluation stage `eval:` names and the last stage run "
                              "(default: eval_pretrain, or eval_model with model)")
    x: float | str | None = Field(None, description="the variant's position when a rule or plot runs across "
                                  "variants: a number or a metric reference (e.g. eval:parameters)")

    @property
    def eval_stage(self) -> str:
        return self.stage or ("eval_model" if self.model else "eval_pretrain")

    @model_validator(mode="after")
    def _model_is_evaluated(self) -> "Variant":
        if self.model and self.stage not in (None, "eval_model"):
            raise ValueError(f"variant {self.name!r}: a model variant runs the eval_model stage, not {self.stage!r}")
        if isinstance(self.x, str):
            _check_reference(self.x, f"variant {self.name!r} x")
        return self


class Measure(Strict):
    metric: str = Field(description="STAGE:NAME; NAME may hold {x}")
    x: list[float] | None = Field(None, description="the values of {x}: one number per value")
    over: str | None = Field(None, description="divide by this metric reference (a ratio; may hold {x})")
    label: str | None = None
    x_label: str | None = None
    variants: list[str] | None = Field(None, description="read for these variants only (a metric the others lack)")

    @model_validator(mode="after")
    def _template_matches(self) -> "Measure":
        for reference in (self.metric, self.over):
            if reference is not None:
                _check_reference(reference, "measure")
        if ("{x}" in self.metric) != (self.x is not None):
            raise ValueError(f"measure {self.metric!r}: its metric holds {{x}} exactly when the measure has an x list")
        if self.over and "{x}" in self.over and self.x is None:
            raise ValueError(f"measure {self.metric!r}: `over` holds {{x}} but the measure has no x list")
        if self.x is not None and not self.x:
            raise ValueError("a measure's x list is empty")
        return self

    def references(self, x: float | None) -> list[str]:
        """The metric (and the one it is divided by) with {x} filled."""
        refs = [self.metric] + ([self.over] if self.over else [])
        return refs if x is None else [r.replace("{x}", format_x(x)) for r in refs]


class Cell(Strict):
    """One number per seed: a measure of a variant, at one x when the measure has an x list."""

    variant: str
    measure: str
    x: float | None = None

    def describe(self) -> str:
        return f"{self.measure}[{self.variant}" + (f", x={format_x(self.x)}]" if self.x is not None else "]")


class Compare(Strict):
    """a - b  op  margin, for the seeds' paired differences (a  op  margin without b): held when the 95%
    interval of their mean lies wholly on the claimed side of the margin, not held when wholly on the
    other, else inconclusive."""

    a: Cell
    b: Cell | None = None
    op: Literal[">", "<"]
    margin: float = 0.0

    @property
    def cells(self) -> list[Cell]:
        return [self.a] + ([self.b] if self.b else [])


class Equivalent(Strict):
    """|a - b| < margin ("barely", "no more than"), by two one-sided tests: held when the 90% interval of
    the difference lies inside (-margin, margin), not held when wholly outside it."""

    a: Cell
    b: Cell
    margin: float = Field(gt=0)

    @property
    def cells(self) -> list[Cell]:
        return [self.a, self.b]


class Precondition(Strict):
    """An accounting fact the design relies on (a budget spent, a cost ratio): a op margin (or a - b op
    margin) on every seed's value, or the study stops. Never a verdict: it cannot come out the other way
    by chance."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    statement: str
    a: Cell
    b: Cell | None = None
    op: Literal[">", "<"]
    margin: float = 0.0

    @property
    def cells(self) -> list[Cell]:
        return [self.a] + ([self.b] if self.b else [])


class Bootstrap(Strict):
    resamples: int = Field(1000, ge=100, le=100000, description="bootstrap resamples of each interval")
    seed: int = Field(20261205, description="the bootstrap's own seed: a report is reproducible")
    items: bool = Field(True, description="resample the measured items (documents, examples, canaries) "
                        "where the evaluation keeps them")


class Trend(Strict):
    """A measure rises or falls along its x list (within one variant) or along the variants (their x):
    judged by the least-squares slope against the axis (ln x with log_x) and every step between
    neighbouring points."""

    measure: str
    direction: Literal["increasing", "decreasing"]
    log_x: bool = Field(False, description="the slope against ln x")
    variant: str | None = Field(None, description="along the measure's x list, for this variant")
    variants: list[str] | None = Field(None, description="across these variants, in the order of their x")

    @model_validator(mode="after")
    def _one_axis(self) -> "Trend":
        if (self.variant is None) == (self.variants is None):
            raise ValueError("a trend runs along one variant's x list (variant:) or across variants (variants:), not both")
        if self.variants is not None and len(self.variants) < 2:
            raise ValueError("a trend across variants needs at least two")
        return self


class Claim(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    statement: str
    compare: Compare | None = None
    equivalent: Equivalent | None = None
    trend: Trend | None = None

    @model_validator(mode="after")
    def _one_rule(self) -> "Claim":
        if sum(rule is not None for rule in (self.compare, self.equivalent, self.trend)) != 1:
            raise ValueError(f"claim {self.name!r}: give exactly one rule, compare, equivalent or trend")
        return self

    @property
    def cells(self) -> list[Cell]:
        rule = self.compare or self.equivalent
        return rule.cells if rule else []


class Plot(Strict):
    kind: Literal["line", "reliability"] = "line"
    measure: str | list[str] | None = Field(None, description="line: the measure(s) plotted (against their x, or "
                                            "the variants' x), one line per variant and measure")
    variants: list[str] | None = None
    task: str | None = Field(None, description="reliability: an in-context task's answers (default: next tokens)")
    title: str | None = None
    y_label: str | None = Field(None, description="default: the measure's label (of the first, with several)")
    log_x: bool = False
    file: str | None = None

    @property
    def measure_names(self) -> list[str]:
        return [self.measure] if isinstance(self.measure, str) else list(self.measure or [])

    @model_validator(mode="after")
    def _line_has_measure(self) -> "Plot":
        if self.kind == "line" and not self.measure:
            raise ValueError("a line plot names its measure")
        return self


class Budget(Strict):
    flops: float = Field(gt=0, description="the compute budget C of these variants (their pretrain.flops_budget)")
    variants: list[str] = Field(min_length=3, description="models of different sizes trained with this budget")


class IsoFlop(Strict):
    """Hoffmann et al. (2022), approach 2: at each compute budget, a parabola fitted to the loss against
    ln N (N: the variants' x, their parameters) per seed; its vertex is the loss-optimal size N*, the
    tokens it may train on D* = C / 6N*, and D*/N* the tokens per parameter at the optimum. Across
    budgets, ln N* fitted against ln C gives the exponent a of N* ~ C^a."""

    loss: str = Field(description="a measure without x list: the loss to minimise (e.g. the final validation loss)")
    budgets: list[Budget] = Field(min_length=1)


class Study(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    title: str
    notes: str = Field(description="the course notes' statement, in their words")
    experiment: str = Field(description="what is run, in a few sentences")
    limits: str = Field(description="what the scale here cannot show")
    cost: str = Field(description="measured wall time on the reference machine, with its date")
    config: str = "tiny"
    set: list[str] = Field(default_factory=list)
    seeds: int = Field(2, ge=1, le=100)
    seed_keys: list[str] = Field(default_factory=lambda: ["seed"], min_length=1,
                                 description="integer settings seed s adds s to (seed: the evaluation's draws; "
                                 "pretrain.seed: the model's initial weights and batches)")
    variants: list[Variant] = Field(min_length=1)
    measures: dict[str, Measure] = Field(min_length=1)
    claims: list[Claim] = Field(min_length=1)
    preconditions: list[Precondition] = Field(default_factory=list)
    bootstrap: Bootstrap = Field(default_factory=Bootstrap)
    plots: list[Plot] = Field(default_factory=list)
    isoflop: IsoFlop | None = Field(None, description="a compute-optimal analysis of the variants (tasks/lib/study/isoflop.py)")

    def plots_drawn(self) -> list[Plot]:
        """The plots of the file, or one line plot per measure when it names none."""
        return self.plots or [Plot(measure=name) for name in self.measures]

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    @model_validator(mode="after")
    def _references_resolve(self) -> "Study":
        names = [v.name for v in self.variants]
        _unique(names, "variant")
        for name, measure in self.measures.items():
            for variant in measure.variants or []:
                self._check_variant(variant, f"measure {name!r}")
        _unique([c.name for c in self.claims], "claim")
        _unique([p.name for p in self.preconditions], "precondition")
        for pre in self.preconditions:
            for cell in pre.cells:
                self._check_cell(cell, pre.name)
        for claim in self.claims:
            for cell in claim.cells:
                self._check_cell(cell, claim.name)
            if claim.trend:
                self._check_trend(claim.trend, claim.name)
        for plot in self.plots:
            for name in plot.variants or []:
                self._check_variant(name, "a plot")
            for name in plot.measure_names:
                if name not in self.measures:
                    raise ValueError(f"a plot names measure {name!r}, not among {sorted(self.measures)}")
            if len({self.measures[n].x is None for n in plot.measure_names}) > 1:
                raise ValueError(f"a plot's measures {plot.measure_names} must all have an x list, or none")
        if self.isoflop:
            self._check_isoflop(self.isoflop)
        return self

    def _check_isoflop(self, isoflop: IsoFlop) -> None:
        measure = self.measures.get(isoflop.loss)
        if measure is None or measure.x is not None:
            raise ValueError(f"isoflop: loss {isoflop.loss!r} must be one of the measures without an x list "
                             f"({sorted(n for n, m in self.measures.items() if m.x is None)})")
        for budget in isoflop.budgets:
            for name in budget.variants:
                self._check_variant(name, "isoflop")
                if self.variant(name).x is None:
                    raise ValueError(f"isoflop: variant {name!r} needs an x, its size (e.g. x: pretrain:parameters)")

    def _check_variant(self, name: str, where: str) -> None:
        if name not in {v.name for v in self.variants}:
            raise ValueError(f"{where} names variant {name!r}, not among {[v.name for v in self.variants]}")

    def measured(self, measure: str) -> list[str]:
        """The variants a measure is read for."""
        return self.measures[measure].variants or [v.name for v in self.variants]

    def _check_cell(self, cell: Cell, claim: str) -> None:
        self._check_variant(cell.variant, f"claim {claim!r}")
        measure = self.measures.get(cell.measure)
        if measure is None:
            raise ValueError(f"claim {claim!r} names measure {cell.measure!r}, not among {sorted(self.measures)}")
        if cell.variant not in self.measured(cell.measure):
            raise ValueError(f"claim {claim!r}: measure {cell.measure!r} is read for {measure.variants} only, not {cell.variant!r}")
        if measure.x is None and cell.x is not None:
            raise ValueError(f"claim {claim!r}: measure {cell.measure!r} has no x list, so the cell takes no x")
        if measure.x is not None and cell.x not in measure.x:
            raise ValueError(f"claim {claim!r}: measure {cell.measure!r} is read at x in {measure.x}; give one as x (got {cell.x})")

    def _check_trend(self, trend: Trend, claim: str) -> None:
        measure = self.measures.get(trend.measure)
        if measure is None:
            raise ValueError(f"claim {claim!r} names measure {trend.measure!r}, not among {sorted(self.measures)}")
        if trend.variant is not None:
            self._check_variant(trend.variant, f"claim {claim!r}")
            if measure.x is None or len(measure.x) < 2:
                raise ValueError(f"claim {claim!r}: a trend along one variant needs a measure with two or more x values")
            return
        for name in trend.variants or []:
            self._check_variant(name, f"claim {claim!r}")
            if self.variant(name).x is None:
                raise ValueError(f"claim {claim!r}: variant {name!r} needs an x (its position) for a trend across variants")
        if measure.x is not None:
            raise ValueError(f"claim {claim!r}: a trend across variants reads one number per variant; "
                             f"measure {trend.measure!r} has an x list")


def _check_reference(reference: str, where: str) -> None:
    if not REFERENCE.match(reference):
        raise ValueError(f"{where}: {reference!r} is not a metric reference STAGE:NAME (e.g. eval:perplexity)")


def _unique(names: list[str], what: str) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{what} names must be unique; repeated: {repeated}")


def format_x(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# ---------------------------------------------------------------- finding and reading study files


def study_files() -> dict[str, Path]:
    """Every study file by name; studies/ wins over configs/studies/ for the same name."""
    found: dict[str, Path] = {}
    for folder in reversed(STUDY_DIRS):
        for path in sorted(folder.glob("*.y*ml")) if folder.is_dir() else []:
            found[path.stem] = path
    return found


def find_study(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"study file {path} does not exist")
        return path
    files = study_files()
    if name_or_path not in files:
        known = ", ".join(sorted(files)) or "none"
        raise UserError(f"no study named {name_or_path!r} in studies/ or configs/studies/ (known: {known}); "
                        "or give a YAML path")
    return files[name_or_path]


def load_study(name_or_path: str) -> tuple[Study, Path]:
    path = find_study(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"study {path}: not readable YAML ({err})") from None
    if not isinstance(raw, dict):
        raise UserError(f"study {path}: expected a mapping of study settings")
    raw.setdefault("name", path.stem)
    try:
        return Study.model_validate(raw), path
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'study'}: {e['msg']}" for e in err.errors())
        raise UserError(f"study {path}: {problems}") from None
