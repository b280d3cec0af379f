"""The jielong pipeline as one Prefect flow:
ingest -> clean -> dedup -> tokenize -> pretrain -> instruct -> eval_pretrain, eval_instruct.

Read top to bottom:
  1. STAGES (flows/stages.py) lists the stages in order; each is a module in tasks/ exposing `STAGE`.
  2. `pipeline` (the flow) opens an MLflow parent run, then for each stage computes its key from the
     settings it reads, the files it reads and its inputs' keys, and either reuses the cached artifact
     or runs the stage.
  3. `execute_stage` (a Prefect task named after the stage) holds the stage contract: lock the key,
     run the stage in a temporary directory — its shard jobs fan out over the flow's task runner —,
     check that documents reconcile, write samples and the manifest, rename into place, log to MLflow.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.futures import as_completed

from jielong.flows.stages import STAGES, Selection, select_stages, stage_keys, upstream_of  # noqa: F401  (stage_keys too: imported from here)
from jielong.tasks import ingest
from jielong.tasks.config import PipelineConfig, UserError, load_config
from jielong.tasks.core.contract import Artifact, Stage, compute_artifact, load_artifact, stage_lock
from jielong.tasks.lib.model_card import card_with_evaluations
from jielong.tasks.core.tracking import Tracker, flatten, git_commit, open_tracker, stage_metrics


# ---------------------------------------------------------------- shard fan-out through Prefect


def _retry_on_io_error(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except OSError:
        return True
    except BaseException:
        return False
    return False


def prefect_map(stage_name: str) -> Callable[[Callable[[Any], dict], list[Any]], list[dict]]:
    """ctx.map for a stage: one Prefect task run per shard job on the flow's task runner."""

    def run_shards(fn: Callable[[Any], dict], jobs: list[Any]) -> list[dict]:
        if not jobs:
            return []
        shard_task = task(
            fn,
            name=f"{stage_name}.{fn.__name__}",
            retries=2,
            retry_delay_seconds=1,
            retry_condition_fn=_retry_on_io_error,
            cache_policy=NONE,
            persist_result=False,
        )
        futures = shard_task.map(jobs)
        from tqdm import tqdm

        with tqdm(total=len(jobs), desc=f"{stage_name}.{fn.__name__}", unit="shard", leave=False, disable=None) as bar:
            for _ in as_completed(futures):
                bar.update()
        return [f.result() for f in futures]

    return run_shards


# ---------------------------------------------------------------- one stage


@task(name="stage", cache_policy=NONE, persist_result=False)
def execute_stage(stage: Stage, cfg: PipelineConfig, key: str, inputs: dict[str, Artifact], force: bool,
                  tracker: Tracker, parent_id: str, flow_run_id: str) -> tuple[Artifact, dict]:
    workspace = cfg.workspace_path()
    cached = None if force else load_artifact(workspace, stage.name, key)
    if cached is None:
        with stage_lock(workspace, stage.name, key):
            # a concurrent run may have completed this key while we waited for the lock
            cached = None if force else load_artifact(workspace, stage.name, key)
            if cached is None:
                return _compute(stage, cfg, key, inputs, tracker, parent_id, flow_run_id, forced=force)
    return _record_cache_hit(stage, cached, tracker, parent_id)


def _compute(stage: Stage, cfg: PipelineConfig, key: str, inputs: dict[str, Artifact], tracker: Tracker,
             parent_id: str, flow_run_id: str, forced: bool) -> tuple[Artifact, dict]:
    run_id = tracker.start_run(stage.name, _stage_tags(stage, key, cache_hit=False), parent_id)
    tracker.log_params(run_id, flatten(stage.config_of(cfg)))
    try:
        artifact, result = compute_artifact(stage, cfg, key, inputs, map=prefect_map(stage.name),
                                            run_ids={"mlflow_run_id": run_id, "prefect_flow_run_id": flow_run_id},
                                            log=lambda points: tracker.log_progress(run_id, list(points)))
        # the artifact is published: a tracking failure from here loses nothing (a rerun logs it as a cache hit)
        tracker.flush_progress(run_id)
        _log_computed(stage, artifact, result, tracker, run_id, parent_id)
    except BaseException:
        tracker.mark_failed(run_id)
        raise
    summary = _summary(stage, artifact, "forced" if forced else "ran", run_id, parent_id)
    if result.model_dir:
        summary["model"] = NewModel(stage.name, artifact, result.model_dir, result.register_as, result.model_task, run_id)
    return artifact, summary


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


