"""`jielong ui` (flows/ui.py): the MLflow UI of the workspace on 127.0.0.1, its runs table's URL printed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import free_port
from jielong.flows.ui import port_free, runs_url
from jielong.tasks.core.run_labels import EXPERIMENT_KIND_TAG, MODEL_TRAINING


def test_the_runs_url_opens_the_pipeline_runs_in_model_training_mode():
    assert runs_url("http://127.0.0.1:5000", "1", only_pipeline=False) == \
        "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
    assert runs_url("http://127.0.0.1:5000/", "7") == ("http://127.0.0.1:5000/#/experiments/7/runs?workflowType="
                                                       "machine_learning&searchFilter=tags.%60jielong.kind%60%20%3D%20%27pipeline%27")


@pytest.mark.slow
def test_ui_serves_the_workspace_on_loopback_and_prints_the_runs_url(tmp_path: Path):
    port = free_port()
    command = [sys.executable, "-m", "jielong.flows.cli", "ui", "--no-open", "--port", str(port),
               "--set", f"workspace={tmp_path}"]
    ui = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "COLUMNS": "300"})
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
            line = ui.stdout.readline()
            if not line:
                break
            lines.append(line)
        printed = "".join(lines)
        assert "Ctrl-C" in printed, printed + ui.stderr.read() if ui.poll() is not None else printed
        url = re.search(r"runs +(\S+)", printed).group(1)
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/") and "/runs?workflowType=machine_learning" in url
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=10).ok
        experiment = url.split("/#/experiments/")[1].split("/")[0]
        answer = requests.get(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get",
                              params={"experiment_id": experiment}, timeout=10).json()
        tags = {t["key"]: t["value"] for t in answer["experiment"].get("tags", [])}
        assert answer["experiment"]["name"] == "jielong" and tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
        assert (tmp_path / "mlflow.db").is_file(), "the workspace's own store"
        assert not port_free(port)
    finally:
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=60)
    deadline = time.monotonic() + 30
    while not port_free(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert port_free(port), "stopping jielong ui stops the server it started"
