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
                 pretrain_from: str | None = None, complete: bool = True) -> tuple[str, str]:
    """A finished parent run as `jielong run` leaves it, with a pretrain child run (or a cache hit pointing
    at `pretrain_from`); returns (parent id, the id of the run whose curves are the pretrain's)."""
    parent = client.create_run(experiment, run_name="pipeline-tiny", tags={
        "jielong.config_hash": "h" + threshold, "jielong.kind": "pipeline", "jielong.complete": str(complete).lower()})
    pid = parent.info.run_id
    client.log_batch(pid, params=[Param("dedup.near.threshold", threshold), Param("seed", "1234"),
                                  Param("jielong.overrides", f'["dedup.threshold={threshold}"]')], metrics=[
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
    with pytest.raises(UserError, match=r"no complete pipeline runs \(--include-partial takes the others too\) in MLflow experiment 'jielong'"):
        compare(cfg, [], last=2)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jielong").experiment_id
    first, curves = pipeline_run(client, experiment, "0.8", 100, {50: 30.0, 100: 25.0})
    unfinished = client.create_run(experiment, run_name="pipeline-tiny", tags={"jielong.config_hash": "x"}).info.run_id
    second, _ = pipeline_run(client, experiment, "0.7", 90, {50: 31.0, 100: 26.0}, pretrain_from=curves)
    partial, _ = pipeline_run(client, experiment, "0.6", 80, {}, pretrain_from=curves, complete=False)
    other = client.create_run(experiment, run_name="compare", tags={"jielong.kind": "compare"}).info.run_id
    client.set_terminated(other)

    outcome = compare(cfg, [], last=2)
    table = outcome["table"]
    assert list(table["run"]) == [f"pipeline-tiny {first[:8]}", f"pipeline-tiny {second[:8]}"], \
        "the last two complete, finished pipeline runs, oldest first (not the partial or the compare run)"
    assert list(table["dedup.near.threshold"]) == ["0.8", "0.7"] and "seed" not in table, "only the settings that differ"
    assert "jielong.overrides" not in table, "the run names show the overrides"
    assert list(table["dedup/documents_out"]) == [100, 90] and "eval_pretrain/perplexity" not in table
    assert {p.name for p in outcome["files"]} == {"compare.csv", "compare.md", "training_curves.png", "knnlm_sweep.png"}
    csv = next(p for p in outcome["files"] if p.name == "compare.csv")
    assert pd.read_csv(csv, dtype=str)["dedup.near.threshold"].tolist() == ["0.8", "0.7"]
    markdown = next(p for p in outcome["files"] if p.name == "compare.md").read_text().splitlines()
    assert [c.strip() for c in markdown[0].split("|")[1:-1]] == ["run", "dedup.near.threshold", "dedup/documents_out", "started"], \
        "settings that differ first"
    assert len(markdown) == 4, "a header, its rule and a row per run"
    logged = client.get_run(outcome["run_id"])
    assert logged.info.run_name == "compare" and logged.data.tags["jielong.compared_runs"] == f"{first},{second}"
    assert {a.path for a in client.list_artifacts(outcome["run_id"])} == {p.name for p in outcome["files"]}

    tracker = Tracker(cfg)  # the curves of a cache hit are those of the run that trained the model
    assert stage_run(tracker, client.get_run(second), "pretrain").info.run_id == curves
    assert stage_run(tracker, client.get_run(second), "instruct") is None

    chosen = compare(cfg, [second], last=2)["table"]
    assert list(chosen["run"]) == [f"pipeline-tiny {second[:8]}"] and unfinished not in set(chosen["run"])
    assert client.get_run(outcome["run_id"]).data.tags["jielong.kind"] == "compare"

    with_partial = compare(cfg, [], last=2, include_partial=True)
    assert list(with_partial["table"]["run"]) == [f"pipeline-tiny {second[:8]}", f"pipeline-tiny {partial[:8]}"]
    with pytest.raises(UserError, match="no MLflow run 'nope'"):
        compare(cfg, ["nope"], last=2)


def test_a_setting_one_run_lacks_is_absent_and_a_plot_without_data_is_left_out(tmp_path: Path, recwarn):
    """Compared by id: a param only one run has shows as absent (not None or nan), in the table and its
    Markdown; plots with nothing to draw are not written, with a line saying why, and no warning."""
    cfg = load_config("tiny", [f"workspace={tmp_path}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    Tracker(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jielong").experiment_id
    runs = []
    for params in ([Param("seed", "1")], [Param("seed", "2"), Param("pretrain.lr", "0.01")]):
        run_id = client.create_run(experiment, run_name="pipeline-tiny", tags={"jielong.kind": "pipeline"}).info.run_id
        client.log_batch(run_id, params=params, metrics=[Metric("dedup/documents_out", 5, 0, 0)])
        client.set_terminated(run_id)
        runs.append(run_id)
    outcome = compare(cfg, runs, last=2)
    assert list(outcome["table"]["pretrain.lr"]) == ["—", "0.01"]
    assert [p.name for p in outcome["files"]] == ["compare.csv", "compare.md"]
    assert outcome["left_out"] == [
        "training_curves.png left out: no compared run has pretraining curves (none ran or cached the pretrain stage)",
        "knnlm_sweep.png left out: no compared run has a kNN-LM datastore sweep (evaluate.knnlm.sweep, eval_pretrain)"]
    markdown = next(p for p in outcome["files"] if p.name == "compare.md").read_text()
    assert "—" in markdown and "nan" not in markdown and "None" not in markdown
    assert not [w for w in recwarn if "matplotlib" in str(w.filename) or "artists" in str(w.message)]


@pytest.mark.slow
def test_compare_last_takes_complete_runs_and_shows_the_setting_that_differs_first(prefect_server, workspace: Path):
    """Two pipeline runs differing in one setting, then an all-cached partial rerun: `jielong compare --last 2`
    compares the two complete runs, and the first row after the run names is that setting."""
    import json
    import os
    import subprocess
    import sys

    from conftest import small_overrides
    from jielong.flows.entry_points import run_pipeline

    run_pipeline("tiny", small_overrides(workspace))
    run_pipeline("tiny", small_overrides(workspace, "evaluate.knnlm.k=4"))
    rerun = run_pipeline("tiny", small_overrides(workspace, "evaluate.knnlm.k=4"), only=["ingest", "clean", "dedup"])
    assert {s["status"] for s in rerun} == {"cached"}

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jielong").experiment_id
    parents = [r for r in client.search_runs([experiment], order_by=["attributes.start_time ASC"])
               if "mlflow.parentRunId" not in r.data.tags]
    assert [r.data.tags["jielong.complete"] for r in parents] == ["true", "true", "false"]
    assert [r.info.run_name.rsplit(" · ", 1)[1] for r in parents] == ["all stages", "all stages", "only ingest,clean,dedup"]
    assert json.loads(parents[1].data.params["jielong.overrides"])[-1] == "evaluate.knnlm.k=4"
    assert parents[2].data.tags["mlflow.note.content"].endswith("evaluate.knnlm.k=4 --only ingest,clean,dedup`"), \
        "its description: the command that reruns it"
    assert {d.dataset.name for d in parents[0].inputs.dataset_inputs} >= {"dedup-train", "tokenize-train"}, \
        "the runs table's Dataset column: the data the run's stages consumed"

    args = [f"--set={o}" for o in small_overrides(workspace)]
    env = {**os.environ, "COLUMNS": "400"}
    shown = subprocess.run([sys.executable, "-m", "jielong.flows.cli", "compare", "--last", "2", *args],
                           capture_output=True, text=True, env=env, timeout=300)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    first_row = next(line for line in lines if line.startswith("│"))  # the header's lines start with ┃
    assert first_row.split("│")[1].strip() == "evaluate.knnlm.k", shown.stdout
    header = "".join(line for line in lines if line.startswith("┃"))
    assert parents[0].info.run_id[:8] in header and parents[1].info.run_id[:8] in header
    assert parents[2].info.run_id[:8] not in shown.stdout
    assert "Warning" not in shown.stderr and "No artists" not in shown.stderr

    # `jielong models` lists what the runs registered (the second run's models were cache hits: not registered again)
    listed = subprocess.run([sys.executable, "-m", "jielong.flows.cli", "models", *args], capture_output=True,
                            text=True, env=env, timeout=300)
    assert listed.returncode == 0, listed.stderr
    rows = [line for line in listed.stdout.splitlines() if "models:/" in line]
    assert [line.split("│")[1].strip() for line in rows] == ["models:/jielong-instruct/1", "models:/jielong-pretrain/1"]
    assert "tokenize-train" in listed.stdout and "dedup-train" in listed.stdout, "the data each model trained on"
