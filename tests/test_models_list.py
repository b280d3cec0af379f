"""`jielong models` (tasks/lib/registered_models.py) and the closest known names for a --model that names
nothing (models/references.py), on a real sqlite MLflow store. test_compare.py's slow pipeline test lists
what a real run registered."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from jielong.models.references import check_reference, missing_path_message
from jielong.tasks.config import UserError, load_config
from jielong.tasks.core.datasets import DataInput
from jielong.tasks.core.tracking import Tracker
from jielong.tasks.lib.registered_models import registered_models


def registry(tmp_path: Path) -> tuple[Tracker, MlflowClient]:
    """A store holding what `jielong run` registers: a pipeline run with its evaluation numbers and an
    instruct stage run (key, the dataset it trained on, its loss) with two registered versions."""
    cfg = load_config("tiny", [f"workspace={tmp_path}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    tracker = Tracker(cfg)
    client = tracker.client
    parent = tracker.start_run("tiny · all stages", {"jielong.kind": "pipeline"})
    tracker.log_metrics(parent, {"eval_instruct/bits_per_byte": 3.25, "eval_instruct/perplexity": 180.5})
    stage = tracker.start_run("instruct", {"jielong.stage": "instruct", "jielong.key": "3f817a9fae68ac2c"}, parent)
    tracker.log_metrics(stage, {"instruct/heldout_response_loss_after": 2.5})
    train = DataInput("dedup-train", "9d6bc3556e6ebf25", "file:///w/dedup/train", "{}", 424, "train")
    test = DataInput("dedup-test", "9d6bc3556e6ebf25", "file:///w/dedup/test", "{}", 23, "test")
    tracker.log_inputs(stage, [train, test])
    for _ in range(2):
        tracker.register_model("jielong-instruct", stage, "model")
    client.set_registered_model_alias("jielong-instruct", "champion", "1")
    return tracker, client


def test_models_lists_versions_aliases_keys_data_and_headlines(tmp_path: Path):
    tracker, _ = registry(tmp_path)
    rows = registered_models(tracker)
    assert [r["model"] for r in rows] == ["models:/jielong-instruct/2", "models:/jielong-instruct/1"]
    first = rows[1]
    assert first["aliases"] == ["champion"] and rows[0]["aliases"] == []
    assert (first["stage"], first["key"]) == ("instruct", "3f817a9fae68ac2c")
    assert first["data"] == ["dedup-train 9d6bc355"], "the data it trained on, not the test split"
    assert first["headline"] == ["held-out response loss 2.5", "test bits/byte 3.25", "perplexity 180.5"]
    assert registered_models(tracker, "jielong-instruct") == rows
    with pytest.raises(UserError, match=r"no registered model 'jielong-instrct' .*Did you mean: jielong-instruct\?"):
        registered_models(tracker, "jielong-instrct")


def test_a_misspelt_registered_model_gets_the_closest_names(tmp_path: Path):
    tracker, client = registry(tmp_path)
    with pytest.raises(ValueError, match=r"Did you mean: models:/jielong-instruct\? Registered: jielong-instruct\."):
        check_reference("models:/jielong-instrct/1", client)
    with pytest.raises(ValueError, match="has no version 7; versions: 1, 2"):
        check_reference("models:/jielong-instruct/7", client)
    with pytest.raises(ValueError, match="no alias 'champ'. Did you mean: champion?"):
        check_reference("models:/jielong-instruct@champ", client)
    check_reference("models:/jielong-instruct/2", client)
    check_reference("models:/jielong-instruct@champion", client)


def test_a_misspelt_builtin_or_path_gets_the_closest_known(tmp_path: Path):
    with pytest.raises(ValueError, match="Did you mean: smollm2-135m-instruct?"):
        check_reference("builtin:smollm2-135m")
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "not-a-model").mkdir()
    message = missing_path_message(str(tmp_path / "my-modle"))
    assert message.endswith(f"Did you mean: {model}?")
    with pytest.raises(ValueError, match="neither a local model folder"):
        check_reference(str(tmp_path / "not-a-model-at-all"))
    check_reference(str(model))  # it exists: what it holds is checked when it is imported


def test_cli_says_a_misspelt_model_once_without_framework_lines(tmp_path: Path):
    registry(tmp_path)
    env = {**os.environ, "COLUMNS": "80"}
    args = ["--set", f"workspace={tmp_path}", "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    done = subprocess.run([sys.executable, "-m", "jielong.flows.cli", "eval", "--model", "models:/jielong-instrct/1",
                           *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # one line, however long, and nothing from Prefect or MLflow
    assert lines[0].startswith("error: no registered model 'jielong-instrct'") and "models:/jielong-instruct" in lines[0]

    nope = subprocess.run([sys.executable, "-m", "jielong.flows.cli", "eval", "--model", "./nope", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert nope.returncode == 2 and nope.stdout == ""
    assert nope.stderr.count("\n") == 1 and nope.stderr.startswith("error: './nope' is neither"), nope.stderr

    listed = subprocess.run([sys.executable, "-m", "jielong.flows.cli", "models", *args], capture_output=True,
                            text=True, env={**env, "COLUMNS": "200"}, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert "models:/jielong-instruct/1" in listed.stdout and "champion" in listed.stdout
