"""The jielong pipeline as one Prefect flow:
ingest -> clean -> dedup -> tokenize -> pretrain -> instruct -> eval_pretrain, eval_instruct.

Read top to bottom:
  1. STAGES (flows/stages.py) lists the stages in order; each is a module in tasks/ exposing `STAGE`.
  2. `pipeline` (the flow) runs `run_stages`: it opens an MLflow parent run, then for each stage computes its
     key from the settings it reads, the files it reads and its inputs' keys, and executes it.
  3. `execute_stage` (flows/stage_task.py, a Prefect task named after the stage) holds the stage contract:
     reuse the cached artifact, or lock the key, run the stage in a temporary directory — its shard jobs
     fan out over the flow's task runner (flows/shard_tasks.py) —, check that documents reconcile, write
     samples and the manifest, rename into place, log to MLflow (flows/mlflow_runs.py).
  4. The flow returns a RunOutcome (flows/outcome.py): the stages' summaries, and the error if one stopped it.
Entry points (validation, the Prefect API, the task runner) are in flows/entry_points.py.
"""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path

from prefect import flow
from prefect.states import State

from jielong.flows.mlflow_runs import NewModel, log_new_models, start_parent_run
from jielong.flows.outcome import RunOutcome, flow_return
from jielong.flows.stage_task import StageRunContext, execute_stage
from jielong.flows.stages import STAGE_NAMES, STAGES, Selection, select_stages, upstream_of
from jielong.tasks.config import PipelineConfig, UserError, load_config
from jielong.tasks.core.contract import Artifact, Stage, load_artifact
from jielong.tasks.core.datasets import consumed_inputs
from jielong.tasks.core.run_labels import COMPLETE_TAG, KIND_TAG, NOTE_TAG, command_line, error_text, pipeline_run_name
from jielong.tasks.core.tracking import open_tracker


@flow(name="jielong-pipeline")
def pipeline(config: str = "tiny", overrides: list[str] | None = None, only: list[str] | None = None,
             from_stage: str | None = None, force: list[str] | None = None) -> RunOutcome | State:
    """Run the pipeline for a config preset/path plus `section.key=value` overrides."""
    cfg = load_config(config, overrides)
    selection = select_stages(only, from_stage, force)
    name = pipeline_run_name(cfg.name, overrides or [], selection.run, STAGE_NAMES)
    tags = {KIND_TAG: "pipeline", NOTE_TAG: f"`{command_line(config, overrides or [], only, from_stage, force)}`"}
    return flow_return(run_stages(cfg, STAGES, selection, name, tags=tags, overrides=overrides or []))


@flow(name="jielong-eval")
def evaluate_flow(model: str, config: str = "tiny", overrides: list[str] | None = None,
                  force: bool = False) -> RunOutcome | State:
    """Evaluate any causal LM (a Hugging Face folder, models:/NAME/VERSION, runs:/ID/model, a hub name, a
    .gguf file or builtin:NAME) on the held-out data of a config, exactly as the pipeline evaluates its own."""
    from jielong.models.generate import resolve_model
    from jielong.tasks.core.tracking import tracking_uri
    from jielong.tasks.evaluate import external_stage

    cfg = load_config(config, overrides)
    try:
        model_dir = resolve_model(model, tracking_uri(cfg), store=cfg.workspace_path())
    except ValueError as err:
        raise UserError(str(err)) from None
    stages = [*STAGES[:3], external_stage(model_dir)]
    selection = Selection(run=[s.name for s in stages], forced={"eval_model"} if force else set())
    return flow_return(run_stages(cfg, stages, selection, f"eval-{Path(model).name or model}", tags={KIND_TAG: "eval"},
                                  overrides=overrides or []))


