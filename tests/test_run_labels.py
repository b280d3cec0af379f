"""Runs say what they are (tasks/core/run_labels.py, tasks/core/datasets.py): names, failure tags, the
experiment kind the MLflow UI reads, and the data a stage consumed as MLflow dataset inputs, in a real
sqlite MLflow store. test_compare.py's pipeline test checks the same through whole pipeline runs (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from mlflow import MlflowClient

from conftest import run_direct, small_overrides
from jielong.flows.stages import STAGE_NAMES
from jielong.tasks import clean, ingest
from jielong.tasks.config import load_config
from jielong.tasks.core.datasets import consumed_inputs, data_inputs
from jielong.tasks.core.run_labels import (COMPLETE_TAG, ERROR_TAG, EXPERIMENT_KIND_TAG, MODEL_TRAINING, NOTE_TAG,
                                           command_line, error_text, pipeline_run_name)
from jielong.tasks.core.tracking import Tracker, TrackerProcess


def test_a_pipeline_run_name_says_config_overrides_and_stages():
    assert pipeline_run_name("tiny", [], STAGE_NAMES, STAGE_NAMES) == "tiny · all stages"
    assert pipeline_run_name("tiny", ["dedup.threshold=0.7"], ["dedup"], STAGE_NAMES) == "tiny · dedup.threshold=0.7 · only dedup"
    assert pipeline_run_name("smollm2", [], STAGE_NAMES[1:], STAGE_NAMES) == "smollm2 · from clean"
    assert pipeline_run_name("tiny", [], ["ingest", "dedup"], STAGE_NAMES) == "tiny · only ingest,dedup"
    where = ["workspace=/tmp/x", "mlflow.tracking_uri=sqlite:///x.db", "runner.kind=thread", "seed=3"]
    assert pipeline_run_name("tiny", where, STAGE_NAMES, STAGE_NAMES) == "tiny · seed=3 · all stages", \
        "where a run writes is not what it is"
    many = [f"pretrain.steps={n}" for n in range(20)]
    name = pipeline_run_name("tiny", many, STAGE_NAMES, STAGE_NAMES)
    shown = name.split(" · ")[1]
    assert len(name) < 100 and shown.startswith("pretrain.steps=0 pretrain.steps=1")
    assert shown.endswith(f"(+{20 - len(shown.split(' (+')[0].split())} more)")


def test_a_pipeline_run_describes_the_command_that_reruns_it():
    assert command_line("tiny", [], None, None, None) == "jielong run --config tiny"
    assert command_line("tiny", ["ingest.sources=[{kind: builtin}]"], ["ingest", "dedup"], None, ["dedup"]) == \
        "jielong run --config tiny --set 'ingest.sources=[{kind: builtin}]' --only ingest,dedup --force dedup"
    assert command_line("configs/x.yaml", [], None, "clean", None) == "jielong run --config configs/x.yaml --from clean"


def test_error_text_is_one_readable_line():
    assert error_text(ValueError("bad value")) == "ValueError: bad value"
    assert error_text(KeyboardInterrupt()) == "KeyboardInterrupt"


def test_datasets_of_artifacts_carry_key_source_schema_and_rows(tmp_path: Path):
    cfg = load_config("tiny", small_overrides(tmp_path))
    ingested, _ = run_direct(ingest.STAGE, cfg)
    cleaned, _ = run_direct(clean.STAGE, cfg, {"ingest": ingested})

    (kept,) = data_inputs(cleaned)
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in cleaned.files("kept"))
    assert (kept.name, kept.digest, kept.context, kept.rows) == ("clean-kept", cleaned.key, "kept", rows)
    assert rows == cleaned.manifest["counts"]["documents_out"]
    assert kept.source == (cleaned.path / "kept").as_uri()
    columns = {c["name"]: c["type"] for c in json.loads(kept.schema)["mlflow_colspec"]}
    assert {"id": "string", "text": "string", "source": "string"}.items() <= columns.items()
    assert [d.name for d in consumed_inputs([ingested, cleaned, ingested])] == ["ingest-kept", "clean-kept"]


def test_tracker_tags_the_experiment_logs_inputs_and_failures(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("tiny", small_overrides(tmp_path))
    ingested, _ = run_direct(ingest.STAGE, cfg)
    client = MlflowClient(uri)

    tracker = Tracker(cfg)
    experiment = client.get_experiment(tracker.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING, "the UI opens the experiment on its runs"

    run_id = tracker.start_run("clean", {})
    tracker.log_inputs(run_id, data_inputs(ingested))
    (logged,) = client.get_run(run_id).inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest) == ("ingest-kept", ingested.key)
    assert json.loads(logged.dataset.profile)["num_rows"] == ingested.manifest["counts"]["documents_out"]
    assert {t.key: t.value for t in logged.tags}["mlflow.data.context"] == "kept"

    tracker.mark_failed(run_id, error_text(RuntimeError("the disk is full")))
    failed = client.get_run(run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags[ERROR_TAG] == "RuntimeError: the disk is full"
    assert failed.data.tags[NOTE_TAG] == "Failed: RuntimeError: the disk is full"
    assert failed.data.tags[COMPLETE_TAG] == "false"

    # through the tracking process `jielong run` uses, the error arrives as well
    process = TrackerProcess(cfg)
    other = process.start_run("dedup", {})
    process.mark_failed(other, "UserError: no documents left")
    assert process.close() is None
    assert client.get_run(other).data.tags[ERROR_TAG] == "UserError: no documents left"


def test_an_experiment_made_before_the_tag_gets_it_and_a_chosen_kind_stays(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("jielong", artifact_location=(tmp_path / "mlartifacts").as_uri())
    client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    Tracker(load_config("tiny", small_overrides(tmp_path)))
    assert client.get_experiment_by_name("jielong").tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    Tracker(load_config("tiny", small_overrides(tmp_path, "mlflow.experiment=chosen")))
    assert client.get_experiment_by_name("chosen").tags[EXPERIMENT_KIND_TAG] == "genai_development"