def log_new_models(models: list[NewModel], artifacts: dict[str, Artifact], tracker: Tracker) -> None:
    for model in models:
        card = card_with_evaluations(model.artifact, model.model_dir, artifacts.values())
        tracker.log_model(model.run_id, model.artifact.path / model.model_dir, "model", model.task, card)
        if model.register_as:
            version = tracker.register_model(model.register_as, model.run_id, "model")
            tracker.set_tags(model.run_id, {"jielong.registered_model": f"models:/{model.register_as}/{version}"})


def _log_computed(stage: Stage, artifact: Artifact, result: Any, tracker: Tracker, run_id: str, parent_id: str) -> None:
    metrics = stage_metrics(stage.name, artifact.manifest)
    tracker.log_metrics(run_id, metrics)
    tracker.log_metrics(parent_id, metrics)
    extra = [artifact.path / name for name in result.extra_artifacts]
    tracker.log_artifacts(run_id, [artifact.path / "manifest.json", *extra])
    tracker.log_artifacts(run_id, sorted((artifact.path / "samples").glob("*.jsonl")), "samples")
    for group in result.details["data_groups"]:
        tracker.log_dataset(run_id, artifact.files(group), f"{stage.name}-{group}", group)
    for artifact_file, rows in result.tables.items():
        tracker.log_table(run_id, rows, artifact_file)
    tracker.end_run(run_id)


def _record_cache_hit(stage: Stage, artifact: Artifact, tracker: Tracker, parent_id: str) -> tuple[Artifact, dict]:
    source_run = artifact.manifest.get("mlflow_run_id", "")
    tags = _stage_tags(stage, artifact.key, cache_hit=True)
    tags["jielong.source_run_id"] = source_run
    run_id = tracker.start_run(f"{stage.name} (cached)", tags, parent_id)
    metrics = stage_metrics(stage.name, artifact.manifest)
    tracker.log_batch(run_id, flatten(artifact.manifest["config"]), metrics)
    tracker.log_metrics_at_end(parent_id, metrics)
    tracker.log_artifacts(run_id, [artifact.path / "manifest.json"])
    tracker.end_run(run_id)
    return artifact, _summary(stage, artifact, "cached", run_id, parent_id)


def _stage_tags(stage: Stage, key: str, cache_hit: bool) -> dict[str, str]:
    return {"jielong.stage": stage.name, "jielong.key": key, "jielong.cache_hit": str(cache_hit).lower()}


HEADLINE = {"bits_per_byte": "test bits/byte", "heldout_response_loss_after": "held-out response loss", "final_val_loss": "val loss",
            "train_tokens": "train tokens", "kept_fraction": "kept"}


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:.4g}"


def _amount(n: float, unit: str) -> str:
    return f"{int(n):,} {unit}"


def consumed_produced(stage: str, artifact: Artifact) -> tuple[str, str]:
    """What a stage consumed and produced, each in its own unit: documents for the data stages, tokens for
    tokenize (out), pretrain and instruct (in; out is the model's parameters), documents in and tokens and
    examples scored out for an evaluation."""
    counts, metrics = artifact.manifest["counts"], artifact.manifest.get("metrics", {})
    details = artifact.manifest.get("details", {})
    documents_in = _amount(counts["documents_in"], "docs")
    if stage == "tokenize":
        return documents_in, _amount(sum(metrics.get(f"{s}_tokens", 0) for s in ("train", "validation", "test")), "tokens")
    if stage in ("pretrain", "instruct"):
        # instruct manifests written before tokens_seen was recorded count the pairs it read
        consumed = (_amount(details["tokens_seen"], "tokens") if "tokens_seen" in details
                    else _amount(counts["documents_in"], "pairs"))
        return consumed, _amount(metrics.get("parameters", 0), "params")
    if stage.startswith("eval_"):
        report = json.loads((artifact.path / "report.json").read_text(encoding="utf-8"))
        examples = sum(task["n_examples"] for task in report.get("icl", {}).get("tasks", {}).values())
        return (_amount(metrics.get("documents", 0), "docs"),
                f"{_amount(metrics.get('tokens', 0), 'tokens')} + {_amount(examples, 'examples')}")
    return documents_in, _amount(counts["documents_out"], "docs")


def _summary(stage: Stage, artifact: Artifact, status: str, run_id: str, parent_id: str) -> dict:
    counts = artifact.manifest["counts"]
    metrics = artifact.manifest.get("metrics", {})
    headline = next((f"{label} {_number(metrics[name])}" for name, label in HEADLINE.items() if name in metrics), "")
    consumed, produced = consumed_produced(stage.name, artifact)
    return {
        "headline": headline,
        "stage": stage.name,
        "key": artifact.key,
        "status": status,
        "in": consumed,
        "out": produced,
        "documents_in": counts["documents_in"],
        "documents_out": counts["documents_out"],
        "rejected": counts["documents_rejected"],
        "seconds": artifact.manifest["timings"]["seconds"],
        "path": str(artifact.path),
        "mlflow_run_id": run_id,
        "parent_run_id": parent_id,
    }


