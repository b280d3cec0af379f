"""The `jielong` command line: run the pipeline, inspect stage keys and caches."""

from __future__ import annotations

import atexit
import logging
import os
import shlex
import signal
import sys
import threading
import time
from enum import Enum
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="jielong: an LM's whole life as one reproducible pipeline.")
console = Console()
if not console.is_terminal:
    console = Console(width=150)  # logs and CI: do not wrap the summary table at 80 columns

ConfigOption = typer.Option("tiny", "--config", "-c", help="preset name in configs/ or a YAML path")
SetOption = typer.Option(None, "--set", "-s", help="override, e.g. --set dedup.threshold=0.7 (repeatable)")
# read by main() before any library is imported (flows/quiet.py); declared on the commands that run stages
VerboseOption = typer.Option(False, "--verbose", help="show the libraries' progress bars, warnings and log lines "
                             "(also JIELONG_VERBOSE=1)")


def _split(values: Optional[list[str]]) -> list[str] | None:
    if not values:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


@app.command()
def run(
    config: str = ConfigOption,
    only: Optional[list[str]] = typer.Option(None, "--only", help="run only these stages (comma-separated or repeated)"),
    from_stage: Optional[str] = typer.Option(None, "--from", help="rerun this stage and every later one"),
    force: Optional[list[str]] = typer.Option(None, "--force", help="recompute these stages even if cached"),
    overrides: Optional[list[str]] = SetOption,
    verbose: bool = VerboseOption,
) -> None:
    """Run the pipeline (cached stages are skipped) and print a summary."""
    from jielong.flows.stages import select_stages
    from jielong.tasks.config import load_config
    from jielong.tasks.core.tracking import prestart_tracker

    started = time.perf_counter()
    only, force = _split(only), _split(force)
    cfg = load_config(config, overrides or [])  # a mistake is reported before Prefect and MLflow are even imported
    select_stages(only, from_stage, force)
    prestart_tracker(cfg)  # MLflow starts on another core while Prefect loads here
    from jielong.flows.entry_points import launch_pipeline

    outcome = launch_pipeline(config, overrides or [], only, from_stage, force)
    if outcome.error is not None:
        if outcome.summaries:
            print_summary(outcome.summaries, started, title="stages done before the failure")
        raise outcome.error
    print_summary(outcome.summaries, started)


def print_summary(summaries: list[dict], started: float, title: str = "jielong") -> None:
    table = Table(title=f"{title} ({time.perf_counter() - started:.1f} s)")
    for column in ("stage", "status", "key", "in", "out", "rejected", "seconds", "headline"):
        table.add_column(column, justify="right" if column in ("in", "out", "rejected", "seconds") else "left")
    for s in summaries:
        table.add_row(s["stage"], s["status"], s["key"][:8], s["in"], s["out"], f"{s['rejected']:,}", f"{s['seconds']:.1f}",
                      s["headline"])
    console.print(table)
    if summaries:
        workspace = os.path.dirname(os.path.dirname(summaries[0]["path"]))
        console.print(f"MLflow parent run {summaries[0]['parent_run_id']}; stage outputs under {workspace}/<stage>/<key>/")


@app.command("eval")
def evaluate(
    model: str = typer.Option(..., "--model", "-m", help="a model folder, models:/NAME/VERSION, runs:/ID/model, a hub name, a .gguf file or builtin:smollm2-135m-instruct"),
    config: str = ConfigOption,
    force: bool = typer.Option(False, "--force", help="recompute even if this model was evaluated with this config"),
    tasks: Optional[list[str]] = typer.Option(None, "--tasks", help="in-context tasks instead of evaluate.icl.tasks: "
                                              "spec names or paths, lm-evaluation-harness task YAMLs or folders of them "
                                              "(comma-separated or repeated)"),
    overrides: Optional[list[str]] = SetOption,
    verbose: bool = VerboseOption,
) -> None:
    """Evaluate any local Hugging Face causal LM on the config's held-out data (one MLflow run)."""
    import json

    from jielong.tasks.config import load_config
    from jielong.tasks.core.tracking import prestart_tracker

    if tasks:
        overrides = [*(overrides or []), f"evaluate.icl.tasks={json.dumps(_split(tasks))}"]
    started = time.perf_counter()
    prestart_tracker(load_config(config, overrides or []))  # MLflow starts on another core while Prefect loads here
    from jielong.flows.entry_points import run_evaluation

    summaries = run_evaluation(model, config, overrides or [], force)
    print_summary(summaries, started)
    report = os.path.join(summaries[-1]["path"], "report.md")
    console.print(f"report: {report}")


