"""What an invocation leaves in MLflow: a parent run, one nested run per stage (computed, or a cache hit
pointing at the run that produced the artifact), and the models it made, logged with their evaluations."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

from jielong.tasks.config import PipelineConfig
from jielong.tasks.core.contract import Artifact, Stage, StageResult
from jielong.tasks.core.datasets import consumed_inputs
from jielong.tasks.core.tracking import Tracker, flatten, git_commit, stage_metrics
from jielong.tasks.lib.model_card import card_with_evaluations


def start_parent_run(tracker: Tracker, cfg: PipelineConfig, run_name: str, stages: list[str], flow_run_id: str,
                     tags: dict[str, str], outer_run_id: str | None, overrides: list[str] | None = None) -> str:
    """The invocation's run (nested under outer_run_id, e.g. a study's), with the resolved config as params
    and the overrides it was given (its name shows them cut short)."""
    parent_id = tracker.start_run(
        run_name,
        {
            "jielong.git_commit": git_commit(),
            "jielong.config_hash": cfg.config_hash(),
            "jielong.config_name": cfg.name,
            "jielong.stages": ",".join(stages),
            "prefect.flow_run_id": flow_run_id,
            **tags,
        },
        outer_run_id,
    )
    params = flatten(cfg.model_dump(mode="json"))
    if overrides is not None:
        params.update(flatten({"jielong.overrides": json.dumps(overrides)}))
    tracker.log_params(parent_id, params)
    return parent_id


def start_stage_run(tracker: Tracker, cfg: PipelineConfig, stage: Stage, key: str, parent_id: str) -> str:
    """The nested run of a stage about to be computed, with its config view as params."""
    run_id = tracker.start_run(stage.name, stage_tags(stage.name, key, cache_hit=False), parent_id)
    tracker.log_params(run_id, flatten(stage.config_of(cfg)))
    return run_id


def log_computed(tracker: Tracker, run_id: str, parent_id: str, artifact: Artifact, result: StageResult,
                 inputs: list[Artifact]) -> None:
    """A computed stage's summary metrics (on its run and the parent), manifest, samples, the datasets it
    consumed and its tables."""
    metrics = stage_metrics(artifact.stage, artifact.manifest)
    tracker.log_metrics(run_id, metrics)
    tracker.log_metrics(parent_id, metrics)
    extra = [artifact.path / name for name in result.extra_artifacts]
    tracker.log_artifacts(run_id, [artifact.path / "manifest.json", *extra])
    tracker.log_artifacts(run_id, sorted((artifact.path / "samples").glob("*.jsonl")), "samples")
    tracker.log_inputs(run_id, consumed_inputs(inputs))
    for artifact_file, rows in result.tables.items():
        tracker.log_table(run_id, rows, artifact_file)
    tracker.end_run(run_id)


def log_cache_hit(tracker: Tracker, parent_id: str, artifact: Artifact, inputs: list[Artifact]) -> str:
    """A nested run `<stage> (cached)` pointing at the run that produced the artifact, with the datasets that
    made it; returns its id."""
    tags = stage_tags(artifact.stage, artifact.key, cache_hit=True)
    tags["jielong.source_run_id"] = artifact.manifest.get("mlflow_run_id", "")
    run_id = tracker.start_run(f"{artifact.stage} (cached)", tags, parent_id)
    metrics = stage_metrics(artifact.stage, artifact.manifest)
    tracker.log_batch(run_id, flatten(artifact.manifest["config"]), metrics)
    tracker.log_metrics_at_end(parent_id, metrics)
    tracker.log_artifacts(run_id, [artifact.path / "manifest.json"])
    tracker.log_inputs(run_id, consumed_inputs(inputs))
    tracker.end_run(run_id)
    return run_id


def stage_tags(stage: str, key: str, cache_hit: bool) -> dict[str, str]:
    return {"jielong.stage": stage, "jielong.key": key, "jielong.cache_hit": str(cache_hit).lower()}


@dataclass
class NewModel:
    """A model a stage made in this invocation: logged to MLflow (and registered) once the evaluations of
    it that this invocation runs are done, so its model card carries their numbers."""

    stage: str
    artifact: Artifact
    model_dir: str
    register_as: str | None
    task: str
    run_id: str


def log_new_models(tracker: Tracker, models: list[NewModel], artifacts: Iterable[Artifact]) -> None:
    artifacts = list(artifacts)
    for model in models:
        card = card_with_evaluations(model.artifact, model.model_dir, artifacts)
        tracker.log_model(model.run_id, model.artifact.path / model.model_dir, "model", model.task, card)
        if model.register_as:
            version = tracker.register_model(model.register_as, model.run_id, "model")
            tracker.set_tags(model.run_id, {"jielong.registered_model": f"models:/{model.register_as}/{version}"})