# ---------------------------------------------------------------- the flow


@flow(name="jielong-pipeline")
def pipeline(config: str = "tiny", overrides: list[str] | None = None, only: list[str] | None = None,
             from_stage: str | None = None, force: list[str] | None = None) -> list[dict]:
    """Run the pipeline for a config preset/path plus `section.key=value` overrides."""
    cfg = load_config(config, overrides)
    return run_stages(cfg, STAGES, select_stages(only, from_stage, force), f"pipeline-{cfg.name}")


@flow(name="jielong-eval")
def evaluate_flow(model: str, config: str = "tiny", overrides: list[str] | None = None, force: bool = False) -> list[dict]:
    """Evaluate any causal LM (a Hugging Face folder, models:/NAME/VERSION, runs:/ID/model, a hub name, a
    .gguf file or builtin:NAME) on the held-out data of a config, exactly as the pipeline evaluates its own."""
    from jielong.models.generate import resolve_model
    from jielong.tasks.evaluate import external_stage
    from jielong.tasks.core.tracking import tracking_uri

    cfg = load_config(config, overrides)
    try:
        model_dir = resolve_model(model, tracking_uri(cfg), store=cfg.workspace_path())
    except ValueError as err:
        raise UserError(str(err)) from None
    stages = [*STAGES[:3], external_stage(model_dir)]
    selection = Selection(run=[s.name for s in stages], forced={"eval_model"} if force else set())
    return run_stages(cfg, stages, selection, f"eval-{Path(model).name or model}")


def run_stages(cfg: PipelineConfig, stages: list[Stage], selection: Selection, run_name: str,
               parent_run_id: str | None = None, tags: dict[str, str] | None = None, log_models: bool = True) -> list[dict]:
    """The body of a flow: an MLflow parent run (nested under parent_run_id, e.g. a study's), then each
    selected stage (cached or computed) in order. log_models=False leaves the models a stage makes in
    the workspace only (a study's variants: no served copy, no registered version per variant)."""
    from prefect.runtime import flow_run

    tracker = open_tracker(cfg)
    try:
        summaries = _run_stages(cfg, stages, selection, run_name, tracker, str(flow_run.id or ""), parent_run_id, tags or {},
                                log_models)
    finally:
        error = tracker.close()  # what is still being logged is waited for
    if error is not None:
        raise error
    return summaries


def _run_stages(cfg: PipelineConfig, stages: list[Stage], selection: Selection, run_name: str, tracker: Tracker,
                flow_run_id: str, outer_run_id: str | None, tags: dict[str, str], log_models: bool = True) -> list[dict]:
    parent_id = tracker.start_run(
        run_name,
        {
            "jielong.git_commit": git_commit(),
            "jielong.config_hash": cfg.config_hash(),
            "jielong.config_name": cfg.name,
            "jielong.stages": ",".join(selection.run),
            "prefect.flow_run_id": flow_run_id,
            **tags,
        },
        outer_run_id,
    )
    tracker.log_params(parent_id, flatten(cfg.model_dump(mode="json")))
    summaries: list[dict] = []
    artifacts: dict[str, Artifact] = {}
    new_models: list[NewModel] = []
    try:
        needed = upstream_of(selection.run, stages)
        for stage in stages:
            if stage.name not in selection.run and stage.name not in needed:
                continue  # downstream of what was asked for
            key = stage.key(cfg, {name: artifacts[name].key for name in stage.inputs})
            if stage.name not in selection.run:
                artifacts[stage.name] = _require_cached(cfg, stage, key, selection)
                continue
            inputs = {name: artifacts[name] for name in stage.inputs}
            artifact, summary = execute_stage.with_options(name=stage.name)(
                stage, cfg, key, inputs, stage.name in selection.forced, tracker, parent_id, flow_run_id
            )
            artifacts[stage.name] = artifact
            model = summary.pop("model", None)
            if model is not None and log_models:
                new_models.append(model)
            summaries.append(summary)
        log_new_models(new_models, artifacts, tracker)
    except BaseException as err:
        # what was made is still logged (without the evaluations that did not finish); an interrupt stops at once
        if new_models and isinstance(err, Exception):
            with suppress(Exception):
                log_new_models(new_models, artifacts, tracker)
        tracker.mark_failed(parent_id)
        err.completed_stages = summaries  # type: ignore[attr-defined]  # the CLI shows what did finish
        raise
    tracker.end_run(parent_id)
    return summaries


