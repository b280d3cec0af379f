"""Tracking faults during a run: a real MLflow server behind a loopback proxy that fails requests.

Transient failures (HTTP 503, connections dropped without an answer) are retried and the run's records
all arrive; an outage longer than `mlflow.retry_seconds` stops the run with a clear error, and the
rerun reuses the stage outputs computed before the outage.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import free_port, small_overrides
from jielong.flows.operate import start_servers, stop_servers
from jielong.flows.entry_points import run_pipeline
from jielong.tasks.core import tracking
from jielong.tasks.config import load_config
from jielong.tasks.core.tracking import ProgressLog, TrackingError, Tracker

NOT_FORWARDED = {  # connection-level headers, and those the proxy sets itself
    "connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}


class FlakyProxy(ThreadingHTTPServer):
    """Forwards to `upstream`; API requests fail when `fault(index, path, body)` says "error" (503)
    or "drop" (the connection closes without an answer)."""

    daemon_threads = True

    def __init__(self, upstream: str, fault):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream
        self.fault = fault
        self.api_requests = 0
        self.injected: list[str] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    server: FlakyProxy

    def log_message(self, *args) -> None:
        pass

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if "/api/" in self.path:
            with self.server.lock:
                index = self.server.api_requests
                self.server.api_requests += 1
                fault = self.server.fault(index, self.path, body)
                if fault != "pass":
                    self.server.injected.append(fault)
            if fault == "drop":
                self.close_connection = True
                return
            if fault == "error":
                self._answer(503, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected"}',
                             {"Content-Type": "application/json"})
                return
        host, port = self.server.upstream.removeprefix("http://").split(":")
        upstream = http.client.HTTPConnection(host, int(port), timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in NOT_FORWARDED | {"host"}}
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        payload = response.read()
        self._answer(response.status, payload, {k: v for k, v in response.getheaders() if k.lower() not in NOT_FORWARDED})
        upstream.close()

    def _answer(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("mlflow-server")
    servers = start_servers(load_config("tiny", [f"workspace={workspace}"]), None, free_port())
    try:
        yield servers[0][2]
    finally:
        stop_servers(servers)


def start_proxy(upstream: str, fault) -> FlakyProxy:
    proxy = FlakyProxy(upstream, fault)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    return proxy


@pytest.fixture
def fast_retries(monkeypatch):
    """Only jielong's own retries: the MLflow client gives up at once, and backoff starts small."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tracking, "FIRST_RETRY_DELAY", 0.05)


