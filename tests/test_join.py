"""`jielong join` (flows/join.py), the other nodes' share of a multi-node training stage, without torchrun:
which stages it joins, that it waits for the stage's job and hands torchrun the stage's own rendezvous,
that a stage already trained needs no join, and that a worker's failure is one message. The real
rendezvous of two nodes on loopback is test_distributed.py's (slow)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from jielong.flows import join as join_module
from jielong.flows.stages import stage_keys
from jielong.models import distributed
from jielong.tasks.config import UserError, load_config
from jielong.tasks.lib.training import job_dir, rdzv_id

TWO_NODES = ["pretrain.distributed=ddp", "pretrain.nnodes=2", "pretrain.nproc=1", "pretrain.rdzv_endpoint=127.0.0.1:29999"]


@pytest.fixture
def torchrun_calls(monkeypatch) -> list:
    calls = []
    def run_torchrun(job: Path, *args, **kwargs):
        assert job.is_file(), "torchrun started before the stage wrote its job"
        calls.append(((job, *args), kwargs))

    monkeypatch.setattr(distributed, "run_torchrun", run_torchrun)
    return calls


def test_a_config_without_a_multi_node_stage_has_nothing_to_join(tmp_path: Path, torchrun_calls):
    with pytest.raises(UserError, match="nothing to join: no training stage of this config has nnodes > 1"):
        join_module.join(load_config("tiny", [f"workspace={tmp_path}", "pretrain.distributed=ddp", "pretrain.nproc=2"]), print)
    assert not torchrun_calls


def test_join_waits_for_the_job_then_runs_this_node_s_workers_in_the_stage_s_rendezvous(tmp_path: Path, torchrun_calls):
    cfg = load_config("tiny", [f"workspace={tmp_path}", *TWO_NODES])
    key = stage_keys(cfg)["pretrain"]
    job = job_dir(tmp_path, "pretrain", key) / "job.json"
    said: list[str] = []

    def write_job_later():
        while not any("waiting for its job" in line for line in said):
            threading.Event().wait(0.01)
        job.parent.mkdir(parents=True)
        job.write_text("{}")

    writer = threading.Thread(target=write_job_later)
    writer.start()
    join_module.join(cfg, said.append, poll_seconds=0.01)
    writer.join()
    assert said[0] == f"pretrain ({key[:8]}): waiting for its job at {job}"
    assert said[-1] == "pretrain: this node's workers are done"
    [(args, kwargs)] = torchrun_calls
    assert args == (job, 1, 2, "127.0.0.1:29999", rdzv_id("pretrain", key))
    assert kwargs["log_name"].startswith("workers-") and kwargs["log_name"] != "workers.log", "a log of this node's own"


def test_a_stage_already_trained_is_not_joined(tmp_path: Path, torchrun_calls):
    cfg = load_config("tiny", [f"workspace={tmp_path}", *TWO_NODES])
    key = stage_keys(cfg)["pretrain"]
    published = tmp_path / "pretrain" / key
    published.mkdir(parents=True)
    (published / "manifest.json").write_text(json.dumps({"complete": True, "key": key}))
    said: list[str] = []
    join_module.join(cfg, said.append, poll_seconds=0.01)
    assert said[-1] == "pretrain: already trained" and not torchrun_calls


def test_a_failed_worker_is_one_message_naming_the_stage(tmp_path: Path, monkeypatch):
    def fail(*args, **kwargs):
        raise distributed.WorkersFailed("rank 1 of 2: SafetensorError: broken (see workers.log)")

    monkeypatch.setattr(distributed, "run_torchrun", fail)
    cfg = load_config("tiny", [f"workspace={tmp_path}", *TWO_NODES])
    job = job_dir(tmp_path, "pretrain", stage_keys(cfg)["pretrain"]) / "job.json"
    job.parent.mkdir(parents=True)
    job.write_text("{}")
    with pytest.raises(UserError, match=r"^pretrain: rank 1 of 2: SafetensorError: broken \(see workers.log\)$"):
        join_module.join(cfg, print)
