"""Shared fixtures: one Prefect test server for the whole session, temporary workspaces."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


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
    from tasks.contract import compute_artifact

    inputs = inputs or {}
    key = stage.key(cfg, {name: art.key for name, art in inputs.items()})
    return compute_artifact(stage, cfg, key, inputs)


def run_chain(cfg, until: str):
    """Run the pipeline's stages in order up to and including `until`, without Prefect; {name: artifact}."""
    from flows.pipeline import STAGES

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


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
