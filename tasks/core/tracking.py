"""MLflow helpers: one parent run per pipeline invocation, one nested run per stage.

Everything goes through `MlflowClient` with explicit run ids (no global "active run"), and metrics
and params are sent with `log_batch` — one call per point is ~50x slower on sqlite.

Every call to the store is retried with backoff for `mlflow.retry_seconds` when it fails in a way that
can pass (connection refused or reset, timeout, HTTP 429/5xx, a locked sqlite database), on top of the
MLflow client's own few HTTP retries. When the store stays down the run stops with a `TrackingError`;
stage outputs are published before they are logged, so a rerun finds them cached and logs them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
import warnings
from contextlib import closing
from pathlib import Path
from typing import Any, Iterable

from jielong.tasks.core.config import RunConfig
from jielong.tasks.core.run_labels import EXPERIMENT_KIND_TAG, MODEL_TRAINING, failure_tags
from jielong.tasks.core.schema import UserError

BATCH_METRICS = 1000  # MLflow's limit per log_batch call
BATCH_PARAMS = 100
PARAM_VALUE_LIMIT = 6000
FIRST_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 30.0

logger = logging.getLogger("jielong.tracking")


class TrackingError(UserError):
    """The tracking store kept failing past the retry budget."""


def is_transient(err: BaseException) -> bool:
    """Failures worth retrying: the store may answer later. A rejected request (4xx) is not one."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return status >= 500 or status == 429
    try:
        from sqlalchemy.exc import OperationalError
    except ImportError:
        return False
    return isinstance(err, OperationalError)  # e.g. "database is locked"


def is_insert_race(err: BaseException) -> bool:
    """A unique-constraint failure: two writers inserted the same row at once (MLflow's store looks a
    dataset up, then inserts it, in separate steps). A store behind a server reports it in the message."""
    from sqlalchemy.exc import IntegrityError

    if isinstance(err, IntegrityError) or isinstance(err.__cause__, IntegrityError):
        return True
    return "UNIQUE constraint failed" in str(err) or "IntegrityError" in str(err)


