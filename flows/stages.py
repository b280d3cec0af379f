"""The stages of the pipeline in order and which of them a command runs: plain Python, no Prefect or
MLflow, so commands that run nothing (`jielong stages`, a config mistake) answer at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from jielong.tasks import clean, dedup, ingest, instruct, pretrain, tokenize
from jielong.tasks.config import PipelineConfig, UserError
from jielong.tasks.core.contract import Stage
from jielong.tasks.evaluate import EVAL_INSTRUCT, EVAL_PRETRAIN

STAGES: list[Stage] = [
    ingest.STAGE, clean.STAGE, dedup.STAGE, tokenize.STAGE, pretrain.STAGE, instruct.STAGE, EVAL_PRETRAIN, EVAL_INSTRUCT,
]
STAGE_NAMES = [s.name for s in STAGES]


# ---------------------------------------------------------------- which stages run


@dataclass
class Selection:
    run: list[str]  # stages to execute (cache hits allowed unless forced)
    forced: set[str] = field(default_factory=set)


def select_stages(only: list[str] | None = None, from_stage: str | None = None, force: list[str] | None = None) -> Selection:
    for name in [*(only or []), *([from_stage] if from_stage else []), *(force or [])]:
        if name not in STAGE_NAMES:
            raise UserError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_NAMES)}")
    if only and from_stage:
        raise UserError("use either --only or --from, not both")
    forced = set(force or [])
    if from_stage:
        # --from STAGE reruns that stage and everything after it
        run = STAGE_NAMES[STAGE_NAMES.index(from_stage):]
        forced |= set(run)
    elif only:
        run = [s for s in STAGE_NAMES if s in only]
    else:
        run = list(STAGE_NAMES)
    return Selection(run=run, forced=forced)


def upstream_of(names: list[str], stages: list[Stage]) -> set[str]:
    """Every stage whose artifact the given stages need, directly or indirectly."""
    by_name = {s.name: s for s in stages}
    needed: set[str] = set()
    todo = [i for n in names for i in by_name[n].inputs]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += by_name[name].inputs
    return needed


def stage_keys(cfg: PipelineConfig) -> dict[str, str]:
    """Every stage's key for a config, without running anything (keys depend only on keys)."""
    keys: dict[str, str] = {}
    for stage in STAGES:
        keys[stage.name] = stage.key(cfg, {name: keys[name] for name in stage.inputs})
    return keys
