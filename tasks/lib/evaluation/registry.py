"""Every evaluation, declared once: EVALUATIONS below, in the order they run and appear in the report.

An evaluation NAME is
- a module NAME.py in this package whose `run(inputs: Inputs) -> SectionResult | None` computes its
  part of the report from the inputs alone (None: nothing to report), and
- the section NAME of EvaluateConfig (config.py), with an `enabled` switch, and
- one entry here: what else it reads for the stage key, whether it draws at random, which files
  outside the stage's inputs it reads, how report.md renders its part.

evaluation.evaluate_model runs the enabled ones and assembles report, metrics and figures from their
results; tasks/evaluate.py derives the stage's reads, seed and file fingerprints from the entries.
Nothing here imports torch: reading a config or computing a key stays quick.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from jielong.tasks.core.fingerprint import fingerprint_files
from jielong.tasks.core.schema import KEYED_WHEN_SET
from jielong.tasks.lib.evaluation import report
from jielong.tasks.lib.evaluation.config import EvaluateConfig

if TYPE_CHECKING:
    from jielong.tasks.core.contract import ConfigView
    from jielong.tasks.lib.evaluation.model import LoadedModel
    from jielong.tasks.lib.evaluation.perplexity import TokenScores


@dataclass(frozen=True)
class Inputs:
    """What an evaluation's `run` may use. Sections read these and never change them."""

    lm: LoadedModel
    cfg: EvaluateConfig | ConfigView  # the evaluate section or the stage's view of it
    splits: dict[str, list[dict]]  # 'train' / 'validation' / 'test' documents
    test_docs: list[dict]  # the test documents scored (perplexity.max_documents)
    test_scores: TokenScores  # their one shared scoring pass (with kNN-LM keys when kNN-LM is on)
    window: int
    stride: int
    seed: int | None
    out_dir: Path  # where figures go
    prepared: dict[str, Any] = field(default_factory=dict)  # what each evaluation's prepare() returned


@dataclass(frozen=True)
class SectionResult:
    report: dict  # the evaluation's part of report.json
    metrics: dict[str, float] = field(default_factory=dict)  # flat "eval/..." names, in report order
    figures: list[Path] = field(default_factory=list)
    # per measured item (documents, examples), for resampling them (tasks/lib/study/items.py); items.json
    items: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluation:
    name: str
    markdown: Callable[[dict], list[str]] | None = None  # its report.md part, from its report.json part
    draws: bool = False  # uses the seed (then the seed enters the key while it is enabled)
    shared: tuple[str, ...] = ()  # its settings that stay read while it is off: other evaluations use them
    used_by: tuple[str, ...] = ()  # evaluations that read this whole section while they are on
    prepares: bool = False  # its module's prepare(cfg, splits, seed) runs before any scoring
    files: tuple[str, Callable[[Any], list]] | None = None  # (label, fingerprints of the files it reads)

    def enabled(self, evaluate) -> bool:
        return getattr(evaluate, self.name).enabled

    def module(self):
        return importlib.import_module(f"{__package__}.{self.name}")

    @property
    def keyed_when_set(self) -> bool:
        return EvaluateConfig.model_fields[self.name].json_schema_extra == KEYED_WHEN_SET

    def reads(self, evaluate: EvaluateConfig) -> tuple[str, ...]:
        """Its config paths in the stage key. A section turned off is read for its `enabled` (and its
        shared settings) alone, so settings that cannot change a number stay out of the key. A section
        keyed only once set (added after keys existed) is read whole: at its default it is out of the
        key anyway, and `enabled` alone would be keyed."""
        path = f"evaluate.{self.name}"
        if self.keyed_when_set or self.enabled(evaluate) or any(getattr(evaluate, n).enabled for n in self.used_by):
            return (path,)
        return tuple(f"{path}.{s}" for s in ("enabled", *self.shared))

    def fingerprint(self, evaluate) -> list:
        return self.files[1](getattr(evaluate, self.name)) if self.enabled(evaluate) else []


def _extra_sets(perplexity) -> list:
    from jielong.tasks.lib.sources import reader

    return [reader.fingerprint(Path(extra.path)) for extra in perplexity.extra]


def _task_specs(icl) -> list:
    from jielong.tasks.lib.evaluation.specs import spec_files

    return [fingerprint_files(spec_files(name)) for name in icl.tasks]


# settings of the shared test scoring pass (token calibration, kNN-LM and memorisation use it)
SCORING = ("window", "stride", "batch_tokens", "max_documents")

EVALUATIONS: tuple[Evaluation, ...] = (
    Evaluation("perplexity", report.perplexity_markdown, shared=SCORING, files=("extra", _extra_sets)),
    Evaluation("calibration", report.calibration_markdown, used_by=("icl",)),  # icl bins its answers
    Evaluation("icl", report.icl_markdown, draws=True, prepares=True, files=("icl_tasks", _task_specs)),
    Evaluation("knnlm", report.knnlm_markdown, draws=True),
    Evaluation("memorization"),
)