def tracking_uri(cfg: RunConfig) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else a sqlite store in the workspace."""
    return cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{cfg.workspace_path() / 'mlflow.db'}"


def set_tracking_uri_for_this_process(uri: str) -> None:
    """Point mlflow's fluent API at `uri`, leaving $MLFLOW_TRACKING_URI as the user set it: mlflow exports it,
    which would send a second workspace's run in this process to the first one's store."""
    import mlflow

    users = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if users is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = users


def opens_on_runs(client: Any, experiment: Any) -> None:
    """Tag an experiment made before the tag was set, so the UI opens it on its runs (a kind a user chose stays)."""
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


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
            cwd=Path(__file__).resolve().parent,  # the checkout this code runs from, if any
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


def check_tracking(cfg: RunConfig) -> None:
    """Before a flow starts: a tracking server, when one is configured, answers."""
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        check_server(uri)


def use_write_ahead_log(database: Path) -> None:
    """Put a sqlite store in WAL mode (it stays so): a commit then syncs one file once instead of a rollback
    journal and the database, which halves the time of the many small transactions a run makes (a cached
    stage's run is three). Readers and one writer work at once, as before; the store's content is unchanged."""
    import sqlite3

    with closing(sqlite3.connect(database, timeout=60)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


class Tracker:
    def __init__(self, cfg: RunConfig):
        import mlflow
        from mlflow import MlflowClient

        self.uri = tracking_uri(cfg)
        self.retry_seconds = cfg.mlflow.retry_seconds
        self.deferred: dict[str, dict[str, float]] = {}  # run id -> metrics sent when that run ends
        self.progress: dict[str, ProgressLog] = {}  # run id -> its training curves' points
        if self.uri.startswith(("http://", "https://")):
            check_server(self.uri)
        set_tracking_uri_for_this_process(self.uri)
        if self.uri.startswith("sqlite:///"):
            # two runs starting at once on a fresh workspace would both create the database's tables (the client
            # creates them) and the experiment
            database = Path(self.uri[len("sqlite:///"):])
            database.parent.mkdir(parents=True, exist_ok=True)
            with open(database.parent / ".mlflow-init.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self.client = MlflowClient(self.uri)
                use_write_ahead_log(database)
                self.experiment_id = self._experiment(cfg)
        else:
            self.client = MlflowClient(self.uri)
            self.experiment_id = self._experiment(cfg)

    def _experiment(self, cfg: RunConfig) -> str:
        name = cfg.mlflow.experiment
        try:
            found = self.client.get_experiment_by_name(name)
            if found:
                opens_on_runs(self.client, found)
                return found.experiment_id
            location = None
            if self.uri.startswith("sqlite:"):  # keep artifacts in the workspace, not in ./mlruns of the cwd
                location = (cfg.workspace_path() / "mlartifacts").as_uri()
            try:
                return self.client.create_experiment(name, artifact_location=location,
                                                     tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
            except Exception:  # created meanwhile by a concurrent run
                found = self.client.get_experiment_by_name(name)
                if found:
                    return found.experiment_id
                raise
        except Exception as err:
            raise UserError(f"MLflow tracking store {self.uri} is not usable: {type(err).__name__}: {err}") from None

    # ------------------------------------------------------------ retries

    def _call(self, what: str, fn: Any, *args: Any, retry_seconds: float | None = None, **kwargs: Any) -> Any:
        """fn(*args, **kwargs), retried with exponential backoff while it fails transiently."""
        budget = self.retry_seconds if retry_seconds is None else retry_seconds
        start = time.monotonic()
        delay = FIRST_RETRY_DELAY
        attempt = 1
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if not is_transient(err):
                    raise
                waited = time.monotonic() - start
                reason = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                if waited + delay > budget:
                    raise TrackingError(
                        f"MLflow tracking at {self.uri} kept failing while {what} ({attempt} attempts over "
                        f"{waited:.0f} s; last error {reason}). Stage outputs computed so far are kept in the "
                        "workspace: rerun the same command when the store answers and they are logged as cache "
                        "hits (raise mlflow.retry_seconds to wait longer)") from None
                logger.warning("MLflow tracking failed while %s (%s); retry %d in %.1f s", what, reason, attempt, delay)
                time.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
                attempt += 1

    # ------------------------------------------------------------ runs

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        tags = {"mlflow.runName": name, **tags}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self._call(f"starting run {name!r}", self.client.create_run, self.experiment_id, tags=tags, run_name=name)
        return run.info.run_id

    def end_run(self, run_id: str) -> None:
        self.log_metrics(run_id, self.deferred.pop(run_id, {}))
        self._call("ending a run", self.client.set_terminated, run_id, "FINISHED")

    def mark_failed(self, run_id: str, error: str | None = None) -> None:
        """Best effort, on the way out of a failure: must not hide the error being raised. `error` is shown on
        the run (tasks/core/run_labels.py)."""
        from mlflow.entities import RunTag

        if error:
            try:
                tags = [RunTag(k, v) for k, v in failure_tags(error).items()]
                self._call("tagging a failed run", self.client.log_batch, run_id, tags=tags, retry_seconds=5)
            except Exception as err:
                logger.warning("could not record the error on MLflow run %s: %s", run_id, err)
        try:  # the summaries of the stages that did finish
            self.send_metrics(run_id, metric_entities((k, v, 0) for k, v in self.deferred.pop(run_id, {}).items()),
                              retry_seconds=5)
        except Exception as err:
            logger.warning("could not log the last metrics of MLflow run %s: %s", run_id, err)
        try:
            self._call("marking a run failed", self.client.set_terminated, run_id, "FAILED", retry_seconds=5)
        except Exception as err:  # the original error matters more
            logger.warning("could not mark MLflow run %s as failed: %s", run_id, err)

    def log_progress(self, run_id: str, points: list[tuple[str, float, int]]) -> None:
        """A running stage's curve points (a ProgressLog per run: an outage never stops training)."""
        self.progress.setdefault(run_id, ProgressLog(self, run_id))(points)

    def flush_progress(self, run_id: str) -> None:
        if run_id in self.progress:
            self.progress.pop(run_id).flush()

    def close(self) -> BaseException | None:
        """Nothing to release or wait for in this process (see TrackerProcess)."""
        return None

    def log_metrics_at_end(self, run_id: str, metrics: dict[str, float]) -> None:
        """Metrics sent in one batch with the run's end (a parent run collecting its cached stages' summaries)."""
        self.deferred.setdefault(run_id, {}).update(metrics)

    def log_batch(self, run_id: str, params: dict[str, str], metrics: dict[str, float]) -> None:
        """Params and metrics together, in as few calls as MLflow's limits per call allow."""
        from mlflow.entities import Param

        params_left = [Param(k, v) for k, v in params.items()]
        metrics_left = metric_entities((k, v, 0) for k, v in metrics.items())
        while params_left or metrics_left:
            some_params, params_left = params_left[:BATCH_PARAMS], params_left[BATCH_PARAMS:]
            room = BATCH_METRICS - len(some_params)  # MLflow's limit is on params + metrics + tags together
            some_metrics, metrics_left = metrics_left[:room], metrics_left[room:]
            self._call("logging params and metrics", self.client.log_batch, run_id, params=some_params,
                       metrics=some_metrics)

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), BATCH_PARAMS):
            self._call("logging params", self.client.log_batch, run_id, params=items[i : i + BATCH_PARAMS])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        self.log_metric_points(run_id, [(k, v, step) for k, v in metrics.items()])

    def log_metric_points(self, run_id: str, points: Iterable[tuple[str, float, int]]) -> None:
        self.send_metrics(run_id, metric_entities(points))

    def send_metrics(self, run_id: str, metrics: list, retry_seconds: float | None = None) -> None:
        """Send Metric entities in batches; each batch sent is removed from `metrics` (so a caller can
        keep what is left after a failure and send it later, without duplicates)."""
        while metrics:
            batch = metrics[:BATCH_METRICS]
            self._call("logging metrics", self.client.log_batch, run_id, metrics=batch, retry_seconds=retry_seconds)
            del metrics[: len(batch)]

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call("setting tags", self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if path.is_file():
                self._call(f"uploading {path.name}", self.client.log_artifact, run_id, str(path), artifact_path)

    def log_model(self, run_id: str, model_dir: Path, artifact_path: str, task: str, card: str) -> None:
        """A Hugging Face model folder as an MLflow transformers-flavor model (what `mlflow models serve`
        loads: `task` llm/v1/completions or llm/v1/chat, OpenAI-style requests), with `card` as README.md."""
        with tempfile.TemporaryDirectory(prefix="jielong-model-") as tmp:
            folder = Path(tmp) / "model"
            save_served_model(model_dir, folder, task)
            (folder / "README.md").write_text(card, encoding="utf-8")
            self._call("uploading the model", self.client.log_artifacts, run_id, str(folder), artifact_path)

    def register_model(self, name: str, run_id: str, artifact_path: str) -> str:
        """A new version of registered model `name` whose source is the run's artifact directory."""
        from mlflow.exceptions import MlflowException

        try:
            self._call("registering a model", self.client.create_registered_model, name)
        except MlflowException:
            pass  # exists already (a failure that can pass was retried, then raised as TrackingError)
        source = f"{self._call('reading a run', self.client.get_run, run_id).info.artifact_uri}/{artifact_path}"
        version = self._call("registering a model version", self.client.create_model_version, name, source, run_id=run_id)
        return str(version.version)

    def log_table(self, run_id: str, rows: list[dict], artifact_file: str) -> None:
        import pandas as pd

        self._call(f"uploading {artifact_file}", self.client.log_table, run_id, data=pd.DataFrame(rows),
                   artifact_file=artifact_file)

    def log_inputs(self, run_id: str, inputs: list) -> None:
        """Datasets the run consumed (tasks/core/datasets.py DataInput), shown in the UI's Dataset column."""
        if not inputs:
            return
        datasets = [d.entity() for d in inputs]
        try:
            self._call("logging datasets", self.client.log_inputs, run_id, datasets=datasets)
        except Exception as err:
            if not is_insert_race(err):
                raise
            # another run inserted the same dataset (name, digest) between the store's lookup and its insert;
            # the second try finds that row and links it to this run
            self._call("logging datasets", self.client.log_inputs, run_id, datasets=datasets)


def save_served_model(model_dir: Path, folder: Path, task: str) -> None:
    """`mlflow.transformers.save_model` of a text-generation pipeline over the folder's model and tokenizer.
    (A folder path given to save_model directly fails with transformers 5; requirements are stated, since
    inferring them would load the model again in a subprocess.)"""
    from importlib import metadata

    import mlflow.transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    generator = pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    requirements = [f"{name}=={metadata.version(name).split('+')[0]}" for name in ("torch", "transformers", "mlflow")]
    quiet = logging.getLogger("mlflow.transformers")  # it warns that no hub card or licence was found: ours is written
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.transformers.save_model(generator, str(folder), task=task, pip_requirements=requirements)
    finally:
        quiet.setLevel(level)


def metric_entities(points: Iterable[tuple[str, float, int]]) -> list:
    """(key, value, step) -> MLflow Metric entities stamped now (a resend keeps the same timestamp)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, int(step)) for k, v, step in points]


class ProgressLog:
    """The `log` callback of a running stage (training curves). A tracking outage must not stop a
    training run: points that could not be sent wait, go with the next call, and `flush` sends the
    rest with the full retry budget when the stage ends."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker = tracker
        self.run_id = run_id
        self.pending: list = []

    def __call__(self, points: Iterable[tuple[str, float, int]]) -> None:
        self.pending += metric_entities(points)
        try:
            self.tracker.send_metrics(self.run_id, self.pending, retry_seconds=0)
        except TrackingError as err:
            logger.warning("%d metric points wait for the tracking store: %s", len(self.pending), err)

    def flush(self) -> None:
        self.tracker.send_metrics(self.run_id, self.pending)


# ------------------------------------------------------------ the tracker in a second process


class TrackerProcess:
    """A Tracker in a child process, started before this process imports Prefect: importing MLflow and
    opening its store (2-3 s, the largest start-up cost of a cached rerun) then runs on another core
    while this one starts the flow, and logging a stage overlaps the flow's bookkeeping of the next.

    Tracker's methods are forwarded and run in order. Those whose answer nobody reads (NOT_WAITED) return
    at once; the others wait for every answer outstanding. An error is raised here by the next call that
    waits, or returned by `close`; once one happened, the child runs nothing but `mark_failed`, as a
    Tracker in this process would have stopped the flow at the failing call."""

    WAITED = {"start_run", "register_model", "log_model"}
    NOT_WAITED = {"end_run", "log_params", "log_metrics", "log_batch", "log_metrics_at_end", "log_progress",
                  "flush_progress", "set_tags", "log_artifacts", "log_table", "log_inputs"}

    def __init__(self, cfg: RunConfig):
        import multiprocessing

        self.cfg = cfg
        context = multiprocessing.get_context("spawn")  # forking a process that runs Prefect's threads is unsafe
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_tracker, args=(cfg, child), name="jielong-tracking", daemon=True)
        self._process.start()
        child.close()
        self._lock = threading.Lock()
        self._unanswered = 0
        self._error: BaseException | None = None  # the first error of a call not waited for, not raised yet

    def __reduce__(self):
        """A pipe and a child process cannot travel: say so, rather than pickle's AuthenticationString error."""
        raise TypeError("a TrackerProcess works only in the process that started it: keep it out of what is "
                        "pickled (Prefect task parameters, which travel with shard tasks; shard jobs)")

    def __getattr__(self, name: str) -> Any:
        if name not in self.WAITED | self.NOT_WAITED:
            raise AttributeError(name)

        def forward(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self._send((name, args, kwargs))
                if name in self.NOT_WAITED:
                    return None
                value = self._read_answers()
                self._raise_error()
                return value

        return forward

    def mark_failed(self, run_id: str, error: str | None = None) -> None:
        """Best effort, as Tracker.mark_failed: an earlier call's error must not hide the one being raised."""
        with self._lock:
            try:
                self._send(("mark_failed", (run_id, error), {}))
                self._read_answers()
            except TrackingError:
                pass
            if self._error is not None:
                logger.warning("MLflow logging had failed before run %s was marked failed: %s", run_id, self._error)
                self._error = None

    def close(self) -> BaseException | None:
        """Wait for what is still being logged, stop the process; returns the error of a call not waited for."""
        with self._lock:
            try:
                self._read_answers()
                self._conn.send(None)
            except (TrackingError, OSError):
                pass
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._conn.close()
            error, self._error = self._error, None
            return error

    def _send(self, request: Any) -> None:
        # answers already there are read first: unread, they could fill the pipe and stall both processes
        self._read_answers(wait=False)
        try:
            self._conn.send(request)
        except OSError as err:
            raise TrackingError(f"the MLflow tracking process ended ({type(err).__name__})") from None
        self._unanswered += 1

    def _read_answers(self, wait: bool = True) -> Any:
        """Read the outstanding answers (only those already there unless `wait`); returns the last one."""
        value = None
        while self._unanswered and (wait or self._conn.poll()):
            try:
                ok, value = self._conn.recv()
            except (EOFError, OSError) as err:
                raise TrackingError(f"the MLflow tracking process ended ({type(err).__name__})") from None
            self._unanswered -= 1
            if not ok and self._error is None:
                self._error = value
        return value

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error


def _serve_tracker(cfg: RunConfig, conn: Any) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the parent still marks its runs failed through us
    reported = False
    try:
        tracker, failure = Tracker(cfg), None
    except Exception as err:
        tracker, failure = None, err
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        name, args, kwargs = request
        if failure is not None and (tracker is None or name != "mark_failed"):
            conn.send((False, None if reported else failure))  # the error is sent once; after it, nothing runs
            reported = True
            continue
        try:
            answer = (True, getattr(tracker, name)(*args, **kwargs))
        except Exception as err:
            if not _travels(err):
                err = RuntimeError(f"{type(err).__name__}: {err}")
            failure, reported = failure or err, True
            answer = (False, err)
        conn.send(answer)


def _travels(err: Exception) -> bool:
    """Whether the pipe can carry the error to the parent as it is: it serialises, and it can be rebuilt
    from what it serialises to (copy.copy rebuilds it the way the parent's end will, without unpickling)."""
    import copy
    import pickle

    try:
        pickle.dumps(err)
        copy.copy(err)
    except Exception:
        return False
    return True


_prestarted: list[TrackerProcess] = []


def prestart_tracker(cfg: RunConfig) -> None:
    """Start a TrackerProcess for this config now; `open_tracker` hands it to the flow."""
    _prestarted.append(TrackerProcess(cfg))


def open_tracker(cfg: RunConfig) -> "Tracker | TrackerProcess":
    """The tracker started for this config by `prestart_tracker`, else a Tracker in this process."""
    while _prestarted:
        process = _prestarted.pop()
        if process.cfg == cfg:
            return process
        process.close()
    return Tracker(cfg)


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
