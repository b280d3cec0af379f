"""MLflow records of exports: an export is an artifact of its model's run (a registered version's or a
runs:/ reference's); a model with no run (a folder, a GGUF, a builtin) gets an `export` run of its own."""

from __future__ import annotations

from pathlib import Path

from jielong.tasks.core.config import RunConfig
from jielong.tasks.core.schema import UserError


def model_run_id(tracker, reference: str) -> str | None:
    """The run that logged the model `reference` names (models:/NAME/VERSION or runs:/ID/...), else None."""
    if reference.startswith("runs:/"):
        return reference.removeprefix("runs:/").split("/", 1)[0]
    if reference.startswith("models:/"):
        name, _, version = reference.removeprefix("models:/").partition("/")
        try:
            found = tracker.client.get_model_version(name, version)
        except Exception as err:  # MlflowException: no such version
            raise UserError(f"{reference}: not a registered model version in {tracker.uri} ({err})") from None
        return found.run_id
    return None


def export_metrics(manifest: dict) -> dict[str, float]:
    prefix = f"export/{manifest['format']}_{manifest['type']}"
    parity = manifest["parity"]
    return {f"{prefix}/max_abs_logprob_diff": parity["max_abs_logprob_diff"],
            f"{prefix}/greedy_equal": float(parity["greedy_equal"]),
            f"{prefix}/bytes": float(manifest["bytes"]),
            f"{prefix}/export_seconds": manifest["export_seconds"]}


def log_export(cfg: RunConfig, reference: str, out: Path, manifest: dict) -> str:
    """Log the export and its manifest (under exports/<format>_<type>/) with its parity figures; returns the run id."""
    from jielong.models.export import manifest_path
    from jielong.tasks.core.tracking import Tracker

    tracker = Tracker(cfg)
    run_id = model_run_id(tracker, reference)
    own_run = run_id is None
    if own_run:
        run_id = tracker.start_run(f"export {manifest['format']} {manifest['type']}", {"jielong.model": reference})
    folder = f"exports/{manifest['format']}_{manifest['type']}"
    tracker.log_artifacts(run_id, [out, manifest_path(out)], folder)
    tracker.log_metrics(run_id, export_metrics(manifest))
    tracker.set_tags(run_id, {f"jielong.export.{manifest['format']}_{manifest['type']}": f"{folder}/{out.name}"})
    if own_run:
        tracker.end_run(run_id)
    return run_id
