"""MLflow helpers: one parent run per pipeline invocation, one nested run per stage.

Everything goes through `MlflowClient` with explicit run ids (no global "active run"), and metrics
and params are sent with `log_batch` — one call per point is ~50x slower on sqlite.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

from tasks.config import PipelineConfig, UserError

BATCH_METRICS = 1000  # MLflow's limit per log_batch call
BATCH_PARAMS = 100
PARAM_VALUE_LIMIT = 6000


def tracking_uri(cfg: PipelineConfig) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else a sqlite store in the workspace."""
    return cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{cfg.workspace_path() / 'mlflow.db'}"


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists become JSON strings."""
    out: dict[str, str] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    text = json.dumps(value) if isinstance(value, list) else str(value)
    out[prefix.rstrip(".")] = text[:PARAM_VALUE_LIMIT]
    return out


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with a message, when a tracking server does not answer (MLflow's own client
    would retry for minutes); transient failures later in a run are retried by MLflow's client."""
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout).raise_for_status()
    except requests.RequestException as err:
        raise UserError(f"MLflow tracking server {uri} is not reachable ({type(err).__name__}); start it "
                        "(`mlflow server --host 127.0.0.1`) or unset MLFLOW_TRACKING_URI to use the local store") from None


class Tracker:
    def __init__(self, cfg: PipelineConfig):
        import mlflow
        from mlflow import MlflowClient

        self.uri = tracking_uri(cfg)
        if self.uri.startswith(("http://", "https://")):
            check_server(self.uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        if self.uri.startswith("sqlite:///"):
            # two runs starting at once on a fresh workspace would both create the database's tables
            database = Path(self.uri[len("sqlite:///"):])
            database.parent.mkdir(parents=True, exist_ok=True)
            with open(database.parent / ".mlflow-init.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self.experiment_id = self._experiment(cfg)
        else:
            self.experiment_id = self._experiment(cfg)

    def _experiment(self, cfg: PipelineConfig) -> str:
        name = cfg.mlflow.experiment
        try:
            found = self.client.get_experiment_by_name(name)
            if found:
                return found.experiment_id
            location = None
            if self.uri.startswith("sqlite:"):  # keep artifacts in the workspace, not in ./mlruns of the cwd
                location = (cfg.workspace_path() / "mlartifacts").as_uri()
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except Exception:  # created meanwhile by a concurrent run
                found = self.client.get_experiment_by_name(name)
                if found:
                    return found.experiment_id
                raise
        except Exception as err:
            raise UserError(f"MLflow tracking store {self.uri} is not usable: {type(err).__name__}: {err}") from None

    # ------------------------------------------------------------ runs

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        tags = {"mlflow.runName": name, **tags}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
        return run.info.run_id

    def end_run(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), BATCH_PARAMS):
            self.client.log_batch(run_id, params=items[i : i + BATCH_PARAMS])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        self.log_metric_points(run_id, [(k, v, step) for k, v in metrics.items()])

    def log_metric_points(self, run_id: str, points: Iterable[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v, step in points]
        for i in range(0, len(items), BATCH_METRICS):
            self.client.log_batch(run_id, metrics=items[i : i + BATCH_METRICS])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if path.is_file():
                self.client.log_artifact(run_id, str(path), artifact_path)

    def log_directory(self, run_id: str, directory: Path, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, str(directory), artifact_path)

    def register_model(self, name: str, run_id: str, artifact_path: str) -> str:
        """A new version of registered model `name` whose source is the run's artifact directory."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException:
            pass  # exists already
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        version = self.client.create_model_version(name, source, run_id=run_id)
        return str(version.version)

    def log_table(self, run_id: str, rows: list[dict], artifact_file: str) -> None:
        import pandas as pd

        self.client.log_table(run_id, data=pd.DataFrame(rows), artifact_file=artifact_file)

    def log_dataset(self, run_id: str, files: list[Path], name: str, context: str, limit: int = 1000) -> None:
        """Record a stage's data as a run input (a sample defines the schema; the source is the directory)."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        if not files:
            return
        frame = pd.read_parquet(files[0], columns=["id", "text", "source"]).head(limit)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "source can be interpreted in multiple ways": both are local
            dataset = mlflow.data.from_pandas(frame, source=files[0].parent.as_uri(), name=name)
        entity = DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        self.client.log_inputs(run_id, datasets=[entity])


def stage_metrics(stage: str, manifest: dict) -> dict[str, float]:
    """A stage's summary metrics from its manifest: `<stage>/documents_in`, `<stage>/rejected/<reason>`, ..."""
    counts = manifest["counts"]
    seconds = max(manifest["timings"]["seconds"], 1e-9)
    metrics = {
        f"{stage}/documents_in": counts["documents_in"],
        f"{stage}/documents_out": counts["documents_out"],
        f"{stage}/documents_rejected": counts["documents_rejected"],
        f"{stage}/bytes_in": counts["bytes_in"],
        f"{stage}/bytes_out": counts["bytes_out"],
        f"{stage}/seconds": manifest["timings"]["seconds"],
        f"{stage}/documents_per_s": counts["documents_in"] / seconds,
        f"{stage}/mb_per_s": counts["bytes_in"] / 1e6 / seconds,
    }
    for reason, n in counts["rejected_by_reason"].items():
        metrics[f"{stage}/rejected/{reason}"] = n
    for name, value in manifest.get("metrics", {}).items():
        if isinstance(value, (int, float)):
            metrics[f"{stage}/{name}"] = value
    for rule, report in manifest.get("details", {}).get("rules", {}).items():
        metrics[f"{stage}/would_remove/{rule}"] = report["would_remove_fraction"]
    return metrics