def _require_cached(cfg: PipelineConfig, stage: Stage, key: str, selection: Selection) -> Artifact:
    artifact = load_artifact(cfg.workspace_path(), stage.name, key)
    if artifact is None:
        needed = ", ".join(selection.run)
        raise UserError(
            f"{needed} needs the {stage.name} artifact for this config (key {key}), which is not in "
            f"{cfg.workspace_path()}: run the pipeline without --only first (or add {stage.name} to --only)"
        )
    return artifact


# ---------------------------------------------------------------- task runners and the Prefect API


def make_task_runner(cfg: PipelineConfig):
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    runner = cfg.runner
    if runner.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=runner.workers)
    if runner.kind == "dask":
        return _dask_runner().task_runner(runner)
    return ProcessPoolTaskRunner(max_workers=runner.workers)


def _dask_runner():
    try:
        from jielong.flows import dask_runner
    except ImportError:
        raise UserError("runner.kind=dask needs the dask extra: pip install 'jielong[dask]'") from None
    return dask_runner


def check_runner(cfg: PipelineConfig) -> None:
    """An external Dask cluster answers and its workers see the workspace (flows/dask_runner.py)."""
    if cfg.runner.kind == "dask" and cfg.runner.dask_address:
        _dask_runner().check_cluster(cfg.runner.dask_address, cfg.workspace_path())


def resolve_prefect_api() -> str:
    """The Prefect API this command reports to: a configured PREFECT_API_URL (e.g. `jielong server`) when it
    answers, else the local background API (flows/prefect_api.py), started on first use and reused after."""
    from prefect.settings import get_current_settings

    configured = get_current_settings().api.url or os.environ.get("PREFECT_API_URL")
    if configured:
        _check_prefect_api(configured)
        return configured
    from jielong.flows import prefect_api

    try:
        state, started = prefect_api.ensure()
    except RuntimeError as err:  # e.g. the port taken meanwhile, a broken Prefect database: say so, no traceback
        raise UserError(f"{err}\nOr point PREFECT_API_URL at a running Prefect server (`jielong server`).") from None
    if started:
        print(f"Started a local Prefect API at {state['url']} (pid {state['pid']}); later jielong commands reuse it. "
              "`jielong server stop` stops it.", file=sys.stderr)
    return state["url"]


@contextmanager
def prefect_api() -> Iterator[None]:
    """Point this process's flow and its worker processes (through the environment) at one Prefect API.
    Without one, Prefect would start a temporary server in every process, each taking seconds."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = resolve_prefect_api()
    os.environ["PREFECT_API_URL"] = url
    # Prefect's global settings were read from the environment when it was imported, before the URL was set:
    # threads that start without this context (the task runner's submitting threads) read those
    refresh_global_settings_context()
    with temporary_settings({PREFECT_API_URL: url}):
        yield


def _check_prefect_api(url: str) -> None:
    import requests

    try:
        requests.get(f"{url.rstrip('/')}/health", timeout=5).raise_for_status()
    except requests.RequestException as err:
        raise UserError(f"the Prefect API at {url} (PREFECT_API_URL) is not reachable ({type(err).__name__}): "
                        "start it (`jielong server`) or unset PREFECT_API_URL to use jielong's local background one") from None


def check_tracking(cfg: PipelineConfig) -> None:
    from jielong.tasks.core.tracking import check_server, tracking_uri

    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        check_server(uri)


def run_evaluation(model: str, config: str = "tiny", overrides: list[str] | None = None, force: bool = False) -> list[dict]:
    cfg = load_config(config, overrides)
    ingest.check_sources(cfg)
    check_tracking(cfg)
    check_runner(cfg)
    with prefect_api():
        return evaluate_flow.with_options(task_runner=make_task_runner(cfg))(
            model=model, config=config, overrides=overrides or [], force=force
        )


def run_pipeline(config: str = "tiny", overrides: list[str] | None = None, only: list[str] | None = None,
                 from_stage: str | None = None, force: list[str] | None = None) -> list[dict]:
    """Validate first (clear errors before any server starts), then run the flow on the configured runner."""
    cfg = load_config(config, overrides)
    if "ingest" in select_stages(only, from_stage, force).run:
        ingest.check_sources(cfg)
    check_tracking(cfg)
    check_runner(cfg)
    with prefect_api():
        return pipeline.with_options(task_runner=make_task_runner(cfg))(
            config=config, overrides=overrides or [], only=only, from_stage=from_stage, force=force
        )
