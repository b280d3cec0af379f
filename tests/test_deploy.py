"""`jielong deploy-check` (flows/deploy.py, tasks/lib/deploy/): against a loopback OpenAI-style server of
the same tiny model (passes), of another one (fails, naming the probes), `mlflow models serve` of a
registered model (passes), and endpoints that cannot be checked (one-line errors)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from jielong.flows.deploy import run_deploy_check
from jielong.models.parity import load_probes
from jielong.tasks.lib.deploy.endpoint import Endpoint, EndpointError

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import ModelServer  # noqa: E402
from test_export import build_preset_model  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"tiny": build_preset_model(root / "tiny", seed=0), "other": build_preset_model(root / "other", seed=1)}


@pytest.fixture
def server(models):
    served = ModelServer(models["tiny"])
    yield served
    served.stop()


def settings(tmp_path: Path) -> list[str]:
    return [f"workspace={tmp_path / 'ws'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]


def mlflow_run(tmp_path: Path, run_id: str):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)


def test_a_server_of_the_same_model_passes_and_is_an_mlflow_run(models, server, tmp_path):
    result = run_deploy_check(server.url, str(models["tiny"]), None, "tiny", settings(tmp_path), max_new_tokens=8,
                              rounds=2, concurrency=3)
    probes = load_probes()
    assert result["passed"] and result["api"] == "openai" and result["skipped"] == []
    assert result["requests"] == 2 * len(probes) and result["errors"] == 0 and result["probes_answered"] == len(probes)
    assert all(row["answer"].strip() for row in result["answers"])  # real answers, not empty ones compared
    assert 0 < result["latency_p50_s"] <= result["latency_p95_s"]
    run = mlflow_run(tmp_path, result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["jielong.deploy_check"] == "passed"
    assert run.data.metrics["deploy/probes_differing"] == 0 and run.data.metrics["deploy/requests"] == 2 * len(probes)


def test_a_server_of_another_model_fails_naming_the_probes(models, server, tmp_path):
    server.swap(models["other"])
    result = run_deploy_check(server.url, str(models["tiny"]), None, "tiny", settings(tmp_path), max_new_tokens=8,
                              rounds=1, concurrency=2)
    assert not result["passed"] and result["errors"] == 0
    assert set(result["probes_differing"]) == {p.id for p in load_probes()}
    run = mlflow_run(tmp_path, result["run_id"])
    assert run.info.status == "FAILED" and run.data.metrics["deploy/probes_differing"] == len(load_probes())


def test_one_path_takes_only_its_kind_of_probe(models, server, tmp_path):
    result = run_deploy_check(server.url + "/v1/chat/completions", str(models["tiny"]), None, "tiny", settings(tmp_path),
                              max_new_tokens=8, rounds=1, concurrency=1)
    assert result["passed"] and result["probes_answered"] == 2 and len(result["skipped"]) == 6


def jielong(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "jielong"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_cli_exit_codes_and_one_line_errors(models, server, tmp_path):
    server.swap(models["other"])
    common = ["--model", str(models["tiny"]), "--rounds", "1", "--max-new-tokens", "6", *sum((["--set", s] for s in settings(tmp_path)), [])]
    failed = jielong("deploy-check", server.url, *common, cwd=tmp_path)
    message = " ".join(failed.stderr.split())
    assert failed.returncode == 1 and "answers differ from the model's on api_name-heappop, api_name-heappush," in message
    unreachable = jielong("deploy-check", f"http://127.0.0.1:{free_port()}", *common, cwd=tmp_path)
    assert unreachable.returncode == 2 and unreachable.stderr.startswith("error: cannot reach")
    assert "Traceback" not in unreachable.stderr


def test_only_loopback_http_urls():
    for url, message in [("http://example.com:8000", "only loopback endpoints"), ("ftp://127.0.0.1/x", "not an http")]:
        with pytest.raises(EndpointError, match=message):
            Endpoint(url)


@pytest.mark.slow
def test_mlflow_models_serve_of_a_registered_model_passes(models, tmp_path):
    from jielong.tasks.config import load_config
    from jielong.tasks.core.tracking import Tracker

    tracker = Tracker(load_config("tiny", settings(tmp_path)))
    run_id = tracker.start_run("instruct", {})
    tracker.log_model(run_id, models["tiny"], "model", "llm/v1/chat", "# tiny\n")
    tracker.register_model("tiny-chat", run_id, "model")
    tracker.end_run(run_id)
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": tracker.uri}
    process = subprocess.Popen([f"{bin_dir}/mlflow", "models", "serve", "-m", "models:/tiny-chat/1", "--env-manager", "local",
                                "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        result = run_deploy_check(f"http://127.0.0.1:{port}", "models:/tiny-chat/1", None, "tiny", settings(tmp_path),
                                  max_new_tokens=8, rounds=1, concurrency=2)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    assert result["api"] == "invocations" and result["passed"] and result["probes_answered"] == 2
    assert all(row["answer"].strip() for row in result["answers"])
