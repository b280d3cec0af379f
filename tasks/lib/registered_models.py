"""The models a workspace's MLflow registry holds (`jielong models`): each version with its aliases, the
stage and key of the artifact it is, the data that trained it and its headline numbers."""

from __future__ import annotations

from datetime import datetime, timezone

from jielong.tasks.core.schema import UserError
from jielong.tasks.core.suggest import did_you_mean
from jielong.tasks.core.tracking import Tracker

# a model's own training number (on the run that made it) and its evaluation's (on the pipeline run)
TRAINING_HEADLINE = {"pretrain": ("pretrain/final_val_loss", "val loss"),
                     "instruct": ("instruct/heldout_response_loss_after", "held-out response loss")}
EVAL_HEADLINE = (("bits_per_byte", "test bits/byte"), ("perplexity", "perplexity"))


def registered_models(tracker: Tracker, name: str | None = None) -> list[dict]:
    """A row per registered version (newest version first within a model), of every model or of `name`."""
    client = tracker.client
    models = sorted(client.search_registered_models(max_results=1000), key=lambda m: m.name)
    if name is not None:
        names = [m.name for m in models]
        if name not in names:
            known = f" Registered: {', '.join(names)}." if names else " No model is registered there yet."
            raise UserError(f"no registered model {name!r} in {tracker.uri}.{did_you_mean(name, names)}{known}")
        models = [m for m in models if m.name == name]
    rows = []
    for model in models:
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        versions = client.search_model_versions(f"name = '{model.name}'")
        for version in sorted(versions, key=lambda v: -int(v.version)):
            rows.append(_row(tracker, model.name, version, sorted(aliases.get(str(version.version), []))))
    return rows


def _row(tracker: Tracker, name: str, version, aliases: list[str]) -> dict:
    from mlflow.exceptions import MlflowException

    row = {"model": f"models:/{name}/{version.version}", "aliases": aliases, "stage": "", "key": "", "data": [],
           "headline": [], "registered": datetime.fromtimestamp(version.creation_timestamp / 1000, timezone.utc)
           .strftime("%Y-%m-%d %H:%M"), "run_id": version.run_id or ""}
    try:
        run = tracker.client.get_run(version.run_id)
    except (MlflowException, TypeError):
        return row  # the run was deleted, or the version was registered from outside a run
    stage = run.data.tags.get("jielong.stage", "")
    row["stage"], row["key"] = stage, run.data.tags.get("jielong.key", "")
    row["data"] = [f"{d.dataset.name} {d.dataset.digest[:8]}" for d in run.inputs.dataset_inputs
                   if {t.key: t.value for t in d.tags}.get("mlflow.data.context") == "train"]
    metric, label = TRAINING_HEADLINE.get(stage, (None, None))
    if metric in run.data.metrics:
        row["headline"].append(f"{label} {run.data.metrics[metric]:.4g}")
    parent_id = run.data.tags.get("mlflow.parentRunId")
    if parent_id:
        try:
            parent = tracker.client.get_run(parent_id).data.metrics
        except MlflowException:
            parent = {}
        row["headline"] += [f"{label} {parent[f'eval_{stage}/{m}']:.4g}" for m, label in EVAL_HEADLINE
                            if f"eval_{stage}/{m}" in parent]
    return row
