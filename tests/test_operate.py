"""Operating jielong: real Prefect and MLflow servers on loopback, a scheduled deployment whose runs
complete and land in MLflow, and a one-off `prefect deployment run --param` of another stage. The test
starts and stops its own servers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from conftest import free_port
from jielong.flows.operate import start_servers, stop_servers
from jielong.tasks.config import load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_scheduled_runs_complete_and_reach_mlflow(tmp_path: Path, monkeypatch):
    workspace = tmp_path / "ws"
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "2")
    servers = start_servers(load_config("tiny", [f"workspace={workspace}"]), free_port(), free_port())
    urls = {name: url for name, _, url in servers}
    scheduler = None
    try:
        env = {**os.environ, "PREFECT_API_URL": urls["prefect"] + "/api", "MLFLOW_TRACKING_URI": urls["mlflow"],
               "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PYTHONPATH": str(ROOT)}
        log = open(tmp_path / "scheduler.log", "w")
        overrides = [f"workspace={workspace}", "ingest.sources=[{kind: builtin, limit: 5}]", "runner.kind=thread"]
        scheduler = subprocess.Popen(
            [sys.executable, "-m", "jielong.flows.cli", "schedule", "--interval", "5", "--name", "test", "--only", "ingest",
             *[arg for o in overrides for arg in ("--set", o)]],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        completed = []
        deadline = time.time() + 300  # the first scheduled run waits for the server's scheduler loop
        while time.time() < deadline and not completed:
            assert scheduler.poll() is None, (tmp_path / "scheduler.log").read_text()[-3000:]
            runs = requests.post(urls["prefect"] + "/api/flow_runs/filter", json={
                "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}, timeout=5).json()
            completed = [r for r in runs if r.get("deployment_id")]
            time.sleep(2)
        assert completed, (tmp_path / "scheduler.log").read_text()[-3000:]
        from mlflow import MlflowClient

        client = MlflowClient(urls["mlflow"])
        experiment = client.get_experiment_by_name("jielong")
        tagged = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{completed[0]['id']}'")
        assert tagged and tagged[0].info.status == "FINISHED"

        # a one-off run of another stage with parameters from Prefect, as the README shows
        oneoff = subprocess.run(
            [str(Path(sys.executable).parent / "prefect"), "deployment", "run", "jielong-pipeline/test",
             "--param", f"overrides={json.dumps([*overrides, 'clean.gopher_quality.min_words=3'])}", "--param", 'only=["clean"]',
             "--flow-run-name", "oneoff-clean", "--watch", "--watch-timeout", "240"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert oneoff.returncode == 0, oneoff.stdout[-2000:] + oneoff.stderr[-2000:]
        run = requests.post(urls["prefect"] + "/api/flow_runs/filter", json={
            "flow_runs": {"name": {"any_": ["oneoff-clean"]}}}, timeout=5).json()[0]
        assert run["state"]["type"] == "COMPLETED" and run["parameters"]["only"] == ["clean"]
        tagged = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{run['id']}'")
        assert tagged and tagged[0].data.tags["jielong.stages"] == "clean"
        assert tagged[0].data.params["clean.gopher_quality.min_words"] == "3"
    finally:
        try:
            if scheduler is not None and scheduler.poll() is None:
                os.killpg(scheduler.pid, signal.SIGTERM)
                try:
                    scheduler.wait(timeout=20)
                except subprocess.TimeoutExpired:  # serve may wait for a run in progress
                    os.killpg(scheduler.pid, signal.SIGKILL)
                    scheduler.wait()
        finally:
            stop_servers(servers)


@pytest.mark.slow
def test_server_command_stops_both_servers_on_sigterm(tmp_path: Path):
    ports = [free_port(), free_port()]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jielong.flows.cli", "server", "--prefect-port", str(ports[0]), "--mlflow-port", str(ports[1]),
         "--set", f"workspace={tmp_path / 'ws'}"], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while "stops both servers" not in (tmp_path / "server.log").read_text() and time.time() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        urls = [f"http://127.0.0.1:{ports[0]}/api/health", f"http://127.0.0.1:{ports[1]}/health"]
        assert all(requests.get(url, timeout=5).ok for url in urls)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        for url in urls:
            try:
                requests.get(url, timeout=2)
            except requests.ConnectionError:
                continue
            raise AssertionError(f"{url} still answers after SIGTERM")
    finally:
        log.close()
        if server.poll() is None:
            server.terminate()  # its handler stops the servers, which run in their own sessions
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


# ---------------------------------------------------------------- without servers (fast)


def test_a_server_that_exits_or_never_answers_is_a_message_and_is_stopped(monkeypatch):
    from jielong.flows import operate
    from jielong.tasks.config import UserError

    exits = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"], start_new_session=True)
    with pytest.raises(UserError, match="^prefect exited with code 3 while starting$"):
        operate._wait(f"http://127.0.0.1:{free_port()}/api/health", exits, "prefect")

    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    url = f"http://127.0.0.1:{free_port()}/health"
    try:
        with pytest.raises(UserError, match=f"^mlflow did not answer at {url} within 1 s$"):
            operate._wait(url, silent, "mlflow", timeout=1)
    finally:
        started = time.time()
        operate.stop_servers([("mlflow", silent, url), ("prefect", exits, url)])  # one already gone: no error
    assert silent.poll() is not None and time.time() - started < 10, "stopped by SIGTERM to its process group"


def test_scheduling_mistakes_are_messages_before_anything_is_served(tmp_path: Path, monkeypatch):
    from jielong.flows.operate import serve_schedule
    from jielong.tasks.config import UserError

    overrides = [f"workspace={tmp_path}"]
    with pytest.raises(UserError, match="give --cron '0 3 \\* \\* \\*' or --interval SECONDS"):
        serve_schedule("tiny", overrides, cron=None, interval=None, name=None)
    with pytest.raises(UserError, match="unknown stage 'dedupe'"):
        serve_schedule("tiny", overrides, cron=None, interval=60, name=None, only=["dedupe"])
    # no API configured anywhere (the suite's own Prefect server is in the global settings of later tests)
    import prefect.settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    no_api = SimpleNamespace(api=SimpleNamespace(url=None))
    monkeypatch.setattr(prefect.settings, "get_current_settings", lambda: no_api)
    with pytest.raises(UserError, match="scheduling needs a Prefect server: run `jielong server`"):
        serve_schedule("tiny", overrides, cron="0 3 * * *", interval=None, name=None)
