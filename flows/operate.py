"""Operating jielong: local servers and scheduled pipeline runs.

    jielong server      Prefect server + MLflow tracking server on 127.0.0.1, stopped with Ctrl-C
    jielong schedule    a Prefect deployment of the pipeline (cron or interval), served by this process
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from jielong.tasks.config import PipelineConfig, UserError


def _answers(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _wait(url: str, process: subprocess.Popen, name: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise UserError(f"{name} exited with code {process.returncode} while starting")
        if _answers(url):
            return
        time.sleep(0.5)
    raise UserError(f"{name} did not answer at {url} within {timeout:.0f} s")


def start_servers(cfg: PipelineConfig, prefect_port: int | None, mlflow_port: int | None) -> list[tuple[str, subprocess.Popen, str]]:
    """Start the servers given a port (both, normally) on loopback and wait until each answers;
    returns (name, process, url)."""
    bin_dir = Path(sys.executable).parent
    workspace = cfg.workspace_path()
    workspace.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    env.setdefault("PREFECT_HOME", str(workspace / "prefect"))  # the server's database, as MLflow's, in the workspace
    # MLflow's job runner (GenAI scorers, trace roll-ups; unused here) would add ~10 processes and GBs of RSS
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports leave the machine
    specs = [
        ("prefect", [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
         f"http://127.0.0.1:{prefect_port}", "/api/health"),
        ("mlflow", [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{workspace / 'mlflow.db'}",
                    "--default-artifact-root", (workspace / "mlartifacts").as_uri()],
         f"http://127.0.0.1:{mlflow_port}", "/health"),
    ]
    ports = {"prefect": prefect_port, "mlflow": mlflow_port}
    started = []
    try:
        for name, command, url, health in specs:
            if ports[name] is None:
                continue
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       start_new_session=True)
            started.append((name, process, url))
            _wait(url + health, process, name)
    except BaseException:
        stop_servers(started)
        raise
    return started


def stop_servers(started: list[tuple[str, subprocess.Popen, str]]) -> None:
    for _, process, _ in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for _, process, _ in started:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def serve_schedule(config: str, overrides: list[str], cron: str | None, interval: float | None, name: str | None,
                   only: list[str] | None = None) -> None:
    """Register (and serve, until interrupted) a deployment whose runs are the pipeline with these parameters."""
    from prefect.settings import get_current_settings

    from jielong.flows.pipeline import pipeline
    from jielong.flows.stages import select_stages
    from jielong.flows.task_runners import check_runner, make_task_runner
    from jielong.tasks.config import load_config

    cfg = load_config(config, overrides)
    select_stages(only)
    if not (cron or interval):
        raise UserError("give --cron '0 3 * * *' or --interval SECONDS")
    if not (os.environ.get("PREFECT_API_URL") or get_current_settings().api.url):
        raise UserError("scheduling needs a Prefect server: run `jielong server` and export the PREFECT_API_URL it prints")
    check_runner(cfg)
    flow = pipeline.with_options(task_runner=make_task_runner(cfg))
    flow.serve(
        name=name or f"jielong-{cfg.name}",
        cron=cron,
        interval=interval,
        parameters={"config": config, "overrides": overrides, "only": only},
        description=f"jielong pipeline, config {config!r}, overrides {overrides}",
    )
