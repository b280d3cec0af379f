"""End to end through Prefect and a real (temporary) MLflow store: runs, cache hits, reruns, failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from conftest import assert_written_rows_match, free_port, small_overrides
from jielong.flows.entry_points import run_pipeline
from jielong.flows.stages import select_stages
from jielong.tasks import dedup
from jielong.tasks.config import UserError

DATA_STAGES = ["ingest", "clean", "dedup"]


def runs_of(workspace: Path):
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jielong")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id] for p in parents}
    return client, parents, children


def chat_with_served_model(model_uri: str, workspace: Path) -> dict:
    """One chat request to `mlflow models serve -m model_uri` started on a free loopback port."""
    import signal
    import time

    import requests

    port = free_port()
    bin_dir = Path(sys.executable).parent  # mlflow starts uvicorn by name
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    log = open(workspace / "serve.log", "w")
    server = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                               "--host", "127.0.0.1", "-p", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        else:
            raise AssertionError(f"the model server did not start: {(workspace / 'serve.log').read_text()[-2000:]}")
        request = {"messages": [{"role": "user", "content": "What does json.dumps do?"}], "max_tokens": 8}
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=request, timeout=120)
        assert answer.ok, answer.text
        body = answer.json()
        return body[0] if isinstance(body, list) else body
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def by_stage(summaries):
    return {s["stage"]: s for s in summaries}


@pytest.mark.slow
def test_pipeline_runs_caches_and_reruns_one_stage(prefect_server, workspace: Path):
    first = by_stage(run_pipeline("tiny", small_overrides(workspace)))
    assert [first[s]["status"] for s in ("ingest", "clean", "dedup")] == ["ran", "ran", "ran"]
    for summary in first.values():
        manifest = json.loads((Path(summary["path"]) / "manifest.json").read_text())
        c = manifest["counts"]
        assert c["documents_in"] == c["documents_out"] + sum(c["rejected_by_reason"].values())
        if summary["stage"] in ("ingest", "clean", "dedup"):
            assert_written_rows_match(Path(summary["path"]))
        assert manifest["complete"] is True and manifest["mlflow_run_id"] == summary["mlflow_run_id"]

    client, parents, children = runs_of(workspace)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.data.tags["jielong.config_hash"] and parent.data.tags["jielong.git_commit"]
    assert parent.data.params["dedup.near.threshold"] == "0.8"
    assert parent.data.metrics["dedup/documents_out"] == first["dedup"]["documents_out"]
    stages = {r.data.tags["jielong.stage"]: r for r in children[parent.info.run_id]}
    assert set(stages) == {"ingest", "clean", "dedup", "tokenize", "pretrain", "instruct", "eval_pretrain", "eval_instruct"}
    assert all(r.data.tags["jielong.cache_hit"] == "false" and r.info.status == "FINISHED" for r in stages.values())
    assert stages["clean"].data.metrics["clean/kept_fraction"] > 0.5
    assert "clean/would_remove/gopher_quality.min_words" in stages["clean"].data.metrics
    artifacts = {a.path for a in client.list_artifacts(stages["dedup"].info.run_id)}
    assert {"manifest.json", "clusters.jsonl", "samples"} <= artifacts
    assert stages["clean"].inputs.dataset_inputs, "datasets logged as run inputs"

    # training curves with steps, the model as an artifact and a registered, loadable model version
    assert [m.step for m in client.get_metric_history(stages["pretrain"].info.run_id, "pretrain/loss")] == list(range(1, 7))
    assert "pretrain/val_loss" in stages["pretrain"].data.metrics and "pretrain/mfu" in stages["pretrain"].data.metrics
    assert stages["pretrain"].data.tags["jielong.registered_model"] == "models:/jielong-pretrain/1"
    assert {"model", "loss_curve.png"} <= {a.path for a in client.list_artifacts(stages["pretrain"].info.run_id)}
    assert "generations.json" in {a.path for a in client.list_artifacts(stages["instruct"].info.run_id)}
    from jielong.models.generate import resolve_model
    from jielong.models.presets import load_model

    registered = resolve_model("models:/jielong-instruct/1", f"sqlite:///{workspace / 'mlflow.db'}")
    assert load_model(registered).config.vocab_size == 512

    # a registered model is an MLflow transformers-flavor model whose card has lineage and evaluations
    flavors = yaml.safe_load((registered.parent / "MLmodel").read_text())["flavors"]
    assert {"transformers", "python_function"} <= set(flavors)
    card = (registered / "README.md").read_text()
    assert card == (registered.parent / "README.md").read_text()
    assert f"| dedup | `{first['dedup']['key']}` |" in card and f"| pretrain | `{first['pretrain']['key']}` |" in card
    assert f"`eval_instruct` stage (key `{first['eval_instruct']['key']}`)" in card and "| next_sentence |" in card
    assert "`eval_pretrain`" not in card, "only the evaluations of this model"
    stage_card = (Path(first["instruct"]["path"]) / "model" / "README.md").read_text()
    assert "## Evaluation" not in stage_card and stage_card.split("## Training")[0] == card.split("## Training")[0]

    # ... which `mlflow models serve` answers on loopback (OpenAI-style chat for the instruct model)
    reply = chat_with_served_model("models:/jielong-instruct/1", workspace)
    assert reply["choices"][0]["message"]["role"] == "assistant" and reply["usage"]["completion_tokens"] >= 1

    # one evaluation run per model, with its metrics, plots and report
    for name in ("eval_pretrain", "eval_instruct"):
        run = stages[name]
        assert {f"{name}/perplexity", f"{name}/bits_per_byte", f"{name}/ece_10_bin", f"{name}/knnlm_perplexity"} <= set(run.data.metrics)
        logged = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"report.json", "report.md", "reliability_tokens.png"} <= logged

    # `jielong eval` evaluates any model, here a registered one, the same way (and caches it)
    from jielong.flows.entry_points import run_evaluation

    evaluated = by_stage(run_evaluation("models:/jielong-pretrain/1", "tiny", small_overrides(workspace)))
    assert evaluated["eval_model"]["status"] == "ran" and evaluated["dedup"]["status"] == "cached"
    assert (Path(evaluated["eval_model"]["path"]) / "report.md").is_file()
    assert by_stage(run_evaluation("models:/jielong-pretrain/1", "tiny", small_overrides(workspace)))["eval_model"]["status"] == "cached"

    # the same config again: every stage is a cache hit, nothing recomputed, visible in MLflow
    mtimes = {s: (Path(v["path"]) / "manifest.json").stat().st_mtime_ns for s, v in first.items()}
    second = by_stage(run_pipeline("tiny", small_overrides(workspace)))
    assert set(second) == set(first) and {s["status"] for s in second.values()} == {"cached"}
    assert mtimes == {s: (Path(v["path"]) / "manifest.json").stat().st_mtime_ns for s, v in second.items()}
    _, parents, children = runs_of(workspace)
    cached_children = children[parents[-1].info.run_id]
    name = parents[-1].data.tags["mlflow.runName"]
    assert name.startswith("tiny · ingest.sources=") and name.endswith(" · all stages"), name
    assert parents[-1].data.tags["jielong.kind"] == "pipeline" and parents[-1].data.tags["jielong.complete"] == "true"
    assert {r.data.tags["jielong.cache_hit"] for r in cached_children} == {"true"}
    assert {r.data.tags["jielong.source_run_id"] for r in cached_children} == {first[s]["mlflow_run_id"] for s in first}

    # a dedup setting: dedup alone recomputes
    third = by_stage(run_pipeline("tiny", small_overrides(workspace, "dedup.threshold=0.7"), only=["dedup"]))
    assert list(third) == ["dedup"] and third["dedup"]["status"] == "ran"
    assert third["dedup"]["key"] != first["dedup"]["key"]
    assert mtimes["clean"] == (Path(first["clean"]["path"]) / "manifest.json").stat().st_mtime_ns

    # `jielong compare --last 2 --include-partial` shows the two runs side by side, the differing setting included
    # (test_compare.py: without the flag, only complete runs)
    from jielong.tasks.lib.compare import compare
    from jielong.tasks.config import load_config

    compared = compare(load_config("tiny", small_overrides(workspace)), [], last=2, include_partial=True)
    table = compared["table"]
    assert len(table) == 2 and list(table["dedup.near.threshold"]) == ["0.8", "0.7"]
    assert {p.name for p in compared["files"]} == {"compare.csv", "compare.md", "training_curves.png", "knnlm_sweep.png"}

    # --force clean recomputes clean; dedup's key is unchanged, so it is a cache hit
    fourth = by_stage(run_pipeline("tiny", small_overrides(workspace), force=["clean"]))
    assert [fourth[s]["status"] for s in ("ingest", "clean", "dedup")] == ["cached", "forced", "cached"]
    # --from clean reruns clean and everything after it
    fifth = by_stage(run_pipeline("tiny", small_overrides(workspace), from_stage="clean"))
    assert {s: v["status"] for s, v in fifth.items()} == dict.fromkeys(
        ["clean", "dedup", "tokenize", "pretrain", "instruct", "eval_pretrain", "eval_instruct"], "forced")


@pytest.mark.slow
def test_only_needs_cached_upstream(prefect_server, workspace: Path):
    with pytest.raises(UserError, match="needs the ingest artifact"):
        run_pipeline("tiny", small_overrides(workspace), only=["clean"])


@pytest.mark.slow
def test_crash_mid_stage_leaves_nothing_complete_and_rerun_reuses_upstream(prefect_server, workspace: Path, monkeypatch):
    real = dedup.write_shard
    calls = []

    def crash_after_first_shard(job):
        calls.append(job.index)
        if len(calls) > 1:
            raise RuntimeError("injected failure")
        return real(job)

    overrides = small_overrides(workspace, "ingest.shard_size=100", "runner.workers=1")
    monkeypatch.setattr(dedup, "write_shard", crash_after_first_shard)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_pipeline("tiny", overrides, only=DATA_STAGES)
    assert not list((workspace / "dedup").glob("*/manifest.json"))
    assert not list((workspace / "dedup").glob(".tmp-*")), "temporary output removed"
    _, parents, children = runs_of(workspace)
    assert parents[-1].info.status == "FAILED"
    assert {r.data.tags["jielong.stage"]: r.info.status for r in children[parents[-1].info.run_id]}["dedup"] == "FAILED"
    # the failed runs say why, as a tag and as their description in the UI
    failed_dedup = next(r for r in children[parents[-1].info.run_id] if r.data.tags["jielong.stage"] == "dedup")
    assert "RuntimeError: injected failure" in failed_dedup.data.tags["jielong.error"]
    assert "RuntimeError: injected failure" in parents[-1].data.tags["jielong.error"]
    assert parents[-1].data.tags["mlflow.note.content"].startswith("Failed: ")
    assert parents[-1].data.tags["jielong.complete"] == "false"

    monkeypatch.setattr(dedup, "write_shard", real)
    rerun = by_stage(run_pipeline("tiny", overrides, only=DATA_STAGES))
    assert [rerun[s]["status"] for s in ("ingest", "clean", "dedup")] == ["cached", "cached", "ran"]


@pytest.mark.slow
def test_process_pool_runner(prefect_server, workspace: Path, monkeypatch):
    """As `jielong run` runs it: the tracker in a second process, the data stages' shard jobs in worker
    processes (they are sent their parent task's context, which must not hold the tracker)."""
    from jielong.flows import pipeline
    from jielong.tasks.config import load_config
    from jielong.tasks.core.tracking import prestart_tracker

    opened = []
    open_tracker = pipeline.open_tracker
    monkeypatch.setattr(pipeline, "open_tracker", lambda cfg: opened.append(open_tracker(cfg)) or opened[-1])
    overrides = [o for o in small_overrides(workspace) if not o.startswith("runner.")] + ["runner.kind=process"]
    prestart_tracker(load_config("tiny", overrides))
    summaries = by_stage(run_pipeline("tiny", overrides, only=DATA_STAGES))
    assert [type(tracker).__name__ for tracker in opened] == ["TrackerProcess"]
    assert list(summaries) == DATA_STAGES and {s["status"] for s in summaries.values()} == {"ran"}
    assert summaries["dedup"]["documents_out"] > 0


def test_select_stages():
    assert select_stages().run[:6] == ["ingest", "clean", "dedup", "tokenize", "pretrain", "instruct"]
    assert select_stages(from_stage="pretrain").forced == {"pretrain", "instruct", "eval_pretrain", "eval_instruct"}
    with pytest.raises(UserError, match="unknown stage 'dedupe'"):
        select_stages(only=["dedupe"])


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), **(env or {})}
    return subprocess.run([sys.executable, "-m", "jielong.flows.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_cli_reports_config_mistakes_without_traceback(tmp_path: Path):
    result = run_cli("run", "--set", "dedup.near.treshold=0.7", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown config key 'dedup.near.treshold'" in result.stderr and "threshold" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    result = run_cli("run", "--only", "dedupe", "--set", f"workspace={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and "unknown stage" in result.stderr


@pytest.mark.slow
def test_cli_reports_mistakes_found_inside_the_flow_without_traceback(tmp_path: Path):
    from conftest import free_port

    def run_on(path: Path) -> subprocess.CompletedProcess:
        return run_cli("run", "--only", "ingest", "--set", f"workspace={tmp_path}", "--set", "runner.kind=thread",
                       "--set", f"ingest.sources=[{{kind: files, path: '{path}'}}]", cwd=tmp_path)

    result = run_on(tmp_path / "nope")  # found before the flow starts
    assert result.returncode == 2 and "does not exist" in " ".join(result.stderr.split())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jsonl").write_text("{oops\n")
    result = run_on(tmp_path / "broken")  # found by the ingest task
    assert result.returncode == 2 and "no usable documents" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr + result.stdout

    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "a.txt").write_text("A perfectly good plain text document about parsers and tokens.\n")
    result = run_cli("run", "--only", "ingest,clean,dedup", "--set", f"workspace={tmp_path}", "--set", "runner.kind=thread",
                     "--set", f"ingest.sources=[{{kind: files, path: '{tmp_path / 'good'}'}}]",
                     "--set", f"dedup.decontaminate.extra_eval_paths=['{tmp_path / 'missing'}']", cwd=tmp_path)
    assert result.returncode == 2 and "extra_eval_paths" in result.stderr and "Traceback" not in result.stderr
    assert "stages done before the failure" in result.stdout  # what finished is still shown
    assert "ingest" in result.stdout and "clean" in result.stdout
    stale = {"PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}  # a server stopped since
    result = run_cli("run", "--set", f"workspace={tmp_path}", cwd=tmp_path, env=stale)
    message = " ".join(result.stderr.split())  # the console wraps long lines
    assert result.returncode == 2 and "the Prefect API at" in message and "is not reachable" in message


def test_cli_stages_lists_keys(tmp_path: Path):
    result = run_cli("stages", "--set", f"workspace={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for stage in ("ingest", "clean", "dedup"):
        assert stage in result.stdout


def test_unreachable_tracking_server_is_a_clear_error_within_seconds(workspace: Path):
    import socket
    import time

    from jielong.tasks.config import load_config
    from jielong.tasks.core.tracking import Tracker

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = load_config("tiny", [f"workspace={workspace}", f"mlflow.tracking_uri=http://127.0.0.1:{port}"])
    started = time.perf_counter()
    with pytest.raises(UserError, match="not reachable"):
        Tracker(cfg)
    assert time.perf_counter() - started < 10


@pytest.mark.slow
def test_two_runs_at_once_on_one_workspace_compute_each_stage_once(workspace: Path):
    overrides = [o for o in small_overrides(workspace)]
    args = [arg for o in overrides for arg in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("PREFECT_API_URL", None)  # each process starts its own Prefect server, as two users would
    command = [sys.executable, "-m", "jielong.flows.cli", "run", "--only", "ingest,clean,dedup", *args]
    procs = [subprocess.Popen(command, env=env, cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [out[-4000:] for out in outputs]
    for stage in ("ingest", "clean", "dedup"):
        assert len(list((workspace / stage).glob("*/manifest.json"))) == 1
        assert not list((workspace / stage).glob(".tmp-*"))
    _, parents, children = runs_of(workspace)
    assert len(parents) == 2
    computed = [r for runs in children.values() for r in runs if r.data.tags["jielong.cache_hit"] == "false"]
    assert sorted(r.data.tags["jielong.stage"] for r in computed) == ["clean", "dedup", "ingest"]