def run_stages(cfg: PipelineConfig, stages: list[Stage], selection: Selection, run_name: str,
               parent_run_id: str | None = None, tags: dict[str, str] | None = None, log_models: bool = True,
               overrides: list[str] | None = None) -> RunOutcome:
    """The body of a flow: an MLflow parent run (nested under parent_run_id, e.g. a study's), then each
    selected stage (cached or computed) in order. log_models=False leaves the models a stage makes in
    the workspace only (a study's variants: no served copy, no registered version per variant). The run
    ends tagged complete or not (tasks/core/run_labels.py), with the datasets its stages consumed."""
    from prefect.runtime import flow_run

    flow_run_id = str(flow_run.id or "")
    tracker = open_tracker(cfg)
    try:
        parent_id = start_parent_run(tracker, cfg, run_name, selection.run, flow_run_id, tags or {}, parent_run_id,
                                     overrides)
        ctx = StageRunContext(cfg, tracker, parent_id, flow_run_id, {s.name: s for s in stages}, selection.forced)
        with ctx.active():
            outcome = _run_selected(ctx, stages, selection, log_models)
    finally:
        error = tracker.close()  # what is still being logged is waited for
    if error is not None and outcome.error is None:
        return RunOutcome(outcome.summaries, error)
    return outcome


def _run_selected(ctx: StageRunContext, stages: list[Stage], selection: Selection, log_models: bool) -> RunOutcome:
    """Each selected stage in order (and the cached artifacts they need); a failure ends the loop and the run."""
    summaries: list[dict] = []
    new_models: list[NewModel] = []
    try:
        needed = upstream_of(selection.run, stages)
        for stage in stages:
            if stage.name not in selection.run and stage.name not in needed:
                continue  # downstream of what was asked for
            key = stage.key(ctx.cfg, {name: ctx.artifacts[name].key for name in stage.inputs})
            if stage.name not in selection.run:
                ctx.artifacts[stage.name] = _require_cached(ctx.cfg, stage, key, selection)
                continue
            done = execute_stage.with_options(name=stage.name)(stage.name, key)
            ctx.artifacts[stage.name] = done.artifact
            summaries.append(done.summary)
            if done.model is not None and log_models:
                new_models.append(done.model)
        log_new_models(ctx.tracker, new_models, ctx.artifacts.values())
        log_consumed_datasets(ctx, stages, selection)
    except Exception as err:
        # what was made is still logged (without the evaluations that did not finish)
        with suppress(Exception):
            log_new_models(ctx.tracker, new_models, ctx.artifacts.values())
        with suppress(Exception):
            log_consumed_datasets(ctx, stages, selection)
        ctx.tracker.mark_failed(ctx.parent_run_id, error_text(err))
        return RunOutcome(summaries, err)
    except BaseException as err:
        ctx.tracker.mark_failed(ctx.parent_run_id, error_text(err))  # an interrupt stops at once
        raise
    complete = all(stage.name in ctx.artifacts for stage in stages)
    ctx.tracker.set_tags(ctx.parent_run_id, {COMPLETE_TAG: str(complete).lower()})
    ctx.tracker.end_run(ctx.parent_run_id)
    return RunOutcome(summaries)


def log_consumed_datasets(ctx: StageRunContext, stages: list[Stage], selection: Selection) -> None:
    """On the parent run: every dataset the stages it ran consumed (its Dataset column in the runs table)."""
    read = [ctx.artifacts[name] for stage in stages if stage.name in selection.run and stage.name in ctx.artifacts
            for name in stage.inputs if name in ctx.artifacts]
    ctx.tracker.log_inputs(ctx.parent_run_id, consumed_inputs(read))


def _require_cached(cfg: PipelineConfig, stage: Stage, key: str, selection: Selection) -> Artifact:
    artifact = load_artifact(cfg.workspace_path(), stage.name, key)
    if artifact is None:
        needed = ", ".join(selection.run)
        raise UserError(
            f"{needed} needs the {stage.name} artifact for this config (key {key}), which is not in "
            f"{cfg.workspace_path()}: run the pipeline without --only first (or add {stage.name} to --only)"
        )
    return artifact
