"""Shared fixtures: one Prefect test server for the whole session, temporary workspaces."""

from __future__ import annotations

import faulthandler
import gzip
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# OpenMP threads (torch's and faiss's libgomp) that wait for work sleep instead of spinning: with the
# suite's own subprocesses (servers, workers) or anything else on a 2-core machine, spinning threads
# hold the cores the others need, and the fast tier took 3-6 minutes instead of about one (measured
# under load). It changes how idle threads wait, never how many there are or what they compute.
# Set here, before anything imports torch; inherited by the processes the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# commands the tests run without a Prefect API start jielong's background one in PREFECT_HOME: a home of
# the suite's own, so the suite neither uses nor stops a user's, and stops its own at the end
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="jielong-tests-prefect-")


def pytest_unconfigure(config):
    """After the summary, the interpreter's exit waits for non-daemon threads (Prefect's log and event
    workers among them): should one never end, print every stack after 2 minutes and exit."""
    faulthandler.dump_traceback_later(120, exit=True, file=sys.__stderr__)


@pytest.fixture(scope="session", autouse=True)
def stop_background_prefect_api():
    yield
    from jielong.flows import prefect_api

    prefect_api.stop()
    shutil.rmtree(os.environ["PREFECT_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A Prefect API server of the session's own, started the way `jielong run` starts its background one.

    Not prefect_test_harness: its teardown waits without a bound for Prefect's log and event workers to
    drain, and one CI run of the suite hung there. Here every wait is bounded."""
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from jielong.flows import prefect_api

    state = prefect_api.launch(tmp_path_factory.mktemp("prefect-api"))
    try:
        with temporary_settings(updates={PREFECT_API_URL: state["url"]}):
            with _temporary_global_settings_context(get_settings_context()):
                yield state["url"]
                _drain_prefect_workers(timeout=30)
    finally:
        prefect_api.stop_pid(state["pid"])


def _drain_prefect_workers(timeout: float) -> None:
    """Send the logs and events still queued in this process, waiting at most `timeout` seconds for each."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    return path


FAST_TRAINING = [
    "tokenizer.vocab_size=512", "model.context_length=64",
    "pretrain.steps=6", "pretrain.batch_size=4", "pretrain.eval_every=3", "pretrain.eval_batches=2",
    "pretrain.checkpoint_every=3", "pretrain.log_every=2", "pretrain.warmup_steps=2",
    "instruct.steps=4", "instruct.batch_size=4", "instruct.eval_every=2", "instruct.eval_batches=2",
    "instruct.checkpoint_every=2", "instruct.log_every=2", "instruct.warmup_steps=1",
    "instruct.generations=2", "instruct.max_new_tokens=8", "instruct.max_length=64",
    "evaluate.icl.shots=[0, 1]", "evaluate.icl.num_seeds=1", "evaluate.icl.max_examples=6",
    "evaluate.knnlm.k=8", "evaluate.knnlm.sweep=[0.5, 1.0]", "evaluate.knnlm.max_train_tokens=5000",
    "evaluate.knnlm.tune_max_tokens=2000",
]


def small_overrides(workspace: Path, *extra: str) -> list[str]:
    """A fast config: 25 stdlib modules of the built-in corpus, thread runner, local MLflow store,
    a few training steps of the tiny model on 64-token contexts."""
    return [
        f"workspace={workspace}",
        "ingest.sources=[{kind: builtin, limit: 25}]",
        "runner.kind=thread",
        f"mlflow.tracking_uri=sqlite:///{workspace / 'mlflow.db'}",
        *FAST_TRAINING,
        *extra,
    ]


def run_direct(stage, cfg, inputs=None):
    """Run one stage without Prefect or MLflow (shard jobs in a plain loop); returns (artifact, result)."""
    from jielong.tasks.core.contract import compute_artifact

    inputs = inputs or {}
    key = stage.key(cfg, {name: art.key for name, art in inputs.items()})
    return compute_artifact(stage, cfg, key, inputs)


def run_chain(cfg, until: str):
    """Run the pipeline's stages in order up to and including `until`, without Prefect; {name: artifact}."""
    from jielong.flows.stages import STAGES

    artifacts = {}
    for stage in STAGES:
        artifacts[stage.name], _ = run_direct(stage, cfg, {n: artifacts[n] for n in stage.inputs})
        if stage.name == until:
            return artifacts
    raise ValueError(until)


def read_group(artifact, group):
    import pandas as pd

    files = artifact.files(group)
    if not files:
        return pd.DataFrame(columns=["id", "text", "source", "reason", "detail", "related_id"])
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def assert_written_rows_match(path: Path) -> dict:
    """A data stage's manifest counts agree with the rows actually written to its Parquet shards
    (compute_artifact checks the counts add up; this checks they describe the files). Returns it."""
    import pyarrow.parquet as pq

    manifest = json.loads((path / "manifest.json").read_text())
    counts = manifest["counts"]

    def rows(group: str) -> int:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in (path / group).glob("*.parquet"))

    assert sum(rows(g) for g in manifest["details"]["data_groups"]) == counts["documents_out"]
    assert rows("rejected") == counts["documents_rejected"] == sum(counts["rejected_by_reason"].values())
    return manifest


def make_hostile_folder(folder: Path) -> Path:
    """Inputs a data pipeline meets in the wild; test_ingest says how each must be counted."""
    folder.mkdir(parents=True)
    (folder / "good.txt").write_text("A perfectly good plain text document about parsers.\nSecond line.\n")
    (folder / "records.jsonl").write_text(
        "\n".join(
            [
                json.dumps({"text": "first good record"}),
                '{"text": "broken json',  # malformed
                json.dumps({"title": "no text field here"}),  # missing text
                json.dumps({"text": 42}),  # text of the wrong type
                json.dumps(["not", "an", "object"]),
                json.dumps({"text": "second good record"}),
            ]
        )
        + "\n"
    )
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e, valid words around invalid bytes".encode("latin-1"))
    full = gzip.compress(("\n".join(json.dumps({"text": f"gz record {i}"}) for i in range(200)) + "\n").encode())
    (folder / "truncated.jsonl.gz").write_bytes(full[: len(full) // 2])
    (folder / "image.txt").write_bytes(bytes(range(256)) * 40)  # binary named .txt
    (folder / "empty.txt").write_bytes(b"")
    (folder / "page.html").write_text(
        "<!DOCTYPE html><html><head><title>T</title><style>body{color:red}</style>"
        "<script>var secret = 'SCRIPT_TEXT';</script></head><body><!-- COMMENT_TEXT -->"
        "<p>Fish &amp; chips &lt;3</p><p>Second paragraph.</p></body></html>"
    )
    (folder / "long.txt").write_text("word " * 300_000)  # a single 1.5 MB line
    return folder


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
