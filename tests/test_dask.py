"""The data stages on a Dask cluster started outside jielong (a scheduler and two workers, separate
processes on loopback, as `dask scheduler` / `dask worker` start them): the same outputs as the process
runner's, task runs recorded in the flow's Prefect API, relative paths resolved for the workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jielong.flows import dask_runner
from jielong.flows.entry_points import run_pipeline
from jielong.tasks.lib.sources import builtin_corpus
from jielong.tasks.config import UserError

ROOT = Path(__file__).resolve().parent.parent
DATA_STAGES = ["ingest", "clean", "dedup"]
# what may differ between two runs of the same key: when, how long, which tracking runs
VOLATILE = {"created_at", "timings", "mlflow_run_id", "prefect_flow_run_id"}


def write_corpus(folder: Path) -> None:
    """Real text (the pydoc topics of the built-in corpus) as JSON lines with exact and near duplicates,
    and as paragraphs of a text file: both larger than ingest.job_bytes below, so both are split."""
    folder.mkdir()
    topics = [text for _, text, _ in builtin_corpus.topic_documents()]
    records = [{"text": text} for text in topics[:40]]
    records += [{"text": text} for text in topics[:40:5]]  # exact duplicates
    records += [{"text": text + " See also the reference manual."} for text in topics[1:40:5] if len(text) > 2000]
    (folder / "topics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (folder / "topics.txt").write_text("\n\n".join(topics[40:]) + "\n", encoding="utf-8")


def overrides(workspace: str, *extra: str) -> list[str]:
    return [
        f"workspace={workspace}",
        "ingest.sources=[{kind: files, path: corpus, glob: '*.jsonl'}, {kind: files, path: corpus, glob: '*.txt', text_unit: paragraph}]",
        "ingest.job_bytes=100000",
        f"mlflow.tracking_uri=sqlite:///{Path('mlflow.db').absolute()}",  # one store for both runs: one migration
        *extra,
    ]


@pytest.fixture
def dask_cluster(tmp_path: Path):
    """A scheduler and two single-threaded workers on 127.0.0.1, each its own process, started in their
    own directory with their own Prefect home and no Prefect API in their environment. Yields a function
    that waits for both workers and returns a client: they start while the test does other work."""
    home = tmp_path / "cluster"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PREFECT_HOME=str(home / "prefect"))
    scheduler_file = home / "scheduler.json"
    common = ["--no-dashboard", "--host", "127.0.0.1"]
    processes = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", "0",
                                   "--scheduler-file", str(scheduler_file), *common],
                                  cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=open(home / "scheduler.log", "w"))]
    try:
        for n in range(2):
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                 "--no-nanny", "--local-directory", str(home / f"worker-{n}"), *common],
                cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=open(home / f"worker-{n}.log", "w")))
        clients = []

        def connect():
            from distributed import Client

            deadline = time.monotonic() + 60
            while not scheduler_file.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            clients.append(Client(scheduler_file=str(scheduler_file), timeout=30, set_as_default=False))
            clients[-1].wait_for_workers(2, timeout=60)
            return clients[-1]

        yield connect
        for client in clients:
            client.close()
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                process.kill()  # a worker can wait on its scheduler for many seconds: nothing is left to keep
                process.wait()


def comparable(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in VOLATILE}


def rows_by_file(path: Path, manifest: dict) -> dict[str, list[dict]]:
    return {f["path"]: pq.read_table(path / f["path"]).to_pylist() for f in manifest["files"] if f["path"].endswith(".parquet")}


def task_runs_of(flow_run_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200)


def record_temporary_servers(monkeypatch) -> list:
    """The temporary Prefect servers this process starts from now on (Prefect starts one wherever it
    finds no API: seconds of CPU, and runs recorded where nobody looks)."""
    from prefect.server.api.server import SubprocessASGIServer

    started, start = [], SubprocessASGIServer.start

    def recording_start(self, *args, **kwargs):
        started.append(self)
        return start(self, *args, **kwargs)

    monkeypatch.setattr(SubprocessASGIServer, "start", recording_start)
    return started


@pytest.mark.slow
def test_data_stages_on_an_external_dask_cluster_match_the_process_runner(tmp_path: Path, dask_cluster, monkeypatch):
    flow_dir = tmp_path / "flow"
    flow_dir.mkdir()
    write_corpus(flow_dir / "corpus")
    monkeypatch.chdir(flow_dir)  # relative workspace and corpus: the workers run elsewhere
    temporary_servers = record_temporary_servers(monkeypatch)

    by_process = {s["stage"]: s for s in run_pipeline("tiny", overrides("ws-process", "runner.kind=process", "runner.workers=1"),
                                                       only=DATA_STAGES)}
    cluster = dask_cluster()
    address = cluster.scheduler.address
    by_dask = {s["stage"]: s for s in run_pipeline("tiny", overrides("ws-dask", "runner.kind=dask", f"runner.dask_address={address}"),
                                                    only=DATA_STAGES)}

    manifests = {}
    for stage in DATA_STAGES:
        assert by_dask[stage]["status"] == by_process[stage]["status"] == "ran"
        process_path, dask_path = Path(by_process[stage]["path"]), Path(by_dask[stage]["path"])
        assert dask_path.is_relative_to(flow_dir / "ws-dask")
        process_manifest, dask_manifest = (json.loads((p / "manifest.json").read_text()) for p in (process_path, dask_path))
        assert comparable(dask_manifest) == comparable(process_manifest), stage
        assert rows_by_file(dask_path, dask_manifest) == rows_by_file(process_path, process_manifest), stage
        assert (dask_path / "samples" / "kept.jsonl").read_text() == (process_path / "samples" / "kept.jsonl").read_text()
        manifests[stage] = dask_manifest
    ingested = manifests["ingest"]
    kept_files = [f["path"] for f in ingested["files"] if f["path"].startswith("kept/")]
    jobs = {path.split("-")[1] for path in kept_files}
    assert len(jobs) >= 5, "each file was split into several byte ranges"
    assert manifests["dedup"]["counts"]["rejected_by_reason"]["exact_duplicate"] >= 8
    assert manifests["dedup"]["counts"]["rejected_by_reason"].get("near_duplicate", 0) >= 1

    assert not temporary_servers, "the flow process started a temporary Prefect server"
    # every shard task ran on the cluster and was recorded, completed, in the flow's Prefect API
    flow_api = os.environ["PREFECT_API_URL"]
    names = [(run.name.rsplit("-", 1)[0], run.state.type.value) for run in task_runs_of(ingested["prefect_flow_run_id"])]
    shard_runs = {name: sum(1 for n, _ in names if n == name) for name in ("ingest.process", "clean.process", "dedup.signatures", "dedup.write_shard")}
    cleaned_files = [f["path"] for f in manifests["clean"]["files"] if f["path"].startswith("kept/")]
    assert shard_runs == {"ingest.process": len(jobs), "clean.process": len(kept_files),
                          "dedup.signatures": len(cleaned_files), "dedup.write_shard": len(cleaned_files)}
    assert {state for name, state in names if name in shard_runs} == {"COMPLETED"}
    # the workers' own Prefect settings name the flow's API, so none started a temporary server of its own
    assert set(cluster.run(lambda: os.environ.get("PREFECT_API_URL")).values()) == {flow_api}
    assert set(cluster.run(lambda: __import__("prefect.settings").settings.get_current_settings().api.url).values()) == {flow_api}
    assert set(cluster.run(lambda: len(__import__("psutil").Process().children(recursive=True))).values()) == {0}


def test_a_scheduler_that_does_not_answer_is_a_message(tmp_path: Path, monkeypatch):
    from conftest import free_port

    monkeypatch.setattr(dask_runner, "CONNECT_TIMEOUT_S", 1)
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match=f"no Dask scheduler answers at {address}.*dask scheduler"):
        run_pipeline("tiny", [f"workspace={tmp_path / 'ws'}", "runner.kind=dask", f"runner.dask_address={address}"],
                     only=DATA_STAGES)
