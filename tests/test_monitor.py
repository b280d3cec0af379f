"""`jielong monitor` (flows/monitor.py, tasks/lib/deploy/monitor.py): the monitor flow run directly against a
loopback OpenAI-style server of the tiny model: healthy looks complete; after the server is swapped for
another model or stopped, the flow run is Failed naming the figure; the figures are one MLflow run's history."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jielong.flows import monitor as monitor_module
from jielong.flows.monitor import monitor
from jielong.tasks.core.schema import UserError
from jielong.tasks.lib.deploy.monitor import Thresholds, crossed, thresholds_from

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import ModelServer  # noqa: E402
from test_deploy import models, settings  # noqa: E402,F401  (a pytest fixture, and the workspace settings)


def look(server: ModelServer, models: dict, tmp_path: Path):
    return monitor(server.url, str(models["tiny"]), "openai", overrides=settings(tmp_path), max_new_tokens=8,
                   concurrency=2, return_state=True)


@pytest.mark.slow
def test_healthy_runs_complete_then_a_swap_and_a_stop_fail_naming_the_figure(prefect_server, models, tmp_path):
    from mlflow import MlflowClient

    server = ModelServer(models["tiny"])
    try:
        healthy = look(server, models, tmp_path)
        assert healthy.is_completed(), healthy.message
        figures = healthy.result()
        assert figures["error_rate"] == 0 and figures["changed_share"] == 0
        assert figures["perplexity_ratio"] == pytest.approx(1.0) and figures["latency_p95_s"] > 0
        server.swap(models["other"])
        swapped = look(server, models, tmp_path)
        assert swapped.is_failed() and "changed_share 1.000 > 0.25 (max_changed_share)" in swapped.message
    finally:
        server.stop()
    stopped = look(server, models, tmp_path)
    assert stopped.is_failed() and "error_rate 1.000 > 0.1 (max_error_rate)" in stopped.message

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = figures["run_id"]
    history = {name: [(m.step, m.value) for m in client.get_metric_history(run_id, f"monitor/{name}")]
               for name in ("error_rate", "changed_share", "thresholds_crossed", "perplexity_ratio")}
    assert history["error_rate"] == [(0, 0.0), (1, 0.0), (2, 1.0)]
    assert history["changed_share"] == [(0, 0.0), (1, 1.0)]  # nothing answered at step 2: not measured
    assert [v > 0 for _, v in history["thresholds_crossed"]] == [False, True, True]
    assert history["perplexity_ratio"][1][1] > 2  # another model's answers are unlikely under the reference
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["jielong.monitor.last"].startswith("error_rate")


def test_thresholds_cross_only_when_exceeded_and_unmeasured_figures_are_not_compared():
    limits = Thresholds()
    calm = {"error_rate": 0.1, "latency_p95_s": 10.0, "changed_share": 0.25, "perplexity_ratio": 2.0}
    assert crossed(calm, limits) == []
    assert crossed({**calm, "latency_p95_s": 12.5}, limits) == ["latency_p95_s 12.500 > 10 (max_latency_p95_s)"]
    assert crossed({**calm, "changed_share": float("nan")}, Thresholds(max_changed_share=0)) == []
    with pytest.raises(UserError, match="max_error_rate"):
        thresholds_from({"max_error_rate": 2})


@pytest.mark.slow
def test_monitor_registers_an_interval_deployment_with_the_endpoints_kind(prefect_server, models, tmp_path, monkeypatch):
    served = {}
    monkeypatch.setattr(monitor_module.monitor, "serve", lambda **kwargs: served.update(kwargs))
    server = ModelServer(models["tiny"])
    try:
        monitor_module.serve_monitor(server.url, str(models["tiny"]), 30, None, "tiny", settings(tmp_path), None,
                                     {"max_changed_share": 0.5})
    finally:
        server.stop()
    assert served["interval"] == 30 and served["name"] == "jielong-monitor-tiny" and served["limit"] == 1
    assert served["parameters"]["api"] == "openai" and served["parameters"]["thresholds"] == {"max_changed_share": 0.5}
    with pytest.raises(UserError, match="cannot reach"):  # the server is gone: registering it is refused
        monitor_module.serve_monitor(server.url, str(models["tiny"]), 30, None, "tiny", settings(tmp_path), None, {})
    with pytest.raises(UserError, match="--interval"):
        monitor_module.serve_monitor(server.url, str(models["tiny"]), 0, None, "tiny", settings(tmp_path), None, {})
