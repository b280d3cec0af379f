"""Running the flows from a command: validate first (clear errors before any server starts), then run the
flow on the configured task runner, reporting to one Prefect API."""

from __future__ import annotations

from jielong.flows import prefect_api
from jielong.flows.outcome import RunOutcome, outcome_of
from jielong.flows.pipeline import evaluate_flow, pipeline
from jielong.flows.stages import select_stages
from jielong.flows.task_runners import check_runner, make_task_runner
from jielong.tasks import ingest
from jielong.tasks.config import load_config
from jielong.tasks.core.tracking import check_tracking


def launch_pipeline(config: str = "tiny", overrides: list[str] | None = None, only: list[str] | None = None,
                    from_stage: str | None = None, force: list[str] | None = None) -> RunOutcome:
    """The pipeline flow's outcome: the summaries of the stages that finished, and the error if one stopped it."""
    cfg = load_config(config, overrides)
    if "ingest" in select_stages(only, from_stage, force).run:
        ingest.check_sources(cfg)
    check_tracking(cfg)
    check_runner(cfg)
    with prefect_api.connected():
        state = pipeline.with_options(task_runner=make_task_runner(cfg))(
            config=config, overrides=overrides or [], only=only, from_stage=from_stage, force=force, return_state=True
        )
    return outcome_of(state)


def run_pipeline(config: str = "tiny", overrides: list[str] | None = None, only: list[str] | None = None,
                 from_stage: str | None = None, force: list[str] | None = None) -> list[dict]:
    """The summaries of the pipeline's stages; a failure is raised."""
    return launch_pipeline(config, overrides, only, from_stage, force).result()


def run_evaluation(model: str, config: str = "tiny", overrides: list[str] | None = None, force: bool = False) -> list[dict]:
    cfg = load_config(config, overrides)
    ingest.check_sources(cfg)
    check_tracking(cfg)
    check_model(model, cfg)
    check_runner(cfg)
    with prefect_api.connected():
        state = evaluate_flow.with_options(task_runner=make_task_runner(cfg))(
            model=model, config=config, overrides=overrides or [], force=force, return_state=True
        )
    return outcome_of(state).result()


def check_model(model: str, cfg) -> None:
    """A --model that names nothing is a message (with the closest known names) before Prefect starts."""
    from jielong.models.references import check_reference
    from jielong.tasks.config import UserError
    from jielong.tasks.core.tracking import tracking_uri

    client = None
    if model.startswith("models:/"):
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri(cfg))
    try:
        check_reference(model, client)
    except ValueError as err:
        raise UserError(str(err)) from None
