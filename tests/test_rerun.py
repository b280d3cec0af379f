"""The rerun loop: commands share one background Prefect API, `jielong server stop` leaves no server behind,
and commands that run nothing import neither Prefect nor MLflow."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from conftest import small_overrides

ROOT = Path(__file__).resolve().parent.parent


def jielong(*args: str, home: Path, cwd: Path, python_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, *python_args, "-m", "jielong.flows.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def servers_in(home: Path) -> list[int]:
    """Pids of live processes started in `home` (the background API runs there)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == home and (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_commands_reuse_one_prefect_api_and_server_stop_leaves_nothing(tmp_path: Path):
    home, workspace = tmp_path / "prefect", tmp_path / "ws"
    args = [arg for o in small_overrides(workspace, "ingest.sources=[{kind: builtin, limit: 3}]") for arg in ("--set", o)]
    first = jielong("run", "--only", "ingest", *args, home=home, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Started a local Prefect API at" in first.stderr
    state = json.loads((home / "jielong-api.json").read_text())
    assert state["url"].startswith("http://127.0.0.1:")

    second = jielong("run", "--only", "ingest", *args, home=home, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Started a local Prefect API" not in second.stderr
    assert json.loads((home / "jielong-api.json").read_text()) == state
    flow_runs = requests.post(f"{state['url']}/flow_runs/filter", json={}, timeout=10).json()
    assert sorted(r["state"]["type"] for r in flow_runs) == ["COMPLETED", "COMPLETED"], "both runs in the same API"
    assert servers_in(home) == [state["pid"]]
    status = jielong("server", "status", home=home, cwd=tmp_path)
    assert state["url"] in status.stdout

    stop = jielong("server", "stop", home=home, cwd=tmp_path)
    assert stop.returncode == 0 and "stopped the local Prefect API" in stop.stdout
    assert servers_in(home) == []
    try:
        requests.get(f"{state['url']}/health", timeout=2)
        raise AssertionError("the API still answers after `jielong server stop`")
    except requests.ConnectionError:
        pass
    again = jielong("server", "stop", home=home, cwd=tmp_path)
    assert again.returncode == 0 and "no local Prefect API is running" in again.stdout


def imported(result: subprocess.CompletedProcess) -> set[str]:
    """Top-level packages a command imported, from `python -X importtime` (written to stderr)."""
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_commands_that_run_nothing_start_nothing(tmp_path: Path):
    home = tmp_path / "prefect"
    heavy = {"prefect", "mlflow", "torch", "transformers"}
    stages = jielong("stages", "--set", f"workspace={tmp_path / 'ws'}", home=home, cwd=tmp_path, python_args=("-X", "importtime"))
    assert stages.returncode == 0 and "dedup" in stages.stdout
    assert not heavy & imported(stages)
    mistake = jielong("run", "--set", "dedup.near.treshold=0.7", home=home, cwd=tmp_path, python_args=("-X", "importtime"))
    assert mistake.returncode == 2 and "unknown config key" in mistake.stderr
    assert not heavy & imported(mistake)
    helped = jielong("--help", home=home, cwd=tmp_path, python_args=("-X", "importtime"))
    assert helped.returncode == 0 and not heavy & imported(helped)
    assert not home.exists(), "no Prefect API started"


def test_tracker_process_forwards_calls_and_raises_its_errors(workspace: Path):
    import pytest
    from mlflow import MlflowClient

    from conftest import free_port
    from jielong.tasks.config import UserError, load_config
    from jielong.tasks.core.tracking import TrackerProcess

    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    tracker = TrackerProcess(load_config("tiny", [f"workspace={workspace}", f"mlflow.tracking_uri={uri}"]))
    try:
        run_id = tracker.start_run("remote", {"jielong.stage": "x"})
        tracker.log_batch(run_id, {"p": "1"}, {"m": 2.0})
        tracker.log_progress(run_id, [("loss", 1.0, 1), ("loss", 0.5, 2)])
        tracker.flush_progress(run_id)
        tracker.end_run(run_id)
    finally:
        tracker.close()
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["jielong.stage"] == "x"
    assert run.data.params == {"p": "1"} and run.data.metrics["m"] == 2.0
    assert [m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss")] == [1, 2]

    # a call not waited for fails: the next call that waits raises it, and nothing after it is run
    from mlflow.exceptions import MlflowException

    tracker = TrackerProcess(load_config("tiny", [f"workspace={workspace}", f"mlflow.tracking_uri={uri}"]))
    try:
        tracker.log_batch("0" * 32, {"p": "1"}, {})  # no such run
        with pytest.raises(MlflowException):
            tracker.start_run("after the failure", {})
        tracker.log_batch(run_id, {"q": "2"}, {})
    finally:
        assert tracker.close() is None, "the failure was raised once"
    client = MlflowClient(uri)
    assert [r.info.run_name for r in client.search_runs([client.get_experiment_by_name("jielong").experiment_id])] == ["remote"]
    assert "q" not in client.get_run(run_id).data.params, "nothing runs after a failure"

    unreachable = f"http://127.0.0.1:{free_port()}"
    tracker = TrackerProcess(load_config("tiny", [f"workspace={workspace}", f"mlflow.tracking_uri={unreachable}"]))
    try:
        with pytest.raises(UserError, match="not reachable"):
            tracker.start_run("never", {})
    finally:
        tracker.close()
