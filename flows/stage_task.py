"""One stage as a Prefect task: reuse the artifact of its key, or compute it under the key's lock (its shard
jobs fan out over the flow's task runner) and log it to MLflow.

The task's parameters are the stage's name and key only. The rest is in the flow's StageRunContext: a
task's parameters travel, pickled, with every shard task it starts on a process or Dask runner, and the
tracker cannot travel (`jielong run` logs through a TrackerProcess, whose pipe does not pickle).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

from prefect import task
from prefect.cache_policies import NONE

from jielong.flows.mlflow_runs import NewModel, log_cache_hit, log_computed, start_stage_run
from jielong.flows.shard_tasks import prefect_map
from jielong.flows.summary import stage_summary
from jielong.tasks.config import PipelineConfig
from jielong.tasks.core.contract import Artifact, Stage, compute_artifact, load_artifact, stage_lock
from jielong.tasks.core.run_labels import error_text
from jielong.tasks.core.tracking import Tracker, TrackerProcess


@dataclass
class StageRunContext:
    """What the stages of one flow run share, held by the flow while its stages run (`active`)."""

    cfg: PipelineConfig
    tracker: Tracker | TrackerProcess
    parent_run_id: str  # the invocation's MLflow run
    flow_run_id: str  # the Prefect flow run, recorded in each manifest
    stages: dict[str, Stage]  # by name
    forced: set[str]  # stages recomputed even when cached
    artifacts: dict[str, Artifact] = field(default_factory=dict)  # by stage, as the flow obtains them

    # a class attribute, not a module global: the task's function is pickled by value with its globals
    _current: ClassVar[ContextVar["StageRunContext"]] = ContextVar("jielong_stage_run_context")

    @contextmanager
    def active(self) -> Iterator["StageRunContext"]:
        token = self._current.set(self)
        try:
            yield self
        finally:
            self._current.reset(token)

    @classmethod
    def current(cls) -> "StageRunContext":
        return cls._current.get()


@dataclass
class StageRun:
    """What executing a stage returns: its artifact, its summary line, and the model it made, if any."""

    artifact: Artifact
    summary: dict
    model: NewModel | None = None


@task(name="stage", cache_policy=NONE, persist_result=False)
def execute_stage(stage_name: str, key: str) -> StageRun:
    """The stage's cached artifact for `key`, else computed. Runs in the flow's process, in its context."""
    ctx = StageRunContext.current()
    stage = ctx.stages[stage_name]
    force = stage_name in ctx.forced
    workspace = ctx.cfg.workspace_path()
    cached = None if force else load_artifact(workspace, stage_name, key)
    if cached is None:
        with stage_lock(workspace, stage_name, key):
            # a concurrent run may have completed this key while we waited for the lock
            cached = None if force else load_artifact(workspace, stage_name, key)
            if cached is None:
                return _compute(ctx, stage, key, "forced" if force else "ran")
    run_id = log_cache_hit(ctx.tracker, ctx.parent_run_id, cached, [ctx.artifacts[name] for name in stage.inputs])
    return StageRun(cached, stage_summary(cached, "cached", run_id, ctx.parent_run_id))


def _compute(ctx: StageRunContext, stage: Stage, key: str, status: str) -> StageRun:
    tracker = ctx.tracker
    run_id = start_stage_run(tracker, ctx.cfg, stage, key, ctx.parent_run_id)
    try:
        artifact, result = compute_artifact(stage, ctx.cfg, key, {name: ctx.artifacts[name] for name in stage.inputs},
                                            map=prefect_map(stage.name),
                                            run_ids={"mlflow_run_id": run_id, "prefect_flow_run_id": ctx.flow_run_id},
                                            log=lambda points: tracker.log_progress(run_id, list(points)))
        # the artifact is published: a tracking failure from here loses nothing (a rerun logs it as a cache hit)
        tracker.flush_progress(run_id)
        log_computed(tracker, run_id, ctx.parent_run_id, artifact, result, [ctx.artifacts[name] for name in stage.inputs])
    except BaseException as err:
        tracker.mark_failed(run_id, error_text(err))
        raise
    model = None
    if result.model_dir:
        model = NewModel(stage.name, artifact, result.model_dir, result.register_as, result.model_task, run_id)
    return StageRun(artifact, stage_summary(artifact, status, run_id, ctx.parent_run_id), model)