@app.command()
def compare(
    run_ids: Optional[list[str]] = typer.Argument(None, help="MLflow parent run ids (default: the last N pipeline runs)"),
    last: int = typer.Option(2, "--last", help="how many recent complete pipeline runs (see --include-partial)"),
    include_partial: bool = typer.Option(False, "--include-partial",
                                         help="--last also takes partial pipeline runs (--only) and pre-tagging ones"),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment (default: the config's)"),
    config: str = ConfigOption,
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Key metrics of pipeline runs side by side, with overlaid curves, logged as a `compare` run."""
    from jielong.tasks.lib.compare import compare as run_compare
    from jielong.tasks.config import load_config

    extra = [f"mlflow.experiment={experiment}"] if experiment else []
    result = run_compare(load_config(config, [*(overrides or []), *extra]), run_ids or [], last, include_partial)
    table = Table(title="jielong compare")
    frame = result["table"].T
    table.add_column("")
    for column in frame.columns:
        table.add_column(escape(str(frame.loc["run", column])))
    for name, values in frame.iterrows():
        if name != "run":
            table.add_row(escape(name), *[escape(_number(v)) for v in values])
    console.print(table)
    for line in result["left_out"]:
        console.print(line, highlight=False)
    console.print(f"saved: {result['files'][0].parent}  (MLflow run {result['run_id']})")


def _number(value) -> str:
    from jielong.tasks.lib.compare import ABSENT

    if value is None or (isinstance(value, float) and value != value):  # absent, or NaN from pandas
        return ABSENT
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


@app.command()
def models(
    name: Optional[str] = typer.Argument(None, help="one registered model (default: all)"),
    config: str = ConfigOption,
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """The registered models of the config's MLflow store: versions, aliases, the stage and key of each,
    the data that trained it, its headline numbers. Use one as --model models:/NAME/VERSION."""
    from jielong.tasks.config import load_config
    from jielong.tasks.core.tracking import Tracker
    from jielong.tasks.lib.registered_models import registered_models

    tracker = Tracker(load_config(config, overrides or []))
    rows = registered_models(tracker, name)
    if not rows:
        console.print(f"no registered models in {tracker.uri} (`jielong run` registers its pretrained and "
                      "instruction-tuned models)", highlight=False)
        return
    table = Table(title=f"registered models ({tracker.uri})")
    for column in ("model", "aliases", "stage", "key", "trained on", "headline", "registered"):
        table.add_column(column)
    for row in rows:
        table.add_row(escape(row["model"]), escape(", ".join(row["aliases"])), row["stage"], row["key"],
                      escape("\n".join(row["data"])), escape("\n".join(row["headline"])), row["registered"])
    console.print(table)


@app.command()
def study(
    name: Optional[str] = typer.Argument(None, help="a study in studies/ or configs/studies/, or a YAML path"),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="replicates per variant (default: the study's)"),
    list_studies: bool = typer.Option(False, "--list", help="show the studies and their cost"),
    publish: bool = typer.Option(False, "--publish", help="also write report.md, results.json and the plots into "
                                 "studies/results/NAME/ with their provenance (refused on a dirty tree)"),
    allow_dirty: bool = typer.Option(False, "--allow-dirty", help="with --publish: publish from a tree with "
                                     "uncommitted changes, the report marked dirty"),
    overrides: Optional[list[str]] = SetOption,
    verbose: bool = VerboseOption,
) -> None:
    """Reproduce a claim of the course notes: run a study's variants x seeds over cached stages as one flow
    (MLflow parent run study-NAME), compute the verdicts and write report.md with its plots."""
    if list_studies or not name:
        return _print_studies()
    started = time.perf_counter()
    from jielong.flows.study import run_study

    command = shlex.join(["jielong", "study", name, *(["--seeds", str(seeds)] if seeds else []),
                          *(a for o in overrides or [] for a in ("--set", o)), *(["--publish"] if publish else []),
                          *(["--allow-dirty"] if allow_dirty else [])])
    outcome = run_study(name, seeds, overrides or [], publish, allow_dirty, command)
    table = Table(title=f"study {name} ({time.perf_counter() - started:.1f} s)")
    for column in ("claim", "verdict", "rule", "why"):
        table.add_column(column)
    for verdict in outcome["verdicts"]:
        color = {"held": "green", "not held": "red"}.get(verdict.verdict, "yellow")
        table.add_row(escape(verdict.claim), f"[{color}]{verdict.verdict}[/]", escape(verdict.rule), escape(verdict.reason))
    console.print(table)
    console.print(f"report: {outcome['report']}  (MLflow parent run {outcome['parent_run_id']})")
    if outcome.get("published"):
        console.print(f"published: {outcome['published']}")


def _print_studies() -> None:
    from jielong.flows.study import list_studies

    table = Table(title="studies (jielong study NAME)")
    for column in ("name", "title", "runs", "claims", "cost", "file"):
        table.add_column(column)
    for row in list_studies():
        table.add_row(*(escape(row[c]) for c in ("name", "title", "runs", "claims", "cost", "file")))
    console.print(table)


class ServerAction(str, Enum):
    start = "start"
    status = "status"
    stop = "stop"


@app.command()
def server(
    action: ServerAction = typer.Argument(ServerAction.start, help="start: both servers in the foreground; "
                                          "status, stop: the background Prefect API that `jielong run` starts"),
    config: str = ConfigOption,
    prefect_port: int = typer.Option(4200, help="Prefect server port (127.0.0.1)"),
    mlflow_port: int = typer.Option(5000, help="MLflow tracking server port (127.0.0.1)"),
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Start a Prefect server and an MLflow tracking server on 127.0.0.1 (stores in the workspace); Ctrl-C stops
    both. `jielong server status|stop`: the local Prefect API that `jielong run` starts in the background."""
    if action is not ServerAction.start:
        return background_api(action)
    from jielong.flows.operate import start_servers, stop_servers
    from jielong.tasks.config import load_config

    # the servers run in their own sessions, so a SIGTERM (systemd, docker, timeout) must stop them here too,
    # also while they start (start_servers stops what it started when interrupted)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    started = start_servers(load_config(config, overrides or []), prefect_port, mlflow_port)
    urls = {name: url for name, _, url in started}
    console.print(f"Prefect UI  {urls['prefect']}\nMLflow UI   {urls['mlflow']}\n\nIn another shell:\n"
                  f"  export PREFECT_API_URL={urls['prefect']}/api MLFLOW_TRACKING_URI={urls['mlflow']}\n"
                  "  jielong run   |   jielong schedule --cron '0 3 * * *'\n\nCtrl-C stops both servers.")
    try:
        while all(process.poll() is None for _, process, _ in started):
            time.sleep(1)
        console.print("a server exited; stopping the other")
    except KeyboardInterrupt:
        pass
    finally:
        stop_servers(started)


def background_api(action: ServerAction) -> None:
    from jielong.flows import prefect_api

    if action is ServerAction.stop:
        state = prefect_api.stop()
        console.print(f"stopped the local Prefect API at {state['url']} (pid {state['pid']})" if state
                      else "no local Prefect API is running")
        return
    state = prefect_api.running()
    if state is None:
        console.print("no local Prefect API is running (`jielong run` starts one on first use)")
        return
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state["started_at"]))
    console.print(f"local Prefect API at {state['url']} (pid {state['pid']}, since {since}, log {state['log']}); "
                  "`jielong server stop` stops it")