@pytest.mark.slow
def test_transient_failures_are_retried_and_every_record_arrives(prefect_server, workspace: Path, mlflow_server, fast_retries):
    proxy = start_proxy(mlflow_server, lambda i, path, body: ("error", "drop")[i // 4 % 2] if i % 4 == 3 else "pass")
    try:
        overrides = [*small_overrides(workspace), f"mlflow.tracking_uri={proxy.url}", f"mlflow.experiment=flaky-{workspace.parent.name}"]
        summaries = {s["stage"]: s for s in run_pipeline("tiny", overrides, only=["ingest", "clean", "dedup", "tokenize", "pretrain"])}
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert proxy.injected.count("error") >= 5 and proxy.injected.count("drop") >= 5, proxy.injected

    client = MlflowClient(mlflow_server)  # straight to the server: what arrived
    runs = {r.info.run_id: r for r in client.search_runs(
        [client.get_experiment_by_name(f"flaky-{workspace.parent.name}").experiment_id], max_results=100)}
    parent = runs[summaries["ingest"]["parent_run_id"]]
    assert parent.info.status == "FINISHED"
    for stage, summary in summaries.items():
        run = runs[summary["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["jielong.stage"] == stage
        assert run.data.metrics[f"{stage}/documents_out"] == summary["documents_out"]
        assert parent.data.metrics[f"{stage}/documents_out"] == summary["documents_out"]
    pretrain = summaries["pretrain"]["mlflow_run_id"]
    history = client.get_metric_history(pretrain, "pretrain/loss")
    assert sorted(m.step for m in history) == list(range(1, 7)), "each training point arrives exactly once"
    assert "model" in {a.path for a in client.list_artifacts(pretrain)}
    assert runs[pretrain].data.tags["jielong.registered_model"].startswith("models:/jielong-pretrain/")


@pytest.mark.slow
def test_outage_beyond_the_retry_budget_stops_clearly_and_the_rerun_reuses_outputs(
        prefect_server, workspace: Path, mlflow_server, fast_retries):
    down = threading.Event()

    def fault(index: int, path: str, body: bytes) -> str:
        if b"clean/documents_in" in body:  # the store goes away once clean is computed and being logged
            down.set()
        return "drop" if down.is_set() else "pass"

    proxy = start_proxy(mlflow_server, fault)
    try:
        overrides = [*small_overrides(workspace), f"mlflow.tracking_uri={proxy.url}", "mlflow.retry_seconds=2",
                     f"mlflow.experiment=outage-{workspace.parent.name}"]
        with pytest.raises(TrackingError, match="kept failing while logging metrics.*rerun the same command"):
            run_pipeline("tiny", overrides, only=["ingest", "clean", "dedup"])
        down.clear()
        proxy.fault = lambda i, path, body: "pass"
        rerun = {s["stage"]: s["status"] for s in run_pipeline("tiny", overrides, only=["ingest", "clean", "dedup"])}
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert rerun == {"ingest": "cached", "clean": "cached", "dedup": "ran"}


class FakeClient:
    """log_batch fails with a connection error on the calls listed in `fail_on` (1-based)."""

    def __init__(self, fail_on: set[int]):
        self.calls = 0
        self.fail_on = fail_on
        self.received: list[tuple[str, int]] = []

    def log_batch(self, run_id, metrics=()):
        self.calls += 1
        if self.calls in self.fail_on:
            raise ConnectionError("injected")
        self.received += [(m.key, m.step) for m in metrics]


def fake_tracker(client: FakeClient, retry_seconds: float) -> Tracker:
    tracker = Tracker.__new__(Tracker)
    tracker.uri, tracker.client, tracker.retry_seconds = "http://fake", client, retry_seconds
    return tracker


def test_progress_points_wait_through_an_outage_and_arrive_once(fast_retries):
    client = FakeClient(fail_on={2, 3})
    progress = ProgressLog(fake_tracker(client, retry_seconds=5), "run")
    progress([("loss", 1.0, 1)])
    progress([("loss", 0.9, 2)])  # fails: kept, training goes on
    progress([("loss", 0.8, 3)])  # fails again
    assert len(progress.pending) == 2
    progress([("loss", 0.7, 4)])  # the store is back: everything pending goes
    progress.flush()
    assert client.received == [("loss", 1), ("loss", 2), ("loss", 3), ("loss", 4)]


def test_a_rejected_request_is_not_retried(fast_retries):
    from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

    class Rejecting(FakeClient):
        def log_batch(self, run_id, metrics=()):
            self.calls += 1
            raise MlflowException("bad metric", error_code=INVALID_PARAMETER_VALUE)

    client = Rejecting(set())
    with pytest.raises(MlflowException, match="bad metric"):
        fake_tracker(client, retry_seconds=5).log_metrics("run", {"x": 1.0})
    assert client.calls == 1


def test_a_tracker_process_stays_in_the_flow_process():
    """A shard task runs with its parent task's Prefect context, parameters included, pickled on a process
    runner (`jielong run`, which prestarts a TrackerProcess, once failed there on a pipe's AuthenticationString).
    The stage task's parameters are its name and key, the tracker stays in the flow's StageRunContext
    (test_process_pool_runner runs the pipeline so); should it travel again, the error says why."""
    import inspect

    import cloudpickle

    from jielong.flows.stage_task import execute_stage

    assert list(inspect.signature(execute_stage.fn).parameters) == ["stage_name", "key"]
    with pytest.raises(TypeError, match="only in the process that started it"):
        cloudpickle.dumps(tracking.TrackerProcess.__new__(tracking.TrackerProcess))


def test_a_second_workspace_in_one_process_logs_to_its_own_store(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = load_config("tiny", [f"workspace={tmp_path / 'one'}"])
    second = load_config("tiny", [f"workspace={tmp_path / 'two'}"])
    Tracker(first)
    assert tracking.tracking_uri(second) == f"sqlite:///{tmp_path / 'two' / 'mlflow.db'}"


def test_a_dataset_inserted_by_a_concurrent_run_is_linked_on_the_second_try():
    """Two runs at once on one workspace log the same dataset: MLflow's store looks it up, then inserts it,
    so one of them can lose the insert (CI saw `jielong run` fail so). The error is the store's own: an
    MlflowException caused by sqlalchemy's IntegrityError; the second try finds the row."""
    from mlflow.exceptions import BAD_REQUEST, MlflowException
    from sqlalchemy.exc import IntegrityError

    from jielong.tasks.core.datasets import DataInput

    class Racing:
        def __init__(self, losses: int):
            self.calls, self.losses = 0, losses

        def log_inputs(self, run_id, datasets):
            self.calls += 1
            if self.calls <= self.losses:
                cause = IntegrityError("INSERT INTO datasets", {}, Exception("UNIQUE constraint failed: datasets"))
                raise MlflowException(message=cause, error_code=BAD_REQUEST) from cause

    data = [DataInput("clean-kept", "abc", "file:///ws/clean", '{"mlflow_colspec": []}', 3, "kept")]
    client = Racing(losses=1)
    fake_tracker(client, retry_seconds=5).log_inputs("run", data)
    assert client.calls == 2
    with pytest.raises(MlflowException, match="UNIQUE"):  # a constraint that fails twice is not a race
        fake_tracker(Racing(losses=2), retry_seconds=5).log_inputs("run", data)
