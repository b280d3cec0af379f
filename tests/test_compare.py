"""`jielong compare` (tasks/lib/compare.py) on pipeline runs written here straight into a local MLflow
store: the table holds the settings that differ and the key metrics, the curves come from the run that
produced the pretrain artifact (through cache hits), and the comparison is logged as a run of its own.
test_pipeline.py compares two real runs (slow)."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from jielong.tasks.config import UserError, load_config
from jielong.tasks.core.tracking import Tracker
from jielong.tasks.lib.compare import compare, stage_run


def pipeline_run(client: MlflowClient, experiment: str, threshold: str, documents: int, sweep: dict[int, float],
                 pretrain_from: str | None = None) -> tuple[str, str]:
    """A finished parent run as `jielong run` leaves it, with a pretrain child run (or a cache hit pointing
    at `pretrain_from`); returns (parent id, the id of the run whose curves are the pretrain's)."""
    parent = client.create_run(experiment, run_name="pipeline-tiny", tags={"jielong.config_hash": "h" + threshold})
    pid = parent.info.run_id
    client.log_batch(pid, params=[Param("dedup.near.threshold", threshold), Param("seed", "1234")], metrics=[
        Metric("dedup/documents_out", documents, 0, 0),
        *(Metric(f"eval_pretrain/knnlm_sweep/{pct}pct/perplexity", value, 0, 0) for pct, value in sweep.items())])
    tags = {"mlflow.parentRunId": pid, "jielong.stage": "pretrain"}
    if pretrain_from:
        tags["jielong.source_run_id"] = pretrain_from
    child = client.create_run(experiment, run_name="pretrain", tags=tags).info.run_id
    if not pretrain_from:
        client.log_batch(child, metrics=[Metric("pretrain/loss", 6.0 - step / 10, 0, step) for step in (1, 2, 3)])
    client.set_terminated(child)
    client.set_terminated(pid)
    time.sleep(0.01)  # distinct start times: runs are ordered by them
    return pid, pretrain_from or child


def test_compare_puts_runs_side_by_side_and_logs_the_comparison(tmp_path: Path):
    cfg = load_config("tiny", [f"workspace={tmp_path}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    with pytest.raises(UserError, match="no pipeline runs in MLflow experiment 'jielong'"):
        compare(cfg, [], last=2)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jielong").experiment_id
    first, curves = pipeline_run(client, experiment, "0.8", 100, {50: 30.0, 100: 25.0})
    unfinished = client.create_run(experiment, run_name="pipeline-tiny", tags={"jielong.config_hash": "x"}).info.run_id
    second, _ = pipeline_run(client, experiment, "0.7", 90, {50: 31.0, 100: 26.0}, pretrain_from=curves)

    outcome = compare(cfg, [], last=2)
    table = outcome["table"]
    assert list(table["run"]) == [f"pipeline-tiny {first[:8]}", f"pipeline-tiny {second[:8]}"], "the last two finished, oldest first"
    assert list(table["dedup.near.threshold"]) == ["0.8", "0.7"] and "seed" not in table, "only the settings that differ"
    assert list(table["dedup/documents_out"]) == [100, 90] and "eval_pretrain/perplexity" not in table
    assert {p.name for p in outcome["files"]} == {"compare.csv", "compare.md", "training_curves.png", "knnlm_sweep.png"}
    csv = next(p for p in outcome["files"] if p.name == "compare.csv")
    assert pd.read_csv(csv, dtype=str)["dedup.near.threshold"].tolist() == ["0.8", "0.7"]
    markdown = next(p for p in outcome["files"] if p.name == "compare.md").read_text().splitlines()
    assert [c.strip() for c in markdown[0].split("|")[1:-1]] == ["run", "started", "dedup.near.threshold", "dedup/documents_out"]
    assert len(markdown) == 4, "a header, its rule and a row per run"
    logged = client.get_run(outcome["run_id"])
    assert logged.info.run_name == "compare" and logged.data.tags["jielong.compared_runs"] == f"{first},{second}"
    assert {a.path for a in client.list_artifacts(outcome["run_id"])} == {p.name for p in outcome["files"]}

    tracker = Tracker(cfg)  # the curves of a cache hit are those of the run that trained the model
    assert stage_run(tracker, client.get_run(second), "pretrain").info.run_id == curves
    assert stage_run(tracker, client.get_run(second), "instruct") is None

    chosen = compare(cfg, [second], last=2)["table"]
    assert list(chosen["run"]) == [f"pipeline-tiny {second[:8]}"] and unfinished not in set(chosen["run"])