@app.command()
def ui(
    config: str = ConfigOption,
    port: int = typer.Option(5000, help="port on 127.0.0.1"),
    open_browser: Optional[bool] = typer.Option(None, "--open/--no-open",
                                                help="open a browser (default: when there is a display)"),
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """The MLflow UI of the workspace's store on 127.0.0.1, opened on the runs table of the pipeline runs;
    prints the URLs of the runs and of the model registry. Ctrl-C stops it."""
    from jielong.flows.ui import serve
    from jielong.tasks.config import load_config

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the server runs in its own session: stop it too
    serve(load_config(config, overrides or []), port, open_browser, lambda text: console.print(text, highlight=False,
                                                                                              soft_wrap=True))


@app.command()
def schedule(
    config: str = ConfigOption,
    cron: Optional[str] = typer.Option(None, "--cron", help="e.g. '0 3 * * *'"),
    interval: Optional[float] = typer.Option(None, "--interval", help="seconds between runs"),
    name: Optional[str] = typer.Option(None, "--name", help="deployment name (default jielong-<config>)"),
    only: Optional[list[str]] = typer.Option(None, "--only", help="scheduled runs run only these stages"),
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Register a Prefect deployment of the pipeline and serve its scheduled runs (Ctrl-C stops serving)."""
    from jielong.flows.operate import serve_schedule

    serve_schedule(config, overrides or [], cron, interval, name, _split(only))


@app.command()
def stages(config: str = ConfigOption, overrides: Optional[list[str]] = SetOption) -> None:
    """Each stage's key for a config and whether its output is cached."""
    from jielong.flows.stages import STAGES, stage_keys
    from jielong.tasks.config import load_config
    from jielong.tasks.core.contract import load_artifact, stage_dir

    cfg = load_config(config, overrides or [])
    keys = stage_keys(cfg)
    table = Table(title=f"stages for config {cfg.name!r}")
    for column in ("stage", "key", "cached", "inputs", "path"):
        table.add_column(column)
    for stage in STAGES:
        artifact = load_artifact(cfg.workspace_path(), stage.name, keys[stage.name])
        table.add_row(stage.name, keys[stage.name], "yes" if artifact else "no", ", ".join(stage.inputs) or "-",
                      str(stage_dir(cfg.workspace_path(), stage.name) / keys[stage.name]))
    console.print(table)


@app.command()
def join(config: str = ConfigOption, overrides: Optional[list[str]] = SetOption) -> None:
    """On another node of a multi-node training: run this node's workers for each training stage with
    nnodes > 1 as `jielong run` reaches it (same config and --set, shared workspace)."""
    from jielong.flows.join import join as join_training
    from jielong.tasks.config import load_config

    join_training(load_config(config, overrides or []), console.print)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="the text to continue (or the question, with --chat)"),
    model: str = typer.Option(..., "--model", "-m", help="a model folder, models:/NAME/VERSION, runs:/ID/model, a hub name, a .gguf file or builtin:smollm2-135m-instruct"),
    max_new_tokens: int = typer.Option(64, help="tokens to generate"),
    temperature: float = typer.Option(0.0, help="> 0 samples; 0 with no top-k/top-p is greedy"),
    top_k: Optional[int] = typer.Option(None, help="sample from the k most likely tokens"),
    top_p: Optional[float] = typer.Option(None, help="nucleus sampling"),
    beams: int = typer.Option(1, help="beam search with this many beams (with early stopping)"),
    no_repeat_ngram_size: int = typer.Option(0, help="no n-gram of this size appears twice in the output (0: off)"),
    chat: bool = typer.Option(False, help="the prompt is a user message in the model's chat template"),
    seed: int = typer.Option(1234),
    config: str = ConfigOption,
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Sample from a saved model: the text is printed exactly as the model produced it."""
    from jielong.flows import terminal
    from jielong.models.generate import Decoding, Generator

    terminal.quiet_loading()
    with terminal.status("loading the model"):  # a GGUF is converted first: SmolLM2 takes up to a minute
        generator = Generator(_model_dir(model, config, overrides))
    decoding = Decoding(temperature, top_k, top_p, beams, no_repeat_ngram_size, seed)
    with terminal.status("generating"):
        text = (generator.reply([{"role": "user", "content": prompt}], max_new_tokens, decoding) if chat
                else generator.continue_text(prompt, max_new_tokens, decoding))
    terminal.write_text(text)


@app.command()
def chat(
    model: str = typer.Option(..., "--model", "-m", help="as for generate"),
    system: Optional[str] = typer.Option(None, help="a system message that opens the conversation"),
    max_new_tokens: int = typer.Option(128, help="tokens per reply"),
    temperature: float = typer.Option(0.0, help="> 0 samples; 0 with no top-k/top-p is greedy"),
    top_k: Optional[int] = typer.Option(None),
    top_p: Optional[float] = typer.Option(None),
    beams: int = typer.Option(1, help="beam search with this many beams (with early stopping)"),
    no_repeat_ngram_size: int = typer.Option(0, help="no n-gram of this size appears twice in a reply (0: off)"),
    seed: int = typer.Option(1234),
    config: str = ConfigOption,
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Talk with a model: each line you type is a user turn, the whole conversation stays in the model's
    chat template. /reset starts over; /quit or end of input (Ctrl-D) ends. At a terminal, lines are edited
    with readline (arrows, Ctrl-A/E; Up recalls earlier ones, kept in <workspace>/chat_history); replies
    go to stdout as produced, everything else to stderr. Piped: one reply per line, nothing else."""
    from jielong.flows import terminal
    from jielong.models.generate import Decoding, Generator, chat_loop
    from jielong.tasks.config import load_config

    terminal.quiet_loading()
    with terminal.status("loading the model"):
        generator = _Busy(Generator(_model_dir(model, config, overrides)))
    interactive = sys.stdin.isatty()
    if interactive:
        terminal.line_editing(load_config(config, overrides or []).workspace_path() / "chat_history")
        terminal.notice("/reset starts over, /quit ends")

    def read() -> str | None:
        try:
            return input("you> " if interactive else "")
        except EOFError:
            if interactive:
                terminal.notice("")  # Ctrl-D: the shell's prompt on a line of its own
            return None

    def write(text: str) -> None:
        if interactive:
            sys.stderr.write("model> ")
            sys.stderr.flush()
            terminal.write_text(text if text.endswith("\n") else text + "\n")
        else:  # one reply per line, for scripts
            print(text.replace("\n", " "), flush=True)

    decoding = Decoding(temperature, top_k, top_p, beams, no_repeat_ngram_size, seed)
    chat_loop(generator, read, write, max_new_tokens, decoding, system, notice=terminal.notice)


@app.command()
def export(
    model: str = typer.Argument(..., help="as --model of generate: a folder, models:/NAME/VERSION, runs:/ID/model, a .gguf, builtin:NAME"),
    to: str = typer.Option(..., "--to", help="gguf or onnx"),
    out: Optional[str] = typer.Option(None, "--out", help="the file to write (default: <workspace>/exports/<model>.<type>.<format>)"),
    dtype: str = typer.Option("f32", "--type", help="GGUF: f32, f16 or q8_0; ONNX: f32"),
    probes: Optional[str] = typer.Option(None, "--probes", help="probe set, JSON lines (default: data/eval/probes.jsonl)"),
    config: str = ConfigOption,
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Convert a model for other runtimes (GGUF: llama.cpp, Ollama; ONNX: ONNX Runtime), check it against the
    source on the probe set (manifest <out>.json) and log both to the model's MLflow run."""
    from jielong.flows.deploy import run_export

    started = time.perf_counter()
    path, manifest, run_id = run_export(model, to, out, dtype, probes, config, overrides or [])
    parity = manifest["parity"]
    console.print(f"{path} ({manifest['bytes'] / 1e6:.1f} MB, {time.perf_counter() - started:.1f} s): next-token "
                  f"log-probs within {parity['max_abs_logprob_diff']:.2e} of the source, greedy continuations "
                  f"{'equal' if parity['greedy_equal'] else 'differ on ' + ', '.join(parity['greedy_differs'])}; "
                  f"MLflow run {run_id}", highlight=False)


@app.command("deploy-check")
def deploy_check(
    url: str = typer.Argument(..., help="a loopback endpoint: OpenAI-style base or /v1/(chat/)completions URL, or `mlflow models serve`'s"),
    model: str = typer.Option(..., "--model", "-m", help="the model it should serve (any --model spec)"),
    probes: Optional[str] = typer.Option(None, "--probes", help="probe set, JSON lines (default: data/eval/probes.jsonl)"),
    max_new_tokens: int = typer.Option(16, help="tokens per answer"),
    rounds: int = typer.Option(2, help="times each probe is sent"),
    concurrency: int = typer.Option(4, help="requests in flight at most"),
    config: str = ConfigOption,
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Smoke-test a deployment: the endpoint's greedy answers to the probes must equal the model's in process;
    latency p50/p95 and errors under bounded concurrency. One MLflow run `deploy-check`; exit 1 when it fails."""
    from jielong.flows.deploy import run_deploy_check

    result = run_deploy_check(url, model, probes, config, overrides or [], max_new_tokens, rounds, concurrency)
    console.print(f"{url} ({result['api']}): {result['requests']} requests, {result['errors']} errors, latency p50 "
                  f"{result['latency_p50_s']:.3f} s, p95 {result['latency_p95_s']:.3f} s; MLflow run {result['run_id']}",
                  highlight=False, markup=False)
    if result["skipped"]:
        console.print(f"not sent (this endpoint takes other kinds): {', '.join(result['skipped'])}", highlight=False)
    if not result["passed"]:
        reasons = []
        if result["probes_differing"]:
            reasons.append(f"answers differ from the model's on {', '.join(result['probes_differing'])}")
        if result["errors"]:
            first = next(row["error"] for row in result["answers"] if row["error"])
            reasons.append(f"{result['errors']} of {result['requests']} requests failed (first: {first})")
        raise typer.Exit(_fail("deploy-check failed: " + "; ".join(reasons)))
    console.print(f"passed: all {result['probes_answered']} probes answered as the model computes in process")


@app.command()
def monitor(
    url: str = typer.Argument(..., help="the loopback endpoint to watch (as for deploy-check)"),
    model: str = typer.Option(..., "--model", "-m", help="the model it should serve: the reference"),
    interval: float = typer.Option(..., "--interval", help="seconds between looks"),
    name: Optional[str] = typer.Option(None, "--name", help="deployment name (default jielong-monitor-<model>)"),
    probes: Optional[str] = typer.Option(None, "--probes", help="probe set, JSON lines (default: data/eval/probes.jsonl)"),
    max_error_rate: Optional[float] = typer.Option(None, help="threshold (default 0.1)"),
    max_latency_p95_s: Optional[float] = typer.Option(None, help="threshold in seconds (default 10)"),
    max_changed_share: Optional[float] = typer.Option(None, help="threshold (default 0.25)"),
    max_perplexity_ratio: Optional[float] = typer.Option(None, help="threshold (default 2)"),
    config: str = ConfigOption,
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Register a scheduled Prefect flow that sends the probes every --interval seconds and logs latency, errors,
    perplexity and changed answers to one MLflow run; a run whose figure crosses its threshold ends Failed.
    This process serves the schedule (Ctrl-C stops serving)."""
    from jielong.flows.monitor import serve_monitor

    thresholds = {"max_error_rate": max_error_rate, "max_latency_p95_s": max_latency_p95_s,
                  "max_changed_share": max_changed_share, "max_perplexity_ratio": max_perplexity_ratio}
    serve_monitor(url, model, interval, name, config, overrides or [], probes,
                  {k: v for k, v in thresholds.items() if v is not None})


def _fail(message: str) -> int:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return 1


class _Busy:
    """A Generator whose replies show the status line while they are generated."""

    def __init__(self, generator):
        self.generator = generator

    def reply(self, *args, **kwargs) -> str:
        from jielong.flows import terminal

        with terminal.status("generating"):
            return self.generator.reply(*args, **kwargs)


def _model_dir(model: str, config: str, overrides: Optional[list[str]] = None):
    """A local model folder for any --model spec, GGUFs converted into the config's workspace."""
    from jielong.models.generate import resolve_model
    from jielong.tasks.config import UserError, load_config
    from jielong.tasks.core.tracking import tracking_uri

    cfg = load_config(config, overrides or [])
    try:
        return resolve_model(model, tracking_uri(cfg), store=cfg.workspace_path())
    except ValueError as err:
        raise UserError(str(err)) from None


class _UserErrorWithoutTraceback(logging.Filter):
    """Prefect's engines log a failed task or flow with its traceback; for a user mistake the CLI's
    one-line message is the report, printed once: Prefect's record of it is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        from jielong.tasks.config import UserError

        return not (record.exc_info and isinstance(record.exc_info[1], UserError))


def quiet_user_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UserErrorWithoutTraceback) for f in logger.filters):
            logger.addFilter(_UserErrorWithoutTraceback())
    # Prefect's workers say "Still processing items" while they send the last events at exit, after the
    # command's own last line (an error, too)
    for name in ("EventsWorker", "APILogWorker"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    from jielong.tasks.config import UserError

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from jielong.flows import quiet

    quiet.configure(verbose="--verbose" in sys.argv[1:])  # before any library is imported
    quiet_user_errors()
    try:
        app()
        code = 0
    except UserError as err:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)  # unwrapped: greppable
        code = 2
    except SystemExit as done:  # how typer ends every command
        code = done.code
    exit_without_teardown(code)


def exit_without_teardown(code: int | str | None) -> None:
    """Exit as the interpreter does (threads' exit hooks and joins, atexit handlers: Prefect's and MLflow's
    flushes, logging), minus its last step, freeing every module's objects one by one: with Prefect and
    MLflow loaded that alone takes 1-3 s of a cached rerun on 2 cores."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # the interpreter's first exit step
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
